"""IndexTTS-2.5's tokenizer: a Whisper-style byte-level BPE (tiktoken) over the release's vocabulary file.

The vocabulary file (``multilingual_zh_ja_yue_char_del.tiktoken``) has one ``<base64 bytes> <rank>`` per line.
Upstream builds a `tiktoken.Encoding` from it with GPT-2's pre-tokenisation pattern and appends special tokens
after the ranks, in this order (ids ``len(ranks)``, ``len(ranks) + 1``, ...):
``<|endoftext|>``, ``<|startoftranscript|>``, the 99 language tags, 11 audio events, 4 emotions, 6 task tokens,
``<|SPECIAL_TOKEN_1|>`` .. ``_30``, 20 TTS tags and 1501 timestamps ``<|0.00|>`` .. ``<|30.00|>`` (1673 in all).
Text is encoded with every special token allowed. We drive tiktoken itself (the original's library), so the ids
are the original's by construction once the table above is right; tests rebuild the Encoding independently.

Upstream numbers the specials from ``len(ranks)``, which is only collision-free when the ranks are exactly
0..n-1: a file with gaps or duplicates is refused here (ModelFilesError) instead of producing wrong ids.
Blank lines are skipped (upstream would fail on them).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from engine_ref.errors import ModelFilesError
from engine_ref.indextts2.v25.languages import TAGGED_LANGUAGES

__all__ = ["VOCAB_FILE", "PRETOKENIZE_PATTERN", "SPECIAL_TOKENS", "read_ranks", "special_tokens",
           "TiktokenTokenizer"]

VOCAB_FILE = "multilingual_zh_ja_yue_char_del.tiktoken"  # hard-coded upstream (not a config.yaml key)
#: GPT-2's pattern, as upstream passes it (Whisper's tokenizer too).
PRETOKENIZE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_AUDIO_EVENTS = ("ASR", "AED", "SER", "Speech", "/Speech", "BGM", "/BGM", "Laughter", "/Laughter", "Applause",
                 "/Applause")
_EMOTIONS = ("HAPPY", "SAD", "ANGRY", "NEUTRAL")
_TASKS = ("translate", "transcribe", "startoflm", "startofprev", "nospeech", "notimestamps")
_TTS_TAGS = ("TTS/B", "TTS/O", "TTS/Q", "TTS/A", "TTS/CO", "TTS/CL", "TTS/H", *(f"TTS/SP{i:02d}" for i in range(1, 14)))
_TIMESTAMPS = 1501  # 0.00 .. 30.00 s in 0.02 s steps


def _special_names() -> tuple[str, ...]:
    names = ["endoftext", "startoftranscript", *TAGGED_LANGUAGES, *_AUDIO_EVENTS, *_EMOTIONS, *_TASKS,
             *(f"SPECIAL_TOKEN_{i}" for i in range(1, 31)), *_TTS_TAGS,
             *(f"{i * 0.02:.2f}" for i in range(_TIMESTAMPS))]
    return tuple(f"<|{n}|>" for n in names)


#: Special tokens in id order (their ids follow the ranks).
SPECIAL_TOKENS: tuple[str, ...] = _special_names()


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """The vocabulary file -> {token bytes: rank}; ModelFilesError naming the line for a malformed file."""
    path = Path(path)
    fix = f"use the {VOCAB_FILE} released with this gpt.pth (one '<base64 token> <rank>' per line)"
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise ModelFilesError(f"tokenizer vocabulary {path} does not exist", fix) from None
    except OSError as exc:
        raise ModelFilesError(f"cannot read tokenizer vocabulary {path}: {exc.strerror}", fix) from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise ModelFilesError(f"{path.name} line {number} is not '<base64 token> <rank>'", fix) from None
        if token in ranks:
            raise ModelFilesError(f"{path.name} line {number} repeats a token (rank {ranks[token]})", fix)
        ranks[token] = rank
    if not ranks:
        raise ModelFilesError(f"{path.name} holds no tokens", fix)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ModelFilesError(f"{path.name}: ranks are not exactly 0..{len(ranks) - 1} (upstream numbers the special "
                              "tokens from the rank count, so they would collide)", fix)
    return ranks


def special_tokens(first_id: int) -> dict[str, int]:
    """Special token -> id, numbered from `first_id` (= the number of ranks)."""
    return {name: first_id + i for i, name in enumerate(SPECIAL_TOKENS)}


class TiktokenTokenizer:
    """encode/decode with the release's vocabulary; `n_vocab` = ranks + specials (60509 for the release).

    number_text_tokens: gpt.number_text_tokens; a vocabulary with more ids than the text embedding holds is a
    ModelFilesError (it belongs to another checkpoint).
    """

    def __init__(self, path: str | os.PathLike, number_text_tokens: int | None = None):
        import tiktoken

        self.path = Path(path)
        ranks = read_ranks(self.path)
        self.specials = special_tokens(len(ranks))
        self.n_vocab = len(ranks) + len(self.specials)
        if number_text_tokens is not None and self.n_vocab > number_text_tokens:
            raise ModelFilesError(
                f"tokenizer vocabulary {self.path.name} has {self.n_vocab} ids ({len(ranks)} ranks + "
                f"{len(self.specials)} special tokens) but the GPT embeds {number_text_tokens} "
                "(gpt.number_text_tokens)",
                "use the vocabulary file released with this gpt.pth and config.yaml")
        self.encoding = tiktoken.Encoding(name=self.path.name, pat_str=PRETOKENIZE_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.specials, explicit_n_vocab=self.n_vocab)
        self.num_ranks = len(ranks)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens allowed anywhere (upstream: allowed_special='all')."""
        return self.encoding.encode(text, allowed_special="all")

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def token_id(self, special: str) -> int:
        return self.specials[special]
