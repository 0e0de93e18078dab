"""IndexTTS-2 served vs engine_ref v2, and s2mel's cross-request batching, side by side in one run.

    python -m perf.serve_bench_v2 --preset tiny-v2 [--reps 3] [--out perf/results]

On one machine, one after another (never overlapping, so neither steals the other's cores):
1. engine_ref v2 (Synthesizer2, greedy, seed 0, the repository's 15 s reference cut) on each text: RTF and time
   to its first finished segment, median of `reps` after one warm-up (which fills the speaker cache);
2. the exported graphs' cfm_estimator alone (ONNX Runtime, this process): one Euler step at 2 and 8 rows (1 and 4
   requests' CFG pairs), ms per row: whether a bigger batch is cheaper per row on this machine (the why of 4.);
3. tritonserver over the built repository, single stream, the same texts and settings: RTF and TTFA, median of
   `reps` after a warm-up; ratio served / engine_ref (target <= 0.8x);
4. the same server, `reps` rounds of: 4 requests one after another, then the same 4 at once. Audio s per wall s of
   each, their ratio (target >= 1.5x on a GPU; on a CPU the estimator's cost grows with its rows, so the report
   says what it measured and why), and from s2mel's own metrics per level: estimator calls (tts_s2mel_steps_total),
   calls that held several segments (shared_steps), segments joining mid-diffusion, mean rows per call
   (= 2 x diffusion steps x segments diffused / calls, exact: every segment takes its steps as one CFG pair) and
   the most rows in one call (the tts_s2mel_batch_rows gauge sampled every 20 ms).

`--preset v2` writes build/models/v2 (~8 GB, once) and its export (build/exports/v2-serve) when missing and runs a
reduced plan (the short text only; 4 one-sentence requests; codes capped at 200 per segment, since random weights
rarely stop), stated in the report. IndexTTS-2.5 presets (tiny-v2.5, v2.5) run the same plan with lang=en (v2.5's
cap is 100 codes: 25 Hz codes, the same audio length). `--preset` may repeat: with a 2.5 preset and its 2.0 size,
a third report, serve-bench-v2-compare-<2.5>-vs-<2.0>-..., sets them side by side (engine_ref per stage and end to
end, served single stream and 4 concurrent) with 2.5 / 2.0 ratios, all measured in this one run. The report goes to
perf/results/serve-bench-v2-<preset>-<date>-<host>.md (+ .json) with the machine, commit, command and load average.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from perf.stats import ratio

TARGET_RTF_RATIO = 0.8  # served RTF / engine_ref RTF, single stream (issue 13)
TARGET_S2MEL_SPEEDUP = 1.5  # audio s per wall s, 4 concurrent / 4 sequential (issue 13, on the GPU)
CONCURRENCY = 4
ESTIMATOR_ROWS = (2, 8)
SAMPLE_RATE = 22050
MEL_FRAMES_PER_S = 22050 / 256  # BigVGAN v2 22 kHz hop

TEXTS = {
    "short": "The quick brown fox jumps over the lazy dog.",
    "medium": ("The quick brown fox jumps over the lazy dog. Then it rests in the shade, and the afternoon goes "
               "by slowly, while the birds sing in the old oak tree behind the farmhouse."),
}
#: an IndexTTS-2.5 preset -> the 2.0 preset of the same sizes
V25_PAIRS = {"tiny-v2.5": "tiny-v2", "v2.5": "v2"}
PRESETS = ("tiny-v2", "v2", *V25_PAIRS)
V25_LANG = "en"  # the texts are English; 2.5 has no language detection
THROUGHPUT_TEXTS = (
    "A first sentence that takes a while to say. It goes on a little.",
    "The second one is here, also fairly long. It has a tail too.",
    "Third: numbers like twenty and thirty. Then forty.",
    "And the fourth, which closes the set. The end.",
)


@dataclass(frozen=True)
class Plan:
    """What one preset runs (v2 is reduced to what a 2-core CPU does in reasonable time)."""

    preset: str
    texts: tuple[str, ...] = ("short", "medium")
    throughput_texts: tuple[str, ...] = THROUGHPUT_TEXTS
    voice_seconds: float = 3.0
    note: str = ""
    max_mel_tokens: int | None = None  # a cap on each segment's codes (both sides); None: the model's

    @property
    def v25(self) -> bool:
        return self.preset in V25_PAIRS


def plan_for(preset: str) -> Plan:
    if preset in ("v2", "v2.5"):
        cap = 100 if preset == "v2.5" else 200
        return Plan(preset, texts=("short",), throughput_texts=tuple(t.split(".")[0] + "." for t in THROUGHPUT_TEXTS),
                    max_mel_tokens=cap,
                    note="reduced for a 2-core CPU: the short text only for the single-stream rows; the 4 throughput "
                         f"requests are the first sentence of each text; at most {cap} codes per segment (4 s of "
                         "audio; random weights rarely emit the stop code)")
    return Plan(preset)


# ----------------------------------------------------------------------------------------------------- results


@dataclass
class TextRow:
    """One text, single stream: engine_ref v2 vs served (medians of the reps)."""

    name: str
    segments: int
    engine_audio_s: float
    engine_rtf: float
    engine_first_s: float  # engine_ref's first finished segment
    engine_s2mel_share: float  # s2mel stage / total in engine_ref
    served_audio_s: float
    served_rtf: float
    served_ttfa_s: float
    engine_rtfs: list[float] = field(default_factory=list)
    served_rtfs: list[float] = field(default_factory=list)
    engine_stages: dict[str, float] = field(default_factory=dict)  # engine_ref seconds per stage (medians)

    @property
    def rtf_ratio(self) -> float:
        return ratio(self.served_rtf, self.engine_rtf)


@dataclass
class Level:
    """One round of the 4 throughput requests, sequential (concurrency 1) or concurrent, with s2mel's counters."""

    concurrency: int
    requests: int
    failed: int
    audio_s: float
    wall_s: float
    steps: int = 0  # estimator calls in the level
    shared_steps: int = 0  # calls that held more than one segment
    joins_mid_diffusion: int = 0
    segments: int = 0  # segments diffused in the level
    rows_max_sampled: int = 0  # most rows seen in one call (gauge sampled every 20 ms)

    @property
    def audio_per_wall(self) -> float:
        return ratio(self.audio_s, self.wall_s)

    def rows_per_call(self, diffusion_steps: int) -> float:
        """Exact mean: each segment is one CFG pair (2 rows) in each of its `diffusion_steps` calls."""
        return ratio(2 * diffusion_steps * self.segments, self.steps)

    @property
    def shared_fraction(self) -> float:
        return ratio(self.shared_steps, self.steps)


@dataclass
class EstimatorRow:
    rows: int
    frames: int
    ms: float  # median per call

    @property
    def ms_per_row(self) -> float:
        return ratio(self.ms, self.rows)


@dataclass
class ServeBenchV2:
    preset: str
    machine: dict
    reps: int
    diffusion_steps: int
    texts: list[TextRow] = field(default_factory=list)
    sequential: list[Level] = field(default_factory=list)
    concurrent: list[Level] = field(default_factory=list)
    estimator: list[EstimatorRow] = field(default_factory=list)
    rows_max_since_start: int = 0  # tts_s2mel_batch_rows_max after the run
    notes: list[str] = field(default_factory=list)

    def speedups(self) -> list[float]:
        """Per round: concurrent audio s per wall s / sequential audio s per wall s."""
        return [ratio(c.audio_per_wall, s.audio_per_wall) for s, c in zip(self.sequential, self.concurrent)]

    @property
    def speedup(self) -> float:
        vals = [x for x in self.speedups() if x == x]
        return statistics.median(vals) if vals else float("nan")


def _median(xs: Sequence[float | None]) -> float:
    vals = [float(x) for x in xs if x is not None and x == x]
    return statistics.median(vals) if vals else float("nan")


def _sum_levels(levels: Sequence[Level]) -> Level:
    out = Level(levels[0].concurrency if levels else 0, 0, 0, 0.0, 0.0)
    for lv in levels:
        out.requests += lv.requests
        out.failed += lv.failed
        out.audio_s += lv.audio_s
        out.wall_s += lv.wall_s
        out.steps += lv.steps
        out.shared_steps += lv.shared_steps
        out.joins_mid_diffusion += lv.joins_mid_diffusion
        out.segments += lv.segments
        out.rows_max_sampled = max(out.rows_max_sampled, lv.rows_max_sampled)
    return out


# ------------------------------------------------------------------------------------------------------ report


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or x != x or x in (float("inf"), float("-inf")) else f"{x:.{digits}f}"


def targets(res: ServeBenchV2) -> list[tuple[str, str, bool]]:
    """(target, measured, met): every text's served/engine_ref RTF ratio, and the s2mel throughput ratio."""
    out = []
    for t in res.texts:
        r = t.rtf_ratio
        out.append((f"served RTF / engine_ref RTF, {t.name} text, single stream <= {TARGET_RTF_RATIO}x",
                    f"{fmt(r)}x", r == r and r <= TARGET_RTF_RATIO))
    s = res.speedup
    out.append((f"s2mel throughput: {CONCURRENCY} concurrent / {CONCURRENCY} sequential (audio s per wall s) >= "
                f"{TARGET_S2MEL_SPEEDUP}x (GPU target; this run: {res.machine.get('device', 'CPU')})",
                f"{fmt(s)}x", s == s and s >= TARGET_S2MEL_SPEEDUP))
    return out


def why_lines(res: ServeBenchV2) -> list[str]:
    """The measured reasons behind the throughput ratio: whether batching happened, what a bigger estimator call
    costs per row here, and how much of a request s2mel is (which bounds what batching s2mel alone can give)."""
    seq, conc = _sum_levels(res.sequential), _sum_levels(res.concurrent)
    n = res.diffusion_steps
    own = (": a request's own segments overlap in s2mel too" if seq.shared_steps else "")
    lines = [f"- batching: the concurrent rounds made {conc.steps} estimator calls for {conc.segments} segments "
             f"({fmt(conc.rows_per_call(n), 1)} rows per call on average, at most {conc.rows_max_sampled} sampled, "
             f"{fmt(100 * conc.shared_fraction, 0)}% of calls shared, {conc.joins_mid_diffusion} segments joined "
             f"mid-diffusion); the sequential rounds made {seq.steps} calls for {seq.segments} segments "
             f"({fmt(seq.rows_per_call(n), 1)} rows per call, {fmt(100 * seq.shared_fraction, 0)}% shared{own})."]
    by_rows = {e.rows: e for e in res.estimator}
    gain = float("nan")
    if len(by_rows) >= 2:
        lo, hi = by_rows[min(by_rows)], by_rows[max(by_rows)]
        gain = ratio(lo.ms_per_row, hi.ms_per_row)
        verdict = ("so on this machine folding requests' steps into one call saves little estimator time (the call "
                   "is compute-bound: its cost grows with its rows)" if not gain >= 1.3 else
                   "so folding requests' steps into one call does save estimator time here")
        lines.append(
            f"- one estimator call at {hi.rows} rows takes {fmt(hi.ms, 1)} ms vs {fmt(lo.ms, 1)} ms at {lo.rows} rows "
            f"({fmt(hi.ms_per_row, 2)} vs {fmt(lo.ms_per_row, 2)} ms per row, {hi.frames} frames): a batched row is "
            f"{fmt(gain)}x cheaper, {verdict}. On a GPU a 2-row call leaves most of the chip idle, which is where the "
            f">= {TARGET_S2MEL_SPEEDUP}x target applies.")
    shares = [t.engine_s2mel_share for t in res.texts if t.engine_s2mel_share == t.engine_s2mel_share]
    if shares:
        share = statistics.median(shares)
        bound = ratio(1.0, (1 - share) + share / gain) if gain == gain and gain > 0 else float("nan")
        lines.append(
            f"- s2mel is {fmt(100 * share, 0)}% of engine_ref's time on these texts; the rest (front end, GPT, latent "
            "pass, vocoder) runs on the same cores for every concurrent request. Batching s2mel alone, at the "
            f"per-row saving above, would raise throughput by about {fmt(bound)}x "
            "(1 / ((1 - share) + share / saving)); the measured ratio also carries the GPT decoder's batching and "
            "the contention of concurrent stages for the cores.")
    return lines


def render(res: ServeBenchV2, plan_note: str = "") -> str:
    m = res.machine
    n = res.diffusion_steps
    lines = [
        f"# {'IndexTTS-2.5' if res.preset in V25_PAIRS else 'IndexTTS-2'} served vs engine_ref, and s2mel batching "
        f"({res.preset})", "",
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, host {m.get('host', '?')}, {m.get('date', '?')}; "
        f"torch threads {m.get('threads', '?')}",
        f"- software: Python {m.get('python', '?')}, torch {m.get('torch', '?')}, onnxruntime "
        f"{m.get('onnxruntime', '?')}; commit {m.get('commit', '?')}",
        f"- command: `{m.get('command', '?')}`",
        f"- load average at start: {m.get('load_avg_at_start', 'n/a')}, at end: {m.get('load_avg_at_end', 'n/a')}",
        f"- method: greedy decoding (seed 0), one voice, {n} diffusion steps (CFG pairs), medians of {res.reps} after "
        "one warm-up; engine_ref runs in this process with no server up, then tritonserver (cpu flavor) serves "
        "every served row",
        *(f"- note: {x}" for x in ([plan_note] if plan_note else []) + res.notes), "",
        "## Single stream: served vs engine_ref v2", "",
        "| text | segments | audio (s) engine / served | engine_ref RTF | served RTF | served / engine_ref | "
        "served TTFA (s) | engine_ref first segment (s) | s2mel share of engine_ref | RTF runs engine; served |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in res.texts:
        lines.append(
            f"| {t.name} | {t.segments} | {fmt(t.engine_audio_s)} / {fmt(t.served_audio_s)} | {fmt(t.engine_rtf, 3)} | "
            f"{fmt(t.served_rtf, 3)} | {fmt(t.rtf_ratio)}x | {fmt(t.served_ttfa_s)} | {fmt(t.engine_first_s)} | "
            f"{fmt(100 * t.engine_s2mel_share, 0)}% | {', '.join(fmt(x, 3) for x in t.engine_rtfs)}; "
            f"{', '.join(fmt(x, 3) for x in t.served_rtfs)} |")
    lines += ["", f"## s2mel throughput: {CONCURRENCY} requests one after another vs at once (same server)", "",
              "| round | mode | requests (failed) | audio (s) | wall (s) | audio s / wall s | estimator calls | "
              "segments | rows per call | rows max (sampled) | shared calls | joins mid-diffusion | speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, (s, c, x) in enumerate(zip(res.sequential, res.concurrent, res.speedups()), 1):
        for lv, mode, sp in ((s, "sequential", ""), (c, f"{CONCURRENCY} concurrent", f"{fmt(x)}x")):
            lines.append(f"| {i} | {mode} | {lv.requests} ({lv.failed}) | {fmt(lv.audio_s)} | {fmt(lv.wall_s)} | "
                         f"{fmt(lv.audio_per_wall, 3)} | {lv.steps} | {lv.segments} | {fmt(lv.rows_per_call(n), 1)} | "
                         f"{lv.rows_max_sampled} | {lv.shared_steps} ({fmt(100 * lv.shared_fraction, 0)}%) | "
                         f"{lv.joins_mid_diffusion} | {sp} |")
    lines += ["", f"Median speed-up over the rounds: {fmt(res.speedup)}x; tts_s2mel_batch_rows_max after the run: "
                  f"{res.rows_max_since_start}.", ""]
    if res.estimator:
        lines += ["## cfm_estimator alone (one Euler step, ONNX Runtime)", "",
                  "| rows | frames | ms per call | ms per row |", "|---|---|---|---|"]
        lines += [f"| {e.rows} | {e.frames} | {fmt(e.ms, 1)} | {fmt(e.ms_per_row, 2)} |" for e in res.estimator]
        lines.append("")
    lines += ["## Why the s2mel ratio is what it is here", "", *why_lines(res), "",
              "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {mm} | {'met' if ok else 'NOT met'} |" for t, mm, ok in targets(res)]
    return "\n".join(lines) + "\n"


def to_json(res: ServeBenchV2) -> dict:
    from perf.report import to_plain

    out = to_plain(res)
    out["speedups"] = to_plain(res.speedups())
    out["speedup"] = to_plain(res.speedup)
    out["targets"] = [{"target": t, "measured": mm, "met": ok} for t, mm, ok in targets(res)]
    for key in ("sequential", "concurrent"):
        for plain, lv in zip(out[key], getattr(res, key)):
            plain["rows_per_call"] = to_plain(lv.rows_per_call(res.diffusion_steps))
            plain["shared_fraction"] = to_plain(lv.shared_fraction)
    for plain, t in zip(out["texts"], res.texts):
        plain["rtf_ratio"] = to_plain(t.rtf_ratio)
    return out


def write_report(res: ServeBenchV2, out_dir: Path, plan_note: str = "") -> Path:
    from perf.report import report_stem, write_text_report

    path = out_dir / f"{report_stem(res.preset, res.machine, kind='serve-bench-v2')}.md"
    return write_text_report(path, render(res, plan_note), to_json(res))


# ------------------------------------------------------------------------------------------------------ running


def _say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def ensure_model(preset: str) -> Path:
    from engine_ref.indextts2.presets import write_v2_preset
    from engine_ref.indextts2.v25.presets import write_v25_preset

    model_dir = Path("build/models") / preset
    if not (model_dir / "config.yaml").is_file():
        _say(f"writing preset {preset} to {model_dir} (once; v2 takes minutes and ~8 GB)")
        if preset in V25_PAIRS:
            write_v25_preset(preset, model_dir)
        else:
            write_v2_preset(preset, model_dir, layout="flat")
    return model_dir


def ensure_export(preset: str, model_dir: Path, verify: bool, notes: list[str]) -> Path:
    from export.common import ExportOptions
    from export.pipeline import ExportRequest, run_export

    export_dir = Path("build/exports") / f"{preset}-serve"
    t0 = time.perf_counter()
    _, exported = run_export(ExportRequest(str(model_dir), export_dir, options=ExportOptions(verify=verify)))
    if exported:
        notes.append(f"graphs exported ({'verified' if verify else 'unverified: tests/test_v2_export.py checks parity'})"
                     f" to {export_dir} in {time.perf_counter() - t0:.0f} s")
    else:
        notes.append(f"graphs reused from {export_dir} (up to date)")
    return export_dir


def bench_engine_ref(model, plan: Plan, voice: bytes, reps: int) -> dict[str, dict]:
    """Per text: medians of RTF, first-segment time and s2mel share over `reps` runs after one warm-up."""
    from engine_ref.indextts2.gpt.generate import v2_generation_params
    from engine_ref.indextts2.synthesizer import Synthesizer2, TimingsV2
    from engine_ref.indextts2.v25.synthesizer import Synthesizer25

    # the repository's 15 s reference cut
    synth = (Synthesizer25 if plan.v25 else Synthesizer2)(model, max_reference_seconds=15.0)
    kwargs = {"lang": V25_LANG} if plan.v25 else {}
    cap = {} if plan.max_mel_tokens is None else {"max_mel_tokens": plan.max_mel_tokens}
    params = v2_generation_params(do_sample=False, num_beams=1, seed=0, **cap)
    out: dict[str, dict] = {}
    for name in plan.texts:
        runs = []
        for rep in range(reps + 1):
            timings = TimingsV2()
            t0 = time.perf_counter()
            first, samples, segs = None, 0, []
            for seg in synth.stream(TEXTS[name], voice, params, timings=timings, **kwargs):
                if first is None:
                    first = time.perf_counter() - t0
                samples += seg.pcm16.size
                segs.append(seg.pcm16.size)
            total = time.perf_counter() - t0
            samples += synth.interval_samples * max(0, len(segs) - 1)  # what `synthesize` joins with
            if rep:
                runs.append({"rtf": total / (samples / SAMPLE_RATE), "first": first, "audio_s": samples / SAMPLE_RATE,
                             "s2mel_share": timings.s2mel_s / total, "segments": len(segs),
                             "segment_s": statistics.mean(segs) / SAMPLE_RATE, "stages": timings.stages()})
        out[name] = {"rtf": _median([r["rtf"] for r in runs]), "rtfs": [r["rtf"] for r in runs],
                     "first": _median([r["first"] for r in runs]), "audio_s": runs[0]["audio_s"],
                     "s2mel_share": _median([r["s2mel_share"] for r in runs]), "segments": runs[0]["segments"],
                     "segment_s": runs[0]["segment_s"],
                     "stages": {k: _median([r["stages"][k] for r in runs]) for k in runs[0]["stages"]}}
        print(f"    engine_ref {name}: RTF {out[name]['rtf']:.3f}, first segment {out[name]['first']:.2f} s",
              file=sys.stderr)
    return out


def bench_estimator(model, export_dir: Path, frames: int, prompt_frames: int, reps: int) -> list[EstimatorRow]:
    """The exported cfm_estimator at 2 and 8 rows (same frames), interleaved, median ms per call."""
    import numpy as np

    from export.common import session
    from export.indextts2.cfm import cfg_batch
    from export.manifest import read_manifest

    sess = session(export_dir / read_manifest(export_dir).component("cfm_estimator").file)
    rng = np.random.default_rng(0)
    feeds = {rows: cfg_batch(rng, model, np.full(rows // 2, frames, np.int64), np.full(rows // 2, prompt_frames,
                                                                                         np.int64))
             for rows in ESTIMATOR_ROWS}
    times: dict[int, list[float]] = {rows: [] for rows in ESTIMATOR_ROWS}
    for rep in range(max(5, reps) + 1):
        for rows, f in feeds.items():
            t0 = time.perf_counter()
            sess.run(["velocity"], f)
            if rep:
                times[rows].append(1e3 * (time.perf_counter() - t0))
    return [EstimatorRow(rows, frames, _median(times[rows])) for rows in ESTIMATOR_ROWS]


_S2MEL = ("tts_s2mel_steps_total", "tts_s2mel_shared_steps_total", "tts_s2mel_joins_mid_diffusion_total",
          "tts_s2mel_requests_done_total", "tts_s2mel_batch_rows", "tts_s2mel_batch_rows_max")


def _rows_seen(samples: Sequence[tuple[float, dict[str, float]]]) -> list[int]:
    """The batch-rows gauge at each sample where a step ran since the previous one: the gauge keeps the last
    step's rows while s2mel idles, so without this a level's first samples show the previous level's batch."""
    out = []
    for (_, prev), (_, cur) in zip(samples, samples[1:]):
        if cur.get("tts_s2mel_steps_total", 0.0) > prev.get("tts_s2mel_steps_total", 0.0):
            out.append(int(cur.get("tts_s2mel_batch_rows", 0)))
    return out


def run_throughput_level(target, metrics_url: str, items: list, concurrency: int) -> Level:
    from perf.loadgen import MetricsSampler, run_level, scrape_metrics

    before = scrape_metrics(metrics_url)
    with MetricsSampler(metrics_url, interval_s=0.02, names=_S2MEL) as sampler:
        t0 = time.perf_counter()
        outcomes = run_level(target, items, concurrency, len(items))
        wall = time.perf_counter() - t0
    time.sleep(0.2)  # the last step's counters reach the endpoint
    after = scrape_metrics(metrics_url)

    def delta(name: str) -> int:
        return int(round(after.get(name, 0.0) - before.get(name, 0.0)))

    ok = [o for o in outcomes if o.record.ok]
    sampled = _rows_seen(sampler.samples)
    return Level(concurrency, len(outcomes), len(outcomes) - len(ok), sum(o.record.audio_s for o in ok), wall,
                 steps=delta("tts_s2mel_steps_total"), shared_steps=delta("tts_s2mel_shared_steps_total"),
                 joins_mid_diffusion=delta("tts_s2mel_joins_mid_diffusion_total"),
                 segments=delta("tts_s2mel_requests_done_total"), rows_max_sampled=max(sampled, default=0))


def run(preset: str, reps: int, out_dir: Path, command: str,
        verify_export: bool = False) -> tuple[Path, ServeBenchV2]:
    import torch

    from client.request import Controls, GenerationOverrides, TTSRequest
    from engine_ref.audio import wav_bytes
    from engine_ref.errors import InputError
    from engine_ref.indextts.presets import demo_voice
    from engine_ref.indextts2.loader import load_v2_model
    from engine_ref.indextts2.v25.loader import load_v25_model
    from export.manifest import read_manifest
    from model_repository.builder import RepoOptions, build_repository
    from model_repository.server import ServerConfig, TritonServer, free_port
    from perf.loadgen import LoadRequest, LoadTarget, run_requests, scrape_metrics
    from perf.machine import load_average, machine_info

    if reps < 1:
        raise InputError(f"--reps {reps} must be >= 1", "pass --reps 1 or more")
    plan = plan_for(preset)
    machine = machine_info(torch.get_num_threads(), command)
    machine["device"] = "CPU"
    notes: list[str] = []
    model_dir = ensure_model(preset)
    export_dir = ensure_export(preset, model_dir, verify_export, notes)
    manifest = read_manifest(export_dir)
    steps = int(manifest.model.get("diffusion_steps", 25))
    voice = wav_bytes(demo_voice(plan.voice_seconds, 24000), 24000)

    _say(f"engine_ref {preset} (no server running)")
    model = (load_v25_model if plan.v25 else load_v2_model)(model_dir)
    ref = bench_engine_ref(model, plan, voice, reps)
    last = ref[plan.texts[-1]]
    prompt_frames = int(plan.voice_seconds * MEL_FRAMES_PER_S)
    frames = prompt_frames + int(last["segment_s"] * MEL_FRAMES_PER_S)
    _say(f"cfm_estimator alone at {ESTIMATOR_ROWS} rows, {frames} frames")
    estimator = bench_estimator(model, export_dir, frames, prompt_frames, reps)
    del model  # the server gets the memory (v2: several GB)

    res = ServeBenchV2(preset, machine, reps, steps, estimator=estimator, notes=notes)
    cap = {} if plan.max_mel_tokens is None else {"max_mel_tokens": plan.max_mel_tokens}
    greedy = GenerationOverrides(do_sample=False, num_beams=1, seed=0, **cap)
    controls = Controls(language=V25_LANG) if plan.v25 else None
    singles = {name: LoadRequest(name, TTSRequest.build(TEXTS[name], voice, params=greedy, controls=controls), "voice")
               for name in plan.texts}
    batch = [LoadRequest(f"t{i}", TTSRequest.build(t, voice, params=greedy, controls=controls), "voice")
             for i, t in enumerate(plan.throughput_texts)]
    repo = build_repository(export_dir, Path("build/bench") / preset / "serve-v2-repo", RepoOptions())
    _say("tritonserver: single stream, then the s2mel throughput rounds")
    server = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
    try:  # stopped even when the start itself fails part way
        server.start(timeout_s=600)
        target = LoadTarget(server.grpc_url, timeout_s=600)
        warm = run_requests(target, [*singles.values(), *batch])
        bad = [o.record.error for o in warm if o.record.error]
        if bad:
            raise InputError(f"warm-up request failed: {bad[0]}", f"see {server.log_path}")
        for name, item in singles.items():
            outs = run_requests(target, [item] * reps)
            recs = [o.record for o in outs if o.record.ok]
            if len(recs) < len(outs):
                notes.append(f"{name}: {len(outs) - len(recs)} served request(s) failed")
            rtfs = [r.total_s / r.audio_s for r in recs if r.audio_s]
            e = ref[name]
            res.texts.append(TextRow(name, e["segments"], e["audio_s"], e["rtf"], e["first"], e["s2mel_share"],
                                     _median([r.audio_s for r in recs]), _median(rtfs),
                                     _median([r.first_audio_s for r in recs]), e["rtfs"], rtfs, e["stages"]))
            print(f"    served {name}: RTF {res.texts[-1].served_rtf:.3f}, TTFA {res.texts[-1].served_ttfa_s:.2f} s",
                  file=sys.stderr)
        for i in range(reps):
            res.sequential.append(run_throughput_level(target, server.metrics_url, batch, 1))
            res.concurrent.append(run_throughput_level(target, server.metrics_url, batch, CONCURRENCY))
            print(f"    round {i + 1}: sequential {res.sequential[-1].audio_per_wall:.3f}, concurrent "
                  f"{res.concurrent[-1].audio_per_wall:.3f} audio s / wall s", file=sys.stderr)
        res.rows_max_since_start = int(scrape_metrics(server.metrics_url).get("tts_s2mel_batch_rows_max", 0))
    finally:
        server.stop()
    for t in res.texts:
        if abs(t.engine_audio_s - t.served_audio_s) > 0.05:
            notes.append(f"{t.name}: served audio {t.served_audio_s:.2f} s differs from engine_ref's "
                         f"{t.engine_audio_s:.2f} s (the RTF ratio compares different work)")
    machine["load_avg_at_end"] = load_average()
    return write_report(res, out_dir, plan.note), res


def _level_median(levels: Sequence[Level]) -> float:
    return _median([lv.audio_per_wall for lv in levels])


def render_comparison(new: ServeBenchV2, old: ServeBenchV2, reports: Sequence[Path] = ()) -> str:
    """IndexTTS-2.5 (`new`) beside 2.0 (`old`), both from this run: engine_ref per stage and end to end, served
    single stream and 4 concurrent, each as 2.5 / 2.0 (< 1: 2.5 takes less time or, for throughput, > 1: more)."""
    m = new.machine

    def row(label: str, a: float, b: float, digits: int = 3) -> str:
        r = fmt(ratio(b, a))
        return f"| {label} | {fmt(a, digits)} | {fmt(b, digits)} | {r if r == 'n/a' else r + 'x'} |"

    lines = [f"# IndexTTS-2.5 ({new.preset}) vs IndexTTS-2 ({old.preset}): engine_ref and served, one run", "",
             f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, host {m.get('host', '?')}; commit "
             f"{m.get('commit', '?')}", f"- command: `{m.get('command', '?')}`",
             f"- load average: 2.0 rows {old.machine.get('load_avg_at_start', 'n/a')} -> "
             f"{old.machine.get('load_avg_at_end', 'n/a')}; 2.5 rows {m.get('load_avg_at_start', 'n/a')} -> "
             f"{m.get('load_avg_at_end', 'n/a')}",
             "- the same texts, voice and greedy settings (2.5 with lang=en); medians of each report's runs; 2.5's "
             "codes are 25 Hz (2.0: 50 Hz), so the same audio takes half the GPT steps; 2.5 has no latent pass",
             *(f"- from {p.name}" for p in reports), ""]
    for t_old in old.texts:
        t_new = next((t for t in new.texts if t.name == t_old.name), None)
        if t_new is None:
            continue
        lines += [f"## {t_old.name} text", "", "| figure | 2.0 | 2.5 | 2.5 / 2.0 |", "|---|---|---|---|"]
        for stage in t_old.engine_stages:
            a, b = t_old.engine_stages[stage], t_new.engine_stages.get(stage, 0.0)
            if a or b:
                lines.append(row(f"engine_ref {stage} (s)", a, b))
        lines += [row("engine_ref audio (s)", t_old.engine_audio_s, t_new.engine_audio_s, 2),
                  row("engine_ref RTF (end to end)", t_old.engine_rtf, t_new.engine_rtf),
                  row("served RTF, single stream", t_old.served_rtf, t_new.served_rtf),
                  row("served TTFA (s), single stream", t_old.served_ttfa_s, t_new.served_ttfa_s, 2), ""]
    lines += [f"## Served throughput ({CONCURRENCY} requests; audio s per wall s, median of the rounds; > 1x: 2.5 "
              "does more)", "", "| figure | 2.0 | 2.5 | 2.5 / 2.0 |", "|---|---|---|---|",
              row("one after another", _level_median(old.sequential), _level_median(new.sequential)),
              row(f"{CONCURRENCY} concurrent", _level_median(old.concurrent), _level_median(new.concurrent)),
              row(f"{CONCURRENCY} concurrent / one after another", old.speedup, new.speedup, 2), ""]
    return "\n".join(lines) + "\n"


def write_comparison(new: ServeBenchV2, old: ServeBenchV2, out_dir: Path, reports: Sequence[Path] = ()) -> Path:
    from perf.report import report_stem, write_text_report

    stem = report_stem(f"{new.preset}-vs-{old.preset}", new.machine, kind="serve-bench-v2-compare")
    return write_text_report(out_dir / f"{stem}.md", render_comparison(new, old, reports))


def main(argv: Sequence[str] | None = None) -> int:
    from engine_ref.errors import TTSError

    p = argparse.ArgumentParser(prog="python -m perf.serve_bench_v2", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", choices=PRESETS,
                   help="tiny-v2 (default), v2, tiny-v2.5, v2.5; repeat to run several (a 2.5 preset beside its 2.0 "
                        "size adds a comparison report)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="perf/results")
    p.add_argument("--verify-export", action="store_true", help="verify each graph against engine_ref when exporting")
    args = p.parse_args(argv)
    command = "python -m perf.serve_bench_v2 " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    presets = list(dict.fromkeys(args.preset or ["tiny-v2"]))
    done: dict[str, tuple[Path, ServeBenchV2]] = {}
    try:
        for preset in presets:
            done[preset] = run(preset, args.reps, Path(args.out), command.strip(), args.verify_export)
            print(f"wrote {done[preset][0]}", file=sys.stderr)
    except TTSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for new, old in V25_PAIRS.items():
        if new in done and old in done:
            path = write_comparison(done[new][1], done[old][1], Path(args.out), [done[old][0], done[new][0]])
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
