"""Gateway benchmark: time to first audio through the gateway vs direct gRPC on the same server, and N concurrent
speech requests through the gateway.

    python -m perf.gateway_bench --export build/demo/export        # starts tritonserver (tiny) and a gateway
    python -m perf.gateway_bench --triton 127.0.0.1:8001           # an already running server

Direct: client.TTSClient's gRPC stream, time to the first non-empty chunk. Gateway: POST /v1/audio/speech to a
gateway *process* (as deployed; the client shares no interpreter with it), time to the first body bytes, for
response_format pcm (no encoding) and mp3. Runs are interleaved, in a rotating order, after a warm-up, so server
load and caches affect all three alike; every request is read to its end (none is cancelled); medians and p90 are reported, and the target
``median_gateway <= 1.1 * median_direct + 20 ms`` is checked. Then `--concurrency` requests at once (mp3, whole
bodies) with their failures, TTFA and wall time. Results go to stdout and, with --out, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

TEXT = "The quick brown fox jumps over the lazy dog, and then it rests for a while."


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": 1000 * statistics.median(values), "p90_ms": 1000 * _percentile(values, 0.9),
            "min_ms": 1000 * min(values), "n": len(values)}


def _start_server(export_dir: Path, work: Path, max_sequences: int) -> Any:
    from model_repository.builder import RepoOptions, build_repository
    from model_repository.server import ServerConfig, TritonServer, free_port

    repo = build_repository(export_dir, work / "repo", RepoOptions(max_sequences=max_sequences))
    server = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
    server.start(timeout_s=300)
    return server


def _start_gateway(triton_url: str, data_dir: Path, concurrency: int) -> tuple[subprocess.Popen, str]:
    from model_repository.server import free_port

    port = free_port()
    env = {**os.environ, "TTS_GATEWAY_MAX_CONCURRENT_PER_KEY": str(max(64, 2 * concurrency)),
           "TTS_GATEWAY_MAX_REQUESTS_PER_MINUTE": "100000"}
    proc = subprocess.Popen([sys.executable, "-m", "triton_tts", "gateway", "--triton", triton_url, "--port",
                             str(port), "--data-dir", str(data_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the gateway did not start")


def _direct_ttfa(tts: Any, voice: bytes, params: dict) -> float:
    """Read the whole stream like the gateway runs do (leaving early would cancel, and the cancellation would
    land on the next measurement)."""
    stream = tts.synthesize_stream(TEXT, voice, params=params)
    stream.collect()
    if stream.timings.first_audio_s is None:
        raise RuntimeError("no audio")
    return stream.timings.first_audio_s


def _gateway_ttfa(http: Any, url: str, fmt: str, params: dict) -> tuple[float, float, int]:
    body = {"model": "tts-1", "voice": "bench", "input": TEXT, "response_format": fmt, **params}
    start = time.perf_counter()
    first = None
    size = 0
    with http.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=300) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"status {resp.status_code}: {resp.read()[:200]!r}")
        for piece in resp.iter_raw():
            if piece and first is None:
                first = time.perf_counter() - start
            size += len(piece)
    return first, time.perf_counter() - start, size


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from client import ClientConfig, TTSClient
    from engine_ref.indextts.presets import demo_voice
    from engine_ref.pcm import wav_bytes

    params = {"do_sample": False, "num_beams": 1, "seed": 0}
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    server = None
    if args.triton:
        triton_url = args.triton
    else:
        server = _start_server(Path(args.export), work, args.max_sequences)
        triton_url = server.grpc_url
    gateway, url = _start_gateway(triton_url, work / "gateway-data", args.concurrency)
    voice = wav_bytes(demo_voice(), 24000)
    result: dict[str, Any] = {"triton": triton_url, "text_chars": len(TEXT), "runs": args.runs}
    try:
        with httpx.Client(timeout=300) as http, TTSClient(ClientConfig(grpc_url=triton_url)) as tts:
            http.post(f"{url}/v1/audio/voices", data={"name": "bench"},
                      files={"audio": ("v.wav", voice)}).raise_for_status()
            for _ in range(args.warmup):
                _direct_ttfa(tts, voice, params)
                _gateway_ttfa(http, url, "pcm", params)
                _gateway_ttfa(http, url, "mp3", params)
            samples: dict[str, list[float]] = {"direct": [], "pcm": [], "mp3": []}
            measure = {"direct": lambda: _direct_ttfa(tts, voice, params),
                       "pcm": lambda: _gateway_ttfa(http, url, "pcm", params)[0],
                       "mp3": lambda: _gateway_ttfa(http, url, "mp3", params)[0]}
            order = list(measure)
            for i in range(args.runs):
                for name in order[i % 3:] + order[:i % 3]:  # rotate: no kind always follows the same one
                    samples[name].append(measure[name]())
            direct, pcm, mp3 = samples["direct"], samples["pcm"], samples["mp3"]
        d, p, m = _summary(direct), _summary(pcm), _summary(mp3)
        target_ms = 1.1 * d["median_ms"] + 20
        result["ttfa"] = {"direct_grpc": d, "gateway_pcm": p, "gateway_mp3": m, "target_ms": target_ms,
                          "pcm_within_target": p["median_ms"] <= target_ms,
                          "mp3_within_target": m["median_ms"] <= target_ms}
        result["concurrent"] = _concurrent(url, args.concurrency, params)
    finally:
        gateway.terminate()
        try:
            gateway.wait(timeout=20)
        except subprocess.TimeoutExpired:
            gateway.kill()
        if server is not None:
            server.stop()
    return result


def _concurrent(url: str, n: int, params: dict) -> dict[str, Any]:
    import httpx

    outcomes: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            barrier.wait()
            try:
                outcomes[i] = _gateway_ttfa(http, url, "mp3", params)
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                outcomes[i] = exc

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [o for o in outcomes if isinstance(o, tuple) and o[2] > 0]
    failures = [repr(o)[:200] for o in outcomes if not (isinstance(o, tuple) and o[2] > 0)]
    return {"requests": n, "failures": len(failures), "failure_samples": failures[:3], "wall_s": wall,
            "ttfa": _summary([o[0] for o in ok]) if ok else None,
            "total": _summary([o[1] for o in ok]) if ok else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--export", help="an export directory: start tritonserver on it")
    where.add_argument("--triton", help="gRPC host:port of a running server")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-sequences", type=int, default=8, help="decoder batch of the started server")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    t = result["ttfa"]
    print(f"TTFA median: direct {t['direct_grpc']['median_ms']:.1f} ms, gateway pcm {t['gateway_pcm']['median_ms']:.1f} "
          f"ms, mp3 {t['gateway_mp3']['median_ms']:.1f} ms (target <= {t['target_ms']:.1f} ms); "
          f"{result['concurrent']['requests']} concurrent: {result['concurrent']['failures']} failures, "
          f"wall {result['concurrent']['wall_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
