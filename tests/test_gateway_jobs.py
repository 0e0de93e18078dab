"""Long-form jobs: txt/EPUB chapters, the M4B (and other) files they become, the job store on SQLite and a real
PostgreSQL server, and the job API on a real gateway process in front of a real tritonserver (tiny model):
an EPUB -> M4B with its chapters, SSE progress and ranged downloads, resume after SIGKILL without redoing
finished parts, cancel (the server's requests stop), two jobs at once with the third queued, keys owning jobs,
path traversal, and the `triton-tts client job` commands."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine_ref.errors import InputError
from gateway.jobs.epub import Cover, read_epub
from gateway.jobs.m4b import JOB_FORMATS, ChapterMark, Tags, write_audiobook
from gateway.jobs.store import SqliteJobStore, PostgresJobStore, is_job_id, open_store
from gateway.jobs.text import chapters_from_text, plan_parts
from model_repository.server import free_port

httpx = pytest.importorskip("httpx")

KEY_A, KEY_B = "key-alice-0123456789", "key-bob-9876543210"
GREEDY = {"do_sample": False, "num_beams": 1}
JOB_ENV = {
    "TTS_GATEWAY_API_KEYS": f"{KEY_A},{KEY_B}",
    "TTS_GATEWAY_MAX_JOB_CHARS": "6000",
    "TTS_GATEWAY_MAX_REQUESTS_PER_MINUTE": "100000",  # the tests poll
    "TTS_GATEWAY_JOB_HEARTBEAT_S": "0.5",
    "TTS_GATEWAY_JOB_STALE_AFTER_S": "3",
    "TTS_GATEWAY_JOB_POLL_S": "0.3",
    "TTS_GATEWAY_JOB_PART_CHARS": "160",
    "TTS_GATEWAY_JOB_PARTS_IN_FLIGHT": "1",
    "TTS_GATEWAY_JOB_CHAPTER_GAP_S": "0.5",
    "TTS_GATEWAY_JOB_KEEP_PARTS": "1",
}
WORDS = ("river stone lantern meadow quiet window harbor candle morning garden silver thunder orchard "
         "pebble valley ember winter violet").split()


def sentences(n: int, seed: int) -> str:
    """Deterministic prose: n sentences of six words."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), 6)]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


# --- test books -----------------------------------------------------------------------------------------------------

def jpeg_bytes(width: int = 32, height: int = 24) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as out:
        stream = out.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), format="rgb24")
        for packet in stream.encode(frame.reformat(format="yuvj420p")):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def write_epub(chapters: list[tuple[str, str]], *, title="A Test Book", author="Ada Author", cover: bytes | None = None,
               epub2: bool = False, extra_docs: dict[str, str] | None = None, spine: list[str] | None = None,
               toc: list[tuple[str, str]] | None = None) -> bytes:
    """An EPUB (3 with a nav document, or 2 with an NCX) whose chapter files hold <h1>title</h1><p>text</p>.
    The package file sits in OEBPS/, the chapters in OEBPS/text/ (relative hrefs are exercised)."""
    docs = {f"ch{i + 1}": (f"text/ch{i + 1}.xhtml",
                           f'<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml" '
                           f'xmlns:epub="http://www.idpf.org/2007/ops"><head><title>File {i + 1}</title>'
                           f"<style>p {{ color: red; }}</style></head><body><section><h1>{t}</h1>"
                           + "".join(f"<p>{para}</p>" for para in body.split("\n\n"))
                           + f'<p><a epub:type="noteref" href="#n{i}">{i + 7}</a></p>'
                           + '<span epub:type="pagebreak" id="p9">9</span></section></body></html>')
            for i, (t, body) in enumerate(chapters)}
    for name, markup in (extra_docs or {}).items():
        docs[name] = (f"text/{name}.xhtml", markup)
    spine = spine or list(docs)
    toc = toc or [(t, f"text/ch{i + 1}.xhtml") for i, (t, _) in enumerate(chapters)]
    manifest = "".join(f'<item id="{k}" href="{href}" media-type="application/xhtml+xml"/>'
                       for k, (href, _) in docs.items())
    meta_cover = ""
    if cover is not None:
        props = "" if epub2 else ' properties="cover-image"'
        manifest += f'<item id="img-front" href="images/front.jpg" media-type="image/jpeg"{props}/>'
        meta_cover = '<meta name="cover" content="img-front"/>' if epub2 else ""
    if epub2:
        manifest += '<item id="ncx" href="toc.ncx" media-type="application/x-dtbncx+xml"/>'
    else:
        manifest += '<item id="nav" href="nav.xhtml" media-type="application/xhtml+xml" properties="nav"/>'
    opf = (f'<?xml version="1.0" encoding="UTF-8"?><package xmlns="http://www.idpf.org/2007/opf" '
           f'version="{2.0 if epub2 else 3.0}" unique-identifier="uid"><metadata '
           f'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:identifier id="uid">urn:x</dc:identifier>'
           f"<dc:title>{title}</dc:title><dc:creator>{author}</dc:creator><dc:language>en</dc:language>"
           f"{meta_cover}</metadata><manifest>{manifest}</manifest>"
           f'<spine{" toc=" + chr(34) + "ncx" + chr(34) if epub2 else ""}>'
           + "".join(f'<itemref idref="{k}"/>' for k in spine) + "</spine></package>")
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(zipfile.ZipInfo("mimetype"), "application/epub+zip")  # first and stored, as OCF requires
        zf.writestr("META-INF/container.xml",
                    '<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:'
                    'container"><rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/'
                    'oebps-package+xml"/></rootfiles></container>', compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("OEBPS/content.opf", opf, compress_type=zipfile.ZIP_DEFLATED)
        for href, markup in docs.values():
            zf.writestr(f"OEBPS/{href}", markup, compress_type=zipfile.ZIP_DEFLATED)
        if cover is not None:
            zf.writestr("OEBPS/images/front.jpg", cover)
        if epub2:
            points = "".join(f'<navPoint id="n{i}" playOrder="{i + 1}"><navLabel><text>{t}</text></navLabel>'
                             f'<content src="{href}"/></navPoint>' for i, (t, href) in enumerate(toc))
            zf.writestr("OEBPS/toc.ncx", '<?xml version="1.0"?><ncx xmlns="http://www.daisy.org/z3986/2005/ncx/" '
                                         f'version="2005-1"><navMap>{points}</navMap></ncx>')
        else:
            links = "".join(f'<li><a href="{href}">{t}</a></li>' for t, href in toc)
            zf.writestr("OEBPS/nav.xhtml", '<?xml version="1.0" encoding="utf-8"?><html xmlns="http://www.w3.org/'
                                           '1999/xhtml" xmlns:epub="http://www.idpf.org/2007/ops"><body>'
                                           '<nav epub:type="landmarks"><ol><li><a href="text/ch1.xhtml">Start</a>'
                                           f'</li></ol></nav><nav epub:type="toc"><ol>{links}</ol></nav></body></html>')
    return z.getvalue()


BOOK = [("The Beginning", sentences(4, 1) + "\n\n" + sentences(3, 2)),
        ("A Middle Part", sentences(3, 3)),
        ("The End", sentences(5, 4))]


# --- text and EPUB (no server) ----------------------------------------------------------------------------------------

def test_txt_chapters_from_headings_and_parts_within_the_limit():
    text = ("Front words here.\n\nChapter 1\n\nIt was dark.\nStill dark.\n\nCHAPTER II. The Storm\n\nRain fell.\n\n"
            "Part of the problem was here.\n\n# Epilogue\n\nThe end.\n")
    chapters = chapters_from_text(text, default_title="book")
    assert [c.title for c in chapters] == ["book", "Chapter 1", "CHAPTER II. The Storm", "Epilogue"]
    assert chapters[2].text.endswith("Part of the problem was here.")  # prose "Part of ..." is no heading
    assert chapters[1].text.startswith("Chapter 1.")  # headings are read aloud
    assert [c.title for c in chapters_from_text("Just one paragraph.\n\nAnd another.")] == ["Text"]
    long = "\n\n".join(sentences(3, s) for s in range(12))
    parts = plan_parts(chapters_from_text(long), 150)
    assert all(len(p.text) <= 150 for p in parts) and len(parts) > 5
    assert [p.index for p in parts] == list(range(len(parts)))
    assert re.sub(r"\s+", "", "".join(p.text for p in parts)) == re.sub(r"\s+", "", long)  # nothing lost
    assert [p.text for p in plan_parts(chapters_from_text("Line one\nline two.\n\nNext."), 100)] == \
        ["Line one line two.\n\nNext."]  # hard-wrapped lines read as one paragraph
    with pytest.raises(InputError):
        chapters_from_text("  ...  \n\n --- ")


def test_epub3_nav_titles_spine_order_cover_and_what_is_not_read():
    cover = jpeg_bytes()
    data = write_epub(BOOK, cover=cover)
    book = read_epub(data)
    assert (book.title, book.author, book.language) == ("A Test Book", "Ada Author", "en")
    assert [c.title for c in book.chapters] == [t for t, _ in BOOK]  # the toc nav, not the landmarks nav
    for chapter, (title, body) in zip(book.chapters, BOOK):
        assert chapter.text.split("\n\n")[0] == title
        assert chapter.text.split("\n\n")[1:] == body.split("\n\n")  # no note refs, page numbers or CSS
    assert book.cover == Cover(cover, "image/jpeg")


def test_epub2_ncx_anchor_split_continuation_and_front_matter():
    split_doc = ('<html xmlns="http://www.w3.org/1999/xhtml"><body><h2 id="a">Alpha</h2><p>First half.</p>'
                 '<h2 id="b">Beta</h2><p>Second half &amp; more&nbsp;text.</p><br/></body></html>')
    more = '<html><body><p>Continued text.</p><script>var x = "no";</script></body></html>'
    title_page = '<html><head><title>Title page</title></head><body><p>By Somebody.</p></body></html>'
    data = write_epub([("One", "Hello one.")], epub2=True, cover=jpeg_bytes(),
                      extra_docs={"split": split_doc, "more": more, "titlepage": title_page},
                      spine=["titlepage", "ch1", "split", "more"],
                      toc=[("One", "text/ch1.xhtml"), ("Part A", "text/split.xhtml#a"),
                           ("Part B", "text/split.xhtml#b")])
    book = read_epub(data)
    assert [c.title for c in book.chapters] == ["Title page", "One", "Part A", "Part B"]
    assert book.chapters[2].text == "Alpha\n\nFirst half."
    assert book.chapters[3].text == "Beta\n\nSecond half & more\u00a0text.\n\nContinued text.".replace("\u00a0", " ")
    assert book.cover is not None and book.cover.media_type == "image/jpeg"


def test_epub_errors_name_the_problem():
    with pytest.raises(InputError, match="not a zip"):
        read_epub(b"plain text, not a book")
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("mimetype", "application/epub+zip")
    with pytest.raises(InputError, match="container.xml"):
        read_epub(z.getvalue())
    drm = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(write_epub(BOOK))) as src, zipfile.ZipFile(drm, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("META-INF/encryption.xml",
                     '<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" xmlns:enc="http://www.w3.'
                     'org/2001/04/xmlenc#"><enc:EncryptedData><enc:EncryptionMethod Algorithm="http://www.w3.org/'
                     '2001/04/xmlenc#aes128-cbc"/><enc:CipherData><enc:CipherReference URI="OEBPS/text/ch1.xhtml"/>'
                     "</enc:CipherData></enc:EncryptedData></encryption>")
    with pytest.raises(InputError, match="DRM"):
        read_epub(drm.getvalue())


# --- output files (no server) ---------------------------------------------------------------------------------------

def mp4_boxes(data: bytes, start: int = 0, end: int | None = None, path: str = "") -> dict[str, list[bytes]]:
    """Every box's payload by its path (moov/udta/chpl ...), parsed by hand (independent of libav)."""
    containers = {"moov", "trak", "mdia", "minf", "stbl", "udta", "edts", "tref", "ilst"}
    out: dict[str, list[bytes]] = {}
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start:start + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[start + 8:start + 16])[0], 16
        size = size or end - start
        name = kind.decode("latin-1")
        here = f"{path}/{name}" if path else name
        payload = data[start + header:start + size]
        out.setdefault(here, []).append(payload)
        inner = 4 if name == "meta" else 0  # meta is a full box
        if name in containers or name == "meta" or (path.endswith("ilst")):
            for k, v in mp4_boxes(payload, inner, len(payload), here).items():
                out.setdefault(k, []).extend(v)
        start += size
    return out


def test_m4b_has_chapter_atoms_tags_and_cover_read_back_by_hand_and_by_pyav(tmp_path):
    import av

    sr = 24000
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(sr * 6) * 3000).astype(np.int16)
    marks = [ChapterMark("Erstes Kapitel", 0, sr * 2), ChapterMark("Zwei — ü", sr * 2, sr * 5 // 2),
             ChapterMark("Three", sr * 5 // 2, sr * 6)]
    cover = jpeg_bytes()
    path = write_audiobook(tmp_path / "book.m4b", "m4b", sr, [pcm[:10000], pcm[10000:]], marks,
                           Tags("My Book", "Ada Author", "en", Cover(cover, "image/jpeg")))
    data = path.read_bytes()
    boxes = mp4_boxes(data)
    assert boxes["ftyp"][0][:4] == b"M4B "
    chpl = boxes["moov/udta/chpl"][0]
    count = chpl[8]
    entries, pos = [], 9
    for _ in range(count):
        start_100ns = struct.unpack(">Q", chpl[pos:pos + 8])[0]
        n = chpl[pos + 8]
        entries.append((start_100ns / 1e7, chpl[pos + 9:pos + 9 + n].decode("utf-8")))
        pos += 9 + n
    assert entries == [(m.start / sr, m.title) for m in marks]
    covr = boxes["moov/udta/meta/ilst/covr/data"][0]
    assert struct.unpack(">I", covr[:4])[0] == 13 and covr[8:] == cover  # 13: JPEG
    assert boxes["moov/udta/meta/ilst/\xa9nam/data"][0][8:] == b"My Book"
    assert boxes["moov/udta/meta/ilst/\xa9ART/data"][0][8:] == b"Ada Author"
    assert any(b"chap" in t for t in boxes.get("moov/trak/tref", []))  # QuickTime chapter track too
    assert data.index(b"moov") < data.index(b"mdat")  # faststart

    with av.open(str(path)) as container:
        got = [(float(c["start"] * c["time_base"]), float(c["end"] * c["time_base"]), c["metadata"]["title"])
               for c in container.chapters()]
        duration = container.duration / 1e6
        assert container.streams.audio[0].codec_context.name == "aac"
    assert got == [(m.start / sr, m.end / sr, m.title) for m in marks]
    assert abs(sum(e - s for s, e, _ in got) - duration) < 1024 / sr + 1e-3  # chapters add up to the file


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac", "wav"])
def test_other_formats_decode_with_their_chapters(tmp_path, fmt):
    import av

    sr = 24000
    pcm = (np.sin(np.arange(sr * 3) * 2 * np.pi * 300 / sr) * 8000).astype(np.int16)
    marks = [ChapterMark("One", 0, sr), ChapterMark("Two", sr, sr * 3)]
    path = write_audiobook(tmp_path / f"x.{JOB_FORMATS[fmt].extension}", fmt, sr, [pcm], marks, Tags("T", "A"))
    with av.open(str(path)) as container:
        chapters = [(round(float(c["start"] * c["time_base"]), 3), c["metadata"].get("title"))
                    for c in container.chapters()]
        samples = sum(f.samples for f in container.decode(audio=0))
        rate = container.streams.audio[0].codec_context.sample_rate
    assert abs(samples / rate - 3.0) < 0.1
    assert chapters == ([] if fmt == "wav" else [(0.0, "One"), (1.0, "Two")])
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, renamed


# --- the store: SQLite and a real PostgreSQL ------------------------------------------------------------------------

def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's postgresql package) on a free port, stopped at the end."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.fail("PostgreSQL's initdb/pg_ctl are missing. Fix: apt-get install -y postgresql (.ci/run does)")
    base = Path(tempfile.mkdtemp(prefix="tts-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    port = free_port()
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
                    "--locale=C"], check=True, capture_output=True, timeout=120)
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "-t", "60",
                    "start"], check=True, capture_output=True, timeout=90)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request, tmp_path):
    """A function making store connections to one fresh database (several connections: several replicas)."""
    made = []
    if request.param == "sqlite":
        path = tmp_path / "jobs.sqlite3"

        def make():
            made.append(SqliteJobStore(path))
            return made[-1]
    else:
        url = request.getfixturevalue("postgres_url")
        first = PostgresJobStore(url)
        first._execute("DROP TABLE IF EXISTS jobs")
        first.close()

        def make():
            made.append(PostgresJobStore(url))
            return made[-1]
    yield make
    for store in made:
        store.close()


def test_claims_are_exclusive_under_concurrent_replicas(store_factory):
    stores = [store_factory() for _ in range(4)]
    ids = [stores[0].create("alice", {"n": i}).id for i in range(24)]
    claimed: dict[str, list[str]] = {}
    lock = threading.Lock()
    start = threading.Barrier(len(stores))

    def replica(n: int) -> None:
        start.wait()
        while True:
            record = stores[n].claim(f"r{n}", stale_after_s=60)
            if record is None:
                return
            with lock:
                claimed.setdefault(record.id, []).append(f"r{n}")

    threads = [threading.Thread(target=replica, args=(n,)) for n in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(ids)
    assert all(len(v) == 1 for v in claimed.values()), {k: v for k, v in claimed.items() if len(v) > 1}
    assert stores[1].counts()["running"] == 24
    assert [r.request["n"] for r in reversed(stores[2].list("alice", limit=100))] == list(range(24))


def test_stale_claims_move_and_the_old_worker_cannot_write(store_factory):
    a, b = store_factory(), store_factory()
    job = a.create("alice", {"text": "x"}, {"phase": "queued"})
    assert is_job_id(job.id) and job.state == "queued"
    first = a.claim("w1", stale_after_s=1.0)
    assert (first.id, first.state, first.claimed_by, first.attempts) == (job.id, "running", "w1", 1)
    assert b.claim("w2", stale_after_s=1.0) is None  # fresh heartbeat: not claimable
    assert a.heartbeat(job.id, "w1", {"parts_done": 1}).progress == {"parts_done": 1}
    time.sleep(1.3)
    second = b.claim("w2", stale_after_s=1.0)  # w1 went quiet: w2 resumes it
    assert (second.id, second.claimed_by, second.attempts) == (job.id, "w2", 2)
    assert second.progress == {"parts_done": 1}
    assert a.heartbeat(job.id, "w1") is None and a.update(job.id, "w1", state="failed", error="x") is None
    assert b.update(job.id, "w2", state="encoding").state == "encoding"
    # cancel: a running job is flagged for its worker, a queued one is cancelled at once
    flagged = a.request_cancel(job.id)
    assert flagged.state == "encoding" and flagged.cancel_requested
    assert b.heartbeat(job.id, "w2").cancel_requested
    assert b.finish_cancel(job.id, "w2").state == "cancelled"
    queued = a.create("alice", {})
    assert a.request_cancel(queued.id).state == "cancelled" and a.claim("w3", 1.0) is None
    assert a.delete(queued.id) and a.get(queued.id) is None
    # release (a gateway shutting down): claimable again at once
    c = a.create("bob", {})
    assert a.claim("w4", 60).id == c.id and a.release(c.id, "w4")
    assert b.claim("w5", 60).attempts == 2
    assert a.get("../../etc/passwd") is None and a.request_cancel("job_../x") is None


def test_open_store_urls(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/x/jobs.db")
    assert isinstance(store, SqliteJobStore) and (tmp_path / "x" / "jobs.db").exists()
    store.close()
    with pytest.raises(Exception, match="unsupported job database URL"):
        open_store("mysql://x")


# --- the workers against a scripted server (no Triton) -------------------------------------------------------------

class ScriptedTTS:
    """TritonTTS's interface: each call to stream() pops the next behaviour ("ok", an exception to raise)."""

    def __init__(self, script: list, rate: int = 24000):
        self.script = list(script)
        self.calls: list[tuple[str, bool, str | None]] = []
        self.rate = rate

    async def max_text_chars(self) -> int:
        return 2000

    async def stream(self, text, voice_audio=None, speaker_id=None, params=None, request_id="",
                     max_text_tokens_per_segment=None, controls=None):
        from gateway.triton import AudioChunk

        self.calls.append((text, voice_audio is not None, speaker_id))
        step = self.script.pop(0) if self.script else "ok"
        if isinstance(step, BaseException):
            raise step
        for i in range(2):
            yield AudioChunk(np.full(len(text) * 10, i + 1, np.int16), self.rate, i, 2, i == 1, speaker_id="spk-1")


def run_jobs(tmp_path, script: list, text: str, fmt: str = "wav", **config) -> tuple[dict, ScriptedTTS, Path]:
    """One job through a JobRunner on SQLite with a scripted server; returns (the finished job's row, the fake,
    the jobs dir)."""
    import asyncio

    from gateway.jobs.files import JobFiles
    from gateway.jobs.worker import JobConfig, JobRunner

    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    tts = ScriptedTTS(script)
    files = JobFiles(tmp_path / "jobs", "job_" + "1" * 32)
    chapters = chapters_from_text(text)
    files.create(chapters, "T", "A", "en", b"voice-bytes", None)
    store.create("alice", {"format": fmt, "voice": "v"}, {}, job_id=files.id)
    cfg = JobConfig(**{"max_jobs": 1, "heartbeat_s": 0.05, "stale_after_s": 1.0, "poll_s": 0.05, "part_chars": 60,
                       "retry_backoff_s": 0.01, "chapter_gap_s": 0.0, **config})

    async def main():
        runner = JobRunner(store, tmp_path / "jobs", tts, cfg)
        await runner.start()
        for _ in range(400):
            record = store.get(files.id)
            if record.terminal and not runner.running():
                break
            await asyncio.sleep(0.02)
        await runner.stop()
        return store.get(files.id)

    record = asyncio.run(main())
    store.close()
    return record, tts, tmp_path / "jobs" / files.id


def test_workers_retry_transient_errors_reuse_the_speaker_id_and_fall_back_to_audio(tmp_path):
    from client.errors import RequestRejected, ServerUnavailable

    text = "# One\n\n" + sentences(3, 5) + "\n\n# Two\n\n" + sentences(2, 6)
    script = ["ok", ServerUnavailable("cannot reach a Triton server", "start it"),
              RequestRejected("speaker id 'spk-1' is not in this server's cache", "send the audio"), "ok"]
    record, tts, job_dir = run_jobs(tmp_path, script, text)
    assert record.state == "succeeded", record.error
    plan = json.loads((job_dir / "plan.json").read_text())["parts"]
    assert all(len(p["text"]) <= 60 for p in plan) and len(plan) >= 4
    # part 0 with audio; part 1 by speaker id, unavailable once, then retried; the server forgot the id: audio again
    assert [(audio, spk) for _, audio, spk in tts.calls[:4]] == [(True, None), (False, "spk-1"), (False, "spk-1"),
                                                                (True, None)]
    assert len(tts.calls) == len(plan) + 2
    expected = sum(2 * len(p["text"]) * 10 for p in plan)
    assert record.result["duration_s"] == pytest.approx(expected / 24000, abs=1e-3)
    assert [c["title"] for c in record.progress["chapters"]] == ["One", "Two"]
    assert not (job_dir / "parts").exists()  # parts removed once the file is written
    import wave

    with wave.open(str(job_dir / "result.wav"), "rb") as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    lengths = [len(p["text"]) * 10 for p in plan]
    assert samples.tolist() == [v for n in lengths for v in [1] * n + [2] * n]  # parts in order, nothing twice


def test_workers_fail_a_job_the_server_rejects_with_its_message(tmp_path):
    from client.errors import RequestRejected

    record, tts, _ = run_jobs(tmp_path, [RequestRejected("text has no letters", "send words")], sentences(2, 7))
    assert record.state == "failed" and record.error == "text has no letters. Fix: send words."
    assert len(tts.calls) <= 2 and record.claimed_by is None and record.finished_at is not None  # 2 lanes


# --- the job API on a real gateway and tritonserver -----------------------------------------------------------------

@pytest.fixture(scope="module")
def triton(tiny_export_dir, tmp_path_factory):
    from gateway_support import start_triton

    server = start_triton(tiny_export_dir, tmp_path_factory.mktemp("jobs-triton"), max_sequences=8,
                          max_text_chars=2000)
    yield server
    server.stop()


class Api:
    def __init__(self, url: str, key: str | None = KEY_A):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=60)

    def submit(self, **kwargs):
        return self.http.post("/v1/audio/jobs", **kwargs)

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/v1/audio/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, timeout_s: float = 120, states=("succeeded", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not reach {states}: {self.job(job_id)}")


def upload_voice(api: Api, voice_wav: Path, name: str = "demo") -> None:
    r = api.http.post("/v1/audio/voices", data={"name": name},
                      files={"audio": ("voice.wav", voice_wav.read_bytes(), "audio/wav")})
    assert r.status_code in (200, 201), r.text


@pytest.fixture(scope="module")
def gateway(triton, voice_wav, tmp_path_factory):
    from gateway_support import start_gateway_process

    data = tmp_path_factory.mktemp("jobs-gateway") / "data"
    proc = start_gateway_process(triton.grpc_url, data, "--max-jobs", "2", env=JOB_ENV)
    for key in (KEY_A, KEY_B):
        upload_voice(Api(proc.url, key), voice_wav, "demo" if key == KEY_A else "demo-b")
    proc.data_dir = data
    yield proc
    proc.stop()


def triton_metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(tts_[a-z_]+)\{[^}]*\} ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def settle(server, timeout_s: float = 20) -> dict[str, float]:
    """The server's counters once nothing is in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = triton_metrics(server)
        if m.get("tts_active_requests", 0) == 0 and m.get("tts_decoder_active_sequences", 0) == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not go idle: {m}")
        time.sleep(0.2)


def test_epub_job_becomes_an_m4b_with_its_chapters_live_progress_and_ranged_download(gateway):
    import av

    api = Api(gateway.url)
    epub = write_epub(BOOK, cover=jpeg_bytes())
    r = api.submit(files={"file": ("book.epub", epub, "application/epub+zip")},
                   data={"voice": "demo", "format": "m4b", **{k: str(v).lower() for k, v in GREEDY.items()}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/audio/jobs/{job['id']}"
    assert job["state"] == "queued" and [c["title"] for c in job["chapters"]] == [t for t, _ in BOOK]
    assert (job["title"], job["author"], job["source"]) == ("A Test Book", "Ada Author", "epub")

    events: list[tuple[str, dict]] = []
    with api.http.stream("GET", f"/v1/audio/jobs/{job['id']}/events", timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
                if event == "done":
                    break
    fractions = [e["progress"] for _, e in events]
    assert events[-1][0] == "done" and events[-1][1]["state"] == "succeeded"
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(set(fractions)) >= 3  # it rose
    assert any(e["state"] == "running" and e["eta_seconds"] is not None for _, e in events)

    done = api.job(job["id"])
    assert done["parts"]["done"] == done["parts"]["total"] >= 3
    assert done["characters"]["done"] == done["characters"]["total"]
    assert done["segments"]["done"] == done["segments"]["total"] and not done["segments"]["estimated"]
    r = api.http.get(done["result"]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mp4"
    assert "A%20Test%20Book.m4b" in r.headers["content-disposition"]  # RFC 5987 filename*
    data = r.content
    assert len(data) == done["result"]["bytes"]
    part = api.http.get(done["result"]["url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"

    with av.open(io.BytesIO(data)) as container:
        chapters = [(float(c["start"] * c["time_base"]), float(c["end"] * c["time_base"]), c["metadata"]["title"])
                    for c in container.chapters()]
        duration = container.duration / 1e6
        assert container.metadata["title"] == "A Test Book" and container.metadata["artist"] == "Ada Author"
        assert any(s.type == "video" for s in container.streams)  # the cover
        samples = sum(f.samples for f in container.decode(audio=0))
    assert [t for _, _, t in chapters] == [t for t, _ in BOOK]
    starts = [s for s, _, _ in chapters]
    assert starts[0] == 0 and all(chapters[i][1] == pytest.approx(chapters[i + 1][0], abs=1e-3) for i in range(2))
    assert [c["start_s"] for c in done["chapters"]] == pytest.approx(starts, abs=2e-3)
    lengths = [e - s for s, e, _ in chapters]
    assert all(x > 0.5 for x in lengths)
    assert sum(lengths) == pytest.approx(done["result"]["duration_s"], abs=2e-3)
    assert sum(lengths) == pytest.approx(duration, abs=0.05)
    assert samples / 24000 == pytest.approx(duration, abs=0.1)


def test_submission_errors_and_ownership(gateway):
    api, other, nobody = Api(gateway.url), Api(gateway.url, KEY_B), Api(gateway.url, None)
    r = nobody.submit(json={"input": "Hello.", "voice": "demo"})
    assert r.status_code == 401
    cases = [
        ({"json": {"input": "Hello.", "voice": "demo", "format": "ogg"}}, 400, "format"),
        ({"json": {"input": "Hello.", "voice": "nobody"}}, 404, "voice"),
        ({"json": {"voice": "demo"}}, 400, "input"),
        ({"json": {"input": "Hello.", "voice": "demo", "temperature": "hot"}}, 400, "temperature"),
        ({"json": {"input": "Hello.", "voice": "demo", "colour": 1}}, 400, "colour"),
        ({"json": {"input": "word " * 1300, "voice": "demo"}}, 413, "input"),  # over max_job_chars (6000)
        ({"files": {"file": ("b.epub", b"PK\x03\x04 broken", "application/epub+zip")}, "data": {"voice": "demo"}},
         400, "file"),
    ]
    for kwargs, status, param in cases:
        r = api.submit(**kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert r.json()["error"]["param"] == param, r.text
        assert "Fix:" in r.json()["error"]["message"] or status == 404
    r = api.submit(json={"input": "Mine only.", "voice": "demo", "format": "wav", **GREEDY})
    job_id = r.json()["id"]
    assert other.http.get(f"/v1/audio/jobs/{job_id}").status_code == 404  # another key's job does not exist
    assert job_id not in [j["id"] for j in other.http.get("/v1/audio/jobs").json()["data"]]
    assert job_id in [j["id"] for j in api.http.get("/v1/audio/jobs").json()["data"]]
    assert other.http.delete(f"/v1/audio/jobs/{job_id}").status_code == 404
    assert api.wait(job_id)["state"] == "succeeded"
    for path in ("/v1/audio/jobs/..%2F..%2Fjobs.sqlite3", "/v1/audio/jobs/%2e%2e/result",
                 f"/v1/audio/jobs/{job_id}%2F..%2F..%2Fjobs.sqlite3/result", "/v1/audio/jobs/job_..%2Fvoices/result",
                 "/v1/audio/jobs/" + "job_" + "0" * 32 + "/result", "/v1/audio/jobs/..%5C..%5Cetc/events"):
        r = api.http.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert "application/json" in r.headers["content-type"]
    wav = api.http.get(f"/v1/audio/jobs/{job_id}/result")
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF"
    assert api.http.delete(f"/v1/audio/jobs/{job_id}").json()["deleted"] is True
    assert api.http.get(f"/v1/audio/jobs/{job_id}").status_code == 404
    assert not (gateway.data_dir / "jobs" / job_id).exists()


def test_two_jobs_run_at_once_and_the_third_waits(gateway, triton):
    api = Api(gateway.url)
    ids = [api.submit(json={"input": sentences(14, 10 + i), "voice": "demo", "format": "mp3", **GREEDY}).json()["id"]
           for i in range(3)]
    seen_two_and_queued = False
    max_running = 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in api.http.get("/v1/audio/jobs?limit=20").json()["data"] if j["id"] in ids}
        states = [jobs[i]["state"] for i in ids]
        running = sum(s in ("running", "encoding") for s in states)
        max_running = max(max_running, running)
        seen_two_and_queued |= running == 2 and states.count("queued") == 1
        if all(s == "succeeded" for s in states):
            break
        assert not any(s in ("failed", "cancelled") for s in states), jobs
        time.sleep(0.1)
    assert seen_two_and_queued and max_running == 2
    done = [api.job(i) for i in ids]
    assert all(j["state"] == "succeeded" for j in done)
    last = max(done, key=lambda j: j["started_at"])
    others = [j for j in done if j is not last]
    assert last["started_at"] >= min(j["finished_at"] for j in others) - 0.05  # it waited for a free worker


def test_cancel_stops_the_jobs_triton_requests(gateway, triton):
    api = Api(gateway.url)
    before = settle(triton)
    # short segments: the first part is still streaming when its first segment is reported
    job_id = api.submit(json={"input": "\n\n".join(sentences(4, 50 + i) for i in range(10)), "voice": "demo",
                              "format": "flac", "max_text_tokens_per_segment": 12, **GREEDY}).json()["id"]
    deadline = time.monotonic() + 60
    while True:
        job = api.job(job_id)
        if job["segments"]["done"] >= 1 and job["parts"]["done"] == 0:
            break
        assert time.monotonic() < deadline and job["parts"]["done"] == 0, job
        time.sleep(0.02)
    r = api.http.delete(f"/v1/audio/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    after = settle(triton, timeout_s=10)  # the server is idle again: the in-flight request was stopped
    assert after.get("tts_requests_cancelled_total", 0) >= before.get("tts_requests_cancelled_total", 0) + 1
    job = api.job(job_id)
    assert job["state"] == "cancelled" and job["parts"]["done"] < job["parts"]["total"]
    assert api.http.get(f"/v1/audio/jobs/{job_id}/result").status_code == 409
    assert not (gateway.data_dir / "jobs" / job_id / "parts").exists()
    time.sleep(1.0)
    assert settle(triton).get("tts_requests_completed_total") == after.get("tts_requests_completed_total")


def test_a_killed_gateway_resumes_the_job_without_redoing_finished_parts(triton, voice_wav, tmp_path):
    from gateway_support import start_gateway_process

    data = tmp_path / "data"
    first = start_gateway_process(triton.grpc_url, data, env=JOB_ENV)
    api = Api(first.url)
    upload_voice(api, voice_wav)
    text = "# Part one\n\n" + "\n\n".join(sentences(4, 80 + i) for i in range(5)) + "\n\n# Part two\n\n" + \
           "\n\n".join(sentences(4, 90 + i) for i in range(4))
    job_id = api.submit(json={"input": text, "voice": "demo", "format": "opus", **GREEDY}).json()["id"]
    parts_dir = data / "jobs" / job_id / "parts"
    deadline = time.monotonic() + 90
    while len(list(parts_dir.glob("*.json"))) < 3:
        assert time.monotonic() < deadline, api.job(job_id)
        time.sleep(0.05)
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(10)
    finished = {p.name: (p.stat().st_mtime_ns, json.loads(p.read_text())) for p in parts_dir.glob("*.json")}
    pcm_mtimes = {p.name: p.stat().st_mtime_ns for p in parts_dir.glob("*.pcm")}
    total = len(json.loads((data / "jobs" / job_id / "plan.json").read_text())["parts"])
    assert 3 <= len(finished) < total
    before = settle(triton)

    second = start_gateway_process(triton.grpc_url, data, env=JOB_ENV)
    try:
        job = Api(second.url).wait(job_id, timeout_s=120)
        after = settle(triton)
    finally:
        second.stop()
    assert job["state"] == "succeeded" and job["attempts"] == 2, job
    for name, (mtime, meta) in finished.items():  # finished parts untouched, made by the first attempt
        assert (parts_dir / name).stat().st_mtime_ns == mtime and meta["attempt"] == 1
        pcm = name.replace(".json", ".pcm")
        assert (parts_dir / pcm).stat().st_mtime_ns == pcm_mtimes[pcm]
    metas = [json.loads(p.read_text()) for p in sorted(parts_dir.glob("*.json"))]
    assert len(metas) == total
    assert [m["attempt"] for m in metas] == [1] * len(finished) + [2] * (total - len(finished))
    redone = after["tts_requests_completed_total"] - before["tts_requests_completed_total"]
    assert redone == total - len(finished)  # the server synthesized exactly the missing parts
    audio = sum(m["samples"] for m in metas) / metas[0]["sample_rate"]
    assert job["result"]["duration_s"] == pytest.approx(audio + 0.5, abs=2e-3)  # one chapter gap
    assert [c["title"] for c in job["chapters"]] == ["Part one", "Part two"]


def test_client_job_commands(gateway, tmp_path, capsys, monkeypatch):
    import av

    from triton_tts.cli import main

    book = tmp_path / "story.txt"
    book.write_text("# Opening\n\n" + sentences(3, 200) + "\n\n# Closing\n\n" + sentences(2, 201) + "\n")
    monkeypatch.setenv("TTS_GATEWAY_URL", gateway.url)
    monkeypatch.setenv("TTS_GATEWAY_API_KEY", KEY_A)

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["client", "job", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    out = tmp_path / "story.mp3"
    code, stdout, stderr = cli("submit", "--file", str(book), "--voice", "demo", "--format", "mp3", "--greedy",
                               "--wait", "--out", str(out))
    assert code == 0, stderr
    job_id = stdout.splitlines()[0]
    assert is_job_id(job_id) and "2 chapter(s)" in stdout
    assert "succeeded" in stderr  # the progress lines
    with av.open(str(out)) as container:
        assert [c["metadata"]["title"] for c in container.chapters()] == ["Opening", "Closing"]
        assert container.metadata["title"] == "story"
    code, stdout, _ = cli("status", job_id)
    assert code == 0 and "succeeded" in stdout and "100%" in stdout
    # an interrupted download resumes from its .part with a Range request
    again = tmp_path / "again.mp3"
    Path(str(again) + ".part").write_bytes(out.read_bytes()[:1000])
    code, _, _ = cli("download", job_id, "--out", str(again))
    assert code == 0 and again.read_bytes() == out.read_bytes()
    assert cli("wait", job_id)[0] == 0
    code, _, stderr = cli("status", "job_" + "f" * 32)
    assert code == 2 and "404" in stderr and "Fix:" in stderr
