"""engine_ref's subcommands: preset, verify (alias doctor), download, synth (the demo lives in triton_tts.demo)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine_ref.errors import InputError
from engine_ref.indextts2 import cli as v2cli

log = logging.getLogger("engine_ref.commands")

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preset", help="write a model directory in the official format with deterministic random weights")
    p.add_argument("name", help="tiny | v1.5 | v1.0 | tiny-v2 | v2 | tiny-v2.5 | v2.5")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing directory")
    v2cli.add_v2_preset_args(p)
    p.set_defaults(func=cmd_preset)

    for name in ("verify", "doctor"):
        p = sub.add_parser(name, help="check a model directory or cached HF repo offline and print a table "
                                      "(IndexTTS 1.x, or IndexTTS-2/2.5 with each hub dependency)")
        p.add_argument("model", help="model directory or Hugging Face repo id (local cache only)")
        p.add_argument("--cache-dir", help="Hugging Face cache directory (default: HF_HUB_CACHE / HF_HOME); "
                                           "IndexTTS2 dependencies are looked for there too")
        p.add_argument("--deep", action="store_true", help="also read every byte (cache blob hashes, zip CRCs)")
        p.set_defaults(func=cmd_verify)

    p = sub.add_parser("download", help="explicitly download a model from the Hugging Face Hub (the only network use)")
    p.add_argument("repo", help="e.g. IndexTeam/IndexTTS-1.5 or IndexTeam/IndexTTS-2 (optionally @revision)")
    p.add_argument("--cache-dir", help="Hugging Face cache directory (default: HF_HUB_CACHE / HF_HOME)")
    p.add_argument("--layout", choices=("hub", "flat"), default="hub",
                   help="IndexTTS2: hub = the Hugging Face cache; flat = --local-dir DIR with DIR/hf_cache/ "
                        "holding the dependencies (upstream's current layout)")
    p.add_argument("--local-dir", help="model directory to fill (with --layout flat)")
    p.add_argument("--skip-text-emotion", action="store_true",
                   help="IndexTTS2: leave out qwen0.6bemo4-merge/ (1.2 GB), needed only for emotion from text")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network request")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("synth", help="synthesize speech with the PyTorch reference engine")
    _add_synth_args(p)
    p.set_defaults(func=cmd_synth)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Generation flags shared by every synthesizing command (engine_ref and the Triton client)."""
    g = p.add_argument_group("generation (defaults: IndexTTS 1.5's)")
    g.add_argument("--greedy", action="store_true", help="deterministic: no sampling, one beam")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--num-beams", type=int)
    g.add_argument("--max-mel-tokens", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-text-tokens-per-segment", type=int, default=120)


def generation_params(args: argparse.Namespace):
    from engine_ref.sampling import GenerationParams

    base = GenerationParams.greedy() if args.greedy else GenerationParams()
    overrides = {
        k: getattr(args, k)
        for k in ("temperature", "top_p", "top_k", "repetition_penalty", "num_beams", "max_mel_tokens", "seed")
        if getattr(args, k) is not None
    }
    return GenerationParams(**{**base.__dict__, **overrides})


def read_text_arg(args: argparse.Namespace) -> str:
    if args.text_file:
        path = Path(args.text_file)
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"text file {path} does not exist", "pass an existing UTF-8 text file") from None
        except UnicodeDecodeError:
            raise InputError(f"text file {path} is not UTF-8", "convert it to UTF-8") from None
    return args.text


def _add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or Hugging Face repo id (local cache only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--text-file")
    p.add_argument("--ref", required=True, help="reference audio (wav/flac/mp3)")
    p.add_argument("--out", required=True, help="output WAV path")
    p.add_argument("--bucket-size", type=int, default=4, help="segments decoded together as one batch")
    p.add_argument("--max-reference-seconds", type=float, default=50.0)
    p.add_argument("--cache-dir", help="Hugging Face cache directory")
    add_generation_args(p)
    v2cli.add_v2_synth_args(p)


def cmd_preset(args: argparse.Namespace) -> int:
    from engine_ref.indextts.presets import write_preset

    if v2cli.is_v2_preset(args.name):
        return v2cli.cmd_preset_v2(args)
    out = write_preset(args.name, args.out, seed=args.seed, force=args.force)
    print(f"wrote {args.name} preset to {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rich.console import Console

    from engine_ref.families import check_install
    from engine_ref.hub_cache import resolve_model
    from engine_ref.integrity import render_report

    path = resolve_model(args.model, cache_dir=args.cache_dir)
    report = check_install(path, cache_dir=args.cache_dir, deep=getattr(args, "deep", False))
    console = Console()
    console.print(render_report(report))
    if report.ok:
        console.print(f"[green]ok[/green]: {path} is complete")
        return 0
    console.print(f"[red]{len(report.problems)} problem(s)[/red] in {path}")
    return 1


def cmd_download(args: argparse.Namespace) -> int:
    from engine_ref.download import download_release

    result = download_release(
        args.repo, layout=args.layout, cache_dir=args.cache_dir, local_dir=args.local_dir, timeout_s=args.timeout,
        text_emotion=not args.skip_text_emotion,
    )
    print(f"downloaded and verified: {result.model_dir}")
    if result.fetched_dependencies:
        print(f"dependencies fetched ({result.layout} layout): {', '.join(result.fetched_dependencies)}")
    return 0


def _print_timings(result, out: Path) -> None:
    t = result.timings
    print(
        f"wrote {out} ({t.audio_s:.2f} s of audio, {len(result.segments)} segment(s), seed {result.seed}); "
        f"total {t.total_s:.2f} s, RTF {t.rtf:.3f}; gpt {t.generate_s:.2f} s ({t.tokens} tokens, "
        f"{t.tokens_per_s:.0f} tok/s), latents {t.latent_s:.2f} s, vocoder {t.vocoder_s:.2f} s"
    )
    for w in result.warnings:
        print(f"warning: {w}")


def cmd_synth(args: argparse.Namespace) -> int:
    from engine_ref.audio import write_wav
    from engine_ref.indextts.synthesizer import Synthesizer

    handled = v2cli.synth_v2_if_needed(args)  # an IndexTTS2 model (or IndexTTS2 flags) is handled there
    if handled is not None:
        return handled
    text = read_text_arg(args)
    params = generation_params(args)
    synth = Synthesizer.from_pretrained(args.model, cache_dir=args.cache_dir,
                                        max_reference_seconds=args.max_reference_seconds)
    result = synth.synthesize(text, args.ref, params, max_text_tokens_per_segment=args.max_text_tokens_per_segment,
                              bucket_max_size=args.bucket_size)
    out = write_wav(args.out, result.pcm16, result.sample_rate)
    _print_timings(result, out)
    return 0


def ensure_demo_assets(workdir: Path) -> tuple[Path, Path]:
    """The tiny model and the demo voice under workdir, built once (rebuilt if the model fails verification)."""
    from engine_ref.audio import write_wav
    from engine_ref.integrity import check_model_dir
    from engine_ref.indextts.presets import demo_voice, write_preset

    model_dir = workdir / "tiny-model"
    if not model_dir.exists() or not check_model_dir(model_dir).ok:
        print(f"building the tiny preset in {model_dir} ...")
        write_preset("tiny", model_dir, force=True)
    voice = workdir / "voice.wav"
    if not voice.exists():
        write_wav(voice, demo_voice(), 24000)
    return model_dir, voice
