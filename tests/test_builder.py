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
    assert names == {c.PREPROCESS, c.STREAM_MODEL, c.OFFLINE_MODEL, c.DECODER, c.COND_ENCODER, c.VOCODER}
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
    for entry in c.ENTRY_MODELS:
        cfg = (repo / entry / "config.pbtxt").read_text()
        for f in c.REQUEST_INPUTS:
            assert f'name: "{f.name}"' in cfg
        # Clients reach only the public inputs: segments and the internal key are not inputs of the entry models.
        for f in (*c.PREPROCESS_OUTPUTS, c.INTERNAL_KEY):
            assert f'name: "{f.name}"' not in cfg
        assert "from model_repository.models.tts import TtsModel" in (repo / entry / "1" / "model.py").read_text()
    assert "decoupled: true" in (repo / c.STREAM_MODEL / "config.pbtxt").read_text()
    assert "decoupled: false" in (repo / c.OFFLINE_MODEL / "config.pbtxt").read_text()
    assert "do not edit" in (repo / c.OFFLINE_MODEL / "config.pbtxt").read_text()
    for internal in (c.PREPROCESS, c.DECODER, c.COND_ENCODER, c.VOCODER):
        assert f'name: "{c.INTERNAL_KEY.name}"' in (repo / internal / "config.pbtxt").read_text()
    # No absolute path in any served config: the export is named relative to the repository.
    for cfg in repo.glob("*/config.pbtxt"):
        text = cfg.read_text()
        assert str(tmp_path) not in text and str(tiny_export_dir) not in text, cfg
    rel = '"export_dir" value: { string_value: "'
    start = dec.index(rel) + len(rel)
    assert (repo / dec[start:dec.index('"', start)] / "manifest.json").is_file()


def test_a_tampered_or_truncated_graph_is_refused_by_name(tiny_export_dir, tmp_path):
    import shutil

    for damage in ("tamper", "truncate"):
        export = tmp_path / f"export-{damage}"
        shutil.copytree(tiny_export_dir, export)
        voc = export / read_manifest(export).component("vocoder").file
        data = voc.read_bytes()
        voc.write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if damage == "tamper" else data[: len(data) // 2])
        with pytest.raises(ModelFilesError, match="vocoder.*sha256"):
            build_repository(export, tmp_path / f"repo-{damage}")


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
