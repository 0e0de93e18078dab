"""The suite's report: markdown tables, PNG plots, the raw JSON, and the results index (perf/results/README.md).

Files are named `bench-<preset>-<YYYYmmdd-HHMM>-<host>` so runs never overwrite each other; every report carries
the machine (CPU, cores), git commit, exact command and preset. The targets of the serving issue are evaluated
here, each as measured / goal / met, with the ratio to engine_ref from the same run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from engine_ref.errors import TTSError
from perf.stats import ratio, sequential_throughput

__all__ = ["PlottingUnavailable", "check_plotting", "report_stem", "write_text_report", "Target", "targets", "render", "write_report",
           "expected_rows", "to_plain"]


class PlottingUnavailable(TTSError):
    """matplotlib is missing: the report's plots cannot be drawn."""


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlottingUnavailable("the benchmark draws its plots with matplotlib, which is not installed",
                                  "pip install 'matplotlib>=3.8,<4'") from None


def report_stem(preset: str, machine: dict | None = None, kind: str = "bench") -> str:
    """Every report's file name: <kind>-<preset>-<date>-<host> (preset may be empty), so perf/results sorts by kind."""
    import socket

    raw = (machine or {}).get("host") or socket.gethostname()
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", str(raw))[:40] or "host"
    return "-".join(x for x in (kind, preset, dt.datetime.now().strftime("%Y%m%d-%H%M"), host) if x)


def write_text_report(path: Path, text: str, data: Any = None) -> Path:
    """The markdown at `path` (and `data` as JSON beside it, when given), echoed to stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if data is not None:
        path.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    print(text)
    return path


def to_plain(obj: Any) -> Any:
    """JSON-ready: dataclasses as dicts (with their derived figures), Paths as str, NaN/inf as None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.name.startswith("_")}
        for prop in ("audio_per_wall", "requests_per_s", "rtf", "ok"):
            if isinstance(getattr(type(obj), prop, None), property):
                out[prop] = to_plain(getattr(obj, prop))
        return out
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------------------------------- figures


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{float(x):.{digits}f}"


def _x(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{float(x):.2f}x"


def _ref_items(result, scenario: str) -> list:
    return [r for r in result.ref if r.scenario == scenario]


def _ref_median(result, scenario: str, attr: str) -> float:
    vals = [getattr(r, attr) for r in _ref_items(result, scenario)]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


def _ref_sequential(result, scenario: str, n: int) -> float:
    """engine_ref serving the level's n requests (the scenario's items cycled) one after another."""
    items = _ref_items(result, scenario)
    if not items:
        return float("nan")
    chosen = [items[i % len(items)] for i in range(n)]
    return sequential_throughput([r.audio_s for r in chosen], [r.total_s for r in chosen])


def _level(levels: Sequence, scenario: str, concurrency: int):
    return next((lv for lv in levels if lv.scenario == scenario and lv.concurrency == concurrency), None)


@dataclass(frozen=True)
class Target:
    key: str
    what: str
    measured: str
    goal: str
    met: bool | None  #: None: not measured in this run


def _status(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**NOT met**")


def targets(result) -> list[Target]:
    """The serving issue's targets, one row per scenario where measured."""
    out: list[Target] = []
    for sc in result.config.scenarios:
        lv1 = _level(result.levels, sc.name, 1)
        ref_rtf = _ref_median(result, sc.name, "rtf")
        if lv1 is not None:
            r = ratio(lv1.rtf.p50, ref_rtf)
            out.append(Target(f"T1 {sc.name}", "single stream fp32: served RTF <= 1.1x engine_ref's",
                              f"{_f(lv1.rtf.p50)} vs {_f(ref_rtf)} = {_x(r)}", "<= 1.10x",
                              None if math.isnan(r) else r <= 1.1))
        lv8 = _level(result.levels, sc.name, 8)
        if lv8 is not None:
            seq = _ref_sequential(result, sc.name, 8)
            r_ref = ratio(lv8.audio_per_wall, seq)
            out.append(Target(f"T2a {sc.name}", "8 concurrent: audio s per wall s >= 4x engine_ref, same 8 one after "
                              "another", f"{_f(lv8.audio_per_wall, 2)} vs {_f(seq, 2)} = {_x(r_ref)}", ">= 4.00x",
                              None if math.isnan(r_ref) else r_ref >= 4.0))
            if lv1 is not None:
                r_c1 = ratio(lv8.audio_per_wall, lv1.audio_per_wall)
                out.append(Target(f"T2b {sc.name}", "8 concurrent: audio s per wall s >= 3x served at concurrency 1",
                                  f"{_f(lv8.audio_per_wall, 2)} vs {_f(lv1.audio_per_wall, 2)} = {_x(r_c1)}",
                                  ">= 3.00x", None if math.isnan(r_c1) else r_c1 >= 3.0))
                out.append(Target(f"T5 {sc.name}", "concurrent path: audio s per wall s at 8 >= 1.5x concurrency 1",
                                  f"{_f(lv8.audio_per_wall, 2)} vs {_f(lv1.audio_per_wall, 2)} = {_x(r_c1)}",
                                  ">= 1.50x", None if math.isnan(r_c1) else r_c1 >= 1.5))
            ceil = result.ceilings.get(f"{sc.name}@8")
            if ceil is not None:
                r_ceil = ratio(lv8.audio_per_wall, ceil.audio_per_wall)
                out.append(Target(f"T6 {sc.name}", "concurrent path: audio s per wall s at 8 >= 0.9x the sum-of-parts "
                                  "ceiling", f"{_f(lv8.audio_per_wall, 2)} vs {_f(ceil.audio_per_wall, 2)} = "
                                  f"{_x(r_ceil)}", ">= 0.90x", None if math.isnan(r_ceil) else r_ceil >= 0.9))
    for fs in result.first_segment:
        r = ratio(fs.ttfa_s, fs.alone_s)
        out.append(Target(f"T3 {fs.scenario}[{fs.text_index}]", "streaming TTFA within 1.2x of the first segment "
                          "alone", f"{_f(fs.ttfa_s)} s vs {_f(fs.alone_s)} s = {_x(r)}", "<= 1.20x",
                          None if math.isnan(r) else r <= 1.2))
    for var in result.variants:
        for lv in var.levels:
            ref_rtf = _ref_median(result, lv.scenario, "rtf")
            r = ratio(lv.rtf.p50, ref_rtf)
            out.append(Target(f"T4 {var.precision} {lv.scenario}", f"{var.precision} decoder single stream: served "
                              "RTF <= 0.3x engine_ref fp32", f"{_f(lv.rtf.p50)} vs {_f(ref_rtf)} = {_x(r)}",
                              "<= 0.30x", None if math.isnan(r) else r <= 0.3))
        if var.error:
            out.append(Target(f"T4 {var.precision}", f"{var.precision} decoder single stream", var.error[:120],
                              "<= 0.30x", None))
    return out


# ------------------------------------------------------------------------------------------------------ rendering


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def expected_rows(cfg) -> list[str]:
    """Row labels every complete report of `cfg` carries (the smoke test checks them)."""
    rows = [f"| ref {sc.name}[{i}] |" for sc in cfg.scenarios for i in range(len(sc.texts))]
    rows += [f"| {sc.name} c={c} |" for sc in cfg.scenarios for c in sc.concurrency]
    rows += [f"| T1 {sc.name} |" for sc in cfg.scenarios if 1 in sc.concurrency]
    rows += [f"| T2a {sc.name} |" for sc in cfg.scenarios if 8 in sc.concurrency]
    rows += [f"| T5 {sc.name} |" for sc in cfg.scenarios if {1, 8} <= set(sc.concurrency)]
    rows += [f"| batch {sc.name} c={c} |" for sc in cfg.scenarios for c in sc.concurrency]
    if cfg.parts:
        rows += [f"| T6 {sc.name} |" for sc in cfg.scenarios if 8 in sc.concurrency]
        rows += [f"| parts {sc.name} |" for sc in cfg.scenarios]
        rows += [f"| ceiling {sc.name} c={c} |" for sc in cfg.scenarios for c in sc.concurrency]
    if cfg.cancel_victims > 0:
        rows += [f"| cancel c={cfg.cancel_concurrency} |"]
    rows += [f"| {v} {sc.name} c=1 |" for v in cfg.variants for sc in cfg.scenarios]
    rows += [f"| T4 {v} {sc.name} |" for v in cfg.variants for sc in cfg.scenarios]
    if cfg.perf_analyzer:
        rows += [f"| pa c={c} |" for c in cfg.pa_concurrency]
    rows += ["| soak |", "| decode floor fp32 |", "| vocoder |"]
    return rows


def _machine_lines(result) -> list[str]:
    m, cfg = result.machine, result.config
    lines = [
        f"- date: {m.get('date')}; host: `{m.get('host')}`; CPU: {m.get('cpu')}, {m.get('cores')} cores; "
        f"load average at start: {m.get('load_avg_at_start', 'n/a')}, at end: {m.get('load_avg_at_end', 'n/a')} "
        "(above the core count: other processes competed for the CPU)",
        f"- commit: `{m.get('commit')}`; python {m.get('python')}, torch {m.get('torch')}, onnxruntime "
        f"{m.get('onnxruntime')}",
        f"- command: `{m.get('command')}`",
        f"- preset: **{cfg.preset}**; greedy decoding (do_sample=false, num_beams=1, seed 0); decoder max_sequences "
        f"{cfg.max_sequences}; threads {cfg.threads or 'default'}"
        f" (spinning: {cfg.spin_threads}); voices {', '.join(f'{v:g} s' for v in cfg.voices)}",
        "- scenarios: " + "; ".join(
            f"{sc.name} ({len(sc.texts)} text(s), {min(len(t) for t in sc.texts)}-{max(len(t) for t in sc.texts)} "
            f"chars) at concurrency {', '.join(map(str, sc.concurrency))}, max({sc.min_requests}, "
            f"{sc.per_stream} x c) requests per level" for sc in cfg.scenarios),
        f"- warm-up: every request {cfg.warmup_rounds}x before measuring; engine_ref: median of "
        f"{cfg.engine_ref_reps} after a warm-up call {'per request' if cfg.engine_ref_warmup_each else 'per voice'}; "
        f"first-segment check: median of {cfg.first_segment_reps}",
    ]
    lines.append(f"- tritonserver arguments beyond the defaults: `{' '.join(cfg.server_args) or 'none'}`")
    if result.scrape_s:
        lines.append(f"- decoder batch: the metrics endpoint scraped every {1e3 * cfg.batch_sample_s:g} ms during each "
                     f"level (median scrape {_f(1e3 * statistics.median(result.scrape_s), 1)} ms, "
                     f"{len(result.scrape_s)} scrapes; the scraping shares the CPU with the server)")
    lines += [f"- note: {n}" for n in result.notes]
    if result.timings:
        lines.append("- phases: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in result.timings.items()))
    return lines


def render(result, stem: str) -> str:
    cfg = result.config
    out = [f"# Serving benchmark: {cfg.preset} preset", ""]
    out += _machine_lines(result) + [""]

    out += ["## Targets of the serving issue", ""]
    tg = targets(result)
    out += _table(["target", "what", "measured", "goal", "status"],
                  ([t.key, t.what, t.measured, t.goal, _status(t.met)] for t in tg))
    out += [""]

    out += ["## engine_ref (PyTorch), sequential, same texts and voices", ""]
    out += _table(["request", "voice", "chars", "segments", "first segment s", "total s", "audio s", "RTF",
                   "decode ms/token", "vocoder RTF"],
                  ([f"ref {r.scenario}[{r.text_index}]", r.voice, r.chars, r.segments, _f(r.first_segment_s),
                    _f(r.total_s), _f(r.audio_s, 2), _f(r.rtf), _f(1e3 * ratio(r.generate_s, r.tokens), 1),
                    _f(ratio(r.vocoder_s, r.audio_s))] for r in result.ref))
    out += [""]

    out += ["## Served: our async gRPC streaming client (tts)", "",
            "TTFA = time to first audio; latency = to the last chunk; ratios are served / engine_ref (same run): "
            "TTFA vs engine_ref's first segment, RTF vs engine_ref's RTF, throughput vs engine_ref serving the same "
            "requests one after another.", ""]
    rows = []
    for lv in result.levels:
        ref_first = _ref_median(result, lv.scenario, "first_segment_s")
        ref_rtf = _ref_median(result, lv.scenario, "rtf")
        seq = _ref_sequential(result, lv.scenario, lv.requests)
        rows.append([f"{lv.scenario} c={lv.concurrency}", lv.requests, lv.failed,
                     f"{_f(lv.ttfa_s.p50)} / {_f(lv.ttfa_s.p90)} / {_f(lv.ttfa_s.p99)}",
                     f"{_f(lv.latency_s.p50)} / {_f(lv.latency_s.p90)} / {_f(lv.latency_s.p99)}",
                     f"{_f(lv.rtf.p50)} / {_f(lv.rtf.p90)}", _f(lv.audio_per_wall, 2),
                     _x(ratio(lv.ttfa_s.p50, ref_first)), _x(ratio(lv.rtf.p50, ref_rtf)),
                     _x(ratio(lv.audio_per_wall, seq))])
    out += _table(["level", "requests", "failed", "TTFA s p50/p90/p99", "latency s p50/p90/p99", "RTF p50/p90",
                   "audio s per wall s", "TTFA / ref", "RTF / ref", "throughput / ref"], rows)
    errors = sorted({e for lv in result.levels for e in lv.errors})
    out += [""] + [f"- failure seen: {e}" for e in errors] + ([""] if errors else [])

    out += _ceiling_section(result)
    out += _batch_section(result, stem)
    out += _cancel_section(result)

    out += ["## Triton per-model statistics (deltas over each level)", "",
            "Decoupled models (tts, gpt_decoder) count only their `execute` call (enqueueing); their work shows "
            "in the client latency and in the leaves they call.", ""]
    rows = [[f"{key.replace('@', ' c=')} {mt.model}", mt.requests, mt.executions, _f(mt.queue_ms, 2),
             _f(mt.compute_ms, 2), _f(mt.queue_total_s, 2), _f(mt.compute_total_s, 2)]
            for key, times in result.model_times.items() for mt in times]
    out += _table(["level / model", "requests", "executions", "queue ms (mean)", "compute ms (mean)",
                   "queue s (total)", "compute s (total)"], rows) + [""]

    if result.first_segment:
        out += ["## Streaming: time to first audio vs the first segment alone (single stream)", ""]
        out += _table(["request", "TTFA s", "first segment alone s", "ratio", "same codes"],
                      ([f"first {f.scenario}[{f.text_index}]", _f(f.ttfa_s), _f(f.alone_s),
                        _x(ratio(f.ttfa_s, f.alone_s)), "yes" if f.same_codes else "no"]
                       for f in result.first_segment)) + [""]

    if cfg.perf_analyzer:
        out += ["## perf_analyzer (streaming, gRPC, model tts, scenario "
                f"{cfg.pa_scenario}, {cfg.pa_trials} windows x {cfg.pa_request_count} requests)", "",
                "perf_analyzer's own latency for a decoupled model is to the FIRST response (= time to first audio); "
                "the last-response column comes from its profile export. CSVs and logs: "
                f"`{stem}/cNN/`.", ""]
        if result.pa_error:
            out += [f"perf_analyzer did not run: {result.pa_error}", ""]
        rows = []
        for pa in result.pa:
            if pa.error:
                rows.append([f"pa c={pa.concurrency}", "failed", pa.error[:100], "", "", "", ""])
                continue
            row = pa.row
            rows.append([f"pa c={pa.concurrency}", _f(row.get("Inferences/Second"), 3),
                         " / ".join(_f(row.get(f"p{p} latency", math.nan) / 1e6) for p in (50, 90, 99)),
                         _f(pa.latency_s.p50 if pa.latency_s else math.nan),
                         _f(row.get("Server Queue", math.nan) / 1e3, 2),
                         _f(row.get("Server Compute Infer", math.nan) / 1e3, 2), pa.requests])
        out += _table(["level", "infer/s", "first response s p50/p90/p99", "last response s p50",
                       "server queue ms", "server compute ms", "requests (profile)"], rows) + [""]
        leaf_rows = [[f"pa c={pa.concurrency} {lf.model}", lf.requests, _f(lf.avg_us / 1e3, 2),
                      _f(lf.queue_us / 1e3, 2), _f(lf.compute_us / 1e3, 2)]
                     for pa in result.pa for lf in pa.leaves]
        if leaf_rows:
            out += ["Composing models (--bls-composing-models):", ""]
            out += _table(["level / model", "requests", "avg ms", "queue ms", "compute ms"], leaf_rows) + [""]

    out += ["## Soak: resident memory of tritonserver and its model processes", ""]
    if result.soak is not None:
        s, lv = result.soak, result.soak_level
        out += _table(["check", "requests", "warm-up", "RSS at end of warm-up MiB", "final MiB", "max MiB",
                       "drift", "limit", "status", "audio s per wall s"],
                      [["soak", s.samples, cfg.soak_warmup, _f(s.baseline_mb, 0), _f(s.final_mb, 0), _f(s.max_mb, 0),
                        f"{100 * s.drift:+.2f} %", f"{100 * s.limit:.0f} %", _status(s.ok),
                        _f(lv.audio_per_wall if lv else math.nan, 2)]])
        out += ["", f"![memory]({stem}-memory.png)", ""]

    out += ["## Floors next to the achieved figures", ""]
    fl = result.floors
    rows = []
    for precision, d in fl.get("decode", {}).items():
        achieved = [v for k, v in result.served_tokens.items()]
        ref_ms = statistics.median([1e3 * ratio(r.generate_s, r.tokens) for r in result.ref]) if result.ref else math.nan
        rows.append([f"decode floor {precision}", f"{d['weight_bytes'] / 1e6:.1f} MB streamed per step",
                     f"{_f(d['floor_ms'], 2)} ms/step",
                     (f"engine_ref eager {_f(ref_ms, 1)} ms/token; served (fp32, c=1, whole request incl. vocoder) "
                      f"{_f(statistics.median(achieved), 1) if achieved else 'n/a'} ms/token")
                     if precision == "fp32" else "served: see the variant table"])
    ref_voc = statistics.median([ratio(r.vocoder_s, r.audio_s) for r in result.ref]) if result.ref else math.nan
    rows.append(["vocoder", f"{_f(fl.get('vocoder_gflop_per_audio_s'), 1)} GFLOP per audio s",
                 f"RTF {_f(fl.get('vocoder_floor_rtf'))} at {_f(fl.get('gemm_gflop_s'), 1)} GFLOP/s (GEMM)",
                 f"engine_ref eager vocoder RTF {_f(ref_voc)}"])
    out += [f"Read bandwidth {_f(fl.get('bandwidth_gb_s'), 1)} GB/s and GEMM rate with {fl.get('threads')} "
            "thread(s), measured in this run.", ""]
    out += _table(["floor", "work", "floor", "achieved"], rows) + [""]

    if cfg.variants:
        out += ["## Weight-only decoder variants, single stream", ""]
        rows = []
        for var in result.variants:
            if var.error:
                rows.append([f"{var.precision} failed", var.error[:100], "", "", ""])
            for lv in var.levels:
                fp32 = _level(result.levels, lv.scenario, 1)
                rows.append([f"{var.precision} {lv.scenario} c=1", f"{_f(lv.ttfa_s.p50)} / {_f(lv.latency_s.p50)}",
                             _f(lv.rtf.p50), _x(ratio(lv.rtf.p50, _ref_median(result, lv.scenario, "rtf"))),
                             _x(ratio(lv.rtf.p50, fp32.rtf.p50 if fp32 else math.nan))])
        out += _table(["level", "TTFA / latency s p50", "RTF p50", "RTF / engine_ref fp32", "RTF / served fp32"],
                      rows) + [""]

    out += ["## Plots", "", f"![latency]({stem}-latency.png)", "", f"![throughput]({stem}-throughput.png)", ""]
    return "\n".join(out)


def _ms(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{1e3 * float(x):.{digits}f}"


def _ceiling_section(result) -> list[str]:
    cfg = result.config
    if not cfg.parts:
        return []
    out = ["## Throughput against the sum-of-parts ceiling", "",
           "Ceiling = the level's audio / (its requests' preprocess + prefill + latent pass + vocoder, one after "
           "another, + its generated tokens / b decode steps at batch b), every part timed alone (back to back, the "
           f"fastest of {cfg.parts_reps} calls) through ONNX Runtime on the same graphs, threads and spinning as the "
           "server, with no server running (perf/parts.py); the vocoder calls are the server's own (with chunked "
           "streaming: each chunk with its context frames, from the responses' INFO). b = "
           f"min(max_sequences {cfg.max_sequences}, c x min(segments, segments in flight)). The cond encoder is not "
           "counted (the voices are cached after warm-up).", ""]
    if result.parts_error:
        out += [f"The parts were not measured: {result.parts_error}", ""]
    rows = []
    for lv in result.levels:
        key = f"{lv.scenario}@{lv.concurrency}"
        ceil = result.ceilings.get(key)
        lv1 = _level(result.levels, lv.scenario, 1)
        rows.append([f"ceiling {lv.scenario} c={lv.concurrency}", _f(lv.audio_per_wall, 2),
                     _f(ceil.audio_per_wall if ceil else math.nan, 2),
                     _x(ratio(lv.audio_per_wall, ceil.audio_per_wall if ceil else math.nan)),
                     _x(ratio(lv.audio_per_wall, lv1.audio_per_wall if lv1 else math.nan)),
                     ceil.batch if ceil else "n/a", _f(ceil.serial_s if ceil else math.nan),
                     _f(ceil.decode_s if ceil else math.nan), _f(ceil.steps if ceil else math.nan, 0)])
    out += _table(["level", "measured audio s per wall s", "ceiling", "measured / ceiling", "vs c=1",
                   "decode batch b", "serial parts s", "decode s", "decode steps"], rows) + [""]
    rows = []
    for sc in cfg.scenarios:
        p = result.parts.get(sc.name)
        if p is None:
            rows.append([f"parts {sc.name}", "not measured", "", "", "", "", "", "", "", ""])
            continue
        flat = lambda d: [x for v in d.values() for x in v]  # noqa: E731
        rows.append([f"parts {sc.name}", _ms(statistics.median(p.preprocess_s.values()) if p.preprocess_s else None, 2),
                     _ms(statistics.median(flat(p.prefill_s)) if p.prefill_s else None, 2),
                     _ms(statistics.median(flat(p.latents_s)) if p.latents_s else None, 2),
                     ", ".join(f"b{b} {_ms(t, 2)}" for b, t in sorted(p.step_s.items())), p.step_past,
                     f"{_ms(p.vocoder_fixed_s, 2)} + {_f(p.vocoder_s_per_audio_s, 4)}",
                     _f(statistics.mean(len(w.vocoder_frames) for w in result.work.get(sc.name, [])), 1)
                     if result.work.get(sc.name) else "n/a", _frames_per_code(result.work.get(sc.name, [])),
                     _f(p.tokens_per_code, 2)])
    out += ["Parts of one request, alone (medians over requests and segments of each part's fastest call):", ""]
    out += _table(["scenario", "preprocess ms", "prefill ms / segment", "latent pass ms / segment",
                   "decode step ms at batch b", "KV length", "vocoder ms per call + s per audio s",
                   "vocoder calls per request", "vocoded frames per code", "tokens per code kept"], rows) + [""]
    return out


def _frames_per_code(works: Sequence) -> str:
    """Vocoder frames run per code kept: 1.00 when each segment is vocoded whole; above with chunked streaming
    (each chunk is vocoded with its context frames)."""
    frames = sum(sum(w.vocoder_frames) for w in works)
    codes = sum(w.codes for w in works)
    return _f(ratio(frames, codes), 2) if frames else "n/a"


def _batch_section(result, stem: str) -> list[str]:
    if not result.batch:
        return []
    out = ["## Decoder batch over time", "",
           "Sampled from the metrics endpoint (tts_decoder_batch_rows: rows of the last step; "
           "tts_decoder_active_sequences: live sequences). Rows count the samples after which a step ran; busy = "
           "share of sample intervals with at least one step; rows per step = generated tokens / steps over the "
           "whole level (exact).", ""]
    rows = [[f"batch {key.replace('@', ' c=')}", b.samples, f"{100 * b.busy_fraction:.0f} %" if math.isfinite(
        b.busy_fraction) else "n/a", f"{_f(b.rows_mean, 2)} / {_f(b.rows_max, 0)}",
             f"{_f(b.active_mean, 2)} / {_f(b.active_max, 0)}", _f(b.steps, 0), _f(b.rows_per_step, 2)]
            for key, b in result.batch.items()]
    out += _table(["level", "samples", "busy", "rows mean / max", "live sequences mean / max", "steps",
                   "rows per step"], rows)
    return out + ["", f"![decoder batch]({stem}-batch.png)", ""]


def _cancel_section(result) -> list[str]:
    cfg = result.config
    if cfg.cancel_victims <= 0:
        return []
    out = ["## Cancellation under load", "",
           f"{cfg.cancel_victims} streams of the long text in segments of at most {cfg.cancel_segment_tokens} text "
           f"tokens ({'sampled: temperature 1, top_k 0, top_p 1, seed 0' if cfg.cancel_sampling else 'greedy'}), "
           "one after another, each cancelled by the client at its first chunk while "
           f"{cfg.cancel_concurrency - 1} other streams ({cfg.cancel_load_scenario} requests, closed loop) keep the "
           "server busy. Latency from the client's cancel until tts_decoder_sequences_cancelled_total moves (the "
           "decoder freed a sequence of it) and until tts_requests_cancelled_total moves (the server closed the "
           "request), polled on the metrics endpoint. The decoder publishes its counters at the end of each scheduler "
           "iteration, so the freed time includes the rest of the step in which the sequence was dropped; \"no live "
           "sequence\": the decoder had already finished every sequence of the stream.", ""]
    if result.cancel_error:
        return out + [f"The cancellation level failed: {result.cancel_error}", ""]
    c = result.cancel
    if c is None:
        return out + ["Not measured.", ""]
    out += _table(["level", "cancelled", "not closed", "freed in decoder ms p50 / max", "closed ms p50 / max",
                   "no live sequence", "load requests (failed)", "poll resolution ms", "victim first chunk s p50"],
                  [[f"cancel c={c.concurrency}", c.victims, c.failed,
                    f"{_ms(c.to_decoder_s.p50, 0)} / {_ms(c.to_decoder_s.max, 0)}",
                    f"{_ms(c.to_closed_s.p50, 0)} / {_ms(c.to_closed_s.max, 0)}", c.without_live_sequence,
                    f"{c.load_requests} ({c.load_failed})", _ms(c.resolution_s, 1),
                    _f(c.first_chunk_s.p50 if c.first_chunk_s else math.nan)]])
    errors = sorted({r.error for r in result.cancel_records if r.error})
    return out + [""] + [f"- victim problem: {e}" for e in errors] + ([""] if errors else [])


# -------------------------------------------------------------------------------------------------------- plots


def _plots(result, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    scenarios = [sc.name for sc in result.config.scenarios]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in scenarios:
        lvs = sorted((lv for lv in result.levels if lv.scenario == name), key=lambda lv: lv.concurrency)
        if not lvs:
            continue
        cs = [lv.concurrency for lv in lvs]
        line, = ax.plot(cs, [lv.ttfa_s.p50 for lv in lvs], marker="o", label=f"{name} TTFA p50")
        ax.plot(cs, [lv.latency_s.p50 for lv in lvs], marker="s", linestyle="--", color=line.get_color(),
                label=f"{name} latency p50")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("seconds")
    ax.set_title(f"{result.config.preset}: latency vs concurrency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in scenarios:
        lvs = sorted((lv for lv in result.levels if lv.scenario == name), key=lambda lv: lv.concurrency)
        if not lvs:
            continue
        line, = ax.plot([lv.concurrency for lv in lvs], [lv.audio_per_wall for lv in lvs], marker="o",
                        label=f"{name} served")
        seq = _ref_sequential(result, name, 8)
        if math.isfinite(seq):
            ax.axhline(seq, linestyle=":", color=line.get_color(), label=f"{name} engine_ref sequential")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("audio seconds per wall second")
    ax.set_title(f"{result.config.preset}: throughput vs concurrency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if result.batch_series:
        paths.append(_batch_plot(plt, result, out_dir / f"{stem}-batch.png"))

    if result.soak_series:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([i for i, _ in result.soak_series], [mb for _, mb in result.soak_series], marker=".")
        ax.axvline(result.config.soak_warmup, linestyle=":", color="grey", label="end of warm-up")
        if result.soak is not None:
            ax.axhline(result.soak.baseline_mb * (1 + result.soak.limit), linestyle="--", color="red",
                       label=f"+{100 * result.soak.limit:.0f} % limit")
        ax.set_xlabel("requests completed")
        ax.set_ylabel("resident MiB")
        ax.set_title("soak: tritonserver + model processes")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / f"{stem}-memory.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _batch_plot(plt, result, path: Path) -> Path:
    """One panel per scenario: the rows of each decode step over the level's time (0 while no step ran), one line
    per concurrency, and the live sequences dotted."""
    scenarios = [sc.name for sc in result.config.scenarios
                 if any(k.split("@")[0] == sc.name for k in result.batch_series)]
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(8, 2.6 * len(scenarios)), squeeze=False)
    for ax, name in zip(axes[:, 0], scenarios):
        keys = sorted((k for k in result.batch_series if k.split("@")[0] == name), key=lambda k: int(k.split("@")[1]))
        for key in keys:
            series = result.batch_series[key]
            if not series:
                continue
            ts = [t for t, _, _ in series]
            # A sample describes the interval that ends at it: steps drawn "pre".
            line, = ax.step(ts, [r if r is not None else 0 for _, r, _ in series], where="pre", linewidth=1,
                            label=f"c={key.split('@')[1]} rows")
            ax.step(ts, [a for _, _, a in series], where="pre", linestyle=":", linewidth=1, color=line.get_color())
        ax.set_title(f"{name}: decode batch rows (solid) and live sequences (dotted)", fontsize=9)
        ax.set_xlabel("seconds since the level started")
        ax.set_ylabel("rows")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_INDEX_HEAD = ["# Benchmark results", "",
               "The latest serving benchmark of each preset; older reports stay beside this file, named "
               "bench-<preset>-<date>-<host>.md.", ""]


def _index_section(result, stem: str) -> list[str]:
    """One preset's part of the index: the report's targets and summary, and the command that made it."""
    cfg = result.config
    lines = [f"## {cfg.preset}", "",
             f"[{stem}]({stem}.md) ({result.machine.get('cpu')}, {result.machine.get('cores')} cores, "
             f"commit `{result.machine.get('commit')}`), made by:", "",
             "```bash", str(result.machine.get("command")), "```", ""]
    lines += _table(["target", "measured", "goal", "status"],
                    ([t.key, t.measured, t.goal, _status(t.met)] for t in targets(result)))
    lines += ["", "Concurrency 1 / 4 / 8 (our client; ceiling = sum of the parts alone, same run):", ""]
    rows = []
    for lv in result.levels:
        if lv.concurrency in (1, 4, 8):
            ceil = result.ceilings.get(f"{lv.scenario}@{lv.concurrency}")
            ceil_aw = ceil.audio_per_wall if ceil else math.nan
            rows.append([f"{lv.scenario} c={lv.concurrency}", f"{_f(lv.ttfa_s.p50)} / {_f(lv.ttfa_s.p99)}",
                         f"{_f(lv.latency_s.p50)} / {_f(lv.latency_s.p99)}", _f(lv.rtf.p50), _f(lv.audio_per_wall, 2),
                         _f(ceil_aw, 2), _x(ratio(lv.audio_per_wall, ceil_aw)),
                         _f(result.batch[f"{lv.scenario}@{lv.concurrency}"].rows_per_step, 2)
                         if f"{lv.scenario}@{lv.concurrency}" in result.batch else "n/a"])
    lines += _table(["level", "TTFA p50 / p99 s", "latency p50 / p99 s", "RTF p50", "audio s per wall s", "ceiling",
                     "measured / ceiling", "decoder rows per step"], rows)
    if result.cancel is not None:
        cs = result.cancel
        lines += ["", f"Cancellation at concurrency {cs.concurrency}: {cs.victims} streams cancelled at their first "
                  f"chunk; decoder sequence freed after p50 {_ms(cs.to_decoder_s.p50, 0)} ms (max "
                  f"{_ms(cs.to_decoder_s.max, 0)} ms), request closed after p50 {_ms(cs.to_closed_s.p50, 0)} ms (max "
                  f"{_ms(cs.to_closed_s.max, 0)} ms); {cs.load_failed} of {cs.load_requests} load requests failed."]
    return lines + [""]


def _index(result, out_dir: Path, stem: str) -> Path:
    """out_dir/README.md: this run's section replaces its preset's; other presets' sections are kept as they were."""
    path = out_dir / "README.md"
    sections: dict[str, str] = {}
    if path.is_file():
        for chunk in path.read_text().split("\n## ")[1:]:
            name = chunk.split("\n", 1)[0].strip()
            sections[name] = "## " + chunk.rstrip("\n") + "\n"
    sections[result.config.preset] = "\n".join(_index_section(result, stem))
    body = "".join(sections[k] + ("" if sections[k].endswith("\n\n") else "\n") for k in sorted(sections))
    path.write_text("\n".join(_INDEX_HEAD) + "\n" + body.rstrip("\n") + "\n")
    return path


def write_report(result, stem: str) -> Path:
    """<out>/<stem>.md, .json and PNGs; the index README.md points at it. Returns the markdown's path."""
    out_dir = Path(result.config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plots(result, out_dir, stem)
    md = out_dir / f"{stem}.md"
    md.write_text(render(result, stem))
    (out_dir / f"{stem}.json").write_text(json.dumps(to_plain(result), indent=1))
    _index(result, out_dir, stem)
    return md
