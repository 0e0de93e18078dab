"""16-bit PCM output without torch: upstream's float -> int16 rule and WAV files, for every side of the project.

The home of these concepts: engine_ref.audio re-exports them (accepting torch tensors too), and the client and
the gateway use them directly, so `pip install 'triton-tts[client]'` never needs torch.

Upstream writes ``clamp(32767 * wav, -32767, 32767)`` cast to int16, which truncates toward zero; `to_pcm16`
reproduces that exactly so our WAVs are bit-identical to upstream's for the same waveform.
"""

from __future__ import annotations

import io
import os
import secrets
import wave
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["to_pcm16", "as_frames", "wav_bytes", "write_wav"]


def _numpy(wav: Any) -> np.ndarray:
    """A numpy view of `wav`; a torch tensor (or anything with .detach/.cpu/.numpy) is converted without importing
    torch here (bf16/fp16 tensors have no numpy twin and are widened to float32 first)."""
    if isinstance(wav, np.ndarray):
        return wav
    if hasattr(wav, "detach") and hasattr(wav, "numpy"):
        t = wav.detach()
        if t.is_floating_point():
            t = t.float()
        return t.cpu().numpy()
    return np.asarray(wav)


def to_pcm16(wav: Any) -> np.ndarray:
    """Float waveform in [-1, 1] -> int16, exactly as upstream: ``int16(clamp(32767 * wav, -32767, 32767))``.

    The scaling runs in float32 (upstream's dtype) and the cast truncates toward zero (0.99999 -> 32766,
    -1e-5 -> 0), so results match the original bit for bit. NaN becomes 0. int16 input is returned
    unchanged (already PCM). Shape is preserved. Accepts numpy arrays and torch tensors.
    """
    arr = _numpy(wav)
    if arr.dtype == np.int16:
        return arr.copy()
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"to_pcm16 expects a float waveform or int16 PCM, got {arr.dtype}")
    scaled = np.float32(32767.0) * np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0)
    return np.clip(scaled, -32767.0, 32767.0).astype(np.int16)


def as_frames(wav: Any) -> np.ndarray:
    """int16 ``[frames, channels]`` from 1-D ``[T]`` or channels-first ``[C, T]`` audio (float or int16)."""
    pcm = to_pcm16(wav)
    if pcm.ndim == 1:
        return pcm[:, None]
    if pcm.ndim == 2 and pcm.shape[0] <= 16:
        return np.ascontiguousarray(pcm.T)
    raise ValueError(f"expected audio shaped [T] or channels-first [C, T] with C <= 16, got {pcm.shape}")


def _write_pcm16(fh: Any, frames: np.ndarray, sample_rate: int) -> None:
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
    with wave.open(fh, "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(frames.astype("<i2", copy=False).tobytes())


def wav_bytes(wav: Any, sample_rate: int = 24000) -> bytes:
    """A complete 16-bit PCM WAV file in memory (float input goes through `to_pcm16`)."""
    buf = io.BytesIO()
    _write_pcm16(buf, as_frames(wav), sample_rate)
    return buf.getvalue()


def write_wav(path: str | os.PathLike, wav: Any, sample_rate: int = 24000) -> Path:
    """Write a 16-bit PCM WAV atomically (temp file + rename), creating parent folders; returns the path.

    Readers never see a half-written file; the temp file is opened normally so the umask decides permissions.
    """
    path = Path(path)
    frames = as_frames(wav)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            _write_pcm16(fh, frames, sample_rate)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
