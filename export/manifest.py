"""The export manifest: the contract between `export/` and everything that serves the graphs.

One JSON file beside the artifacts records, per component, the file and its sha256 (external data included),
the opset, every input/output with dtype and shape (symbolic dims named, each with a [min, opt, max] range), the
precision, the parity error measured against engine_ref, and the hashes of the source model files. Serving reads
names and shapes from here and never guesses them; a missing or altered artifact is reported by name on read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine_ref.errors import ModelFilesError

MANIFEST_NAME = "manifest.json"
FORMAT = "triton-tts-export/1"
# Bump when the exported graphs change meaning, so stale exports are rebuilt rather than reused.
EXPORT_CODE_VERSION = 3  # 3: model.family is the families constant; GPT extra has cond_rows; IndexTTS2


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy-style: float32, float16, int64, ...
    shape: tuple[int | str, ...]  # str = symbolic dim name, looked up in Component.dims


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Parity:
    """max_abs / max_rel per output over all verification cases (rel = max|ours-ref| / max|ref|)."""

    max_abs: float
    max_rel: float
    tolerance: float
    cases: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Component:
    name: str
    file: str
    sha256: str
    opset: int
    precision: str  # fp32 | fp16 | int8 | int4
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    dims: dict[str, DimRange]
    parity: Parity | None
    external_data: tuple[str, ...] = ()  # files beside `file` holding its weights
    extra: dict[str, Any] = field(default_factory=dict)  # component-specific facts (e.g. KV layout)

    def input(self, name: str) -> TensorInfo:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorInfo:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class Manifest:
    format: str
    export_code_version: int
    model: dict[str, Any]  # version, source dir, file hashes, and the config numbers serving needs
    assets: dict[str, str]  # role -> file copied beside the graphs (config.yaml, bpe.model)
    components: dict[str, Component]

    def component(self, name: str, precision: str | None = None) -> Component:
        key = name if precision is None else f"{name}@{precision}"
        if key not in self.components:
            have = ", ".join(sorted(self.components))
            raise ModelFilesError(
                f"the export has no component '{key}' (it has: {have})",
                "re-run `triton-tts export` with that component/precision",
            )
        return self.components[key]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _to_json(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _to_json(v) for k, v in asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    return obj


def write_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_to_json(manifest), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _component(d: dict) -> Component:
    return Component(
        name=d["name"], file=d["file"], sha256=d["sha256"], opset=int(d["opset"]), precision=d["precision"],
        inputs=tuple(TensorInfo(t["name"], t["dtype"], tuple(t["shape"])) for t in d["inputs"]),
        outputs=tuple(TensorInfo(t["name"], t["dtype"], tuple(t["shape"])) for t in d["outputs"]),
        dims={k: DimRange(**v) for k, v in d["dims"].items()},
        parity=Parity(**{**d["parity"], "cases": tuple(d["parity"].get("cases", ()))}) if d.get("parity") else None,
        external_data=tuple(d.get("external_data", ())),
        extra=d.get("extra", {}),
    )


def read_manifest(export_dir: str | os.PathLike, *, check_files: bool = True, deep: bool = False) -> Manifest:
    """Load and check a manifest: every artifact it names must exist (and, with deep=True, match its sha256)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelFilesError(f"{path} does not exist", f"run `triton-tts export --out {export_dir}` first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise ModelFilesError(
                f"{path} has format {raw.get('format')!r}, this version reads {FORMAT!r}",
                "re-run `triton-tts export` with this version",
            )
        manifest = Manifest(
            format=raw["format"], export_code_version=int(raw["export_code_version"]), model=raw["model"],
            assets=raw["assets"], components={k: _component(v) for k, v in raw["components"].items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ModelFilesError):
            raise
        raise ModelFilesError(f"{path} is malformed ({exc!r})", "re-run `triton-tts export`") from None
    if check_files:
        problems = artifact_problems(export_dir, manifest, deep=deep)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ModelFilesError(problems[0] + more, f"re-run `triton-tts export` into {export_dir}")
    return manifest


def artifact_problems(export_dir: Path, manifest: Manifest, *, deep: bool = False) -> list[str]:
    """One message per missing, empty or (deep) altered artifact, each naming the file."""
    out = []
    for comp in manifest.components.values():
        for fname in (comp.file, *comp.external_data):
            p = export_dir / fname
            if not p.is_file():
                out.append(f"artifact {fname} of component '{comp.name}' is missing from {export_dir}")
            elif p.stat().st_size == 0:
                out.append(f"artifact {fname} of component '{comp.name}' is empty")
        if deep and (export_dir / comp.file).is_file() and component_digest(export_dir, comp) != comp.sha256:
            out.append(f"artifact {comp.file} of component '{comp.name}' does not match its sha256 (altered or corrupt)")
    for role, fname in manifest.assets.items():
        if not (export_dir / fname).is_file():
            out.append(f"asset {fname} ({role}) is missing from {export_dir}")
    return out


def component_digest(export_dir: Path, comp: Component) -> str:
    """sha256 over the graph file and its external data files, in order."""
    files = [comp.file, *comp.external_data]
    if len(files) == 1:
        return sha256_file(export_dir / comp.file)
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(export_dir / f).encode())
    return h.hexdigest()


def verify_component(export_dir: str | os.PathLike, comp: Component) -> None:
    """Refuse a graph whose files differ from what the export recorded (tampered, truncated or half-copied)."""
    export_dir = Path(export_dir)
    for fname in (comp.file, *comp.external_data):
        if not (export_dir / fname).is_file():
            raise ModelFilesError(f"artifact {fname} of component '{comp.name}' is missing from {export_dir}",
                                  f"re-run `triton-tts export` into {export_dir}")
    if component_digest(export_dir, comp) != comp.sha256:
        raise ModelFilesError(
            f"artifact {comp.file} of component '{comp.name}' does not match the sha256 in the manifest "
            "(altered, truncated or from another export)", f"re-run `triton-tts export` into {export_dir}")
