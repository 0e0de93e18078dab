"""The conditioning log-mel spectrogram of IndexTTS 1.x, without torchaudio.

The GPT conditioning encoder and the BigVGAN speaker encoder (ECAPA-TDNN) both consume the SAME log-mel
of the 24 kHz reference: magnitude STFT (n_fft 1024, hop 256, periodic Hann 1024, centred with reflect
padding), a 100-band HTK mel filterbank without area normalisation (0 Hz .. Nyquist), then
``log(clamp(x, 1e-7))``. The checkpoints were trained on exactly this feature, so every constant here is
part of the model contract; ``config.yaml``'s ``dataset.mel`` section is not consulted (upstream ignores it
at inference too).

The filterbank reproduces torchaudio's float32 arithmetic step by step, so it matches the original to the
last bit or two rather than merely "to librosa precision".
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

__all__ = ["htk_mel_filterbank", "LogMelSpectrogram", "mel_lengths", "SAMPLE_RATE", "N_FFT", "HOP_LENGTH",
           "WIN_LENGTH", "N_MELS", "LOG_CLAMP"]

SAMPLE_RATE = 24000
N_FFT = 1024
HOP_LENGTH = 256
WIN_LENGTH = 1024
N_MELS = 100
LOG_CLAMP = 1e-7


def _hz_to_mel_htk(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def htk_mel_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> torch.Tensor:
    """Triangular HTK-scale mel filters, unnormalised, as a float32 ``[n_mels, n_fft // 2 + 1]`` matrix.

    Same layout as ``librosa.filters.mel(htk=True, norm=None)`` (mel rows, FFT-bin columns); the values follow
    torchaudio's ``melscale_fbanks`` computation order in float32 (bin centres ``linspace(0, sr // 2)``,
    mel points ``linspace`` in float32) because that is what produced the training features.
    """
    if sample_rate <= 0 or n_fft <= 0 or n_mels <= 0:
        raise ValueError(f"sample_rate, n_fft and n_mels must be positive, got {sample_rate}, {n_fft}, {n_mels}")
    f_max = float(sample_rate // 2) if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={f_min}, f_max={f_max}")
    n_freqs = n_fft // 2 + 1
    bin_hz = torch.linspace(0, sample_rate // 2, n_freqs)
    mel_pts = torch.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2)
    edge_hz = 700.0 * (10.0 ** (mel_pts / 2595.0) - 1.0)  # n_mels + 2 band edges, float32

    widths = edge_hz[1:] - edge_hz[:-1]  # [n_mels + 1]
    offsets = edge_hz.unsqueeze(0) - bin_hz.unsqueeze(1)  # [n_freqs, n_mels + 2]
    rising = (-1.0 * offsets[:, :-2]) / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)  # [n_freqs, n_mels]
    if bool((fb.max(dim=0).values == 0.0).any()):
        warnings.warn(f"some of the {n_mels} mel filters are empty; n_mels is too high for n_fft={n_fft}",
                      stacklevel=2)
    return fb.t().contiguous()


def mel_lengths(num_samples: int | torch.Tensor, hop_length: int = HOP_LENGTH) -> int | torch.Tensor:
    """Frames produced by the centred STFT for ``num_samples`` samples: ``num_samples // hop + 1``."""
    return num_samples // hop_length + 1


def _dft_basis(n_fft: int, window: torch.Tensor) -> torch.Tensor:
    """Windowed real/imag DFT rows as a conv1d weight ``[2 * (n_fft//2 + 1), 1, n_fft]`` (float32)."""
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    # Reduce k*n modulo n_fft in exact integer arithmetic so the angle stays small and precise.
    phase = 2.0 * math.pi * ((k[:, None].long() * n[None, :].long()) % n_fft).double() / n_fft
    w = window.double()[None, :]
    basis = torch.cat([torch.cos(phase) * w, -torch.sin(phase) * w], dim=0)
    return basis.unsqueeze(1).float()


class LogMelSpectrogram(nn.Module):
    """Waveform ``[..., T]`` (float32, 24 kHz, T > n_fft // 2) -> log-mel ``[..., n_mels, T // hop + 1]``.

    ``stft="torch"`` (default) uses ``torch.stft`` exactly like the original. ``stft="conv"`` computes the same
    magnitudes with reflect padding and a strided conv1d over a windowed DFT basis: plain ops that export to
    ONNX / TensorRT (which lack a complex STFT), equal to the FFT path within float32 rounding.
    The window, filterbank and basis are non-persistent buffers: derived constants, not checkpoint state.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        win_length: int = WIN_LENGTH,
        n_mels: int = N_MELS,
        f_min: float = 0.0,
        f_max: float | None = None,
        log_clamp: float = LOG_CLAMP,
        stft: str = "torch",
    ):
        super().__init__()
        if stft not in ("torch", "conv"):
            raise ValueError(f"stft must be 'torch' or 'conv', got {stft!r}")
        if not 0 < win_length <= n_fft or hop_length <= 0:
            raise ValueError(f"need 0 < win_length <= n_fft and hop_length > 0, "
                             f"got win_length={win_length}, n_fft={n_fft}, hop_length={hop_length}")
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length
        self.n_mels = n_mels
        self.log_clamp = log_clamp
        self.stft_impl = stft
        window = torch.hann_window(win_length)  # periodic, as torchaudio's default window_fn
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel_fb", htk_mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max), persistent=False)
        if stft == "conv":
            # torch.stft centres a shorter window inside the n_fft frame; do the same for the conv basis.
            left = (n_fft - win_length) // 2
            full = torch.zeros(n_fft)
            full[left:left + win_length] = window
            self.register_buffer("dft_basis", _dft_basis(n_fft, full), persistent=False)

    def magnitude(self, waveform: torch.Tensor) -> torch.Tensor:
        """Linear magnitude spectrogram ``[N, n_fft//2 + 1, frames]`` of a ``[N, T]`` batch."""
        if self.stft_impl == "torch":
            spec = torch.stft(waveform, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                              window=self.window, center=True, pad_mode="reflect", normalized=False,
                              onesided=True, return_complex=True)
            return spec.abs()
        pad = self.n_fft // 2
        x = nn.functional.pad(waveform.unsqueeze(1), (pad, pad), mode="reflect")
        ri = nn.functional.conv1d(x, self.dft_basis, stride=self.hop_length)
        re, im = ri.chunk(2, dim=1)
        return torch.sqrt(re * re + im * im)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        lead = waveform.shape[:-1]
        flat = waveform.reshape(-1, waveform.shape[-1])
        mel = torch.matmul(self.mel_fb, self.magnitude(flat))
        logmel = torch.log(torch.clamp(mel, min=self.log_clamp))
        return logmel.reshape(lead + logmel.shape[-2:])
