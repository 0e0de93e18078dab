"""Typed model configuration parsed from the official IndexTTS config.yaml (v1.0 and v1.5).

The official files carry training-only sections (vqvae:, optimizer and discriminator settings, ...): they are
accepted and ignored. Only the keys inference needs are read; a missing one or one of the wrong type raises a
`ConfigError` naming the key (e.g. ``gpt.model_dim``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine_ref.errors import ConfigError

# Versions whose architecture this engine implements (v1.0 has no `version` key).
SUPPORTED_VERSIONS = ("1.0", "1.5")


@dataclass(frozen=True)
class ConditionModuleConfig:
    """Conformer encoder + perceiver resampler settings (gpt.condition_module)."""

    output_size: int
    linear_units: int
    attention_heads: int
    num_blocks: int
    input_layer: str
    perceiver_mult: int = 2


@dataclass(frozen=True)
class GPTConfig:
    """The UnifiedVoice GPT-2 decoder and its embeddings (gpt:)."""

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
    mel_length_compression: int = 1024
    use_mel_codes_as_input: bool = True
    train_solo_embeddings: bool = False
    max_conditioning_inputs: int = 1
    condition_num_latent: int = 32

    @property
    def mel_positions(self) -> int:
        """Rows of mel_pos_embedding: max_mel_tokens + 2 + max_conditioning_inputs (upstream layout)."""
        return self.max_mel_tokens + 2 + self.max_conditioning_inputs

    @property
    def text_positions(self) -> int:
        """Rows of text_pos_embedding: max_text_tokens + 2."""
        return self.max_text_tokens + 2

    @property
    def text_vocab(self) -> int:
        """Rows of text_embedding: number_text_tokens + 1."""
        return self.number_text_tokens + 1


@dataclass(frozen=True)
class BigVGANConfig:
    """The BigVGAN vocoder with its ECAPA-TDNN speaker encoder (bigvgan:)."""

    resblock: str
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    speaker_embedding_dim: int
    gpt_dim: int
    activation: str
    num_mels: int
    sampling_rate: int
    feat_upsample: bool = False
    cond_d_vector_in_each_upsampling_layer: bool = True
    snake_logscale: bool = True

    @property
    def hop_length(self) -> int:
        """Samples per latent frame: the product of the upsample rates (1024 for IndexTTS)."""
        n = 1
        for r in self.upsample_rates:
            n *= r
        return n


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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return "list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; YAML gives lists where we keep tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}' must be a mapping, found {type(value).__name__}",
                "restore the section from the config.yaml shipped with the checkpoints",
            )
        return _build(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"config key '{key}' must be a list, found {type(value).__name__} ({value!r})",
                "write it as a YAML list, e.g. [4, 4, 2]",
            )
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, found {value!r}", "set it to true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, found {value!r}", "set it to a whole number")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, found {value!r}", "set it to a number")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `resblock: 1` or `version: 1.5`
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, found {value!r}", "quote the value")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug here, not in the user's file


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "ignored_keys":
            continue
        key = prefix + f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(
                    f"config.yaml is missing the required key '{key}' ({_type_name(hints[f.name])})",
                    "use the config.yaml shipped with the checkpoints, or add the key",
                )
            continue
        kwargs[f.name] = _coerce(data[f.name], hints[f.name], key)
    return cls(**kwargs)


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
    for section in ("gpt", "bigvgan"):
        if section not in data:
            raise ConfigError(
                f"{source} has no '{section}:' section", "use the config.yaml shipped with the checkpoints"
            )
    gpt = _coerce(data["gpt"], GPTConfig, "gpt")
    bigvgan = _coerce(data["bigvgan"], BigVGANConfig, "bigvgan")
    dataset = data.get("dataset") or {}
    if not isinstance(dataset, dict):
        raise ConfigError(f"config key 'dataset' must be a mapping, found {dataset!r}", "restore the dataset: section")
    version = _coerce(data.get("version", "1.0"), str, "version")
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
        bpe_model=_coerce(dataset.get("bpe_model", "bpe.model"), str, "dataset.bpe_model"),
        gpt_checkpoint=_coerce(data.get("gpt_checkpoint", "gpt.pth"), str, "gpt_checkpoint"),
        bigvgan_checkpoint=_coerce(data.get("bigvgan_checkpoint", "bigvgan_generator.pth"), str, "bigvgan_checkpoint"),
        version=version,
        ignored_keys=_ignored(data),
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read and validate config.yaml; every failure is a `ConfigError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", "point --model at a directory holding config.yaml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "re-download config.yaml") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}", "re-download config.yaml or fix the syntax") from None
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
