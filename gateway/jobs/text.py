"""Plain-text books: decoding an upload, finding its chapters, and cutting chapters into request-sized parts.

A chapter starts at a heading line: a Markdown heading ("# Title", "## Title") or a short line of its own that
begins with a chapter word ("Chapter 1", "CHAPTER IV. The Storm", "Part Two", "Prologue", "Epilogue", ...).
The heading stays in the chapter's text, so it is read aloud as audiobooks do (EPUB chapters start with their
<h1> for the same reason). A text without headings is one chapter; text before the first heading becomes a
chapter of its own when it has anything to say.

Parts are what one Triton request synthesizes: each chapter is cut at paragraph, then sentence, then clause
ends (client/longform.py, the same rules the command-line client uses) so no part exceeds the limit and no
cut falls where the server would not cut anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from client.longform import split_text
from engine_ref.errors import InputError

__all__ = ["Chapter", "Part", "decode_text_upload", "normalize_text", "chapters_from_text", "plan_parts",
           "has_speech"]


@dataclass(frozen=True)
class Chapter:
    title: str
    text: str


@dataclass(frozen=True)
class Part:
    """One request's worth of text: `index` in the whole job, `chapter` the chapter it belongs to."""

    index: int
    chapter: int
    text: str


_MARKDOWN_HEADING = re.compile(r"^#{1,6}[ \t]+(?P<title>\S.*?)[ \t#]*$")
_NUMBERED_WORDS = ("chapter", "part", "book", "kapitel", "chapitre", "capítulo", "capitulo", "capitolo", "глава")
_STANDALONE_WORDS = ("prologue", "epilogue", "interlude", "preface", "foreword", "introduction", "afterword",
                     "appendix")
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                 "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
                 "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "first", "second",
                 "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "last", "final")
_NUMBER = rf"(?:\d+|[ivxlcdm]+|(?:{'|'.join(_NUMBER_WORDS)})(?:[- ](?:{'|'.join(_NUMBER_WORDS)}))*)"
_CHAPTER_LINE = re.compile(
    rf"^(?:(?:{'|'.join(_NUMBERED_WORDS)})\s+{_NUMBER}\b.*|(?:{'|'.join(_STANDALONE_WORDS)})\b.*"
    r"|第[0-9一二三四五六七八九十百千零〇]+[章节回].*)$",
    re.IGNORECASE)
#: Heading lines are short; a long line starting with "Part of the ..." is prose.
_MAX_HEADING_CHARS = 80


def decode_text_upload(data: bytes) -> str:
    """An uploaded .txt as str: UTF-8 (a BOM is dropped) or UTF-16 with its BOM; anything else -> InputError."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise InputError(f"the text file is not valid UTF-16 ({exc.reason} at byte {exc.start})",
                             "save the file as UTF-8") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"the text file is not UTF-8 (invalid byte at offset {exc.start})",
                         "save the file as UTF-8 (most editors offer it under 'Save as' / 'Encoding')") from None


def normalize_text(text: str) -> str:
    """Unix newlines, no control characters, spaces collapsed within lines; paragraph breaks kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", " ", text)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    lines = [line.strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def has_speech(text: str) -> bool:
    """Whether there is anything to read (the server rejects texts without a letter or digit)."""
    return any(ch.isalnum() for ch in text)


def _heading(line: str, prev_blank: bool, next_blank: bool) -> str | None:
    """The title if `line` is a heading line, else None."""
    m = _MARKDOWN_HEADING.match(line)
    if m:
        return m.group("title").strip()
    if len(line) <= _MAX_HEADING_CHARS and prev_blank and next_blank and _CHAPTER_LINE.match(line):
        return line.strip()
    return None


def chapters_from_text(text: str, default_title: str = "Text") -> list[Chapter]:
    """Chapters of a plain text, split at heading lines (see the module docstring); at least one."""
    text = normalize_text(text)
    lines = text.split("\n")
    starts: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        prev_blank = i == 0 or not lines[i - 1]
        next_blank = i == len(lines) - 1 or not lines[i + 1]
        title = _heading(line, prev_blank, next_blank) if line else None
        if title is not None:
            starts.append((i, title))
    chapters: list[Chapter] = []
    first_line = starts[0][0] if starts else len(lines)
    opening = "\n".join(lines[:first_line]).strip()
    if has_speech(opening):
        chapters.append(Chapter(default_title, opening))
    for n, (line_no, title) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        body = "\n".join(lines[line_no + 1:end]).strip()
        spoken_title = title if re.search(r"[.!?。！？:;]$", title) else title + "."
        chapters.append(Chapter(title, f"{spoken_title}\n\n{body}".strip() if body else spoken_title))
    if not chapters:
        raise InputError("the text has nothing to read (no letters or digits)", "upload a text with words in it")
    return chapters


def plan_parts(chapters: list[Chapter], max_chars: int) -> list[Part]:
    """Every chapter cut into parts of at most `max_chars` characters, numbered through the whole job.

    A chapter whose text has nothing to read contributes no part (it still gets a chapter marker of zero length
    only if the caller keeps it; jobs drop such chapters before planning).
    """
    parts: list[Part] = []
    for ci, chapter in enumerate(chapters):
        for piece in split_text(chapter.text, max_chars):
            # Hard-wrapped lines (70-column e-texts) are one paragraph: a lone newline reads as a space.
            parts.append(Part(len(parts), ci, re.sub(r"(?<!\n)\n(?!\n)", " ", piece)))
    if not parts:
        raise InputError("the text has nothing to read (no letters or digits)", "upload a text with words in it")
    return parts
