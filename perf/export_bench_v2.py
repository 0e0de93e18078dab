"""Per-stage CPU benchmark of the IndexTTS2 exported graphs against engine_ref v2 eager, with their floors.

    PYTHONPATH=. python -m perf.export_bench_v2 --preset v2 --out perf/results/

One run measures, with the same thread count for torch and ONNX Runtime, each stage eager vs its ORT graph:
- reference side (10 s of reference by default): semantic features (w2v-BERT layer 17 + stats), codec quantize,
  CAMPPlus, the speaker and the emotion conditioner;
- the GPT decode step (T = 1) at batch 1 and 4 vs the bandwidth floor (decoder weight bytes streamed per step /
  measured read bandwidth, as perf/export_bench.py), and the teacher-forced latent pass of `--latent-codes` codes;
- one CFM estimator call at 2 and 8 rows (1 and 4 requests, CFG pairs) vs its FLOP floor (FLOPs counted on the eager
  call by torch's FlopCounterMode / the machine's measured fp32 GEMM rate);
- BigVGAN v2, seconds of compute per second of audio.
Engines are timed round-robin (perf/export_bench.round_robin), medians of `--reps` after `--warmup`. The report
(perf/results/export-bench-v2-<date>-<host>.md + .json) also carries each graph's output error vs eager on the
very inputs timed. Graphs come from `--export-dir` when it holds a current export, else they are exported there
unverified (parity is the export's job). `--preset tiny-v2` checks the script in seconds; real figures need `v2`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engine_ref.errors import InputError
from perf.export_bench import (_ints, decode_floor_ms, fmt, median, ratio, read_bandwidth, rel_error, round_robin, run_main,
                               streamed_weight_bytes)
from perf.machine import load_average, machine_info

NEEDED = ("semantic_encoder", "semantic_codec", "campplus", "speaker_conditioner", "emotion_conditioner",
          "gpt_prefill", "gpt_decode", "cfm_estimator", "vocoder")


@dataclass(frozen=True)
class BenchConfigV2:
    preset: str = "v2"
    out: Path = Path("perf/results")
    model_dir: Path | None = None  # default build/models/<preset>
    export_dir: Path | None = None  # default build/exports/<preset>-bench
    threads: int = 2
    reps: int = 5
    warmup: int = 2
    reference_seconds: float = 10.0
    decode_batches: tuple[int, ...] = (1, 4)
    decode_past: int = 256
    latent_codes: int = 250  # 5 s of speech
    cfm_rows: tuple[int, ...] = (2, 8)
    cfm_frames: int = 860  # a 5 s prompt + 5 s generated (86.13 frames/s)
    vocoder_seconds: float = 2.0
    bandwidth_mib: int = 512
    gap_s: float = 0.05
    seed: int = 0

    def resolved_model_dir(self) -> Path:
        return self.model_dir or Path("build/models") / self.preset

    def resolved_export_dir(self) -> Path:
        return self.export_dir or Path("build/exports") / f"{self.preset}-bench"


@dataclass
class ResultsV2:
    machine: dict
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> eager/ort ms, best, rel, extras
    floor: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def stage_labels(cfg: BenchConfigV2) -> list[str]:
    """Every row a report carries (the smoke check reads them)."""
    return ["features", "codec", "campplus", "speaker_conditioner", "emotion_conditioner",
            *(f"gpt step b{b}" for b in cfg.decode_batches), "latent pass",
            *(f"cfm step rows {r}" for r in cfg.cfm_rows), "vocoder"]


# ---------------------------------------------------------------------------------------------------------- setup


def ensure_model(cfg: BenchConfigV2) -> Path:
    model_dir = cfg.resolved_model_dir()
    if not (model_dir / "config.yaml").is_file():
        from engine_ref.indextts2.presets import write_v2_preset

        print(f"writing preset {cfg.preset} to {model_dir} (once)", file=sys.stderr)
        write_v2_preset(cfg.preset, model_dir, layout="flat")
    return model_dir


def ensure_export(model_dir: Path, cfg: BenchConfigV2, notes: list[str]):
    from export.common import ExportOptions
    from export.manifest import EXPORT_CODE_VERSION, read_manifest
    from export.pipeline import ExportRequest, run_export

    export_dir = cfg.resolved_export_dir()
    try:
        manifest = read_manifest(export_dir)
        if (manifest.export_code_version == EXPORT_CODE_VERSION and manifest.model.get("family") == "indextts2"
                and all(k in manifest.components for k in NEEDED)):
            notes.append(f"graphs reused from {export_dir} (export code version {EXPORT_CODE_VERSION})")
            return export_dir, manifest
    except Exception:  # absent or unreadable: export below
        pass
    t0 = time.perf_counter()
    manifest, _ = run_export(ExportRequest(str(model_dir), export_dir, options=ExportOptions(verify=False),
                                           force=True))
    notes.append(f"graphs exported (unverified) to {export_dir} in {time.perf_counter() - t0:.0f} s")
    return export_dir, manifest


def time_pair(label: str, eager: Callable[[], np.ndarray], ort: Callable[[], np.ndarray], cfg: BenchConfigV2,
              per: float | None = None) -> dict[str, float]:
    """Median/best ms of eager vs ORT (round-robin) and the ORT output's error vs eager on the same inputs.

    per: if given, also seconds of compute per unit (e.g. per audio second)."""
    outs: dict[str, np.ndarray] = {}
    times = round_robin({"eager": lambda: outs.__setitem__("eager", eager()),
                         "ort": lambda: outs.__setitem__("ort", ort())}, cfg.reps, cfg.warmup, cfg.gap_s)
    row = {k: 1e3 * median(v) for k, v in times.items()}
    row.update({f"{k}_best": 1e3 * min(v) for k, v in times.items()})
    row["rel"] = rel_error(outs["ort"], outs["eager"])
    if per:
        row.update({f"{k}_s_per_unit": median(v) / per for k, v in times.items()})
    print(f"{label}: eager {row['eager']:.1f} ms, ORT {row['ort']:.1f} ms (rel {row['rel']:.1e})", file=sys.stderr)
    return row


def gemm_flops(threads: int, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of an fp32 [n, n] x [n, n] ORT MatMul with `threads` threads (the machine's dense-compute ceiling)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((n, n), 0.5, np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
                              [numpy_helper.from_array(w, "w")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
                                .SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((n, n), np.float32)}
    t = round_robin({"gemm": lambda: sess.run(None, feed)}, reps, 1)["gemm"]
    return 2.0 * n ** 3 / min(t)


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------------ the stages


def bench_reference(model, tts, cfg: BenchConfigV2, res: ResultsV2) -> None:
    """Features, codec, CAMPPlus, conditioners on `reference_seconds` of input (random, realistic scales)."""
    import torch

    from engine_ref.indextts2.campplus import campplus_style

    rng = np.random.default_rng(cfg.seed)
    frames = max(4, int(cfg.reference_seconds * 50))
    feats_in = rng.standard_normal((1, frames, 160)).astype(np.float32)
    mask = np.ones((1, frames), np.int64)
    t_in, t_mask = torch.from_numpy(feats_in), torch.from_numpy(mask)
    enc = model.semantic.encoder

    def eager_features():
        with torch.inference_mode():
            return enc(t_in, t_mask).numpy()

    res.stages["features"] = time_pair("features", eager_features, lambda: tts.run(
        "semantic_encoder", input_features=feats_in, attention_mask=mask)[0], cfg, per=cfg.reference_seconds)
    feats = eager_features()
    t_feats = torch.from_numpy(feats)
    lens = np.array([frames], np.int64)

    def eager_codec():
        with torch.inference_mode():
            return model.codec.quantize(t_feats)[1].numpy()

    res.stages["codec"] = time_pair("codec", eager_codec, lambda: tts.run(
        "semantic_codec", features=feats, lengths=lens)[1], cfg, per=cfg.reference_seconds)
    fb = rng.normal(-4.0, 3.0, (1, 2 * frames, 80)).astype(np.float32)
    t_fb = torch.from_numpy(fb)

    def eager_campplus():
        with torch.inference_mode():
            return campplus_style(model.campplus, t_fb).numpy()

    res.stages["campplus"] = time_pair("campplus", eager_campplus, lambda: tts.run("campplus", fbank=fb)[0], cfg,
                                       per=cfg.reference_seconds)
    cap = np.array([min(frames, model.gpt.cfg.feature_dim)], np.int64)
    t_cap = torch.from_numpy(cap)
    for label, method in (("speaker_conditioner", model.gpt.speaker_latents),
                          ("emotion_conditioner", model.gpt.get_emovec)):
        def eager(m=method):
            with torch.inference_mode():
                return m(t_feats, t_cap).numpy()

        res.stages[label] = time_pair(label, eager, lambda n=label: tts.run(n, features=feats, feature_lengths=cap)[0],
                                      cfg, per=cfg.reference_seconds)


def bench_gpt(model, export_dir: Path, manifest, decoder, cfg: BenchConfigV2, res: ResultsV2) -> None:
    import torch

    from engine_ref.indextts2.gpt import latent_pass_v2
    from export.runtime import KVState

    uv = model.gpt
    g = uv.cfg
    hd = g.model_dim // g.heads
    rng = np.random.default_rng(cfg.seed + 1)
    past = cfg.decode_past
    bw = read_bandwidth(cfg.threads, cfg.bandwidth_mib, max(cfg.reps, 3))
    for batch in cfg.decode_batches:
        kv = [(rng.standard_normal((batch, g.heads, past, hd)).astype(np.float32) * 0.5,
               rng.standard_normal((batch, g.heads, past, hd)).astype(np.float32) * 0.5) for _ in range(g.layers)]
        tok = rng.integers(0, 8192, (batch, 1))
        pos = np.full((batch, 1), 2 + past // 4, np.int64)
        state = KVState(kv, np.ones((batch, past), bool))
        t_past = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in kv]
        t_tok, t_pos = torch.from_numpy(tok), torch.from_numpy(pos)
        t_mask = torch.ones(batch, past + 1, dtype=torch.bool)

        def eager():
            with torch.inference_mode():
                h, _ = uv.decode(uv.mel_embeds(t_tok, t_pos), t_mask, t_past)
                return uv.mel_logits(h[:, -1]).numpy()

        res.stages[f"gpt step b{batch}"] = time_pair(f"gpt step b{batch}", eager,
                                                     lambda: decoder.decode(tok, pos, state)[0], cfg)
    best_bw = max(bw.values())
    weight_bytes = streamed_weight_bytes(export_dir / manifest.component("gpt_decode").file)
    res.floor.update({"gpt_bytes": weight_bytes, "bw_used_gbps": best_bw / 1e9,
                      "gpt_floor_ms": decode_floor_ms(weight_bytes, best_bw),
                      **{f"bw_{k}_gbps": v / 1e9 for k, v in bw.items()}})
    conds = rng.standard_normal((1, g.cond_rows, g.model_dim)).astype(np.float32)
    text = [int(x) for x in rng.integers(2, g.text_vocab, 40)]
    codes = [int(x) for x in rng.integers(0, 8192, cfg.latent_codes)]
    t_conds = torch.from_numpy(conds)

    def eager_latents():
        with torch.inference_mode():
            return latent_pass_v2(uv, t_conds, [text], [codes])[0][0].numpy()

    res.stages["latent pass"] = time_pair("latent pass", eager_latents,
                                          lambda: decoder.latents(conds, [text], [codes])[0], cfg)


def bench_cfm(model, tts, cfg: BenchConfigV2, res: ResultsV2) -> None:
    import torch

    from export.indextts2.cfm import cfg_batch

    est = model.s2mel.cfm.estimator
    rng = np.random.default_rng(cfg.seed + 2)
    peak = gemm_flops(cfg.threads)
    res.floor["gemm_gflops"] = peak / 1e9
    for rows in cfg.cfm_rows:
        requests = max(1, rows // 2)
        totals = np.full(requests, cfg.cfm_frames, np.int64)
        feeds = cfg_batch(rng, model, totals, totals // 2)
        t_feeds = [torch.from_numpy(v) for v in feeds.values()]

        def eager():
            with torch.inference_mode():
                return est(*t_feeds).numpy()

        row = time_pair(f"cfm step rows {rows}", eager, lambda: tts.run("cfm_estimator", **feeds)[0], cfg)
        with torch.inference_mode():
            flops = count_flops(lambda: est(*t_feeds))
        row.update({"flops": flops, "floor_ms": 1e3 * flops / peak})
        res.stages[f"cfm step rows {rows}"] = row


def bench_vocoder(model, tts, cfg: BenchConfigV2, res: ResultsV2) -> None:
    import torch

    sr, hop = model.config.sample_rate, model.vocoder.samples_per_frame
    frames = max(1, round(cfg.vocoder_seconds * sr / hop))
    audio_s = frames * hop / sr
    mel = np.random.default_rng(cfg.seed + 3).normal(-5.0, 2.0, (1, model.vocoder.cfg.num_mels, frames))
    mel = mel.astype(np.float32)
    t_mel = torch.from_numpy(mel)

    def eager():
        with torch.inference_mode():
            return model.vocoder(t_mel).numpy().reshape(-1)

    row = time_pair("vocoder", eager, lambda: tts.run("vocoder", mel=mel)[0].reshape(-1), cfg, per=audio_s)
    row["audio_s"] = audio_s
    res.stages["vocoder"] = row


def run(cfg: BenchConfigV2, argv: Sequence[str] = ()) -> tuple[ResultsV2, Path]:
    import torch

    from engine_ref.indextts2.loader import load_v2_model
    from export.indextts2.runtime import OrtIndexTTS2

    if cfg.reps < 1 or cfg.warmup < 0 or cfg.threads < 1 or cfg.latent_codes < 2 or not cfg.reference_seconds > 0:
        raise InputError("--reps, --threads must be >= 1, --warmup >= 0, --latent-codes >= 2, --reference-seconds > 0",
                         "fix the command line")
    command = "PYTHONPATH=. python -m perf.export_bench_v2 " + " ".join(shlex.quote(a) for a in argv)
    res = ResultsV2(machine=machine_info(cfg.threads, command.strip()))
    torch.set_num_threads(cfg.threads)
    model_dir = ensure_model(cfg)
    export_dir, manifest = ensure_export(model_dir, cfg, res.notes)
    model = load_v2_model(model_dir, verify=False)
    tts = OrtIndexTTS2(export_dir, threads=cfg.threads, manifest=manifest)
    bench_reference(model, tts, cfg, res)
    bench_gpt(model, export_dir, manifest, tts.decoder, cfg, res)
    bench_cfm(model, tts, cfg, res)
    bench_vocoder(model, tts, cfg, res)
    res.machine["load_avg_at_end"] = load_average()
    return res, write_report(res, cfg)


# ------------------------------------------------------------------------------------------------------ reporting


def targets(res: ResultsV2, cfg: BenchConfigV2, best: bool = False) -> list[tuple[str, str, bool]]:
    """Per stage: the exported graph no slower than eager; the GPT step and CFM call against their floors."""
    sfx = "_best" if best else ""
    out = []
    for label in stage_labels(cfg):
        r = res.stages[label]
        speed = ratio(r["eager" + sfx], r["ort" + sfx])
        out.append((f"{label}: ORT no slower than eager", f"{fmt(speed, 2)}x", speed >= 1.0))
    for b in cfg.decode_batches:
        x = ratio(res.stages[f"gpt step b{b}"]["ort" + sfx], res.floor["gpt_floor_ms"])
        out.append((f"gpt step b{b} (ORT fp32) <= 1.3x the bandwidth floor", f"{fmt(x, 2)}x floor", x <= 1.3))
    for rows in cfg.cfm_rows:
        r = res.stages[f"cfm step rows {rows}"]
        x = ratio(r["ort" + sfx], r["floor_ms"])
        out.append((f"cfm step rows {rows} (ORT) <= 2x the FLOP floor", f"{fmt(x, 2)}x floor", x <= 2.0))
    return out


def render(res: ResultsV2, cfg: BenchConfigV2) -> str:
    m, fl = res.machine, res.floor
    bws = ", ".join(f"{k[3:-5]} {fmt(x)}" for k, x in fl.items() if k.startswith("bw_") and k != "bw_used_gbps")
    lines = [
        f"# IndexTTS2 export benchmark: {cfg.preset} on {m['host']}, {m['date']}", "",
        f"- machine: {m['cpu']}, {m['cores']} cores; threads used: {m['threads']} (torch and ONNX Runtime); load "
        f"average at start: {m['load_avg_at_start']}, at end: {m.get('load_avg_at_end', 'n/a')}",
        f"- software: Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}; commit {m['commit']}",
        f"- command: `{m['command']}`",
        f"- method: medians of {cfg.reps} round-robin rounds after {cfg.warmup} warm-up, {1e3 * cfg.gap_s:.0f} ms idle "
        "before each call; ms unless stated; `rel` = max|ORT - eager| / max|eager| on the timed inputs",
        *(f"- note: {n}" for n in res.notes), "",
        "## Stages", "",
        "| stage | input | eager | ORT | eager/ORT | best eager | best ORT | floor | ORT/floor | rel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    inputs = {"features": f"{cfg.reference_seconds:g} s ref", "codec": f"{cfg.reference_seconds:g} s ref",
              "campplus": f"{cfg.reference_seconds:g} s ref", "speaker_conditioner": f"{cfg.reference_seconds:g} s ref",
              "emotion_conditioner": f"{cfg.reference_seconds:g} s ref", "latent pass": f"{cfg.latent_codes} codes",
              "vocoder": f"{cfg.vocoder_seconds:g} s audio"}
    for label in stage_labels(cfg):
        r = res.stages[label]
        floor = fl["gpt_floor_ms"] if label.startswith("gpt step") else r.get("floor_ms", float("nan"))
        what = inputs.get(label) or (f"past {cfg.decode_past}" if label.startswith("gpt") else
                                     f"{cfg.cfm_frames} frames")
        lines.append(f"| {label} | {what} | {fmt(r['eager'])} | {fmt(r['ort'])} | {fmt(ratio(r['eager'], r['ort']), 2)} "
                     f"| {fmt(r['eager_best'])} | {fmt(r['ort_best'])} | {fmt(floor)} | {fmt(ratio(r['ort'], floor), 2)} "
                     f"| {r['rel']:.1e} |")
    v = res.stages["vocoder"]
    lines += [
        "", f"BigVGAN v2 seconds of compute per second of audio: eager {fmt(v['eager_s_per_unit'], 3)}, "
            f"ORT {fmt(v['ort_s_per_unit'], 3)}.",
        "", "## Floors", "",
        f"- GPT step: {fl['gpt_bytes'] / 1e6:.0f} MB of decoder weights streamed per step at the best measured read "
        f"bandwidth {fmt(fl['bw_used_gbps'])} GB/s ({bws}) -> {fmt(fl['gpt_floor_ms'], 2)} ms.",
        "- CFM step: FLOPs of the eager call (torch FlopCounterMode: matmuls, convolutions, attention) / the fp32 "
        f"GEMM rate of ORT MatMul [1024]^3 with {m['threads']} threads = {fmt(fl['gemm_gflops'])} GFLOP/s.",
        "", "## Targets", "",
        f"| target | measured (median) | met | best-of-{cfg.reps} | met (best-of) |", "|---|---|---|---|---|",
    ]
    for (t, mm, ok), (_, mb, okb) in zip(targets(res, cfg), targets(res, cfg, best=True)):
        lines.append(f"| {t} | {mm} | {'met' if ok else 'NOT met'} | {mb} | {'met' if okb else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def write_report(res: ResultsV2, cfg: BenchConfigV2) -> Path:
    from perf.report import report_stem, write_text_report

    path = cfg.out / f"{report_stem(cfg.preset, res.machine, kind='export-bench-v2')}.md"
    return write_text_report(path, render(res, cfg), {"config": asdict(cfg), **asdict(res)})


def parse_args(argv: Sequence[str] | None = None) -> BenchConfigV2:
    p = argparse.ArgumentParser(prog="python -m perf.export_bench_v2", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="v2", help="IndexTTS2 preset (random weights): v2, tiny-v2")
    p.add_argument("--out", default="perf/results", help="directory for the report")
    p.add_argument("--model-dir", default=None, help="model directory (default build/models/<preset>; written once)")
    p.add_argument("--export-dir", default=None, help="export directory (default build/exports/<preset>-bench)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reference-seconds", type=float, default=10.0)
    p.add_argument("--decode-batches", type=_ints, default=(1, 4))
    p.add_argument("--decode-past", type=int, default=256)
    p.add_argument("--latent-codes", type=int, default=250)
    p.add_argument("--cfm-rows", type=_ints, default=(2, 8), help="estimator rows (2 per request: CFG)")
    p.add_argument("--cfm-frames", type=int, default=860)
    p.add_argument("--vocoder-seconds", type=float, default=2.0)
    p.add_argument("--bandwidth-mib", type=int, default=512)
    p.add_argument("--gap-ms", type=float, default=50.0)
    a = p.parse_args(argv)
    return BenchConfigV2(
        preset=a.preset, out=Path(a.out), model_dir=Path(a.model_dir) if a.model_dir else None,
        export_dir=Path(a.export_dir) if a.export_dir else None, threads=a.threads, reps=a.reps, warmup=a.warmup,
        reference_seconds=a.reference_seconds, decode_batches=a.decode_batches, decode_past=a.decode_past,
        latent_codes=a.latent_codes, cfm_rows=a.cfm_rows, cfm_frames=a.cfm_frames, vocoder_seconds=a.vocoder_seconds,
        bandwidth_mib=a.bandwidth_mib, gap_s=a.gap_ms / 1e3,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
