"""Side-by-side CPU benchmark of the exported graphs against engine_ref eager, with the memory-bandwidth floor.

    PYTHONPATH=. python -m perf.export_bench --preset v1.5 --out perf/results/

One run measures, on this machine and with the same thread count everywhere: the decode step (batch x past
length) for torch eager, ORT fp32 and the weight-only int8/int4 graphs; prefill (32 conds + text); BigVGAN per
second of audio (eager vs the ORT `vocoder` graph); and the decode floor = decoder weight bytes streamed per step /
measured read bandwidth. Engines are timed round-robin (one call each per round) so that load from other
processes spreads over all of them instead of biasing whichever ran during a busy spell; each figure is the median
of `--reps` rounds after `--warmup` rounds. It writes perf/results/export-bench-<date>-<host>.md (+ .json) and
prints the markdown. Graphs come from `--export-dir` when it already holds them, else they are exported there
(unverified: parity is the export's job; the table carries each graph's logits error against eager on the very
inputs it was timed on, and the quantized graphs' teacher-forced token agreement). It also drives free-running
greedy decoding through the ORT fp32 graphs and engine_ref on `--greedy-prompts` random prompts and counts the
prompts whose codes are identical (the export issue's check at real size).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from engine_ref.errors import InputError
from perf.machine import load_average, machine_info

DECODE_ENGINES = ("eager", "ort_fp32", "ort_int8", "ort_int4")
VARIANTS = ("int8", "int4")


# ---------------------------------------------------------------------------------------------- statistics helpers


def median(values: Sequence[float]) -> float:
    if len(values) == 0:
        raise ValueError("median of no measurements")
    return float(statistics.median(values))


def ratio(num: float, den: float) -> float:
    """num / den, NaN when undefined (a missing or zero measurement must not read as a speed-up)."""
    if den == 0 or not np.isfinite(den) or not np.isfinite(num):
        return float("nan")
    return num / den


def decode_floor_ms(weight_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """The fastest a memory-bound decode step can be: every streamed weight byte read once at full bandwidth."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError("bandwidth must be positive")
    return 1e3 * weight_bytes / bandwidth_bytes_per_s


def tensor_bytes(tensor) -> int:
    """Bytes of an ONNX initializer from its dims and type (works without loading external data)."""
    import onnx

    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def streamed_weight_bytes(onnx_path: Path) -> int:
    """Initializer bytes a decode step reads: all weights except tables only indexed by Gather (embeddings)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    other_uses = {i for n in graph.node if n.op_type != "Gather" for i in n.input}
    tables = gathered - other_uses
    return sum(tensor_bytes(t) for t in graph.initializer if t.name not in tables)


def round_robin(fns: Mapping[str, Callable[[], object]], reps: int, warmup: int,
                gap_s: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each fn, interleaved: round r calls every fn once.

    `gap_s` idles between calls: thread pools (OpenMP in torch, ONNX Runtime's) spin-wait for a while after a
    parallel region, and without a gap that spinning would steal cores from the next engine's call.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def read_bandwidth(threads: int, mib: int = 512, reps: int = 5) -> dict[str, float]:
    """Bytes/s of streaming reads of a [mib MiB] fp32 matrix with `threads` threads, by three kernels.

    ort_gemv: ONNX Runtime MatMul [1, K] x [K, N] (the kernel a batch-1 decode step runs on every weight);
    torch_gemv: torch.mv; torch_sum: torch.sum. Median of `reps` after one warm-up each. The floor uses the fastest:
    the most demanding bound this machine demonstrably reaches.
    """
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cols = 4096
        rows = max(1, mib * (1 << 20) // (4 * cols))
        w = np.full((rows, cols), 0.5, np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], [numpy_helper.from_array(w, "w")],
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
                                    .SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feed = {"x": np.ones((1, rows), np.float32)}
        tw, tx = torch.from_numpy(w), torch.ones(cols)
        t = round_robin({"ort_gemv": lambda: sess.run(None, feed), "torch_gemv": lambda: torch.mv(tw, tx),
                         "torch_sum": lambda: tw.sum()}, reps, 1, 0.05)
        return {k: w.nbytes / median(v) for k, v in t.items()}
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "v1.5"
    out: Path = Path("perf/results")
    model_dir: Path | None = None  # default build/models/<preset>
    export_dir: Path | None = None  # default build/exports/<preset>-bench
    threads: int = 2
    reps: int = 5
    warmup: int = 2
    batches: tuple[int, ...] = (1, 4, 8)
    pasts: tuple[int, ...] = (64, 256)
    prefill_batches: tuple[int, ...] = (1, 4)
    prefill_text: int = 60
    vocoder_seconds: float = 2.0
    agreement_prompts: int = 10
    agreement_steps: int = 50
    greedy_prompts: int = 10
    greedy_tokens: int = 60
    bandwidth_mib: int = 512
    gap_s: float = 0.05  # idle time between timed calls (see round_robin)
    seed: int = 0

    def resolved_model_dir(self) -> Path:
        return self.model_dir or Path("build/models") / self.preset

    def resolved_export_dir(self) -> Path:
        return self.export_dir or Path("build/exports") / f"{self.preset}-bench"


@dataclass
class Results:
    machine: dict
    decode: dict[str, dict[str, float]] = field(default_factory=dict)  # "b1 p64" -> engine -> ms (+ errors)
    prefill: dict[str, dict[str, float]] = field(default_factory=dict)
    vocoder: dict[str, float] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, dict] = field(default_factory=dict)
    greedy: dict = field(default_factory=dict)  # export/gpt.py greedy_parity: prompts, exact, token_agreement
    notes: list[str] = field(default_factory=list)


def decode_key(batch: int, past: int) -> str:
    return f"b{batch} p{past}"


def prefill_key(batch: int, cfg: BenchConfig) -> str:
    return f"b{batch} 32+{cfg.prefill_text}"


def expected_rows(cfg: BenchConfig) -> list[str]:
    """The row labels every report carries (the smoke test checks them)."""
    rows = [f"| decode {decode_key(b, p)} |" for p in cfg.pasts for b in cfg.batches]
    rows += [f"| prefill {prefill_key(b, cfg)} |" for b in cfg.prefill_batches]
    rows += ["| vocoder |", "| floor |", "| agreement int8 |", "| agreement int4 |", "| greedy fp32 |"]
    return rows


# ---------------------------------------------------------------------------------------------------------- measuring


def ensure_model(cfg: BenchConfig) -> Path:
    model_dir = cfg.resolved_model_dir()
    if not (model_dir / "config.yaml").is_file():
        from engine_ref.indextts.presets import write_preset

        print(f"writing preset {cfg.preset} to {model_dir} (once)", file=sys.stderr)
        write_preset(cfg.preset, model_dir)
    return model_dir


def ensure_export(model_dir: Path, cfg: BenchConfig, notes: list[str]):
    """The gpt (fp32 + int8/int4) and vocoder graphs: reused when the export dir has them from the current export
    code (an older version's graphs would time what we no longer ship), else exported there."""
    from export.common import ExportOptions
    from export.manifest import EXPORT_CODE_VERSION, read_manifest
    from export.pipeline import ExportRequest, run_export

    export_dir = cfg.resolved_export_dir()
    need = ["gpt_prefill", "gpt_decode", *(f"gpt_decode@{v}" for v in VARIANTS)]
    try:
        manifest = read_manifest(export_dir)
        if manifest.export_code_version == EXPORT_CODE_VERSION and all(k in manifest.components for k in need):
            notes.append(f"graphs reused from {export_dir} (export code version {EXPORT_CODE_VERSION})")
            return export_dir, manifest
    except Exception:  # absent or unreadable: export below
        pass
    components = ("gpt", "vocoder")
    try:
        import export.vocoder  # noqa: F401
    except ImportError:
        components = ("gpt",)
    t0 = time.perf_counter()
    manifest, _ = run_export(ExportRequest(
        str(model_dir), export_dir, components=components, precisions=("fp32", *VARIANTS),
        options=ExportOptions(verify=False), force=True,
    ))
    notes.append(f"graphs exported (unverified) to {export_dir} in {time.perf_counter() - t0:.0f} s")
    return export_dir, manifest


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def bench_decode(model, decoders: dict, cfg: BenchConfig) -> dict[str, dict[str, float]]:
    """Decode step T = 1 at each batch x past: eager (model.gpt.decode with a KV cache) vs each ORT graph."""
    import torch

    from export.runtime import KVState

    uv = model.gpt
    g = uv.cfg
    hd = g.model_dim // g.heads
    rng = np.random.default_rng(cfg.seed)
    out = {}
    for past in cfg.pasts:
        for batch in cfg.batches:
            kv = [(rng.standard_normal((batch, g.heads, past, hd)).astype(np.float32) * 0.5,
                   rng.standard_normal((batch, g.heads, past, hd)).astype(np.float32) * 0.5) for _ in range(g.layers)]
            tok = rng.integers(0, 8192, (batch, 1))
            pos = np.full((batch, 1), 2 + past // 2, np.int64)
            state = KVState(kv, np.ones((batch, past), bool))
            t_past = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in kv]
            t_tok, t_pos = torch.from_numpy(tok), torch.from_numpy(pos)
            t_mask = torch.ones(batch, past + 1, dtype=torch.bool)
            results: dict[str, np.ndarray] = {}

            def eager():
                with torch.inference_mode():
                    h, _ = uv.decode(uv.mel_embeds(t_tok, t_pos), t_mask, t_past)
                    results["eager"] = uv.mel_logits(h[:, -1]).numpy()

            fns: dict[str, Callable] = {"eager": eager}
            for name, dec in decoders.items():
                fns[name] = (lambda d=dec, n=name: results.__setitem__(n, d.decode(tok, pos, state)[0]))
            times = round_robin(fns, cfg.reps, cfg.warmup, cfg.gap_s)
            row = {name: 1e3 * median(t) for name, t in times.items()}
            row.update({f"{name}_best": 1e3 * min(t) for name, t in times.items()})
            for name in decoders:
                row[f"{name}_logits_rel"] = rel_error(results[name], results["eager"])
            out[decode_key(batch, past)] = row
            print(f"decode {decode_key(batch, past)}: " + ", ".join(f"{k} {row[k]:.1f} ms" for k in times),
                  file=sys.stderr)
    return out


def bench_prefill(model, decoder, cfg: BenchConfig) -> dict[str, dict[str, float]]:
    import torch

    from engine_ref.generate import build_prefix

    uv = model.gpt
    g = uv.cfg
    rng = np.random.default_rng(cfg.seed + 1)
    out = {}
    for batch in cfg.prefill_batches:
        conds = rng.standard_normal((batch, g.condition_num_latent, g.model_dim)).astype(np.float32)
        texts = [[int(x) for x in rng.integers(2, g.text_vocab, cfg.prefill_text - 2)] for _ in range(batch)]
        t_conds = torch.from_numpy(conds)
        results = {}

        def eager():
            with torch.inference_mode():
                embeds, valid = build_prefix(uv, t_conds, texts)
                h, _ = uv.decode(embeds, valid)
                results["eager"] = uv.mel_logits(h[:, -1]).numpy()

        def ort():
            results["ort_fp32"] = decoder.prefill(conds, texts)[0]

        times = round_robin({"eager": eager, "ort_fp32": ort}, cfg.reps, cfg.warmup, cfg.gap_s)
        row = {k: 1e3 * median(v) for k, v in times.items()}
        row.update({f"{k}_best": 1e3 * min(v) for k, v in times.items()})
        row["ort_fp32_logits_rel"] = rel_error(results["ort_fp32"], results["eager"])
        out[prefill_key(batch, cfg)] = row
        print(f"prefill {prefill_key(batch, cfg)}: eager {row['eager']:.1f} ms, ort {row['ort_fp32']:.1f} ms",
              file=sys.stderr)
    return out


def bench_vocoder(model, export_dir: Path, manifest, cfg: BenchConfig, notes: list[str]) -> dict[str, float]:
    """Seconds of compute per second of audio, batch 1."""
    import torch

    from export.common import session

    bcfg = model.config.bigvgan
    frames = max(1, round(cfg.vocoder_seconds * model.config.sampling_rate / bcfg.hop_length))
    audio_s = frames * bcfg.hop_length / model.config.sampling_rate
    rng = np.random.default_rng(cfg.seed + 2)
    latents = rng.standard_normal((1, frames, bcfg.gpt_dim)).astype(np.float32)
    spk = rng.standard_normal((1, bcfg.speaker_embedding_dim, 1)).astype(np.float32)
    results = {}

    def eager():
        with torch.inference_mode():
            results["eager"] = model.bigvgan.decode(torch.from_numpy(latents), torch.from_numpy(spk)).numpy()

    fns: dict[str, Callable] = {"eager": eager}
    comp = manifest.components.get("vocoder")
    if comp is not None:
        sess = session(export_dir / comp.file, cfg.threads)
        feeds = {"latents": latents, "speaker_embedding": spk}
        fns["ort_fp32"] = lambda: results.__setitem__("ort_fp32", sess.run(None, feeds)[0])
    else:
        notes.append("vocoder: no ORT `vocoder` graph in the export; eager only")
    times = round_robin(fns, cfg.reps, cfg.warmup, cfg.gap_s)
    row = {f"{k}_s_per_audio_s": median(v) / audio_s for k, v in times.items()}
    row.update({f"{k}_s_per_audio_s_best": min(v) / audio_s for k, v in times.items()})
    row["audio_s"] = audio_s
    if "ort_fp32" in results:
        row["ort_fp32_wave_rel"] = rel_error(results["ort_fp32"].reshape(-1), results["eager"].reshape(-1))
    print(f"vocoder: {row}", file=sys.stderr)
    return row


def run(cfg: BenchConfig, argv: Sequence[str] = ()) -> tuple[Results, Path]:
    import torch

    from engine_ref.indextts.loader import load_model
    from export.gpt import greedy_parity
    from export.precision import AgreementConfig, token_agreement
    from export.runtime import OrtDecoder

    if cfg.reps < 1 or cfg.warmup < 0 or cfg.threads < 1 or cfg.greedy_prompts < 1 or cfg.greedy_tokens < 1:
        raise InputError("--reps, --threads, --greedy-prompts and --greedy-tokens must be >= 1, --warmup >= 0",
                         "fix the command line")
    command = "PYTHONPATH=. python -m perf.export_bench " + " ".join(shlex.quote(a) for a in argv)
    res = Results(machine=machine_info(cfg.threads, command.strip()))
    torch.set_num_threads(cfg.threads)
    model_dir = ensure_model(cfg)
    export_dir, manifest = ensure_export(model_dir, cfg, res.notes)
    model = load_model(model_dir, verify=False)
    prefill = manifest.component("gpt_prefill")
    decoders = {"ort_fp32": OrtDecoder(export_dir, prefill, manifest.component("gpt_decode"), threads=cfg.threads)}
    for v in VARIANTS:
        decoders[f"ort_{v}"] = OrtDecoder(export_dir, prefill, manifest.component("gpt_decode", v),
                                          threads=cfg.threads)

    bw = read_bandwidth(cfg.threads, cfg.bandwidth_mib, max(cfg.reps, 3))
    res.decode = bench_decode(model, decoders, cfg)
    bw_after = read_bandwidth(cfg.threads, cfg.bandwidth_mib, max(cfg.reps, 3))
    best_bw = max(*bw.values(), *bw_after.values())
    for name, key in (("fp32", "gpt_decode"), *((v, f"gpt_decode@{v}") for v in VARIANTS)):
        comp = manifest.components[key]
        res.floor[f"{name}_bytes"] = streamed_weight_bytes(export_dir / comp.file)
        res.floor[f"{name}_floor_ms"] = decode_floor_ms(res.floor[f"{name}_bytes"], best_bw)
    res.floor.update({f"bw_{k}_gbps": v / 1e9 for k, v in bw.items()})
    res.floor.update({f"bw_{k}_after_gbps": v / 1e9 for k, v in bw_after.items()})
    res.floor["bw_used_gbps"] = best_bw / 1e9
    res.prefill = bench_prefill(model, decoders["ort_fp32"], cfg)
    res.vocoder = bench_vocoder(model, export_dir, manifest, cfg, res.notes)
    acfg = AgreementConfig(prompts=cfg.agreement_prompts, steps=cfg.agreement_steps)
    for v in VARIANTS:
        res.agreement[v] = token_agreement(decoders["ort_fp32"], decoders[f"ort_{v}"], model, acfg,
                                           seed=cfg.seed).as_dict()
    t0 = time.perf_counter()
    res.greedy = greedy_parity(model, export_dir, prompts=cfg.greedy_prompts, max_mel_tokens=cfg.greedy_tokens,
                               seed=cfg.seed, decoder=decoders["ort_fp32"])
    res.greedy["seconds"] = time.perf_counter() - t0
    res.machine["load_avg_at_end"] = load_average()
    return res, write_report(res, cfg)


# ---------------------------------------------------------------------------------------------------------- reporting


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def targets(res: Results, cfg: BenchConfig, best: bool = False) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the issue's targets, from medians or (best=True) from the fastest rounds."""
    sfx = "_best" if best else ""
    nan = float("nan")
    out = []
    b_lo, b_hi = min(cfg.batches), max(cfg.batches)
    for p in cfg.pasts:
        row = res.decode[decode_key(b_lo, p)]
        t = {k: row.get(k + sfx, nan) for k in DECODE_ENGINES}
        speed = ratio(t["eager"], t["ort_fp32"])
        out.append((f"ORT fp32 decode b{b_lo} p{p} >= 1.8x faster than eager", f"{fmt(speed, 2)}x", speed >= 1.8))
        floor = ratio(t["ort_fp32"], res.floor["fp32_floor_ms"])
        out.append((f"ORT fp32 decode b{b_lo} p{p} <= 1.3x the floor", f"{fmt(floor, 2)}x floor", floor <= 1.3))
        scale = ratio(res.decode[decode_key(b_hi, p)].get("ort_fp32" + sfx, nan), t["ort_fp32"])
        out.append((f"ORT fp32 batch {b_hi} step <= 2.2x batch {b_lo} step (p{p})", f"{fmt(scale, 2)}x", scale <= 2.2))
        fastest = min(VARIANTS, key=lambda v: row[f"ort_{v}"])
        rel = ratio(t[f"ort_{fastest}"], res.floor["fp32_floor_ms"])
        out.append((f"weight-only decoder b{b_lo} p{p} <= 0.4x the fp32 floor", f"{fastest}: {fmt(rel, 2)}x",
                    rel <= 0.4))
    for v in VARIANTS:
        a = res.agreement[v]["token_agreement"]
        out.append((f"{v} token agreement vs fp32 >= 99% ({cfg.agreement_prompts}x{cfg.agreement_steps} "
                    f"teacher-forced)", f"{100 * a:.1f}%", a >= 0.99))
    g = res.greedy
    out.append((f"greedy codes through ORT fp32 == engine_ref ({g['prompts']} prompts x <= {cfg.greedy_tokens} "
                "tokens)", f"{g['exact']}/{g['prompts']} identical", g["exact"] == g["prompts"]))
    if "ort_fp32_s_per_audio_s" in res.vocoder:
        r = ratio(res.vocoder.get("ort_fp32_s_per_audio_s" + sfx, nan),
                  res.vocoder.get("eager_s_per_audio_s" + sfx, nan))
        out.append(("BigVGAN through ORT no slower than eager", f"ORT/eager {fmt(r, 2)}", r <= 1.0))
    return out


def render(res: Results, cfg: BenchConfig) -> str:
    m = res.machine
    fl = res.floor
    lines = [
        f"# Export benchmark: {cfg.preset} on {m['host']}, {m['date']}",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores; threads used: {m['threads']} (torch and ONNX Runtime); "
        f"load average (1/5/15 min) at start: {m['load_avg_at_start']}, at end: {m.get('load_avg_at_end', 'n/a')} "
        "(above the thread count means other processes competed for the cores)",
        f"- software: Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}; commit {m['commit']}",
        f"- command: `{m['command']}`",
        f"- method: medians of {cfg.reps} round-robin rounds after {cfg.warmup} warm-up rounds, "
        f"{1e3 * cfg.gap_s:.0f} ms idle before each call; times in ms unless stated; "
        "`rel` = max|ORT - eager| / max|eager| of the logits on the timed inputs",
        *(f"- note: {n}" for n in res.notes),
        "",
        "## Decode step (T = 1)",
        "",
        "| case | eager | ORT fp32 | ORT int8 | ORT int4 | eager/ORT fp32 | int8/fp32 | int4/fp32 | fp32/floor "
        "| fp32 rel | int8 rel | int4 rel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in cfg.pasts:
        for b in cfg.batches:
            r = res.decode[decode_key(b, p)]
            lines.append(
                f"| decode {decode_key(b, p)} | {fmt(r['eager'])} | {fmt(r['ort_fp32'])} | {fmt(r['ort_int8'])} | "
                f"{fmt(r['ort_int4'])} | {fmt(ratio(r['eager'], r['ort_fp32']), 2)} | "
                f"{fmt(ratio(r['ort_int8'], r['ort_fp32']), 2)} | {fmt(ratio(r['ort_int4'], r['ort_fp32']), 2)} | "
                f"{fmt(ratio(r['ort_fp32'], fl['fp32_floor_ms']), 2)} | {r['ort_fp32_logits_rel']:.1e} | "
                f"{r['ort_int8_logits_rel']:.1e} | {r['ort_int4_logits_rel']:.1e} |"
            )
    lines += ["", f"Best of {cfg.reps} rounds (ms):", "", "| case | eager | ORT fp32 | ORT int8 | ORT int4 |",
              "|---|---|---|---|---|"]
    for p in cfg.pasts:
        for b in cfg.batches:
            r = res.decode[decode_key(b, p)]
            lines.append(f"| best {decode_key(b, p)} | "
                         + " | ".join(fmt(r.get(e + "_best", float("nan"))) for e in DECODE_ENGINES) + " |")
    lines += ["", "Batch scaling (step at batch b / step at batch 1, medians):", "",
              "| past | engine | " + " | ".join(f"b{b}/b1" for b in cfg.batches if b != 1) + " |",
              "|---|---|" + "---|" * sum(1 for b in cfg.batches if b != 1)]
    if 1 in cfg.batches:
        for p in cfg.pasts:
            for eng in DECODE_ENGINES:
                base = res.decode[decode_key(1, p)][eng]
                cells = [fmt(ratio(res.decode[decode_key(b, p)][eng], base), 2) for b in cfg.batches if b != 1]
                lines.append(f"| p{p} | {eng} | " + " | ".join(cells) + " |")
    lines += [
        "", "## Prefill (32 conds + text tokens, logits of the start position)", "",
        "| case | eager | ORT fp32 | eager/ORT | rel |", "|---|---|---|---|---|",
    ]
    for b in cfg.prefill_batches:
        r = res.prefill[prefill_key(b, cfg)]
        lines.append(f"| prefill {prefill_key(b, cfg)} | {fmt(r['eager'])} | {fmt(r['ort_fp32'])} | "
                     f"{fmt(ratio(r['eager'], r['ort_fp32']), 2)} | {r['ort_fp32_logits_rel']:.1e} |")
    v = res.vocoder
    ort_v = v.get("ort_fp32_s_per_audio_s", float("nan"))
    lines += [
        "", f"## BigVGAN (batch 1, {v['audio_s']:.2f} s of audio; seconds of compute per second of audio)", "",
        "| case | eager | ORT fp32 | ORT/eager | waveform rel |", "|---|---|---|---|---|",
        f"| vocoder | {fmt(v['eager_s_per_audio_s'], 3)} | {fmt(ort_v, 3)} | "
        f"{fmt(ratio(ort_v, v['eager_s_per_audio_s']), 2)} | {v.get('ort_fp32_wave_rel', float('nan')):.1e} |",
        "", "## Decode floor (weight bytes streamed per step / read bandwidth)", "",
        f"Bandwidth: streaming reads of a {cfg.bandwidth_mib} MiB fp32 matrix with {m['threads']} threads by "
        "ORT MatMul [1,K]x[K,N] (GEMV, the decode step's kernel), torch.mv and torch.sum, before and after the "
        "decode runs; GB/s: "
        + ", ".join(f"{k[3:-5].replace('_after', ' (after)')} {fmt(v)}" for k, v in fl.items()
                    if k.startswith("bw_") and k != "bw_used_gbps")
        + f". The floor uses the best: {fmt(fl['bw_used_gbps'])} GB/s. Streamed bytes = all initializers except "
        "embedding tables read by Gather (a step reads one row of those).", "",
        "| case | fp32 | int8 | int4 |", "|---|---|---|---|",
        f"| floor | {fl['fp32_bytes'] / 1e6:.0f} MB -> {fmt(fl['fp32_floor_ms'])} ms | "
        f"{fl['int8_bytes'] / 1e6:.0f} MB -> {fmt(fl['int8_floor_ms'])} ms | "
        f"{fl['int4_bytes'] / 1e6:.0f} MB -> {fmt(fl['int4_floor_ms'])} ms |",
        "", f"## Greedy token agreement with ORT fp32 ({cfg.agreement_prompts} prompts x {cfg.agreement_steps} "
            "teacher-forced steps)", "",
        "| case | agreement | mismatches | max fp32 margin at a mismatch (logits) |", "|---|---|---|---|",
    ]
    for name in VARIANTS:
        a = res.agreement[name]
        lines.append(f"| agreement {name} | {100 * a['token_agreement']:.1f}% | {a['mismatches']}/{a['compared']} | "
                     f"{a['max_fp32_margin_at_mismatch']:.3f} |")
    g = res.greedy
    lines += ["", f"## Greedy codes, free-running: ORT fp32 graphs vs engine_ref ({g['prompts']} random prompts, "
                  f"up to {cfg.greedy_tokens} tokens each)", "",
              "| case | prompts with identical codes (and stop) | token agreement |", "|---|---|---|",
              f"| greedy fp32 | {g['exact']}/{g['prompts']} | {100 * g['token_agreement']:.1f}% |"]
    lines += ["", "## Targets", "",
              f"Judged on medians; the best-of-{cfg.reps} columns use each engine's fastest round, which is what a "
              "quiet machine gives when other processes compete for the cores (see the load average above).", "",
              f"| target | measured (median) | met | best-of-{cfg.reps} | met (best-of) |", "|---|---|---|---|---|"]
    for (t, m_, ok), (_, mb, okb) in zip(targets(res, cfg), targets(res, cfg, best=True)):
        lines.append(f"| {t} | {m_} | {'met' if ok else 'NOT met'} | {mb} | {'met' if okb else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def write_report(res: Results, cfg: BenchConfig) -> Path:
    from perf.report import report_stem, write_text_report

    path = cfg.out / f"{report_stem('', res.machine, kind='export-bench')}.md"
    return write_text_report(path, render(res, cfg), {"config": asdict(cfg), **asdict(res)})


def _ints(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m perf.export_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="v1.5", help="model preset (random weights): tiny, v1.5, v1.0")
    p.add_argument("--out", default="perf/results", help="directory for the report")
    p.add_argument("--model-dir", default=None, help="model directory (default build/models/<preset>; written once)")
    p.add_argument("--export-dir", default=None, help="export directory (default build/exports/<preset>-bench)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=_ints, default=(1, 4, 8))
    p.add_argument("--pasts", type=_ints, default=(64, 256))
    p.add_argument("--prefill-batches", type=_ints, default=(1, 4))
    p.add_argument("--prefill-text", type=int, default=60, help="text tokens incl. start/stop")
    p.add_argument("--vocoder-seconds", type=float, default=2.0)
    p.add_argument("--agreement-prompts", type=int, default=10)
    p.add_argument("--agreement-steps", type=int, default=50)
    p.add_argument("--greedy-prompts", type=int, default=10, help="free-running greedy ORT vs eager prompts")
    p.add_argument("--greedy-tokens", type=int, default=60, help="max mel tokens per greedy prompt")
    p.add_argument("--bandwidth-mib", type=int, default=512)
    p.add_argument("--gap-ms", type=float, default=50.0, help="idle time between timed calls")
    a = p.parse_args(argv)
    return BenchConfig(
        preset=a.preset, out=Path(a.out), model_dir=Path(a.model_dir) if a.model_dir else None,
        export_dir=Path(a.export_dir) if a.export_dir else None, threads=a.threads, reps=a.reps, warmup=a.warmup,
        batches=a.batches, pasts=a.pasts, prefill_batches=a.prefill_batches, prefill_text=a.prefill_text,
        vocoder_seconds=a.vocoder_seconds, agreement_prompts=a.agreement_prompts,
        agreement_steps=a.agreement_steps, greedy_prompts=a.greedy_prompts, greedy_tokens=a.greedy_tokens,
        bandwidth_mib=a.bandwidth_mib, gap_s=a.gap_ms / 1e3,
    )


def run_main(parse: Callable, run_fn: Callable, argv: Sequence[str] | None = None) -> int:
    """The benches' shared entry point: parse, run, print the report's path; a TTSError is one line and exit 2."""
    from engine_ref.errors import TTSError

    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        _, path = run_fn(parse(argv), argv)
    except TTSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
