"""The exported decoder graphs against engine_ref, the ORT runtime's KV handling, and the manifest contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_ref.errors import ModelFilesError
from engine_ref.generate import decode_sampling, latent_pass
from engine_ref.indextts.loader import load_model
from engine_ref.sampling import GenerationParams
from export.common import ExportOptions
from export.gpt import greedy_parity
from export.manifest import read_manifest, sha256_file
from export.pipeline import ExportRequest, run_export
from export.runtime import KVState, OrtDecoder


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def export_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    manifest, exported = run_export(ExportRequest(str(tiny_model_dir), out, components=("gpt",)))
    assert exported
    return out


@pytest.fixture(scope="module")
def ort(export_dir) -> OrtDecoder:
    return OrtDecoder.from_manifest(export_dir)


def test_manifest_records_names_shapes_ranges_and_parity(export_dir, model):
    m = read_manifest(export_dir, deep=True)
    cfg = model.config.gpt
    for name in ("gpt_prefill", "gpt_decode"):
        comp = m.component(name)
        assert comp.sha256 == sha256_file(export_dir / comp.file)
        assert comp.parity is not None and comp.parity.max_rel <= 1e-4 and comp.parity.cases
        for t in (*comp.inputs, *comp.outputs):
            for d in t.shape:
                if isinstance(d, str):
                    r = comp.dims[d]
                    assert r.min <= r.opt <= r.max, (name, d)
        assert comp.extra["layers"] == cfg.layers and comp.extra["head_dim"] == cfg.model_dim // cfg.heads
    dec = m.component("gpt_decode")
    hd = cfg.model_dim // cfg.heads
    assert dec.input("past_key_values.0.key").shape == ("batch", cfg.heads, "past_len", hd)
    assert dec.output(f"present.{cfg.layers - 1}.value").shape == ("batch", cfg.heads, "total_len", hd)
    assert dec.output("logits").shape == ("batch", cfg.number_mel_codes)
    assert m.model["source_sha256"]["gpt.pth"] == sha256_file(model.model_dir / "gpt.pth")
    assert (export_dir / "bpe.model").is_file() and (export_dir / "config.yaml").is_file()


def test_greedy_codes_through_onnx_equal_engine_ref(model, export_dir):
    result = greedy_parity(model, export_dir, prompts=10, max_mel_tokens=60, seed=1)
    assert result["exact"] == 10, result


def test_ort_latents_equal_engine_ref_latent_pass(model, ort):
    g = torch.Generator().manual_seed(5)
    conds = torch.randn(1, 32, model.config.gpt.model_dim, generator=g)
    texts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    codes = [[100, 200, 300, 400, 500], [7], [8, 9, 10]]
    ours = ort.latents(conds.numpy(), texts, codes)
    ref = latent_pass(model.gpt, conds, texts, codes)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-5)


def test_joined_kv_batches_decode_like_each_alone(model, ort):
    """Continuous batching: sequences prefilled separately, joined with different past lengths, stepped together."""
    g = torch.Generator().manual_seed(6)
    conds = torch.randn(1, 32, model.config.gpt.model_dim, generator=g).numpy()
    texts = [[5, 6, 7], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    states, logits = [], []
    for t in texts:
        lg, _, st = ort.prefill(conds, [t])
        states.append(st)
        logits.append(lg)
    # Row 0 runs two steps on its own first, so the two pasts differ in length when joined.
    _, _, s0 = ort.decode(np.array([[11]]), np.array([[2]]), states[0])
    _, _, s0 = ort.decode(np.array([[12]]), np.array([[3]]), s0)
    joined = KVState.join([s0, states[1]])
    lg, hid, _ = ort.decode(np.array([[13], [14]]), np.array([[4], [2]]), joined)
    alone0, _, _ = ort.decode(np.array([[13]]), np.array([[4]]), s0)
    alone1, _, _ = ort.decode(np.array([[14]]), np.array([[2]]), states[1])
    np.testing.assert_allclose(lg[0], alone0[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lg[1], alone1[0], rtol=1e-5, atol=1e-5)
    # Selecting row 1 and compacting drops the columns only row 0 used.
    only1 = joined.select([1])
    assert only1.length == states[1].length + 0 and only1.mask.all()


def test_sampling_through_onnx_matches_engine_ref_with_same_seed(model, ort):
    g = torch.Generator().manual_seed(8)
    conds = torch.randn(1, 32, model.config.gpt.model_dim, generator=g)
    params = GenerationParams(num_beams=1, max_mel_tokens=40, seed=3)
    ref = decode_sampling(model.gpt, conds, [[5, 6, 7, 8]], [params], [3])[0]
    ours = ort.greedy(conds.numpy(), [5, 6, 7, 8], params, seed=3)
    assert ours.codes == ref.codes


def test_export_rerun_is_a_noop(tiny_model_dir, export_dir):
    before = {p.name: p.stat().st_mtime_ns for p in export_dir.iterdir()}
    _, exported = run_export(ExportRequest(str(tiny_model_dir), export_dir, components=("gpt",)))
    assert not exported
    assert {p.name: p.stat().st_mtime_ns for p in export_dir.iterdir()} == before


def test_missing_or_corrupt_artifact_is_named(export_dir, tmp_path):
    import shutil

    copy = tmp_path / "exp"
    shutil.copytree(export_dir, copy)
    (copy / "gpt_decode.onnx").unlink()
    with pytest.raises(ModelFilesError, match="gpt_decode.onnx"):
        read_manifest(copy)
    shutil.copyfile(export_dir / "gpt_decode.onnx", copy / "gpt_decode.onnx")
    with open(copy / "gpt_prefill.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00garbage\x00")
    read_manifest(copy)  # the fast check only looks at presence
    with pytest.raises(ModelFilesError, match="gpt_prefill.onnx.*sha256"):
        read_manifest(copy, deep=True)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["format"] = "something-else/9"
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFilesError, match="format"):
        read_manifest(copy)
