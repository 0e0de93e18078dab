"""Shared pieces of the gateway tests: a real tritonserver on the tiny model and a real gateway on a free port.

The gateway runs under uvicorn in a thread of the test process (its own event loop), or as a subprocess
(`start_gateway_process`, for tests that kill it). Both listen on 127.0.0.1 and a free port; `url` is the base.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_repository.builder import RepoOptions, build_repository
from model_repository.server import ServerConfig, TritonServer, free_port

#: Deterministic generation: the same request gives the same audio, so formats can be compared.
GREEDY = {"do_sample": False, "num_beams": 1, "seed": 0}


def start_triton(export_dir: Path, work: Path, **options) -> TritonServer:
    repo = build_repository(export_dir, work / "repo", RepoOptions(**options))
    server = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
    server.start(timeout_s=240)
    return server


@dataclass
class GatewayThread:
    server: object  # uvicorn.Server
    thread: threading.Thread
    port: int
    app: object

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_gateway(settings) -> GatewayThread:
    """create_app(settings) under uvicorn in a daemon thread; returns once it accepts connections."""
    import uvicorn

    from gateway.app import create_app

    port = free_port()
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.05)
    return GatewayThread(server, thread, port, app)


@dataclass
class GatewayProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway_process(triton_url: str, data_dir: Path, *args: str, env: dict | None = None,
                          timeout_s: float = 60) -> GatewayProcess:
    """`triton-tts gateway` as a child process (its log beside data_dir); returns once /healthz answers."""
    port = free_port()
    log_path = Path(data_dir).with_name(Path(data_dir).name + f".gateway-{port}.log")
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "triton_tts", "gateway", "--triton", triton_url, "--port", str(port),
           "--data-dir", str(data_dir), *args]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    log.close()
    handle = GatewayProcess(proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{handle.url}/healthz", timeout=2) as r:
                if r.status == 200:
                    return handle
        except OSError:
            pass
        if time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError(f"the gateway did not answer within {timeout_s:g} s: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)


def decode(data: bytes) -> tuple[np.ndarray, int, str]:
    """(float32 mono samples, sample rate, container name) of an encoded file, decoded with PyAV."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        pieces = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                pieces.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            pieces.append(out.to_ndarray().reshape(-1))
        name = container.format.name
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), rate, name


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x.astype(np.float64))))) if x.size else 0.0
