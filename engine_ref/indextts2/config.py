"""IndexTTS2Config: the whole config.yaml of an IndexTTS-2 checkpoint directory, typed.

Sections are parsed by the modules that own them (gpt: `gpt.config`, semantic_codec: `semantic_codec`, s2mel:
`s2mel.config`); this module adds the top-level file names, the emotion bank's row counts, the vocoder repo and
the version, and the checks that tie the sections together (one width flowing from w2v-BERT through the codec
into the length regulator, the mel the DiT and the vocoder share). Every missing or mistyped key is a
`ConfigError` naming the dotted key. Training-only keys (dataset.mel, DiT dropouts, ...) are accepted and listed in
`ignored_keys`.

Family guard: an IndexTTS 1.x config.yaml (version 1.0/1.5, a `bigvgan:` section, no `s2mel:`) is refused with
a one-line error that points at the right engine, so a wrong --model never fails deep inside a checkpoint load.

IndexTTS-2.5 (`family="indextts2.5"`, as `engine_ref.families.detect_family` says; the 2.0 entry points pass
no family and so refuse a `version: 2.5` file with a pointer to the 2.5 loader): the same
sections with gpt.number_text_tokens 60509, no `dataset:` (the tiktoken vocabulary and codec.pth are fixed file
names upstream), `vocoder.name` naming the generator file; `gpt` parses as `GPTv25Config` (3 conditioning rows).
The family is an argument because the files decide it (a 2.5 config.yaml reportedly still says version 2.0).

Two widths upstream hard-codes in constructors (w2v-BERT's 1024 fed to the conformers, the 1024-wide emotion
latent) are optional keys `gpt.feature_dim` / `gpt.emo_latent_dim` here: the official file lacks them and gets
the official values; the tiny preset writes them. The s2mel ``gpt_layer`` input is `gpt.model_dim` (upstream
hard-codes 1280, the official model_dim).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_ref.errors import ConfigError
from engine_ref.indextts2.emotion import EMOTIONS
from engine_ref.indextts2.gpt.config import GPTv2Config, parse_gpt_v2
from engine_ref.indextts2.s2mel.config import S2MelConfig, parse_s2mel_config
from engine_ref.indextts2.semantic_codec import SemanticCodecConfig, parse_semantic_codec_config
from engine_ref.typed_config import build_dataclass, coerce_value, read_yaml

__all__ = ["IndexTTS2Config", "DatasetSection", "VocoderSection", "parse_v2_config", "load_v2_config",
           "v2_config_to_mapping", "SUPPORTED_V2_VERSIONS", "is_v1_config"]

SUPPORTED_V2_VERSIONS = ("2.0", "2.5")
V2_FAMILY, V25_FAMILY = "indextts2", "indextts2.5"  # engine_ref.families names (not imported: no cycle)
_FIX_FILE = "use the config.yaml shipped with the IndexTTS-2 checkpoints"


@dataclass(frozen=True)
class DatasetSection:
    """``dataset:``: only the tokenizer file is used at inference (its mel block describes 1.x training)."""

    bpe_model: str


@dataclass(frozen=True)
class VocoderSection:
    """``vocoder:``: the Hugging Face repo of the BigVGAN v2 generator (a dependency, not a file in the dir)."""

    name: str
    type: str = "bigvgan"


@dataclass(frozen=True)
class _TopLevel:
    """The flat top-level keys (file names relative to the model directory)."""

    gpt_checkpoint: str
    w2v_stat: str
    s2mel_checkpoint: str
    emo_matrix: str  # feat2.pt: emotion rows [73, model_dim]
    spk_matrix: str  # feat1.pt: speaker-style rows [73, 192]
    emo_num: tuple[int, ...]
    qwen_emo_path: str
    version: str


@dataclass(frozen=True)
class IndexTTS2Config:
    gpt: GPTv2Config  # GPTv25Config for IndexTTS-2.5
    semantic_codec: SemanticCodecConfig
    s2mel: S2MelConfig
    dataset: DatasetSection | None  # None for IndexTTS-2.5 (no bpe.model)
    vocoder: VocoderSection
    gpt_checkpoint: str
    w2v_stat: str
    s2mel_checkpoint: str
    emo_matrix: str
    spk_matrix: str
    emo_num: tuple[int, ...]
    qwen_emo_path: str
    version: str
    ignored_keys: tuple[str, ...] = ()
    family: str = V2_FAMILY

    @property
    def is_v25(self) -> bool:
        return self.family == V25_FAMILY

    @property
    def bpe_model(self) -> str:
        if self.dataset is None:
            raise ConfigError("this IndexTTS-2.5 config.yaml has no dataset.bpe_model (2.5 uses a tiktoken vocabulary)",
                              "load the directory with engine_ref.indextts2.v25 (triton-tts picks it by itself)")
        return self.dataset.bpe_model

    @property
    def sample_rate(self) -> int:
        """Output rate: the s2mel mel space (22050 Hz), which the vocoder must match."""
        return self.s2mel.preprocess_params.sr

    @property
    def hop_length(self) -> int:
        return self.s2mel.preprocess_params.spect_params.hop_length

    @property
    def semantic_dim(self) -> int:
        """Width of the w2v-BERT features, the codec's embeddings and the regulator input (1024 official)."""
        return self.gpt.feature_dim


_KNOWN_TOP_LEVEL = {f.name for f in dataclasses.fields(_TopLevel)} | {"gpt", "semantic_codec", "s2mel", "dataset",
                                                                       "vocoder"}


def is_v1_config(data: Any) -> bool:
    """An IndexTTS 1.0/1.5 config.yaml: a `bigvgan:` section (the 1.x vocoder) and no `s2mel:` section."""
    if not isinstance(data, dict):
        return False
    version = str(data.get("version", "1.0"))
    return "s2mel" not in data and ("bigvgan" in data or version.startswith("1"))


def _ignored(data: dict) -> tuple[str, ...]:
    out = [k for k in data if k not in _KNOWN_TOP_LEVEL]
    known_gpt = {f.name for f in dataclasses.fields(GPTv2Config)}
    out += [f"gpt.{k}" for k in (data.get("gpt") or {}) if k not in known_gpt]
    dataset = data.get("dataset") or {}
    out += [f"dataset.{k}" for k in dataset if k != "bpe_model"] if isinstance(dataset, dict) else []
    return tuple(sorted(out))


def _require_section(data: dict, name: str, source: str) -> Any:
    if name not in data:
        raise ConfigError(f"{source} has no '{name}:' section", _FIX_FILE)
    return data[name]


def _check_consistency(cfg: IndexTTS2Config) -> None:
    """The cross-section rules the pipeline relies on, each naming both keys."""
    g, c, s = cfg.gpt, cfg.semantic_codec, cfg.s2mel
    fix = "restore both values from the official config.yaml"
    if c.hidden_size != g.feature_dim:
        raise ConfigError(f"semantic_codec.hidden_size ({c.hidden_size}) differs from the w2v-BERT width the GPT "
                          f"reads (gpt.feature_dim, {g.feature_dim})", fix)
    if s.length_regulator.in_channels != c.hidden_size:
        raise ConfigError(f"s2mel.length_regulator.in_channels ({s.length_regulator.in_channels}) differs from "
                          f"semantic_codec.hidden_size ({c.hidden_size})", fix)
    if c.codebook_size < g.start_mel_token:
        raise ConfigError(f"the GPT's mel codes 0..{g.start_mel_token - 1} must index the codec's "
                          f"{c.codebook_size} codewords (semantic_codec.codebook_size, gpt.start_mel_token)", fix)
    spect = s.preprocess_params.spect_params
    if spect.n_mels != s.DiT.in_channels:
        raise ConfigError(f"s2mel.preprocess_params.spect_params.n_mels ({spect.n_mels}) differs from "
                          f"s2mel.DiT.in_channels ({s.DiT.in_channels})", fix)
    if len(cfg.emo_num) != len(EMOTIONS) or min(cfg.emo_num) < 1:
        raise ConfigError(f"emo_num must hold {len(EMOTIONS)} positive row counts, found {list(cfg.emo_num)}",
                          "restore emo_num from the official config.yaml")


def parse_v2_config(data: Any, source: str = "config.yaml", family: str | None = None) -> IndexTTS2Config:
    """Parsed YAML mapping -> IndexTTS2Config (validated); ConfigError naming the key on any problem.

    family: "indextts2" or "indextts2.5", as the directory's files decide it (engine_ref.families); None means
    IndexTTS-2, and a config.yaml declaring version 2.5 is then refused with a pointer to the 2.5 loader."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a YAML mapping", _FIX_FILE)
    if is_v1_config(data):
        version = data.get("version", "1.0")
        raise ConfigError(
            f"{source} describes an IndexTTS {version} model (a bigvgan: section, no s2mel:), not IndexTTS2",
            "load it with the IndexTTS 1.x engine (engine_ref.indextts.synthesizer.Synthesizer; `triton-tts synth --model` "
            "picks the engine from the directory)",
        )
    version = coerce_value(_require_section(data, "version", source), str, "version")
    if version not in SUPPORTED_V2_VERSIONS:
        raise ConfigError(f"{source} declares version {version}: IndexTTS2 version {version} is unknown",
                          f"use an IndexTTS-2 / IndexTTS-2.5 ({', '.join(SUPPORTED_V2_VERSIONS)}) checkpoint directory")
    if family is None:
        if version == "2.5":
            raise ConfigError(f"{source} declares version 2.5: an IndexTTS-2.5 config.yaml, which the IndexTTS-2 "
                              "loader does not read",
                              "load the directory with engine_ref.indextts2.v25.loader.load_v25_model "
                              "(`triton-tts synth --model` picks the engine by itself)")
        family = V2_FAMILY
    if family not in (V2_FAMILY, V25_FAMILY):
        raise ValueError(f"unknown IndexTTS2 family {family!r}")
    v25 = family == V25_FAMILY
    if v25:
        from engine_ref.indextts2.v25.codec_decoder import parse_codec25_config
        from engine_ref.indextts2.v25.gpt import parse_gpt_v25

        gpt: GPTv2Config = parse_gpt_v25(_require_section(data, "gpt", source))
        codec = parse_codec25_config(_require_section(data, "semantic_codec", source))
        section = data.get("dataset")
        dataset = (coerce_value(section, DatasetSection, "dataset")
                   if isinstance(section, dict) and "bpe_model" in section else None)
    else:
        gpt = parse_gpt_v2(_require_section(data, "gpt", source))
        codec = parse_semantic_codec_config(_require_section(data, "semantic_codec", source))
        dataset = coerce_value(_require_section(data, "dataset", source), DatasetSection, "dataset")
    s2mel = parse_s2mel_config(_require_section(data, "s2mel", source))
    vocoder = coerce_value(_require_section(data, "vocoder", source), VocoderSection, "vocoder")
    top = build_dataclass(_TopLevel, data, "")
    cfg = IndexTTS2Config(gpt=gpt, semantic_codec=codec, s2mel=s2mel, dataset=dataset, vocoder=vocoder,
                          **{f.name: getattr(top, f.name) for f in dataclasses.fields(_TopLevel)},
                          ignored_keys=_ignored(data), family=family)
    _check_consistency(cfg)
    return cfg


def load_v2_config(path: str | Path, family: str | None = None) -> IndexTTS2Config:
    """Read and validate an IndexTTS2 config.yaml; every failure is a ConfigError naming the file or key.

    family: see `parse_v2_config` (None: IndexTTS-2)."""
    data = read_yaml(path, "point --model at the IndexTTS-2 checkpoint directory")
    return parse_v2_config(data, source=str(path), family=family)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


def v2_config_to_mapping(cfg: IndexTTS2Config, *, hardcoded_widths: bool = False) -> dict:
    """The config as a YAML-ready mapping in the official key order (presets write it).

    hardcoded_widths: also write gpt.feature_dim / gpt.emo_latent_dim (tiny presets only; the official file
    lacks them). Version is written as a number, like the official file (`version: 2.0`).
    """
    gpt = _plain(cfg.gpt)
    for derived in ("max_conditioning_inputs", "condition_num_latent", "train_solo_embeddings"):
        gpt.pop(derived)
    if not hardcoded_widths:
        gpt.pop("feature_dim")
        gpt.pop("emo_latent_dim")
    out = {
        "dataset": _plain(cfg.dataset),
        "gpt": gpt,
        "semantic_codec": _plain(cfg.semantic_codec),
        "s2mel": _plain(cfg.s2mel),
        "gpt_checkpoint": cfg.gpt_checkpoint,
        "w2v_stat": cfg.w2v_stat,
        "s2mel_checkpoint": cfg.s2mel_checkpoint,
        "emo_matrix": cfg.emo_matrix,
        "spk_matrix": cfg.spk_matrix,
        "emo_num": list(cfg.emo_num),
        "qwen_emo_path": cfg.qwen_emo_path,
        "vocoder": _plain(cfg.vocoder),
        "version": float(cfg.version),
    }
    if cfg.dataset is None:
        del out["dataset"]  # IndexTTS-2.5: no dataset section
    return out
