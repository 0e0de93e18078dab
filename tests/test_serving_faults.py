"""Faults that need a server of their own (tiny preset, real tritonserver): a killed model process, signals to
`triton-tts serve` and its parent's death, and graphs altered after the repository was built."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from export.manifest import read_manifest
from model_repository import contract as c
from model_repository.builder import build_repository
from model_repository.server import ServerConfig, ServerError, TritonServer, free_port
from tests.test_serving import GREEDY, stream


def _ready(url: str) -> int:
    try:
        return urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2).status
    except Exception:
        return 0


def _server_processes(marker: str) -> list[psutil.Process]:
    """tritonserver and stub processes whose command line names `marker` (a repository path)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and ("tritonserver" in cmd or "triton_python_backend_stub" in cmd):
            out.append(p)
    return out


def test_a_killed_decoder_process_takes_the_server_down_and_errors_in_flight_requests(
        tiny_export_dir, tmp_path, voice_wav):
    repo = build_repository(tiny_export_dir, tmp_path / "repo")
    srv = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
    srv.start(timeout_s=240)
    try:
        audio = voice_wav.read_bytes()
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("r", stream(
            srv, "A long text that keeps the decoder busy for a while. " * 8, audio,
            max_text_tokens_per_segment=12, max_mel_tokens=400, **GREEDY)))
        t.start()
        time.sleep(1.0)
        decoder_pid = srv.stub_processes()[c.DECODER][0]
        os.kill(decoder_pid, signal.SIGKILL)
        killed = time.monotonic()
        while _ready(srv.http_url) == 200 and time.monotonic() - killed < 10:
            time.sleep(0.1)
        not_ready_after = time.monotonic() - killed
        t.join(timeout=30)
        errored_after = time.monotonic() - killed
        assert not_ready_after < 10, not_ready_after
        assert box["r"].error is not None and errored_after < 10, (box["r"], errored_after)
        assert srv.fault and c.DECODER in srv.fault
        gone_by = time.monotonic() + 20  # the watchdog's kill (SIGTERM, 1 s grace, SIGKILL, the stubs) may still run
        while _server_processes(str(repo)) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not _server_processes(str(repo))  # every stub went with the server
    finally:
        srv.stop()


def _serve(repo: Path, ports: tuple[int, int, int], parent_shell: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "triton_tts", "serve", "--repo", str(repo), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--timeout", "240"]
    if parent_shell:  # serve as the child of a shell that we then kill outright
        cmd = ["/bin/sh", "-c", " ".join(f"'{a}'" for a in cmd) + " & wait"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ready(url) == 200:
            return
        if proc.poll() is not None:
            pytest.fail(f"serve exited early: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.25)
    pytest.fail("serve was not ready in time")


# SIGHUP and SIGINT go through the same handler as SIGTERM (model_repository/commands.py installs one `_raise_stop`
# for all three), so SIGTERM stands for them here; each case costs a full server start-up (~25 s).
@pytest.mark.parametrize("how", ["SIGTERM", "parent killed"])
def test_serve_stops_tritonserver_and_every_stub(tiny_export_dir, tmp_path, how):
    repo = build_repository(tiny_export_dir, tmp_path / "repo")
    ports = (free_port(), free_port(), free_port())
    proc = _serve(repo, ports, parent_shell=how == "parent killed")
    try:
        _wait_ready(f"127.0.0.1:{ports[0]}", proc)
        assert _server_processes(str(repo))
        if how == "parent killed":
            os.kill(proc.pid, signal.SIGKILL)  # the shell dies at once; serve learns it from PR_SET_PDEATHSIG
        else:
            proc.send_signal(getattr(signal, how))
        deadline = time.monotonic() + 30
        while _server_processes(str(repo)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _server_processes(str(repo))
        assert not left, [p.info["cmdline"][:2] for p in left]
        if how != "parent killed":
            assert proc.wait(timeout=30) == 0
    finally:
        for p in _server_processes(str(repo)):
            p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_binds_loopback_by_default(tiny_export_dir, tmp_path):
    srv = TritonServer(ServerConfig(tmp_path / "unused"))
    cmd = srv.command(tmp_path)
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert cmd[cmd.index(flag) + 1] == "127.0.0.1"
    restricted = cmd[cmd.index("--http-restricted-api") + 1]
    assert restricted.startswith("logging,model-repository,trace,shared-memory:tts-admin-key=")


# One flipped bit: the smallest change the sha256 check must catch (a truncated graph fails the same check, before
# ONNX Runtime ever parses it; each case costs a full server start-up).
@pytest.mark.parametrize("damage", ["tampered"])
def test_a_graph_altered_after_the_build_is_refused_at_load_by_name(tiny_export_dir, tmp_path, damage):
    export = tmp_path / "export"
    shutil.copytree(tiny_export_dir, export)
    repo = build_repository(export, tmp_path / "repo")
    voc = export / read_manifest(export).component("vocoder").file
    data = voc.read_bytes()
    voc.write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if damage == "tampered" else data[: len(data) // 2])
    srv = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"model 'vocoder' failed to load: .*sha256"):
        srv.start(timeout_s=240)
    assert time.monotonic() - t0 < 120
    assert not _server_processes(str(repo))
