"""Typed view of config.yaml's ``s2mel:`` section (IndexTTS2 semantic-to-mel stage).

Field names are the official keys, so a missing or mistyped one is a `ConfigError` naming e.g.
``s2mel.DiT.hidden_dim``. Training-only keys (dropouts, loss type, ``target``, ``block_size``) are parsed when present
but change nothing at inference. Options the official checkpoint does not use and this engine does not implement
(discrete content, f0 conditioning, tokens for time/style, causal attention, an MLP final layer, ...) are rejected by
`validate_s2mel_config` instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_ref.errors import ConfigError
from engine_ref.typed_config import build_dataclass

# Hard-coded in the original, not config keys.
TIME_FREQ_DIM = 256  # TimestepEmbedder frequency_embedding_size (128 cos + 128 sin)
POSITION_TABLE = 16384  # DiT input_pos buffer rows (config's block_size 8192 is ignored upstream)
GPT_LAYER_HIDDEN = (256, 128)  # gpt_layer: Linear(gpt_dim, 256) -> Linear(256, 128) -> Linear(128, content)
GPT_LATENT_DIM = 1280  # gpt_layer input width, hard-coded upstream (= gpt.model_dim of IndexTTS-2)


@dataclass(frozen=True)
class SpectParams:
    """Mel settings of the 22.05 kHz reference mel (``s2mel.preprocess_params.spect_params``)."""

    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int
    fmin: float = 0.0
    fmax: str = "None"  # the official file writes the string "None" (= sr / 2)

    @property
    def fmax_hz(self) -> float | None:
        return None if self.fmax in ("None", "none", "null", "") else float(self.fmax)


@dataclass(frozen=True)
class PreprocessParams:
    sr: int
    spect_params: SpectParams


@dataclass(frozen=True)
class StyleEncoderConfig:
    dim: int  # CAMPPlus embedding width fed to the DiT (192)


@dataclass(frozen=True)
class LengthRegulatorConfig:
    """InterpolateRegulator settings (``s2mel.length_regulator``)."""

    channels: int
    is_discrete: bool
    content_codebook_size: int
    sampling_ratios: tuple[int, ...]
    in_channels: int  # continuous input width (1024 = the semantic codec's hidden size)
    vector_quantize: bool = False
    n_codebooks: int = 1
    quantizer_dropout: float = 0.0
    f0_condition: bool = False
    n_f0_bins: int = 512


@dataclass(frozen=True)
class DiTConfig:
    """Diffusion transformer settings (``s2mel.DiT``)."""

    hidden_dim: int
    num_heads: int
    depth: int
    in_channels: int
    style_condition: bool
    final_layer_type: str
    content_dim: int
    content_codebook_size: int
    is_causal: bool
    long_skip_connection: bool
    class_dropout_prob: float = 0.1
    block_size: int = 8192
    target: str = "mel"
    content_type: str = "discrete"  # upstream uses cond_projection (continuous) whatever this says
    f0_condition: bool = False
    n_f0_bins: int = 512
    content_codebooks: int = 1
    zero_prompt_speech_token: bool = False
    time_as_token: bool = False
    style_as_token: bool = False
    uvit_skip_connection: bool = False
    add_resblock_in_transformer: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """gpt-fast's rule: int(2 * 4 * dim / 3) rounded up to a multiple of 256 (1536 for dim 512)."""
        n = int(2 * (4 * self.hidden_dim) / 3)
        return n if n % 256 == 0 else n + 256 - n % 256


@dataclass(frozen=True)
class WaveNetConfig:
    """WaveNet final layer settings (``s2mel.wavenet``)."""

    hidden_dim: int
    num_layers: int
    kernel_size: int
    dilation_rate: int
    style_condition: bool
    p_dropout: float = 0.0


@dataclass(frozen=True)
class S2MelConfig:
    """Everything of ``s2mel:`` the semantic-to-mel modules need."""

    preprocess_params: PreprocessParams
    style_encoder: StyleEncoderConfig
    length_regulator: LengthRegulatorConfig
    DiT: DiTConfig
    wavenet: WaveNetConfig
    dit_type: str = "DiT"
    reg_loss_type: str = "l1"

    @property
    def n_mels(self) -> int:
        return self.DiT.in_channels


def _unsupported(key: str, value: Any, supported: str) -> ConfigError:
    return ConfigError(
        f"config key 's2mel.{key}' is {value!r}; this engine implements only {supported} (as in IndexTTS-2)",
        "use the config.yaml shipped with IndexTTS-2",
    )


def validate_s2mel_config(cfg: S2MelConfig) -> None:
    """Reject settings whose code path is not implemented (each named by its dotted key)."""
    dit, wn, lr = cfg.DiT, cfg.wavenet, cfg.length_regulator
    if cfg.dit_type != "DiT":
        raise _unsupported("dit_type", cfg.dit_type, "'DiT'")
    for key, value in (
        ("DiT.is_causal", dit.is_causal),
        ("DiT.time_as_token", dit.time_as_token),
        ("DiT.style_as_token", dit.style_as_token),
        ("DiT.zero_prompt_speech_token", dit.zero_prompt_speech_token),
        ("DiT.f0_condition", dit.f0_condition),
        ("DiT.add_resblock_in_transformer", dit.add_resblock_in_transformer),
        ("length_regulator.is_discrete", lr.is_discrete),
        ("length_regulator.vector_quantize", lr.vector_quantize),
        ("length_regulator.f0_condition", lr.f0_condition),
    ):
        if value:
            raise _unsupported(key, value, "false")
    if dit.final_layer_type != "wavenet":
        raise _unsupported("DiT.final_layer_type", dit.final_layer_type, "'wavenet'")
    if not lr.sampling_ratios:
        raise _unsupported("length_regulator.sampling_ratios", list(lr.sampling_ratios), "a non-empty list")
    positive = {
        "DiT.hidden_dim": dit.hidden_dim, "DiT.num_heads": dit.num_heads, "DiT.depth": dit.depth,
        "DiT.in_channels": dit.in_channels, "DiT.content_dim": dit.content_dim,
        "DiT.content_codebook_size": dit.content_codebook_size, "wavenet.hidden_dim": wn.hidden_dim,
        "wavenet.num_layers": wn.num_layers, "wavenet.kernel_size": wn.kernel_size,
        "wavenet.dilation_rate": wn.dilation_rate, "length_regulator.channels": lr.channels,
        "length_regulator.in_channels": lr.in_channels,
        "length_regulator.content_codebook_size": lr.content_codebook_size, "style_encoder.dim": cfg.style_encoder.dim,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key 's2mel.{key}' must be positive, found {value}", "restore it from the official config.yaml")
    if dit.hidden_dim % dit.num_heads or dit.head_dim % 2:
        raise ConfigError(
            f"s2mel.DiT.hidden_dim ({dit.hidden_dim}) must split into s2mel.DiT.num_heads ({dit.num_heads}) heads of even width",
            "restore both values from the official config.yaml",
        )
    if wn.kernel_size % 2 == 0:
        raise ConfigError(f"s2mel.wavenet.kernel_size must be odd, found {wn.kernel_size}", "restore it from the official config.yaml")
    if wn.hidden_dim != dit.hidden_dim:
        # FinalLayer is sized by wavenet.hidden_dim but modulated by the DiT time embedding (hidden_dim wide).
        raise ConfigError(
            f"s2mel.wavenet.hidden_dim ({wn.hidden_dim}) differs from s2mel.DiT.hidden_dim ({dit.hidden_dim}); "
            "the original's final layer only runs when they are equal",
            "restore both values from the official config.yaml",
        )
    if wn.style_condition != dit.style_condition:
        raise ConfigError(
            "s2mel.wavenet.style_condition differs from s2mel.DiT.style_condition (the original asserts they are equal)",
            "restore both values from the official config.yaml",
        )
    if lr.channels != dit.content_dim:
        raise ConfigError(
            f"s2mel.length_regulator.channels ({lr.channels}) differs from s2mel.DiT.content_dim ({dit.content_dim}); "
            "the regulator's output is the DiT's content input",
            "restore both values from the official config.yaml",
        )


def parse_s2mel_config(data: Any, prefix: str = "s2mel.") -> S2MelConfig:
    """Build and validate an `S2MelConfig` from the ``s2mel:`` mapping of config.yaml."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"config key '{prefix.rstrip('.')}' must be a mapping, found {type(data).__name__}",
            "restore the s2mel: section from the config.yaml shipped with IndexTTS-2",
        )
    cfg = build_dataclass(S2MelConfig, data, prefix)
    validate_s2mel_config(cfg)
    return cfg


def indextts2_s2mel_defaults() -> dict[str, Any]:
    """The official IndexTTS-2 ``s2mel:`` section as a plain mapping (for presets and tests)."""
    return {
        "preprocess_params": {
            "sr": 22050,
            "spect_params": {"n_fft": 1024, "win_length": 1024, "hop_length": 256, "n_mels": 80, "fmin": 0, "fmax": "None"},
        },
        "dit_type": "DiT",
        "reg_loss_type": "l1",
        "style_encoder": {"dim": 192},
        "length_regulator": {
            "channels": 512, "is_discrete": False, "in_channels": 1024, "content_codebook_size": 2048,
            "sampling_ratios": [1, 1, 1, 1], "vector_quantize": False, "n_codebooks": 1, "quantizer_dropout": 0.0,
            "f0_condition": False, "n_f0_bins": 512,
        },
        "DiT": {
            "hidden_dim": 512, "num_heads": 8, "depth": 13, "class_dropout_prob": 0.1, "block_size": 8192,
            "in_channels": 80, "style_condition": True, "final_layer_type": "wavenet", "target": "mel",
            "content_dim": 512, "content_codebook_size": 1024, "content_type": "discrete", "f0_condition": False,
            "n_f0_bins": 512, "content_codebooks": 1, "is_causal": False, "long_skip_connection": True,
            "zero_prompt_speech_token": False, "time_as_token": False, "style_as_token": False,
            "uvit_skip_connection": True, "add_resblock_in_transformer": False,
        },
        "wavenet": {"hidden_dim": 512, "num_layers": 8, "kernel_size": 5, "dilation_rate": 1, "p_dropout": 0.2, "style_condition": True},
    }


__all__ = [
    "DiTConfig", "LengthRegulatorConfig", "PreprocessParams", "S2MelConfig", "SpectParams", "StyleEncoderConfig",
    "WaveNetConfig", "GPT_LATENT_DIM", "GPT_LAYER_HIDDEN", "POSITION_TABLE", "TIME_FREQ_DIM", "indextts2_s2mel_defaults",
    "parse_s2mel_config", "validate_s2mel_config",
]
