"""perf/serve_bench_v2.py's report on synthetic numbers: the derived figures, the targets' met / NOT met, the
markdown and the JSON (no server, no model: fast)."""

from __future__ import annotations

import json
import math

import pytest

from perf import serve_bench_v2 as sb

MACHINE = {"cpu": "Test CPU", "cores": 2, "host": "box/1", "date": "2026-12-02 03:30", "threads": 2,
           "python": "3.11", "torch": "2.x", "onnxruntime": "1.x", "commit": "abc1234",
           "command": "python -m perf.serve_bench_v2 --preset tiny-v2 --reps 2", "load_avg_at_start": "1.00 0.90 0.80",
           "load_avg_at_end": "2.00 1.50 1.00", "device": "CPU"}


def _result(served_short: float = 0.3, conc_wall: float = 5.0) -> sb.ServeBenchV2:
    res = sb.ServeBenchV2("tiny-v2", dict(MACHINE), reps=2, diffusion_steps=25)
    res.texts = [
        sb.TextRow("short", 1, 2.0, 0.5, 0.9, 0.4, 2.0, served_short, 0.6, [0.5, 0.52], [served_short, 0.31]),
        sb.TextRow("medium", 2, 6.0, 0.4, 1.5, 0.45, 6.0, 0.36, 0.8, [0.4], [0.36]),
    ]
    # sequential: 8 segments in 200 calls (no sharing); concurrent: 8 segments in 80 calls
    res.sequential = [sb.Level(1, 4, 0, 10.0, 8.0, steps=200, shared_steps=0, segments=8, rows_max_sampled=2),
                      sb.Level(1, 4, 0, 10.0, 10.0, steps=200, shared_steps=0, segments=8, rows_max_sampled=2)]
    res.concurrent = [sb.Level(4, 4, 0, 10.0, conc_wall, steps=80, shared_steps=60, joins_mid_diffusion=3,
                               segments=8, rows_max_sampled=8),
                      sb.Level(4, 4, 0, 10.0, 8.0, steps=90, shared_steps=50, joins_mid_diffusion=2, segments=8,
                               rows_max_sampled=6)]
    res.estimator = [sb.EstimatorRow(2, 300, 4.0), sb.EstimatorRow(8, 300, 12.0)]
    res.rows_max_since_start = 8
    res.notes = ["graphs reused from build/exports/tiny-v2-serve (up to date)"]
    return res


def test_derived_figures_follow_their_definitions():
    res = _result()
    short, medium = res.texts
    assert short.rtf_ratio == pytest.approx(0.3 / 0.5) and medium.rtf_ratio == pytest.approx(0.36 / 0.4)
    conc = res.concurrent[0]
    # every segment is one CFG pair (2 rows) in each of its 25 calls
    assert conc.rows_per_call(25) == pytest.approx(2 * 25 * 8 / 80)
    assert res.sequential[0].rows_per_call(25) == pytest.approx(2.0)
    assert conc.shared_fraction == pytest.approx(0.75) and conc.audio_per_wall == pytest.approx(2.0)
    # per round: (10/5) / (10/8) = 1.6 and (10/8) / (10/10) = 1.25; median of two = their mean
    assert res.speedups() == pytest.approx([1.6, 1.25])
    assert res.speedup == pytest.approx((1.6 + 1.25) / 2)
    assert res.estimator[1].ms_per_row == pytest.approx(1.5)


def test_targets_are_marked_met_and_not_met():
    met = {t.split(",")[1].strip() if "," in t else "s2mel": ok for t, _, ok in sb.targets(_result())}
    assert met == {"short text": True, "medium text": False, "s2mel": False}  # 0.6x, 0.9x, 1.425x
    fast = sb.targets(_result(served_short=0.45, conc_wall=2.0))
    assert [ok for _, _, ok in fast] == [False, False, True]  # 0.9x, 0.9x; median(4.0, 1.25) = 2.6x
    # a level that delivered nothing has no ratio: NOT met, shown as n/a
    res = _result()
    res.concurrent = [sb.Level(4, 4, 4, 0.0, 0.0), sb.Level(4, 4, 4, 0.0, 0.0)]
    assert math.isnan(res.speedup)
    target, measured, ok = sb.targets(res)[-1]
    assert measured == "n/ax" and not ok


def test_report_markdown_and_json(tmp_path):
    res = _result()
    path = sb.write_report(res, tmp_path, plan_note="reduced plan")
    md = path.read_text()
    assert path.name.startswith("serve-bench-v2-tiny-v2-") and path.name.endswith("-box-1.md")
    for needle in ("Test CPU", "commit abc1234", "`python -m perf.serve_bench_v2 --preset tiny-v2 --reps 2`",
                   "at start: 1.00 0.90 0.80, at end: 2.00 1.50 1.00", "note: reduced plan", "note: graphs reused",
                   "| short | 1 | 2.00 / 2.00 | 0.500 | 0.300 | 0.60x | 0.60 | 0.90 | 40% |",
                   "| 1 | 4 concurrent | 4 (0) | 10.00 | 5.00 | 2.000 | 80 | 8 | 5.0 | 8 | 60 (75%) | 3 | 1.60x |",
                   "| 1 | sequential | 4 (0) | 10.00 | 8.00 | 1.250 | 200 | 8 | 2.0 | 2 |",
                   "Median speed-up over the rounds: 1.43x", "| 8 | 300 | 12.0 | 1.50 |",
                   "1.33x cheaper, so", "about 1.12x", "| NOT met |", "| met |"):  # 1 / (0.575 + 0.425 / (4/3))
        assert needle in md, needle
    assert md.count("NOT met") == 2
    data = json.loads(path.with_suffix(".json").read_text())
    assert data["speedup"] == pytest.approx(1.425) and data["texts"][0]["rtf_ratio"] == pytest.approx(0.6)
    assert data["concurrent"][0]["rows_per_call"] == pytest.approx(5.0)
    assert data["concurrent"][0]["audio_per_wall"] == pytest.approx(2.0)
    assert [t["met"] for t in data["targets"]] == [True, False, False]
    assert data["machine"]["commit"] == "abc1234" and data["diffusion_steps"] == 25


def test_v2_plan_is_reduced_and_the_cli_refuses_other_presets():
    assert sb.plan_for("tiny-v2").texts == ("short", "medium") and not sb.plan_for("tiny-v2").note
    v2 = sb.plan_for("v2")
    assert v2.texts == ("short",) and len(v2.throughput_texts) == 4 and v2.note
    assert all(t.count(".") == 1 for t in v2.throughput_texts)
    with pytest.raises(SystemExit):
        sb.main(["--preset", "v1.5"])


def test_rows_seen_ignores_the_gauge_while_no_step_ran():
    # the gauge still holds the previous level's 8 rows until this level's first step
    samples = [(0.0, {"tts_s2mel_steps_total": 100, "tts_s2mel_batch_rows": 8}),
               (0.1, {"tts_s2mel_steps_total": 100, "tts_s2mel_batch_rows": 8}),
               (0.2, {"tts_s2mel_steps_total": 103, "tts_s2mel_batch_rows": 2}),
               (0.3, {"tts_s2mel_steps_total": 103, "tts_s2mel_batch_rows": 2}),
               (0.4, {"tts_s2mel_steps_total": 110, "tts_s2mel_batch_rows": 4})]
    assert sb._rows_seen(samples) == [2, 4]
    assert sb._rows_seen(samples[:2]) == [] and sb._rows_seen([]) == []


def test_comparison_sets_2_5_beside_2_0_with_ratios(tmp_path):
    old = _result()
    old.texts[0].engine_stages = {"generate": 2.0, "latent": 0.5, "s2mel": 4.0, "vocoder": 1.0, "text": 0.0}
    new = _result(served_short=0.15, conc_wall=4.0)
    new.preset = "tiny-v2.5"
    new.texts[0].engine_stages = {"generate": 1.0, "latent": 0.0, "s2mel": 3.0, "vocoder": 1.0, "text": 0.0}
    path = sb.write_comparison(new, old, tmp_path)
    text = path.read_text()
    assert path.name.startswith("serve-bench-v2-compare-tiny-v2.5-vs-tiny-v2-")
    assert "| engine_ref generate (s) | 2.000 | 1.000 | 0.50x |" in text
    assert "| engine_ref latent (s) | 0.500 | 0.000 | 0.00x |" in text and "engine_ref text" not in text
    assert "| served RTF, single stream | 0.300 | 0.150 | 0.50x |" in text
    # 4 concurrent: median of (10/5, 10/8) = 1.625 for 2.0, of (10/4, 10/8) = 1.875 for 2.5
    assert "| 4 concurrent | 1.625 | 1.875 | 1.15x |" in text
    assert "## medium text" in text  # texts without stage times still get their end-to-end rows


def test_v2_size_plans_cap_the_codes_at_the_same_audio_length():
    assert sb.plan_for("v2").max_mel_tokens == 2 * sb.plan_for("v2.5").max_mel_tokens
    assert sb.plan_for("tiny-v2.5").v25 and not sb.plan_for("tiny-v2").v25
    assert sb.plan_for("tiny-v2.5").max_mel_tokens is None
