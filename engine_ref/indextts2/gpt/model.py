"""UnifiedVoiceV2: IndexTTS2's GPT (speaker + emotion conditioners, GPT-2 decoder), with the official key names.

Built from the shared pieces: the 1.x Conformer and perceiver (v2 feeds them 1024-d w2v-bert features instead of a
log-mel), the GPT-2 stack with its KV cache, 1.x's learned position tables. It exposes the same interface as 1.x's
UnifiedVoice (`cfg`, `text_embeds`, `mel_embeds`, `decode`, `mel_logits`, `latents`), so the shared generation,
beam search and latent-pass code drives it unchanged; what is new is how the conditioning rows are made:

    emovec(x)   = emo_layer(emovec_layer(emo_perceiver(emo_conformer(x))))            [B, D]
    emovec      = base + alpha * (emo - base)      base from the speaker's features, emo from the emotion's
    conds       = (speaker latents [B, 32, D] + emovec) | speed_emb[1] | speed_emb[0]  [B, 34, D]

Upstream's length quirk (facts §2/§6): the Conformers are given `features.shape[-1]` — the FEATURE width, 1024 —
as the frame count. Frames at or beyond index 1024 (a reference over 20.48 s at 50 frames/s) are therefore masked,
and shorter references are all valid. `upstream_lengths` reproduces that and is the default; callers may pass
true lengths instead (what the TensorRT backend does; equal output up to 1024 frames). Masked frames then also
reproduce upstream's conv-module behaviour (glu(bias) of a padded frame reaches the depthwise conv).
"""

from __future__ import annotations

import torch
from torch import nn

from engine_ref.errors import InputError
from engine_ref.indextts2.gpt.config import GPTv2Config
from engine_ref.modules.conformer import ConformerEncoder
from engine_ref.modules.gpt2 import KV, GPT2Stack
from engine_ref.modules.perceiver import PerceiverResampler
from engine_ref.modules.unified_voice import LearnedPositions

EMO_LATENTS = 1
SPEED_CONTROL_ROW = 1  # "duration control" (upstream duration_emb_half / duration_ctrl), placed first
SPEED_FREE_ROW = 0  # "duration free", placed last


def upstream_lengths(features: torch.Tensor) -> torch.Tensor:
    """Frame counts upstream hands the Conformers: the feature width, i.e. min(width, T) valid frames per item."""
    frames = torch.full((features.shape[0],), features.shape[-1], dtype=torch.long, device=features.device)
    return frames.clamp(max=features.shape[1])


class UnifiedVoiceV2(nn.Module):
    """Holds every gpt.pth tensor under its official name; the methods are the inference steps."""

    def __init__(self, cfg: GPTv2Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.model_dim
        cm, em = cfg.condition_module, cfg.emo_condition_module
        # mask_after_glu=False: single-reference conditioning, reproduce upstream's padded frames exactly.
        self.conditioning_encoder = ConformerEncoder(cm, input_size=cfg.feature_dim, mask_after_glu=False)
        self.perceiver_encoder = PerceiverResampler(
            d, dim_context=cm.output_size, ff_mult=cm.perceiver_mult, heads=cm.attention_heads,
            num_latents=cfg.condition_num_latent,
        )
        self.emo_conditioning_encoder = ConformerEncoder(em, input_size=cfg.feature_dim, mask_after_glu=False)
        self.emo_perceiver_encoder = PerceiverResampler(
            cfg.emo_latent_dim, dim_context=em.output_size, ff_mult=em.perceiver_mult, heads=em.attention_heads,
            num_latents=EMO_LATENTS,
        )
        self.text_embedding = nn.Embedding(cfg.text_vocab, d)
        self.emo_layer = nn.Linear(d, d)
        self.emovec_layer = nn.Linear(cfg.emo_latent_dim, d)
        self.mel_embedding = nn.Embedding(cfg.number_mel_codes, d)
        self.gpt = GPT2Stack(d, cfg.layers, cfg.heads)
        self.mel_pos_embedding = LearnedPositions(cfg.mel_positions, d)
        self.text_pos_embedding = LearnedPositions(cfg.text_positions, d)
        self.final_norm = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab)  # unused at inference, present in the checkpoint
        self.mel_head = nn.Linear(d, cfg.number_mel_codes)
        self.speed_emb = nn.Embedding(2, d)

    def forward(self, *args, **kwargs):  # several inference steps; a single forward would be ambiguous
        raise TypeError("call UnifiedVoiceV2.speaker_latents / get_emovec / conditioning_rows / decode / ...")

    # --- conditioning -------------------------------------------------------------------------------------------
    def _check_features(self, features: torch.Tensor, what: str) -> None:
        width = self.cfg.feature_dim
        if features.dim() != 3 or features.shape[-1] != width or not features.is_floating_point():
            raise InputError(
                f"{what} features must be a float tensor [batch, frames, {width}], got "
                f"{features.dtype} {tuple(features.shape)}",
                f"pass the normalised w2v-bert layer-17 features ({width} wide) with time on axis 1",
            )

    def _encode(
        self, encoder: ConformerEncoder, perceiver: PerceiverResampler, features: torch.Tensor,
        lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        lengths = upstream_lengths(features) if lengths is None else lengths
        hidden, mask = encoder(features, lengths)
        latent_keys = torch.ones(mask.shape[0], perceiver.num_latents, dtype=torch.bool, device=mask.device)
        return perceiver(hidden, torch.cat([latent_keys, mask.squeeze(1)], dim=1))

    def speaker_latents(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """spk_cond_emb [B, T, 1024] -> [B, 32, D] (upstream get_conditioning); lengths None = upstream quirk."""
        self._check_features(features, "speaker")
        return self._encode(self.conditioning_encoder, self.perceiver_encoder, features, lengths)

    def emotion_latent(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Emotion features [B, T, 1024] -> [B, emo_latent_dim] (upstream get_emo_conditioning)."""
        self._check_features(features, "emotion")
        return self._encode(self.emo_conditioning_encoder, self.emo_perceiver_encoder, features, lengths).squeeze(1)

    def get_emovec(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, 1024] -> emotion vector [B, D] = emo_layer(emovec_layer(emotion latent))."""
        return self.emo_layer(self.emovec_layer(self.emotion_latent(features, lengths)))

    def merge_emovec(
        self, speaker_features: torch.Tensor, emotion_features: torch.Tensor, alpha: float = 1.0,
        speaker_lengths: torch.Tensor | None = None, emotion_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """base + alpha * (emo - base), evaluated in that order (alpha 1 is not bit-identical to emo)."""
        emo = self.get_emovec(emotion_features, emotion_lengths)
        base = self.get_emovec(speaker_features, speaker_lengths)
        return base + alpha * (emo - base)

    def conditioning_rows(self, speaker_latents: torch.Tensor, emovec: torch.Tensor) -> torch.Tensor:
        """[B, 32, D] latents + [B, D] emovec -> conds [B, 34, D]: latents + emovec, speed_emb[1], speed_emb[0]."""
        b = speaker_latents.shape[0]
        idx = torch.zeros(b, dtype=torch.long, device=speaker_latents.device)
        control = self.speed_emb(idx + SPEED_CONTROL_ROW).unsqueeze(1)
        free = self.speed_emb(idx + SPEED_FREE_ROW).unsqueeze(1)
        return torch.cat([speaker_latents + emovec.unsqueeze(1), control, free], dim=1)

    # --- embeddings, transformer, heads (the interface the shared decoding code uses) ------------------------------
    def text_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] text ids (already wrapped in start/stop) -> embeddings with text positions 0..L-1."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.text_embedding(ids) + self.text_pos_embedding(pos).unsqueeze(0)

    def mel_embeds(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, T] mel codes at [B, T] (or [T]) mel positions -> embeddings."""
        return self.mel_embedding(codes) + self.mel_pos_embedding(positions)

    def decode(
        self, embeds: torch.Tensor, key_valid: torch.Tensor, past: list[KV] | None = None
    ) -> tuple[torch.Tensor, list[KV]]:
        """GPT-2 body (ln_f included) with a KV cache."""
        return self.gpt(embeds, key_valid, past)

    def mel_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head = final_norm then mel_head, after gpt.ln_f (two norms in series, as upstream)."""
        return self.mel_head(self.final_norm(hidden))

    def latents(self, hidden: torch.Tensor) -> torch.Tensor:
        """What s2mel's gpt_layer consumes: final_norm of the decoder output."""
        return self.final_norm(hidden)
