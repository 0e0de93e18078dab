"""Start, watch and stop a real tritonserver over a built repository.

Where the server comes from: TRITONSERVER_HOME (a directory with bin/tritonserver and backends/), the NGC
container's /opt/tritonserver, or the `nvidia-pytriton` wheel (CPU machines: tritonserver 2.51 with the Python
backend). For the wheel, a backend directory is assembled beside the repository with the Python-backend stub that
matches this interpreter. Readiness is polled; a model that fails to load is reported by name with Triton's reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from engine_ref.errors import TTSError


class ServerError(TTSError):
    """tritonserver could not be found, did not start, or a model failed to load."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path
    lib_dirs: tuple[Path, ...] = ()


def find_tritonserver() -> TritonInstall:
    home = os.environ.get("TRITONSERVER_HOME")
    candidates = [Path(home)] if home else []
    candidates.append(Path("/opt/tritonserver"))
    for base in candidates:
        if (base / "bin" / "tritonserver").is_file():
            return TritonInstall(base / "bin" / "tritonserver", base / "backends")
    try:
        import pytriton  # the nvidia-pytriton wheel bundles a CPU tritonserver
    except ImportError:
        raise ServerError(
            "tritonserver was not found (no TRITONSERVER_HOME, no /opt/tritonserver, no nvidia-pytriton wheel)",
            "install the serve extra (`pip install 'triton-tts[serve]'`) or run inside the NGC tritonserver image",
        ) from None

    base = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(base / "bin" / "tritonserver", base / "backends", (libs,) if libs.is_dir() else ())


def prepare_backends(install: TritonInstall, work_dir: Path) -> Path:
    """A backend directory whose Python backend has the stub for this interpreter (the wheel ships one per version)."""
    stub_dir = install.backends.parent / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    if not stub_dir.is_dir():
        return install.backends  # NGC image / TRITONSERVER_HOME: the backend dir is complete
    target = work_dir / "backends"
    py = target / "python"
    py.mkdir(parents=True, exist_ok=True)
    for item in (install.backends / "python").iterdir():
        link = py / item.name
        if not link.exists() and item.name != "__pycache__":
            link.symlink_to(item)
    stub = py / "triton_python_backend_stub"
    if not stub.exists():
        shutil.copy2(stub_dir / "triton_python_backend_stub", stub)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerConfig:
    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    exit_timeout_s: int = 5
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"


class TritonServer:
    """A tritonserver process; use as a context manager or call start()/stop()."""

    def __init__(self, config: ServerConfig, install: TritonInstall | None = None):
        self.config = config
        self.install = install or find_tritonserver()
        self.process: subprocess.Popen | None = None
        self._log_handle = None

    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    def command(self, backends: Path) -> list[str]:
        cfg = self.config
        return [
            str(self.install.binary), "--model-repository", str(Path(cfg.repository).resolve()),
            "--backend-directory", str(backends), "--http-port", str(cfg.http_port),
            "--grpc-port", str(cfg.grpc_port), "--metrics-port", str(cfg.metrics_port),
            "--exit-timeout-secs", str(cfg.exit_timeout_s), "--allow-cpu-metrics", "true", *cfg.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.install.lib_dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, self.install.lib_dirs), env.get("LD_LIBRARY_PATH", "")])
        # The Python models' stubs must see this interpreter's environment (the project and its dependencies).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self, wait: bool = True, timeout_s: float = 180) -> "TritonServer":
        work = Path(self.config.repository).resolve().parent / (Path(self.config.repository).name + ".server")
        work.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(self.install, work)
        log_path = self.config.log_file or (work / "tritonserver.log")
        self._log_handle = open(log_path, "wb")
        self.log_path = log_path
        self.process = subprocess.Popen(self.command(backends), stdout=self._log_handle, stderr=subprocess.STDOUT,
                                        env=self.environment(), start_new_session=True)
        if wait:
            self.wait_ready(timeout_s)
        return self

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        url = f"http://{self.http_url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, b""

    def model_states(self) -> list[dict]:
        try:
            req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return []

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.process.returncode} during start-up: "
                                  f"{self._failure_reason()}", f"see {self.log_path}")
            status, _ = self._get("/v2/health/ready")
            if status == 200:
                return
            failed = [m for m in self.model_states() if m.get("state") == "UNAVAILABLE" and m.get("reason")]
            if failed:
                m = failed[0]
                self.stop()
                raise ServerError(f"model '{m['name']}' failed to load: {m['reason'].splitlines()[0][:300]}",
                                  f"see {self.log_path}")
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready within {timeout_s:.0f} s", f"see {self.log_path}")

    def _failure_reason(self) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        load_failures = [ln for ln in lines if "failed to load model" in ln or "Invalid argument" in ln]
        if load_failures:
            return load_failures[0].split("] ", 1)[-1][:300]
        errors = [ln for ln in lines if (ln.startswith("E") or "error" in ln.lower())
                  and not any(k in ln for k in ("NVML", "DCGM", "CudaDriverHelper"))]
        return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:300]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: a busy decoupled model can hold the server for its whole exit timeout."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=self.config.exit_timeout_s + 5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)
        if self._log_handle:
            self._log_handle.close()
        self.process = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
