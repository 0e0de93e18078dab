"""The CPU image's entrypoint, run as the container would run it (without Docker): verify -> export -> build-repo ->
serve, on the tiny model; the server must come up and answer a synthesis request, then stop on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import tritonclient.http as httpclient

from model_repository import contract as c
from model_repository.server import free_port


def test_cpu_entrypoint_brings_the_server_up(tiny_model_dir, tiny_export_dir, voice_wav, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_export_dir, cache / "export")  # what a warm cache volume holds; export must see it fresh
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "FLAVOR": "cpu", "MODEL_DIR": str(tiny_model_dir), "CACHE_DIR": str(cache),
           "RUN_DIR": str(tmp_path / "run"), "HTTP_PORT": str(http), "GRPC_PORT": str(grpc),
           "METRICS_PORT": str(metrics)}
    log = open(tmp_path / "entrypoint.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "triton_tts.entrypoint"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                    ready = r.status == 200
            except OSError:
                pass
            if ready:
                break
            time.sleep(0.5)
        assert ready, (tmp_path / "entrypoint.log").read_text(errors="replace")[-3000:]
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        inputs = []
        for field, arr in ((c.TEXT, np.array([b"Hello from the container."], dtype=np.object_)),
                           (c.REFERENCE_AUDIO, np.array([voice_wav.read_bytes()], dtype=np.object_))):
            t = httpclient.InferInput(field.name, [1], field.client_type)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        result = client.infer(c.OFFLINE_MODEL, inputs)
        assert result.as_numpy(c.AUDIO.name).size > 24000
        assert b"up to date" in (tmp_path / "entrypoint.log").read_bytes()  # the warm export was reused
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
    assert proc.returncode is not None


def test_demo_command_runs_the_whole_triton_path(tiny_model_dir, tiny_export_dir, voice_wav, tmp_path, capsys):
    """`make demo`'s command, on a work directory warmed with this session's model and export."""
    import soundfile as sf

    from triton_tts.cli import main as cli

    work = tmp_path / "demo"
    shutil.copytree(tiny_model_dir, work / "tiny-model")
    shutil.copytree(tiny_export_dir, work / "export")
    shutil.copyfile(voice_wav, work / "voice.wav")
    assert cli(["demo", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "time to first audio" in out
    info = sf.info(work / "demo.wav")
    assert info.samplerate == 24000 and info.channels == 1 and info.frames > 24000
