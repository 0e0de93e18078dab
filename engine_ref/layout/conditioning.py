"""Checkpoint layout of the speech conditioner in gpt.pth: `conditioning_encoder.*` and `perceiver_encoder.*`.

Written from the published key names and shapes of the official IndexTTS 1.x gpt.pth, independently of the
modules. Preset init: weights ~ N(0, 1/fan_in) so every projection keeps unit-scale activations, small random
biases (so masking bugs around biased convolutions show up), LayerNorms at identity, the position table as the
bf16-rounded sinusoid the official file stores, perceiver latents ~ N(0, 1) so the queries are distinct.
"""

from __future__ import annotations

import functools
import math

import torch

from engine_ref.modules.configs import ConditionModuleConfig, GPTConfig
from engine_ref.layout import Layout, TensorSpec

MEL_BINS = 100
POS_TABLE_ROWS = 5000
CONV_KERNEL = 15
PERCEIVER_DEPTH = 2
PERCEIVER_DIM_HEAD = 64
BIAS_STD = 0.02


def rounded_sinusoid(rows: int, dim: int) -> torch.Tensor:
    """[1, rows, dim] sin (even channels) / cos (odd) table, rounded through bfloat16 like the official file."""
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = pos * inv_freq
    table = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(rows, dim)
    return table.to(torch.bfloat16).to(torch.float32).unsqueeze(0)


def _linear(out: Layout, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = TensorSpec((n_out, n_in))
    if bias:
        out[f"{name}.bias"] = TensorSpec((n_out,), std=BIAS_STD)


def _conv1d(out: Layout, name: str, n_out: int, n_in_per_group: int, kernel: int) -> None:
    out[f"{name}.weight"] = TensorSpec((n_out, n_in_per_group, kernel))
    out[f"{name}.bias"] = TensorSpec((n_out,), std=BIAS_STD)


def _layer_norm(out: Layout, name: str, dim: int) -> None:
    out[f"{name}.weight"] = TensorSpec((dim,), init="ones")
    out[f"{name}.bias"] = TensorSpec((dim,), init="zeros")


def conformer_layout(cfg: GPTConfig, prefix: str = "conditioning_encoder.", mel_bins: int = MEL_BINS) -> Layout:
    """`conditioning_encoder.*`: conv2d2 subsampling, position table, Conformer blocks, after_norm."""
    return conformer_entries(cfg.condition_module, prefix, mel_bins)


def conformer_entries(cm: ConditionModuleConfig, prefix: str, input_size: int) -> Layout:
    """A Conformer encoder's entries under `prefix` for `input_size` input features (IndexTTS2 has two)."""
    d, units, heads = cm.output_size, cm.linear_units, cm.attention_heads
    out: Layout = {}
    out[f"{prefix}embed.conv.0.weight"] = TensorSpec((d, 1, 3, 3))
    out[f"{prefix}embed.conv.0.bias"] = TensorSpec((d,), std=BIAS_STD)
    _linear(out, f"{prefix}embed.out.0", d, d * ((input_size - 1) // 2))
    out[f"{prefix}embed.pos_enc.pe"] = TensorSpec(
        (1, POS_TABLE_ROWS, d), init="fixed", value=functools.partial(rounded_sinusoid, POS_TABLE_ROWS, d)
    )
    for i in range(cm.num_blocks):
        blk = f"{prefix}encoders.{i}."
        for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
            _linear(out, f"{blk}self_attn.{proj}", d, d)
        _linear(out, f"{blk}self_attn.linear_pos", d, d, bias=False)
        out[f"{blk}self_attn.pos_bias_u"] = TensorSpec((heads, d // heads))
        out[f"{blk}self_attn.pos_bias_v"] = TensorSpec((heads, d // heads))
        _linear(out, f"{blk}feed_forward.w_1", units, d)
        _linear(out, f"{blk}feed_forward.w_2", d, units)
        _conv1d(out, f"{blk}conv_module.pointwise_conv1", 2 * d, d, 1)
        _conv1d(out, f"{blk}conv_module.depthwise_conv", d, 1, CONV_KERNEL)
        _layer_norm(out, f"{blk}conv_module.norm", d)
        _conv1d(out, f"{blk}conv_module.pointwise_conv2", d, d, 1)
        for norm in ("norm_ff", "norm_mha", "norm_conv", "norm_final"):
            _layer_norm(out, f"{blk}{norm}", d)
    _layer_norm(out, f"{prefix}after_norm", d)
    return out


def perceiver_layout(cfg: GPTConfig, prefix: str = "perceiver_encoder.") -> Layout:
    """`perceiver_encoder.*`: latents, optional proj_context, 2 x (attention, GEGLU FFN), final norm gamma."""
    cm = cfg.condition_module
    return perceiver_entries(
        prefix, cfg.model_dim, cm.output_size, cm.attention_heads, cm.perceiver_mult, cfg.condition_num_latent
    )


def perceiver_entries(prefix: str, dim: int, ctx: int, heads: int, ff_mult: int, num_latents: int) -> Layout:
    """A perceiver resampler's entries under `prefix` (width `dim`, context width `ctx`)."""
    inner = heads * PERCEIVER_DIM_HEAD
    ff_inner = int(dim * ff_mult * 2 / 3)
    out: Layout = {f"{prefix}latents": TensorSpec((num_latents, dim), std=1.0)}
    if ctx != dim:  # an identity (no weights) when the widths agree
        _linear(out, f"{prefix}proj_context", dim, ctx)
    for i in range(PERCEIVER_DEPTH):
        layer = f"{prefix}layers.{i}."
        _linear(out, f"{layer}0.to_q", inner, dim, bias=False)
        _linear(out, f"{layer}0.to_kv", 2 * inner, dim, bias=False)
        _linear(out, f"{layer}0.to_out", dim, inner, bias=False)
        _linear(out, f"{layer}1.0", 2 * ff_inner, dim)
        _linear(out, f"{layer}1.2", dim, ff_inner)
    out[f"{prefix}norm.gamma"] = TensorSpec((dim,), init="ones")
    return out


def conditioning_layout(cfg: GPTConfig) -> Layout:
    """Every gpt.pth entry of the speech conditioner, with the official names and shapes."""
    return {**conformer_layout(cfg), **perceiver_layout(cfg)}
