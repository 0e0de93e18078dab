"""Precision variants of the decoder graphs (int8/int4 weight-only, fp16, fused fp32) and the export benchmark."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engine_ref.errors import InputError
from engine_ref.generate import build_prefix
from engine_ref.indextts.loader import load_model
from export import precision
from export.common import FP16_TOLERANCE, ExportOptions, ParityError, session
from export.manifest import component_digest, read_manifest
from export.pipeline import ExportRequest, run_export
from export.precision import (
    WEIGHT_ONLY,
    AgreementConfig,
    gemm_to_matmul,
    make_variants,
    token_agreement,
)
from export.runtime import OrtDecoder
from perf import export_bench as bench

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def export_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_precision")
    run_export(ExportRequest(str(tiny_model_dir), out, components=("gpt",),
                             precisions=("fp32", "int8", "int4", "fp16")))
    return out


@pytest.fixture(scope="module")
def manifest(export_dir):
    return read_manifest(export_dir, deep=True)


# ---------------------------------------------------------------------------------------------------- the variants


@pytest.mark.parametrize("prec", ["int8", "int4"])
def test_weight_only_variant_manifest_fields(manifest, export_dir, prec):
    base = manifest.component("gpt_decode")
    comp = manifest.component("gpt_decode", prec)
    assert comp.name == "gpt_decode" and comp.precision == prec and comp.file == f"gpt_decode.{prec}.onnx"
    assert comp.sha256 == component_digest(export_dir, comp)
    assert comp.inputs == base.inputs and comp.outputs == base.outputs and comp.dims == base.dims
    assert all(comp.extra[k] == v for k, v in base.extra.items())
    assert comp.extra["weights"].startswith(f"int{WEIGHT_ONLY[prec].bits} MatMulNBits block 32 symmetric")
    ops = {n.op_type for n in onnx.load(str(export_dir / comp.file), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "Gemm" not in ops  # the mel_head was rewritten and quantized too
    p = comp.parity
    assert p is not None and p.cases == base.parity.cases  # the same verification cases as the fp32 graph
    assert 0 < p.max_rel <= WEIGHT_ONLY[prec].max_logit_rel == p.tolerance
    assert p.extra["compared"] == 500 and p.extra["min_token_agreement"] == WEIGHT_ONLY[prec].min_token_agreement
    assert WEIGHT_ONLY[prec].min_token_agreement <= p.extra["token_agreement"] <= 1.0
    assert p.extra["step_ms_b1"] > 0 and p.extra["fp32_step_ms_b1"] > 0
    # The int4 graph really is smaller than int8, which is smaller than fp32.
    sizes = {q: (export_dir / manifest.component("gpt_decode", q).file).stat().st_size for q in ("int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < (export_dir / base.file).stat().st_size


def test_int8_is_closer_to_fp32_than_int4(manifest):
    p8, p4 = manifest.component("gpt_decode", "int8").parity, manifest.component("gpt_decode", "int4").parity
    assert p8.max_rel < p4.max_rel
    assert p8.extra["token_agreement"] >= p4.extra["token_agreement"]


def test_fp16_variants_halve_the_cache_and_keep_float32_outputs(manifest, export_dir):
    for name in ("gpt_prefill", "gpt_decode"):
        comp = manifest.component(name, "fp16")
        base = manifest.component(name)
        assert comp.precision == "fp16" and comp.file == f"{name}.fp16.onnx" and comp.dims == base.dims
        assert [t.name for t in comp.inputs] == [t.name for t in base.inputs]
        assert comp.output("present.0.key").dtype == "float16"
        assert comp.output("logits").dtype == "float32" and comp.output("hidden").dtype == "float32"
        assert comp.parity.max_rel <= FP16_TOLERANCE and comp.parity.tolerance == FP16_TOLERANCE
        assert "CPU" in comp.parity.extra["verified_on"]
    assert manifest.component("gpt_prefill", "fp16").input("conds").dtype == "float16"
    assert manifest.component("gpt_decode", "fp16").input("past_key_values.0.value").dtype == "float16"
    assert manifest.component("gpt_decode", "fp16").parity.extra["token_agreement"] >= 0.95


@pytest.mark.parametrize("prec,bound", [("int8", WEIGHT_ONLY["int8"].max_logit_rel),
                                        ("int4", WEIGHT_ONLY["int4"].max_logit_rel), ("fp16", FP16_TOLERANCE)])
def test_variants_run_in_ort_decoder_within_bound(export_dir, model, prec, bound):
    """Prefill + 3 decode steps through OrtDecoder.from_manifest vs engine_ref eager on the same tokens."""
    dec = OrtDecoder.from_manifest(export_dir, precision=prec)
    uv = model.gpt
    gen = torch.Generator().manual_seed(5)
    conds = torch.randn(1, uv.cfg.condition_num_latent, uv.cfg.model_dim, generator=gen)
    if prec == "fp16":
        conds = conds.half().float()
    text = [7, 9, 11, 13]
    logits, _, state = dec.prefill(conds.numpy(), [text])
    embeds, valid = build_prefix(uv, conds, [text])
    with torch.inference_mode():
        h, past = uv.decode(embeds, valid)
        for step in range(1, 4):
            ref = uv.mel_logits(h[:, -1]).numpy()
            rel = np.abs(logits.astype(np.float64) - ref).max() / np.abs(ref).max()
            assert rel <= bound, (prec, step, rel)
            tok = int(np.argmax(ref))
            logits, _, state = dec.decode(np.array([[tok]]), np.array([[step + 1]]), state)
            valid = torch.cat([valid, torch.ones(1, 1, dtype=torch.bool)], dim=1)
            h, past = uv.decode(uv.mel_embeds(torch.tensor([[tok]]), torch.tensor([[step + 1]])), valid, past)
    assert state.layers[0][0].dtype == (np.float16 if prec == "fp16" else np.float32)


def test_token_agreement_of_a_graph_with_itself_is_exact(export_dir, model, manifest):
    ref = OrtDecoder(export_dir, manifest.component("gpt_prefill"), manifest.component("gpt_decode"))
    a = token_agreement(ref, ref, model, AgreementConfig(prompts=3, steps=4), chunk=2)
    assert (a.agreement, a.compared, a.mismatches) == (1.0, 12, 0)


def _copy_base(export_dir: Path, manifest, dst: Path) -> dict:
    """The fp32 graphs in a scratch directory, so a test's variants never touch the shared export."""
    base = {k: v for k, v in manifest.components.items() if "@" not in k}
    for comp in base.values():
        for f in (comp.file, *comp.external_data):
            shutil.copyfile(export_dir / f, dst / f)
    return base


def test_quantized_variant_below_agreement_threshold_fails_loudly(export_dir, model, manifest, monkeypatch, tmp_path):
    base = _copy_base(export_dir, manifest, tmp_path)
    strict = replace(WEIGHT_ONLY["int4"], min_token_agreement=1.01)
    monkeypatch.setitem(precision.WEIGHT_ONLY, "int4", strict)
    with pytest.raises(ParityError, match=r"token agreement with fp32 is .*< required"):
        make_variants(model, tmp_path, base, "int4", ExportOptions())


def test_fp32opt_variant_keeps_fp32_parity(export_dir, model, manifest, tmp_path):
    base = _copy_base(export_dir, manifest, tmp_path)
    out = make_variants(model, tmp_path, base, "fp32opt", ExportOptions())
    comp = out["gpt_decode@fp32opt"]
    assert comp.precision == "fp32opt" and comp.parity.max_rel <= 1e-4
    ops = {n.op_type for n in onnx.load(str(tmp_path / comp.file), load_external_data=False).graph.node}
    assert "SkipLayerNormalization" in ops


def test_make_variants_rejects_bad_requests(model, export_dir, manifest):
    with pytest.raises(InputError, match="unknown variant precision"):
        make_variants(model, export_dir, dict(manifest.components), "int3", ExportOptions())
    with pytest.raises(InputError, match="add gpt to --components"):
        make_variants(model, export_dir, {}, "int4", ExportOptions())


def test_gemm_to_matmul_preserves_the_function(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4)).astype(np.float32)  # nn.Linear layout [out, in], transB=1
    b = rng.standard_normal(5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="head", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert gemm_to_matmul(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    assert {t.name for t in model.graph.initializer} == {"w_kn", "b"}  # the old [out, in] weight is gone
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((2, 4)).astype(np.float32)
    (y,) = session(tmp_path / "m.onnx").run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- benchmark statistics


def test_bench_statistics_helpers():
    assert bench.median([3.0, 1.0, 2.0]) == 2.0 and bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        bench.median([])
    assert bench.ratio(6.0, 3.0) == 2.0
    assert math.isnan(bench.ratio(1.0, 0.0)) and math.isnan(bench.ratio(float("nan"), 1.0))
    # 2 GB streamed at 20 GB/s: 100 ms per step, however it is split.
    assert bench.decode_floor_ms(2_000_000_000, 20e9) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        bench.decode_floor_ms(1, 0.0)


def test_round_robin_interleaves_and_drops_warmup():
    calls = []
    times = bench.round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and min(times["a"]) >= 0


def test_streamed_weight_bytes_skips_gathered_tables(tmp_path):
    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")  # embeddings: one row per step
    weight = numpy_helper.from_array(np.zeros((8, 8), np.float32), "w")  # read whole every step
    shared = numpy_helper.from_array(np.zeros((100, 8), np.float16), "tied")  # gathered AND multiplied
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["h"]),
         helper.make_node("Gather", ["tied", "ids"], ["t"]), helper.make_node("Identity", ["tied"], ["t2"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h", "t", "t2")],
        [table, weight, shared],
    )
    onnx.save(helper.make_model(graph), tmp_path / "g.onnx")
    assert bench.streamed_weight_bytes(tmp_path / "g.onnx") == 8 * 8 * 4 + 100 * 8 * 2


def _synthetic_results(cfg: bench.BenchConfig) -> bench.Results:
    res = bench.Results(machine={"cpu": "x", "cores": 2, "threads": 2, "host": "h", "date": "d", "commit": "c",
                                 "python": "3", "torch": "t", "onnxruntime": "o", "load_avg_at_start": "0",
                                 "command": "cmd"})
    for p in cfg.pasts:
        for b in cfg.batches:
            res.decode[bench.decode_key(b, p)] = {"eager": 140.0 * b, "ort_fp32": 68.0 * (1 + (b - 1) / 10),
                                                  "ort_int8": 30.0, "ort_int4": 20.0, "ort_fp32_logits_rel": 1e-7,
                                                  "ort_int8_logits_rel": 1e-2, "ort_int4_logits_rel": 5e-2}
    for b in cfg.prefill_batches:
        res.prefill[bench.prefill_key(b, cfg)] = {"eager": 500.0, "ort_fp32": 250.0, "ort_fp32_logits_rel": 1e-7}
    res.vocoder = {"eager_s_per_audio_s": 0.5, "ort_fp32_s_per_audio_s": 0.4, "audio_s": 2.0, "ort_fp32_wave_rel": 0}
    res.floor = {"fp32_bytes": 2e9, "int8_bytes": 5e8, "int4_bytes": 3e8, "fp32_floor_ms": 60.0,
                 "int8_floor_ms": 15.0, "int4_floor_ms": 9.0, "bw_gemv_gbps": 30.0, "bw_sum_gbps": 25.0,
                 "bw_gemv_after_gbps": 31.0, "bw_sum_after_gbps": 24.0, "bw_used_gbps": 31.0}
    res.agreement = {"int8": {"token_agreement": 0.995, "compared": 500, "mismatches": 2,
                              "max_fp32_margin_at_mismatch": 0.01},
                     "int4": {"token_agreement": 0.9, "compared": 500, "mismatches": 50,
                              "max_fp32_margin_at_mismatch": 0.2}}
    res.greedy = {"prompts": 10, "exact": 9, "token_agreement": 0.98}
    return res


def test_bench_targets_on_synthetic_numbers():
    cfg = bench.BenchConfig(pasts=(64,))
    verdict = {t: (m, ok) for t, m, ok in bench.targets(_synthetic_results(cfg), cfg)}
    assert verdict["ORT fp32 decode b1 p64 >= 1.8x faster than eager"] == ("2.06x", True)
    assert verdict["ORT fp32 decode b1 p64 <= 1.3x the floor"] == ("1.13x floor", True)
    assert verdict["ORT fp32 batch 8 step <= 2.2x batch 1 step (p64)"] == ("1.70x", True)
    assert verdict["weight-only decoder b1 p64 <= 0.4x the fp32 floor"] == ("int4: 0.33x", True)
    assert verdict["int8 token agreement vs fp32 >= 99% (10x50 teacher-forced)"] == ("99.5%", True)
    assert verdict["int4 token agreement vs fp32 >= 99% (10x50 teacher-forced)"] == ("90.0%", False)
    assert verdict["BigVGAN through ORT no slower than eager"] == ("ORT/eager 0.80", True)
    assert verdict["greedy codes through ORT fp32 == engine_ref (10 prompts x <= 60 tokens)"] == (
        "9/10 identical", False)
    text = bench.render(_synthetic_results(cfg), cfg)
    assert all(row in text for row in bench.expected_rows(cfg))
    assert "| decode b1 p64 | 140.0 | 68.0 | 30.0 | 20.0 | 2.06 | 0.44 | 0.29 | 1.13 |" in text


def test_bench_smoke_on_tiny(tiny_model_dir, export_dir, tmp_path, capsys):
    argv = ["--preset", "tiny", "--model-dir", str(tiny_model_dir), "--export-dir", str(export_dir),
            "--out", str(tmp_path), "--reps", "1", "--warmup", "0", "--agreement-prompts", "2",
            "--agreement-steps", "3", "--bandwidth-mib", "8", "--vocoder-seconds", "0.05", "--prefill-text", "12",
            "--gap-ms", "0", "--greedy-prompts", "3", "--greedy-tokens", "8"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    reports = list(tmp_path.glob("export-bench-*.md"))
    assert len(reports) == 1 and reports[0].with_suffix(".json").is_file()
    text = reports[0].read_text()
    cfg = bench.parse_args(argv)
    for row in bench.expected_rows(cfg):
        assert row in text and row in printed, row
    assert "graphs reused from" in text and "eager only" in text  # this export has no vocoder graph
    assert "| target | measured (median) | met |" in text and "--preset tiny" in text
    assert "| greedy fp32 | 3/3 | 100.0% |" in text  # tiny: ORT fp32 reproduces engine_ref's greedy codes


def test_bench_does_not_time_graphs_of_older_export_code(tiny_model_dir, export_dir, monkeypatch):
    """Graphs from an older EXPORT_CODE_VERSION are re-exported, never timed (a stale vocoder once skewed a report)."""
    import export.manifest
    import export.pipeline

    calls = []

    def no_export(req):
        calls.append(req)
        raise RuntimeError("re-export requested")

    monkeypatch.setattr(export.pipeline, "run_export", no_export)
    cfg = bench.BenchConfig(preset="tiny", model_dir=tiny_model_dir, export_dir=export_dir)
    notes: list[str] = []
    assert bench.ensure_export(tiny_model_dir, cfg, notes)[0] == export_dir
    assert not calls and "graphs reused from" in notes[0]
    monkeypatch.setattr(export.manifest, "EXPORT_CODE_VERSION", export.manifest.EXPORT_CODE_VERSION + 1)
    with pytest.raises(RuntimeError, match="re-export requested"):
        bench.ensure_export(tiny_model_dir, cfg, notes)
    assert len(calls) == 1 and calls[0].out_dir == export_dir


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--batches", "1,x"])
    assert bench.main(["--reps", "0", "--model-dir", "/nonexistent"]) == 2


def test_an_export_with_more_precisions_is_up_to_date_for_fewer():
    """Asking for fp32 alone after an fp32+int4 export reuses it (re-exporting would delete the int4 graph)."""
    from export.pipeline import _covers

    opts = {"verify": True}
    done = {"components": ["gpt"], "precisions": ["fp32", "int4"], "options": opts}
    assert _covers(done, {"components": ["gpt"], "precisions": ["fp32"], "options": opts})
    assert _covers(done, {"components": ["gpt"], "precisions": ["int4", "fp32"], "options": opts})
    assert not _covers(done, {"components": ["gpt"], "precisions": ["fp32", "int8"], "options": opts})
    assert not _covers(done, {"components": ["gpt", "vocoder"], "precisions": ["fp32"], "options": opts})
    assert not _covers(done, {"components": ["gpt"], "precisions": ["fp32"], "options": {"verify": False}})
    assert not _covers(None, {"components": ["gpt"], "precisions": ["fp32"], "options": opts})
