"""IndexTTS-2.5's text front end: request text + language -> segments of token ids (infer_v2_5 at HEAD).

In upstream's order:
1. the punctuation map (TextNormalizer's char_rep_map, `engine_ref.text.normalize.rewrite_punctuation`) for every
   language;
2. normalisation: zh / zhen / en through the TextNormalizer (here engine_ref's re-implementation, which detects
   Chinese vs English itself as upstream's does, whatever the language argument); ja / es through
   nemo_text_processing, which is not installed here: passthrough, exactly what upstream does when it is absent;
   ar: none;
3. case: lower for zh, zhen, en, ja; upper for es; ar unchanged;
4. pronunciation annotations ``<word|PRON>``: PRON upper-cased; kana is inlined as `` PRON ``, anything else is
   wrapped in ``<|SPECIAL_TOKEN_2|>`` (the word has a CJK ideograph: pinyin) or ``<|SPECIAL_TOKEN_1|>`` (CMU);
5. ja: MeCab word splitting (`JapaneseWordSplitter`);
6. ``<|name|>`` spans upper-cased (the special tokens' spelling, after step 3 lowered them);
7. the token-budget segmenter: budget = min(max_tokens, text positions - 2) - tokens of the prefix (at least 1);
   a text within budget is one segment; else it is cut into atomic ``<|SPECIAL_TOKEN_n|>...<|SPECIAL_TOKEN_n|>``
   spans and, elsewhere, after each of ``，。！？、；：,.!?;:`` and newline (pieces still over budget are cut
   character by character), and the pieces are merged greedily while the merge stays within budget;
8. each segment's ids = encode(``<|lang|> `` + segment) + [stop_text] (upstream's text_tokens; generation then
   drops ids equal to start/stop text, as for 2.0, and wraps the rest in start/stop).

Deviations, documented: annotations are protected from step 2 (they are replaced by placeholders while the
normaliser runs; whether upstream's normaliser keeps them intact is unverified, ours would otherwise spell out
their digits); a text with nothing left after steps 1-6 is an InputError (upstream would synthesise the bare
language tag).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Sequence

from engine_ref.errors import InputError
from engine_ref.indextts2.v25.japanese import JapaneseWordSplitter
from engine_ref.indextts2.v25.languages import check_language, language_id, language_prefix
from engine_ref.indextts2.v25.tokenizer import TiktokenTokenizer
from engine_ref.text import DEFAULT_MAX_TEXT_CHARS, TextFrontend
from engine_ref.text.normalize import detect_language, normalize, rewrite_punctuation

log = logging.getLogger("engine_ref.indextts2.v25.frontend")

__all__ = ["SegmentV25", "TextFrontendV25", "apply_pronunciation_annotations", "is_kana", "split_by_token_budget"]

ANNOTATION = re.compile(r"<([^|>\n]+)\|([^>\n]+)>")
_HIRAGANA = re.compile(r"^[\u3040-\u309F]+$")
_KATAKANA = re.compile(r"^[\u30A0-\u30FF]+$")
_HAN = re.compile(r"[\u4e00-\u9fff]")
_SPECIAL_SPAN = re.compile(r"<\|([^|]+)\|>")
_ATOMIC = re.compile(r"<\|SPECIAL_TOKEN_\d+\|>.*?<\|SPECIAL_TOKEN_\d+\|>")
_BREAK_AFTER = re.compile(r"(?<=[，。！？、；：,\.!\?;:\n])")
_NORMALISED = ("zh", "zhen", "en")
_LOWER = ("zh", "zhen", "en", "ja")
_PLACEHOLDER_BASE = 0xF0000  # supplementary private use: untouched by the normaliser's rules


def is_kana(text: str) -> bool:
    """All hiragana or all katakana (upstream's test for inlining a pronunciation)."""
    return bool(_HIRAGANA.fullmatch(text) or _KATAKANA.fullmatch(text))


def apply_pronunciation_annotations(text: str) -> str:
    """``<word|PRON>`` -> the pronunciation in the form the vocabulary was trained on (module docstring, step 4)."""

    def replace(m: re.Match[str]) -> str:
        pron = m.group(2).upper()
        if is_kana(pron):
            return f" {pron} "
        token = "SPECIAL_TOKEN_2" if _HAN.search(m.group(1)) else "SPECIAL_TOKEN_1"
        return f"<|{token}|>{pron}<|{token}|>"

    return ANNOTATION.sub(replace, text)


def split_by_token_budget(text: str, budget: int, count) -> list[str]:
    """Upstream's split_text_by_tokens for a given budget; `count(text)` is the token count of a piece."""
    if count(text) <= budget:
        return [text]
    chunks: list[str] = []
    pos = 0
    pieces: list[tuple[str, bool]] = []
    for m in _ATOMIC.finditer(text):
        if m.start() > pos:
            pieces.append((text[pos:m.start()], False))
        pieces.append((m.group(0), True))
        pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], False))
    for piece, atomic in pieces:
        if atomic:
            chunks.append(piece)
            continue
        for part in _BREAK_AFTER.split(piece):
            if not part:
                continue
            if count(part) <= budget:
                chunks.append(part)
                continue
            current = ""
            for ch in part:
                if current and count(current + ch) > budget:
                    chunks.append(current)
                    current = ch
                else:
                    current += ch
            if current:
                chunks.append(current)
    segments: list[str] = []
    current = ""
    for chunk in chunks:
        if current and count(current + chunk) > budget:
            segments.append(current)
            current = chunk
        else:
            current += chunk
    if current:
        segments.append(current)
    return segments or [text]


@dataclass(frozen=True)
class SegmentV25:
    """One unit of generation. token_ids are upstream's text_tokens: encode(prefix + text) + [stop_text]."""

    index: int
    text: str  # the segment after the front end's rewriting (what follows the language prefix)
    token_ids: tuple[int, ...]
    lang: str
    lang_id: int

    def __len__(self) -> int:
        return len(self.token_ids)


class TextFrontendV25:
    """The 2.5 front end for one vocabulary file; stateless apart from the lazily created Japanese tagger.

    text_positions: rows of the GPT's text position table (max_text_tokens + 2 = 602), which caps the budget.
    """

    def __init__(self, vocab_path: str | os.PathLike, *, number_text_tokens: int | None = None,
                 text_positions: int = 602, start_text_token: int = 0, stop_text_token: int = 1,
                 max_text_chars: int = DEFAULT_MAX_TEXT_CHARS):
        self.tokenizer = TiktokenTokenizer(vocab_path, number_text_tokens)
        self.text_positions = text_positions
        self.start_text_token, self.stop_text_token = start_text_token, stop_text_token
        self.max_text_chars = max_text_chars
        self.japanese = JapaneseWordSplitter()

    def _check_text(self, text: object) -> str:
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}", "send the text as a UTF-8 string")
        if not text.strip():
            raise InputError("the text is empty", "send at least one word to speak")
        if len(text) > self.max_text_chars:
            raise InputError(f"the text has {len(text)} characters, more than the limit of {self.max_text_chars}",
                             "split the text into several requests (or raise max_text_chars)")
        return text

    @staticmethod
    def _normalise_protected(text: str) -> str:
        """engine_ref's TextNormalizer with annotations held out (module docstring: deviations)."""
        kept: list[str] = []

        def hold(m: re.Match[str]) -> str:
            kept.append(m.group(0))
            return chr(_PLACEHOLDER_BASE + len(kept) - 1)

        held = ANNOTATION.sub(hold, text)
        out = normalize(held, detect_language(text))
        for i, original in enumerate(kept):
            out = out.replace(chr(_PLACEHOLDER_BASE + i), original)
        return out

    def rewrite(self, text: str, lang: str) -> str:
        """Steps 1-6 of the module docstring: the text the segmenter sees."""
        lang = check_language(lang)
        text = rewrite_punctuation(self._check_text(text), "en")
        if lang in _NORMALISED:
            text = self._normalise_protected(text)
        # ja / es: nemo_text_processing is absent -> passthrough (upstream's own fallback); ar: no normaliser
        if lang in _LOWER:
            text = text.lower()
        elif lang == "es":
            text = text.upper()
        text = apply_pronunciation_annotations(text)
        if lang == "ja":
            text = self.japanese.split(text)
        return _SPECIAL_SPAN.sub(lambda m: f"<|{m.group(1).upper()}|>", text)

    def budget(self, lang: str, max_tokens: int) -> int:
        return max(1, min(max_tokens, self.text_positions - 2) - self.tokenizer.count(language_prefix(lang)))

    def prepare(self, text: str, lang: str, max_text_tokens_per_segment: int = 120) -> list[SegmentV25]:
        """Request text -> segments (module docstring); InputError for unusable text or an unknown language."""
        if (not isinstance(max_text_tokens_per_segment, int) or isinstance(max_text_tokens_per_segment, bool)
                or max_text_tokens_per_segment < 1):
            raise InputError(f"max_text_tokens_per_segment must be a positive integer, got "
                             f"{max_text_tokens_per_segment!r}", "use a value such as 120 (the default)")
        lang = check_language(lang)
        rewritten = self.rewrite(text, lang)
        if not rewritten.strip():
            raise InputError("the text has nothing speakable after normalisation", "send words to speak")
        prefix = language_prefix(lang)
        pieces = split_by_token_budget(rewritten, self.budget(lang, max_text_tokens_per_segment),
                                       self.tokenizer.count)
        lid = language_id(lang)
        out = []
        for index, piece in enumerate(pieces):
            ids = (*self.tokenizer.encode(prefix + piece), self.stop_text_token)
            out.append(SegmentV25(index, piece, tuple(ids), lang, lid))
        return out

    @staticmethod
    def bucket(segments: Sequence[SegmentV25], max_bucket_size: int = 4) -> list[list[SegmentV25]]:
        """Batches of similar-length segments (the 1.x/2.0 rule); restore the order with `SegmentV25.index`."""
        return TextFrontend.bucket(segments, max_bucket_size)  # type: ignore[arg-type]
