"""`triton-tts build-repo`: a ready Triton model repository from an export manifest and a few deployment knobs.

The templates under model_repository/templates are filled here and never edited by hand; tensor sections come from
the serving contract (model_repository/contract.py) and from the manifest (graph names, dtypes, dynamic dims).
Flavors:
- `cpu`: every model is a Python-backend model; graphs run in ONNX Runtime (the PyPI tritonserver has only the
  Python backend);
- `gpu`: the NGC container; stateless leaves (cond_encoder, vocoder) on the native onnxruntime backend, or on the
  tensorrt backend when TensorRT plans are given; the decoder stays a Python model (it owns the KV cache) running
  ONNX Runtime with the CUDA execution provider.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Iterable

from engine_ref.errors import InputError
from export.manifest import Component, TensorInfo, read_manifest
from model_repository import SPIN_CHOICES
from model_repository import contract as c

FLAVORS = ("cpu", "gpu")
_NP_TO_TRITON = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "bool": "BOOL",
                 "bfloat16": "BF16", "int16": "INT16"}


@dataclass(frozen=True)
class RepoOptions:
    flavor: str = "cpu"
    max_sequences: int = 8  # live sequences batched by the decoder
    max_queue: int = 256  # sequences waiting for a decoder slot before requests are refused
    decoder_precision: str = "fp32"  # fp32 | int8 | int4 (a variant present in the manifest) | fp16 (gpu)
    bls_instances: int = 1
    leaf_instances: int = 1
    threads: int = 0  # ONNX Runtime intra-op threads per session (0: its default)
    #: Which models' ORT worker threads busy-wait between ops: "all" (ORT's default), "decoder" or "none". Served
    #: v1.5 on 2 cores (perf/results, 2026-12-01), audio s per wall s at 1 / 8 concurrent requests: all 0.62-0.67 /
    #: 0.61-0.63, decoder 0.51 / 0.56, none 0.48 / 0.48, although a bare decode loop beside a vocoder loop did more
    #: work without spinning. "none" is for nodes where other workloads need the cores.
    spin_threads: str = "all"
    speaker_cache_size: int = 64
    max_text_chars: int = c.DEFAULT_MAX_TEXT_CHARS
    max_text_tokens_per_segment: int = c.DEFAULT_MAX_TEXT_TOKENS_PER_SEGMENT
    max_reference_seconds: float = 50.0
    segments_in_flight: int = 4
    request_timeout_s: float = 600.0
    plans_index: Path | None = None  # gpu: plans.json from `triton-tts build-plans`

    def validate(self) -> None:
        if self.flavor not in FLAVORS:
            raise InputError(f"unknown flavor '{self.flavor}'", f"choose one of: {', '.join(FLAVORS)}")
        for name in ("max_sequences", "max_queue", "bls_instances", "leaf_instances", "speaker_cache_size",
                     "max_text_chars", "max_text_tokens_per_segment", "segments_in_flight"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be >= 1", f"pass a positive {name}")
        if self.spin_threads not in SPIN_CHOICES:
            raise InputError(f"unknown spin_threads '{self.spin_threads}'", f"choose one of: {', '.join(SPIN_CHOICES)}")

    def spins(self, decoder: bool) -> str:
        """The spin_threads parameter ("1"/"0") of the decoder model or of a leaf model."""
        return "1" if self.spin_threads == "all" or (decoder and self.spin_threads == "decoder") else "0"


def _template(name: str) -> Template:
    return Template(resources.files("model_repository").joinpath("templates", name).read_text(encoding="utf-8"))


def _dims(dims: Iterable[int | str]) -> str:
    return "[ " + ", ".join(str(d if isinstance(d, int) else -1) for d in dims) + " ]"


def _field(f: c.Field, optional: bool | None = None) -> str:
    opt = f.optional if optional is None else optional
    return (f'  {{ name: "{f.name}" data_type: TYPE_{f.triton_type} dims: {_dims(f.dims)}'
            + (" optional: true" if opt else "") + " }")


def _tensor(t: TensorInfo) -> str:
    return f'  {{ name: "{t.name}" data_type: TYPE_{_NP_TO_TRITON[t.dtype]} dims: {_dims(t.shape)} }}'


def _params(values: dict[str, object]) -> str:
    return ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _python_model(repo: Path, name: str, module: str, cls: str, inputs: list[str], outputs: list[str],
                  params: dict[str, object], decoupled: bool, instances: int, kind: str) -> None:
    _write(repo / name / "config.pbtxt", _template("python_model.pbtxt.tmpl").substitute(
        name=name, decoupled=str(decoupled).lower(), inputs=",\n".join(inputs), outputs=",\n".join(outputs),
        instance_kind=kind, instances=instances, parameters=_params(params),
    ))
    _write(repo / name / "1" / "model.py", _template("python_model.py.tmpl").substitute(module=module, cls=cls))


def _native_model(repo: Path, name: str, comp: Component, export_dir: Path, instances: int,
                  plan: Path | None) -> None:
    version = repo / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        platform, filename = "tensorrt_plan", "model.plan"
        os.symlink(plan.resolve(), version / filename)
    else:
        platform, filename = "onnxruntime_onnx", "model.onnx"
        os.symlink((export_dir / comp.file).resolve(), version / filename)
        for extra in comp.external_data:  # ORT resolves external data relative to the graph file
            os.symlink((export_dir / extra).resolve(), version / extra)
    _write(repo / name / "config.pbtxt", _template("native_model.pbtxt.tmpl").substitute(
        name=name, platform=platform, model_filename=filename, instances=instances,
        inputs=",\n".join(_tensor(t) for t in comp.inputs), outputs=",\n".join(_tensor(t) for t in comp.outputs),
    ))


def _ensemble(repo: Path, name: str, bls: str, description: str) -> None:
    internal = {f.name: f"_{f.name.lower()}" for f in c.PREPROCESS_OUTPUTS}

    def maps(kind: str, pairs: Iterable[tuple[str, str]]) -> str:
        return "\n".join(f'      {kind} {{ key: "{k}" value: "{v}" }}' for k, v in pairs)

    pre_in = [c.TEXT.name, c.MAX_TEXT_TOKENS_PER_SEGMENT.name]
    bls_in = [f.name for f in c.REQUEST_INPUTS if f.name not in (c.TEXT.name,)]
    (repo / name / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version directory, even empty
    _write(repo / name / "config.pbtxt", _template("ensemble.pbtxt.tmpl").substitute(
        name=name, description=description, preprocess=c.PREPROCESS, bls=bls,
        inputs=",\n".join(_field(f) for f in c.REQUEST_INPUTS),
        outputs=",\n".join(_field(f) for f in c.RESPONSE_OUTPUTS),
        preprocess_inputs=maps("input_map", [(n, n) for n in pre_in]),
        preprocess_outputs=maps("output_map", internal.items()),
        bls_inputs=maps("input_map", [*((k, v) for k, v in internal.items()), *((n, n) for n in bls_in)]),
        bls_outputs=maps("output_map", [(f.name, f.name) for f in c.RESPONSE_OUTPUTS]),
    ))


def _plans(opts: RepoOptions) -> dict[str, Path]:
    if opts.plans_index is None:
        return {}
    index = json.loads(Path(opts.plans_index).read_text())
    base = Path(opts.plans_index).parent
    entries = index.get("components", {})  # written by export.tensorrt.build_plans
    return {name: base / entry["plan"] for name, entry in entries.items() if isinstance(entry, dict) and "plan" in entry}


def build_repository(export_dir: str | os.PathLike, out_dir: str | os.PathLike, opts: RepoOptions = RepoOptions()) -> Path:
    """Write a complete model repository into out_dir (replaced if present); returns its path."""
    opts.validate()
    export_dir = Path(export_dir).resolve()
    manifest = read_manifest(export_dir)  # fails by name on a missing artifact
    missing = [n for n in ("cond_encoder", "gpt_prefill", "gpt_decode", "vocoder") if n not in manifest.components]
    if missing:
        raise InputError(f"the export in {export_dir} lacks component(s) {', '.join(missing)}",
                         "re-run `triton-tts export` with all components")
    if opts.decoder_precision != "fp32":
        manifest.component("gpt_decode", opts.decoder_precision)  # raises with the list of what exists
    repo = Path(out_dir)
    tmp = repo.with_name(repo.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gpu = opts.flavor == "gpu"
    kind = "KIND_CPU"
    threads = {"threads": opts.threads} if opts.threads else {}
    common = {"export_dir": export_dir}

    _python_model(tmp, c.PREPROCESS, "model_repository.models.preprocess", "PreprocessModel",
                  [_field(c.TEXT), _field(c.MAX_TEXT_TOKENS_PER_SEGMENT)],
                  [_field(f) for f in c.PREPROCESS_OUTPUTS],
                  {**common, "max_text_chars": opts.max_text_chars,
                   "max_text_tokens_per_segment": opts.max_text_tokens_per_segment},
                  decoupled=False, instances=opts.bls_instances, kind=kind)
    bls_inputs = [_field(c.TEXT, optional=True), *(_field(f, optional=True) for f in c.PREPROCESS_OUTPUTS),
                  *(_field(f) for f in c.REQUEST_INPUTS if f is not c.TEXT)]
    bls_params = {**common, "max_reference_seconds": opts.max_reference_seconds,
                  "segments_in_flight": opts.segments_in_flight, "speaker_cache_size": opts.speaker_cache_size,
                  "request_timeout_s": opts.request_timeout_s}
    for name, decoupled in ((c.BLS_STREAM, True), (c.BLS_OFFLINE, False)):
        _python_model(tmp, name, "model_repository.models.tts", "TtsModel", bls_inputs,
                      [_field(f) for f in c.RESPONSE_OUTPUTS], bls_params, decoupled=decoupled,
                      instances=opts.bls_instances, kind=kind)
    _python_model(tmp, c.DECODER, "model_repository.models.decoder", "DecoderModel",
                  [_field(f) for f in c.DECODER_INPUTS], [_field(f) for f in c.DECODER_OUTPUTS],
                  {**common, **threads, "spin_threads": opts.spins(decoder=True),
                   "max_sequences": opts.max_sequences, "max_queue": opts.max_queue,
                   "precision": "" if opts.decoder_precision == "fp32" else opts.decoder_precision,
                   "providers": "CUDAExecutionProvider,CPUExecutionProvider" if gpu else "CPUExecutionProvider"},
                  decoupled=True, instances=1, kind=kind)  # one instance: it owns every sequence's KV cache
    plans = _plans(opts)
    for leaf in (c.COND_ENCODER, c.VOCODER):
        comp = manifest.component(leaf)
        if gpu:
            _native_model(tmp, leaf, comp, export_dir, opts.leaf_instances, plans.get(leaf))
        else:
            _python_model(tmp, leaf, "model_repository.models.onnx_leaf", "OnnxLeafModel",
                          [_tensor(t) for t in comp.inputs], [_tensor(t) for t in comp.outputs],
                          {**common, **threads, "spin_threads": opts.spins(decoder=False), "component": leaf},
                          decoupled=False,
                          instances=opts.leaf_instances, kind=kind)
    _ensemble(tmp, c.ENSEMBLE_STREAM, c.BLS_STREAM, "streaming entry point: preprocess -> tts_bls (decoupled)")
    _ensemble(tmp, c.ENSEMBLE_OFFLINE, c.BLS_OFFLINE, "one-response entry point (HTTP): preprocess -> tts_bls_offline")
    (tmp / "BUILD_INFO.json").write_text(json.dumps({
        "export_dir": str(export_dir), "flavor": opts.flavor,
        "options": {k: str(v) for k, v in opts.__dict__.items()}, "source": manifest.model.get("source_sha256"),
    }, indent=2))
    shutil.rmtree(repo, ignore_errors=True)
    tmp.rename(repo)
    return repo
