"""The one console script, `triton-tts`, with a subcommand per task.

Each part of the project registers its own subcommands (engine_ref: preset, verify, download, synth, demo; later
export, build-repo, serve, client, bench). User errors (TTSError) print one line naming the problem and the fix
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
    "triton_tts.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triton-tts", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
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
