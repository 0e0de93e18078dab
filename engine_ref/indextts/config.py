"""Typed model configuration parsed from the official IndexTTS config.yaml (v1.0 and v1.5).

The official files carry training-only sections (vqvae:, optimizer and discriminator settings, ...): they are
accepted and ignored. Only the keys inference needs are read; a missing one or one of the wrong type raises a
`ConfigError` naming the key (e.g. ``gpt.model_dim``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine_ref.errors import ConfigError
from engine_ref.modules.configs import BigVGANConfig, ConditionModuleConfig, GPTConfig  # noqa: F401
from engine_ref.typed_config import coerce_value, read_yaml

# Versions whose architecture this engine implements (v1.0 has no `version` key).
SUPPORTED_VERSIONS = ("1.0", "1.5")


@dataclass(frozen=True)
class ModelConfig:
    """Everything inference reads from config.yaml."""

    gpt: GPTConfig
    bigvgan: BigVGANConfig
    bpe_model: str = "bpe.model"
    gpt_checkpoint: str = "gpt.pth"
    bigvgan_checkpoint: str = "bigvgan_generator.pth"
    version: str = "1.0"
    # Training-only or unknown keys that were ignored, for `verify` to show.
    ignored_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def sampling_rate(self) -> int:
        return self.bigvgan.sampling_rate

    def required_files(self) -> dict[str, str]:
        """Role -> file name of every file inference opens."""
        return {
            "config": "config.yaml",
            "gpt": self.gpt_checkpoint,
            "bigvgan": self.bigvgan_checkpoint,
            "bpe": self.bpe_model,
        }


# Sections and keys the official files carry that inference never reads.
_KNOWN_TOP_LEVEL = {"gpt", "bigvgan", "dataset", "version", "gpt_checkpoint", "bigvgan_checkpoint", "dvae_checkpoint"}


def _ignored(data: dict) -> tuple[str, ...]:
    known_gpt = {f.name for f in dataclasses.fields(GPTConfig)}
    known_bv = {f.name for f in dataclasses.fields(BigVGANConfig)}
    out = [k for k in data if k not in _KNOWN_TOP_LEVEL]
    out += [f"gpt.{k}" for k in (data.get("gpt") or {}) if k not in known_gpt]
    out += [f"bigvgan.{k}" for k in (data.get("bigvgan") or {}) if k not in known_bv]
    return tuple(sorted(out))


def parse_config(data: Any, source: str = "config.yaml") -> ModelConfig:
    """Build a `ModelConfig` from the parsed YAML mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a YAML mapping", "use the config.yaml shipped with the checkpoints")
    if "s2mel" in data and "bigvgan" not in data:  # an IndexTTS2 directory given to the 1.x engine
        raise ConfigError(
            f"{source} describes an IndexTTS2 model (version {data.get('version', '?')}, an s2mel: section), "
            "not IndexTTS 1.x",
            "load it with engine_ref.indextts2.synthesizer.Synthesizer2 (`triton-tts synth --model` picks the "
            "engine from the directory)",
        )
    for section in ("gpt", "bigvgan"):
        if section not in data:
            raise ConfigError(
                f"{source} has no '{section}:' section", "use the config.yaml shipped with the checkpoints"
            )
    gpt = coerce_value(data["gpt"], GPTConfig, "gpt")
    bigvgan = coerce_value(data["bigvgan"], BigVGANConfig, "bigvgan")
    dataset = data.get("dataset") or {}
    if not isinstance(dataset, dict):
        raise ConfigError(f"config key 'dataset' must be a mapping, found {dataset!r}", "restore the dataset: section")
    version = coerce_value(data.get("version", "1.0"), str, "version")
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"config.yaml declares version {version}, but this engine implements IndexTTS {' and '.join(SUPPORTED_VERSIONS)}",
            "point --model at an IndexTTS 1.0 or 1.5 checkpoint directory",
        )
    if gpt.condition_type != "conformer_perceiver":
        raise ConfigError(
            f"gpt.condition_type is '{gpt.condition_type}', only 'conformer_perceiver' (IndexTTS 1.x) is supported",
            "use the config.yaml shipped with IndexTTS 1.0/1.5",
        )
    if gpt.model_dim % gpt.heads:
        raise ConfigError(
            f"gpt.model_dim ({gpt.model_dim}) is not divisible by gpt.heads ({gpt.heads})",
            "restore both values from the official config.yaml",
        )
    if bigvgan.gpt_dim != gpt.model_dim:
        raise ConfigError(
            f"bigvgan.gpt_dim ({bigvgan.gpt_dim}) differs from gpt.model_dim ({gpt.model_dim})",
            "restore both values from the official config.yaml",
        )
    return ModelConfig(
        gpt=gpt,
        bigvgan=bigvgan,
        bpe_model=coerce_value(dataset.get("bpe_model", "bpe.model"), str, "dataset.bpe_model"),
        gpt_checkpoint=coerce_value(data.get("gpt_checkpoint", "gpt.pth"), str, "gpt_checkpoint"),
        bigvgan_checkpoint=coerce_value(data.get("bigvgan_checkpoint", "bigvgan_generator.pth"), str, "bigvgan_checkpoint"),
        version=version,
        ignored_keys=_ignored(data),
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read and validate config.yaml; every failure is a `ConfigError` naming the file."""
    data = read_yaml(path, "point --model at a directory holding config.yaml")
    return parse_config(data, source=str(path))


def config_to_yaml(cfg: ModelConfig) -> str:
    """Serialize in the official layout (used by presets); lists stay lists."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "ignored_keys"}
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        return obj

    gpt = plain(cfg.gpt)
    for derived in ("max_conditioning_inputs", "condition_num_latent"):
        gpt.pop(derived)  # not keys of the official file; upstream hard-codes them
    doc = {
        "dataset": {"bpe_model": cfg.bpe_model, "sample_rate": cfg.sampling_rate, "squeeze": False},
        "gpt": gpt,
        "bigvgan": plain(cfg.bigvgan),
        "gpt_checkpoint": cfg.gpt_checkpoint,
        "bigvgan_checkpoint": cfg.bigvgan_checkpoint,
        "version": float(cfg.version) if cfg.version != "1.0" else None,
    }
    if doc["version"] is None:
        del doc["version"]  # v1.0 files carry no version key
    return yaml.safe_dump(doc, sort_keys=False)
