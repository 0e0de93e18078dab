"""`triton-tts export`: every component to ONNX, verified, with the manifest — and a no-op when up to date.

Up to date means: the manifest exists, was written by this export code version with the same options, from
source files with the same sha256, and every artifact it names is present. Then nothing is loaded or exported.

The model's family (engine_ref.families.detect_family) picks the exporter: IndexTTS 1.x here, IndexTTS-2 in
export/indextts2/pipeline.py; the manifest's `model.family` records it for everything that reads the export.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from engine_ref.errors import InputError
from engine_ref.families import FAMILY_NAMES, INDEXTTS, INDEXTTS2, INDEXTTS2_5, detect_family
from engine_ref.indextts.loader import LoadedModel, load_model
from export.common import ExportOptions
from export.manifest import (
    EXPORT_CODE_VERSION,
    FORMAT,
    MANIFEST_NAME,
    Component,
    Manifest,
    artifact_problems,
    read_manifest,
    sha256_file,
    write_manifest,
)

log = logging.getLogger("export.pipeline")

COMPONENTS = ("cond_encoder", "gpt", "vocoder")
PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class ExportRequest:
    model: str
    out_dir: Path
    components: tuple[str, ...] = ()  # empty: every component of the model's family
    precisions: tuple[str, ...] = ("fp32",)
    options: ExportOptions = field(default_factory=ExportOptions)
    force: bool = False


def _source_hashes(model_dir: Path) -> dict[str, str]:
    from engine_ref.indextts.config import load_config

    cfg = load_config(model_dir / "config.yaml")
    return {name: sha256_file(model_dir / name) for name in ("config.yaml", cfg.gpt_checkpoint,
                                                             cfg.bigvgan_checkpoint, cfg.bpe_model)}


def _request_fingerprint(req: ExportRequest) -> dict:
    return {"components": list(req.components), "precisions": list(req.precisions), "options": asdict(req.options)}


def _covers(done: dict | None, wanted: dict) -> bool:
    """Whether an earlier export request already produced everything `wanted` asks for: the same components and
    options, and its precisions a superset (asking for fp32 alone must not re-export, and so delete, the int4 variant
    an earlier run wrote beside it)."""
    if not isinstance(done, dict):
        return False
    return (done.get("components") == wanted["components"] and done.get("options") == wanted["options"]
            and set(wanted["precisions"]) <= set(done.get("precisions") or ()))


def _up_to_date(req: ExportRequest, hashes: dict[str, str]) -> Manifest | None:
    if req.force or not (req.out_dir / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(req.out_dir, check_files=False)
    except Exception:  # an unreadable manifest is simply stale
        return None
    if manifest.export_code_version != EXPORT_CODE_VERSION:
        return None
    if manifest.model.get("source_sha256") != hashes or not _covers(manifest.model.get("request"),
                                                                     _request_fingerprint(req)):
        return None
    if artifact_problems(req.out_dir, manifest):
        return None
    return manifest


def _export_components(model: LoadedModel, req: ExportRequest) -> dict[str, Component]:
    import importlib

    out: dict[str, Component] = {}
    opts = req.options
    for name in req.components:
        t0 = time.perf_counter()
        if name in ("cond_encoder", "vocoder"):
            out[name] = importlib.import_module(f"export.{name}").export_component(model, req.out_dir, opts)
        elif name == "gpt":
            from export import gpt

            out[gpt.PREFILL] = gpt.export_prefill(model, req.out_dir, opts)
            out[gpt.DECODE] = gpt.export_decode(model, req.out_dir, opts)
        log.info("component %s done in %.1f s", name, time.perf_counter() - t0)
    return out


def _export_variants(model: LoadedModel, req: ExportRequest, base: dict[str, Component]) -> dict[str, Component]:
    """Precision variants of the decoder graphs (keys `<component>@<precision>`)."""
    variants = [p for p in req.precisions if p != "fp32"]
    if not variants:
        return {}
    from export import precision as precision_mod

    out: dict[str, Component] = {}
    for prec in variants:
        out.update(precision_mod.make_variants(model, req.out_dir, base, prec, req.options))
    return out


def check_request(req: ExportRequest, components: tuple[str, ...], family: str) -> None:
    """Components must be the family's, precisions known; one-line InputErrors naming the choices."""
    bad = [c for c in req.components if c not in components]
    if bad:
        raise InputError(f"unknown component(s) for {FAMILY_NAMES.get(family, family)}: {', '.join(bad)}",
                         f"choose from {', '.join(components)}")
    bad = [p for p in req.precisions if p not in PRECISIONS]
    if bad:
        raise InputError(f"unknown precision(s): {', '.join(bad)}", f"choose from {', '.join(PRECISIONS)}")


def run_export(req: ExportRequest) -> tuple[Manifest, bool]:
    """Returns (manifest, exported) — exported is False when the output was already up to date."""
    from engine_ref.hub_cache import resolve_model

    model_dir = resolve_model(req.model)
    family = detect_family(model_dir)
    if family == INDEXTTS2:
        from export.indextts2.pipeline import run_export_v2

        return run_export_v2(req, model_dir)
    if family == INDEXTTS2_5:
        from export.indextts2.v25.pipeline import run_export_v25

        return run_export_v25(req, model_dir)
    if family != INDEXTTS:
        raise InputError(f"{model_dir} is {FAMILY_NAMES.get(family, family)}, which `triton-tts export` does not "
                         "export yet", "export an IndexTTS 1.x, IndexTTS-2 or IndexTTS-2.5 directory")
    return _run_export_v1(replace(req, components=req.components or COMPONENTS), model_dir)


def _run_export_v1(req: ExportRequest, model_dir: Path) -> tuple[Manifest, bool]:
    from engine_ref.integrity import check_model_dir

    check_request(req, COMPONENTS, INDEXTTS)
    check_model_dir(model_dir).raise_for_problems()
    hashes = _source_hashes(model_dir)
    current = _up_to_date(req, hashes)
    if current is not None:
        log.info("%s is up to date; nothing to do", req.out_dir)
        return current, False
    req.out_dir.mkdir(parents=True, exist_ok=True)
    (req.out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # never leave a manifest describing half-old artifacts
    model = load_model(model_dir, verify=False)
    components = _export_components(model, req)
    components.update(_export_variants(model, req, components))
    cfg = model.config
    assets = {"config": "config.yaml", "bpe": cfg.bpe_model}
    for fname in assets.values():
        shutil.copyfile(model_dir / fname, req.out_dir / fname)
    manifest = Manifest(
        format=FORMAT,
        export_code_version=EXPORT_CODE_VERSION,
        model={
            "family": INDEXTTS, "family_name": FAMILY_NAMES[INDEXTTS], "version": cfg.version,
            "source_dir": str(model_dir),
            "source_sha256": hashes, "request": _request_fingerprint(req),
            "sampling_rate": cfg.sampling_rate, "samples_per_latent": cfg.bigvgan.hop_length,
            "mel_bins": cfg.bigvgan.num_mels,
        },
        assets=assets,
        components=components,
    )
    write_manifest(req.out_dir, manifest)
    return manifest, True
