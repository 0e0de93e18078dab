"""`triton-tts bench`: the serving benchmark suite in one command (perf/suite.py).

    triton-tts bench --preset tiny            # everything on the tiny preset, minutes
    triton-tts bench --preset v1.5            # real sizes (reuses build/models/v1.5 and build/export-v1.5)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from engine_ref.errors import InputError
from model_repository import SPIN_CHOICES

__all__ = ["register", "cmd_bench", "config_from_args"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise InputError(f"{text!r} is not a list of integers", "pass e.g. --concurrency 1,2,4,8") from None
    if not values or min(values) < 1:
        raise InputError(f"{text!r} must list positive integers", "pass e.g. --concurrency 1,2,4,8")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="serving benchmark: our client + perf_analyzer + engine_ref, report and plots")
    p.add_argument("--preset", choices=("tiny", "v1.5"), default="tiny",
                   help="tiny: the whole suite in minutes; v1.5: IndexTTS 1.5 sizes (a reduced, documented config)")
    p.add_argument("--out", default="perf/results", help="where the report, plots, JSON and CSVs go")
    p.add_argument("--workdir", help="model (tiny), repositories and server logs (default build/bench/<preset>)")
    p.add_argument("--model", help="model directory (default: written preset)")
    p.add_argument("--export", help="export directory (default build/export-<preset>; reused when up to date)")
    p.add_argument("--concurrency", help="override every scenario's concurrency levels, e.g. 1,2,4,8")
    p.add_argument("--scenarios", help="subset of short,medium,long")
    p.add_argument("--soak-requests", type=int, help="requests in the memory soak (default 100)")
    p.add_argument("--variants", help="weight-only decoder variants to serve single-stream (default int4; "
                                      "'none' to skip)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime / torch threads (0: their defaults)")
    p.add_argument("--spin-threads", choices=SPIN_CHOICES, default="all",
                   help="whose ONNX Runtime threads busy-wait in the server (build-repo --spin-threads), to compare")
    p.add_argument("--no-perf-analyzer", action="store_true", help="skip the perf_analyzer levels")
    p.add_argument("--tools-cache", default="build/tools", help="where the pinned perf_analyzer is unpacked")
    p.set_defaults(func=cmd_bench)


def _command_line() -> str:
    """How this run was started, for the report (the console script, or `python -m perf.commands`)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("triton-tts"):
        return "triton-tts " + shlex.join(argv[1:])
    if argv and argv[0].endswith(("perf/commands.py", "perf\\commands.py")):
        return "python -m perf.commands " + shlex.join(argv[1:])
    return shlex.join(argv)


def config_from_args(args: argparse.Namespace):
    from perf.suite import suite_config

    overrides: dict = {"out_dir": Path(args.out), "threads": args.threads,
                       "spin_threads": args.spin_threads, "perf_analyzer": not args.no_perf_analyzer,
                       "pa_cache": Path(args.tools_cache), "command": _command_line()}
    for key, value in (("work_dir", args.workdir), ("model_dir", args.model), ("export_dir", args.export)):
        if value:
            overrides[key] = Path(value)
    if args.soak_requests is not None:
        if args.soak_requests < 2:
            raise InputError(f"--soak-requests {args.soak_requests} is too small", "pass at least 2 (default 100)")
        overrides["soak_requests"] = args.soak_requests
    if args.variants is not None:
        overrides["variants"] = () if args.variants.strip().lower() == "none" else tuple(
            v for v in args.variants.replace(",", " ").split())
    cfg = suite_config(args.preset, **overrides)
    if args.scenarios:
        wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = [s for s in wanted if cfg.scenario(s) is None]
        if unknown:
            raise InputError(f"unknown scenario(s) {', '.join(unknown)}",
                             f"choose from {', '.join(s.name for s in cfg.scenarios)}")
        cfg = replace(cfg, scenarios=tuple(s for s in cfg.scenarios if s.name in wanted))
    if args.concurrency:
        levels = _ints(args.concurrency)
        cfg = replace(cfg, scenarios=tuple(replace(s, concurrency=levels) for s in cfg.scenarios))
    if cfg.soak_warmup >= cfg.soak_requests:
        cfg = replace(cfg, soak_warmup=max(1, cfg.soak_requests // 10))
    return cfg


def cmd_bench(args: argparse.Namespace) -> int:
    from perf.report import targets
    from perf.suite import run_suite

    import signal

    cfg = config_from_args(args)
    # SIGTERM (a timeout, `kill`) must still stop the server the suite started: turn it into an exception.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result, path = run_suite(cfg)
    print(f"wrote {path} (+ .json, plots; index {Path(cfg.out_dir) / 'README.md'}) in "
          f"{result.timings.get('total_s', 0):.0f} s")
    for t in targets(result):
        status = "n/a" if t.met is None else ("met" if t.met else "NOT met")
        print(f"  {t.key}: {t.measured} (goal {t.goal}) {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m perf.commands bench ...`: the same command without the console script."""
    from engine_ref.errors import TTSError

    parser = argparse.ArgumentParser(prog="python -m perf.commands")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TTSError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
