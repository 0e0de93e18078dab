"""Official key names and shapes of gpt.pth (UnifiedVoice), from the published checkpoint layout.

The decoder part is written here; the conditioning part (conformer + perceiver) lives in
`engine_ref.layout.conditioning`. Init rules give a random model that behaves like a speech decoder in the ways
the pipeline depends on: it never stops at the first step, and it does stop after roughly `target_codes` codes
(a ramp along one direction of the mel position table that the stop row of mel_head reads).
"""

from __future__ import annotations

import math

import torch

from engine_ref.modules.configs import GPTConfig
from engine_ref.layout import Layout, TensorSpec
from engine_ref.layout.conditioning import conditioning_layout

EMBED_STD = 0.02  # GPT-2's initializer_range


def _stop_direction(dim: int) -> torch.Tensor:
    """A fixed zero-mean unit vector (LayerNorm removes the mean, so the direction must have none)."""
    u = torch.cos(torch.arange(dim, dtype=torch.float64) * 2.3 + 0.7)
    u = u - u.mean()
    return (u / u.norm()).float()


def _mel_positions(cfg: GPTConfig, target_codes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 101)
    table = torch.randn(cfg.mel_positions, cfg.model_dim, generator=g) * EMBED_STD
    # Noise norm of a position row is ~EMBED_STD * sqrt(dim); the ramp dominates it within a few codes of target.
    amplitude = 6 * EMBED_STD * math.sqrt(cfg.model_dim)
    ramp = (torch.arange(cfg.mel_positions, dtype=torch.float32) - target_codes) / max(target_codes, 1)
    return table + amplitude * ramp.clamp(-1, 3).unsqueeze(1) * _stop_direction(cfg.model_dim)


def _mel_head_weight(cfg: GPTConfig, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 202)
    w = torch.randn(cfg.number_mel_codes, cfg.model_dim, generator=g) * EMBED_STD
    # After final_norm a hidden row has norm ~sqrt(dim): ordinary logits spread ~EMBED_STD * sqrt(dim); the stop
    # logit swings +/- 0.4 * sqrt(dim) with the ramp, far beyond the largest ordinary logit either way.
    w[cfg.stop_mel_token] = 0.4 * _stop_direction(cfg.model_dim)
    return w


def decoder_layout(cfg: GPTConfig, target_codes: int = 40, seed: int = 0) -> Layout:
    """Everything in gpt.pth except the conditioning encoder and perceiver."""
    d = cfg.model_dim
    proj_std = EMBED_STD / math.sqrt(2 * cfg.layers)  # GPT-2's scaled init of residual projections
    out: Layout = {
        "text_embedding.weight": TensorSpec((cfg.text_vocab, d), std=EMBED_STD),
        "mel_embedding.weight": TensorSpec((cfg.number_mel_codes, d), std=EMBED_STD),
        "text_pos_embedding.emb.weight": TensorSpec((cfg.text_positions, d), std=EMBED_STD),
        "mel_pos_embedding.emb.weight": TensorSpec(
            (cfg.mel_positions, d), "fixed", value=lambda: _mel_positions(cfg, target_codes, seed)
        ),
    }
    for i in range(cfg.layers):
        p = f"gpt.h.{i}."
        out |= {
            p + "ln_1.weight": TensorSpec((d,), "ones"),
            p + "ln_1.bias": TensorSpec((d,), "zeros"),
            p + "attn.c_attn.weight": TensorSpec((d, 3 * d), std=EMBED_STD),
            p + "attn.c_attn.bias": TensorSpec((3 * d,), "zeros"),
            p + "attn.c_proj.weight": TensorSpec((d, d), std=proj_std),
            p + "attn.c_proj.bias": TensorSpec((d,), "zeros"),
            p + "ln_2.weight": TensorSpec((d,), "ones"),
            p + "ln_2.bias": TensorSpec((d,), "zeros"),
            p + "mlp.c_fc.weight": TensorSpec((d, 4 * d), std=EMBED_STD),
            p + "mlp.c_fc.bias": TensorSpec((4 * d,), "zeros"),
            p + "mlp.c_proj.weight": TensorSpec((4 * d, d), std=proj_std),
            p + "mlp.c_proj.bias": TensorSpec((d,), "zeros"),
        }
    out |= {
        "gpt.ln_f.weight": TensorSpec((d,), "ones"),
        "gpt.ln_f.bias": TensorSpec((d,), "zeros"),
        "final_norm.weight": TensorSpec((d,), "ones"),
        "final_norm.bias": TensorSpec((d,), "zeros"),
        "text_head.weight": TensorSpec((cfg.text_vocab, d), std=EMBED_STD),
        "text_head.bias": TensorSpec((cfg.text_vocab,), "zeros"),
        "mel_head.weight": TensorSpec((cfg.number_mel_codes, d), "fixed", value=lambda: _mel_head_weight(cfg, seed)),
        "mel_head.bias": TensorSpec((cfg.number_mel_codes,), "zeros"),
    }
    return out


def gpt_layout(cfg: GPTConfig, target_codes: int = 40, seed: int = 0) -> Layout:
    """The complete gpt.pth layout: conditioning encoder, perceiver and decoder."""
    return conditioning_layout(cfg) | decoder_layout(cfg, target_codes, seed)
