"""Reference-audio decoding, resampling and PCM output, shared by engine_ref, the Triton models and the clients.

Input side (what IndexTTS 1.x does to a voice prompt): decode, average the channels to mono, resample to
24 kHz with torchaudio's default windowed-sinc resampler (reimplemented here, same kernel values), no
clipping. Everything a user can get wrong (path, bytes, format, silence, length, NaNs) becomes a one-line
`InputError` with a fix, never a decoder traceback.

Output side (`to_pcm16`, `wav_bytes`, `write_wav`): re-exported from engine_ref/pcm.py, their torch-free home.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import torch

from engine_ref.errors import InputError
from engine_ref.pcm import to_pcm16, wav_bytes, write_wav

__all__ = ["AudioClip", "load_audio", "resample", "audio_fingerprint", "to_pcm16", "write_wav", "wav_bytes",
           "SUPPORTED_FORMATS", "SILENCE_PEAK"]

logger = logging.getLogger("engine_ref.audio")

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

#: libsndfile container names we accept (WAVEX/RF64/W64 are WAV variants). Anything else libsndfile happens
#: to parse (AU, CAF, ...) is refused, so the accepted surface stays small and documented.
_ACCEPTED = frozenset({"WAV", "WAVEX", "RF64", "W64", "FLAC", "MP3", "OGG", "AIFF"})
SUPPORTED_FORMATS = ("WAV", "FLAC", "MP3", "OGG (Vorbis/Opus)", "AIFF")
_SUPPORTED_TEXT = ", ".join(SUPPORTED_FORMATS)

#: Peak amplitude below which a decoded reference counts as silent (about -80 dBFS).
SILENCE_PEAK = 1e-4
#: Sample-rate sanity range: outside it a header is corrupt or hostile (1 Hz would mean a gigantic upsample).
_MIN_RATE, _MAX_RATE = 4000, 768000
#: Bound on the temporary gather buffer of the odd-rate `resample` path (elements per chunk).
_RESAMPLE_CHUNK_ELEMS = 1 << 22
#: Frames per decoder read (bounded allocations whatever the header claims).
_READ_BLOCK_FRAMES = 1 << 16
#: Largest dense polyphase kernel (elements) `resample` builds; beyond it the sparse path is used.
_DENSE_KERNEL_ELEMS = 1 << 20


@dataclass(frozen=True, eq=False)
class AudioClip:
    """A decoded, mono, resampled reference clip."""

    samples: torch.Tensor  #: 1-D float32 waveform at `sample_rate`
    sample_rate: int
    original_sample_rate: int
    seconds: float  #: duration of `samples`
    trimmed: bool  #: True when the source was longer than `max_seconds` and was cut


# ----------------------------------------------------------------------------------------------- resampling


def _sinc_taps(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Per-phase FIR taps of torchaudio's ``sinc_interp_hann`` resampler, float32 ``[new, 2*width + 1]``.

    torchaudio builds a dense ``[new, 2*width + orig]`` kernel; for each output phase only the
    ``2*width + 1`` taps inside the sinc window are non-zero (outside it torchaudio clamps the argument to
    +-lowpass_filter_width, where the value is ~1e-49 and rounds to exactly 0.0 in float32). Keeping only
    those taps gives identical weights with memory ``O(new * width)`` instead of ``O(new * orig)``, which
    matters for odd rates (44 101 Hz -> 24 kHz has no common divisor). The arithmetic (float32 phase term,
    float64 offsets and window, cast to float32 at the end) follows torchaudio's kernel for bit-equal taps.
    """
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    phases = torch.arange(new)
    first = (phases * orig) // new - width  # input offset of tap 0, relative to block start b*orig
    offsets = first[:, None] + torch.arange(2 * width + 1)[None, :]  # [new, taps] int64
    phase_term = (torch.arange(0, -new, -1) / new)[:, None]  # float32 like torchaudio's, promoted below
    t = (phase_term.double() + offsets.double() / orig) * base
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    taps = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    taps = taps * (window * (base / orig))
    return taps.float(), width


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of ``[..., T]`` float audio, equal to ``torchaudio.functional.resample`` defaults.

    Output length is ``ceil(T * new_sr / orig_sr)``; equal rates return the input unchanged (as torchaudio).
    Output sample ``n`` is ``sum_s x[(n*orig)//new - width + s] * taps[n % new, s]`` (zero padding at both
    ends), with ``orig/new`` the gcd-reduced rates. Common rates run torchaudio's own dense strided conv1d;
    rates without a useful common divisor gather the non-zero taps sparsely (same weights, bounded memory).
    """
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if not waveform.is_floating_point():
        raise TypeError(f"resample needs a floating-point waveform, got {waveform.dtype}")
    if orig_sr == new_sr:
        return waveform
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    taps, width = _sinc_taps(orig, new, lowpass_filter_width, rolloff)
    taps = taps.to(device=waveform.device, dtype=waveform.dtype)
    lead, n_in = waveform.shape[:-1], waveform.shape[-1]
    n_out = -(-new * n_in // orig)  # exact integer ceil
    if n_out == 0:
        return waveform.new_zeros(lead + (0,))
    flat = waveform.reshape(-1, n_in)
    n_taps = taps.shape[1]
    if new * (n_taps + orig) <= _DENSE_KERNEL_ELEMS:
        # Common rates (44.1k/48k/16k...): torchaudio's dense polyphase kernel is tiny; a strided conv1d
        # over it is the fastest form and is literally the original computation.
        dense = taps.new_zeros(new, n_taps - 1 + orig)
        cols = (torch.arange(new, device=taps.device) * orig // new)[:, None] + torch.arange(n_taps, device=taps.device)
        dense.scatter_(1, cols, taps)
        padded = torch.nn.functional.pad(flat, (width, width + orig))
        out = torch.nn.functional.conv1d(padded[:, None], dense[:, None], stride=orig)
        out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, :n_out]
        return out.reshape(lead + (n_out,))
    # Odd rates (no common divisor): gather only the non-zero taps, in bounded chunks.
    padded = torch.nn.functional.pad(flat, (width, width))
    windows = padded.unfold(-1, n_taps, 1)  # view [N, n_in, taps]
    chunk = max(1, _RESAMPLE_CHUNK_ELEMS // (n_taps * max(1, flat.shape[0])))
    pieces = []
    for start in range(0, n_out, chunk):
        n = torch.arange(start, min(start + chunk, n_out), device=waveform.device)
        pieces.append((windows[:, (n * orig) // new, :] * taps[n % new]).sum(-1))
    out = torch.cat(pieces, dim=-1) if pieces else flat.new_zeros(flat.shape[0], 0)
    return out.reshape(lead + (n_out,))


# -------------------------------------------------------------------------------------------------- decoding


def _sniff(head: bytes) -> tuple[str | None, bool]:
    """Guess a container from magic bytes: (name, whether we support it). Only used to word errors."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE" or head[:4] in (b"RF64", b"BW64"):
        return "WAV", True
    if head[:4] == b"fLaC":
        return "FLAC", True
    if head[:4] == b"OggS":
        return "OGG", True
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF", True
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and (head[1] & 0xE6) in (0xE2, 0xE4, 0xE6)):
        return "MP3", True
    if head[4:8] == b"ftyp":
        return "MP4/M4A (AAC/ALAC)", False
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "WebM/Matroska", False
    if len(head) > 1 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:
        return "raw AAC (ADTS)", False
    if head[:5] == b"#!AMR":
        return "AMR", False
    if head[:4] in (b"wvpk", b"MAC ", b"caff", b".snd"):
        return {b"wvpk": "WavPack", b"MAC ": "Monkey's Audio", b"caff": "CAF", b".snd": "AU"}[head[:4]], False
    if head[:4] == b"%PDF" or head[:2] == b"PK":
        return "a document/archive, not audio", False
    stripped = head.lstrip()
    if stripped[:1] in (b"<", b"{", b"["):
        return "text (HTML/XML/JSON), not audio", False
    return None, False


def _error_detail(exc: BaseException) -> str:
    """libsndfile's own reason, without the object repr soundfile prefixes (keeps messages deterministic)."""
    text = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    text = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return text.rstrip(".")


def _read_source(source: AudioSource) -> tuple[object, str, bytes]:
    """Validate the source; return (what soundfile opens, a name for messages, the first bytes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InputError("reference audio is empty (0 bytes)",
                             f"send the audio file's contents ({_SUPPORTED_TEXT})")
        return io.BytesIO(data), "reference audio", data[:16]
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"reference audio must be a file path or bytes, got {type(source).__name__}",
                         "pass a path to an audio file or its raw bytes")
    path = Path(source)
    name = f"reference audio file {str(path)!r}"
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        raise InputError(f"{name} does not exist", "check the path, or send the audio bytes instead") from None
    except IsADirectoryError:
        raise InputError(f"{name} is a directory", "pass the path of an audio file inside it") from None
    except (PermissionError, OSError) as exc:
        raise InputError(f"{name} cannot be read ({exc.strerror or exc})",
                         "check the file permissions and that the path is a regular file") from None
    if not head:
        raise InputError(f"{name} is empty (0 bytes)", f"record or export the reference again ({_SUPPORTED_TEXT})")
    return str(path), name, head


def _read_frames(f: sf.SoundFile, limit: int | None) -> np.ndarray:
    """Read up to ``limit`` frames (all when None) in fixed-size blocks, as float32 ``[frames, channels]``.

    Block reads keep allocations proportional to the audio actually present: a header that claims
    billions of frames (corrupt or hostile FLAC/WAV) would otherwise size one giant buffer up front.
    """
    blocks, total = [], 0
    while limit is None or total < limit:
        want = _READ_BLOCK_FRAMES if limit is None else min(_READ_BLOCK_FRAMES, limit - total)
        block = f.read(frames=want, dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            break
        blocks.append(block)
        total += block.shape[0]
    return np.concatenate(blocks) if blocks else np.zeros((0, f.channels), np.float32)


def _decode(source: AudioSource, max_seconds: float | None) -> tuple[np.ndarray, int, bool, float]:
    """Decode to float32 ``[frames, channels]``; returns (data, rate, trimmed, full_seconds_estimate)."""
    target, name, head = _read_source(source)
    try:
        with sf.SoundFile(target) as f:
            rate, fmt = int(f.samplerate), str(f.format)
            if fmt not in _ACCEPTED:
                raise InputError(f"{name} is in the unsupported format {f.format_info or fmt}",
                                 f"convert it to one of: {_SUPPORTED_TEXT}")
            if not _MIN_RATE <= rate <= _MAX_RATE:
                raise InputError(f"{name} declares an implausible sample rate of {rate} Hz",
                                 f"re-encode it at a standard rate ({_MIN_RATE}-{_MAX_RATE} Hz, e.g. 24000 or 44100)")
            limit = None if max_seconds is None else int(max_seconds * rate)
            data = _read_frames(f, limit)
            trimmed = limit is not None and data.shape[0] >= limit and f.read(1, dtype="float32").shape[0] > 0
            full_seconds = max(int(f.frames), data.shape[0]) / rate
    except InputError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError, OSError, MemoryError) as exc:
        kind, supported = _sniff(head)
        detail = _error_detail(exc)
        if kind is not None and not supported:
            raise InputError(f"{name} looks like {kind}, which is not a supported format",
                             f"convert it to one of: {_SUPPORTED_TEXT}") from None
        if kind is not None:
            raise InputError(f"{name} looks like {kind} but could not be decoded ({detail}): it is corrupt, "
                             f"truncated, or uses a codec libsndfile cannot read",
                             f"re-export it as 16-bit PCM WAV or FLAC") from None
        raise InputError(f"{name} could not be decoded as audio ({detail})",
                         f"send a valid audio file in one of: {_SUPPORTED_TEXT}") from None
    return data, rate, trimmed, full_seconds


def load_audio(source: AudioSource, target_sr: int = 24000, max_seconds: float | None = None,
               min_seconds: float = 0.5) -> AudioClip:
    """Decode a reference clip (path or bytes) to mono float32 at ``target_sr``, the way IndexTTS 1.x does.

    Channels are averaged (upstream: mean over channels), then resampled with `resample`; samples are not
    clipped (upstream does not clip either). A source longer than ``max_seconds`` is cut to its first
    ``max_seconds`` with a warning on logger ``engine_ref.audio``; only that much is decoded.
    Raises `InputError` for a missing/unreadable/empty source, an unsupported or corrupt encoding,
    non-finite samples, silence (peak < `SILENCE_PEAK`) and clips shorter than ``min_seconds``.
    """
    if int(target_sr) != target_sr or target_sr <= 0:
        raise ValueError(f"target_sr must be a positive integer, got {target_sr}")
    if max_seconds is not None and not (max_seconds > 0 and max_seconds >= min_seconds):
        raise ValueError(f"max_seconds must be positive and >= min_seconds, got {max_seconds} < {min_seconds}")
    data, rate, trimmed, full_seconds = _decode(source, max_seconds)
    what = "reference audio"
    if data.shape[0] == 0:
        raise InputError(f"{what} contains no samples", "send a clip of a few seconds of clear speech")
    if not np.isfinite(data).all():
        raise InputError(f"{what} contains NaN or infinite samples (corrupt float encoding)",
                         "re-export it as 16-bit PCM WAV or FLAC")
    seconds_in = data.shape[0] / rate
    if seconds_in < min_seconds:
        raise InputError(f"{what} is too short ({seconds_in:.2f} s, minimum {min_seconds:g} s)",
                         "send a longer clip, ideally 3-10 s of clear speech")
    mono = torch.from_numpy(np.ascontiguousarray(data.T)).mean(dim=0)
    peak = float(mono.abs().max())
    if peak < SILENCE_PEAK:
        raise InputError(f"{what} is silent (peak amplitude {peak:.1e}, below {SILENCE_PEAK:g})"
                         + (f" in its first {max_seconds:g} s" if trimmed else ""),
                         "send a clip where the speaker is clearly audible")
    if trimmed:
        logger.warning("reference audio is longer than max_seconds=%g (header: %.1f s); only its first %.1f s "
                       "are used", max_seconds, full_seconds, seconds_in)
    samples = resample(mono, rate, int(target_sr)).contiguous()
    return AudioClip(samples=samples, sample_rate=int(target_sr), original_sample_rate=rate,
                     seconds=samples.shape[-1] / int(target_sr), trimmed=trimmed)


def audio_fingerprint(data: bytes | bytearray | memoryview) -> str:
    """SHA-256 hex digest of the raw, undecoded bytes: the speaker-cache key (same bytes, same voice)."""
    return hashlib.sha256(bytes(data) if not isinstance(data, bytes) else data).hexdigest()


# ---------------------------------------------------------------------------------------------------- output


# to_pcm16, wav_bytes and write_wav live in engine_ref/pcm.py (torch-free, shared with the client and the gateway);
# they accept torch tensors as well as numpy arrays.
