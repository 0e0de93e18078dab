"""engine_ref on its own: preset sizes, load time, and RTF (median of N runs) — the reference numbers.

    python -m perf.engine_ref_bench --preset tiny --preset v1.5 [--runs 3] [--models build/models]

Writes the preset directories if missing (v1.5: ~2.9 GB, a few minutes), then for each: file sizes, load time
(resolve + integrity check + strict load), and the RTF of `Synthesizer.synthesize` on a fixed ~100-character text
with greedy decoding (deterministic; the same work every run), median of `--runs` after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from perf.machine import cpu_name, git_commit

TEXT = ("The quick brown fox jumps over the lazy dog. Then it rests in the shade, "
        "and the afternoon goes by slowly.")


def bench(preset: str, models: Path, runs: int) -> dict:
    import torch

    from engine_ref.audio import write_wav
    from engine_ref.indextts.loader import load_model
    from engine_ref.indextts.presets import demo_voice, write_preset
    from engine_ref.sampling import GenerationParams
    from engine_ref.indextts.synthesizer import Synthesizer

    model_dir = models / preset
    if not model_dir.exists():
        t = time.perf_counter()
        write_preset(preset, model_dir)
        print(f"wrote {preset} preset in {time.perf_counter() - t:.0f} s")
    voice = models / "voice.wav"
    if not voice.exists():
        write_wav(voice, demo_voice(), 24000)
    sizes = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    t = time.perf_counter()
    model = load_model(model_dir)
    load_s = time.perf_counter() - t
    synth = Synthesizer(model)
    params = GenerationParams.greedy()
    synth.synthesize(TEXT, voice, params)  # warm-up (also fills the speaker cache, as in steady serving)
    rtfs, totals, audio = [], [], 0.0
    for _ in range(runs):
        r = synth.synthesize(TEXT, voice, params)
        rtfs.append(r.timings.rtf)
        totals.append(r.timings.total_s)
        audio = r.timings.audio_s
    return {"preset": preset, "sizes": sizes, "load_s": load_s, "rtf": statistics.median(rtfs),
            "total_s": statistics.median(totals), "audio_s": audio, "threads": torch.get_num_threads(),
            "rtfs": rtfs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default="build/models")
    args = ap.parse_args(argv)
    presets = args.preset or ["tiny", "v1.5"]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; commit {git_commit()}")
    print("command: python -m perf.engine_ref_bench " + " ".join(f"--preset {p}" for p in presets)
          + f" --runs {args.runs}")
    print("| preset | files (MB) | load (s) | audio (s) | synth median (s) | RTF median | runs |")
    print("|---|---|---|---|---|---|---|")
    for preset in presets:
        r = bench(preset, Path(args.models), args.runs)
        files = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in r["sizes"].items())
        print(f"| {preset} | {files} | {r['load_s']:.1f} | {r['audio_s']:.2f} | {r['total_s']:.2f} | "
              f"{r['rtf']:.3f} | {', '.join(f'{x:.3f}' for x in r['rtfs'])} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
