"""IndexTTS-2.5's 25 Hz semantic codec (codec.pth): GPT codes -> S_infer [B, 2N, hidden] for the s2mel stage.

codec.pth is ``{'model': state dict}`` of upstream's EnhancedCodec = 2.0's RepCodec (the same Vocos encoder /
decoder stacks and factorised VQ, `engine_ref.indextts2.semantic_codec`) with downsample_scale 2, which adds
``down`` (Conv1d hidden->hidden, k3 s2 p1, then GELU, before the encoder) and ``up`` (Conv1d k3 s1 p1 after a
nearest x2 upsampling of the decoder output): 243 keys. Upstream loads it with a silent shape filter; here every
key is checked (missing, unexpected and mis-shaped keys are named) and weight norm is folded as for 2.0.

Inference uses decode only (the reference is not quantised in 2.5):
    S_infer = up(nearest_x2(decoder(vq2emb(codes)))) , time-major [B, 2N, hidden]
vq2emb = out_project(codebook[codes]) for every row (upstream's decode unsqueezes the quantizer axis correctly,
so batches are right there too). The x2 is written as repeat-each-frame (expand + reshape), identical to
F.interpolate(scale_factor=2, mode="nearest"). `encoder`, `down` and the straight-through quantize path are held
for the strict load and never run at 2.5 inference.

Padded batches: with `code_lengths`, the inputs of every time-mixing conv (the decoder's embed and depthwise
convs, and `up`) are zeroed past each row's length (2n after the upsampling), so a padded row's valid frames equal
its solo run; frames past 2n are zero. Without lengths the computation is upstream's exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engine_ref.checkpoint import checked_float32, read_checkpoint
from engine_ref.errors import CheckpointError, ConfigError, InputError
from engine_ref.indextts2.semantic_codec import (
    ResidualVQ,
    SemanticCodecConfig,
    _Stack,
    codec_layout,
    parse_semantic_codec_config,
)
from engine_ref.layout import Layout, TensorSpec
from engine_ref.modules.bigvgan import fold_weight_norm

__all__ = ["DOWNSAMPLE_SCALE", "CODEC_FILE", "parse_codec25_config", "Codec25", "codec25_layout",
           "load_codec25_state", "load_codec25"]

DOWNSAMPLE_SCALE = 2  # EnhancedCodec's default; the 2.5 config.yaml does not set it
CODEC_FILE = "codec.pth"  # hard-coded upstream (not a config.yaml key)
_RESAMPLE_KERNEL = 3


def parse_codec25_config(section: Mapping, prefix: str = "semantic_codec.") -> SemanticCodecConfig:
    """2.0's `semantic_codec:` keys; an explicit downsample_scale must be 2 (the only scale decode supports)."""
    cfg = parse_semantic_codec_config(dict(section), prefix)
    scale = section.get("downsample_scale", DOWNSAMPLE_SCALE)
    if scale != DOWNSAMPLE_SCALE:
        raise ConfigError(f"config key '{prefix}downsample_scale' is {scale!r}; IndexTTS-2.5's codec decodes at 2x",
                          "remove the key or set it to 2, as in the released config.yaml")
    return cfg


class Codec25(nn.Module):
    """codec.pth['model'] under its official names; `decode` is what 2.5 runs."""

    def __init__(self, cfg: SemanticCodecConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.down = nn.Conv1d(h, h, _RESAMPLE_KERNEL, stride=DOWNSAMPLE_SCALE, padding=1)
        self.up = nn.Conv1d(h, h, _RESAMPLE_KERNEL, stride=1, padding=1)
        self.encoder = _Stack(cfg)
        self.decoder = _Stack(cfg)
        self.quantizer = ResidualVQ(cfg)

    @staticmethod
    def frames(code_lengths: torch.Tensor) -> torch.Tensor:
        """Output frames per row: 2 per code (50 Hz from the 25 Hz codes)."""
        return code_lengths * DOWNSAMPLE_SCALE

    def decode(self, codes: torch.Tensor, code_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Codes [B, N] (int64) -> S_infer [B, 2N, hidden]; `code_lengths` [B] for padded batches (module docstring)."""
        if codes.dim() != 2:
            raise InputError(f"codes must be [batch, codes], got shape {list(codes.shape)}", "pass 2-D codes")
        b, n = codes.shape
        mask = mask2 = None
        if code_lengths is not None:
            pos = torch.arange(n, device=codes.device)
            mask = (pos[None, :] < code_lengths[:, None]).unsqueeze(1).to(torch.float32)
            pos2 = torch.arange(n * DOWNSAMPLE_SCALE, device=codes.device)
            mask2 = (pos2[None, :] < self.frames(code_lengths)[:, None]).unsqueeze(1).to(torch.float32)
        emb = self.quantizer.quantizers[0].vq2emb(codes)  # [B, hidden, N]
        x = self.decoder(emb, mask).transpose(1, 2)  # [B, hidden, N]
        x = x.unsqueeze(-1).expand(b, x.shape[1], n, DOWNSAMPLE_SCALE).reshape(b, x.shape[1], n * DOWNSAMPLE_SCALE)
        out = self.up(x if mask2 is None else x * mask2)
        if mask2 is not None:
            out = out * mask2
        return out.transpose(1, 2)

    def forward(self, codes: torch.Tensor, code_lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(codes, code_lengths)

    def downsample(self, features: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] -> [B, ceil(T/2), hidden]: GELU(down(x)) (training/quantize side; unused at inference)."""
        return F.gelu(self.down(features.transpose(1, 2))).transpose(1, 2)


# ---- published layout ----

def codec25_layout(cfg: SemanticCodecConfig) -> Layout:
    """codec.pth['model']: 2.0's codec layout (weight_g/weight_v projections) plus down/up: key -> TensorSpec."""
    h = cfg.hidden_size
    layout = codec_layout(cfg)
    for name in ("down", "up"):
        layout[f"{name}.weight"] = TensorSpec((h, h, _RESAMPLE_KERNEL))
        layout[f"{name}.bias"] = TensorSpec((h,), init="normal", std=0.02)
    return layout


# ---- loading ----

def _state(raw: object, source: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("model"), Mapping):
        found = ", ".join(map(str, list(raw)[:6])) if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(f"{source} has no 'model' state dict (found: {found})",
                              "use the codec.pth released with IndexTTS-2.5")
    return raw["model"]


def load_codec25_state(module: Codec25, raw: object, source: str = CODEC_FILE) -> Codec25:
    """Check codec.pth (as stored: {'model': ...} with weight_g/weight_v) against the layout, fold, load strictly."""
    state = _state(raw, source)
    layout = codec25_layout(module.cfg)
    fix = "use the codec.pth released with IndexTTS-2.5 and the config.yaml semantic_codec section it came with"
    converted = checked_float32(state, layout, source, "the 2.5 codec", fix, floats_only=True)
    with torch.inference_mode(False):
        module.load_state_dict(fold_weight_norm(converted), strict=True)
    return module


def load_codec25(path: str | Path, cfg: SemanticCodecConfig) -> Codec25:
    """codec.pth -> Codec25 (strict, named errors), eval mode, fp32."""
    path = Path(path)
    with torch.inference_mode(False):
        module = Codec25(cfg)
    return load_codec25_state(module, read_checkpoint(path), path.name).eval()
