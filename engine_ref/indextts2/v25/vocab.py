"""A small deterministic vocabulary file in the release's format, for the random-weight presets.

Format (what tiktoken's loaders and upstream read): one ``<base64 token bytes> <rank>`` per line, ranks 0..n-1.
Ranks 0-255 are the single bytes in GPT-2's byte order (printable ASCII first, so rank 0 is ``!`` and rank 1 is
``"``, as in Whisper-derived vocabularies: ids 0/1 double as start/stop text and are dropped before generation,
a quirk the presets then reproduce); the rest are byte-pair merges learned from a short corpus in the five
languages with plain BPE (most frequent adjacent pair first, ties broken by the pair's bytes), after the same
pre-tokenisation pattern the tokenizer uses. The special tokens are not in the file: the tokenizer appends them.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from pathlib import Path

__all__ = ["CORPUS", "gpt2_byte_order", "train_byte_bpe", "write_vocabulary"]

#: A few sentences per language (zh, en, ja, es, ar), lower/upper-cased the way the front end feeds them.
CORPUS = (
    "今天天气很好，我们一起去公园散步吧。你好，欢迎使用语音合成系统。这是一个测试句子，请仔细听。",
    "the quick brown fox jumps over the lazy dog. hello world, this is a test of the speech system. "
    "speech synthesis turns text into sound, one sentence at a time.",
    "こんにちは 、 今日 は いい 天気 です ね 。 音声 合成 の テスト を し て い ます 。 ありがとう ござい ます 。",
    "HOLA MUNDO, ESTO ES UNA PRUEBA DEL SISTEMA DE VOZ. EL ZORRO MARRÓN SALTA SOBRE EL PERRO PEREZOSO.",
    "مرحبا بالعالم، هذا اختبار لنظام تحويل النص إلى كلام. الطقس جميل اليوم.",
)


def gpt2_byte_order() -> list[int]:
    """The 256 byte values in GPT-2's bytes_to_unicode order: printable ones (!..~, ¡..¬, ®..ÿ) first."""
    first = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return first + [b for b in range(256) if b not in set(first)]


def _words(corpus: str) -> Counter[tuple[bytes, ...]]:
    import regex

    from engine_ref.indextts2.v25.tokenizer import PRETOKENIZE_PATTERN

    counts: Counter[tuple[bytes, ...]] = Counter()
    for piece in regex.findall(PRETOKENIZE_PATTERN, corpus):
        counts[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    return counts


def train_byte_bpe(corpus: str, merges: int) -> list[bytes]:
    """Up to `merges` merged tokens in merge order (plain byte-level BPE, deterministic)."""
    words = _words(corpus)
    out: list[bytes] = []
    for _ in range(merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        out.append(merged)
        rewritten: Counter[tuple[bytes, ...]] = Counter()
        for word, n in words.items():
            new: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    new.append(merged)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            rewritten[tuple(new)] += n
        words = rewritten
    return out


def write_vocabulary(path: str | os.PathLike, merges: int = 600, corpus: str | None = None) -> Path:
    """Write the vocabulary (256 bytes + up to `merges` merges) to `path`; returns the path."""
    tokens = [bytes([b]) for b in gpt2_byte_order()]
    seen = set(tokens)
    for tok in train_byte_bpe(" ".join(CORPUS) if corpus is None else corpus, merges):
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
    path = Path(path)
    path.write_text("".join(f"{base64.b64encode(t).decode('ascii')} {rank}\n" for rank, t in enumerate(tokens)),
                    encoding="ascii")
    return path
