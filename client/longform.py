"""Splitting texts longer than one request allows (the server's max_text_chars) into request-sized parts.

The server segments each request itself (by tokens, at sentence ends); the client only has to keep every
request under the character limit, and cuts where the server would cut anyway — paragraph breaks first, then
sentence ends, then clause punctuation, then spaces — so splitting does not change how the text is read.
"""

from __future__ import annotations

import re

from engine_ref.errors import InputError
from model_repository.contract import DEFAULT_MAX_TEXT_CHARS

__all__ = ["split_text", "DEFAULT_MAX_TEXT_CHARS"]

# Cut points after which a new part may start, strongest first. Each keeps the delimiter with the left side.
_BREAKS = (
    re.compile(r"\n\s*\n"),
    re.compile(r"(?<=[.!?。！？…])[\"'”’)\]]*\s+|(?<=[。！？])"),
    re.compile(r"(?<=[,;:，；：、])\s*"),
    re.compile(r"\s+"),
)


def _pieces(text: str, level: int, limit: int) -> list[str]:
    """Cut `text` into pieces of at most `limit` characters, using the weakest break level needed."""
    if len(text) <= limit:
        return [text]
    if level == len(_BREAKS):
        return [text[i:i + limit] for i in range(0, len(text), limit)]
    out: list[str] = []
    start = 0
    for match in _BREAKS[level].finditer(text):
        if match.end() > start:
            out.extend(_pieces(text[start:match.end()], level + 1, limit))
            start = match.end()
    if start < len(text):
        out.extend(_pieces(text[start:], level + 1, limit))
    return out


def split_text(text: str, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> list[str]:
    """Request-sized parts of `text` (each at most `max_chars` characters, each with something to say).

    Pieces are packed greedily so there are as few requests as possible; parts without a letter or digit
    (stray punctuation between paragraphs) are dropped because the server would reject them.
    """
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
        raise InputError(f"max_chars={max_chars!r} must be a positive integer",
                         f"use the server's max_text_chars (default {DEFAULT_MAX_TEXT_CHARS})")
    parts: list[str] = []
    current = ""
    for piece in _pieces(text, 0, max_chars):
        if current and len(current) + len(piece) > max_chars:
            parts.append(current)
            current = ""
        current += piece
    if current:
        parts.append(current)
    parts = [p.strip() for p in parts]
    return [p for p in parts if any(ch.isalnum() for ch in p)]
