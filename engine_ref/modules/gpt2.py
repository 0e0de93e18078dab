"""GPT-2 decoder stack with an explicit KV cache, laid out like Hugging Face's GPT2Model.

IndexTTS builds its decoder with `transformers.GPT2Model` and then deletes the token and position embeddings
(positions come from its own learned tables). We re-implement the blocks so that the official `gpt.h.*` and
`gpt.ln_f` tensors load unchanged (HF "Conv1D" layout: weight is [in, out]) without depending on transformers,
and so that the same functional forward (past K/V in, present K/V out) serves eager decoding and ONNX export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# HF GPT2Config's default layer_norm_epsilon.
LAYER_NORM_EPS = 1e-5

KV = tuple[torch.Tensor, torch.Tensor]


class Conv1D(nn.Module):
    """Affine map with the weight stored [in, out] (HF's GPT-2 "Conv1D"), so checkpoints load untransposed."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim)

    def forward(self, x: torch.Tensor, past: KV | None, bias: torch.Tensor) -> tuple[torch.Tensor, KV]:
        """x: [B, T, D]; past: ([B, H, P, hd], [B, H, P, hd]) or None; bias: additive mask [B, 1, T, P + T]."""
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + bias
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, d)
        return self.c_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = Conv1D(dim, 4 * dim)
        self.c_proj = Conv1D(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, past: KV | None, bias: torch.Tensor) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), past, bias)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def attention_bias(key_valid: torch.Tensor, num_new: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention bias [B, 1, T, S] for T new queries over S = P + T keys.

    key_valid [B, S] marks real (non-padding) positions. Query i (absolute position P + i) may see key j when
    j <= P + i and key j is valid. Using a large negative number instead of -inf keeps fully padded query rows
    finite (their outputs are never used) — the same trick HF uses.
    """
    s = key_valid.shape[1]
    p = s - num_new
    q_pos = torch.arange(num_new, device=key_valid.device).unsqueeze(1) + p
    k_pos = torch.arange(s, device=key_valid.device).unsqueeze(0)
    allowed = (k_pos <= q_pos).unsqueeze(0) & key_valid.bool().unsqueeze(1)  # [B, T, S]
    neg = torch.finfo(dtype).min
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), neg, dtype=dtype)).unsqueeze(1)


class GPT2Stack(nn.Module):
    """`gpt.h.{i}` blocks and `gpt.ln_f`; no token/position embeddings (the caller supplies embeddings)."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.h = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(
        self, embeds: torch.Tensor, key_valid: torch.Tensor, past: list[KV] | None = None
    ) -> tuple[torch.Tensor, list[KV]]:
        """embeds [B, T, D]; key_valid [B, P + T] (past and new positions); past: one (K, V) per layer or None.

        Returns the hidden states after ln_f and the present K/V of every layer (past + new).
        """
        bias = attention_bias(key_valid, embeds.shape[1], embeds.dtype)
        x = embeds
        presents: list[KV] = []
        for i, block in enumerate(self.h):
            x, kv = block(x, None if past is None else past[i], bias)
            presents.append(kv)
        return self.ln_f(x), presents
