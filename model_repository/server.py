"""Start, watch and stop a real tritonserver over a built repository.

Where the server comes from: TRITONSERVER_HOME (a directory with bin/tritonserver and backends/), the NGC
container's /opt/tritonserver, or the `nvidia-pytriton` wheel (CPU machines: tritonserver 2.51 with the Python
backend). For the wheel, a backend directory is assembled beside the repository with the Python-backend stub that
matches this interpreter.

Closed by default: the three endpoints bind 127.0.0.1 unless told otherwise; the logging, model-repository, trace
and shared-memory APIs need the admin key header; internal models need a per-start secret that only the server's
own models know (passed to them through the environment).

Start-up fails as soon as Triton logs that a model failed to load, naming the model and the reason. Once ready,
a watchdog follows every Python-backend stub process: Triton 2.51 neither restarts a stub that died nor changes its
readiness (measured: a `kill -9`ed decoder stub left /v2/health/ready at 200 and new requests hanging), so a dead
stub makes the watchdog stop the whole server and record why; `triton-tts serve` then exits non-zero and the
orchestrator (Kubernetes) restarts the pod. In-flight requests get an error when the server goes, within seconds.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


#: HTTP header (gRPC metadata key) that carries the admin key for the restricted APIs.
ADMIN_HEADER = "tts-admin-key"
#: Triton APIs only an operator may call (switching logging off, loading/unloading models, tracing, shared memory).
RESTRICTED_APIS = ("logging", "model-repository", "trace", "shared-memory")
#: Environment variable of the internal-model secret (see model_repository/models/base.py).
INTERNAL_KEY_ENV = "TTS_INTERNAL_KEY"
_LOAD_FAILURE = re.compile(r"failed to load '([^']+)'(?: version \d+)?: (.*)")


@dataclass
class ServerConfig:
    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    exit_timeout_s: int = 5
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"  # where this process reaches the server
    bind: str = "127.0.0.1"  # where the server listens ("0.0.0.0": every interface, as containers need)
    admin_key: str | None = None  # the restricted APIs' key (None: a random one per start)
    watchdog_s: float = 0.5  # how often stub processes are checked once ready (0: no watchdog)


class TritonServer:
    """A tritonserver process; use as a context manager or call start()/stop()."""

    def __init__(self, config: ServerConfig, install: TritonInstall | None = None):
        self.config = config
        self.install = install or find_tritonserver()
        self.process: subprocess.Popen | None = None
        self._log_handle = None
        self.admin_key = config.admin_key or secrets.token_hex(16)
        self.internal_key = os.environ.get(INTERNAL_KEY_ENV) or secrets.token_hex(16)
        self.fault: str | None = None  # why the watchdog stopped the server
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {ADMIN_HEADER: self.admin_key}

    def command(self, backends: Path) -> list[str]:
        cfg = self.config
        restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}"
        return [
            str(self.install.binary), "--model-repository", str(Path(cfg.repository).resolve()),
            "--backend-directory", str(backends), "--http-port", str(cfg.http_port),
            "--grpc-port", str(cfg.grpc_port), "--metrics-port", str(cfg.metrics_port),
            "--http-address", cfg.bind, "--grpc-address", cfg.bind, "--metrics-address", cfg.bind,
            "--http-restricted-api", restricted, "--grpc-restricted-protocol", restricted,
            "--exit-timeout-secs", str(cfg.exit_timeout_s), "--allow-cpu-metrics", "true", *cfg.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env[INTERNAL_KEY_ENV] = self.internal_key
        lib_dirs = [*map(str, _interpreter_lib_dirs()), *map(str, self.install.lib_dirs)]
        if lib_dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*lib_dirs, env.get("LD_LIBRARY_PATH", "")])
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
        self.fault = None
        self._stopping.clear()
        # The server dies with this process even when it is killed outright (PR_SET_PDEATHSIG follows the thread
        # that forked, so only the main thread asks for it).
        on_main = threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(self.command(backends), stdout=self._log_handle, stderr=subprocess.STDOUT,
                                        env=self.environment(), start_new_session=True,
                                        preexec_fn=_die_with_parent if on_main else None)
        if wait:
            self.wait_ready(timeout_s)
            self.start_watchdog()
        return self

    # --- the watchdog -------------------------------------------------------------------------------------------
    def stub_processes(self) -> dict[str, list[int]]:
        """Python-backend stub PIDs of this server, by model name (from the stub's model.py argument)."""
        import psutil

        out: dict[str, list[int]] = {}
        if self.process is None:
            return out
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return out
        for child in children:
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].endswith("triton_python_backend_stub") and len(cmd) > 1:
                out.setdefault(Path(cmd[1]).parent.parent.name, []).append(child.pid)
        return out

    def start_watchdog(self) -> None:
        if self.config.watchdog_s <= 0 or self._watchdog is not None and self._watchdog.is_alive():
            return
        expected = self.stub_processes()
        self._watchdog = threading.Thread(target=self._watch, args=(expected,), name="triton-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self, expected: dict[str, list[int]]) -> None:
        import psutil

        while not self._stopping.wait(self.config.watchdog_s):
            proc = self.process
            if proc is None or proc.poll() is not None:
                return
            for model, pids in expected.items():
                dead = [p for p in pids if not _alive(psutil, p)]
                if dead:
                    self.fault = (f"the process of model '{model}' (pid {dead[0]}) died; Triton does not recover a "
                                  "dead Python-backend stub, so the server was stopped to be restarted")
                    self._log_fault()
                    self._kill(grace_s=1.0)
                    return

    def _log_fault(self) -> None:
        try:
            with open(self.log_path, "ab") as f:
                f.write(f"triton-tts watchdog: {self.fault}\n".encode())
        except OSError:
            pass

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
            req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST",
                                         headers=self.admin_headers)
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
            failure = self.load_failure()  # Triton logs it long before its HTTP endpoint comes up
            if failure is not None:
                self.stop()
                raise ServerError(f"model '{failure[0]}' failed to load: {failure[1]}", f"see {self.log_path}")
            status, _ = self._get("/v2/health/ready")
            if status == 200:
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready within {timeout_s:.0f} s", f"see {self.log_path}")

    def load_failure(self) -> tuple[str, str] | None:
        """(model, reason) of the first model Triton reported as failed to load, from its log."""
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            m = _LOAD_FAILURE.search(line)
            if m:
                reason = m.group(2).strip().rstrip('"').replace("\\n", " ").strip()
                return m.group(1), reason[:400]
        return None

    def _failure_reason(self) -> str:
        failure = self.load_failure()
        if failure is not None:
            return f"model '{failure[0]}' failed to load: {failure[1]}"
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [ln for ln in lines if (ln.startswith("E") or "error" in ln.lower())
                  and not any(k in ln for k in ("NVML", "DCGM", "CudaDriverHelper"))]
        return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:300]

    def _kill(self, grace_s: float) -> None:
        """SIGTERM to the server's process group (stubs included), SIGKILL after grace_s."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        children = self._children()  # the stubs run in sessions of their own: the group signal misses them
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _kill_all(children)

    def _children(self) -> list:
        import psutil

        try:
            return psutil.Process(self.process.pid).children(recursive=True) if self.process else []
        except psutil.Error:
            return []

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: a busy decoupled model can hold the server for its whole exit timeout."""
        self._stopping.set()
        if self.process is None:
            return
        self._kill(self.config.exit_timeout_s + 5)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=5)
        self._watchdog = None
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None
        self.process = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _interpreter_lib_dirs() -> list[Path]:
    """Where this interpreter's own libpython is, when it is a shared build outside the system paths (pyenv).

    The stub links `libpython3.X.so` by name; found first in the system directories, an older patch release of the
    same minor version gets loaded, and this interpreter's extension modules then fail on symbols it lacks
    (measured: `_ssl` needs `_PyModule_Add`, so anything importing ssl, such as transformers, failed in a stub).
    """
    import sysconfig

    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return []
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("LDLIBRARY") or ""
    if not libdir or not name or not (Path(libdir) / name).exists():
        return []
    return [Path(libdir)]


def _kill_all(procs: list) -> None:
    """SIGKILL whatever of `procs` is still running, and reap it."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def _alive(psutil, pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except OSError:
        pass


def _die_with_parent() -> None:  # preexec_fn of tritonserver
    die_with_parent(signal.SIGKILL)
