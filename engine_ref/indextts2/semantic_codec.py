"""MaskGCT's semantic codec (amphion RepCodec) as IndexTTS2 uses it: w2v-BERT features -> codes / quantised embedding.

amphion/MaskGCT ``semantic_codec/model.safetensors`` (fp32, loaded strictly upstream) holds:
- ``encoder.0``: a Vocos backbone (Conv1d embed k7 -> LayerNorm -> N ConvNeXt blocks -> LayerNorm, eps 1e-6,
  erf GELU, layer-scale ``gamma``), ``encoder.1``: Linear vocos_dim -> hidden;
- ``decoder.*``: the same shapes again (never run at 2.0 inference, but required by the strict load);
- ``quantizer.quantizers.0``: one factorised VQ: ``in_project`` (weight-normalised 1x1 conv hidden -> codebook_dim),
  ``codebook`` [codebook_size, codebook_dim], ``out_project`` (weight-normalised 1x1 conv back to hidden).

Quantisation (FactorizedVectorQuantize with use_l2_normlize=True): project to codebook_dim, L2-normalise the
projected vectors and the codewords (F.normalize, eps 1e-12), take the row of max ``-( |e|^2 - 2 e.c + |c|^2 )``
(the squared distance of unit vectors, i.e. cosine; same formula and first-index tie rule as upstream), look up
the RAW codeword, form the straight-through ``z_e + (z_q - z_e)`` (kept: it rounds differently from z_q in fp32),
then out_project. ``vq2emb(codes)`` = out_project(raw codeword), no straight-through.

Batch-correct ``vq2emb``: upstream calls ``quantizer.vq2emb(codes.unsqueeze(1))``, whose first axis is the
quantizer axis, so for B > 1 it silently decodes row 0 only. Here codes are [B, T] and every row is decoded
(equal to upstream for B = 1).

Padded batches: upstream has no mask. With ``mask`` [B, T] given, the inputs of the two time-mixing convs (embed
and every depthwise conv, kernel 7, zero padding) are zeroed past each row's length, which makes each row's valid
frames equal to its unpadded run (every other op is per frame). ``mask=None`` is upstream's computation exactly.

Weight norm: the file stores ``weight_g``/``weight_v``; the loader folds them (torch's own ``_weight_norm``, the
op upstream's hook runs every forward), so the module holds plain ``weight``s and loads with strict=True.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine_ref.checkpoint import checked_float32
from engine_ref.errors import ConfigError, InputError, ModelFilesError
from engine_ref.layout import Layout, TensorSpec
from engine_ref.modules.bigvgan import fold_weight_norm
from engine_ref.typed_config import build_dataclass

__all__ = ["SemanticCodecConfig", "parse_semantic_codec_config", "SemanticCodec", "VocosBackbone", "ConvNeXtBlock",
           "FactorizedVQ", "codec_layout", "load_semantic_codec", "load_semantic_codec_state"]

_LN_EPS = 1e-6
_KERNEL = 7


@dataclass(frozen=True)
class SemanticCodecConfig:
    """config.yaml ``semantic_codec:``; every key is required (INDEXTTS2_CODEC holds the released values).

    Upstream's RepCodec also takes num_quantizers (1) and downsample_scale (1: no down/up convs); config.yaml
    sets neither, so both are fixed at those defaults here.
    """

    codebook_size: int
    hidden_size: int
    codebook_dim: int
    vocos_dim: int
    vocos_intermediate_dim: int
    vocos_num_layers: int


INDEXTTS2_CODEC = SemanticCodecConfig(8192, 1024, 8, 384, 2048, 12)


def parse_semantic_codec_config(section: dict, prefix: str = "semantic_codec.") -> SemanticCodecConfig:
    """Typed ``semantic_codec`` section; a missing/mistyped key is a ConfigError naming it; sizes must be > 0."""
    cfg = build_dataclass(SemanticCodecConfig, section, prefix)
    for name, value in vars(cfg).items():
        if value <= 0:
            raise ConfigError(f"config key '{prefix}{name}' must be positive, found {value}",
                              "restore the value from the config.yaml shipped with the checkpoints")
    return cfg


# ---- modules (names reproduce the checkpoint keys) ----

class ConvNeXtBlock(nn.Module):
    """Depthwise conv k7 -> LN -> Linear up -> GELU -> Linear down -> x gamma, residual. Works on [B, C, T]."""

    def __init__(self, dim: int, intermediate_dim: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, _KERNEL, padding=_KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.dwconv(x if mask is None else x * mask)
        h = self.norm(h.transpose(1, 2))
        h = self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + (self.gamma * h).transpose(1, 2)


class VocosBackbone(nn.Module):
    """[B, in_channels, T] -> [B, T, dim]; no AdaLN (adanorm_num_embeddings=None upstream)."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int):
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, _KERNEL, padding=_KERNEL // 2)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.convnext = nn.ModuleList([ConvNeXtBlock(dim, intermediate_dim) for _ in range(num_layers)])
        self.final_layer_norm = nn.LayerNorm(dim, eps=_LN_EPS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` is [B, 1, T] float (1 valid, 0 padding) or None."""
        x = self.embed(x if mask is None else x * mask)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x, mask)
        return self.final_layer_norm(x.transpose(1, 2))


class _Stack(nn.Sequential):
    """``encoder``/``decoder``: Sequential(VocosBackbone, Linear) so keys read ``encoder.0.*`` / ``encoder.1.*``."""

    def __init__(self, cfg: SemanticCodecConfig):
        super().__init__(VocosBackbone(cfg.hidden_size, cfg.vocos_dim, cfg.vocos_intermediate_dim, cfg.vocos_num_layers),
                         nn.Linear(cfg.vocos_dim, cfg.hidden_size))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, hidden, T] -> [B, T, hidden]."""
        return self[1](self[0](x, mask))


class FactorizedVQ(nn.Module):
    """One factorised, L2-normalised (cosine) vector quantiser; in/out projections are folded 1x1 convs."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        if input_dim == codebook_dim:
            raise ConfigError("semantic_codec.codebook_dim equal to hidden_size has no projections upstream "
                              "(nn.Identity) and is not supported", "use the released config.yaml")
        self.in_project = nn.Conv1d(input_dim, codebook_dim, 1)
        self.out_project = nn.Conv1d(codebook_dim, input_dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """Projected latents [B, D, T] -> code indices [B, T] (nearest unit codeword)."""
        batch = z_e.shape[0]
        enc = F.normalize(z_e.transpose(1, 2).reshape(-1, z_e.shape[1]))
        book = F.normalize(self.codebook.weight)
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        return (-dist).max(dim=1).indices.reshape(batch, -1)

    def codewords(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, T] -> raw codewords [B, D, T]."""
        return F.embedding(codes, self.codebook.weight).transpose(1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, hidden, T] -> (quantised [B, hidden, T], indices [B, T])."""
        z_e = self.in_project(z)
        codes = self.nearest(z_e)
        z_q = z_e + (self.codewords(codes) - z_e)  # straight-through form, as upstream evaluates it
        return self.out_project(z_q), codes

    def vq2emb(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, hidden, T] = out_project(codeword)."""
        return self.out_project(self.codewords(codes))


class ResidualVQ(nn.Module):
    """``quantizer``: holds ``quantizers`` (one FVQ in IndexTTS2; a residual stack upstream in general)."""

    def __init__(self, cfg: SemanticCodecConfig):
        super().__init__()
        self.quantizers = nn.ModuleList([FactorizedVQ(cfg.hidden_size, cfg.codebook_size, cfg.codebook_dim)])


class SemanticCodec(nn.Module):
    """RepCodec(downsample_scale=1, num_quantizers=1): encoder, decoder (unused at 2.0 inference), quantizer."""

    def __init__(self, cfg: SemanticCodecConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = _Stack(cfg)
        self.decoder = _Stack(cfg)
        self.quantizer = ResidualVQ(cfg)

    @staticmethod
    def _mask(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.shape != features.shape[:2]:
            raise InputError(f"mask {list(mask.shape)} does not match features {list(features.shape[:2])}",
                             "pass a [batch, frames] mask")
        return mask.to(device=features.device, dtype=features.dtype).unsqueeze(1)

    def quantize(self, features: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, T, hidden] -> (indices [B, T] int64, quantised embedding [B, T, hidden])."""
        m = self._mask(features, mask)
        latent = self.encoder(features.transpose(1, 2), m).transpose(1, 2)  # [B, hidden, T]
        quantised, codes = self.quantizer.quantizers[0](latent)
        return codes, quantised.transpose(1, 2)

    def vq2emb(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, T] -> embedding [B, T, hidden] for every row (see module docstring on upstream's B=1 bug)."""
        if codes.dim() != 2:
            raise InputError(f"codes must be [batch, frames], got shape {list(codes.shape)}", "pass 2-D codes")
        return self.quantizer.quantizers[0].vq2emb(codes).transpose(1, 2)

    def decode(self, embedding: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder stack [B, T, hidden] -> [B, T, hidden]. IndexTTS2 never calls it (upstream's RepCodec.forward,
        the only user, is broken for downsample_scale=1); provided for completeness and 2.5-style decoding."""
        return self.decoder(embedding.transpose(1, 2), self._mask(embedding, mask))


# ---- published layout (independent of the modules above) ----

def _vocos_layout(layout: Layout, prefix: str, cfg: SemanticCodecConfig) -> None:
    d, inter, h = cfg.vocos_dim, cfg.vocos_intermediate_dim, cfg.hidden_size
    layout[f"{prefix}.0.embed.weight"] = TensorSpec((d, h, _KERNEL))
    layout[f"{prefix}.0.embed.bias"] = TensorSpec((d,), init="normal", std=0.02)
    for ln in ("norm", "final_layer_norm"):
        layout[f"{prefix}.0.{ln}.weight"] = TensorSpec((d,), init="normal", mean=1.0, std=0.05)
        layout[f"{prefix}.0.{ln}.bias"] = TensorSpec((d,), init="normal", std=0.02)
    for i in range(cfg.vocos_num_layers):
        b = f"{prefix}.0.convnext.{i}"
        layout[f"{b}.dwconv.weight"] = TensorSpec((d, 1, _KERNEL))
        layout[f"{b}.dwconv.bias"] = TensorSpec((d,), init="normal", std=0.02)
        layout[f"{b}.norm.weight"] = TensorSpec((d,), init="normal", mean=1.0, std=0.05)
        layout[f"{b}.norm.bias"] = TensorSpec((d,), init="normal", std=0.02)
        layout[f"{b}.pwconv1.weight"] = TensorSpec((inter, d))
        layout[f"{b}.pwconv1.bias"] = TensorSpec((inter,), init="normal", std=0.02)
        layout[f"{b}.pwconv2.weight"] = TensorSpec((d, inter))
        layout[f"{b}.pwconv2.bias"] = TensorSpec((d,), init="normal", std=0.02)
        # layer scale: upstream initialises 1/num_layers; random ones around that keep 12 residual sums bounded
        layout[f"{b}.gamma"] = TensorSpec((d,), init="normal", mean=1.0 / cfg.vocos_num_layers,
                                          std=0.2 / cfg.vocos_num_layers)
    layout[f"{prefix}.1.weight"] = TensorSpec((h, d))
    layout[f"{prefix}.1.bias"] = TensorSpec((h,), init="normal", std=0.02)


def codec_layout(cfg: SemanticCodecConfig) -> Layout:
    """semantic_codec/model.safetensors: key -> TensorSpec (``.shape`` plus a preset init rule).

    Written from the published key names (not from the module), so presets and the strict loader cross-check
    the module. Weight-normalised projections appear as ``weight_g`` [out, 1, 1] + ``weight_v`` [out, in, 1];
    weight_g ~ 1 makes each projected row a unit-norm direction, so random codes decode to O(1) embeddings.
    """
    layout: Layout = {}
    _vocos_layout(layout, "encoder", cfg)
    _vocos_layout(layout, "decoder", cfg)
    q = "quantizer.quantizers.0"
    h, c = cfg.hidden_size, cfg.codebook_dim
    for name, (out_ch, in_ch) in (("in_project", (c, h)), ("out_project", (h, c))):
        layout[f"{q}.{name}.weight_g"] = TensorSpec((out_ch, 1, 1), init="normal", mean=1.0, std=0.05)
        layout[f"{q}.{name}.weight_v"] = TensorSpec((out_ch, in_ch, 1))
        layout[f"{q}.{name}.bias"] = TensorSpec((out_ch,), init="normal", std=0.02)
    layout[f"{q}.codebook.weight"] = TensorSpec((cfg.codebook_size, c), init="normal", std=1.0)
    return layout


# ---- loading ----

def load_semantic_codec_state(module: SemanticCodec, state: dict, source: str = "semantic codec") -> SemanticCodec:
    """Check `state` (as stored: weight_g/weight_v) against the layout, fold weight norm, load strictly."""
    layout = codec_layout(module.cfg)
    fix = ("use amphion/MaskGCT semantic_codec/model.safetensors with the config.yaml semantic_codec section "
           "it was released with")
    converted = checked_float32(state, layout, source, "the architecture", fix, floats_only=True)
    module.load_state_dict(fold_weight_norm(converted), strict=True)
    return module


def load_semantic_codec(path: str | Path, cfg: SemanticCodecConfig) -> SemanticCodec:
    """The codec from model.safetensors (strict; named errors), eval mode, fp32."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"semantic codec {path} does not exist",
                              "download amphion/MaskGCT semantic_codec/model.safetensors")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ModelFilesError(f"{path} cannot be read as safetensors ({exc})", "re-download it") from None
    return load_semantic_codec_state(SemanticCodec(cfg), state, path.name).eval()
