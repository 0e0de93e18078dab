"""`triton-tts export` for IndexTTS-2: every component to ONNX, each verified against engine_ref v2, one manifest.

Called by export/pipeline.run_export once detect_family says "indextts2". Same contract as 1.x: the request's
fingerprint and the sha256 of every source file (main directory and the four hub dependencies) make a re-run a
no-op; a manifest is written only after every graph has passed its parity check.

Components (`--components`, default all) and the manifest keys they write:
    semantic_encoder  semantic_encoder                      w2v-BERT 2.0 layer 17 + stats
    semantic_codec    semantic_codec, semantic_vq2emb       quantize -> S_ref; vq2emb of codes
    campplus          campplus                              style from the kaldi fbank
    conditioners      speaker_conditioner, emotion_conditioner
    gpt               gpt_prefill, gpt_decode (+ @fp16/@int8/@int4 variants with --precision)
    s2mel_front       s2mel_prompt, s2mel_cond               length regulator (+ vq2emb + gpt_layer)
    cfm               cfm_estimator                          one Euler step's DiT + WaveNet call
    vocoder           vocoder                                BigVGAN v2

Assets copied beside the graphs: config.yaml, bpe.model, feat1.pt / feat2.pt (emotion bank), the w2v-BERT
preprocessor_config.json (the SeamlessM4T extractor, which stays in Python), and speed_emb.npy (the GPT's two
speed rows [2, model_dim], appended to the conds). In Python, not exported: the extractor, the kaldi fbank, the
22.05 kHz reference mel, the emotion-vector mix and the Qwen text-emotion model (read from `model.source_dir`).
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from engine_ref.families import FAMILY_NAMES, INDEXTTS2
from export.manifest import EXPORT_CODE_VERSION, FORMAT, MANIFEST_NAME, Component, Manifest, sha256_file, write_manifest
from export.pipeline import ExportRequest, _request_fingerprint, _up_to_date, check_request

log = logging.getLogger("export.indextts2")

#: component group -> (module under export.indextts2, the function that exports it)
GROUPS: dict[str, tuple[str, str]] = {
    "semantic_encoder": ("features", "export_component"),
    "semantic_codec": ("codec", "export_components"),
    "campplus": ("campplus", "export_component"),
    "conditioners": ("conditioners", "export_components"),
    "gpt": ("gpt", "export_components"),
    "s2mel_front": ("s2mel_front", "export_components"),
    "cfm": ("cfm", "export_component"),
    "vocoder": ("vocoder", "export_component"),
}
COMPONENTS = tuple(GROUPS)
SPEED_EMB = "speed_emb.npy"
FEATURE_EXTRACTOR = "w2v-bert-2.0/preprocessor_config.json"


def source_files(model_dir: Path) -> dict[str, Path]:
    """Every file the export reads: main directory files by name, dependency files as `<dependency>/<path>`."""
    from engine_ref.indextts2.config import load_v2_config
    from engine_ref.indextts2.hub import resolve_dependencies

    cfg = load_v2_config(model_dir / "config.yaml")
    files = {name: model_dir / name for name in ("config.yaml", cfg.gpt_checkpoint, cfg.s2mel_checkpoint,
                                                 cfg.bpe_model, cfg.w2v_stat, cfg.spk_matrix, cfg.emo_matrix)}
    deps = resolve_dependencies(model_dir, family=INDEXTTS2)
    for key, dep in deps.deps.items():
        for f in dep.dependency.files:
            files[f"{key}/{f.repo_path}"] = dep.path(f.role)
    return files


def _export_groups(model, req: ExportRequest, groups: dict[str, tuple[str, str]] = GROUPS) -> dict[str, Component]:
    out: dict[str, Component] = {}
    for group in req.components:
        module, fn = groups[group]
        t0 = time.perf_counter()
        made = getattr(importlib.import_module(f"export.indextts2.{module}"), fn)(model, req.out_dir, req.options)
        out.update(made if isinstance(made, dict) else {made.name: made})
        log.info("component %s done in %.1f s", group, time.perf_counter() - t0)
    return out


def _variants(model, req: ExportRequest, base: dict[str, Component]) -> dict[str, Component]:
    """Precision variants of the decoder graphs: export/precision.py unchanged (cond rows come from the config)."""
    variants = [p for p in req.precisions if p != "fp32"]
    if not variants:
        return {}
    from export import precision

    out: dict[str, Component] = {}
    for prec in variants:
        out.update(precision.make_variants(model, req.out_dir, base, prec, req.options))
    return out


def _assets(model, model_dir: Path, out_dir: Path) -> dict[str, str]:
    cfg = model.config
    assets = {"config": "config.yaml", "bpe": cfg.bpe_model, "spk_matrix": cfg.spk_matrix,
              "emo_matrix": cfg.emo_matrix}
    for name in assets.values():
        shutil.copyfile(model_dir / name, out_dir / name)
    np.save(out_dir / SPEED_EMB, model.gpt.speed_emb.weight.detach().float().numpy())
    return {**assets, "feature_extractor": copy_feature_extractor(model, out_dir), "speed_emb": SPEED_EMB}


def copy_feature_extractor(model, out_dir: Path) -> str:
    """w2v-bert's preprocessor_config.json into the export (the served feature extractor reads it); its name."""
    extractor = out_dir / FEATURE_EXTRACTOR
    extractor.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model.dependencies.w2v_bert_dir / "preprocessor_config.json", extractor)
    return FEATURE_EXTRACTOR


def model_section_v2(model, model_dir: Path, hashes: dict[str, str], req: ExportRequest, family: str) -> dict:
    """The manifest's model section that 2.0 and 2.5 share (2.5 adds its language and duration keys)."""
    from engine_ref.indextts2.s2mel.cfm import DEFAULT_CFG_RATE, DEFAULT_STEPS
    from engine_ref.indextts2.synthesizer import INTERVAL_SILENCE_MS

    cfg = model.config
    spect = cfg.s2mel.preprocess_params.spect_params
    return {
        "family": family, "family_name": FAMILY_NAMES[family], "version": cfg.version,
        "source_dir": str(model_dir), "source_sha256": hashes, "request": _request_fingerprint(req),
        "sampling_rate": cfg.sample_rate, "samples_per_frame": spect.hop_length, "mel_bins": spect.n_mels,
        "ref_mel": {"n_fft": spect.n_fft, "win_length": spect.win_length, "hop_length": spect.hop_length,
                    "fmin": spect.fmin, "fmax": spect.fmax},
        "cond_rows": cfg.gpt.cond_rows, "model_dim": cfg.gpt.model_dim, "feature_dim": cfg.semantic_dim,
        "emo_num": list(cfg.emo_num), "diffusion_steps": DEFAULT_STEPS, "cfg_rate": DEFAULT_CFG_RATE,
        "interval_silence_ms": INTERVAL_SILENCE_MS, "qwen_emotion_dir": str(model_dir / cfg.qwen_emo_path),
    }


def _model_section(model, model_dir: Path, hashes: dict[str, str], req: ExportRequest) -> dict:
    return {
        **model_section_v2(model, model_dir, hashes, req, INDEXTTS2),
        "in_python": ["SeamlessM4T feature extractor", "kaldi fbank (CAMPPlus input)", "22.05 kHz reference mel",
                      "emotion-vector mix (feat1/feat2)", "Qwen text emotion", "Euler loop + CFG combination"],
    }


@dataclass(frozen=True)
class FamilyExport:
    """What one version of the family exports: its component groups and the family-specific steps around them."""

    family: str
    groups: dict[str, tuple[str, str]]  # group -> (module under export.indextts2, function)
    source_files: Callable[[Path], dict[str, Path]]
    load: Callable[[Path], object]  # model_dir -> the loaded engine_ref model (verify=False)
    assets: Callable[[object, Path, Path], dict[str, str]]  # (model, model_dir, out_dir) -> manifest assets
    model_section: Callable[[object, Path, dict[str, str], ExportRequest], dict]


def run_family_export(req: ExportRequest, model_dir: Path, spec: FamilyExport) -> tuple[Manifest, bool]:
    """The shared skeleton: check, hash the sources (a no-op when up to date), load, export every group and the
    precision variants, then write the manifest last (only after every graph has passed its parity check)."""
    from engine_ref.indextts2.integrity import check_indextts2_dir

    components = tuple(spec.groups)
    req = replace(req, components=req.components or components)
    check_request(req, components, spec.family)
    check_indextts2_dir(model_dir, family=spec.family).raise_for_problems()
    hashes = {name: sha256_file(path) for name, path in spec.source_files(model_dir).items()}
    current = _up_to_date(req, hashes)
    if current is not None:
        log.info("%s is up to date; nothing to do", req.out_dir)
        return current, False
    req.out_dir.mkdir(parents=True, exist_ok=True)
    (req.out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # never leave a manifest describing half-old artifacts
    model = spec.load(model_dir)
    made = _export_groups(model, req, spec.groups)
    made.update(_variants(model, req, made))
    manifest = Manifest(
        format=FORMAT, export_code_version=EXPORT_CODE_VERSION,
        model=spec.model_section(model, model_dir, hashes, req),
        assets=spec.assets(model, model_dir, req.out_dir), components=made,
    )
    write_manifest(req.out_dir, manifest)
    return manifest, True


def _load_v2(model_dir: Path):
    from engine_ref.indextts2.loader import load_v2_model

    return load_v2_model(model_dir, verify=False)


V2_EXPORT = FamilyExport(INDEXTTS2, GROUPS, source_files, _load_v2, _assets, _model_section)


def run_export_v2(req: ExportRequest, model_dir: Path) -> tuple[Manifest, bool]:
    """The IndexTTS-2 export of `model_dir` into req.out_dir; returns (manifest, exported) like run_export."""
    return run_family_export(req, model_dir, V2_EXPORT)
