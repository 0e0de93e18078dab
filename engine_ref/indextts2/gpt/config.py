"""GPTv2Config: the `gpt:` section of IndexTTS2's config.yaml (UnifiedVoice v2).

Same keys as 1.x plus `emo_condition_module` (the emotion Conformer + perceiver). Two widths are fixed in the
upstream constructor rather than read from config.yaml; they are fields here (with the official values as
defaults) only so that tests can build tiny models: `feature_dim` (w2v-bert-2.0 hidden size fed to both
Conformers, 1024) and `emo_latent_dim` (width of the emotion perceiver and input of emovec_layer, 1024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from engine_ref.errors import ConfigError
from engine_ref.modules.configs import GPTTableSizes
from engine_ref.modules.conformer import ConditionModuleConfig
from engine_ref.typed_config import build_dataclass

# Rows of speed_emb: index 1 is the "duration control" row (conds row 33), index 0 the "duration free" row (34).
SPEED_ROWS = 2


@dataclass(frozen=True)
class GPTv2Config(GPTTableSizes):
    """UnifiedVoice v2: GPT-2 decoder, speaker and emotion conditioners (config.yaml `gpt:`)."""

    model_dim: int
    layers: int
    heads: int
    max_mel_tokens: int
    max_text_tokens: int
    number_text_tokens: int
    number_mel_codes: int
    start_mel_token: int
    stop_mel_token: int
    start_text_token: int
    stop_text_token: int
    condition_type: str
    condition_module: ConditionModuleConfig
    emo_condition_module: ConditionModuleConfig
    use_mel_codes_as_input: bool = True
    train_solo_embeddings: bool = False
    max_conditioning_inputs: int = 1
    condition_num_latent: int = 32
    feature_dim: int = 1024  # not a config.yaml key: upstream hard-codes the w2v-bert width
    emo_latent_dim: int = 1024  # not a config.yaml key: upstream hard-codes the emotion latent width

    @property
    def cond_rows(self) -> int:
        """Conditioning rows before the text: speaker latents (+ emotion) and the two speed rows (34)."""
        return self.condition_num_latent + SPEED_ROWS


def _check(cfg: GPTv2Config) -> GPTv2Config:
    if cfg.condition_type != "conformer_perceiver":
        raise ConfigError(
            f"gpt.condition_type is '{cfg.condition_type}', IndexTTS2 uses only 'conformer_perceiver'",
            "restore condition_type: conformer_perceiver from the official config.yaml",
        )
    if not cfg.use_mel_codes_as_input or cfg.train_solo_embeddings:
        raise ConfigError(
            "gpt.use_mel_codes_as_input must be true and gpt.train_solo_embeddings false for IndexTTS2 inference",
            "restore both values from the official config.yaml",
        )
    if cfg.model_dim % cfg.heads:
        raise ConfigError(
            f"gpt.model_dim ({cfg.model_dim}) is not divisible by gpt.heads ({cfg.heads})",
            "restore both values from the official config.yaml",
        )
    for name in ("condition_module", "emo_condition_module"):
        cm: ConditionModuleConfig = getattr(cfg, name)
        if cm.input_layer != "conv2d2":
            raise ConfigError(
                f"gpt.{name}.input_layer is '{cm.input_layer}', IndexTTS2 uses only 'conv2d2'",
                "restore input_layer: conv2d2 from the official config.yaml",
            )
        if cm.output_size % cm.attention_heads:
            raise ConfigError(
                f"gpt.{name}.output_size ({cm.output_size}) is not divisible by attention_heads ({cm.attention_heads})",
                "restore both values from the official config.yaml",
            )
    return cfg


def parse_gpt_v2(section: Mapping, prefix: str = "gpt.") -> GPTv2Config:
    """config.yaml's `gpt:` mapping -> GPTv2Config; a missing or mistyped key is a ConfigError naming it."""
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"config key '{prefix.rstrip('.')}' must be a mapping, found {type(section).__name__}",
            "use the config.yaml shipped with the IndexTTS2 checkpoints",
        )
    return _check(build_dataclass(GPTv2Config, dict(section), prefix))


# The official IndexTTS2 values (config.yaml at 41577b8), for presets and size checks.
INDEXTTS2_GPT = GPTv2Config(
    model_dim=1280,
    layers=24,
    heads=20,
    max_mel_tokens=1815,
    max_text_tokens=600,
    number_text_tokens=12000,
    number_mel_codes=8194,
    start_mel_token=8192,
    stop_mel_token=8193,
    start_text_token=0,
    stop_text_token=1,
    condition_type="conformer_perceiver",
    condition_module=ConditionModuleConfig(512, 2048, 8, 6, "conv2d2", 2),
    emo_condition_module=ConditionModuleConfig(512, 1024, 4, 4, "conv2d2", 2),
)
