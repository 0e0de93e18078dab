"""Anti-aliased periodic activations of BigVGAN, in plain torch ops.

A periodic activation (Snake/SnakeBeta) creates harmonics above Nyquist; BigVGAN therefore runs it at twice the
sample rate: 2x upsample with a Kaiser-windowed sinc, apply the activation, low-pass and decimate by 2. The
filters are persistent buffers because the official checkpoint stores them (``...upsample.filter`` and
``...downsample.lowpass.filter``, shape [1, 1, 12]); we compute the same values at construction so a module that
was never loaded still behaves correctly, and loading simply overwrites them with the stored copy.

Everything here is ONNX-friendly: replicate padding, depthwise convs (the upsampler in polyphase form),
elementwise math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Added to the amplitude divisor so that exp(beta) (or a linear-scale parameter) never divides by zero;
# same constant as the original so outputs match to the last bit.
_DIV_EPS = 1e-9

# Resampling ratio and filter taps used everywhere in IndexTTS's BigVGAN.
RESAMPLE_RATIO = 2
FILTER_TAPS = 12


def kaiser_beta(half_size: int, half_width: float) -> float:
    """Kaiser window beta from the empirical attenuation formula (Kaiser 1974), as the original computes it."""
    delta_f = 4.0 * half_width
    attenuation = 2.285 * (half_size - 1) * math.pi * delta_f + 7.95
    if attenuation > 50.0:
        return 0.1102 * (attenuation - 8.7)
    if attenuation >= 21.0:
        return 0.5842 * (attenuation - 21.0) ** 0.4 + 0.07886 * (attenuation - 21.0)
    return 0.0


def kaiser_sinc_filter(cutoff: float, half_width: float, taps: int) -> torch.Tensor:
    """Windowed-sinc low-pass filter, shape [1, 1, taps], normalised to unit DC gain.

    cutoff and half_width are in cycles per sample (0.5 = Nyquist). Even tap counts sample the sinc at half-integer
    offsets (a symmetric filter without a centre tap), which is what a 2x resampler needs.
    """
    if not 0.0 <= cutoff <= 0.5:
        raise ValueError(f"cutoff {cutoff} outside [0, 0.5]")
    half_size = taps // 2
    window = torch.kaiser_window(taps, periodic=False, beta=kaiser_beta(half_size, half_width), dtype=torch.float32)
    if taps % 2 == 0:
        t = torch.arange(-half_size, half_size, dtype=torch.float32) + 0.5
    else:
        t = torch.arange(taps, dtype=torch.float32) - half_size
    if cutoff == 0.0:
        return torch.zeros(1, 1, taps)
    taps_values = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    taps_values = taps_values / taps_values.sum()  # exact unit DC gain: no leak of a constant component
    return taps_values.view(1, 1, taps)


class LowPass1d(nn.Module):
    """Depthwise low-pass (optionally strided), replicate-padded so the edges do not ring against zeros."""

    def __init__(
        self, cutoff: float, half_width: float, stride: int = 1, taps: int = FILTER_TAPS, channels: int | None = None
    ):
        super().__init__()
        self.stride = stride
        self.channels = channels
        even = taps % 2 == 0
        self.pad_left = taps // 2 - int(even)
        self.pad_right = taps // 2
        self.register_buffer("filter", kaiser_sinc_filter(cutoff, half_width, taps), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.channels if self.channels is not None else x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.expand(channels, -1, -1), stride=self.stride, groups=channels)


class UpSample1d(nn.Module):
    """Integer-ratio upsampler: zero-stuffing + Kaiser-sinc interpolation (a transposed conv, run in polyphase form).

    `channels` (optional) fixes the depthwise group count at construction; None reads it from the input.
    Output length is exactly ratio * input length.
    """

    def __init__(self, ratio: int = RESAMPLE_RATIO, taps: int | None = None, channels: int | None = None):
        super().__init__()
        self.ratio = ratio
        self.channels = channels
        taps = int(6 * ratio // 2) * 2 if taps is None else taps
        self.pad = taps // ratio - 1
        self.crop_left = self.pad * ratio + (taps - ratio) // 2
        self.crop_right = self.pad * ratio + (taps - ratio + 1) // 2
        self.register_buffer(
            "filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, taps), persistent=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.channels if self.channels is not None else x.shape[1]
        length = x.shape[-1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        # Polyphase form of the zero-stuffed transposed convolution (same sums; 3x faster than ConvTranspose in
        # ONNX Runtime, 13% off the whole v1.5 vocoder): output sample r*q + p is a `taps/r`-tap filter, the
        # reversed phase-p taps, over the padded input; the `r` phases are the outputs of one depthwise conv and
        # interleave back into time. The filter has unit DC gain at the high rate; zero-stuffing divides the energy
        # by `ratio`, hence the gain.
        r = self.ratio
        taps = self.filter.view(-1)
        phase_taps = taps.shape[0] // r
        weight = torch.stack([taps[p::r].flip(0) for p in range(r)]) * r
        y = F.conv1d(x, weight.unsqueeze(1).repeat(channels, 1, 1), groups=channels)
        batch, _, frames = y.shape
        y = y.reshape(batch, channels, r, frames).transpose(2, 3).reshape(batch, channels, r * frames)
        # y starts at high-rate sample r*(phase_taps-1) of the full transposed convolution; keep r*length samples
        # starting at `crop_left` as the original cropping does.
        start = self.crop_left - r * (phase_taps - 1)
        return y[..., start : start + r * length]


class DownSample1d(nn.Module):
    """Integer-ratio decimator: anti-alias low-pass then keep every `ratio`-th sample (one strided conv)."""

    def __init__(self, ratio: int = RESAMPLE_RATIO, taps: int | None = None, channels: int | None = None):
        super().__init__()
        taps = int(6 * ratio // 2) * 2 if taps is None else taps
        # Attribute name `lowpass` gives the official key `...downsample.lowpass.filter`.
        self.lowpass = LowPass1d(0.5 / ratio, 0.6 / ratio, stride=ratio, taps=taps, channels=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class Snake(nn.Module):
    """x + 1/a * sin^2(a x) per channel; `a` stored as log(a) when logscale (the official IndexTTS setting)."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.zeros(channels) if logscale else torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        if self.logscale:
            alpha = torch.exp(alpha)
        s = torch.sin(x * alpha)
        return x + (1.0 / (alpha + _DIV_EPS)) * (s * s)


class SnakeBeta(nn.Module):
    """x + 1/b * sin^2(a x): separate frequency (alpha) and magnitude (beta) per channel, log-scale when logscale."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        beta = self.beta.unsqueeze(0).unsqueeze(-1)
        if self.logscale:
            alpha = torch.exp(alpha)
            beta = torch.exp(beta)
        s = torch.sin(x * alpha)
        return x + (1.0 / (beta + _DIV_EPS)) * (s * s)


def make_snake(kind: str, channels: int, logscale: bool) -> nn.Module:
    """The periodic activation named by config `bigvgan.activation` ("snake" or "snakebeta")."""
    if kind == "snakebeta":
        return SnakeBeta(channels, logscale)
    if kind == "snake":
        return Snake(channels, logscale)
    raise ValueError(f"unknown activation {kind!r}")


class Activation1d(nn.Module):
    """Anti-aliased activation: 2x upsample -> act -> low-pass + 2x downsample. Length in == length out.

    Submodule names (act, upsample, downsample.lowpass) are the official checkpoint's. The channel count is taken
    from the activation's parameters so the depthwise filters have a static shape (the ONNX exporter needs one).
    """

    def __init__(self, act: nn.Module, ratio: int = RESAMPLE_RATIO, taps: int = FILTER_TAPS):
        super().__init__()
        self.act = act
        alpha = getattr(act, "alpha", None)
        channels = int(alpha.shape[0]) if isinstance(alpha, torch.Tensor) else None
        self.upsample = UpSample1d(ratio, taps, channels)
        self.downsample = DownSample1d(ratio, taps, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))
