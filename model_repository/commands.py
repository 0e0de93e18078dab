"""Serving subcommands: `build-repo` (fill the templates from a manifest) and `serve` (run tritonserver)."""

from __future__ import annotations

import argparse
import os
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
    p.set_defaults(func=cmd_build_repo)

    p = sub.add_parser("serve", help="start tritonserver on a built repository and wait until it is ready")
    p.add_argument("--repo", required=True)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--host", default="127.0.0.1", help="where readiness is polled")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness")
    p.add_argument("--exec", action="store_true", help="replace this process by tritonserver (containers)")
    p.set_defaults(func=cmd_serve)


def cmd_build_repo(args: argparse.Namespace) -> int:
    from model_repository.builder import RepoOptions, build_repository

    opts = RepoOptions(
        flavor=args.flavor, max_sequences=args.max_sequences, max_queue=args.max_queue,
        decoder_precision=args.decoder_precision, bls_instances=args.instances, leaf_instances=args.leaf_instances,
        threads=args.threads, spin_threads=args.spin_threads, max_text_chars=args.max_text_chars, speaker_cache_size=args.speaker_cache_size,
        segments_in_flight=args.segments_in_flight, plans_index=Path(args.plans) if args.plans else None,
    )
    repo = build_repository(args.export, args.out, opts)
    print(f"wrote {args.flavor} repository to {repo}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from model_repository.server import ServerConfig, TritonServer, prepare_backends

    server = TritonServer(ServerConfig(Path(args.repo), args.http_port, args.grpc_port, args.metrics_port,
                                       host=args.host))
    if args.exec:
        work = Path(args.repo).resolve().parent / (Path(args.repo).name + ".server")
        work.mkdir(parents=True, exist_ok=True)
        cmd = server.command(prepare_backends(server.install, work))
        os.execve(cmd[0], cmd, server.environment())
    server.start(timeout_s=args.timeout)
    print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}  (Ctrl-C stops)")
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
        print("tritonserver exited")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
