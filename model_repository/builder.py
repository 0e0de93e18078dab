"""`triton-tts build-repo`: a ready Triton model repository from an export manifest and a few deployment knobs.

The templates under model_repository/templates are filled here and never edited by hand; tensor sections come from
the serving contract (model_repository/contract.py) and from the manifest (graph names, dtypes, dynamic dims).
Families: the manifest's `model.family` picks the model set (model_repository/families.py); the code that
writes each kind of model is shared. IndexTTS 1.x: preprocess, tts/tts_offline, gpt_decoder, cond_encoder and
vocoder leaves. IndexTTS-2: the same entry, preprocess and decoder models (34 conditioning rows, no silence
trimming), a leaf per reference/s2mel-front graph and the vocoder, and `s2mel`, which batches the diffusion
steps of every live request. IndexTTS-2.5: the same models (3 conditioning rows, no latent pass), its preprocess
taking LANGUAGE, leaves for its graphs (speaker_projection, codec_decoder, ...).
Flavors:
- `cpu`: every model is a Python-backend model; graphs run in ONNX Runtime (the PyPI tritonserver has only the
  Python backend);
- `gpu`: the NGC container; stateless leaves on the native onnxruntime backend, or on the tensorrt backend when
  TensorRT plans are given; the decoder and s2mel stay Python models (they own their batches) running ONNX
  Runtime with the CUDA execution provider.
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
from engine_ref.families import INDEXTTS
from export.manifest import Component, TensorInfo, read_manifest
from model_repository import SPIN_CHOICES
from model_repository import contract as c
from model_repository.families import FamilyModels, family_models, family_of

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
    max_reference_seconds: float | None = None  # None: the family's (1.x 50 s, IndexTTS-2 15 s as upstream HEAD)
    segments_in_flight: int = 4
    request_timeout_s: float = 600.0
    chunk_first_codes: int = c.DEFAULT_CHUNK_FIRST_CODES  # chunked streaming: 0 = one chunk per segment
    chunk_max_codes: int = c.DEFAULT_CHUNK_MAX_CODES
    plans_index: Path | None = None  # gpu: plans.json from `triton-tts build-plans`
    # IndexTTS-2 only (ignored for 1.x exports)
    interval_silence_ms: int | None = None  # zeros between segments; None: the manifest's (upstream 200 ms)
    emotion_cache_size: int = 64  # emotion references kept (per audio hash)
    qwen_max_new_tokens: int = 0  # text emotion's generation limit; 0: upstream's 32768
    s2mel_max_rows: int = 16  # estimator rows per diffusion step (2 per request: the CFG pair)
    s2mel_max_queue: int = 64  # segments waiting for diffusion rows before requests are refused

    def validate(self) -> None:
        if self.flavor not in FLAVORS:
            raise InputError(f"unknown flavor '{self.flavor}'", f"choose one of: {', '.join(FLAVORS)}")
        for name in ("max_sequences", "max_queue", "bls_instances", "leaf_instances", "speaker_cache_size",
                     "max_text_chars", "max_text_tokens_per_segment", "segments_in_flight", "emotion_cache_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be >= 1", f"pass a positive {name}")
        if self.s2mel_max_rows < 2 or self.s2mel_max_queue < 0 or self.qwen_max_new_tokens < 0:
            raise InputError(f"s2mel_max_rows={self.s2mel_max_rows}, s2mel_max_queue={self.s2mel_max_queue}, "
                             f"qwen_max_new_tokens={self.qwen_max_new_tokens} out of range",
                             "use s2mel_max_rows >= 2 (one CFG pair), s2mel_max_queue >= 0, qwen_max_new_tokens >= 0")
        if self.interval_silence_ms is not None and not 0 <= self.interval_silence_ms <= c.MAX_INTERVAL_SILENCE_MS:
            raise InputError(f"interval_silence_ms={self.interval_silence_ms} is out of range",
                             f"pass 0..{c.MAX_INTERVAL_SILENCE_MS} ms")
        if self.max_reference_seconds is not None and not self.max_reference_seconds > 0:
            raise InputError(f"max_reference_seconds={self.max_reference_seconds} must be positive",
                             "pass a number of seconds, e.g. 15")
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


def _plans(opts: RepoOptions) -> dict[str, Path]:
    if opts.plans_index is None:
        return {}
    index = json.loads(Path(opts.plans_index).read_text())
    base = Path(opts.plans_index).parent
    entries = index.get("components", {})  # written by export.tensorrt.build_plans
    return {name: base / entry["plan"] for name, entry in entries.items() if isinstance(entry, dict) and "plan" in entry}


def build_repository(export_dir: str | os.PathLike, out_dir: str | os.PathLike, opts: RepoOptions = RepoOptions()) -> Path:
    """Write a complete model repository for the export's family into out_dir (replaced if present); returns it."""
    opts.validate()
    export_dir = Path(export_dir).resolve()
    manifest = read_manifest(export_dir, deep=True)  # fails by name on a missing, altered or truncated artifact
    family = family_models(family_of(manifest.model))
    missing = [n for n in family.required if n not in manifest.components]
    if missing:
        raise InputError(f"the export in {export_dir} lacks component(s) {', '.join(missing)}",
                         "re-run `triton-tts export` with all components")
    if opts.decoder_precision != "fp32":
        manifest.component("gpt_decode", opts.decoder_precision)  # raises with the list of what exists
    repo = Path(out_dir).resolve()
    tmp = repo.with_name(repo.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _Build(tmp, export_dir, repo, manifest, family, opts).write()
    shutil.rmtree(repo, ignore_errors=True)
    tmp.rename(repo)
    return repo


class _Build:
    """One repository being written: the shared writers, fed by the family's model set."""

    def __init__(self, tmp: Path, export_dir: Path, repo: Path, manifest, family: FamilyModels, opts: RepoOptions):
        self.tmp, self.export_dir, self.manifest, self.family, self.opts = tmp, export_dir, manifest, family, opts
        self.gpu = opts.flavor == "gpu"
        self.kind = "KIND_CPU"
        self.threads = {"threads": opts.threads} if opts.threads else {}
        # Served configs name the export relative to the repository: no absolute path reaches a client.
        self.common = {"export_dir": os.path.relpath(export_dir, repo)}
        self.internal = [_field(c.INTERNAL_KEY, optional=True)]
        self.providers = "CUDAExecutionProvider,CPUExecutionProvider" if self.gpu else "CPUExecutionProvider"

    def write(self) -> None:
        self.preprocess()
        self.entries()
        self.decoder()
        plans = _plans(self.opts)
        for leaf in self.family.leaves:
            self.leaf(leaf, plans.get(leaf))
        for name in self.family.extra:
            getattr(self, f"extra_{name}")()
        (self.tmp / "BUILD_INFO.json").write_text(json.dumps({
            "export_dir": self.common["export_dir"], "flavor": self.opts.flavor, "family": self.family.family,
            "options": {k: str(v) for k, v in self.opts.__dict__.items()},
            "source": self.manifest.model.get("source_sha256"),
        }, indent=2))

    def preprocess(self) -> None:
        opts = self.opts
        fam = self.family
        _python_model(self.tmp, c.PREPROCESS, "model_repository.models.preprocess", "PreprocessModel",
                      [_field(c.TEXT), _field(c.MAX_TEXT_TOKENS_PER_SEGMENT),
                       *(_field(f) for f in fam.preprocess_inputs), *self.internal],
                      [_field(f) for f in (*c.PREPROCESS_OUTPUTS, *fam.preprocess_outputs)],
                      {**self.common, "max_text_chars": opts.max_text_chars,
                       "max_text_tokens_per_segment": opts.max_text_tokens_per_segment},
                      decoupled=False, instances=opts.bls_instances, kind=self.kind)

    def entries(self) -> None:
        opts, fam = self.opts, self.family
        bls_inputs = [_field(f) for f in c.REQUEST_INPUTS]  # the public inputs, nothing internal
        ref_s = fam.max_reference_seconds if opts.max_reference_seconds is None else opts.max_reference_seconds
        params: dict[str, object] = {
            **self.common, "max_reference_seconds": ref_s, "segments_in_flight": opts.segments_in_flight,
            "speaker_cache_size": opts.speaker_cache_size, "request_timeout_s": opts.request_timeout_s,
            "chunk_first_codes": opts.chunk_first_codes, "chunk_max_codes": opts.chunk_max_codes,
            # read by clients and the gateway (model config parameters): what this repository's family accepts
            "family": fam.family, "text_emotion": int(fam.text_emotion), "languages": ",".join(fam.languages)}
        if fam.family != INDEXTTS:
            silence = self.manifest.model.get("interval_silence_ms", 200)
            params.update(interval_silence_ms=silence if opts.interval_silence_ms is None else opts.interval_silence_ms,
                          emotion_cache_size=opts.emotion_cache_size, qwen_max_new_tokens=opts.qwen_max_new_tokens)
        module, cls = fam.entry
        for name, decoupled in ((c.STREAM_MODEL, True), (c.OFFLINE_MODEL, False)):
            _python_model(self.tmp, name, module, cls, bls_inputs, [_field(f) for f in c.RESPONSE_OUTPUTS], params,
                          decoupled=decoupled, instances=opts.bls_instances, kind=self.kind)

    def decoder(self) -> None:
        opts = self.opts
        _python_model(self.tmp, c.DECODER, "model_repository.models.decoder", "DecoderModel",
                      [*(_field(f) for f in c.DECODER_INPUTS), *self.internal], [_field(f) for f in c.DECODER_OUTPUTS],
                      {**self.common, **self.threads, "spin_threads": opts.spins(decoder=True),
                       "max_sequences": opts.max_sequences, "max_queue": opts.max_queue,
                       "precision": "" if opts.decoder_precision == "fp32" else opts.decoder_precision,
                       "providers": self.providers, **self.family.decoder_params},
                      decoupled=True, instances=1, kind=self.kind)  # one instance: it owns every sequence's KV cache

    def leaf(self, name: str, plan: Path | None) -> None:
        comp = self.manifest.component(name)
        if self.gpu:
            _native_model(self.tmp, name, comp, self.export_dir, self.opts.leaf_instances, plan)
            return
        _python_model(self.tmp, name, "model_repository.models.onnx_leaf", "OnnxLeafModel",
                      [*(_tensor(t) for t in comp.inputs), *self.internal], [_tensor(t) for t in comp.outputs],
                      {**self.common, **self.threads, "spin_threads": self.opts.spins(decoder=False), "component": name},
                      decoupled=False, instances=self.opts.leaf_instances, kind=self.kind)

    def extra_s2mel(self) -> None:
        """IndexTTS-2's diffusion model: one instance (it owns the batch of every live request's Euler state)."""
        opts = self.opts
        _python_model(self.tmp, c.S2MEL, "model_repository.models.s2mel", "S2MelModel",
                      [*(_field(f) for f in c.S2MEL_INPUTS), *self.internal], [_field(f) for f in c.S2MEL_OUTPUTS],
                      {**self.common, **self.threads, "spin_threads": opts.spins(decoder=True),
                       "max_rows": opts.s2mel_max_rows, "max_queue": opts.s2mel_max_queue,
                       "providers": self.providers},
                      decoupled=True, instances=1, kind=self.kind)
