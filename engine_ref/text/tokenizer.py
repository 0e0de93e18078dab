"""SentencePiece tokenizer for IndexTTS text (the official ``bpe.model``), and a deterministic trainer for presets.

IndexTTS feeds SentencePiece a *pre-tokenized* string: every CJK character stands alone between spaces and all
other text is upper-cased ("你好 hello" -> "你 好 HELLO"). The official vocabulary (unigram, 12000 pieces) was
trained on text in that form, so lower-case Latin letters are mostly unknown to it: skipping the pre-tokenization
step silently turns English into ``<unk>``.

Special pieces: id 0 is ``<s>``, id 1 is ``</s>`` and id 2 is ``<unk>``; there is no padding piece. The GPT uses 0
and 1 as its start/stop text tokens, which is why those ids never appear inside a segment's text.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from engine_ref.errors import InputError, ModelFilesError
from engine_ref.text.normalize import normalize

logger = logging.getLogger("engine_ref.text")

BOS_ID, EOS_ID, UNK_ID = 0, 1, 2
WORD_BOUNDARY = "\u2581"  # "▁", SentencePiece's visible space

# Characters that are spaced out one by one: Hangul Jamo, CJK radicals..Yi, Hangul syllables, compatibility
# ideographs, CJK compatibility forms, half-width forms and the supplementary ideograph planes (the ranges
# upstream's tokenize_by_CJK_char uses).
_CJK_RANGES = (
    "\u1100-\u11ff\u2e80-\ua4cf\ua840-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff65-\uffdc\U00020000-\U0002ffff"
)
_CJK_SPLIT = re.compile(f"([{_CJK_RANGES}])")
_CJK_GAP = re.compile(f"(?<=[{_CJK_RANGES}]) +(?=[{_CJK_RANGES}])")


def pretokenize(text: str) -> str:
    """Space out CJK characters and upper-case everything else, exactly as the official vocabulary expects."""
    parts = (part.strip() for part in _CJK_SPLIT.split(text.strip()))
    return " ".join(part.upper() for part in parts if part)


def join_cjk(text: str) -> str:
    """Undo `pretokenize`'s spacing between two CJK characters (for display; case is not restored)."""
    return _CJK_GAP.sub("", text)


@dataclass(frozen=True)
class Piece:
    """One SentencePiece token; for an unknown character ``piece`` is the character itself (as upstream sees it)."""

    piece: str
    id: int


class BpeTokenizer:
    """A loaded ``bpe.model``: normalized text -> pieces/ids, ids -> text."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFilesError(
                f"tokenizer model {self.path} does not exist or is not a file",
                "point to the bpe.model shipped with the IndexTTS checkpoints (or run the preset command to write one)",
            )
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(self.path.read_bytes())
        except (RuntimeError, OSError) as exc:  # sentencepiece raises RuntimeError on a bad protobuf
            raise ModelFilesError(
                f"tokenizer model {self.path} is not a valid SentencePiece model ({' '.join(str(exc).split())})",
                "re-download bpe.model from the IndexTTS checkpoints; the file is corrupt or truncated",
            ) from exc
        if processor.get_piece_size() <= UNK_ID:
            raise ModelFilesError(f"tokenizer model {self.path} has only {processor.get_piece_size()} pieces",
                                  "re-download bpe.model from the IndexTTS checkpoints")
        self._sp = processor

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        """Vocabulary id of a piece; unknown surfaces (as returned by `encode`) map to the unk id."""
        return self._sp.piece_to_id(piece)

    def encode(self, normalized_text: str) -> list[Piece]:
        """Pre-tokenize already *normalized* text and split it into pieces (unknown characters keep their surface)."""
        text = pretokenize(normalized_text)
        pieces, ids = self._sp.encode(text, out_type=str), self._sp.encode(text, out_type=int)
        return [Piece(p, i) for p, i in zip(pieces, ids, strict=True)]

    def encode_pieces(self, normalized_text: str) -> list[str]:
        """Piece strings as upstream's ``tokenize`` returns them (an unknown character appears as itself)."""
        return self._sp.encode(pretokenize(normalized_text), out_type=str)

    def decode(self, ids: Iterable[int], lower_case: bool = False) -> str:
        """Ids back to text, with the CJK spacing removed; ``lower_case`` for friendlier display of Latin text."""
        text = join_cjk(self._sp.decode([int(i) for i in ids]))
        return text.lower() if lower_case else text


# ---------------------------------------------------------------------------------------------------------------
def default_corpus() -> str:
    """The original bilingual training text embedded in the package (engine_ref/data/corpus.txt)."""
    return resources.files("engine_ref").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def _training_lines(corpus: str) -> list[str]:
    lines = []
    for raw in corpus.splitlines():
        line = pretokenize(normalize(raw)) if raw.strip() else ""
        if line:
            lines.append(line)
    return lines


def _keep_frequent_chars(lines: Sequence[str], max_chars: int) -> list[str]:
    """Drop words holding characters outside the ``max_chars`` most frequent ones.

    SentencePiece insists that every kept character gets a piece of its own; with a tiny vocabulary (a few hundred
    pieces) and a corpus with many distinct ideographs that is impossible, so rare characters are left out and
    become ``<unk>``. Ties are broken by code point so the result is deterministic.
    """
    counts = Counter(ch for line in lines for ch in line if not ch.isspace())
    if len(counts) <= max_chars:
        return list(lines)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    allowed = {ch for ch, _ in ranked[:max_chars]}
    kept = []
    for line in lines:
        words = [w for w in line.split(" ") if w and all(ch in allowed for ch in w)]
        if words:
            kept.append(" ".join(words))
    return kept


def train_bpe(corpus: str, out_path: str | os.PathLike[str], vocab_size: int, seed: int = 0) -> Path:
    """Train a unigram SentencePiece model in the official layout and write it to ``out_path``.

    ``corpus`` is raw text (one sentence or paragraph per line, e.g. `default_corpus()`); it is normalized and
    pre-tokenized exactly as inference text is. The vocabulary limit is soft: a corpus too small for
    ``vocab_size`` yields fewer pieces (read the achieved size with ``BpeTokenizer(out_path).vocab_size``; it is
    also logged). Training is single-threaded with a fixed seed and no sampling, so the same corpus, size and seed
    give byte-identical files. Special ids match the official model: <s>=0, </s>=1, <unk>=2.
    """
    if not isinstance(vocab_size, int) or vocab_size < 16:
        raise InputError(f"vocab_size {vocab_size!r} is too small", "use a vocabulary of at least 16 pieces")
    lines = _training_lines(corpus)
    if not lines:
        raise InputError("the tokenizer corpus has no usable text", "pass a corpus with some words in it")
    # Leave a quarter of the vocabulary for multi-character pieces.
    lines = _keep_frequent_chars(lines, max(vocab_size * 3 // 4 - 3, 8))
    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)  # library-wide setting; re-applied before every training for determinism
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=writer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(writer.getvalue())
    tmp.replace(out)  # atomic: a reader never sees a half-written model
    achieved = spm.SentencePieceProcessor(model_proto=writer.getvalue()).get_piece_size()
    logger.info("trained tokenizer %s: %d pieces (requested %d)", out, achieved, vocab_size)
    return out
