"""Which model family a directory holds: IndexTTS 1.0/1.5, IndexTTS-2 or IndexTTS-2.5.

The families need different engines, files and options, so every entry point asks here first instead of guessing
from one file. Evidence, cheapest first and read without loading any checkpoint:

- files: ``codec.pth`` + a ``*.tiktoken`` vocabulary mean IndexTTS-2.5; ``s2mel.pth`` / ``wav2vec2bert_stats.pt`` /
  ``feat1.pt`` / ``feat2.pt`` / ``hf_cache/`` mean the 2.x family; ``bigvgan_generator.pth`` / ``dvae.pth`` mean 1.x;
- config.yaml: ``version`` (1.0 has none) and its sections (``s2mel:`` only in 2.x, ``bigvgan:`` only in 1.x).

Files win over the version number where they are specific: a third-party report (unverified) says the
IndexTTS-2.5 hub config.yaml still says ``version: 2.0``. A directory whose files and config.yaml belong to
different generations (1.x vs 2.x) is an error, as is a directory that is none of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from engine_ref.errors import ConfigError, InputError, ModelFilesError

if TYPE_CHECKING:
    from engine_ref.integrity import IntegrityReport

INDEXTTS = "indextts"  # 1.0 and 1.5
INDEXTTS2 = "indextts2"
INDEXTTS2_5 = "indextts2.5"
FAMILIES = (INDEXTTS, INDEXTTS2, INDEXTTS2_5)
FAMILY_NAMES = {INDEXTTS: "IndexTTS 1.x", INDEXTTS2: "IndexTTS-2", INDEXTTS2_5: "IndexTTS-2.5"}
_BY_VERSION = {"1.0": INDEXTTS, "1.5": INDEXTTS, "2.0": INDEXTTS2, "2.5": INDEXTTS2_5}
_V2_MARKERS = ("s2mel.pth", "wav2vec2bert_stats.pt", "feat1.pt", "feat2.pt", "hf_cache")
_V1_MARKERS = ("bigvgan_generator.pth", "dvae.pth", "bigvgan_discriminator.pth")


def _exists(path: Path) -> bool:
    return os.path.lexists(path)  # a dangling snapshot link still says which release this is


def _read_config(model_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(mapping, None) when config.yaml parses, (None, problem) when it exists but does not, (None, None) if absent."""
    path = model_dir / "config.yaml"
    if not path.is_file():
        return None, None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return None, f"config.yaml cannot be read ({type(exc).__name__})"
    if not isinstance(data, dict):
        return None, "config.yaml is not a mapping"
    return data, None


def config_version(data: dict[str, Any]) -> str | None:
    """config.yaml's `version` as text ("1.5", "2.0", "2.5"); None when absent (IndexTTS 1.0 has none)."""
    value = data.get("version")
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{float(value):.1f}"
    return str(value).strip()


def family_from_config(data: dict[str, Any]) -> str | None:
    version = config_version(data)
    if version is not None:
        if version not in _BY_VERSION:
            raise ConfigError(
                f"config.yaml declares version {version}; this engine knows IndexTTS {', '.join(_BY_VERSION)}",
                "use the config.yaml shipped with the checkpoints",
            )
        return _BY_VERSION[version]
    if "s2mel" in data:
        return INDEXTTS2
    if "bigvgan" in data or "bigvgan_checkpoint" in data:
        return INDEXTTS  # 1.0 writes no version
    return None


def _family_from_files(model_dir: Path) -> str | None:
    if _exists(model_dir / "codec.pth") or any(model_dir.glob("*.tiktoken")):
        return INDEXTTS2_5  # either one alone is half a 2.5 install: the check then names the other
    if any(_exists(model_dir / m) for m in _V2_MARKERS):
        return INDEXTTS2  # files common to 2.0 and 2.5; config.yaml may still say 2.5
    if any(_exists(model_dir / m) for m in _V1_MARKERS):
        return INDEXTTS
    return None


def detect_family(model_dir: str | os.PathLike) -> str:
    """"indextts" (1.0/1.5), "indextts2" (2.0) or "indextts2.5", from the files present and config.yaml.

    Raises `ModelFilesError` for a directory that is none of them (or mixes 1.x and 2.x), `ConfigError` for an
    unknown config.yaml `version`.
    """
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise ModelFilesError(f"model directory {root} {what}",
                              "pass the directory that holds config.yaml and the checkpoints")
    data, problem = _read_config(root)
    by_config = family_from_config(data) if data is not None else None
    by_files = _family_from_files(root)
    if by_files is None and by_config is None:
        raise ModelFilesError(_not_a_model(root, problem), "pass an IndexTTS 1.x, IndexTTS-2 or IndexTTS-2.5 model "
                              "directory (config.yaml with gpt.pth and the other checkpoints)")
    if by_files is None or by_config is None:
        return by_files or by_config  # type: ignore[return-value]
    if (by_files == INDEXTTS) != (by_config == INDEXTTS):
        shown = ", ".join(sorted(p.name for p in root.iterdir())[:8])
        raise ModelFilesError(
            f"{root} mixes releases: config.yaml is {FAMILY_NAMES[by_config]} but the files ({shown}) are "
            f"{FAMILY_NAMES[by_files]}",
            "keep each release in its own directory with its own config.yaml",
        )
    if INDEXTTS2_5 in (by_files, by_config):
        return INDEXTTS2_5  # codec.pth/tiktoken beat a config.yaml saying 2.0 (see the module docstring)
    return by_config


def _not_a_model(root: Path, config_problem: str | None) -> str:
    if config_problem:
        return (f"{root} is not a recognisable IndexTTS model directory: {config_problem}, "
                "and no checkpoint names a release")
    if (root / "config.json").is_file():
        return (f"{root} holds config.json (a Hugging Face model such as one of IndexTTS2's dependencies), "
                "not an IndexTTS model directory with config.yaml")
    names = sorted(p.name for p in root.iterdir())
    shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "") if names else "nothing"
    return f"{root} is not an IndexTTS model directory: no config.yaml and no known checkpoint (found {shown})"


def require_family(model_dir: str | os.PathLike, allowed: Iterable[str], *, feature: str) -> str:
    """`detect_family`, raising `InputError` when `feature` (e.g. "--emo-ref") needs another family."""
    family = detect_family(model_dir)
    wanted = tuple(allowed)
    if family not in wanted:
        names = " or ".join(FAMILY_NAMES[f] for f in wanted)
        raise InputError(
            f"{feature} needs an {names} model, but {model_dir} is {FAMILY_NAMES[family]}",
            f"drop {feature}, or pass an {names} model directory",
        )
    return family


def check_install(
    model_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, deep: bool = False
) -> IntegrityReport:
    """The integrity check for whichever family `model_dir` holds (IndexTTS2: main dir and every dependency).

    A directory whose config.yaml is unreadable (or of an unknown version) and that holds no release-specific
    file gets the 1.x table, whose config row names the problem, as `verify` always printed for it.
    """
    try:
        family = detect_family(model_dir)
    except (ModelFilesError, ConfigError):
        root = Path(model_dir).expanduser()
        if _family_from_files(root) is not None or not any(_exists(root / n) for n in ("config.yaml", "gpt.pth")):
            raise
        family = INDEXTTS
    if family == INDEXTTS:
        from dataclasses import replace

        from engine_ref.integrity import check_model_dir

        return replace(check_model_dir(model_dir, deep=deep), family=family)
    from engine_ref.indextts2.integrity import check_indextts2_dir

    return check_indextts2_dir(model_dir, cache_dir=cache_dir, deep=deep, family=family)
