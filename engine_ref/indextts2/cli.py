"""IndexTTS2 on the command line: the synth flags that only IndexTTS2 understands, the v2 synth command body and
the v2 presets, hooked into engine_ref/commands.py's `preset` and `synth`.

`triton-tts synth --model DIR` picks the engine from the directory (`engine_ref.families.detect_family`): an
IndexTTS2 directory runs `Synthesizer2` with the emotion flags, an IndexTTS-2.5 directory `Synthesizer25` with
them and `--lang` (required) / `--duration-factor`; an IndexTTS 1.x directory runs the 1.x engine and refuses
the IndexTTS2-only flags with a one-line error instead of ignoring them (2.0 refuses the 2.5-only ones).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

from engine_ref.errors import InputError

__all__ = ["add_v2_synth_args", "add_v2_preset_args", "is_v2_preset", "cmd_preset_v2", "synth_v2_if_needed",
           "cmd_synth_v2", "cmd_synth_v25", "parse_emotion_vector", "emotion_options",
           "v2_generation_params_from_args", "V2_ONLY_FLAGS", "V25_ONLY_FLAGS"]

# argparse dest -> flag, for the flags only IndexTTS2 models take
V2_ONLY_FLAGS = {
    "emo_ref": "--emo-ref", "emo_alpha": "--emo-alpha", "emo_vector": "--emo-vector", "emo_text": "--emo-text",
    "emo_from_text": "--emo-from-text", "emo_random": "--emo-random", "emo_alpha_mode": "--emo-alpha-mode",
    "diffusion_steps": "--diffusion-steps", "cfg_rate": "--cfg-rate", "reference_cut": "--reference-cut",
}
V25_ONLY_FLAGS = {"lang": "--lang", "duration_factor": "--duration-factor"}


def add_v2_synth_args(p: argparse.ArgumentParser) -> None:
    """The synth flags of IndexTTS2 models (emotion control and the s2mel settings)."""
    g = p.add_argument_group("IndexTTS2 only (emotion and s2mel)")
    g.add_argument("--emo-ref", help="emotion reference audio (default: the speaker reference)")
    g.add_argument("--emo-alpha", type=float, help="weight of the emotion reference in [0, 1] (default 1)")
    g.add_argument("--emo-vector", help="8 comma-separated weights: happy,angry,sad,afraid,disgusted,melancholic,"
                                        "surprised,calm (each in [0, 1.2], sum <= 1.5)")
    g.add_argument("--emo-text", help="describe the emotion in words; the Qwen emotion model turns it into weights")
    g.add_argument("--emo-from-text", action="store_true", help="derive the emotion weights from the text itself")
    g.add_argument("--emo-random", action="store_true",
                   help="pick the emotion-bank rows at random (seeded) instead of by speaker similarity")
    g.add_argument("--emo-alpha-mode", choices=("rel", "head"),
                   help="rel: alpha only mixes emotion audio (reference release); head: it also scales a vector")
    g.add_argument("--diffusion-steps", type=int, help="CFM Euler steps (default 25)")
    g.add_argument("--cfg-rate", type=float, help="classifier-free guidance rate (default 0.7)")
    g.add_argument("--reference-cut", type=float,
                   help="use only the first SECONDS of the references (upstream HEAD: 15; default: the whole file, "
                        "as the reference release, and 15 for IndexTTS-2.5; --max-reference-seconds is the "
                        "IndexTTS 1.x setting)")
    g25 = p.add_argument_group("IndexTTS-2.5 only")
    g25.add_argument("--lang", help="language of the text: zh, en, ja, es, ar (or zhen); required for IndexTTS-2.5")
    g25.add_argument("--duration-factor", type=float,
                     help="stretch the speech: 0.5 (faster) .. 2.0 (slower); default 1.0")


def add_v2_preset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("flat", "hub", "both"), default="both",
                   help="IndexTTS2 presets: where the hub dependencies go (hf_cache/ flat files, a Hugging Face "
                        "cache, or both)")


def is_v2_preset(name: str) -> bool:
    from engine_ref.indextts2.presets import V2_PRESETS
    from engine_ref.indextts2.v25.presets import V25_PRESETS

    return name in V2_PRESETS or name in V25_PRESETS


def cmd_preset_v2(args: argparse.Namespace) -> int:
    from engine_ref.indextts2.presets import write_v2_preset
    from engine_ref.indextts2.v25.presets import V25_PRESETS, write_v25_preset

    if args.name in V25_PRESETS:
        layout = getattr(args, "layout", "both") or "both"
        if layout == "hub":
            raise InputError("IndexTTS-2.5 presets bundle their dependencies in hf_cache/ (flat), as the release does",
                             "drop --layout hub for an IndexTTS-2.5 preset")
        out = write_v25_preset(args.name, args.out, seed=args.seed, force=args.force)
        print(f"wrote {args.name} preset to {out}")
        return 0
    out = write_v2_preset(args.name, args.out, seed=args.seed, force=args.force,
                          layout=getattr(args, "layout", "both") or "both")
    print(f"wrote {args.name} preset to {out}")
    return 0


# ---- request options from flags ----

def parse_emotion_vector(text: str) -> tuple[float, ...]:
    """"0,0,0.8,0,0,0,0,0" -> 8 floats (range rules are checked by the emotion module)."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"--emo-vector '{text}' is not a list of numbers",
                         "pass 8 comma-separated numbers, e.g. 0,0,0.8,0,0,0,0,0") from None
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"--emo-vector '{text}' holds a non-finite number", "pass finite numbers")
    return values


def emotion_options(args: argparse.Namespace):
    from engine_ref.indextts2.synthesizer import EmotionOptions

    opts = EmotionOptions(
        reference=args.emo_ref,
        alpha=1.0 if args.emo_alpha is None else args.emo_alpha,
        vector=parse_emotion_vector(args.emo_vector) if args.emo_vector is not None else None,
        text=args.emo_text,
        use_text=bool(args.emo_from_text),
        random=bool(args.emo_random),
        alpha_mode=args.emo_alpha_mode or "rel",
    )
    opts.validate()
    if opts.reference is not None and not Path(opts.reference).is_file():
        raise InputError(f"emotion reference audio {opts.reference} does not exist",
                         "pass the path of a wav/flac/mp3 file to --emo-ref")
    return opts


def v2_generation_params_from_args(args: argparse.Namespace):
    """IndexTTS2's upstream defaults (3 beams, T 0.8, 1500 codes), with the generic generation flags applied."""
    from engine_ref.indextts2.gpt import V2_GENERATION_DEFAULTS
    from engine_ref.sampling import GenerationParams

    base = replace(V2_GENERATION_DEFAULTS, do_sample=False, num_beams=1) if args.greedy else V2_GENERATION_DEFAULTS
    overrides = {
        k: getattr(args, k)
        for k in ("temperature", "top_p", "top_k", "repetition_penalty", "num_beams", "max_mel_tokens", "seed")
        if getattr(args, k, None) is not None
    }
    return GenerationParams(**{**base.__dict__, **overrides})


def _given_v2_flags(args: argparse.Namespace, flags: dict | None = None) -> list[str]:
    table = {**V2_ONLY_FLAGS, **V25_ONLY_FLAGS} if flags is None else flags
    return [flag for dest, flag in table.items() if getattr(args, dest, None) not in (None, False)]


# ---- synth ----

def synth_v2_if_needed(args: argparse.Namespace) -> int | None:
    """Run synth on an IndexTTS2 model and return the exit code; None when --model is IndexTTS 1.x (the caller
    runs the 1.x engine). IndexTTS2-only flags with a 1.x model, and --lang / --duration-factor with IndexTTS-2,
    are one-line InputErrors."""
    from engine_ref.families import FAMILY_NAMES, INDEXTTS, INDEXTTS2, INDEXTTS2_5, detect_family
    from engine_ref.indextts2.loader import resolve_model_dir

    model_dir = resolve_model_dir(args.model, getattr(args, "cache_dir", None))
    family = detect_family(model_dir)
    if family == INDEXTTS:
        flags = _given_v2_flags(args)
        if flags:
            raise InputError(f"{', '.join(flags)} need an IndexTTS-2 model, but {args.model} is IndexTTS 1.x",
                             f"drop {', '.join(flags)}, or pass an IndexTTS-2 model directory")
        return None
    if family == INDEXTTS2:
        flags = _given_v2_flags(args, V25_ONLY_FLAGS)
        if flags:
            raise InputError(f"{', '.join(flags)} need an IndexTTS-2.5 model, but {args.model} is IndexTTS-2",
                             f"drop {', '.join(flags)}, or pass an IndexTTS-2.5 model directory")
        args.model = str(model_dir)
        return cmd_synth_v2(args)
    if family == INDEXTTS2_5:
        args.model = str(model_dir)
        return cmd_synth_v25(args)
    raise InputError(f"{args.model} is {FAMILY_NAMES.get(family, family)}, which this engine cannot run",
                     "pass an IndexTTS 1.x, IndexTTS-2 or IndexTTS-2.5 model directory")


def _print_v2_timings(result, out: Path) -> None:
    t = result.timings
    stages = ", ".join(f"{name} {sec:.2f} s" for name, sec in t.stages().items() if sec > 0)
    print(f"wrote {out} ({t.audio_s:.2f} s of audio at {result.sample_rate} Hz, {len(result.segments)} segment(s), "
          f"seed {result.seed}); total {t.total_s:.2f} s, RTF {t.rtf:.3f}; {t.tokens} codes "
          f"({t.tokens_per_s:.0f}/s); speaker cache {'hit' if t.speaker_cache_hit else 'miss'}")
    print(f"stages: {stages}")
    for w in result.warnings:
        print(f"warning: {w}")


def _s2mel_settings(args: argparse.Namespace) -> tuple[int, float]:
    from engine_ref.indextts2.s2mel.cfm import DEFAULT_CFG_RATE, DEFAULT_STEPS

    steps = DEFAULT_STEPS if args.diffusion_steps is None else args.diffusion_steps
    cfg_rate = DEFAULT_CFG_RATE if args.cfg_rate is None else args.cfg_rate
    if steps < 1 or not 0 <= cfg_rate <= 10:
        raise InputError(f"--diffusion-steps {steps} / --cfg-rate {cfg_rate} out of range",
                         "use at least 1 step and a cfg rate in [0, 10] (defaults 25 and 0.7)")
    if args.reference_cut is not None and not args.reference_cut > 0:
        raise InputError(f"--reference-cut {args.reference_cut} must be positive", "pass a number of seconds, e.g. 15")
    return steps, cfg_rate


def cmd_synth_v2(args: argparse.Namespace) -> int:
    from engine_ref.audio import write_wav
    from engine_ref.commands import read_text_arg
    from engine_ref.indextts2.synthesizer import Synthesizer2

    text = read_text_arg(args)
    params = v2_generation_params_from_args(args)
    emotion = emotion_options(args)
    steps, cfg_rate = _s2mel_settings(args)
    synth = Synthesizer2.from_pretrained(args.model, cache_dir=getattr(args, "cache_dir", None),
                                         max_reference_seconds=args.reference_cut, diffusion_steps=steps,
                                         cfg_rate=cfg_rate)
    result = synth.synthesize(text, args.ref, params, emotion=emotion,
                              max_text_tokens_per_segment=args.max_text_tokens_per_segment,
                              bucket_max_size=args.bucket_size)
    out = write_wav(args.out, result.pcm16, result.sample_rate)
    loads = ", ".join(f"{k} {v:.2f} s" for k, v in synth.model.load_seconds.items() if v >= 0.01)
    print(f"loaded {synth.model.model_dir} in {synth.model.total_load_seconds:.2f} s ({loads})")
    _print_v2_timings(result, out)
    return 0


def cmd_synth_v25(args: argparse.Namespace) -> int:
    """synth on an IndexTTS-2.5 directory: the 2.0 flags plus --lang (required) and --duration-factor."""
    from engine_ref.audio import write_wav
    from engine_ref.commands import read_text_arg
    from engine_ref.indextts2.reference import HEAD_CUT_SECONDS
    from engine_ref.indextts2.v25.languages import SUPPORTED_LANGUAGES, check_language
    from engine_ref.indextts2.v25.s2mel import check_duration_factor
    from engine_ref.indextts2.v25.synthesizer import Synthesizer25

    if getattr(args, "lang", None) is None:
        raise InputError(f"{args.model} is IndexTTS-2.5, which needs the language of the text",
                         f"add --lang with one of {', '.join(SUPPORTED_LANGUAGES)}")
    lang = check_language(args.lang)
    factor = check_duration_factor(1.0 if args.duration_factor is None else args.duration_factor)
    text = read_text_arg(args)
    params = v2_generation_params_from_args(args)
    emotion = emotion_options(args)
    steps, cfg_rate = _s2mel_settings(args)
    cut = HEAD_CUT_SECONDS if args.reference_cut is None else args.reference_cut
    synth = Synthesizer25.from_pretrained(args.model, cache_dir=getattr(args, "cache_dir", None),
                                          max_reference_seconds=cut, diffusion_steps=steps, cfg_rate=cfg_rate)
    result = synth.synthesize(text, args.ref, params, lang=lang, duration_factor=factor, emotion=emotion,
                              max_text_tokens_per_segment=args.max_text_tokens_per_segment,
                              bucket_max_size=args.bucket_size)
    out = write_wav(args.out, result.pcm16, result.sample_rate)
    loads = ", ".join(f"{k} {v:.2f} s" for k, v in synth.model.load_seconds.items() if v >= 0.01)
    print(f"loaded {synth.model.model_dir} in {synth.model.total_load_seconds:.2f} s ({loads}); language {lang}, "
          f"duration factor {factor:g}")
    _print_v2_timings(result, out)
    return 0
