"""TensorRT plans from the exported ONNX graphs, with explicit optimization profiles, cached per GPU.

A plan is only valid for the GPU model and TensorRT version that built it, so plans live in a cache directory under
a key made of (gpu, TensorRT version, the component's manifest entry, the build options): a re-run with nothing
changed builds nothing, and a new GPU or export rebuilds only what changed. `plans.json` beside the plans tells
serving which plan holds which component and which profiles (index = Triton's `profile` number) it has.

Profiles come from the manifest: every symbolic dim of an input has a DimRange(min, opt, max). Options narrow them:
`overrides` ("dim" for every component, "component/dim" for one), `max_batch` (caps the dims named in
`batch_dims`), and several profiles per component, e.g. prefill vs decode for a KV-cache decoder, from
`PlanOptions.profile_sets[component.name]` or else the exporter's `component.extra["trt_profiles"]`
(a list of {"name": str, "dims": {dim: [min, opt, max]}}); without either a component gets one profile "default".
Ranges may only narrow what the export declares (the graph was verified and sized for that range, e.g. position
tables); a dim whose manifest range is a single value is static and cannot be changed. All past_key_values.*
inputs must end up with identical shape ranges in every profile: one past length for all layers.

This machine may have neither a GPU nor TensorRT: `tensorrt` is imported lazily, and its absence (or no visible
CUDA GPU) is one TensorRTUnavailable line with what to do. Profile resolution and validation need neither
(`build-plans --check`).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from engine_ref.errors import ConfigError, InputError, ModelFilesError, TTSError
from export.manifest import Component, DimRange, Manifest, read_manifest

log = logging.getLogger("export.tensorrt")

INDEX_NAME = "plans.json"
INDEX_FORMAT = "triton-tts-plans/1"
# Bump when build_plan changes what it puts in a plan, so cached plans are rebuilt rather than reused.
PLAN_CODE_VERSION = 1
MIN_TRT_MAJOR = 10
DEFAULT_BATCH_DIMS = ("batch",)
KV_INPUT_PREFIXES = ("past_key_values",)
QUANTIZED_PRECISIONS = ("int8", "int4")  # QDQ graphs: built strongly typed, the graph fixes every dtype

_FIX_NO_TRT = (
    "run `triton-tts build-plans` inside the NGC tritonserver image (nvcr.io/nvidia/tritonserver:<yy.mm>-py3, "
    "TensorRT 10) on a GPU node, or serve the ONNX graphs with the cpu flavor instead of TensorRT plans"
)


class TensorRTUnavailable(TTSError):
    """No TensorRT python package, an unsupported version, or no CUDA GPU: plans cannot be built here."""


class ProfileError(ConfigError):
    """Optimization profile ranges that are inconsistent, unknown, or outside what the export supports."""


class PlanBuildError(TTSError):
    """TensorRT rejected a graph (parser) or failed to build it."""


# ---------------------------------------------------------------------------------------------------------------
# Options and profiles


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile: a name and dim ranges applied on top of the manifest and global overrides."""

    name: str
    dims: Mapping[str, DimRange] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanOptions:
    fp16: bool = True
    workspace_gib: float = 4
    max_batch: int | None = None
    overrides: Mapping[str, DimRange] | None = None  # "dim" or "component/dim" -> range
    builder_optimization_level: int = 3
    timing_cache: Path | None = None  # speeds rebuilds; not part of the plan key (it changes no semantics)
    profile_sets: Mapping[str, tuple[ProfileSpec, ...]] | None = None  # component name -> its profiles
    batch_dims: tuple[str, ...] = DEFAULT_BATCH_DIMS

    def __post_init__(self) -> None:
        if not self.workspace_gib > 0:
            raise InputError(f"workspace_gib must be > 0 (got {self.workspace_gib})", "pass e.g. --workspace-gib 4")
        if not 0 <= self.builder_optimization_level <= 5:
            raise InputError(
                f"builder_optimization_level must be 0..5 (got {self.builder_optimization_level})",
                "use 3 (TensorRT's default) or 5 for the slowest build and fastest plan",
            )
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError(f"max_batch must be >= 1 (got {self.max_batch})", "pass --max-batch 1 or more")
        for name, specs in (self.profile_sets or {}).items():
            names = [s.name for s in specs]
            if not names or len(set(names)) != len(names):
                raise InputError(
                    f"profile set for '{name}' must list at least one profile with distinct names (got {names})",
                    "give every profile of a component its own name",
                )

    def for_component(self, comp: Component) -> PlanOptions:
        """These options as they concern one component: the plan key then ignores other components' settings."""
        overrides = {}
        for key, rng in (self.overrides or {}).items():
            scope, dim = _split_override_key(key)
            if (scope is None and dim in comp.dims) or scope == comp.name:
                overrides[key if scope is None else f"{scope}/{dim}"] = rng
        sets = {comp.name: self.profile_sets[comp.name]} if comp.name in (self.profile_sets or {}) else None
        return dataclasses.replace(self, overrides=overrides or None, profile_sets=sets)


class ShapeRange(NamedTuple):
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True, eq=True)
class Profile(Mapping):
    """input name -> ShapeRange(min, opt, max); `dims` holds the resolved range of every dim used."""

    name: str
    shapes: Mapping[str, ShapeRange]
    dims: Mapping[str, DimRange]

    def __getitem__(self, key: str) -> ShapeRange:
        return self.shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dims": {k: [r.min, r.opt, r.max] for k, r in self.dims.items()},
            "shapes": {k: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)} for k, s in self.shapes.items()},
        }


def _split_override_key(key: str) -> tuple[str | None, str]:
    scope, sep, dim = key.rpartition("/")
    return (scope, dim) if sep else (None, key)


def _check_range(r: DimRange, dim: str, where: str, fix: str, error: type[TTSError] = ProfileError) -> None:
    if r.min < 0:
        raise error(f"dim '{dim}' {where} has min {r.min} < 0", fix)
    if r.min > r.opt:
        raise error(f"dim '{dim}' {where} has min {r.min} > opt {r.opt}", fix)
    if r.opt > r.max:
        raise error(f"dim '{dim}' {where} has opt {r.opt} > max {r.max}", fix)


def _fmt(r: DimRange) -> str:
    return f"{r.min}:{r.opt}:{r.max}"


def _apply(dims: dict[str, DimRange], base: Mapping[str, DimRange], comp: str, dim: str, rng: DimRange,
           source: str) -> None:
    """Narrow one dim by an override, refusing unknown dims, static dims and ranges outside the export's."""
    if dim not in base:
        known = ", ".join(sorted(base)) or "none"
        raise ProfileError(
            f"{source} names dim '{dim}', which component '{comp}' does not have (its dims: {known})",
            "use one of its dim names, or scope it as COMPONENT/DIM for the component that has it",
        )
    exported = base[dim]
    if exported.min == exported.max and rng != exported:
        raise ProfileError(
            f"{source} changes dim '{dim}' of component '{comp}', which is static ({exported.min}) in the export",
            f"drop the override of '{dim}', or re-export with '{dim}' dynamic",
        )
    _check_range(rng, dim, f"in {source} ({_fmt(rng)})", f"give '{dim}' a range with min <= opt <= max")
    if rng.min < exported.min or rng.max > exported.max:
        raise ProfileError(
            f"{source} sets dim '{dim}' of component '{comp}' to {rng.min}..{rng.max}, outside the exported range "
            f"{exported.min}..{exported.max}",
            f"keep '{dim}' within {exported.min}..{exported.max}, or re-export with a wider range",
        )
    dims[dim] = rng


def _specs(comp: Component, opts: PlanOptions) -> tuple[ProfileSpec, ...]:
    if opts.profile_sets and comp.name in opts.profile_sets:
        return tuple(opts.profile_sets[comp.name])
    raw = comp.extra.get("trt_profiles") if isinstance(comp.extra, Mapping) else None
    if not raw:
        return (ProfileSpec("default"),)
    try:
        return tuple(
            ProfileSpec(str(p["name"]), {k: DimRange(*map(int, v)) for k, v in p.get("dims", {}).items()}) for p in raw
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFilesError(
            f"component '{comp.name}' has malformed extra.trt_profiles ({exc!r})", "re-run `triton-tts export`"
        ) from None


def profiles_for(component: Component, opts: PlanOptions) -> list[Profile]:
    """The optimization profiles of one component: manifest ranges, then overrides, profile spec, max_batch cap."""
    comp = component.name
    base = dict(component.dims)
    for dim, r in base.items():
        _check_range(r, dim, f"of component '{comp}' in the manifest ({_fmt(r)})", "re-run `triton-tts export`",
                     ModelFilesError)
    for t in component.inputs:
        for d in t.shape:
            if isinstance(d, str) and d not in base:
                raise ModelFilesError(
                    f"input '{t.name}' of component '{comp}' uses dim '{d}', which has no range in the manifest",
                    "re-run `triton-tts export` (every symbolic dim needs a min/opt/max range)",
                )
    common = dict(base)
    for key, rng in (opts.overrides or {}).items():
        scope, dim = _split_override_key(key)
        if scope is None or scope == comp:
            _apply(common, base, comp, dim, rng, f"override '{key}'")
    specs = _specs(component, opts)
    if len({s.name for s in specs}) != len(specs):
        raise ProfileError(f"component '{comp}' has two profiles with one name", "give every profile its own name")
    profiles = []
    for spec in specs:
        dims = dict(common)
        for dim, rng in spec.dims.items():
            _apply(dims, base, comp, dim, rng, f"profile '{spec.name}'")
        if opts.max_batch is not None:
            for dim in opts.batch_dims:
                if dim in dims:
                    dims[dim] = _cap_batch(dims[dim], dim, opts.max_batch, comp)
        used = {d for t in component.inputs for d in t.shape if isinstance(d, str)}
        dims = {k: v for k, v in dims.items() if k in used}
        shapes = {
            t.name: ShapeRange(*(tuple(_pick(d, dims, which) for d in t.shape) for which in ("min", "opt", "max")))
            for t in component.inputs
        }
        profile = Profile(spec.name, shapes, dims)
        _check_kv_cache(component, profile)
        profiles.append(profile)
    return profiles


def _pick(d: int | str, dims: Mapping[str, DimRange], which: str) -> int:
    return int(d) if not isinstance(d, str) else int(getattr(dims[d], which))


def _cap_batch(r: DimRange, dim: str, max_batch: int, comp: str) -> DimRange:
    if max_batch < r.min:
        raise ProfileError(
            f"max_batch {max_batch} is below the minimum {r.min} of batch dim '{dim}' of component '{comp}'",
            f"pass --max-batch {r.min} or more",
        )
    hi = min(r.max, max_batch)
    return DimRange(r.min, min(r.opt, hi), hi)


def _check_kv_cache(component: Component, profile: Profile) -> None:
    """Every past_key_values.* input must accept the same shapes: one past length (and batch) for all layers."""
    past = [t for t in component.inputs if t.name.startswith(KV_INPUT_PREFIXES)]
    if len(past) < 2:
        return
    first = past[0]
    for t in past[1:]:
        if len(t.shape) != len(first.shape):
            raise ModelFilesError(
                f"KV-cache inputs '{first.name}' and '{t.name}' of component '{component.name}' differ in rank",
                "re-run `triton-tts export`",
            )
        a, b = profile[first.name], profile[t.name]
        if a == b:
            continue
        axis = next(i for i in range(len(t.shape)) if (a.min[i], a.opt[i], a.max[i]) != (b.min[i], b.opt[i], b.max[i]))
        raise ProfileError(
            f"profile '{profile.name}' of component '{component.name}': KV-cache inputs '{first.name}' (axis {axis} "
            f"= '{first.shape[axis]}' {a.min[axis]}:{a.opt[axis]}:{a.max[axis]}) and '{t.name}' ('{t.shape[axis]}' "
            f"{b.min[axis]}:{b.opt[axis]}:{b.max[axis]}) must share one range",
            "give all past_key_values.* inputs one past-length dim name in the export, or override them to one range",
        )


def parse_override(text: str) -> tuple[str, DimRange]:
    """`dim=min:opt:max` (or `dim=n` for a fixed size) -> (dim, DimRange); `dim` may be `component/dim`."""
    name, sep, spec = text.partition("=")
    parts = spec.split(":")
    try:
        if not sep or not name.strip() or len(parts) not in (1, 3):
            raise ValueError
        values = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"override '{text}' is not DIM=MIN:OPT:MAX", "write it like seq=1:128:600") from None
    lo, opt, hi = values if len(values) == 3 else values * 3
    return name.strip(), DimRange(lo, opt, hi)


# ---------------------------------------------------------------------------------------------------------------
# Environment and cache keys


@dataclass(frozen=True)
class TrtEnvironment:
    gpu_name: str
    trt_version: str
    compute_capability: str = ""


def _import_trt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - heavy, GPU-only, optional
    except Exception as exc:  # ImportError, or a broken install raising OSError on its shared libraries
        raise TensorRTUnavailable(f"TensorRT is not available (import tensorrt failed: {exc})", _FIX_NO_TRT) from None
    version = str(getattr(trt, "__version__", "0"))
    major = re.match(r"\d+", version)
    if not major or int(major.group()) < MIN_TRT_MAJOR:
        raise TensorRTUnavailable(
            f"TensorRT {version} is installed, this builder needs {MIN_TRT_MAJOR}.x or newer",
            "use a tritonserver image from 24.05 on (TensorRT 10), or pip install 'tensorrt>=10'",
        )
    return trt


def cuda_gpu() -> tuple[str, str]:
    """(name, compute capability) of CUDA device 0 via the driver library; no CUDA toolkit or torch needed."""
    lib = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise TensorRTUnavailable("no CUDA GPU visible (the NVIDIA driver library libcuda is not present)", _FIX_NO_TRT)
    count = ctypes.c_int(0)
    rc = lib.cuInit(0)
    if rc != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        raise TensorRTUnavailable(f"no CUDA GPU visible (cuInit returned CUDA error {rc})", _FIX_NO_TRT)
    dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    buf = ctypes.create_string_buffer(256)
    lib.cuDeviceGet(ctypes.byref(dev), 0)
    lib.cuDeviceGetName(buf, 256, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    return buf.value.decode(errors="replace").strip() or "unknown GPU", f"{major.value}.{minor.value}"


def environment(probe_gpu: Callable[[], tuple[str, str]] = cuda_gpu) -> TrtEnvironment:
    """The TensorRT version and GPU plans would be built for, or TensorRTUnavailable saying what is missing."""
    trt = _import_trt()
    name, cc = probe_gpu()
    return TrtEnvironment(gpu_name=name, trt_version=str(trt.__version__), compute_capability=cc)


def _options_fingerprint(opts: PlanOptions) -> dict[str, Any]:
    """Everything in the options that changes the built plan (the timing cache location does not)."""
    rng = lambda r: [r.min, r.opt, r.max]  # noqa: E731
    return {
        "fp16": bool(opts.fp16),
        "workspace_bytes": _workspace_bytes(opts),
        "max_batch": opts.max_batch,
        "overrides": {k: rng(v) for k, v in sorted((opts.overrides or {}).items())},
        "level": opts.builder_optimization_level,
        "profile_sets": {
            c: [{"name": s.name, "dims": {k: rng(v) for k, v in sorted(s.dims.items())}} for s in specs]
            for c, specs in sorted((opts.profile_sets or {}).items())
        },
        "batch_dims": list(opts.batch_dims),
    }


def _workspace_bytes(opts: PlanOptions) -> int:
    return int(opts.workspace_gib * (1 << 30))


def plan_key(gpu_name: str, trt_version: str, manifest_sha256: str, component: str, opts: PlanOptions) -> str:
    """Stable cache key: readable component prefix + digest of GPU, TensorRT, manifest entry and options."""
    payload = {
        "plan_code_version": PLAN_CODE_VERSION, "gpu": gpu_name, "trt": trt_version,
        "manifest": manifest_sha256, "component": component, "options": _options_fingerprint(opts),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', component)}-{digest[:20]}"


def plan_path(cache_dir: str | os.PathLike, key: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or key.startswith("."):
        raise InputError(f"plan key '{key}' is not a safe file name", "use plan_key() to make keys")
    return Path(cache_dir) / f"{key}.plan"


def component_entry_sha256(comp: Component) -> str:
    """Digest of a component's manifest entry minus parity: graph hash, I/O, dims, precision, extra."""
    entry = dataclasses.asdict(comp)
    entry.pop("parity", None)
    return hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Building


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe_parser_errors(parser, onnx_path: Path, limit: int = 3) -> str:
    """The parser's errors in one line, each naming its ONNX node (name and op), looked up in the graph if needed."""
    nodes = None
    parts = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        name = err.node_name() if hasattr(err, "node_name") else ""
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        idx = int(err.node())
        if not name and idx >= 0:
            if nodes is None:
                import onnx  # noqa: PLC0415

                nodes = list(onnx.load(str(onnx_path), load_external_data=False).graph.node)
            if idx < len(nodes):
                name, op = nodes[idx].name or f"#{idx}", op or nodes[idx].op_type
        where = f"node '{name}' ({op})" if name else "graph"
        parts.append(f"{where}: {str(err.desc()).strip()}")
    more = f" (+{len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more if parts else "unknown parser error"


def build_plan(onnx_path: str | os.PathLike, component: Component, opts: PlanOptions, out_path: str | os.PathLike,
               profiles: Sequence[Profile] | None = None) -> Path:
    """Parse one ONNX graph (external data beside it), add its profiles, build and write the plan atomically."""
    trt = _import_trt()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    profiles = list(profiles) if profiles is not None else profiles_for(component, opts)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTUnavailable("no CUDA GPU visible (TensorRT could not create a builder)", _FIX_NO_TRT)
    strongly_typed = component.precision in QUANTIZED_PRECISIONS
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data relative to the graph file
        raise PlanBuildError(
            f"TensorRT cannot parse {onnx_path.name} of component '{component.name}': "
            f"{describe_parser_errors(parser, onnx_path)}",
            "re-export with `triton-tts export` (opset 17), or serve this component with the ONNX (cpu) flavor",
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _workspace_bytes(opts))
    config.builder_optimization_level = opts.builder_optimization_level
    if opts.fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    dynamic = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if any(int(d) < 0 for d in t.shape):
            dynamic[t.name] = tuple(int(d) for d in t.shape)
    for p in profiles:
        missing = sorted(set(dynamic) - set(p))
        if missing:
            raise ModelFilesError(
                f"dynamic input(s) {', '.join(missing)} of {onnx_path.name} are not in the manifest of "
                f"'{component.name}'", "re-run `triton-tts export` so the manifest matches the graph",
            )
        prof = builder.create_optimization_profile()
        for name in dynamic:
            prof.set_shape(name, *p[name])
        config.add_optimization_profile(prof)
    cache = _load_timing_cache(config, opts.timing_cache)
    log.info("building TensorRT plan for %s (%d profile(s), fp16=%s)", component.name, len(profiles), opts.fp16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PlanBuildError(
            f"TensorRT failed to build component '{component.name}' (its log above says why)",
            "check the profile ranges (--override), raise --workspace-gib, or run with --debug",
        )
    _atomic_write(out_path, serialized)
    if opts.timing_cache is not None and cache is not None:
        _atomic_write(opts.timing_cache, config.get_timing_cache().serialize())
    return out_path


def _load_timing_cache(config, path: Path | None):
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s is from another GPU or TensorRT; starting a fresh one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


PlanBuilder = Callable[[Path, Component, PlanOptions, Path], Any]


def select_components(manifest: Manifest, names: Sequence[str] | None) -> dict[str, Component]:
    """Manifest key -> component for the requested names (a manifest key, or a base name for all its precisions)."""
    if not names:
        return dict(manifest.components)
    out: dict[str, Component] = {}
    for n in names:
        hits = {k: c for k, c in manifest.components.items() if k == n or c.name == n}
        if not hits:
            raise InputError(
                f"the export has no component '{n}' (it has: {', '.join(sorted(manifest.components))})",
                "pass one of those names to --component",
            )
        out.update(hits)
    return out


def resolve_profiles(manifest: Manifest, opts: PlanOptions,
                     components: Sequence[str] | None = None) -> dict[str, tuple[PlanOptions, list[Profile]]]:
    """Per selected component: its narrowed options and validated profiles; overrides must each match one."""
    selected = select_components(manifest, components)
    for key in opts.overrides or {}:
        scope, dim = _split_override_key(key)
        if not any((scope is None or scope == c.name) and dim in c.dims for c in selected.values()):
            raise ProfileError(
                f"override '{key}' matches no dim of the selected components ({', '.join(sorted(selected))})",
                "check the dim name against the manifest's dims, or drop the override",
            )
    for name in opts.profile_sets or {}:
        if not any(c.name == name for c in selected.values()):
            raise ProfileError(f"profile set for '{name}' names no selected component", "fix the component name")
    out = {}
    for key, comp in selected.items():
        copts = opts.for_component(comp)
        out[key] = (copts, profiles_for(comp, copts))
    return out


def build_plans(export_dir: str | os.PathLike, cache_dir: str | os.PathLike, opts: PlanOptions,
                components: Sequence[str] | None = None, *, builder: PlanBuilder | None = None,
                env: TrtEnvironment | None = None) -> dict[str, Path]:
    """Build (or reuse from the cache) one plan per component and write `plans.json`; returns key -> plan file.

    Validation (manifest, profiles) runs before TensorRT is touched, so bad options fail fast on any machine.
    `builder`/`env` are injectable so the cache logic is testable without a GPU.
    """
    export_dir, cache_dir = Path(export_dir), Path(cache_dir)
    manifest = read_manifest(export_dir)
    resolved = resolve_profiles(manifest, opts, components)
    env = env or environment()
    cache_dir.mkdir(parents=True, exist_ok=True)
    plans: dict[str, Path] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key, (copts, profiles) in resolved.items():
        comp = manifest.components[key]
        pkey = plan_key(env.gpu_name, env.trt_version, component_entry_sha256(comp), key, copts)
        path = plan_path(cache_dir, pkey)
        if path.is_file() and path.stat().st_size > 0:
            log.info("%s: plan %s is up to date", key, path.name)
        else:
            if builder is None:
                build_plan(export_dir / comp.file, comp, copts, path, profiles=profiles)
            else:
                builder(export_dir / comp.file, comp, copts, path)
            if not (path.is_file() and path.stat().st_size > 0):
                raise PlanBuildError(f"building component '{key}' produced no plan at {path}", "run with --debug")
            log.info("%s: built %s", key, path.name)
        plans[key] = path
        entries[key] = {
            "plan": path.name, "key": pkey, "component": comp.name, "precision": comp.precision,
            "onnx": comp.file, "fp16": copts.fp16, "profiles": [p.to_json() for p in profiles],
        }
    _write_index(cache_dir, env, entries)
    return plans


def _write_index(cache_dir: Path, env: TrtEnvironment, entries: dict[str, dict[str, Any]]) -> Path:
    """Merge this run's entries into plans.json (keeping other components built for the same GPU/TensorRT)."""
    path = cache_dir / INDEX_NAME
    header = {"format": INDEX_FORMAT, "gpu_name": env.gpu_name, "compute_capability": env.compute_capability,
              "trt_version": env.trt_version}
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
    components = {}
    if all(old.get(k) == v for k, v in header.items()):
        components = {k: v for k, v in old.get("components", {}).items()
                      if isinstance(v, dict) and (cache_dir / str(v.get("plan", ""))).is_file()}
    components.update(entries)
    text = json.dumps({**header, "components": dict(sorted(components.items()))}, indent=2) + "\n"
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):  # a no-op re-run leaves it untouched
        _atomic_write(path, text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-plans", help="build TensorRT plans (cached per GPU) from an export's ONNX graphs")
    p.add_argument("--export", required=True, metavar="DIR", help="export directory (with manifest.json)")
    p.add_argument("--cache", required=True, metavar="DIR", help="plan cache directory (plans + plans.json)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="allow fp16 kernels")
    p.add_argument("--max-batch", type=int, metavar="N", help="cap every batch dim's max at N")
    p.add_argument("--workspace-gib", type=float, default=4.0, metavar="X", help="builder workspace limit")
    p.add_argument("--component", action="append", metavar="NAME", help="only this component (repeatable)")
    p.add_argument("--override", action="append", default=[], metavar="DIM=MIN:OPT:MAX",
                   help="narrow a dim's range; COMPONENT/DIM=... for one component (repeatable)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0..5")
    p.add_argument("--timing-cache", metavar="FILE", help="reuse/update a TensorRT timing cache file")
    p.add_argument("--check", action="store_true", help="only validate and print the profiles (no TensorRT needed)")
    p.set_defaults(func=cmd_build_plans)


def cmd_build_plans(args: argparse.Namespace) -> int:
    """Exit 0 when every plan is built or cached; 2 with one line when options, export or TensorRT are wrong."""
    try:
        return _run_build_plans(args)
    except TTSError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2


def _run_build_plans(args: argparse.Namespace) -> int:
    overrides = dict(parse_override(o) for o in args.override)
    opts = PlanOptions(
        fp16=args.fp16, workspace_gib=args.workspace_gib, max_batch=args.max_batch, overrides=overrides or None,
        builder_optimization_level=args.opt_level, timing_cache=Path(args.timing_cache) if args.timing_cache else None,
    )
    if args.check:
        resolved = resolve_profiles(read_manifest(args.export), opts, args.component)
        for key, (_, profiles) in resolved.items():
            for i, p in enumerate(profiles):
                dims = ", ".join(f"{d}={_fmt(r)}" for d, r in p.dims.items()) or "static"
                print(f"{key} profile {i} '{p.name}': {dims}")
        return 0
    env = environment()  # first: without TensorRT/GPU there is nothing else worth reporting
    plans = build_plans(args.export, args.cache, opts, args.component, env=env)
    print(f"{len(plans)} plan(s) for {env.gpu_name} (TensorRT {env.trt_version}) in {args.cache}")
    for key, path in plans.items():
        print(f"  {key}: {path.name}")
    return 0
