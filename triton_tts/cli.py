"""The one console script, `triton-tts`, with a subcommand per task.

Each part of the project registers its own subcommands (engine_ref: preset, verify, download, synth, demo; later
export, build-repo, serve, client, bench, gateway). User errors (TTSError) print one line naming the problem and the fix
and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from engine_ref.errors import TTSError

# Modules exposing `register(subparsers)`; each added subparser sets `func=handler(args) -> int`.
COMMAND_MODULES = (
    "engine_ref.commands", "export.commands", "model_repository.commands", "client.commands", "perf.commands",
    "triton_tts.demo", "gateway.cli",
)
#: Modules that need an extra at import time: without it their commands stay listed and answer with the install
#: line (a client-only install has no torch, yet `triton-tts client ...` must work).
_NEEDS_EXTRA = {"export.commands": (("export", "build-plans"), "export")}
_OPTIONAL_IMPORTS = {"torch", "onnx", "onnxruntime", "tensorrt", "transformers", "sentencepiece", "safetensors"}


def _register_missing(sub: argparse._SubParsersAction, module: str, missing: str) -> None:
    commands, extra = _NEEDS_EXTRA[module]

    def explain(args: argparse.Namespace) -> int:
        raise TTSError(f"`triton-tts {args.command}` needs {missing}, which is not installed",
                       f"pip install 'triton-tts[{extra}]'")

    for name in commands:
        # No option prefix: every word after the command is taken as is, so any flags reach `explain`.
        p = sub.add_parser(name, help=f"(needs the {extra} extra: pip install 'triton-tts[{extra}]')", add_help=False,
                           prefix_chars="\x01")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triton-tts", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            root = (exc.name or "").split(".")[0]
            if name not in _NEEDS_EXTRA or root not in _OPTIONAL_IMPORTS:
                raise
            _register_missing(sub, name, root)
            continue
        module.register(sub)
    return parser


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.debug, args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except TTSError as exc:
        if args.debug:
            raise
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
