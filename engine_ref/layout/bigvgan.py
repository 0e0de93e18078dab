"""Published layout of bigvgan_generator.pth (the ``"generator"`` state dict), from the official key names.

Weight-normalised convs appear as ``weight_g`` ([C0, 1, 1], C0 = dim 0 of the weight: out channels for Conv1d,
IN channels for ConvTranspose1d) + ``weight_v`` + ``bias``; the speaker-conditioning 1x1 convs and the whole
speechbrain-style ECAPA-TDNN are plain convs; BatchNorms carry running stats and an int64 scalar
``num_batches_tracked``; every anti-aliased activation stores its two [1, 1, 12] Kaiser-sinc filters.

Preset init rules (random weights that still make audible, unclipped sound for latents ~ N(0, 1)): weight_g
sets the norm of each dim-0 slice, so it is chosen per layer to keep the signal scale roughly constant: 1 for
conv_pre, sqrt(rate / 2) for the upsamplers (a stride-`rate` transposed conv that halves the channels sums 2 / rate
as many taps per output), 0.3 on the residual branches so six stages of residual sums stay bounded, 0.1 for
conv_post (pre-tanh RMS ~0.1-0.2). The speaker path is scaled so the embedding RMS is ~1 for log-mel input and
its per-stage offsets do not swamp the latent signal. BatchNorm and Snake parameters get small random
deviations from their neutral values (not exactly ones/zeros) so that wiring mistakes change the output.
Measured (seeds 0-2): tiny (64 ch) RMS 0.06-0.15, peak <= 0.77; v1.5 size RMS 0.12-0.20, peak <= 0.57.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from engine_ref.modules.configs import BigVGANConfig
from engine_ref.layout import Layout, TensorSpec
from engine_ref.modules.alias_free import FILTER_TAPS, RESAMPLE_RATIO, kaiser_sinc_filter

# ECAPA-TDNN sizes, hard-coded in the original (only the output width comes from config).
_ECAPA_CHANNELS = 512
_ECAPA_MFA = 1536
_ECAPA_KERNEL0 = 5
_ECAPA_RES2NET_KERNEL = 3
_ECAPA_SCALE = 8
_ECAPA_SE = 128
_ECAPA_ATTENTION = 128

# Preset gains (see module docstring); tuned by measuring random-weight output for the v1.5 and tiny sizes.
_GAIN_PRE = 1.0
_GAIN_RES1 = 0.3
_GAIN_RES2 = 0.3
_GAIN_POST = 0.1
_G_JITTER = 0.05  # relative spread of weight_g around its gain: keeps rows distinct
_BIAS_STD = 0.02
_SNAKE_STD = 0.1  # log-scale alpha/beta around 0 (= linear 1)
_FC_STD_SCALE = 0.4  # ECAPA output layer: keeps the embedding RMS near 1 for log-mel input
_COND_STD_SCALE = 0.25  # speaker-conditioning 1x1 convs: fraction of the 1/sqrt(fan_in) default


def _filter_spec() -> TensorSpec:
    ratio = RESAMPLE_RATIO
    value = partial(kaiser_sinc_filter, 0.5 / ratio, 0.6 / ratio, FILTER_TAPS)
    return TensorSpec((1, 1, FILTER_TAPS), init="fixed", value=value)


def _weight_normed(layout: Layout, name: str, v_shape: tuple[int, ...], bias: int | None, gain: float) -> None:
    layout[f"{name}.weight_g"] = TensorSpec((v_shape[0], 1, 1), init="normal", mean=gain, std=gain * _G_JITTER)
    layout[f"{name}.weight_v"] = TensorSpec(v_shape)
    if bias is not None:
        layout[f"{name}.bias"] = TensorSpec((bias,), init="normal", std=_BIAS_STD)


def _plain_conv(layout: Layout, name: str, out_ch: int, in_ch: int, k: int, std_scale: float = 1.0) -> None:
    layout[f"{name}.weight"] = TensorSpec((out_ch, in_ch, k), std=std_scale / math.sqrt(in_ch * k))
    layout[f"{name}.bias"] = TensorSpec((out_ch,), init="normal", std=_BIAS_STD)


def _anti_aliased_act(layout: Layout, name: str, channels: int, activation: str, logscale: bool) -> None:
    mean = 0.0 if logscale else 1.0
    layout[f"{name}.act.alpha"] = TensorSpec((channels,), init="normal", mean=mean, std=_SNAKE_STD)
    if activation == "snakebeta":
        layout[f"{name}.act.beta"] = TensorSpec((channels,), init="normal", mean=mean, std=_SNAKE_STD)
    layout[f"{name}.upsample.filter"] = _filter_spec()
    layout[f"{name}.downsample.lowpass.filter"] = _filter_spec()


def _batch_norm(layout: Layout, name: str, channels: int) -> None:
    """speechbrain BatchNorm1d wrapper: the torch BatchNorm1d sits at `<name>.norm`."""
    layout[f"{name}.norm.weight"] = TensorSpec((channels,), init="normal", mean=1.0, std=0.05)
    layout[f"{name}.norm.bias"] = TensorSpec((channels,), init="normal", std=0.05)
    layout[f"{name}.norm.running_mean"] = TensorSpec((channels,), init="normal", std=0.05)
    layout[f"{name}.norm.running_var"] = TensorSpec((channels,), init="uniform", low=0.8, high=1.2)
    layout[f"{name}.norm.num_batches_tracked"] = TensorSpec(
        (), init="fixed", value=lambda: torch.tensor(0, dtype=torch.long)
    )


def _tdnn(layout: Layout, name: str, out_ch: int, in_ch: int, k: int) -> None:
    """speechbrain TDNNBlock: `<name>.conv.conv.*` (Conv1d wrapper) + `<name>.norm.norm.*`."""
    _plain_conv(layout, f"{name}.conv.conv", out_ch, in_ch, k)
    _batch_norm(layout, f"{name}.norm", out_ch)


def ecapa_layout(n_mels: int, embedding_dim: int, prefix: str = "speaker_encoder.") -> Layout:
    """The ECAPA-TDNN entries (speechbrain names), channels [512, 512, 512, 512, 1536]."""
    out: Layout = {}
    c = _ECAPA_CHANNELS
    _tdnn(out, f"{prefix}blocks.0", c, n_mels, _ECAPA_KERNEL0)
    width = c // _ECAPA_SCALE
    for b in (1, 2, 3):
        block = f"{prefix}blocks.{b}"
        _tdnn(out, f"{block}.tdnn1", c, c, 1)
        for r in range(_ECAPA_SCALE - 1):
            _tdnn(out, f"{block}.res2net_block.blocks.{r}", width, width, _ECAPA_RES2NET_KERNEL)
        _tdnn(out, f"{block}.tdnn2", c, c, 1)
        _plain_conv(out, f"{block}.se_block.conv1.conv", _ECAPA_SE, c, 1)
        _plain_conv(out, f"{block}.se_block.conv2.conv", c, _ECAPA_SE, 1)
    _tdnn(out, f"{prefix}mfa", _ECAPA_MFA, 3 * c, 1)
    _tdnn(out, f"{prefix}asp.tdnn", _ECAPA_ATTENTION, 3 * _ECAPA_MFA, 1)
    _plain_conv(out, f"{prefix}asp.conv.conv", _ECAPA_MFA, _ECAPA_ATTENTION, 1)
    _batch_norm(out, f"{prefix}asp_bn", 2 * _ECAPA_MFA)
    _plain_conv(out, f"{prefix}fc.conv", embedding_dim, 2 * _ECAPA_MFA, 1, _FC_STD_SCALE)
    return out


def bigvgan_layout(cfg: BigVGANConfig) -> Layout:
    """Every entry of bigvgan_generator.pth["generator"] for this config, with shapes and preset init rules."""
    out: Layout = {}
    ch0 = cfg.upsample_initial_channel
    spk = cfg.speaker_embedding_dim
    _weight_normed(out, "conv_pre", (ch0, cfg.gpt_dim, 7), ch0, _GAIN_PRE)
    for i, (rate, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        c_in, c_out = ch0 // 2**i, ch0 // 2 ** (i + 1)
        # ConvTranspose1d weight is [in, out, k] and weight norm's dim 0 is the INPUT channel.
        _weight_normed(out, f"ups.{i}.0", (c_in, c_out, k), c_out, math.sqrt(rate / 2))

    n_acts = 6 if cfg.resblock == "1" else 2
    for i in range(len(cfg.upsample_rates)):
        ch = ch0 // 2 ** (i + 1)
        for j, (k, _dil) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
            rb = f"resblocks.{i * len(cfg.resblock_kernel_sizes) + j}"
            if cfg.resblock == "1":
                for m in range(3):
                    _weight_normed(out, f"{rb}.convs1.{m}", (ch, ch, k), ch, _GAIN_RES1)
                for m in range(3):
                    _weight_normed(out, f"{rb}.convs2.{m}", (ch, ch, k), ch, _GAIN_RES1)
            else:
                for m in range(2):
                    _weight_normed(out, f"{rb}.convs.{m}", (ch, ch, k), ch, _GAIN_RES2)
            for a in range(n_acts):
                _anti_aliased_act(out, f"{rb}.activations.{a}", ch, cfg.activation, cfg.snake_logscale)

    ch_last = ch0 // 2 ** len(cfg.upsample_rates)
    _anti_aliased_act(out, "activation_post", ch_last, cfg.activation, cfg.snake_logscale)
    _weight_normed(out, "conv_post", (1, ch_last, 7), 1, _GAIN_POST)

    out.update(ecapa_layout(cfg.num_mels, spk))
    _plain_conv(out, "cond_layer", ch0, spk, 1, _COND_STD_SCALE)
    if cfg.cond_d_vector_in_each_upsampling_layer:
        for i in range(len(cfg.upsample_rates)):
            _plain_conv(out, f"conds.{i}", ch0 // 2 ** (i + 1), spk, 1, _COND_STD_SCALE)
    return out
