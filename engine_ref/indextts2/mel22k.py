"""IndexTTS2's 22.05 kHz log-mel (``ref_mel`` of the speaker reference; the space the s2mel CFM and BigVGAN v2 use).

The original (indextts/s2mel/modules/audio.py ``mel_spectrogram`` with center=False) reflect-pads the waveform by
(n_fft - hop) / 2 = 384 samples on both sides, takes an un-centred STFT (n_fft 1024, hop 256, periodic Hann
1024), the magnitude ``sqrt(re^2 + im^2 + 1e-9)``, librosa's Slaney mel filterbank (80 bands, 0 Hz .. fmax,
area-normalised; built in float64 and cast to float32) and ``ln(clamp(x, 1e-5))``. Frames = T // 256 for
T >= 385 samples (the reflect pad needs T > 384). Output [B, 80, frames].

Every constant is part of the model contract (the DiT was trained on this feature). The filterbank is computed
with librosa's float64 arithmetic step by step, so it equals ``librosa.filters.mel`` bit for bit without
librosa at run time.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from engine_ref.errors import InputError
from engine_ref.mel import _dft_basis

__all__ = ["slaney_mel_filterbank", "ReferenceMel22k", "ref_mel_frames", "upstream_fmax", "SAMPLE_RATE", "N_FFT",
           "HOP_LENGTH", "WIN_LENGTH", "N_MELS", "LOG_CLAMP", "MAGNITUDE_EPS"]

SAMPLE_RATE = 22050
N_FFT = 1024
HOP_LENGTH = 256
WIN_LENGTH = 1024
N_MELS = 80
LOG_CLAMP = 1e-5
MAGNITUDE_EPS = 1e-9

# Slaney's auditory-toolbox mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _SLANEY_HZ_PER_MEL
    high = hz >= _SLANEY_BREAK_HZ
    mel[high] = _SLANEY_BREAK_MEL + np.log(hz[high] / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return mel


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _SLANEY_HZ_PER_MEL * mel
    high = mel >= _SLANEY_BREAK_MEL
    hz[high] = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mel[high] - _SLANEY_BREAK_MEL))
    return hz


def slaney_mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                          f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Triangular Slaney-scale mel filters with Slaney area normalisation, float32 ``[n_mels, n_fft//2 + 1]``.

    Equal to ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm="slaney")``: band edges are
    evenly spaced in Slaney mels (float64), each triangle is rounded to float32, then scaled in float64 by
    2 / (upper edge - lower edge) and rounded again, as librosa's in-place float32 product does.
    """
    if sample_rate <= 0 or n_fft <= 0 or n_mels <= 0:
        raise ValueError(f"sample_rate, n_fft and n_mels must be positive, got {sample_rate}, {n_fft}, {n_mels}")
    f_max = float(sample_rate) / 2 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={f_min}, f_max={f_max}")
    bin_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    edges_mel = np.linspace(_hz_to_slaney_mel(np.array([f_min]))[0], _hz_to_slaney_mel(np.array([f_max]))[0],
                            n_mels + 2)
    edges_hz = _slaney_mel_to_hz(edges_mel)
    widths = np.diff(edges_hz)
    dist = edges_hz[:, None] - bin_hz[None, :]  # [n_mels + 2, n_bins]: edge minus bin frequency
    fb = np.zeros((n_mels, bin_hz.shape[0]), dtype=np.float32)
    for m in range(n_mels):
        rising = -dist[m] / widths[m]
        falling = dist[m + 2] / widths[m + 1]
        fb[m] = np.maximum(0.0, np.minimum(rising, falling))
    area = 2.0 / (edges_hz[2:n_mels + 2] - edges_hz[:n_mels])
    fb = (fb.astype(np.float64) * area[:, None]).astype(np.float32)
    return torch.from_numpy(fb)


def ref_mel_frames(num_samples: int, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> int:
    """Frames of the padded, un-centred STFT: (T + 2 * (n_fft - hop) // 2 - n_fft) // hop + 1 (= T // 256 here)."""
    pad = (n_fft - hop_length) // 2
    return (num_samples + 2 * pad - n_fft) // hop_length + 1


def upstream_fmax(spect_params: Mapping) -> float | None:
    """The f_max IndexTTS2 actually uses for config.yaml's ``s2mel.preprocess_params.spect_params``.

    infer_v2 takes None (Nyquist) only when the key is absent or the STRING "None" (the shipped value) and
    8000 for anything else, even a YAML null or 11025; we reproduce that quirk rather than read the number.
    """
    return None if spect_params.get("fmax", "None") == "None" else 8000.0


def _exporting() -> bool:
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


class ReferenceMel22k(nn.Module):
    """Waveform [B, T] (float32, 22.05 kHz, T > 384) -> log-mel [B, n_mels, T // hop] as IndexTTS2's ref_mel.

    stft="torch" (default) uses torch.stft like the original; stft="conv" computes the same magnitudes with a
    strided conv1d over a windowed DFT basis (plain ops for ONNX / TensorRT), equal within float32 rounding.
    Window, filterbank and basis are non-persistent buffers (derived constants, not checkpoint state).
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
                 win_length: int = WIN_LENGTH, n_mels: int = N_MELS, f_min: float = 0.0,
                 f_max: float | None = None, stft: str = "torch"):
        super().__init__()
        if stft not in ("torch", "conv"):
            raise ValueError(f"stft must be 'torch' or 'conv', got {stft!r}")
        if not 0 < win_length <= n_fft or not 0 < hop_length <= n_fft:
            raise ValueError(f"need 0 < win_length <= n_fft and 0 < hop_length <= n_fft, got "
                             f"win_length={win_length}, n_fft={n_fft}, hop_length={hop_length}")
        self.n_fft, self.hop_length, self.win_length, self.n_mels = n_fft, hop_length, win_length, n_mels
        self.pad = (n_fft - hop_length) // 2  # int((n_fft - hop) / 2) in the original
        self.stft_impl = stft
        window = torch.hann_window(win_length)  # periodic, as the original's torch.hann_window(win_size)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel_fb", slaney_mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max),
                             persistent=False)
        if stft == "conv":
            left = (n_fft - win_length) // 2  # torch.stft centres a shorter window inside the frame
            full = torch.zeros(n_fft)
            full[left:left + win_length] = window
            self.register_buffer("dft_basis", _dft_basis(n_fft, full), persistent=False)

    def magnitude(self, waveform: torch.Tensor) -> torch.Tensor:
        """sqrt(|STFT|^2 + 1e-9) ``[B, n_fft//2 + 1, frames]`` of the reflect-padded ``[B, T]`` batch."""
        x = nn.functional.pad(waveform.unsqueeze(1), (self.pad, self.pad), mode="reflect")
        if self.stft_impl == "torch":
            spec = torch.stft(x.squeeze(1), self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                              window=self.window, center=False, normalized=False, onesided=True,
                              return_complex=True)
            ri = torch.view_as_real(spec)
            return torch.sqrt(ri.pow(2).sum(-1) + MAGNITUDE_EPS)
        re, im = nn.functional.conv1d(x, self.dft_basis, stride=self.hop_length).chunk(2, dim=1)
        return torch.sqrt(re * re + im * im + MAGNITUDE_EPS)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2:
            raise InputError(f"reference waveform has shape {tuple(waveform.shape)}, expected [batch, samples]",
                             "pass the 22.05 kHz reference as a [1, T] tensor")
        if not _exporting() and waveform.shape[-1] <= max(self.pad, self.n_fft - 2 * self.pad - 1):
            raise InputError(f"reference audio has {waveform.shape[-1]} samples; the 22.05 kHz mel needs more "
                             f"than {max(self.pad, self.n_fft - 2 * self.pad - 1)}",
                             "use a longer reference recording (a few seconds of speech)")
        mel = torch.matmul(self.mel_fb, self.magnitude(waveform))
        return torch.log(torch.clamp(mel, min=LOG_CLAMP))
