"""engine_ref IndexTTS2 / IndexTTS-2.5 on its own: file sizes, load time, and RTF per stage (median of N runs).

    python -m perf.engine_ref_bench_v2 --preset v2 [--preset v2.5] [--runs 3] [--models build/models]
        [--max-mel-tokens N] [--out perf/results]

Writes the preset directories if missing (v2: ~6.5 GB, about a minute), then for each: the files (model dir and
its bundled dependencies), load time (offline resolution + integrity check + strict load of every component), and
for a short and a medium text with greedy decoding: seconds per stage and RTF, median of `--runs` after one
warm-up run (which also fills the reference caches; its speaker-side stages are reported as "reference, first
use"). The 2.0 defaults otherwise (25 diffusion steps, CFG 0.7, 200 ms between segments). IndexTTS-2.5 presets
(tiny-v2.5, v2.5) run Synthesizer25 with lang="en"; when a 2.5 preset and its 2.0 size run together, a last table
gives 2.5 / 2.0 per stage and end to end (same texts, same run).

`--max-mel-tokens N` caps each segment's codes at N for 2.0 and N // 2 for 2.5 (its codes are 25 Hz: the same
audio length; stated in the report): random weights rarely
emit the stop code, so uncapped greedy decoding runs every segment to 1500 codes (about an hour per text at v2
size on 2 cores). RTF and per-stage time per audio second stay comparable; the absolute audio length is the cap's.
`--out DIR` also writes the report to DIR/engine-ref-v2-<presets>-<date>-<host>.md.
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


#: a 2.5 preset -> the 2.0 preset of the same sizes (the comparison table pairs them)
PAIRS = {"tiny-v2.5": "tiny-v2", "v2.5": "v2"}
V25_LANG = "en"  # the texts are English; 2.5 has no language detection


def _engine(preset: str, model_dir: Path):
    """(synthesizer, keyword arguments of its synthesize) for the preset's family."""
    if preset in PAIRS:
        from engine_ref.indextts2.v25.loader import load_v25_model
        from engine_ref.indextts2.v25.synthesizer import Synthesizer25

        return Synthesizer25(load_v25_model(model_dir)), {"lang": V25_LANG}
    from engine_ref.indextts2.loader import load_v2_model
    from engine_ref.indextts2.synthesizer import Synthesizer2

    return Synthesizer2(load_v2_model(model_dir)), {}


def _write_preset(preset: str, model_dir: Path) -> None:
    from engine_ref.indextts2.presets import write_v2_preset
    from engine_ref.indextts2.v25.presets import write_v25_preset

    (write_v25_preset if preset in PAIRS else write_v2_preset)(preset, model_dir)


def bench(preset: str, models: Path, runs: int, max_mel_tokens: int | None = None) -> dict:
    import torch

    from engine_ref.audio import write_wav
    from engine_ref.indextts.presets import demo_voice
    from engine_ref.indextts2.gpt.generate import v2_generation_params

    model_dir = models / preset
    if not (model_dir / "config.yaml").exists():
        t = time.perf_counter()
        _write_preset(preset, model_dir)
        print(f"wrote {preset} preset in {time.perf_counter() - t:.0f} s", flush=True)
    voice = models / "voice22k.wav"
    if not voice.exists():
        write_wav(voice, demo_voice(seconds=4.0, sample_rate=22050), 22050)
    sizes = _files(model_dir)
    t = time.perf_counter()
    synth, kwargs = _engine(preset, model_dir)
    load_s = time.perf_counter() - t
    if max_mel_tokens is not None and preset in PAIRS:
        max_mel_tokens = max(1, max_mel_tokens // 2)  # 25 Hz codes: the same audio length as 2.0's cap
    cap = {} if max_mel_tokens is None else {"max_mel_tokens": max_mel_tokens}
    params = v2_generation_params(do_sample=False, num_beams=1, seed=0, **cap)
    out = {"preset": preset, "sizes": sizes, "load_s": load_s, "threads": torch.get_num_threads(), "texts": {}}
    first_use = None
    for name, text in TEXTS.items():
        warm = synth.synthesize(text, voice, params, **kwargs)
        if first_use is None:
            first_use = {s: warm.timings.stages()[s] for s in SPEAKER_STAGES}
        results = [synth.synthesize(text, voice, params, **kwargs) for _ in range(runs)]
        stages = {s: statistics.median(r.timings.stages()[s] for r in results) for s in results[0].timings.STAGES}
        out["texts"][name] = {
            "audio_s": results[0].timings.audio_s, "tokens": results[0].timings.tokens,
            "total_s": statistics.median(r.timings.total_s for r in results),
            "rtf": statistics.median(r.timings.rtf for r in results), "rtfs": [r.timings.rtf for r in results],
            "stages": stages,
        }
    out["reference_first_use"] = first_use
    return out


def compare_lines(results: dict[str, dict]) -> list[str]:
    """2.5 / 2.0 per stage and end to end, for every 2.5 preset whose 2.0 size ran too (median seconds, per text)."""
    lines: list[str] = []
    for new, old in PAIRS.items():
        if new not in results or old not in results:
            continue
        lines += [f"\n## {new} / {old} (same texts, same run; < 1 means 2.5 is faster)",
                  "\n| text | stage | 2.0 (s) | 2.5 (s) | 2.5 / 2.0 |", "|---|---|---|---|---|"]
        for name in TEXTS:
            a, b = results[old]["texts"][name], results[new]["texts"][name]
            rows = [(s, a["stages"][s], b["stages"][s]) for s in a["stages"] if a["stages"][s] or b["stages"][s]]
            rows += [("end to end", a["total_s"], b["total_s"]), ("RTF", a["rtf"], b["rtf"]),
                     ("audio (s)", a["audio_s"], b["audio_s"]), ("codes", a["tokens"], b["tokens"])]
            for stage, x, y in rows:
                lines.append(f"| {name} | {stage} | {x:.3f} | {y:.3f} | {y / x:.2f}x |" if x else
                             f"| {name} | {stage} | {x:.3f} | {y:.3f} | n/a |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default="build/models")
    ap.add_argument("--max-mel-tokens", type=int, default=None, help="cap each segment's codes (both families)")
    ap.add_argument("--out", default=None, help="also write the report under this folder")
    args = ap.parse_args(argv)
    presets = args.preset or ["tiny-v2", "v2"]
    report: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    from perf.machine import load_average

    say(f"# engine_ref IndexTTS2 per stage ({', '.join(presets)})\n")
    say(f"machine: {cpu_name()}, {os.cpu_count()} cores; commit {git_commit()}; load average at start "
        f"{load_average()}")
    say("command: `python -m perf.engine_ref_bench_v2 " + " ".join(f"--preset {p}" for p in presets)
        + f" --runs {args.runs} --models {args.models}"
        + ("" if args.max_mel_tokens is None else f" --max-mel-tokens {args.max_mel_tokens}") + "`")
    say("method: greedy (seed 0), one 4 s voice, medians of the runs after one warm-up; "
        + ("uncapped codes" if args.max_mel_tokens is None else
           f"codes capped at {args.max_mel_tokens} per segment for 2.0 and {args.max_mel_tokens // 2} for 2.5 "
           "(50 vs 25 codes per audio second: the same audio length; random weights rarely stop)")
        + "; 2.5 with lang=en. Stage `codec`: 2.0 quantizes the reference (speaker side), 2.5 decodes the "
          "generated codes (its codec decoder, per segment); `latent` is 2.0's GPT latent pass (2.5 has none)")
    results: dict[str, dict] = {}
    for preset in presets:
        r = results[preset] = bench(preset, Path(args.models), args.runs, args.max_mel_tokens)
        total = sum(r["sizes"].values())
        big = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in r["sizes"].items() if v > 1e6)
        say(f"\n## {preset}: {total / 1e9:.2f} GB in {len(r['sizes'])} files; load {r['load_s']:.1f} s "
            f"(torch threads {r['threads']})\n\nfiles over 1 MB (MB): {big}\n")
        first = r["reference_first_use"]
        say("reference, first use (s): " + ", ".join(f"{k} {v:.2f}" for k, v in first.items()))
        stages = list(next(iter(r["texts"].values()))["stages"])
        say("\n| text | audio (s) | codes | total (s) | RTF median | RTF runs | "
            + " | ".join(f"{s} (s)" for s in stages) + " |")
        say("|---|---|---|---|---|---|" + "---|" * len(stages))
        for name, t in r["texts"].items():
            say(f"| {name} | {t['audio_s']:.2f} | {t['tokens']} | {t['total_s']:.2f} | {t['rtf']:.3f} | "
                + ", ".join(f"{x:.3f}" for x in t["rtfs"]) + " | "
                + " | ".join(f"{t['stages'][s]:.2f}" for s in stages) + " |")
    for line in compare_lines(results):
        say(line)
    say(f"\nload average at end: {load_average()}")
    if args.out:
        from perf.report import report_stem

        path = Path(args.out) / f"{report_stem('-'.join(presets), kind='engine-ref-v2')}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(report) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
