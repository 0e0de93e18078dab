"""Kaldi-style log mel filterbank (torchaudio.compliance.kaldi.fbank) in plain torch, without torchaudio.

IndexTTS2 feeds CAMPPlus ``torchaudio.compliance.kaldi.fbank(audio_16k, num_mel_bins=80, dither=0,
sample_frequency=16000)`` of the 16 kHz reference, the waveform left in [-1, 1] (NOT scaled to int16 range).
torchaudio cannot be installed here, so this module reproduces its arithmetic step by step, in its order and
dtypes: frames of 25 ms every 10 ms that fit entirely (snip_edges), per-frame DC removal, pre-emphasis 0.97
with the first sample replicated, povey window (symmetric Hann ** 0.85), zero padding to the next power of two,
``|rfft|**2`` (abs then square, as torchaudio), triangular kaldi-mel bins 20 Hz .. Nyquist computed in float32
(an extra zero column for the Nyquist bin), ``log(max(x, float32 eps))``.

The SeamlessM4T extractor in front of w2v-BERT computes its own kaldi-style fbank (numpy, waveform x 2**15);
that one comes from transformers and is deliberately not reimplemented here.

Options beyond IndexTTS2's call are kept where they cost one line (window type, pre-emphasis, DC removal,
power/magnitude, log/linear, band edges, subtract_mean); dither, energy columns, VTLN and snip_edges=False
raise instead of silently differing from torchaudio.

``dft="fft"`` (default) uses torch.fft.rfft like torchaudio; ``dft="matmul"`` multiplies the frames by a
float64-built DFT basis (cos / sin rows) instead, plain MatMuls that export to ONNX / TensorRT, equal to the FFT
path within float32 rounding (framing there is a strided identity conv, also exportable).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine_ref.errors import InputError

__all__ = ["kaldi_fbank", "KaldiFbank", "kaldi_mel_banks", "fbank_num_frames", "FLOAT_EPS"]

FLOAT_EPS = float(torch.finfo(torch.float32).eps)  # 1.1920928955078125e-07, kaldi's log floor
_WINDOWS = ("povey", "hanning", "hamming", "rectangular", "blackman")


def _mel(freq):
    """Kaldi's mel scale 1127 ln(1 + f/700); works on python floats (math) and tensors alike."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def kaldi_mel_banks(num_bins: int, padded_window_size: int, sample_rate: float, low_freq: float,
                    high_freq: float) -> torch.Tensor:
    """Triangular kaldi-mel filterbank ``[num_bins, padded_window_size // 2 + 1]`` (float32, no VTLN).

    Same float32 sequence as torchaudio's ``get_mel_banks`` (band edges from python-float mel values, FFT-bin
    mels in float32, min of the two slopes clamped at 0), plus the zero column torchaudio appends for the
    Nyquist bin.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel band edges low_freq={low_freq}, high_freq={high_freq} for Nyquist {nyquist}")
    if num_bins <= 3:
        raise ValueError("kaldi fbank needs more than 3 mel bins")
    fft_bin_width = sample_rate / padded_window_size
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    band = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + band * delta
    center = mel_low + (band + 1.0) * delta
    right = mel_low + (band + 2.0) * delta
    fft_mel = _mel(fft_bin_width * torch.arange(padded_window_size / 2)).unsqueeze(0)
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return nn.functional.pad(banks, (0, 1), mode="constant", value=0.0)


def feature_window(window_type: str, size: int, blackman_coeff: float = 0.42,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi's analysis windows (all symmetric); povey = Hann ** 0.85, going to zero at both edges."""
    if window_type == "povey":
        return torch.hann_window(size, periodic=False, dtype=dtype).pow(0.85)
    if window_type == "hanning":
        return torch.hann_window(size, periodic=False, dtype=dtype)
    if window_type == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, dtype=dtype)
    if window_type == "rectangular":
        return torch.ones(size, dtype=dtype)
    if window_type == "blackman":
        a = 2 * math.pi / (size - 1)
        n = torch.arange(size, dtype=dtype)
        return (blackman_coeff - 0.5 * torch.cos(a * n) + (0.5 - blackman_coeff) * torch.cos(2 * a * n)).to(dtype)
    raise ValueError(f"window_type must be one of {_WINDOWS}, got {window_type!r}")


def _dft_basis(n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary DFT matrices ``[n_fft, n_fft//2 + 1]`` (float32 from float64, exact k*n mod n_fft)."""
    n = torch.arange(n_fft, dtype=torch.long)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.long)
    phase = 2.0 * math.pi * ((n[:, None] * k[None, :]) % n_fft).double() / n_fft
    return torch.cos(phase).float(), (-torch.sin(phase)).float()


def fbank_num_frames(num_samples: int | torch.Tensor, window_size: int = 400, window_shift: int = 160):
    """Frames that fit entirely (snip_edges): ``1 + (n - window) // shift`` for n >= window, else 0."""
    if isinstance(num_samples, torch.Tensor):
        return torch.where(num_samples >= window_size, 1 + (num_samples - window_size) // window_shift,
                           torch.zeros_like(num_samples))
    return 1 + (num_samples - window_size) // window_shift if num_samples >= window_size else 0


class KaldiFbank(nn.Module):
    """Waveforms ``[B, N]`` -> log-mel ``[B, frames, num_mel_bins]`` with torchaudio kaldi.fbank's defaults.

    Rows of a right-padded batch are framed independently, so a row's first ``fbank_num_frames(len)`` frames
    equal its unpadded result (frames never straddle rows); later frames are padding garbage.
    The window, filterbank and DFT basis are non-persistent buffers (derived constants, not checkpoint state).
    """

    def __init__(self, sample_rate: float = 16000.0, num_mel_bins: int = 80, frame_length: float = 25.0,
                 frame_shift: float = 10.0, preemphasis_coefficient: float = 0.97, remove_dc_offset: bool = True,
                 round_to_power_of_two: bool = True, low_freq: float = 20.0, high_freq: float = 0.0,
                 window_type: str = "povey", blackman_coeff: float = 0.42, use_power: bool = True,
                 use_log_fbank: bool = True, subtract_mean: bool = False, dft: str = "fft"):
        super().__init__()
        if dft not in ("fft", "matmul"):
            raise ValueError(f"dft must be 'fft' or 'matmul', got {dft!r}")
        if not 0.0 <= preemphasis_coefficient <= 1.0:
            raise ValueError("preemphasis_coefficient must be in [0, 1]")
        # torchaudio truncates (int()) the millisecond products, e.g. 16000 * 25 * 0.001 -> 400.
        self.window_shift = int(sample_rate * frame_shift * 0.001)
        self.window_size = int(sample_rate * frame_length * 0.001)
        if self.window_size < 2 or self.window_shift <= 0:
            raise ValueError(f"frame_length/frame_shift give window {self.window_size}, shift {self.window_shift}")
        self.padded_window_size = (1 << (self.window_size - 1).bit_length()) if round_to_power_of_two \
            else self.window_size
        if self.padded_window_size % 2:
            raise ValueError("the padded window size must be even: use round_to_power_of_two or change frame_length")
        self.preemphasis = float(preemphasis_coefficient)
        self.remove_dc_offset = remove_dc_offset
        self.use_power = use_power
        self.use_log_fbank = use_log_fbank
        self.subtract_mean = subtract_mean
        self.dft = dft
        self.register_buffer("window", feature_window(window_type, self.window_size, blackman_coeff),
                             persistent=False)
        banks = kaldi_mel_banks(num_mel_bins, self.padded_window_size, sample_rate, low_freq, high_freq)
        self.register_buffer("mel_banks_t", banks.T.contiguous(), persistent=False)  # [bins_fft, mel]
        if dft == "matmul":
            cos, sin = _dft_basis(self.padded_window_size)
            self.register_buffer("dft_cos", cos, persistent=False)
            self.register_buffer("dft_sin", sin, persistent=False)
            # framing as a strided conv with an identity kernel: exact copies (1*x + 0*...), and unlike
            # Tensor.unfold it exports with a dynamic number of samples
            self.register_buffer("frame_kernel", torch.eye(self.window_size).unsqueeze(1), persistent=False)

    def num_frames(self, num_samples):
        return fbank_num_frames(num_samples, self.window_size, self.window_shift)

    def frames(self, waveforms: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, frames, window] (snip_edges framing)."""
        if self.dft == "fft":
            return waveforms.unfold(-1, self.window_size, self.window_shift)
        kernel = self.frame_kernel.to(waveforms.dtype)
        return nn.functional.conv1d(waveforms.unsqueeze(1), kernel, stride=self.window_shift).transpose(1, 2)

    def power_spectrum(self, frames: torch.Tensor) -> torch.Tensor:
        """``|DFT|**use_power`` of zero-padded frames ``[..., padded_window]`` -> ``[..., padded_window//2 + 1]``."""
        if self.dft == "fft":
            spectrum = torch.fft.rfft(frames).abs()
            return spectrum.pow(2.0) if self.use_power else spectrum
        re = torch.matmul(frames, self.dft_cos)
        im = torch.matmul(frames, self.dft_sin)
        power = re * re + im * im
        return power if self.use_power else torch.sqrt(power)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if waveforms.dim() != 2:
            raise InputError(f"kaldi fbank expects waveforms [batch, samples], got shape {list(waveforms.shape)}",
                             "pass a 2-D tensor (one row per clip)")
        if not waveforms.is_floating_point():
            raise InputError(f"kaldi fbank needs a float waveform, got {waveforms.dtype}", "convert it to float32")
        if not torch.jit.is_tracing() and waveforms.shape[-1] < self.window_size:
            raise InputError(
                f"audio of {waveforms.shape[-1]} samples is shorter than one {self.window_size}-sample fbank frame",
                "use a longer reference clip")
        dtype = waveforms.dtype
        frames = self.frames(waveforms)  # [B, m, window]
        if self.remove_dc_offset:
            frames = frames - frames.mean(dim=-1, keepdim=True)
        if self.preemphasis != 0.0:
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # sample j-1, j=0 replicated
            frames = frames - self.preemphasis * previous
        frames = frames * self.window.to(dtype)
        if self.padded_window_size != self.window_size:
            frames = nn.functional.pad(frames, (0, self.padded_window_size - self.window_size))
        spectrum = self.power_spectrum(frames)
        mel = torch.matmul(spectrum, self.mel_banks_t.to(dtype))
        if self.use_log_fbank:
            mel = torch.clamp(mel, min=FLOAT_EPS).log()
        if self.subtract_mean:
            mel = mel - mel.mean(dim=-2, keepdim=True)
        return mel


def kaldi_fbank(waveform: torch.Tensor, sample_rate: float = 16000.0, num_mel_bins: int = 80,
                dither: float = 0.0, channel: int = -1, energy_floor: float = 1.0, use_energy: bool = False,
                snip_edges: bool = True, vtln_warp: float = 1.0, **options) -> torch.Tensor:
    """Drop-in for ``torchaudio.compliance.kaldi.fbank(waveform [C, N], ...)`` -> ``[frames, num_mel_bins]``.

    Like torchaudio: channel -1/0 takes row 0, 1 takes row 1; a 1-D waveform is accepted as one channel.
    Other keyword options (frame_length, frame_shift, preemphasis_coefficient, remove_dc_offset,
    round_to_power_of_two, low_freq, high_freq, window_type, blackman_coeff, use_power, use_log_fbank,
    subtract_mean, dft) are passed to `KaldiFbank`. Dither, energy output, VTLN and snip_edges=False are not
    implemented and raise; energy_floor only matters with use_energy and is ignored.
    """
    if dither != 0.0:
        raise ValueError("dither != 0 is random in torchaudio and not implemented; IndexTTS2 uses dither=0")
    if use_energy or not snip_edges or vtln_warp != 1.0:
        raise ValueError("use_energy, snip_edges=False and VTLN are not implemented")
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    row = max(channel, 0)
    if waveform.dim() != 2 or row >= waveform.shape[0]:
        raise InputError(f"invalid channel {channel} for a waveform of shape {list(waveform.shape)}",
                         "pass [channels, samples] with the channel present")
    module = KaldiFbank(sample_rate=sample_rate, num_mel_bins=num_mel_bins, **options)
    return module(waveform[row:row + 1])[0]
