"""engine_ref IndexTTS2 on its own: file sizes, load time, and RTF per stage (median of N runs).

    python -m perf.engine_ref_bench_v2 --preset v2 [--preset tiny-v2] [--runs 3] [--models build/models]

Writes the preset directories if missing (v2: ~6.5 GB, about a minute), then for each: the files (model dir and
its bundled dependencies), load time (offline resolution + integrity check + strict load of every component), and
for a short and a medium text with greedy decoding: seconds per stage and RTF, median of `--runs` after one
warm-up run (which also fills the reference caches; its speaker-side stages are reported as "reference, first
use"). The 2.0 defaults otherwise (25 diffusion steps, CFG 0.7, 200 ms between segments).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from perf.machine import cpu_name, git_commit

TEXTS = {
    "short": "The quick brown fox jumps over the lazy dog.",
    "medium": ("The quick brown fox jumps over the lazy dog. Then it rests in the shade, and the afternoon goes "
               "by slowly, while the birds sing in the old oak tree behind the farmhouse."),
}
SPEAKER_STAGES = ("features", "codec", "campplus", "ref_mel", "conditioning")


def _files(model_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(model_dir))] = p.stat().st_size
    return out


def bench(preset: str, models: Path, runs: int) -> dict:
    import torch

    from engine_ref.audio import write_wav
    from engine_ref.indextts.presets import demo_voice
    from engine_ref.indextts2.gpt.generate import v2_generation_params
    from engine_ref.indextts2.loader import load_v2_model
    from engine_ref.indextts2.presets import write_v2_preset
    from engine_ref.indextts2.synthesizer import Synthesizer2

    model_dir = models / preset
    if not (model_dir / "config.yaml").exists():
        t = time.perf_counter()
        write_v2_preset(preset, model_dir)
        print(f"wrote {preset} preset in {time.perf_counter() - t:.0f} s", flush=True)
    voice = models / "voice22k.wav"
    if not voice.exists():
        write_wav(voice, demo_voice(seconds=4.0, sample_rate=22050), 22050)
    sizes = _files(model_dir)
    t = time.perf_counter()
    model = load_v2_model(model_dir)
    load_s = time.perf_counter() - t
    synth = Synthesizer2(model)
    params = v2_generation_params(do_sample=False, num_beams=1, seed=0)
    out = {"preset": preset, "sizes": sizes, "load_s": load_s, "threads": torch.get_num_threads(), "texts": {}}
    first_use = None
    for name, text in TEXTS.items():
        warm = synth.synthesize(text, voice, params)
        if first_use is None:
            first_use = {s: warm.timings.stages()[s] for s in SPEAKER_STAGES}
        results = [synth.synthesize(text, voice, params) for _ in range(runs)]
        stages = {s: statistics.median(r.timings.stages()[s] for r in results) for s in results[0].timings.STAGES}
        out["texts"][name] = {
            "audio_s": results[0].timings.audio_s, "tokens": results[0].timings.tokens,
            "total_s": statistics.median(r.timings.total_s for r in results),
            "rtf": statistics.median(r.timings.rtf for r in results), "rtfs": [r.timings.rtf for r in results],
            "stages": stages,
        }
    out["reference_first_use"] = first_use
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default="build/models")
    args = ap.parse_args(argv)
    presets = args.preset or ["tiny-v2", "v2"]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; commit {git_commit()}")
    print("command: python -m perf.engine_ref_bench_v2 " + " ".join(f"--preset {p}" for p in presets)
          + f" --runs {args.runs} --models {args.models}")
    for preset in presets:
        r = bench(preset, Path(args.models), args.runs)
        total = sum(r["sizes"].values())
        big = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in r["sizes"].items() if v > 1e6)
        print(f"\n## {preset}: {total / 1e9:.2f} GB in {len(r['sizes'])} files; load {r['load_s']:.1f} s "
              f"(torch threads {r['threads']})\nfiles over 1 MB (MB): {big}")
        first = r["reference_first_use"]
        print("reference, first use (s): " + ", ".join(f"{k} {v:.2f}" for k, v in first.items()))
        stages = list(next(iter(r["texts"].values()))["stages"])
        print("\n| text | audio (s) | codes | total (s) | RTF median | RTF runs | "
              + " | ".join(f"{s} (s)" for s in stages) + " |")
        print("|---|---|---|---|---|---|" + "---|" * len(stages))
        for name, t in r["texts"].items():
            print(f"| {name} | {t['audio_s']:.2f} | {t['tokens']} | {t['total_s']:.2f} | {t['rtf']:.3f} | "
                  + ", ".join(f"{x:.3f}" for x in t["rtfs"]) + " | "
                  + " | ".join(f"{t['stages'][s]:.2f}" for s in stages) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
