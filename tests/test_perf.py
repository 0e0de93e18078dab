"""perf/: the benchmark's statistics (unit), perf_analyzer plumbing (unit), the report, and one smoke run of the
whole suite — real tritonserver, real perf_analyzer, our async client, engine_ref — on the tiny preset."""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import struct
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine_ref.errors import InputError
from perf import analyzer, report, stats
from perf.stats import Distribution, RequestRecord, memory_check, model_stats_delta, percentile, summarize_level

# ------------------------------------------------------------------------------------------------------ statistics


def test_percentile_interpolates_like_numpy_and_refuses_nonsense():
    vals = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(vals, 50) == 3.0
    assert percentile(vals, 90) == pytest.approx(4.6)
    assert percentile(vals, 99) == pytest.approx(float(np.percentile(vals, 99)))
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(vals, 101)


def test_distribution_ignores_missing_values():
    d = Distribution.of([1.0, None, float("nan"), 3.0])
    assert (d.n, d.p50, d.min, d.max, d.mean) == (2, 2.0, 1.0, 3.0, 2.0)
    empty = Distribution.of([None])
    assert empty.n == 0 and math.isnan(empty.p50)


def _rec(sent: float, total: float, audio: float, first: float | None = 0.1, error: str | None = None,
         conc: int = 2) -> RequestRecord:
    return RequestRecord("short", conc, sent, total, first, audio, segments=1, error=error)


def test_level_summary_rtf_throughput_and_failures():
    records = [_rec(100.0, 2.0, 4.0, 0.5), _rec(100.5, 3.0, 3.0, 0.7), _rec(101.0, 1.0, 0.0, None, error="boom")]
    s = summarize_level(records)
    assert (s.requests, s.failed, s.errors) == (3, 1, ("boom",))
    assert s.wall_s == pytest.approx(103.5 - 100.0)  # first send -> last finish
    assert s.audio_s == 7.0  # failed requests deliver nothing
    assert s.audio_per_wall == pytest.approx(7.0 / 3.5)
    assert s.rtf.n == 2 and s.rtf.p50 == pytest.approx((0.5 + 1.0) / 2)
    assert s.ttfa_s.p50 == pytest.approx(0.6) and s.latency_s.max == 3.0
    assert records[0].rtf == 0.5 and records[0].finished_at == 102.0
    with pytest.raises(ValueError):
        summarize_level([])


def test_ratio_and_sequential_throughput():
    assert stats.ratio(3.0, 1.5) == 2.0
    assert math.isnan(stats.ratio(1.0, 0.0)) and math.isnan(stats.ratio(None, 1.0))
    assert stats.sequential_throughput([2.0, 2.0], [1.0, 3.0]) == 1.0


def _snapshot(models: dict[str, tuple[int, int, int, int]]) -> dict:
    """name -> (requests, executions, queue ns, compute infer ns) in Triton's JSON statistics layout."""
    return {"model_stats": [
        {"name": n, "version": "1", "execution_count": str(ex), "inference_stats": {
            "success": {"count": str(req), "ns": "0"}, "queue": {"count": str(req), "ns": str(q)},
            "compute_input": {"count": str(req), "ns": "1000000"}, "compute_infer": {"count": str(req), "ns": str(ci)},
            "compute_output": {"count": str(req), "ns": "0"}}}
        for n, (req, ex, q, ci) in models.items()]}


def test_model_stats_delta_splits_queue_and_compute_per_request():
    before = _snapshot({"vocoder": (10, 10, 5_000_000, 100_000_000), "idle": (3, 3, 0, 0)})
    after = _snapshot({"vocoder": (14, 13, 25_000_000, 300_000_000), "idle": (3, 3, 0, 0), "new": (2, 1, 0, 4_000_000)})
    rows = {m.model: m for m in model_stats_delta(before, after)}
    assert set(rows) == {"vocoder", "new"}  # no activity, no row
    v = rows["vocoder"]
    assert (v.requests, v.executions) == (4, 3)
    assert v.queue_ms == pytest.approx(5.0)  # 20 ms over 4 requests
    assert v.compute_ms == pytest.approx(50.0)  # 200 ms infer; input ns unchanged between snapshots
    assert v.compute_total_s == pytest.approx(0.2)
    assert rows["new"].compute_ms == pytest.approx(2.5)  # (1 + 4) ms over 2 requests
    assert model_stats_delta({}, {}) == []


def test_memory_check_flags_growth_after_warmup_only():
    flat = memory_check([500, 900, 1000, 1010, 1020, 1030], warmup_samples=3)
    assert flat.ok and flat.baseline_mb == 1000 and flat.max_mb == 1030 and flat.drift == pytest.approx(0.03)
    leak = memory_check([1000, 1000, 1040, 1080], warmup_samples=1)
    assert not leak.ok and leak.drift == pytest.approx(0.08)
    with pytest.raises(ValueError):
        memory_check([1.0, 2.0], warmup_samples=2)


def test_floors():
    assert stats.decode_floor_ms(2_000_000_000, 40e9) == pytest.approx(50.0)
    assert stats.vocoder_floor_rtf(100e9, 200e9) == 0.5
    with pytest.raises(ValueError):
        stats.decode_floor_ms(1, 0)


def test_batch_summary_counts_rows_only_where_steps_ran():
    """The rows gauge keeps the last step's value while the decoder idles: those samples must not count."""
    def m(steps, tokens, rows, active):
        return {"tts_decoder_steps_total": steps, "tts_generated_tokens_total": tokens,
                "tts_decoder_batch_rows": rows, "tts_decoder_active_sequences": active}

    samples = [(0.0, m(100, 300, 1, 0)), (0.05, m(110, 340, 4, 4)), (0.10, m(120, 420, 8, 8)),
               (0.15, m(120, 420, 8, 0)), (0.20, m(120, 420, 8, 0))]  # idle at the end: rows stuck at 8
    b = stats.batch_summary(samples)
    assert b.samples == 5 and b.busy_fraction == pytest.approx(0.5)
    assert (b.rows_mean, b.rows_max) == (6.0, 8.0)  # (4 + 8) / 2: the idle samples' stale 8s are not counted
    assert b.active_mean == pytest.approx(3.0) and b.active_max == 8.0
    assert b.steps == 20 and b.rows_per_step == pytest.approx(120 / 20)  # tokens / steps over the level
    assert math.isnan(stats.batch_summary(samples[:1]).rows_mean)


def test_cancel_summary_separates_closed_freed_and_load_failures():
    from perf.loadgen import CancelRecord, Outcome

    recs = [CancelRecord(0.2, 0.05, 0.06, 2), CancelRecord(0.3, 0.15, 0.20, 1), CancelRecord(0.2, None, 0.04, 0),
            CancelRecord(0.4, None, None, 0, error="not closed")]
    load = [Outcome(_rec(0.0, 1.0, 1.0)), Outcome(_rec(0.0, 1.0, 0.0, None, error="boom"))]
    c = stats.cancel_summary(recs, load, 8, [0.004, 0.006, 0.005])
    assert (c.victims, c.failed, c.without_live_sequence) == (4, 1, 1)
    assert c.to_decoder_s.n == 2 and c.to_decoder_s.p50 == pytest.approx(0.10) and c.to_decoder_s.max == 0.15
    assert c.to_closed_s.n == 3 and c.to_closed_s.max == 0.20
    assert (c.load_requests, c.load_failed) == (2, 1) and c.resolution_s == pytest.approx(0.005)
    assert c.first_chunk_s.n == 4 and c.first_chunk_s.p50 == pytest.approx(0.25)


def test_scrape_metrics_sums_each_family_over_its_labels():
    import http.server
    import threading

    from perf.loadgen import scrape_metrics

    body = ("# HELP tts_decoder_batch_rows rows\n# TYPE tts_decoder_batch_rows gauge\n"
            'tts_decoder_batch_rows{model="gpt_decoder",version="1"} 6\n'
            'tts_requests_cancelled_total{model="tts",version="1"} 2\n'
            'tts_requests_cancelled_total{model="tts_offline",version="1"} 1\n'
            'nv_inference_count{model="vocoder",version="1"} 40\ntts_plain 1.5e+00\n').encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        got = scrape_metrics(f"http://127.0.0.1:{srv.server_address[1]}/metrics")
    finally:
        srv.shutdown()
    assert got == {"tts_decoder_batch_rows": 6.0, "tts_requests_cancelled_total": 3.0, "tts_plain": 1.5}
    assert scrape_metrics("http://127.0.0.1:9/metrics", timeout_s=1) == {}  # no endpoint: nothing, no exception


def test_chunk_facts_group_chunks_into_segments():
    from perf.loadgen import _chunk_facts, _segment_codes

    chunked = [_chunk_facts({"codes": 16, "code_range": [0, 16], "codes_available": 31}, 0),
               _chunk_facts({"codes": 26, "code_range": [16, 42], "codes_available": 42}, 0),
               _chunk_facts({"codes": 30, "code_range": [0, 30], "codes_available": 30}, 1)]
    assert _segment_codes(chunked) == (42, 30)
    assert (chunked[1].start, chunked[1].available) == (16, 42)
    whole = _chunk_facts({"codes": 40}, 0)  # a server without chunked streaming: one chunk per segment
    assert (whole.start, whole.codes, whole.available) == (0, 40, 40)


def test_vocoded_frames_and_linear_fit():
    from perf.parts import fit_linear, vocoded_frames

    assert vocoded_frames(0, 16, 31, 15, 15) == 31  # no left context at the start; 15 frames look-ahead
    assert vocoded_frames(16, 42, 42, 15, 15) == 41  # 15 before, nothing after the segment's end
    assert vocoded_frames(0, 40, 40, 0, 0) == 40 and vocoded_frames(5, 5, 9, 2, 2) == 0
    fixed, per = fit_linear({10: 0.012, 110: 0.112})
    assert fixed == pytest.approx(0.002) and per == pytest.approx(0.001)
    assert fit_linear({50: 0.5}) == (0.0, 0.01)
    assert fit_linear({10: 0.5, 100: 0.2}) == (0.0, pytest.approx(0.002))  # noise (slower when smaller): origin


def test_ceiling_equals_a_hand_computed_sum_of_parts():
    from perf.parts import RequestWork, ScenarioParts, SegmentWork, ceiling, decode_batch, step_time

    assert decode_batch(8, 1, 8, 4) == 8 and decode_batch(1, 6, 8, 4) == 4 and decode_batch(4, 3, 8, 4) == 8
    with pytest.raises(ValueError):
        decode_batch(0, 1, 8, 4)
    steps = {1: 0.010, 4: 0.016, 8: 0.024}
    assert step_time(steps, 2) == pytest.approx(0.012) and step_time(steps, 6) == pytest.approx(0.020)
    assert step_time(steps, 16) == 0.024 and math.isnan(step_time({}, 2))

    one = RequestWork("s", 0, (SegmentWork(20, 50, 2.0),), vocoder_frames=(30, 50))
    two = RequestWork("s", 1, (SegmentWork(10, 30, 1.0), SegmentWork(12, 20, 0.8)))  # no chunk facts: whole segments
    parts = ScenarioParts("s", preprocess_s={0: 0.001, 1: 0.002}, prefill_s={0: [0.02], 1: [0.01, 0.012]},
                          latents_s={0: [0.03], 1: [0.02, 0.015]}, step_s=steps, vocoder_fixed_s=0.004,
                          vocoder_s_per_frame=0.002, tokens_per_code=1.1)
    reqs = [one, two, one, two]
    got = ceiling(reqs, parts, 4, 8, 4)
    # By hand: batch min(8, 4 x min(median segments 2 -> 2, 4)) = 8.
    serial_one = 0.001 + 0.02 + 0.03 + (0.004 + 0.002 * 30) + (0.004 + 0.002 * 50)
    serial_two = 0.002 + 0.022 + 0.035 + (0.004 + 0.002 * 30) + (0.004 + 0.002 * 20)
    tokens = 1.1 * (50 + 50 + 50 + 50)
    assert got.batch == 8 and got.serial_s == pytest.approx(2 * (serial_one + serial_two))
    assert got.steps == pytest.approx(tokens / 8) and got.decode_s == pytest.approx(tokens / 8 * 0.024)
    assert got.audio_s == pytest.approx(2 * (2.0 + 1.8))
    assert got.audio_per_wall == pytest.approx(7.6 / (2 * (serial_one + serial_two) + tokens / 8 * 0.024))
    single = ceiling([one], parts, 1, 8, 4)
    assert single.batch == 1 and single.decode_s == pytest.approx(55 * 0.010)
    with pytest.raises(ValueError):
        ceiling([], parts, 1, 8, 4)


# ------------------------------------------------------------------------------------------- perf_analyzer plumbing


def test_input_data_serializes_bytes_like_triton():
    from client.request import GenerationOverrides, TTSRequest

    audio = b"RIFF\x00\xff\xfe binary"
    req = TTSRequest.build("Hello there.", audio, params=GenerationOverrides(do_sample=False, num_beams=1, seed=7))
    doc = analyzer.input_data([req.arrays()])
    (entry,) = doc["data"]
    assert entry["TEXT"] == {"content": ["Hello there."], "shape": [1]}
    raw = base64.b64decode(entry["REFERENCE_AUDIO"]["b64"])
    assert struct.unpack("<I", raw[:4])[0] == len(audio) and raw[4:] == audio  # length-prefixed, as Triton wants
    assert entry["DO_SAMPLE"]["content"] == [False] and entry["NUM_BEAMS"]["content"] == [1]
    assert entry["SEED"]["content"] == [7]
    json.dumps(doc)  # plain JSON
    with pytest.raises(ValueError):
        analyzer.input_data([])


PA_STDOUT = """Request concurrency: 2
  Client:
    Request count: 6
  Server:
    Inference count: 6

  Composing models:
  cond_encoder, version: 1
      Request count: 0
  gpt_decoder, version: 1
      Inference count: 6
      Execution count: 6
      Successful request count: 6
      Avg request latency: 710 usec (overhead 2 usec + queue 27 usec + compute input 42 usec + compute infer 484 usec + compute output 154 usec)

  vocoder, version: 1
      Inference count: 5
      Successful request count: 5
      Avg request latency: 193530 usec (overhead 6 usec + queue 38 usec + compute input 29 usec + compute infer 192734 usec + compute output 721 usec)

Inferences/Second vs. Client Average Batch Latency
Concurrency: 2, throughput: 4.1 infer/sec, latency 237509 usec
"""


def test_parse_composing_models_section():
    leaves = {leaf.model: leaf for leaf in analyzer.parse_composing(PA_STDOUT)}
    assert set(leaves) == {"cond_encoder", "gpt_decoder", "vocoder"}
    assert leaves["cond_encoder"].requests == 0
    g = leaves["gpt_decoder"]
    assert (g.requests, g.avg_us, g.queue_us, g.compute_us) == (6, 710.0, 27.0, 42.0 + 484.0 + 154.0)
    assert leaves["vocoder"].compute_us == pytest.approx(29 + 192734 + 721)
    assert analyzer.parse_composing("no such section") == []


def test_parse_csv_and_profile_export(tmp_path):
    csv_path = tmp_path / "pa.csv"
    csv_path.write_text("Concurrency,Inferences/Second,p50 latency,p99 latency\n2,4.5,236276,281303\n")
    row = analyzer.parse_csv(csv_path)
    assert row == {"Concurrency": 2.0, "Inferences/Second": 4.5, "p50 latency": 236276.0, "p99 latency": 281303.0}
    # The export embeds raw tensor bytes (not UTF-8); only the timestamps matter.
    reqs = [{"timestamp": 1_000_000_000, "request_inputs": {"A": "x"}, "response_timestamps": [1_200_000_000,
                                                                                             1_900_000_000]},
            {"timestamp": 2_000_000_000, "response_timestamps": [2_100_000_000]}, {"timestamp": 3, "response_timestamps": []}]
    text = json.dumps({"experiments": [{"experiment": {"mode": "concurrency", "value": 2}, "requests": reqs}]})
    profile = tmp_path / "profile.json"
    profile.write_bytes(text.replace('"x"', '"\xff\xfe RIFF"').encode("latin-1"))
    firsts, lasts = analyzer.profile_latencies(profile)
    assert firsts == pytest.approx([0.2, 0.1]) and lasts == pytest.approx([0.9, 0.1])
    with pytest.raises(analyzer.PerfAnalyzerError):
        (tmp_path / "empty.csv").write_text("Concurrency\n")
        analyzer.parse_csv(tmp_path / "empty.csv")


def test_perf_analyzer_binary_from_a_pinned_wheel(tmp_path, monkeypatch):
    """Unpacking, the sha256 pin, and PERF_ANALYZER — with a stand-in wheel (no network)."""
    monkeypatch.delenv("PERF_ANALYZER", raising=False)
    wheel_path = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as z:
        z.writestr("fake-1.0.data/data/bin/perf_analyzer", "#!/bin/sh\necho fake\n")
    import hashlib

    good = analyzer.PinnedWheel("fake", "1.0", wheel_path.name, hashlib.sha256(wheel_path.read_bytes()).hexdigest(),
                                "fake-1.0.data/data/bin/perf_analyzer")
    pa = analyzer.ensure_perf_analyzer(tmp_path, download=False, wheel=good)
    assert pa.binary.read_text().startswith("#!/bin/sh") and os.access(pa.binary, os.X_OK)
    assert (pa.lib_dir / "libb64.so.0d").exists() and (pa.lib_dir / "libcudart.so.12").exists()
    assert str(pa.lib_dir) in pa.environment()["LD_LIBRARY_PATH"]
    with pytest.raises(analyzer.PerfAnalyzerError, match="sha256"):
        analyzer.verify_wheel(wheel_path, replace(good, sha256="0" * 64))
    assert not wheel_path.exists()  # a file that is not the pinned one is deleted, never unpacked
    with pytest.raises(analyzer.PerfAnalyzerError, match="not in"):
        analyzer.ensure_perf_analyzer(tmp_path / "empty", download=False, wheel=good)
    monkeypatch.setenv("PERF_ANALYZER", str(tmp_path / "missing"))
    with pytest.raises(analyzer.PerfAnalyzerError, match="PERF_ANALYZER"):
        analyzer.ensure_perf_analyzer(tmp_path)


# ---------------------------------------------------------------------------------------------------- CLI options


def _args(**kw) -> argparse.Namespace:
    from perf.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = ["bench"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return parser.parse_args(argv)


def test_bench_options():
    from perf.commands import config_from_args

    cfg = config_from_args(_args(scenarios="short,long", concurrency="1,4", variants="none", soak_requests=20))
    assert [s.name for s in cfg.scenarios] == ["short", "long"]
    assert all(s.concurrency == (1, 4) for s in cfg.scenarios) and cfg.variants == () and cfg.soak_requests == 20
    v15 = config_from_args(_args(preset="v1.5"))
    assert v15.resolved_export_dir() == Path("build/export-v1.5") and v15.scenarios[0].concurrency == (1, 4, 8)
    assert v15.cancel_concurrency == 4 and v15.cancel_victims >= 1 and v15.server_args == ()
    assert v15.resolved_model_dir() == Path("build/models/v1.5")
    with pytest.raises(InputError, match="scenario"):
        config_from_args(_args(scenarios="huge"))
    with pytest.raises(InputError, match="integers"):
        config_from_args(_args(concurrency="1,x"))
    with pytest.raises(InputError):
        config_from_args(_args(soak_requests=1))


# ------------------------------------------------------------------------------------------------------ the report


def _fake_result(tmp_path: Path):
    from perf.suite import FirstSegment, RefItem, Scenario, SuiteResult, VariantRun, suite_config

    cfg = suite_config("tiny", out_dir=tmp_path, scenarios=(Scenario("short", ("a", "b"), (1, 8)),),
                       variants=("int4",), pa_concurrency=(1,))
    machine = {"host": "box", "cpu": "CPU", "cores": 2, "commit": "abc", "command": "triton-tts bench", "date": "d"}
    res = SuiteResult(cfg, machine)
    res.ref = [RefItem("short", i, "v", 1, 1, 0.5, 2.0, 1.0, 40, 1.0, 0.5) for i in range(2)]  # RTF 2.0
    lv1 = summarize_level([_rec(0.0, 1.0, 1.0, conc=1), _rec(1.0, 1.0, 1.0, conc=1)])  # RTF 1.0, 1 audio s/s
    lv8 = summarize_level([_rec(0.0, 1.0, 2.0, conc=8), _rec(0.0, 1.0, 2.0, conc=8)])  # 4 audio s/s
    res.levels = [lv1, lv8]
    res.first_segment = [FirstSegment("short", 0, 1.0, 0.9, True)]
    res.variants = [VariantRun("int4", [summarize_level([_rec(0.0, 0.5, 1.0, conc=1)])])]
    res.pa = [analyzer.PaResult(1, None, {"Inferences/Second": 2.0, "p50 latency": 1e5}, [analyzer.PaLeaf("vocoder", 3, 1e3, 10, 990)],
                                Distribution.of([0.1]), Distribution.of([0.3]), 1)]
    res.soak = memory_check([900, 1000, 1010], 2)
    res.soak_series = [(1, 900.0), (2, 1000.0), (3, 1010.0)]
    res.floors = {"threads": 2, "bandwidth_gb_s": 30.0, "decode": {"fp32": {"weight_bytes": 3e7, "floor_ms": 1.0}},
                  "gemm_gflop_s": 100.0, "vocoder_gflop_per_audio_s": 5.0, "vocoder_floor_rtf": 0.05}
    from perf.loadgen import CancelRecord
    from perf.parts import Ceiling, ScenarioParts

    # c=1: 1 audio s/s, c=8: 4 audio s/s; ceiling at 8: 4.2 audio s/s (8.4 s of audio in 2 s)
    res.ceilings = {"short@1": Ceiling("short", 1, 2, 1, 2.0, 1.0, 0.6, 60), "short@8": Ceiling("short", 8, 2, 8, 8.4,
                                                                                                   1.5, 0.5, 15)}
    res.parts = {"short": ScenarioParts("short", {0: 0.001}, {0: [0.01]}, {0: [0.02]}, {1: 0.01, 8: 0.02}, 60,
                                        0.001, 0.002, 0.09, 1.0)}
    idle = {"tts_decoder_steps_total": 0.0, "tts_generated_tokens_total": 0.0, "tts_decoder_batch_rows": 0.0,
            "tts_decoder_active_sequences": 0.0}
    busy = {"tts_decoder_steps_total": 10.0, "tts_generated_tokens_total": 80.0, "tts_decoder_batch_rows": 8.0,
            "tts_decoder_active_sequences": 8.0}
    for key in ("short@1", "short@8"):
        res.batch[key] = stats.batch_summary([(0.0, idle), (0.05, busy)])
        res.batch_series[key] = [(0.05, 8.0, 8.0), (0.10, None, 0.0)]
    res.scrape_s = [0.004, 0.005]
    res.cancel_records = [CancelRecord(0.3, 0.05, 0.06, 2), CancelRecord(0.3, 0.07, 0.08, 1)]
    res.cancel = stats.cancel_summary(res.cancel_records, [], 8, [0.005])
    return res


def test_targets_met_and_not_met(tmp_path):
    res = _fake_result(tmp_path)
    got = {t.key: t for t in report.targets(res)}
    assert got["T1 short"].met is True  # RTF 1.0 vs engine_ref 2.0
    assert got["T2a short"].met is True  # 4 audio s/s vs engine_ref 0.5 -> 8x
    assert got["T2b short"].met is True and "4.00x" in got["T2b short"].measured  # vs 1 audio s/s at c=1
    assert got["T3 short[0]"].met is True  # 1.0 / 0.9 = 1.11x
    assert got["T4 int4 short"].met is True  # 0.5 / 2.0 = 0.25x
    assert got["T5 short"].met is True and "4.00x" in got["T5 short"].measured  # >= 1.5x c=1
    assert got["T6 short"].met is True and "0.95x" in got["T6 short"].measured  # 4.0 / 4.2 >= 0.9x
    res.first_segment[0].alone_s = 0.5
    res.ceilings["short@8"] = replace(res.ceilings["short@8"], audio_s=10.0)  # ceiling 5.0: 0.80x
    assert {t.key: t for t in report.targets(res)}["T6 short"].met is False
    res.variants[0].levels = [summarize_level([_rec(0.0, 0.7, 1.0, conc=1)])]
    got = {t.key: t for t in report.targets(res)}
    assert got["T3 short[0]"].met is False and got["T4 int4 short"].met is False


def test_write_report_has_every_row_plots_json_and_index(tmp_path):
    res = _fake_result(tmp_path)
    md = report.write_report(res, "bench-tiny-x-box")
    text = md.read_text()
    for row in report.expected_rows(res.config):
        assert row in text, row
    assert "| cancel c=8 | 2 | 0 | 60 / 70 | 70 / 80 |" in text  # ms: freed p50 / max, closed p50 / max
    assert "| ceiling short c=8 | 4.00 | 4.20 | 0.95x | 4.00x | 8 |" in text
    assert "| batch short c=8 | 2 | 100 % | 8.00 / 8 | 8.00 / 8 | 10 | 8.00 |" in text
    for name in ("latency", "throughput", "memory", "batch"):
        png = tmp_path / f"bench-tiny-x-box-{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "bench-tiny-x-box.json").read_text())
    assert data["levels"][1]["audio_per_wall"] == pytest.approx(4.0) and data["machine"]["commit"] == "abc"
    index = (tmp_path / "README.md").read_text()
    assert "bench-tiny-x-box.md" in index and "triton-tts bench" in index and "| T1 short |" in index
    assert "| short c=8 | 0.100 / 0.100 | 1.000 / 1.000 | 0.500 | 4.00 | 4.20 | 0.95x | 8.00 |" in index
    assert "Cancellation at concurrency 8" in index


def test_index_keeps_one_section_per_preset(tmp_path):
    """A tiny run must not hide the latest v1.5 report: each preset keeps its own section, replaced by its next run."""
    from dataclasses import replace

    res = _fake_result(tmp_path)
    report.write_report(res, "bench-tiny-1-box")
    big = _fake_result(tmp_path)
    big.config = replace(big.config, preset="v1.5")
    report.write_report(big, "bench-v1.5-1-box")
    report.write_report(res, "bench-tiny-2-box")
    index = (tmp_path / "README.md").read_text()
    assert index.count("## tiny") == 1 and index.count("## v1.5") == 1 and index.count("# Benchmark results") == 1
    assert "bench-tiny-2-box.md" in index and "bench-tiny-1-box.md" not in index and "bench-v1.5-1-box.md" in index
    assert index.index("## tiny") < index.index("## v1.5")


# ------------------------------------------------------------------------------------------- smoke: the real suite

TWO_SEGMENTS = " ".join(["The morning train was late again, so Maria read her book by the window.",
                         "She watched the fields roll slowly past and counted seven white horses.",
                         "When the city finally came into view, the sun was already low.",
                         "Her sister waited on the platform with two umbrellas and a warm smile."] * 2)


@pytest.mark.slow
def test_suite_smoke_on_a_tiny_server(tiny_model_dir, tiny_export_dir, tmp_path):
    """perf_analyzer and our client for a few seconds against a real tiny server; the report has every row."""
    from perf.suite import Scenario, run_suite, suite_config

    cfg = suite_config(
        "tiny", out_dir=tmp_path / "results", work_dir=tmp_path / "work", model_dir=tiny_model_dir,
        export_dir=tiny_export_dir, variants=(),
        scenarios=(Scenario("short", ("Hello there, friend.",), (1, 2), per_stream=1, min_requests=2),
                   Scenario("two", (TWO_SEGMENTS,), (1,), per_stream=1, min_requests=1)),
        engine_ref_reps=1, first_segment_reps=1, soak_requests=6, soak_concurrency=2, soak_warmup=2,
        pa_scenario="short", pa_concurrency=(1,), pa_request_count=2, pa_trials=3, command="pytest smoke",
        cancel_victims=2, cancel_concurrency=3, cancel_load_scenario="short", parts_reps=2,
    )
    result, md = run_suite(cfg, stem="bench-tiny-smoke")
    text = md.read_text()
    for row in report.expected_rows(cfg):
        assert row in text, row
    assert "| T3 two[0] |" in text and "| first two[0] |" in text
    assert all(lv.failed == 0 and lv.audio_per_wall > 0 for lv in result.levels), [lv.errors for lv in result.levels]
    (pa,) = result.pa
    assert pa.error is None and pa.row["Inferences/Second"] > 0 and pa.requests > 0
    assert {leaf.model for leaf in pa.leaves} >= {"preprocess", "gpt_decoder", "vocoder"}
    assert (tmp_path / "results" / "bench-tiny-smoke" / "c01" / "perf_analyzer.csv").is_file()
    assert result.soak is not None and result.soak.samples == 6 and result.soak.baseline_mb > 0
    assert result.ref and all(r.audio_s > 0 for r in result.ref)
    assert result.floors["decode"]["fp32"]["floor_ms"] > 0 and result.floors["vocoder_gflop_per_audio_s"] > 0
    assert any(mt.model == "vocoder" and mt.compute_ms > 0 for mt in result.model_times["short@1"])
    # No restricted-API failure: perf_analyzer found the composing models' versions through the admin header.
    assert "--bls-composing-models=preprocess:1,cond_encoder:1,gpt_decoder:1,vocoder:1" in (
        tmp_path / "results" / "bench-tiny-smoke" / "c01" / "command.txt").read_text()
    # The decoder's batch: one sequence at a time single stream; at c=2 never more than two rows (counted exactly
    # from the counters). Whether tiny's ~40-code requests overlap at c=2 depends on the machine's load, so the
    # batching itself is proven by tests/test_serving.py (four streams, far fewer steps than one after another).
    b1, b2 = result.batch["short@1"], result.batch["short@2"]
    assert b1.steps > 0 and b1.rows_per_step == pytest.approx(1.0) and b1.rows_max == 1
    assert 1.0 <= b2.rows_per_step <= 2.0 and 1 <= b2.rows_max <= 2 and b2.active_max <= 2
    assert result.batch_series["short@2"] and (tmp_path / "results" / "bench-tiny-smoke-batch.png").is_file()
    # Cancellation under load: both victims closed by the server, their sequences freed, no load request hurt.
    cs = result.cancel
    assert cs is not None and (cs.victims, cs.failed, cs.load_failed) == (2, 0, 0), result.cancel_records
    assert cs.to_closed_s.max < 5.0 and cs.to_decoder_s.n >= 1 and cs.load_requests >= 2
    # Ceilings from parts timed alone: every level has one; tokens per kept code come from the server's counter.
    assert set(result.ceilings) == {"short@1", "short@2", "two@1"}, result.parts_error
    assert all(cl.audio_per_wall > 0 and cl.decode_s > 0 and cl.serial_s > 0 for cl in result.ceilings.values())
    assert result.ceilings["short@2"].batch == 2 and result.parts["short"].tokens_per_code >= 1.0
    # The text's segments (as engine_ref cut it), not its responses (chunked streaming sends several per segment).
    assert len(result.work["two"][0].segments) == next(r.segments for r in result.ref if r.scenario == "two") > 1


def test_commit_label_ignores_the_reports_own_edits(tmp_path, monkeypatch):
    """A report rewrites perf/results/README.md; that must not label the measured code as modified."""
    import subprocess

    from perf.machine import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "perf" / "results").mkdir(parents=True)
    (tmp_path / "perf" / "results" / "README.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    clean = git_commit()
    assert clean and "uncommitted" not in clean and clean != "unknown"
    (tmp_path / "perf" / "results" / "README.md").write_text("new\n")
    assert git_commit() == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit() == clean + " (+ uncommitted changes)"
