"""Shared fixtures: one tiny preset model directory and one demo voice per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_ref.audio import write_wav
from engine_ref.indextts.presets import demo_voice, write_preset


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module's eager references: on a shared 2-core machine two contending threads made
    tiny-model tensor work up to ~50x slower (modules opt in with `pytestmark = pytest.mark.usefixtures(...)`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_preset("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def voice_wav(tmp_path_factory) -> Path:
    return write_wav(tmp_path_factory.mktemp("audio") / "voice.wav", demo_voice(), 24000)


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """All components of the tiny preset exported (and verified) once per session."""
    from export.pipeline import ExportRequest, run_export

    out = tmp_path_factory.mktemp("tiny-export")
    run_export(ExportRequest(str(tiny_model_dir), out))
    return out


#: the shared tiny server's text limit (tests/test_serving.py checks the refusal just past it)
TINY_SERVER_MAX_TEXT_CHARS = 2000


@pytest.fixture(scope="module")
def tiny_server(tiny_export_dir, tmp_path_factory):
    """A tiny tritonserver per module that only sends it requests (test_serving, test_streaming_chunks). Module
    scope on purpose: a suite run with one server shared by both modules saw it stopped by a SIGTERM of unknown
    origin mid-module (15 failures from one event); a server per module bounds what such an event can break."""
    from model_repository.builder import RepoOptions, build_repository
    from model_repository.server import ServerConfig, TritonServer, free_port

    repo = build_repository(tiny_export_dir, tmp_path_factory.mktemp("tiny-server") / "repo",
                            RepoOptions(max_sequences=8, max_text_chars=TINY_SERVER_MAX_TEXT_CHARS))
    srv = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
    srv.start(timeout_s=240)
    yield srv
    srv.stop()


def _leftover_servers(marker: str) -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and ("tritonserver" in cmd or "triton_python_backend_stub" in cmd):
            out.append(p)
    return out


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any test left a tritonserver or model process behind (then stop them)."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        base = str(factory.getbasetemp())
    except Exception:
        return
    left = _leftover_servers(base)
    if left:
        import psutil

        names = sorted({" ".join(p.info["cmdline"][:2])[:120] for p in left})
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        session.config.get_terminal_writer().line(
            f"FAILED: {len(left)} server process(es) left running by the tests: {names}", red=True)
        session.exitstatus = 1


# --- IndexTTS-2 (tiny-v2) ------------------------------------------------------------------------------------------
# The tiny-v2 preset and its export, once per session, for the served-path tests (tests/test_v2_serving.py).
# The export skips its own parity checks (ExportOptions(verify=False)): tests/test_v2_export.py verifies every graph,
# and the served tests compare the served audio with engine_ref's Synthesizer2 directly, which is the stronger check.


@pytest.fixture(scope="session")
def tiny_v2_model_dir(tmp_path_factory) -> Path:
    from engine_ref.indextts2.presets import write_v2_preset

    return write_v2_preset("tiny-v2", tmp_path_factory.mktemp("models-v2") / "tiny-v2", layout="flat")


@pytest.fixture(scope="session")
def tiny_v2_export_dir(tiny_v2_model_dir, tmp_path_factory) -> Path:
    from export.common import ExportOptions
    from export.pipeline import ExportRequest, run_export

    out = tmp_path_factory.mktemp("tiny-v2-export")
    run_export(ExportRequest(str(tiny_v2_model_dir), out, options=ExportOptions(max_batch=4, verify=False)))
    return out


@pytest.fixture(scope="session")
def v2_voice_wav(tmp_path_factory) -> Path:
    """A 1.5 s speaker reference (the IndexTTS-2 reference path is the slow part of a cold request)."""
    return write_wav(tmp_path_factory.mktemp("audio-v2") / "voice.wav", demo_voice(1.5, 24000), 24000)


# --- IndexTTS-2.5 (tiny-v2.5) --------------------------------------------------------------------------------------
# The tiny-v2.5 preset and ONE verified export per session, shared by tests/test_v25_engine.py, tests/test_v25_export.py
# (which reads the parity every graph recorded) and tests/test_v25_serving.py (served == Synthesizer25).


@pytest.fixture(scope="session")
def tiny_v25_model_dir(tmp_path_factory) -> Path:
    from engine_ref.indextts2.v25.presets import write_v25_preset

    return write_v25_preset("tiny-v2.5", tmp_path_factory.mktemp("models-v25") / "tiny-v2.5")


#: the shared tiny-v2.5 export's batch limit (its graphs are verified up to this many rows)
TINY_V25_MAX_BATCH = 3


@pytest.fixture(scope="session")
def tiny_v25_export_dir(tiny_v25_model_dir, tmp_path_factory) -> Path:
    from export.common import ExportOptions
    from export.pipeline import ExportRequest, run_export

    out = tmp_path_factory.mktemp("tiny-v25-export")
    run_export(ExportRequest(str(tiny_v25_model_dir), out, options=ExportOptions(max_batch=TINY_V25_MAX_BATCH)))
    return out
