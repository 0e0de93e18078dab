"""Typed configuration from YAML/JSON mappings: dataclass fields checked against their annotations.

Every model family parses its official config file through `build_dataclass`, so a missing key or one of the
wrong type is a `ConfigError` naming the dotted key (e.g. ``s2mel.DiT.hidden_dim``) the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from engine_ref.errors import ConfigError


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return "list"
    return getattr(tp, "__name__", str(tp))


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; YAML gives lists where we keep tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce_value(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}' must be a mapping, found {type(value).__name__}",
                "restore the section from the config.yaml shipped with the checkpoints",
            )
        return build_dataclass(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"config key '{key}' must be a list, found {type(value).__name__} ({value!r})",
                "write it as a YAML list, e.g. [4, 4, 2]",
            )
        inner = typing.get_args(tp)[0]
        return tuple(coerce_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
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


def build_dataclass(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "ignored_keys":
            continue
        key = prefix + f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(
                    f"config.yaml is missing the required key '{key}' ({type_name(hints[f.name])})",
                    "use the config.yaml shipped with the checkpoints, or add the key",
                )
            continue
        kwargs[f.name] = coerce_value(data[f.name], hints[f.name], key)
    return cls(**kwargs)


def read_yaml(path, missing_fix: str) -> Any:
    """A config.yaml's mapping; a missing, unreadable or malformed file is a ConfigError naming it (`missing_fix`:
    what to do when it does not exist)."""
    import yaml
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", missing_fix) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "re-download config.yaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}", "re-download config.yaml or fix the syntax") from None
