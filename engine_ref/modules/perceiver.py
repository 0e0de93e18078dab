"""Perceiver resampler (``perceiver_encoder.*``) and the whole speech conditioner of IndexTTS 1.x.

The resampler turns a variable number of Conformer frames into a fixed set of latents (32 x model_dim) that
prefix the GPT input. Details that matter for parity with the official weights:
- the latents attend to cat(latents, context), so the key mask carries one leading True per latent;
- attention and feed-forward have NO pre-norm; residuals add the raw sub-layer output;
- the feed-forward is GEGLU: Linear(dim, 2*inner) -> first half * gelu(second half) (exact erf GELU) -> Linear,
  with inner = int(dim * ff_mult * 2 / 3);
- the final norm is L2-normalize * sqrt(dim) * gamma (no mean subtraction, no epsilon inside the root);
- proj_context is an identity with no weights when the Conformer width equals model_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_ref.modules.configs import GPTConfig
from engine_ref.errors import InputError
from engine_ref.modules.conformer import ConformerEncoder

PERCEIVER_DEPTH = 2  # fixed upstream
PERCEIVER_DIM_HEAD = 64  # fixed upstream


class LatentAttention(nn.Module):
    """Latents (queries) attend to themselves plus the context; bias-free projections."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.size(0), -1, self.heads, self.dim_head).transpose(1, 2)  # [B, H, N, dh]

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """latents [B, L, dim], context [B, T, dim], key_mask [B, L + T] (True = attend) -> [B, L, dim]."""
        q = self._split(self.to_q(latents))
        k, v = self.to_kv(torch.cat([latents, context], dim=1)).chunk(2, dim=-1)
        k, v = self._split(k), self._split(v)
        sim = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if key_mask is not None:
            sim = sim.masked_fill(~key_mask[:, None, None, :], torch.finfo(sim.dtype).min)
        out = torch.matmul(torch.softmax(sim, dim=-1), v).transpose(1, 2)
        return self.to_out(out.reshape(out.size(0), -1, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """value * gelu(gate), value = first half of the last axis, gate = second half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * value


def geglu_feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Indices 0 and 2 hold the weights (keys `.0.*`, `.2.*` as in the checkpoint)."""
    inner = int(dim * mult * 2 / 3)
    return nn.Sequential(nn.Linear(dim, 2 * inner), GEGLU(), nn.Linear(inner, dim))


class ScaledL2Norm(nn.Module):
    """x / ||x|| * sqrt(dim) * gamma: the resampler's final 'RMSNorm' exactly as trained."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class PerceiverResampler(nn.Module):
    """Context [B, T, dim_context] -> num_latents learned queries refined by `depth` attention+GEGLU layers."""

    def __init__(
        self,
        dim: int,
        dim_context: int,
        ff_mult: int,
        heads: int,
        num_latents: int = 32,
        dim_head: int = PERCEIVER_DIM_HEAD,
        depth: int = PERCEIVER_DEPTH,
    ):
        super().__init__()
        self.num_latents = num_latents
        self.proj_context = nn.Linear(dim_context, dim) if dim_context != dim else nn.Identity()
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([LatentAttention(dim, heads, dim_head), geglu_feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = ScaledL2Norm(dim)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """context [B, T, dim_context], mask [B, num_latents + T] bool (True = attend) -> [B, num_latents, dim]."""
        context = self.proj_context(context)
        x = self.latents.unsqueeze(0).expand(context.size(0), -1, -1)
        for attn, ff in self.layers:
            x = attn(x, context, mask) + x
            x = ff(x) + x
        return self.norm(x)


class SpeechConditioner(nn.Module):
    """Reference log-mel -> conditioning latents (UnifiedVoice.get_conditioning, condition_type conformer_perceiver).

    Owns `conditioning_encoder` and `perceiver_encoder` so its state-dict keys are exactly the official ones
    (load it from the gpt.pth entries with those two prefixes).
    """

    def __init__(self, cfg: GPTConfig, mel_bins: int = 100):
        super().__init__()
        cm = cfg.condition_module
        self.num_latents = cfg.condition_num_latent
        self.conditioning_encoder = ConformerEncoder(cm, input_size=mel_bins)
        self.perceiver_encoder = PerceiverResampler(
            cfg.model_dim,
            dim_context=cm.output_size,
            ff_mult=cm.perceiver_mult,
            heads=cm.attention_heads,
            num_latents=cfg.condition_num_latent,
        )

    @property
    def max_mel_frames(self) -> int:
        """Longest reference (mel frames) the encoder accepts; callers trim to at most this."""
        return self.conditioning_encoder.max_mel_frames

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """mel [B, bins, T] (padded), lengths [B] mel frames -> conds [B, num_latents, model_dim].

        Upstream v1.5 passes the reference's full frame count (mel.shape[-1]) as the length.
        """
        bins = self.conditioning_encoder.input_size
        if mel.dim() != 3 or mel.size(1) != bins:
            raise InputError(
                f"reference mel must be [batch, {bins}, frames], got {tuple(mel.shape)}",
                f"pass the {bins}-bin log-mel with time on the last axis",
            )
        hidden, mask = self.conditioning_encoder(mel.transpose(1, 2), lengths)
        latent_keys = torch.ones(mask.size(0), self.num_latents, dtype=torch.bool, device=mask.device)
        return self.perceiver_encoder(hidden, torch.cat([latent_keys, mask.squeeze(1)], dim=1))
