"""UnifiedVoice: IndexTTS 1.x's conditioning encoder + GPT-2 mel-code decoder, with the official key names.

The original wraps HF's GPT2Model inside a `generate()`-driven inference model. Here the pieces are explicit:
`prefix_embeds` (conds | text) for the prefill, `mel_embeds` for each decode step, `decode` for the transformer
with a KV cache, `mel_logits` / `latents` for the two heads. Batches are LEFT-padded with a key mask so that every
row computes exactly what it computes alone (upstream pads text on the right without a mask instead, which
changes the result of short rows; see docs in engine_ref/generate.py).
"""

from __future__ import annotations

import torch
from torch import nn

from engine_ref.modules.configs import GPTConfig
from engine_ref.modules.gpt2 import KV, GPT2Stack
from engine_ref.modules.perceiver import SpeechConditioner


class LearnedPositions(nn.Module):
    """A learned position table; the official key is `<name>.emb.weight`."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(rows, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.emb(positions)


class UnifiedVoice(SpeechConditioner):
    """Inherits `conditioning_encoder`/`perceiver_encoder` (top-level keys, as in gpt.pth) from SpeechConditioner."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.cfg = cfg
        d = cfg.model_dim
        self.text_embedding = nn.Embedding(cfg.text_vocab, d)
        self.mel_embedding = nn.Embedding(cfg.number_mel_codes, d)
        self.text_pos_embedding = LearnedPositions(cfg.text_positions, d)
        self.mel_pos_embedding = LearnedPositions(cfg.mel_positions, d)
        self.gpt = GPT2Stack(d, cfg.layers, cfg.heads)
        self.final_norm = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab)  # unused at inference, present in the checkpoint
        self.mel_head = nn.Linear(d, cfg.number_mel_codes)

    def conditioning(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Reference log-mel [B, 100, T] (+ frame counts) -> 32 conditioning latents [B, 32, D]."""
        return SpeechConditioner.forward(self, mel, mel_lengths)

    def forward(self, *args, **kwargs):  # the pipeline calls the named methods; forward is ambiguous here
        raise TypeError("call UnifiedVoice.conditioning / decode / mel_logits / latents")

    # --- embeddings ---------------------------------------------------------------------------------------------
    def text_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] text ids (already wrapped in start/stop) -> embeddings with positions 0..L-1."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.text_embedding(ids) + self.text_pos_embedding(pos).unsqueeze(0)

    def mel_embeds(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, T] mel codes at [B, T] (or [T]) mel positions -> embeddings."""
        return self.mel_embedding(codes) + self.mel_pos_embedding(positions)

    # --- transformer and heads ----------------------------------------------------------------------------------
    def decode(
        self, embeds: torch.Tensor, key_valid: torch.Tensor, past: list[KV] | None = None
    ) -> tuple[torch.Tensor, list[KV]]:
        return self.gpt(embeds, key_valid, past)

    def mel_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Upstream's lm_head = Sequential(final_norm, mel_head), applied after gpt.ln_f (two norms in series)."""
        return self.mel_head(self.final_norm(hidden))

    def latents(self, hidden: torch.Tensor) -> torch.Tensor:
        """What BigVGAN consumes: final_norm of the decoder output."""
        return self.final_norm(hidden)
