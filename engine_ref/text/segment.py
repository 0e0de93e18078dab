"""Splitting token pieces into segments the GPT can speak in one go, and bucketing segments for batched decoding.

The GPT was trained on utterances of limited length, and its cost grows with the text, so long inputs are cut
into segments of at most ``max_tokens`` pieces, preferably at sentence ends, else at commas, else at hyphens, and
only as a last resort at arbitrary positions. Short neighbours are merged back so that the model does not speak
a long text as a string of two-word fragments. These are IndexTTS 1.5's rules (TextTokenizer.split_sentences and
IndexTTS.bucket_sentences of the v1.5 inference), re-implemented here.
"""

from __future__ import annotations

import logging
from typing import Sequence

logger = logging.getLogger("engine_ref.text")

SENTENCE_END_PIECES = (".", "!", "?", "\u2581.", "\u2581?", "\u2581...")
COMMA_PIECES = (",", "\u2581,")
HYPHEN_PIECES = ("-",)
QUOTE_PIECES = ("'", "\u2581'")


def split_segments(
    pieces: Sequence[str],
    max_tokens: int,
    *,
    duplicate_closing_quote: bool = False,
) -> list[list[str]]:
    """Cut ``pieces`` into segments of at most ``max_tokens`` pieces (upstream v1.5 rules).

    Pieces are scanned left to right. A sentence-end piece closes the current segment once that segment has
    more than two pieces (so a stray ``▁ .`` cannot become a segment of its own); a quote right after
    the end piece belongs to the closing sentence. When the current segment reaches ``max_tokens + 1`` pieces
    without an end, it is re-split with commas as the end pieces, failing that with hyphens, failing that cut
    into chunks of ``max_tokens`` (logged as a warning). Finally, neighbours are merged greedily while the merged
    length stays within ``max_tokens``.

    Upstream appends the closing quote to the sentence *and* keeps it as the first piece of the next one (a
    loop-index slip); ``duplicate_closing_quote=True`` reproduces that for exact parity, at the price of a segment
    that may exceed the limit by one. The default moves the quote instead, and only when it fits.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return _merge(_split(list(pieces), SENTENCE_END_PIECES, max_tokens, duplicate_closing_quote), max_tokens)


def _split(pieces: list[str], ends: Sequence[str], max_tokens: int, duplicate_quote: bool) -> list[list[str]]:
    segments: list[list[str]] = []
    current: list[str] = []
    skip_next = False
    for i, piece in enumerate(pieces):
        if skip_next:
            skip_next = False
            continue
        current.append(piece)
        if len(current) <= max_tokens:
            if piece in ends and len(current) > 2:
                if i + 1 < len(pieces) and pieces[i + 1] in QUOTE_PIECES:
                    if duplicate_quote:
                        current.append(pieces[i + 1])
                    elif len(current) < max_tokens:
                        current.append(pieces[i + 1])
                        skip_next = True
                segments.append(current)
                current = []
            continue
        # The running segment just exceeded the limit: fall back to weaker split points, then to hard chunks.
        # Only ever to *weaker* ones: upstream also goes back from hyphens to commas, which recurses forever
        # (RecursionError) when the only comma sits in the first two pieces of the overflowing run.
        if ends is SENTENCE_END_PIECES and _shares(current, COMMA_PIECES):
            segments.extend(_merge(_split(current, COMMA_PIECES, max_tokens, duplicate_quote), max_tokens))
        elif ends is not HYPHEN_PIECES and _shares(current, HYPHEN_PIECES):
            segments.extend(_merge(_split(current, HYPHEN_PIECES, max_tokens, duplicate_quote), max_tokens))
        else:
            logger.warning(
                "text segment of %d+ tokens has no sentence end, comma or hyphen to split at; cut into chunks of "
                "%d tokens (speech may break mid-word): %s", len(current), max_tokens, "".join(current)[:200],
            )
            segments.extend(current[j:j + max_tokens] for j in range(0, len(current), max_tokens))
        current = []
    if current:
        segments.append(current)
    return segments


def _shares(pieces: Sequence[str], wanted: Sequence[str]) -> bool:
    return any(p in wanted for p in pieces)


def _merge(segments: list[list[str]], max_tokens: int) -> list[list[str]]:
    merged: list[list[str]] = []
    for segment in segments:
        if not segment:
            continue
        if merged and len(merged[-1]) + len(segment) <= max_tokens:
            merged[-1] = merged[-1] + segment
        else:
            merged.append(list(segment))
    return merged


def bucket_by_length(lengths: Sequence[int], max_bucket_size: int = 4, factor: float = 1.5) -> list[list[int]]:
    """Group segment positions into batches of similar length (IndexTTS 1.5 ``infer_fast`` rules).

    Returns lists of positions into ``lengths``; every position appears exactly once, so the caller restores the
    original order by position. With at most ``max_bucket_size`` segments there is one bucket in input order.
    Otherwise positions are visited shortest first (stable); a new bucket starts when the current one is full or
    the length reaches ``factor`` times the current bucket's median (upper median). Buckets of one are then
    folded: one each into the earlier multi-segment buckets that have room, the rest grouped together.
    On CPU upstream passes ``max_bucket_size=1`` (no batching).
    """
    if max_bucket_size < 1:
        raise ValueError(f"max_bucket_size must be >= 1, got {max_bucket_size}")
    positions = list(range(len(lengths)))
    if len(positions) <= max_bucket_size:
        return [positions] if positions else []
    buckets: list[list[int]] = []
    median = 0
    for pos in sorted(positions, key=lambda p: lengths[p]):
        length = lengths[pos]
        if not buckets or length >= int(median * factor) or len(buckets[-1]) >= max_bucket_size:
            buckets.append([pos])
            median = length
        else:
            buckets[-1].append(pos)
            median = lengths[buckets[-1][len(buckets[-1]) // 2]]
    multi = [b for b in buckets if len(b) > 1]
    singles = [b[0] for b in buckets if len(b) == 1]
    for bucket in multi:
        if not singles:
            break
        if len(bucket) < max_bucket_size:
            bucket.append(singles.pop(0))
    multi.extend(singles[i:i + max_bucket_size] for i in range(0, len(singles), max_bucket_size))
    return multi
