"""Time to first audio: chunked streaming vs one chunk per segment, fp32 and int4 decoders, vs engine_ref's first
segment, all in one run on one machine (the chunked-streaming issue's benchmark).

    python -m perf.ttfa_bench --preset v1.5 [--reps 3] [--out perf/results]

Per text (the suite's short / medium / long), single stream, greedy, median of `reps` after one warm-up:
- served TTFA with the repository's chunk schedule (CHUNK_FIRST_CODES, default 16) and with CHUNK_FIRST_CODES=0
  (the per-segment streaming of before), for each decoder precision;
- engine_ref's time to its first finished segment (what a per-segment engine can stream at best).
Then 8 concurrent chunked streams (medium text): TTFA p50/p99, and the decoder's step-time p50/p99 over the level
read from its own metric (tts_decoder_step_seconds_p50/p99 over the last steps), and audio s per wall s.
The report goes to perf/results/ttfa-<preset>-<date>-<host>.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

TARGETS = {"fp32": 2.5, "int4": 1.2}  # seconds to the first chunk (the targets, v1.5 size, this CPU)


@dataclass
class Row:
    scenario: str
    precision: str
    chunked_s: float
    per_segment_s: float
    engine_ref_first_s: float
    codes_first_chunk: int | None = None


@dataclass
class Concurrent:
    precision: str
    streams: int
    ttfa_p50: float
    ttfa_p99: float
    audio_per_wall: float
    step_p50_ms: float | None
    step_p99_ms: float | None
    failed: int


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    concurrent: list[Concurrent] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run(preset: str, reps: int, out_dir: Path, precisions: tuple[str, ...], command: str,
        scenarios: tuple[str, ...] = ()) -> Path:
    from engine_ref.indextts.synthesizer import Synthesizer
    from engine_ref.sampling import GenerationParams
    from model_repository.builder import RepoOptions, build_repository
    from perf.loadgen import LoadTarget, run_level, run_requests, scrape_metrics
    from perf.machine import machine_info
    from perf.suite import Served, SuiteResult, _items, _say, _voices, ensure_export, ensure_model, suite_config

    cfg = suite_config(preset, variants=tuple(p for p in precisions if p != "fp32"), warmup_rounds=1)
    if scenarios:  # a subset (slow machines): the report lists only these rows
        unknown = sorted(set(scenarios) - {s.name for s in cfg.scenarios})
        if unknown:
            raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}: choose from "
                             f"{', '.join(s.name for s in cfg.scenarios)}")
        cfg = replace(cfg, scenarios=tuple(s for s in cfg.scenarios if s.name in scenarios))
    machine = machine_info(0, command)
    result = Result()
    model_dir = ensure_model(cfg)
    export_dir = ensure_export(cfg, model_dir)
    voices = _voices(cfg)
    items = _items(cfg, voices)

    _say("engine_ref: time to the first finished segment")
    synth = Synthesizer.from_pretrained(model_dir)
    params = GenerationParams.greedy(seed=0)
    ref_first: dict[str, float] = {}
    for name, reqs in items.items():
        item = reqs[0]
        runs = []
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            for seg in synth.stream(item.request.text, voices[item.voice], params):
                if seg.pcm16.size:
                    break
            if rep:  # rep 0 warms the speaker cache and the kernels
                runs.append(time.perf_counter() - t0)
        ref_first[name] = _median(runs)
        print(f"    engine_ref {name}: first segment {ref_first[name]:.2f} s", file=sys.stderr)
    del synth

    suite_result = SuiteResult(cfg, machine, notes=[])
    first_items = {name: reqs[:1] for name, reqs in items.items()}
    ttfa: dict[tuple[str, str, int], tuple[float, int | None]] = {}
    for precision in precisions:
        for first in (16, 0):  # the repository default schedule, and one chunk per segment (before chunking)
            repo = build_repository(export_dir, cfg.work_dir / f"ttfa-repo-{precision}-c{first}",
                                    RepoOptions(max_sequences=cfg.max_sequences, decoder_precision=precision,
                                                chunk_first_codes=first))
            with Served(cfg, repo, first_items, suite_result) as served:
                target = LoadTarget(served.server.grpc_url, timeout_s=cfg.timeout_s)
                for name, reqs in first_items.items():
                    runs = run_requests(target, reqs * reps)
                    facts = runs[0].chunks
                    ttfa[(name, precision, first)] = (_median([o.record.first_audio_s for o in runs]),
                                                      facts[0].available if facts else None)
                    print(f"    {precision} chunk_first={first} {name}: TTFA {ttfa[(name, precision, first)][0]:.2f} s",
                          file=sys.stderr)
                if first:
                    medium = first_items.get("medium") or next(iter(first_items.values()))
                    streams = 8
                    t0 = time.perf_counter()
                    level = run_level(target, medium, streams, streams)
                    wall = time.perf_counter() - t0
                    metrics = scrape_metrics(served.server.metrics_url)
                    ok = [o for o in level if o.record.ok]
                    step50 = metrics.get("tts_decoder_step_seconds_p50")
                    step99 = metrics.get("tts_decoder_step_seconds_p99")
                    result.concurrent.append(Concurrent(
                        precision, streams, _pct([o.record.first_audio_s for o in ok], 0.5),
                        _pct([o.record.first_audio_s for o in ok], 0.99),
                        sum(o.record.audio_s for o in ok) / wall if wall else 0.0,
                        step50 * 1000 if step50 is not None else None, step99 * 1000 if step99 is not None else None,
                        len(level) - len(ok)))
        for name in first_items:
            chunked, codes = ttfa[(name, precision, 16)]
            result.rows.append(Row(name, precision, chunked, ttfa[(name, precision, 0)][0], ref_first[name], codes))
    return write_report(result, machine, preset, out_dir, command, reps)


def _f(x, unit: str = "") -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}{unit}"


def write_report(result: Result, machine, preset: str, out_dir: Path, command: str, reps: int) -> Path:
    from perf.report import report_stem

    stem = report_stem(preset, machine, kind="ttfa")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.md"
    lines = [f"# Time to first audio ({preset}): chunked vs per-segment streaming", "",
             f"- machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, host {machine.get('host', '?')}, "
             f"commit {machine.get('commit', '?')}",
             f"- command: `{command}`", f"- single stream, greedy, median of {reps} after one warm-up; then 8 "
             "concurrent chunked streams of the medium text", "",
             "| text | decoder | TTFA chunked (s) | TTFA per segment (s) | engine_ref first segment (s) | chunked / per segment | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        target = TARGETS.get(r.precision)
        met = "met" if target is not None and r.chunked_s <= target else "NOT met"
        ratio = r.chunked_s / r.per_segment_s if r.per_segment_s else float("nan")
        lines.append(f"| {r.scenario} | {r.precision} | {_f(r.chunked_s)} | {_f(r.per_segment_s)} | "
                     f"{_f(r.engine_ref_first_s)} | {_f(ratio)}x | <= {target} s | {met} |")
    lines += ["", "| decoder | streams | TTFA p50 (s) | TTFA p99 (s) | audio s / wall s | decode step p50 (ms) | "
                  "decode step p99 (ms) | failed |", "|---|---|---|---|---|---|---|---|"]
    for cc in result.concurrent:
        lines.append(f"| {cc.precision} | {cc.streams} | {_f(cc.ttfa_p50)} | {_f(cc.ttfa_p99)} | "
                     f"{_f(cc.audio_per_wall)} | {_f(cc.step_p50_ms)} | {_f(cc.step_p99_ms)} | {cc.failed} |")
    lines += ["", "codes in the first chunk's window = the first chunk (16 codes) plus the vocoder look-ahead "
              "(the export's stream_context_frames); the per-segment column is the same server with "
              "CHUNK_FIRST_CODES=0.", *result.notes]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.ttfa_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--precisions", default="fp32,int4")
    p.add_argument("--out", default="perf/results")
    p.add_argument("--scenarios", default="", help="subset of short,medium,long (default: all)")
    args = p.parse_args(argv)
    command = "python -m perf.ttfa_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    run(args.preset, args.reps, Path(args.out), tuple(args.precisions.split(",")), command,
        tuple(x.strip() for x in args.scenarios.split(",") if x.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
