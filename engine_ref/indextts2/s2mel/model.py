"""The s2mel stage as one module whose children are the three entries of s2mel.pth's ``net``.

Children ``cfm`` (key prefix ``estimator.``), ``length_regulator`` and ``gpt_layer`` each load from their own
``net[...]`` state dict. The glue (target length = floor(1.72 * codes) in float32, S_infer = vq2emb(codes) +
gpt_layer(latent), mu = prompt_condition ‖ cond) follows infer_v2.py at 41577b8.
"""

from __future__ import annotations

import torch
from torch import nn

from engine_ref.errors import InputError
from engine_ref.indextts2.s2mel.cfm import CFM, DEFAULT_CFG_RATE, DEFAULT_STEPS
from engine_ref.indextts2.s2mel.config import GPT_LATENT_DIM, GPT_LAYER_HIDDEN, S2MelConfig, validate_s2mel_config
from engine_ref.indextts2.s2mel.length_regulator import LengthRegulator

MEL_FRAMES_PER_CODE = 1.72  # 50 codes/s -> 86.13 mel frames/s (22050 / 256)


def target_mel_frames(code_lens: torch.Tensor) -> torch.Tensor:
    """(code_lens * 1.72).long(): the product is float32 (int tensor * Python float), then truncated.

    float32 matters: fl32(1.72) > 1.72, so e.g. 25 codes give 43 frames where float64 would give 42.
    """
    return (code_lens.to(torch.int64) * MEL_FRAMES_PER_CODE).long()


class GptLatentProjection(nn.Sequential):
    """gpt_layer: Linear(gpt_dim, 256) -> Linear(256, 128) -> Linear(128, content), no activations."""

    def __init__(self, gpt_dim: int, out_dim: int):
        dims = (gpt_dim, *GPT_LAYER_HIDDEN, out_dim)
        super().__init__(*(nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1)))


class S2Mel(nn.Module):
    """with_gpt_layer=False: IndexTTS-2.5, which regulates the codec decoder's output directly (no GPT latent); the
    module then holds only ``cfm`` and ``length_regulator`` (a ``gpt_layer`` entry in the file is ignored)."""

    def __init__(self, cfg: S2MelConfig, gpt_latent_dim: int = GPT_LATENT_DIM, with_gpt_layer: bool = True):
        super().__init__()
        validate_s2mel_config(cfg)
        self.cfg = cfg
        self.gpt_latent_dim = gpt_latent_dim
        self.with_gpt_layer = with_gpt_layer
        self.cfm = CFM(cfg)
        self.length_regulator = LengthRegulator(cfg.length_regulator)
        if with_gpt_layer:
            self.gpt_layer = GptLatentProjection(gpt_latent_dim, cfg.length_regulator.in_channels)

    def prompt_condition(self, s_ref: torch.Tensor, ref_mel_frames: int) -> torch.Tensor:
        """S_ref [1, T_w, in] (quantised reference semantics) -> [1, T_ref, channels] at the ref mel's frame count."""
        b, n = s_ref.shape[0], s_ref.shape[1]
        lens = torch.full((b,), n, dtype=torch.int64, device=s_ref.device)
        ylens = torch.full((b,), int(ref_mel_frames), dtype=torch.int64, device=s_ref.device)
        return self.length_regulator(s_ref, lens, ylens)

    def target_condition(self, semantic: torch.Tensor, latent: torch.Tensor, code_lens: torch.Tensor) -> torch.Tensor:
        """vq2emb(codes) [B, N, in] + gpt_layer(latent [B, N, gpt_dim]) -> regulated to floor(1.72 N) frames."""
        if semantic.shape[:2] != latent.shape[:2]:
            raise InputError(
                f"semantic embeddings {list(semantic.shape)} and GPT latents {list(latent.shape)} differ in batch/length",
                "pass the codes' vq2emb and the latent of the same codes",
            )
        s_infer = semantic + self.gpt_layer(latent)
        return self.length_regulator(s_infer, code_lens, target_mel_frames(code_lens))

    @torch.no_grad()
    def generate_mel(
        self,
        prompt_condition: torch.Tensor,
        cond: torch.Tensor,
        ref_mel: torch.Tensor,
        style: torch.Tensor,
        n_steps: int = DEFAULT_STEPS,
        cfg_rate: float = DEFAULT_CFG_RATE,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """mu = prompt_condition ‖ cond; CFM sample; the generated mel [B, mels, T_cond] (prompt frames dropped)."""
        mu = torch.cat([prompt_condition, cond], dim=1)
        return self.cfm.sample(mu, ref_mel, style, n_steps, cfg_rate, noise=noise, generator=generator)
