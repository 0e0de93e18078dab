"""The repository builder: configs come from the contract and the manifest, for both flavors."""

from __future__ import annotations

import json

import pytest

from engine_ref.errors import InputError, ModelFilesError
from export.manifest import read_manifest
from model_repository import contract as c
from model_repository.builder import RepoOptions, build_repository


def test_cpu_repository_has_every_model_with_manifest_names(tiny_export_dir, tmp_path):
    repo = build_repository(tiny_export_dir, tmp_path / "repo", RepoOptions(max_sequences=5, threads=2))
    names = {p.name for p in repo.iterdir() if p.is_dir()}
    assert names == {c.PREPROCESS, c.BLS_STREAM, c.BLS_OFFLINE, c.DECODER, c.COND_ENCODER, c.VOCODER,
                     c.ENSEMBLE_STREAM, c.ENSEMBLE_OFFLINE}
    manifest = read_manifest(tiny_export_dir)
    voc = (repo / c.VOCODER / "config.pbtxt").read_text()
    for t in manifest.component("vocoder").inputs:
        assert f'name: "{t.name}"' in voc
    dec = (repo / c.DECODER / "config.pbtxt").read_text()
    assert "decoupled: true" in dec and '"max_sequences" value: { string_value: "5" }' in dec
    assert "count: 1" in dec  # the decoder owns the KV cache: exactly one instance
    # ORT's busy-waiting threads stay on by default (measured fastest served); the other choices are per role
    assert '"spin_threads" value: { string_value: "1" }' in dec and '"spin_threads" value: { string_value: "1" }' in voc
    for choice, want_dec, want_voc in (("decoder", "1", "0"), ("none", "0", "0")):
        spun = build_repository(tiny_export_dir, tmp_path / choice, RepoOptions(spin_threads=choice))
        assert f'"spin_threads" value: {{ string_value: "{want_dec}" }}' in (spun / c.DECODER / "config.pbtxt").read_text()
        assert f'"spin_threads" value: {{ string_value: "{want_voc}" }}' in (spun / c.VOCODER / "config.pbtxt").read_text()
    ens = (repo / c.ENSEMBLE_STREAM / "config.pbtxt").read_text()
    assert f'model_name: "{c.BLS_STREAM}"' in ens and (repo / c.ENSEMBLE_STREAM / "1").is_dir()
    for f in c.REQUEST_INPUTS:
        assert f'name: "{f.name}"' in ens
    assert "from model_repository.models.tts import TtsModel" in (repo / c.BLS_STREAM / "1" / "model.py").read_text()
    assert "do not edit" in (repo / c.BLS_OFFLINE / "config.pbtxt").read_text()


def test_gpu_repository_uses_native_backends_and_plans(tiny_export_dir, tmp_path):
    cache = tmp_path / "plans"
    cache.mkdir()
    (cache / "vocoder-abc.plan").write_bytes(b"plan")
    (cache / "plans.json").write_text(json.dumps({"components": {"vocoder": {"plan": "vocoder-abc.plan"}}}))
    repo = build_repository(tiny_export_dir, tmp_path / "repo",
                            RepoOptions(flavor="gpu", plans_index=cache / "plans.json"))
    voc = (repo / c.VOCODER / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in voc and (repo / c.VOCODER / "1" / "model.plan").resolve().is_file()
    cond = (repo / c.COND_ENCODER / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cond and (repo / c.COND_ENCODER / "1" / "model.onnx").is_symlink()
    assert "CUDAExecutionProvider" in (repo / c.DECODER / "config.pbtxt").read_text()


def test_bad_options_and_missing_variants_are_named(tiny_export_dir, tmp_path):
    with pytest.raises(InputError, match="flavor"):
        build_repository(tiny_export_dir, tmp_path / "r", RepoOptions(flavor="tpu"))
    with pytest.raises(InputError, match="max_sequences"):
        build_repository(tiny_export_dir, tmp_path / "r", RepoOptions(max_sequences=0))
    with pytest.raises(ModelFilesError, match="gpt_decode@int3"):
        build_repository(tiny_export_dir, tmp_path / "r", RepoOptions(decoder_precision="int3"))
    with pytest.raises(InputError, match="spin_threads"):
        build_repository(tiny_export_dir, tmp_path / "r", RepoOptions(spin_threads="yes"))
    with pytest.raises(ModelFilesError, match="manifest.json"):
        build_repository(tmp_path / "nothing", tmp_path / "r")
