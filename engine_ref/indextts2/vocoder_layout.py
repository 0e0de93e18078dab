"""Published layout of nvidia/bigvgan_v2_22khz_80band_256x's bigvgan_generator.pt (``{"generator": sd}``).

Written from the hub checkpoint's key names and the shapes its config.json implies, independently of the
nn.Module in `engine_ref.indextts2.vocoder`: presets write checkpoints from this table and the tests load
them strictly into the module, so a name or shape drifting on either side fails loudly.

The hub file stores old-style weight norm on every conv: ``weight_g`` [C0, 1, 1] (C0 = dim 0 of the weight:
out channels for Conv1d, IN channels for ConvTranspose1d) + ``weight_v`` + ``bias``. conv_post has no bias
when ``use_bias_at_final`` is false (the released config). Every anti-aliased activation stores its two
[1, 1, 12] Kaiser-sinc filters. There is no speaker conditioning and no ECAPA encoder (unlike IndexTTS 1.x).

Preset init rules (random weights that still give audible, mostly unclipped output for log-mel input, whose
values sit around -11..2 with a large negative mean): conv_pre's per-channel norm is 0.15 so the mel's DC
offset does not dominate; upsamplers sqrt(rate / 2), residual branches 0.3 and conv_post 0.1 as in the 1.x
preset (`engine_ref.layout.bigvgan`), whose helpers and Snake/bias spreads are reused here.
Measured (seeds 0-2, synthetic log-mel): tiny (128 ch) pre-clamp RMS 0.08-0.11, peak <= 0.41; release size
RMS 0.09-0.14, peak <= 0.40 (nothing clipped).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from engine_ref.layout import Layout, TensorSpec
from engine_ref.layout.bigvgan import _anti_aliased_act, _weight_normed

if TYPE_CHECKING:  # the layout reads config attributes only; it never touches the module
    from engine_ref.indextts2.vocoder import BigVGANv2Config

# Preset gains (see module docstring); measured on random log-mel-like input for the tiny and real sizes.
_GAIN_PRE = 0.15
_GAIN_RES = 0.3
_GAIN_POST = 0.1


def _fold_names(layout: Layout) -> Layout:
    """The same table after weight-norm folding: each ``X.weight_g``/``X.weight_v`` pair becomes ``X.weight``."""
    out: Layout = {}
    for name, spec in layout.items():
        if name.endswith(".weight_g"):
            continue
        if name.endswith(".weight_v"):
            out[name[: -len("_v")]] = TensorSpec(spec.shape)
            continue
        out[name] = spec
    return out


def bigvgan_v2_layout(cfg: BigVGANv2Config, weight_norm: bool = True) -> Layout:
    """Every entry of bigvgan_generator.pt["generator"] for this config, with shapes and preset init rules.

    weight_norm=False gives the folded table (plain ``weight`` per conv), i.e. the state dict left after the
    original's ``remove_weight_norm()`` and the one the module's ``state_dict()`` has.
    """
    out: Layout = {}
    ch0 = cfg.upsample_initial_channel
    _weight_normed(out, "conv_pre", (ch0, cfg.num_mels, 7), ch0, _GAIN_PRE)
    for i, (rate, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        c_in, c_out = ch0 // 2**i, ch0 // 2 ** (i + 1)
        # ConvTranspose1d weight is [in, out, k]; weight norm's dim 0 is its INPUT channel.
        _weight_normed(out, f"ups.{i}.0", (c_in, c_out, k), c_out, math.sqrt(rate / 2))

    n_kernels = len(cfg.resblock_kernel_sizes)
    for i in range(len(cfg.upsample_rates)):
        ch = ch0 // 2 ** (i + 1)
        for j, (k, dilations) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
            rb = f"resblocks.{i * n_kernels + j}"
            for m in range(len(dilations)):
                _weight_normed(out, f"{rb}.convs1.{m}", (ch, ch, k), ch, _GAIN_RES)
            for m in range(len(dilations)):
                _weight_normed(out, f"{rb}.convs2.{m}", (ch, ch, k), ch, _GAIN_RES)
            for a in range(2 * len(dilations)):
                _anti_aliased_act(out, f"{rb}.activations.{a}", ch, cfg.activation, cfg.snake_logscale)

    ch_last = ch0 // 2 ** len(cfg.upsample_rates)
    _anti_aliased_act(out, "activation_post", ch_last, cfg.activation, cfg.snake_logscale)
    _weight_normed(out, "conv_post", (1, ch_last, 7), 1 if cfg.use_bias_at_final else None, _GAIN_POST)
    return out if weight_norm else _fold_names(out)
