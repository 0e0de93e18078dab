"""The client and the gateway without torch: `pip install 'triton-tts[client]'` (or `[gateway]`) brings neither torch
nor onnxruntime, and everything they run imports and works with those made unimportable.

- A subprocess installs a meta-path finder that refuses torch, torchaudio, onnx, onnxruntime, transformers,
  sentencepiece and tensorrt, then imports the client and gateway modules, builds the whole `triton-tts` CLI (the
  engine's commands answer with the install line), encodes MP3 through client.encode, serves the gateway and
  stores a voice — and checks that none of the refused modules slipped in.
- pyproject.toml: the base dependencies and the `client` / `gateway` extras, resolved through their
  self-references and then transitively through the installed packages' own metadata, reach no model runtime;
  `serve`, `export` and `dev` still bring torch, and the Dockerfiles install extras that include the engine.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("torch", "torchaudio", "onnx", "onnxruntime", "onnxruntime-gpu", "transformers", "sentencepiece",
            "tensorrt", "tensorrt-cu12", "nvidia-pytriton")
BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    REFUSED = {"torch", "torchaudio", "onnx", "onnxruntime", "transformers", "sentencepiece", "tensorrt"}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in REFUSED:
                raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
""")


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_the_blocker_really_blocks():
    out = _run("import torch")
    assert out.returncode != 0 and "refused by the test" in out.stderr


def test_client_and_gateway_import_and_run_without_torch(tmp_path):
    out = _run(f"""
        import io, sys
        import numpy as np
        import client, client.session, client.request, client.encode, client.commands, client.longform
        import gateway.app, gateway.cli, gateway.speech, gateway.voices, gateway.triton, gateway.audio
        import engine_ref.pcm, model_repository.contract
        from triton_tts.cli import build_parser, main

        # The whole CLI builds; client and gateway commands parse; the engine's say what to install.
        parser = build_parser()
        args = parser.parse_args(["client", "synth", "--text", "hi", "--ref", "v.wav", "--out", "o.mp3"])
        assert args.func.__name__ == "cmd_synth"
        assert parser.parse_args(["gateway", "--triton", "h:1"]).func.__name__ == "cmd_gateway"
        assert main(["export", "--model", "m", "--out", "o"]) == 2

        # PyAV encoding in the client: MP3 written and readable.
        from client.encode import write_audio
        pcm = (np.sin(np.arange(24000) / 7) * 9000).astype(np.int16)
        path = write_audio(r"{tmp_path}/x.mp3", pcm, 24000)
        import av
        with av.open(str(path)) as f:
            assert f.format.name == "mp3" and sum(fr.samples for fr in f.decode(audio=0)) >= 24000

        # The gateway app starts and stores a voice (decoded by soundfile/PyAV, not engine_ref.audio).
        from fastapi.testclient import TestClient
        from gateway.settings import GatewaySettings
        app = gateway.app.create_app(GatewaySettings(data_dir=r"{tmp_path}/gw", triton_url="127.0.0.1:1"))
        with TestClient(app) as http:
            from engine_ref.pcm import wav_bytes
            r = http.post("/v1/audio/voices", data={{"name": "v"}},
                          files={{"audio": ("v.wav", wav_bytes(pcm.astype(np.float32) / 32768, 24000))}})
            assert r.status_code == 201, r.text
            assert http.get("/healthz").status_code == 200

        leaked = sorted(m for m in sys.modules if m.split(".")[0] in
                        {{"torch", "onnxruntime", "onnx", "transformers", "sentencepiece"}})
        assert not leaked, leaked
        print("TORCH-FREE OK")
    """)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "TORCH-FREE OK" in out.stdout
    assert "which is not installed" in out.stderr and "pip install 'triton-tts[export]'" in out.stderr


def test_the_gateway_command_serves_without_torch(tmp_path):
    from model_repository.server import free_port

    port = free_port()
    out = _run(f"""
        import threading, time, urllib.request, sys
        from triton_tts.cli import main
        t = threading.Thread(target=main, args=(["gateway", "--triton", "127.0.0.1:1", "--port", "{port}",
                                                 "--data-dir", r"{tmp_path}"],), daemon=True)
        t.start()
        for _ in range(200):
            try:
                with urllib.request.urlopen("http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("the gateway did not answer")
        assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
        print("SERVED")
    """)
    assert out.returncode == 0 and "SERVED" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- dependencies


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared(extras: tuple[str, ...]) -> set[str]:
    """Requirement strings of the base plus `extras`, following `triton-tts[...]` self-references."""
    project = _project()
    name = canonicalize_name(project["name"])
    out, seen, todo = set(project["dependencies"]), set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for spec in project["optional-dependencies"][extra]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == name:
                todo.extend(req.extras)
            else:
                out.add(spec)
    return out


def _closure(requirements: set[str]) -> set[str]:
    """Distribution names reachable from `requirements` through installed metadata (markers evaluated)."""
    reached: set[str] = set()
    todo = [(Requirement(r), frozenset()) for r in requirements]
    while todo:
        req, _ = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        dist = canonicalize_name(req.name)
        key = f"{dist}[{','.join(sorted(req.extras))}]"
        if key in reached:
            continue
        reached.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here: only its declared name counts
        for spec in requires:
            child = Requirement(spec)
            env_extras = [""] + sorted(req.extras)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in env_extras):
                child.marker = None
                todo.append((child, frozenset()))
    return {k.split("[")[0] for k in reached}


@pytest.mark.parametrize("extras", [(), ("client",), ("gateway",)])
def test_client_and_gateway_extras_bring_no_model_runtime(extras):
    declared = {canonicalize_name(Requirement(r).name) for r in _declared(extras)}
    assert not declared & {canonicalize_name(r) for r in RUNTIMES}, declared
    reached = _closure(_declared(extras))
    assert not reached & {canonicalize_name(r) for r in RUNTIMES}, sorted(reached & set(RUNTIMES))
    if extras:
        assert {"tritonclient", "av"} <= reached
    if extras == ("gateway",):
        assert {"fastapi", "uvicorn", "python-multipart", "prometheus-client"} <= reached


@pytest.mark.parametrize("extras", [("serve",), ("export",), ("dev",), ("bench",), ("engine",)])
def test_engine_side_extras_still_bring_torch(extras):
    declared = {canonicalize_name(Requirement(r).name) for r in _declared(extras)}
    assert "torch" in declared and "transformers" in declared


def test_images_and_make_install_what_they_run():
    cpu = (ROOT / "Dockerfile.cpu").read_text().replace("\\\n", " ")
    gpu = (ROOT / "Dockerfile.triton").read_text().replace("\\\n", " ")
    cpu_extras = re.search(r'pip install [^\n]*"/opt/triton-tts\[([a-z,]+)\]"', cpu).group(1).split(",")
    gpu_extras = re.search(r'pip install [^\n]*"/opt/triton-tts\[([a-z,]+)\]"', gpu).group(1).split(",")
    for extras in (cpu_extras, gpu_extras):
        declared = {canonicalize_name(Requirement(r).name) for r in _declared(tuple(extras))}
        assert {"torch", "fastapi", "tritonclient"} <= declared, extras  # the engine and the gateway
    assert "onnxruntime" in {canonicalize_name(Requirement(r).name) for r in _declared(tuple(cpu_extras))}
    assert "'.[dev]'" in (ROOT / "Makefile").read_text()
