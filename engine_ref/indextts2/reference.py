"""Reference audio for IndexTTS2: the two loading paths of infer_v2, reproduced sample for sample.

Speaker path: ``librosa.load(path)`` = decode (libsndfile, float32), mono = numpy mean over channels, resample
to 22 050 Hz with python-soxr quality "soxr_hq" (librosa's default), fixed to ceil(T * ratio) samples. That is
audio_22k (for ref_mel); audio_16k (w2v-BERT features, CAMPPlus fbank) is torchaudio's default sinc-Hann
``Resample(22050, 16000)`` of it (width 6, rolloff 0.99; `engine_ref.audio.resample`).
Emotion path: ``librosa.load(path, sr=16000)`` = the same decode and mixdown, then soxr_hq straight to 16 kHz.
So the same file gives slightly different 16 kHz audio on the two paths; that is the original's behaviour.

HEAD (b2edf5f) cuts each path to its first 15 s *after* resampling (``cut_seconds=15``); the reference commit
uses references whole (``cut_seconds=None``, our default). When cutting we decode only cut + 1 s of the source:
soxr's output for the kept samples is then bit-identical to resampling the whole file (checked for common
rates), and a long upload costs no more than 16 s of decoding.

We use `soxr` directly (what librosa calls), not librosa. Our decoder accepts the formats of
`engine_ref.audio` (WAV, FLAC, MP3, OGG, AIFF); librosa would fall back to audioread for others. Errors a user
can fix (missing file, corrupt data, silence, too short) are `InputError`s, as for 1.x references.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import soxr
import torch

from engine_ref.audio import SILENCE_PEAK, AudioClip, AudioSource, _decode, resample
from engine_ref.errors import InputError

__all__ = ["SpeakerAudio", "load_speaker_audio", "load_emotion_audio", "librosa_style_load", "speaker_16k_length",
           "SPEAKER_SAMPLE_RATE", "FEATURE_SAMPLE_RATE", "HEAD_CUT_SECONDS", "SOXR_QUALITY"]

logger = logging.getLogger("engine_ref.indextts2.reference")

SPEAKER_SAMPLE_RATE = 22050  # librosa.load's default sr: ref_mel and the s2mel space
FEATURE_SAMPLE_RATE = 16000  # w2v-BERT / CAMPPlus input
HEAD_CUT_SECONDS = 15.0  # HEAD's _load_and_cut_audio limit
SOXR_QUALITY = "soxr_hq"  # librosa.load's default res_type
_DECODE_MARGIN_SECONDS = 1.0  # extra source decoded past a cut so the resampler's tail never reaches the kept part


@dataclass(frozen=True, eq=False)
class SpeakerAudio:
    """The speaker reference at both rates the pipeline uses (1-D float32 samples in each clip)."""

    audio_22k: AudioClip  #: librosa.load(path) (optionally cut): ref_mel input
    audio_16k: AudioClip  #: torchaudio-style Resample(22050, 16000) of audio_22k: w2v-BERT and CAMPPlus input


def _soxr_like_librosa(mono: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """librosa.resample(res_type="soxr_hq", fix=True, scale=False) of a 1-D float32 signal."""
    if orig_sr == target_sr:
        return mono
    n_out = int(np.ceil(mono.shape[-1] * (float(target_sr) / orig_sr)))
    out = soxr.resample(mono, orig_sr, target_sr, quality=SOXR_QUALITY)
    if out.shape[-1] > n_out:
        out = out[:n_out]
    elif out.shape[-1] < n_out:
        out = np.pad(out, (0, n_out - out.shape[-1]))
    return np.asarray(out, dtype=mono.dtype)


def librosa_style_load(source: AudioSource, target_sr: int, cut_seconds: float | None = None,
                       min_seconds: float = 0.5) -> AudioClip:
    """``librosa.load(source, sr=target_sr)`` (mono, soxr_hq), then optionally the first `cut_seconds` of it.

    The cut keeps ``int(cut_seconds * target_sr)`` samples, as HEAD does. Raises InputError for unreadable or
    unsupported sources, non-finite or silent audio and clips shorter than `min_seconds`.
    """
    if int(target_sr) != target_sr or target_sr <= 0:
        raise ValueError(f"target_sr must be a positive integer, got {target_sr}")
    if cut_seconds is not None and not cut_seconds > 0:
        raise ValueError(f"cut_seconds must be positive or None, got {cut_seconds}")
    target_sr = int(target_sr)
    decode_limit = None if cut_seconds is None else cut_seconds + _DECODE_MARGIN_SECONDS
    data, rate, _, full_seconds = _decode(source, decode_limit)  # float32 [frames, channels], C-contiguous
    what = "reference audio"
    if data.shape[0] == 0:
        raise InputError(f"{what} contains no samples", "send a clip of a few seconds of clear speech")
    if not np.isfinite(data).all():
        raise InputError(f"{what} contains NaN or infinite samples (corrupt float encoding)",
                         "re-export it as 16-bit PCM WAV or FLAC")
    if data.shape[0] / rate < min_seconds:
        raise InputError(f"{what} is too short ({data.shape[0] / rate:.2f} s, minimum {min_seconds:g} s)",
                         "send a longer clip, ideally 3-10 s of clear speech")
    # librosa reads [frames, channels] and transposes; np.mean over the channel axis of that same view keeps
    # numpy's summation order (and so the bits) identical.
    channels_first = data.T
    mono = channels_first[0] if channels_first.shape[0] == 1 else np.mean(channels_first, axis=0)
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    out = _soxr_like_librosa(mono, rate, target_sr)
    trimmed = False
    if cut_seconds is not None:
        keep = int(cut_seconds * target_sr)
        if out.shape[-1] > keep:
            out, trimmed = out[:keep], True
            logger.warning("reference audio is longer than %g s (about %.1f s); only its first %g s are used",
                           cut_seconds, full_seconds, cut_seconds)
    peak = float(np.abs(out).max()) if out.size else 0.0
    if peak < SILENCE_PEAK:
        raise InputError(f"{what} is silent (peak amplitude {peak:.1e}, below {SILENCE_PEAK:g})"
                         + (f" in its first {cut_seconds:g} s" if trimmed else ""),
                         "send a clip where the speaker is clearly audible")
    samples = torch.from_numpy(np.ascontiguousarray(out))
    return AudioClip(samples=samples, sample_rate=target_sr, original_sample_rate=rate,
                     seconds=samples.shape[-1] / target_sr, trimmed=trimmed)


def load_speaker_audio(source: AudioSource, cut_seconds: float | None = None,
                       min_seconds: float = 0.5) -> SpeakerAudio:
    """The speaker reference: librosa-style 22 050 Hz load, then the sinc-Hann 22050 -> 16000 resample.

    cut_seconds: None = the reference commit (whole file); `HEAD_CUT_SECONDS` = HEAD (cut before the 16 kHz
    resample, so both rates cover the same 15 s).
    """
    clip22 = librosa_style_load(source, SPEAKER_SAMPLE_RATE, cut_seconds, min_seconds)
    samples16 = resample(clip22.samples, SPEAKER_SAMPLE_RATE, FEATURE_SAMPLE_RATE).contiguous()
    clip16 = AudioClip(samples=samples16, sample_rate=FEATURE_SAMPLE_RATE,
                       original_sample_rate=clip22.original_sample_rate,
                       seconds=samples16.shape[-1] / FEATURE_SAMPLE_RATE, trimmed=clip22.trimmed)
    return SpeakerAudio(audio_22k=clip22, audio_16k=clip16)


def load_emotion_audio(source: AudioSource, cut_seconds: float | None = None, min_seconds: float = 0.5) -> AudioClip:
    """The emotion reference: ``librosa.load(path, sr=16000)`` (soxr_hq straight from the source rate)."""
    return librosa_style_load(source, FEATURE_SAMPLE_RATE, cut_seconds, min_seconds)


def speaker_16k_length(num_samples_22k: int) -> int:
    """Samples of audio_16k for a 22 050 Hz clip: ceil(T * 320 / 441), torchaudio's output length."""
    return -(-num_samples_22k * FEATURE_SAMPLE_RATE // SPEAKER_SAMPLE_RATE)
