"""Japanese word splitting for IndexTTS-2.5: MeCab (fugashi + unidic-lite) surfaces joined by spaces.

Upstream (utils/ja_g2p.py, used with g2p_ratio 0) splits the text on runs of spaces, keeps those runs as they are,
and replaces every other non-blank part by its fugashi token surfaces joined with single spaces. With ratio 0 no
kanji is replaced by its reading (upstream still draws one Python random number per part holding kanji; that
draw changes nothing and is not reproduced). The tagger is created on the first Japanese text, so the other
languages never need the packages; without them Japanese is a one-line InputError naming the install command.
"""

from __future__ import annotations

import re
import threading

from engine_ref.errors import InputError

__all__ = ["JapaneseWordSplitter"]

_SPACES = re.compile(r"( +)")


class JapaneseWordSplitter:
    """split(text) -> the text with a space between MeCab tokens (spaces already in the text kept)."""

    def __init__(self) -> None:
        self._tagger = None
        self._lock = threading.Lock()  # one MeCab tagger per instance, used by one thread at a time

    def _get_tagger(self):
        if self._tagger is None:
            try:
                import fugashi
                import unidic_lite  # noqa: F401  (the dictionary fugashi finds by itself)
            except ImportError:
                raise InputError("Japanese text needs the 'fugashi' and 'unidic-lite' packages, which are not installed",
                                 "pip install fugashi unidic-lite, or synthesize another language") from None
            self._tagger = fugashi.Tagger()
        return self._tagger

    def _words(self, part: str) -> str:
        return " ".join(word.surface for word in self._get_tagger()(part))

    def split(self, text: str) -> str:
        with self._lock:
            return "".join(self._words(p) if p.strip() else p for p in _SPACES.split(text))
