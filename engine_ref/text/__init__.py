"""The text frontend: raw request text -> normalized text -> SentencePiece pieces -> length-bounded segments.

Everything that turns text into GPT input lives here so that engine_ref, the exporters and the Triton models share
one implementation (see docs/architecture.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

from engine_ref.errors import InputError, ModelFilesError
from engine_ref.text.normalize import detect_language, normalize
from engine_ref.text.segment import bucket_by_length, split_segments
from engine_ref.text.tokenizer import WORD_BOUNDARY, BpeTokenizer, default_corpus, pretokenize, train_bpe

__all__ = [
    "BpeTokenizer",
    "Segment",
    "TextFrontend",
    "bucket_by_length",
    "default_corpus",
    "detect_language",
    "normalize",
    "pretokenize",
    "split_segments",
    "train_bpe",
]

logger = logging.getLogger("engine_ref.text")

DEFAULT_MAX_TEXT_CHARS = 20_000  # one request; long-form jobs are split by the client before they reach us


@dataclass(frozen=True)
class Segment:
    """One unit of generation: ``index`` is its position in the text, ``token_ids`` go to the GPT as they are."""

    index: int
    pieces: tuple[str, ...]
    token_ids: tuple[int, ...]

    @property
    def text(self) -> str:
        """Human-readable text of the segment (upper-cased, CJK spaced: what the model reads)."""
        return "".join(self.pieces).replace(WORD_BOUNDARY, " ").strip()

    def __len__(self) -> int:
        return len(self.token_ids)


class TextFrontend:
    """Normalization, tokenization and segmentation of request text for one ``bpe.model``.

    ``start_text_token``/``stop_text_token`` (gpt config, 0 and 1 in every official model) are removed from the
    segment ids, as upstream does before generation: the GPT adds them around each segment itself. Pass
    ``number_text_tokens`` (gpt config) to reject a ``bpe.model`` whose ids would overflow the text embedding.
    Stateless after construction, so one instance may serve concurrent requests.
    """

    def __init__(
        self,
        bpe_path: str | os.PathLike[str],
        *,
        start_text_token: int = 0,
        stop_text_token: int = 1,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        number_text_tokens: int | None = None,
    ):
        self.tokenizer = BpeTokenizer(bpe_path)
        if number_text_tokens is not None and self.tokenizer.vocab_size > number_text_tokens:
            raise ModelFilesError(
                f"tokenizer model {self.tokenizer.path} has {self.tokenizer.vocab_size} pieces but the GPT only "
                f"embeds {number_text_tokens} text tokens (gpt.number_text_tokens)",
                "use the bpe.model that belongs to the same checkpoint as gpt.pth and config.yaml",
            )
        self.start_text_token = start_text_token
        self.stop_text_token = stop_text_token
        self.max_text_chars = max_text_chars

    def normalize(self, text: str) -> str:
        """The normalized text (before pre-tokenization); see `engine_ref.text.normalize.normalize`."""
        return normalize(self._check_text(text))

    def prepare(self, text: str, max_text_tokens_per_segment: int = 120) -> list[Segment]:
        """Turn request text into segments of at most ``max_text_tokens_per_segment`` tokens each.

        Raises `InputError` for text that is not a string, is empty or too long, or has nothing speakable (only
        punctuation, emoji, or characters the vocabulary does not know). 120 is upstream ``infer``'s default;
        ``infer_fast`` used 100.
        """
        if (not isinstance(max_text_tokens_per_segment, int) or isinstance(max_text_tokens_per_segment, bool)
                or max_text_tokens_per_segment < 1):
            raise InputError(f"max_text_tokens_per_segment must be a positive integer, got "
                             f"{max_text_tokens_per_segment!r}", "use a value such as 120 (the default)")
        normalized = self.normalize(text)
        pieces = self.tokenizer.encode(normalized)
        unk = self.tokenizer.unk_id
        speakable = [p for p in pieces if p.id != unk and any(ch.isalnum() for ch in p.piece)]
        if not speakable:
            raise InputError("the text has nothing speakable (only punctuation, symbols, emoji or characters the "
                             "voice model does not know)", "send words in Chinese or English")
        unknown = sorted({p.piece for p in pieces if p.id == unk})
        if unknown:
            logger.warning("%d characters are unknown to the tokenizer and will be read as <unk>: %s",
                           len(unknown), " ".join(unknown[:20]))
        specials = (self.start_text_token, self.stop_text_token)
        kept = [p for p in pieces if p.id not in specials]
        if len(kept) != len(pieces):
            logger.warning("dropped %d start/stop text tokens from the text", len(pieces) - len(kept))
        segments = []
        for index, seg_pieces in enumerate(split_segments([p.piece for p in kept],
                                                          max_text_tokens_per_segment)):
            ids = tuple(self.tokenizer.piece_to_id(p) for p in seg_pieces)
            segments.append(Segment(index=index, pieces=tuple(seg_pieces), token_ids=ids))
        return segments

    @staticmethod
    def bucket(segments: Sequence[Segment], max_bucket_size: int = 4) -> list[list[Segment]]:
        """Batches of similar-length segments (upstream ``infer_fast`` rules; pass 1 on CPU, as upstream does).

        Every segment appears exactly once; restore the text order with ``Segment.index``.
        """
        if not isinstance(max_bucket_size, int) or max_bucket_size < 1:
            raise InputError(f"max_bucket_size must be a positive integer, got {max_bucket_size!r}",
                             "use 4 (upstream's default) on GPU or 1 on CPU")
        groups = bucket_by_length([len(s) for s in segments], max_bucket_size)
        return [[segments[i] for i in group] for group in groups]

    def _check_text(self, text: str) -> str:
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}", "send the text as a UTF-8 string")
        if not text.strip():
            raise InputError("the text is empty", "send at least one word to speak")
        if len(text) > self.max_text_chars:
            raise InputError(f"the text has {len(text)} characters, more than the limit of {self.max_text_chars}",
                             "split the text into several requests (or raise max_text_chars)")
        return text
