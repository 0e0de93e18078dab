"""The CFM estimator: IndexTTS2's DiT (gpt-fast transformer with AdaLN-RMSNorm) + WaveNet final layer.

Numerics follow upstream (index-tts 41577b8, s2mel/modules/{diffusion_transformer,gpt_fast/model,wavenet}.py):
- time embedding: args = (1000 * t) * freqs (stored buffer), features cos(args) ‖ sin(args), Linear-SiLU-Linear;
- AdaLN: weight, bias = split(project_layer(c)); weight * RMSNorm(x) + bias (RMSNorm eps 1e-5, in float32);
- RoPE base 10000 on INTERLEAVED pairs (x[2i], x[2i+1]), positions = the stored ``input_pos`` buffer;
- non-causal SDPA with a boolean key mask from ``x_lens``; SwiGLU w2(silu(w1 x) * w3 x);
- UViT: blocks i < depth // 2 push their output, blocks i > depth // 2 pop (LIFO) and merge it first through
  skip_in_linear(x ‖ skip); the middle block does neither;
- after the final AdaLN norm: skip_linear(x ‖ noisy mel) -> conv1 -> WaveNet(cond = t_embedder2(t)) +
  res_projection -> FinalLayer (LayerNorm without affine, eps 1e-6; x * (1 + scale) + shift, SHIFT first) -> conv2.

Length limit: upstream's RoPE table comes from setup_caches(max_seq_length=8192), so it fails beyond 8192 frames
(~95 s); here cos/sin are computed per call for the stored positions, which allows up to 16384 (input_pos rows)
and gives identical values below 8192.

Batch-correct: per-row ``t`` and ``x_lens``; the only cross-frame operations (attention, WaveNet convs) see each
row's own length, so a padded row gives its solo output on its valid frames. Unused-but-stored layers
(x_embedder, cond_embedder, content_mask_embedder) exist only so the official file loads strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine_ref.indextts2.s2mel.config import POSITION_TABLE, TIME_FREQ_DIM, S2MelConfig
from engine_ref.indextts2.s2mel.wavenet import WaveNet

ROPE_BASE = 10000
RMS_EPS = 1e-5
FINAL_LN_EPS = 1e-6
TIME_SCALE = 1000
TIME_MAX_PERIOD = 10000


class TimestepEmbedder(nn.Module):
    """Scalar t -> vector: sinusoid features (cos first) of 1000 * t, then an MLP."""

    def __init__(self, hidden: int, freq_dim: int = TIME_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        half = freq_dim // 2
        freqs = torch.exp(-math.log(TIME_MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs)  # stored in the checkpoint; the loaded values are used

    def features(self, t: torch.Tensor) -> torch.Tensor:
        args = TIME_SCALE * t[:, None].float() * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x)
        return normed * self.weight


class AdaptiveRMSNorm(nn.Module):
    """AdaptiveLayerNorm of gpt-fast: the condition predicts a per-channel scale and offset (no 1 + scale)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.project_layer = nn.Linear(dim, 2 * dim)
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        weight, bias = torch.split(self.project_layer(c), self.dim, dim=-1)
        return weight * self.norm(x) + bias


def rope_inverse_frequencies(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """1 / base^(2i / head_dim), i = 0..head_dim/2 - 1 (gpt-fast precompute_freqs_cis)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T] positions -> cos, sin of shape [T, head_dim / 2] (float32)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.cos(angles), torch.sin(angles)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., 2i], x[..., 2i+1]) of x [B, T, H, D] by the angle of (position, i)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    rotated = torch.stack([even * c - odd * s, odd * c + even * s], dim=-1)
    return rotated.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.wqkv(x).split([d, d, d], dim=-1)
        q = apply_interleaved_rope(q.view(b, t, self.heads, self.head_dim), cos, sin)
        k = apply_interleaved_rope(k.view(b, t, self.heads, self.head_dim), cos, sin)
        v = v.view(b, t, self.heads, self.head_dim)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, uvit_skip: bool):
        super().__init__()
        self.attention = Attention(dim, heads)
        self.feed_forward = FeedForward(dim, ffn_dim)
        self.ffn_norm = AdaptiveRMSNorm(dim)
        self.attention_norm = AdaptiveRMSNorm(dim)
        self.skip_in_linear = nn.Linear(2 * dim, dim) if uvit_skip else None

    def forward(self, x, c, cos, sin, key_mask, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = self.skip_in_linear(torch.cat([x, skip], dim=-1))
        h = x + self.attention(self.attention_norm(x, c), cos, sin, key_mask)
        return h + self.feed_forward(self.ffn_norm(h, c))


class DiTTransformer(nn.Module):
    """gpt-fast Transformer without KV cache: the blocks, UViT skips and the final AdaLN norm."""

    def __init__(self, dim: int, heads: int, depth: int, ffn_dim: int, uvit_skip: bool):
        super().__init__()
        self.layers = nn.ModuleList(DiTBlock(dim, heads, ffn_dim, uvit_skip) for _ in range(depth))
        self.norm = AdaptiveRMSNorm(dim)
        self.uvit_skip = uvit_skip
        self.emit_skip = frozenset(i for i in range(depth) if i < depth // 2) if uvit_skip else frozenset()
        self.receive_skip = frozenset(i for i in range(depth) if i > depth // 2) if uvit_skip else frozenset()
        self.register_buffer("rope_inv_freq", rope_inverse_frequencies(dim // heads), persistent=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(positions, self.rope_inv_freq)
        skips: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            skip = skips.pop() if i in self.receive_skip else None
            x = layer(x, c, cos, sin, key_mask, skip)
            if i in self.emit_skip:
                skips.append(x)
        return self.norm(x, c)


class WeightNormLinearSlot(nn.Linear):
    """A Linear stored with old-style weight norm in the file (``weight_g``/``weight_v``), folded at load."""


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.hidden = hidden
        self.linear = WeightNormLinearSlot(hidden, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        normed = F.layer_norm(x, (self.hidden,), eps=FINAL_LN_EPS)
        return self.linear(normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))


def frame_mask(x_lens: torch.Tensor, frames: int) -> torch.Tensor:
    """[B] lengths -> [B, T] bool, True on valid frames (commons.sequence_mask)."""
    return torch.arange(frames, device=x_lens.device, dtype=x_lens.dtype).unsqueeze(0) < x_lens.unsqueeze(1)


class DiT(nn.Module):
    """The estimator: velocity v(x, t | prompt mel, style, content) for every frame.

    forward(x [B, mels, T], prompt_x [B, mels, T], x_lens [B] int, t [B], style [B, style_dim], cond [B, T, content])
    -> [B, mels, T]. Same argument order as upstream's DiT.forward.
    """

    def __init__(self, cfg: S2MelConfig):
        super().__init__()
        dit, wn = cfg.DiT, cfg.wavenet
        d, mels = dit.hidden_dim, dit.in_channels
        self.style_condition = dit.style_condition
        self.long_skip_connection = dit.long_skip_connection
        self.transformer = DiTTransformer(d, dit.num_heads, dit.depth, dit.ffn_dim, dit.uvit_skip_connection)
        self.x_embedder = WeightNormLinearSlot(mels, d)  # stored, never run
        self.cond_embedder = nn.Embedding(dit.content_codebook_size, d)  # stored, never run
        self.cond_projection = nn.Linear(dit.content_dim, d)
        self.t_embedder = TimestepEmbedder(d)
        self.register_buffer("input_pos", torch.arange(POSITION_TABLE))
        self.t_embedder2 = TimestepEmbedder(wn.hidden_dim)
        self.conv1 = nn.Linear(d, wn.hidden_dim)
        self.conv2 = nn.Conv1d(wn.hidden_dim, mels, 1)
        self.wavenet = WaveNet(wn.hidden_dim, wn.kernel_size, wn.dilation_rate, wn.num_layers, wn.hidden_dim)
        self.final_layer = FinalLayer(wn.hidden_dim, wn.hidden_dim)
        self.res_projection = nn.Linear(d, wn.hidden_dim)
        self.content_mask_embedder = nn.Embedding(1, d)  # stored, never run
        self.skip_linear = nn.Linear(d + mels, d)
        style = cfg.style_encoder.dim if dit.style_condition else 0
        self.cond_x_merge_linear = nn.Linear(d + 2 * mels + style, d)

    @property
    def max_frames(self) -> int:
        return int(self.input_pos.shape[0])

    def forward(
        self,
        x: torch.Tensor,
        prompt_x: torch.Tensor,
        x_lens: torch.Tensor,
        t: torch.Tensor,
        style: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        frames = x.shape[2]
        t1 = self.t_embedder(t)
        content = self.cond_projection(cond)
        x_t = x.transpose(1, 2)
        parts = [x_t, prompt_x.transpose(1, 2), content]
        if self.style_condition:
            parts.append(style[:, None, :].expand(-1, frames, -1))
        x_in = self.cond_x_merge_linear(torch.cat(parts, dim=-1))
        valid = frame_mask(x_lens, frames)
        key_mask = valid[:, None, None, :]  # [B, 1, 1, T]: every query attends to the row's valid keys
        x_res = self.transformer(x_in, t1.unsqueeze(1), self.input_pos[:frames], key_mask)
        if self.long_skip_connection:
            x_res = self.skip_linear(torch.cat([x_res, x_t], dim=-1))
        h = self.conv1(x_res).transpose(1, 2)
        t2 = self.t_embedder2(t)
        h = self.wavenet(h, valid.unsqueeze(1), x_lens, t2.unsqueeze(2)).transpose(1, 2) + self.res_projection(x_res)
        h = self.final_layer(h, t1).transpose(1, 2)
        return self.conv2(h)
