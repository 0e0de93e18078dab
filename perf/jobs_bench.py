"""A long-form job through the gateway vs the same text as one gRPC stream, on one server.

    python -m perf.jobs_bench --export-dir build/export-tiny              # builds a repository, starts Triton
    python -m perf.jobs_bench --triton 127.0.0.1:8001 --voice voice.wav   # an already running server

Both sides synthesize the same deterministic text (20,000 characters by default, in chapters of paragraphs) with
the same voice and greedy decoding. The job side is what a user of POST /v1/audio/jobs waits for: submit ->
state succeeded (planning, parts synthesized `parts_in_flight` at a time, each written to disk, then the file
encoded); the direct side is one `tts` request streamed to its final response (no encoding). The ratio says what
durability, chapters and encoding cost. The server must accept the whole text in one request (max_text_chars at
least the text's length; the repository's default is 20,000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["bench_text", "main"]

_WORDS = ("river stone lantern meadow quiet window harbor candle morning garden silver thunder orchard pebble "
          "valley ember winter violet across beneath slowly always").split()


def bench_text(chars: int, seed: int = 0) -> str:
    """Prose of about `chars` characters: chapters ("# Chapter N") of paragraphs of sentences."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    size, chapter = 0, 0
    while size < chars:
        if chapter == 0 or rng.random() < 0.08:
            chapter += 1
            out.append(f"# Chapter {chapter}")
        sentences = []
        for _ in range(int(rng.integers(2, 5))):
            words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), int(rng.integers(5, 11)))]
            sentences.append(" ".join(words).capitalize() + ".")
        out.append(" ".join(sentences))
        size = len("\n\n".join(out))
    text = "\n\n".join(out)
    return text[:chars].rsplit(" ", 1)[0].rstrip(",;") + "."


async def _direct(triton_url: str, text: str, voice: bytes, params: dict) -> dict:
    from gateway.triton import TritonTTS

    async with TritonTTS(triton_url, timeout_s=600) as tts:
        start = time.perf_counter()
        samples, rate, first, segments = 0, 0, None, 0
        async for chunk in tts.stream(text, voice, None, params):
            if first is None and chunk.pcm.size:
                first = time.perf_counter() - start
            samples += int(chunk.pcm.size)
            rate = chunk.sample_rate
            segments = chunk.segment_count
        return {"wall_s": time.perf_counter() - start, "first_audio_s": first, "audio_s": samples / rate,
                "segments": segments}


def _job(triton_url: str, text: str, voice_path: Path, params: dict, fmt: str, data_dir: Path) -> dict:
    import httpx
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from model_repository.server import free_port

    settings = GatewaySettings(triton_url=triton_url, data_dir=data_dir, port=free_port(), request_timeout_s=600,
                               max_requests_per_minute=100_000)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=120) as http:
            r = http.post("/v1/audio/voices", data={"name": "bench"},
                          files={"audio": (voice_path.name, voice_path.read_bytes(), "audio/wav")})
            r.raise_for_status()
            start = time.perf_counter()
            r = http.post("/v1/audio/jobs", json={"input": text, "voice": "bench", "format": fmt, **params})
            r.raise_for_status()
            job_id = r.json()["id"]
            encoding_at = None
            while True:
                job = http.get(f"/v1/audio/jobs/{job_id}").json()
                if job["state"] == "encoding" and encoding_at is None:
                    encoding_at = time.perf_counter() - start
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.25)
            wall = time.perf_counter() - start
            if job["state"] != "succeeded":
                raise RuntimeError(f"the job ended {job['state']}: {job.get('error')}")
        return {"wall_s": wall, "synthesis_s": encoding_at, "audio_s": job["result"]["duration_s"],
                "parts": job["parts"]["total"], "segments": job["segments"]["total"], "chapters": len(job["chapters"]),
                "bytes": job["result"]["bytes"], "format": fmt}
    finally:
        server.should_exit = True
        thread.join(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.jobs_bench", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--export-dir", help="an export (triton-tts export) to build a repository from and serve")
    where.add_argument("--triton", help="gRPC host:port of a running server")
    p.add_argument("--voice", help="reference WAV (default: engine_ref's demo voice)")
    p.add_argument("--chars", type=int, default=20_000)
    p.add_argument("--format", default="m4b", choices=("m4b", "mp3", "opus", "flac", "wav"))
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    server = None
    try:
        voice = Path(args.voice) if args.voice else None
        if voice is None:
            from engine_ref.pcm import write_wav  # torch-free
            from engine_ref.indextts.presets import demo_voice

            voice = write_wav(work / "voice.wav", demo_voice(), 24000)
        if args.export_dir:
            from model_repository.builder import RepoOptions, build_repository
            from model_repository.server import ServerConfig, TritonServer, free_port

            repo = build_repository(Path(args.export_dir), work / "repo", RepoOptions())
            server = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
            server.start(timeout_s=300)
            triton_url = server.grpc_url
        else:
            triton_url = args.triton
        text = bench_text(args.chars)
        params = {"do_sample": False, "num_beams": 1}
        print(f"text: {len(text)} characters; server {triton_url}", file=sys.stderr, flush=True)
        direct = asyncio.run(_direct(triton_url, text, voice.read_bytes(), params))
        print(f"one gRPC stream: {direct['wall_s']:.1f} s for {direct['audio_s']:.1f} s of audio", file=sys.stderr,
              flush=True)
        job = _job(triton_url, text, voice, params, args.format, work / "gateway")
        print(f"job ({args.format}): {job['wall_s']:.1f} s for {job['audio_s']:.1f} s of audio", file=sys.stderr,
              flush=True)
        result = {"characters": len(text), "direct_stream": direct, "job": job,
                  "job_vs_stream": job["wall_s"] / direct["wall_s"], "machine": os.uname().nodename,
                  "cpus": os.cpu_count()}
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
