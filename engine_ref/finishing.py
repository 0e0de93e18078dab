"""Finishing a segment, the same way in every family and on every path (engine_ref, the ORT runtimes, serving):
the warnings a user needs about a segment, and the silence upstream puts between segments.

One home on purpose: engine_ref, export's runtimes and the Triton orchestrator report the same cases with the same
words, so a client can match them.
"""

from __future__ import annotations

import numpy as np


def cut_warning(index: int, max_mel_tokens: int) -> str:
    return (f"segment {index} was cut at max_mel_tokens={max_mel_tokens} before the model ended it; "
            "raise MAX_MEL_TOKENS or lower MAX_TEXT_TOKENS_PER_SEGMENT")


def silent_warning(index: int) -> str:
    return f"segment {index} produced no speech codes (the model stopped at once); it is silent"


def segment_warnings(index: int, n_codes: int, stopped: bool, max_mel_tokens: int) -> list[str]:
    """What to tell the user about a finished segment (empty when nothing is unusual)."""
    out = []
    if not stopped:
        out.append(cut_warning(index, max_mel_tokens))
    if n_codes == 0:
        out.append(silent_warning(index))
    return out


def interval_samples(sample_rate: int, ms: float) -> int:
    """Zero samples between segments (IndexTTS2's interval_silence; upstream rounds with int())."""
    if ms < 0:
        raise ValueError("the interval silence must be >= 0 ms")
    return int(sample_rate * ms / 1000.0)


def join_segments(pcms: list[np.ndarray], gap: int) -> np.ndarray:
    """Segments' int16 audio joined with `gap` zero samples between consecutive segments."""
    if not pcms:
        return np.zeros(0, np.int16)
    silence = np.zeros(gap, np.int16)
    parts: list[np.ndarray] = []
    for i, pcm in enumerate(pcms):
        if i and gap:
            parts.append(silence)
        parts.append(np.asarray(pcm, np.int16))
    return np.concatenate(parts)
