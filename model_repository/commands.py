"""Serving subcommands: `build-repo` (fill the templates from a manifest) and `serve` (run tritonserver)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from model_repository import SPIN_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-repo", help="write a Triton model repository from an export manifest")
    p.add_argument("--export", required=True, help="export directory (with manifest.json)")
    p.add_argument("--out", required=True, help="repository directory to (re)create")
    p.add_argument("--flavor", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--plans", help="gpu: plans.json from `triton-tts build-plans`")
    p.add_argument("--max-sequences", type=int, default=8, help="sequences decoded together (the rest queue)")
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--decoder-precision", default="fp32", help="fp32, or a variant in the manifest (int8, int4, fp16)")
    p.add_argument("--instances", type=int, default=1, help="instances of the BLS and preprocessing models")
    p.add_argument("--leaf-instances", type=int, default=1, help="instances of cond_encoder and vocoder")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per session (0: default)")
    p.add_argument("--spin-threads", choices=SPIN_CHOICES, default="all",
                   help="whose ONNX Runtime threads busy-wait between ops (default all: fastest when the node is ours)")
    p.add_argument("--max-text-chars", type=int, default=20000)
    p.add_argument("--speaker-cache-size", type=int, default=64)
    p.add_argument("--segments-in-flight", type=int, default=4)
    p.add_argument("--chunk-first-codes", type=int, default=None,
                   help="chunked streaming: codes in a segment's first chunk (0: one chunk per segment)")
    p.add_argument("--chunk-max-codes", type=int, default=None, help="chunked streaming: the largest chunk")
    p.set_defaults(func=cmd_build_repo)

    p = sub.add_parser("serve", help="start tritonserver on a built repository and wait until it is ready")
    p.add_argument("--repo", required=True)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--bind", default="127.0.0.1",
                   help="address the HTTP, gRPC and metrics endpoints listen on (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 for every interface, as in containers)")
    p.add_argument("--host", default=None, help="where readiness is polled (default: the bind address, or "
                                                "127.0.0.1 when binding every interface)")
    p.add_argument("--admin-key", default=os.environ.get("TTS_ADMIN_KEY"),
                   help="key (header tts-admin-key) for Triton's logging, model-repository, trace and shared-memory "
                        "APIs (default: $TTS_ADMIN_KEY, else a random one per start)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness")
    p.add_argument("--exec", action="store_true",
                   help="replace this process by tritonserver (no watchdog: a dead model then goes unnoticed)")
    p.set_defaults(func=cmd_serve)


def cmd_build_repo(args: argparse.Namespace) -> int:
    from model_repository.builder import RepoOptions, build_repository

    opts = RepoOptions(
        flavor=args.flavor, max_sequences=args.max_sequences, max_queue=args.max_queue,
        decoder_precision=args.decoder_precision, bls_instances=args.instances, leaf_instances=args.leaf_instances,
        threads=args.threads, spin_threads=args.spin_threads, max_text_chars=args.max_text_chars, speaker_cache_size=args.speaker_cache_size,
        segments_in_flight=args.segments_in_flight, plans_index=Path(args.plans) if args.plans else None,
        **{k: v for k, v in (("chunk_first_codes", args.chunk_first_codes), ("chunk_max_codes", args.chunk_max_codes))
           if v is not None},
    )
    repo = build_repository(args.export, args.out, opts)
    print(f"wrote {args.flavor} repository to {repo}")
    return 0


class _Stop(Exception):
    """A termination signal arrived."""


def _raise_stop(signum, _frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run tritonserver until a signal (SIGTERM, SIGINT, SIGHUP), our parent's death, or a dead model.

    Exit status: 0 after a signal, 3 when the watchdog stopped the server (a model process died), 1 when
    tritonserver exited by itself. Every path stops tritonserver and its stub processes.
    """
    from model_repository.server import ServerConfig, TritonServer, die_with_parent, prepare_backends

    host = args.host or ("127.0.0.1" if args.bind in ("0.0.0.0", "::", "") else args.bind)
    server = TritonServer(ServerConfig(Path(args.repo), args.http_port, args.grpc_port, args.metrics_port,
                                       host=host, bind=args.bind, admin_key=args.admin_key))
    if args.exec:
        work = Path(args.repo).resolve().parent / (Path(args.repo).name + ".server")
        work.mkdir(parents=True, exist_ok=True)
        cmd = server.command(prepare_backends(server.install, work))
        os.execve(cmd[0], cmd, server.environment())
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    die_with_parent(signal.SIGTERM)  # a killed parent (a shell, a test runner) must not leave the server behind
    try:
        server.start(timeout_s=args.timeout)
        key_note = "" if args.admin_key else " (admin APIs: a random key, set --admin-key to use them)"
        print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}  "
              f"bound to {args.bind}{key_note}; Ctrl-C stops", flush=True)
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        if server.fault:
            print(f"stopped: {server.fault}", file=sys.stderr, flush=True)
            return 3
        print("tritonserver exited", file=sys.stderr, flush=True)
        return 1
    except _Stop as stop:
        print(f"{stop}: stopping tritonserver", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
