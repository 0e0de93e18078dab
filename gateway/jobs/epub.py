"""EPUB 2/3 books read with zipfile and the standard library's XML/HTML parsers (ebooklib is AGPL: not used).

What a job needs from a book: its title, author and language (M4B metadata), its cover (M4B cover art) and its
chapters in reading order with their table-of-contents titles.

- Reading order is the OPF spine (items marked linear="no" — pop-up notes, covers — are left out).
- Titles come from the EPUB 3 navigation document (`<nav epub:type="toc">`) or, for EPUB 2, the NCX navMap; a
  spine document the table of contents does not name continues the previous chapter (chapters split over several
  files), and one before the first named document (title page, dedication) is a chapter titled by its own
  heading. A document holding several TOC entries (`chapter.xhtml#s2`) is split at those anchors, paragraph-wise.
- Text is the XHTML body's text with block elements as paragraph breaks; scripts, styles, page-break markers and
  note references / footnotes (epub:type or role) are not read aloud. The HTML parser is used even though XHTML is
  XML, because real books carry HTML entities (&nbsp;) and unclosed tags that an XML parser rejects.
- The cover is the manifest item with the EPUB 3 `cover-image` property, or the EPUB 2 `<meta name="cover">`,
  or an image item named like a cover; only JPEG and PNG are kept (what MP4 cover art can hold).

Limits: members larger than `max_member_bytes` or a book inflating past `max_total_bytes` are refused (zip bombs);
DRM-encrypted content documents are refused with a message saying so. Nothing is extracted to disk.
"""

from __future__ import annotations

import io
import posixpath
import re
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit
from xml.etree import ElementTree

from engine_ref.errors import InputError
from gateway.jobs.text import Chapter, has_speech

__all__ = ["Cover", "Book", "read_epub", "is_epub", "xhtml_text"]

_EPUB_FIX = "upload a valid EPUB 2 or 3 file (as written by Calibre, Sigil or a publisher)"
_COVER_TYPES = {"image/jpeg": "image/jpeg", "image/jpg": "image/jpeg", "image/png": "image/png"}
_BLOCK_TAGS = frozenset("p div section article h1 h2 h3 h4 h5 h6 li ul ol dl dt dd blockquote pre tr table "
                        "figcaption figure header footer aside nav hr br body main".split())
_SKIP_TAGS = frozenset("script style head svg math rt rp noscript template".split())
_VOID_TAGS = frozenset("br img hr meta link input col area base wbr source track embed param".split())
_SKIP_SEMANTICS = ("pagebreak", "noteref", "footnote", "endnote", "rearnote")
_HEADING_TAGS = frozenset("h1 h2 h3".split())


@dataclass(frozen=True)
class Cover:
    data: bytes
    media_type: str  #: image/jpeg or image/png


@dataclass(frozen=True)
class Book:
    title: str | None
    author: str | None
    language: str | None
    chapters: tuple[Chapter, ...]
    cover: Cover | None


def is_epub(data: bytes) -> bool:
    """A zip whose first member is the EPUB `mimetype` file (what the OCF spec requires), or any zip with an OPF."""
    if not data.startswith(b"PK"):
        return False
    return b"application/epub+zip" in data[:200] or b"META-INF/container.xml" in data


# --- XHTML text ------------------------------------------------------------------------------------------------

class _XhtmlText(HTMLParser):
    """Paragraphs of an XHTML document's body, plus where each element id starts (a paragraph index)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.anchors: dict[str, int] = {}
        self.title = ""
        self.heading = ""
        self._buf: list[str] = []
        self._skip: list[str] = []  # open tags whose content is not read
        self._in_title = False
        self._heading_depth = 0
        self._heading_buf: list[str] = []

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
        if text:
            self.paragraphs.append(text)
        self._buf = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "title":
            self._in_title = True
        if self._skip:
            if tag not in _VOID_TAGS:
                self._skip.append(tag)
            return
        semantics = f"{a.get('epub:type', '')} {a.get('role', '')}".lower()
        if tag in _SKIP_TAGS or any(s in semantics for s in _SKIP_SEMANTICS):
            if tag not in _VOID_TAGS:
                self._skip.append(tag)
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if "id" in a and a["id"] not in self.anchors:
            self.anchors[a["id"]] = len(self.paragraphs)
        if tag in _HEADING_TAGS and not self.heading:
            self._heading_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if self._skip:
            if tag in self._skip:  # close up to the matching tag (tolerates unclosed children)
                while self._skip and self._skip.pop() != tag:
                    pass
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _HEADING_TAGS and self._heading_depth:
            self._heading_depth -= 1
            if not self._heading_depth and not self.heading:
                self.heading = re.sub(r"\s+", " ", "".join(self._heading_buf)).strip()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
            return
        if self._skip:
            return
        self._buf.append(data)
        if self._heading_depth:
            self._heading_buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()
        self.title = re.sub(r"\s+", " ", self.title).strip()


def xhtml_text(markup: str) -> _XhtmlText:
    parser = _XhtmlText()
    parser.feed(markup)
    parser.close()
    return parser


class _NavLinks(HTMLParser):
    """(href, text) of every link in the EPUB 3 nav document's toc <nav> (or its first <nav>), in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.navs: list[tuple[bool, list[tuple[str, str]]]] = []
        self._nav_depth = 0
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "nav":
            if not self._nav_depth:
                self.navs.append(("toc" in a.get("epub:type", "").split() or a.get("role") == "doc-toc", []))
            self._nav_depth += 1
        elif tag == "a" and self._nav_depth and a.get("href"):
            self._href, self._text = a["href"], []

    def handle_endtag(self, tag: str) -> None:
        if tag == "nav" and self._nav_depth:
            self._nav_depth -= 1
        elif tag == "a" and self._href is not None:
            self.navs[-1][1].append((self._href, re.sub(r"\s+", " ", "".join(self._text)).strip()))
            self._href = None

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def links(self) -> list[tuple[str, str]]:
        for is_toc, links in self.navs:
            if is_toc:
                return links
        return self.navs[0][1] if self.navs else []


# --- the container ----------------------------------------------------------------------------------------------

def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _Archive:
    """Bounded reads from the zip, by normalised path."""

    def __init__(self, data: bytes, max_member_bytes: int, max_total_bytes: int):
        try:
            self._zip = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            raise InputError("the upload is not a zip archive, so not an EPUB", _EPUB_FIX) from None
        self._names = {posixpath.normpath(i.filename).lstrip("/"): i for i in self._zip.infolist()}
        self._max_member, self._left = max_member_bytes, max_total_bytes

    def has(self, path: str) -> bool:
        return path in self._names

    def read(self, path: str) -> bytes:
        info = self._names.get(path)
        if info is None:
            raise InputError(f"the EPUB lacks {path!r}, which its package file lists", _EPUB_FIX)
        if info.file_size > min(self._max_member, self._left):
            raise InputError(f"the EPUB member {path!r} inflates to {info.file_size} bytes, over the limit",
                             "upload a smaller book, or split it")
        try:
            with self._zip.open(info) as fh:
                data = fh.read(self._max_member + 1)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as exc:
            raise InputError(f"cannot read {path!r} from the EPUB ({exc})", _EPUB_FIX) from None
        if len(data) > self._max_member:
            raise InputError(f"the EPUB member {path!r} is larger than its header says", _EPUB_FIX)
        self._left -= len(data)
        return data

    def xml(self, path: str) -> ElementTree.Element:
        try:
            return ElementTree.fromstring(self.read(path))
        except ElementTree.ParseError as exc:
            raise InputError(f"{path!r} in the EPUB is not well-formed XML ({exc})", _EPUB_FIX) from None

    def text(self, path: str) -> str:
        raw = self.read(path)
        m = re.search(rb"""encoding=["']([A-Za-z0-9_.-]+)["']""", raw[:200])
        try:
            return raw.decode(m.group(1).decode() if m else "utf-8", errors="replace")
        except LookupError:
            return raw.decode("utf-8", errors="replace")


def _resolve(base_file: str, href: str) -> tuple[str, str | None]:
    """A manifest/TOC href as (archive path, fragment), relative to the file that holds it."""
    parts = urlsplit(href)
    path = posixpath.normpath(posixpath.join(posixpath.dirname(base_file), unquote(parts.path))).lstrip("/")
    return path, (unquote(parts.fragment) or None)


@dataclass(frozen=True)
class _Item:
    id: str
    path: str
    media_type: str
    properties: frozenset[str]


def _package_path(archive: _Archive) -> str:
    if not archive.has("META-INF/container.xml"):
        raise InputError("the upload has no META-INF/container.xml, so it is not an EPUB", _EPUB_FIX)
    for el in archive.xml("META-INF/container.xml").iter():
        if _local(el.tag) == "rootfile" and el.get("full-path"):
            return posixpath.normpath(unquote(el.get("full-path", ""))).lstrip("/")
    raise InputError("META-INF/container.xml names no package (.opf) file", _EPUB_FIX)


def _encrypted_paths(archive: _Archive) -> set[str]:
    """Content encrypted by DRM (font obfuscation, which leaves text readable, is not counted)."""
    if not archive.has("META-INF/encryption.xml"):
        return set()
    out = set()
    for data in archive.xml("META-INF/encryption.xml").iter():
        if _local(data.tag) != "EncryptedData":
            continue
        method = next((m.get("Algorithm", "") for m in data.iter() if _local(m.tag) == "EncryptionMethod"), "")
        if "embedding" in method or "obfuscation" in method.lower():
            continue
        for ref in data.iter():
            if _local(ref.tag) == "CipherReference" and ref.get("URI"):
                out.add(posixpath.normpath(unquote(ref.get("URI", ""))).lstrip("/"))
    return out


def read_epub(data: bytes, *, max_member_bytes: int = 64 << 20, max_total_bytes: int = 512 << 20) -> Book:
    """The book in an EPUB file's bytes (see the module docstring); InputError names what is wrong."""
    archive = _Archive(data, max_member_bytes, max_total_bytes)
    opf_path = _package_path(archive)
    opf = archive.xml(opf_path)

    meta: dict[str, str] = {}
    cover_id: str | None = None
    items: dict[str, _Item] = {}
    spine: list[str] = []
    ncx_id: str | None = None
    for el in opf.iter():
        name = _local(el.tag)
        if name in ("title", "creator", "language") and name not in meta and (el.text or "").strip():
            meta[name] = re.sub(r"\s+", " ", el.text or "").strip()
        elif name == "meta" and el.get("name") == "cover" and el.get("content"):
            cover_id = el.get("content")
        elif name == "item" and el.get("id") and el.get("href"):
            path, _ = _resolve(opf_path, el.get("href", ""))
            items[el.get("id", "")] = _Item(el.get("id", ""), path, (el.get("media-type") or "").lower(),
                                            frozenset((el.get("properties") or "").split()))
        elif name == "spine":
            ncx_id = el.get("toc")
        elif name == "itemref" and el.get("idref") and el.get("linear", "yes") != "no":
            spine.append(el.get("idref", ""))

    docs = [items[i] for i in spine if i in items]
    if not docs:
        raise InputError("the EPUB's spine lists no content documents", _EPUB_FIX)
    locked = _encrypted_paths(archive) & {d.path for d in docs}
    if locked:
        raise InputError(f"the EPUB is DRM-protected ({len(locked)} encrypted chapter file(s))",
                         "upload a DRM-free edition of the book")

    toc = _toc(archive, items, ncx_id)
    chapters = _chapters(archive, docs, toc, meta.get("title"))
    if not chapters:
        raise InputError("the EPUB has no text to read (its chapters are empty or images only)",
                         "upload a book with text content")
    return Book(meta.get("title"), meta.get("creator"), meta.get("language"), tuple(chapters),
                _cover(archive, items, cover_id))


def _toc(archive: _Archive, items: dict[str, _Item], ncx_id: str | None) -> list[tuple[str, str | None, str]]:
    """(document path, fragment, title) of each table-of-contents entry: nav document first, else the NCX."""
    nav = next((i for i in items.values() if "nav" in i.properties), None)
    entries: list[tuple[str, str | None, str]] = []
    if nav is not None and archive.has(nav.path):
        parser = _NavLinks()
        parser.feed(archive.text(nav.path))
        parser.close()
        for href, title in parser.links():
            path, frag = _resolve(nav.path, href)
            entries.append((path, frag, title))
    if entries:
        return entries
    ncx = items.get(ncx_id or "") or next((i for i in items.values() if i.media_type == "application/x-dtbncx+xml"),
                                          None)
    if ncx is None or not archive.has(ncx.path):
        return []
    for point in archive.xml(ncx.path).iter():
        if _local(point.tag) != "navPoint":
            continue
        label = next((t for t in point.iter() if _local(t.tag) == "text"), None)
        content = next((c for c in point if _local(c.tag) == "content"), None)
        if content is None or not content.get("src"):
            continue
        path, frag = _resolve(ncx.path, content.get("src", ""))
        entries.append((path, frag, re.sub(r"\s+", " ", (label.text or "") if label is not None else "").strip()))
    return entries


def _chapters(archive: _Archive, docs: list[_Item], toc: list[tuple[str, str | None, str]],
              book_title: str | None) -> list[Chapter]:
    by_doc: dict[str, list[tuple[str | None, str]]] = {}
    for path, frag, title in toc:
        entries = by_doc.setdefault(path, [])
        if all(f != frag for f, _ in entries):
            entries.append((frag, title))
    pieces: list[tuple[str, list[str]]] = []  # (title, paragraphs)
    for n, doc in enumerate(docs):
        if doc.media_type not in ("application/xhtml+xml", "text/html", "application/xml", ""):
            continue
        parsed = xhtml_text(archive.text(doc.path))
        own_title = parsed.heading or parsed.title or book_title or f"Section {n + 1}"
        entries = by_doc.get(doc.path)
        if not entries:
            if pieces:
                pieces[-1][1].extend(parsed.paragraphs)
            else:
                pieces.append((own_title, list(parsed.paragraphs)))
            continue
        cuts = sorted(((parsed.anchors.get(frag, 0) if frag else 0), i, title or own_title)
                      for i, (frag, title) in enumerate(entries))
        if cuts[0][0] > 0:  # text before the first named anchor continues the previous chapter
            lead = parsed.paragraphs[:cuts[0][0]]
            if pieces:
                pieces[-1][1].extend(lead)
            else:
                pieces.append((own_title, list(lead)))
        for k, (start, _, title) in enumerate(cuts):
            end = cuts[k + 1][0] if k + 1 < len(cuts) else len(parsed.paragraphs)
            pieces.append((title, list(parsed.paragraphs[start:end])))
    return [Chapter(title, "\n\n".join(paras)) for title, paras in pieces if has_speech(" ".join(paras))]


def _cover(archive: _Archive, items: dict[str, _Item], cover_id: str | None) -> Cover | None:
    candidates = [i for i in items.values() if "cover-image" in i.properties]
    if cover_id and cover_id in items:
        candidates.append(items[cover_id])
    candidates += [i for i in items.values() if i.media_type.startswith("image/")
                   and ("cover" in i.id.lower() or "cover" in posixpath.basename(i.path).lower())]
    for item in candidates:
        media = _COVER_TYPES.get(item.media_type)
        if media and archive.has(item.path):
            try:
                return Cover(archive.read(item.path), media)
            except InputError:
                return None  # an oversized cover is dropped, not fatal
    return None
