"""What every Python-backend model here shares: config parameters, typed inputs, errors as responses, metrics.

The Triton Python backend injects `triton_python_backend_utils` only inside its stub process, so the generated
`model.py` passes it in: `TritonPythonModel = bind(SomeModel, pb_utils)`. Everything else is plain Python that
tests can import.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from engine_ref.errors import CapacityError, InputError, TTSError
from model_repository.contract import ENTRY_MODELS, INTERNAL_KEY

STATUS_TAG_OPEN, STATUS_TAG_CLOSE = "[status:", "] "


def split_status(message: str) -> tuple[str | None, str]:
    """(status code name, message) of an internal model's error message (see PythonModel.triton_error)."""
    if message.startswith(STATUS_TAG_OPEN) and STATUS_TAG_CLOSE in message:
        tag, rest = message[len(STATUS_TAG_OPEN):].split(STATUS_TAG_CLOSE, 1)
        return tag, rest
    return None, message

#: Environment variable holding the secret internal models check (generated per start by `triton-tts serve`).
INTERNAL_KEY_ENV = "TTS_INTERNAL_KEY"


def error_code_name(exc: BaseException) -> str:
    """pb_utils.TritonError code attribute for an exception (see PythonModel.triton_error)."""
    code = getattr(exc, "triton_code", None)
    if code:
        return code
    if isinstance(exc, InputError):
        return "INVALID_ARG"
    if isinstance(exc, CapacityError):
        return "UNAVAILABLE"
    if type(exc).__name__ == "Cancelled":
        return "CANCELLED"
    return "INTERNAL"

log = logging.getLogger("model_repository")


def bind(cls: type, pb_utils: Any) -> type:
    """A subclass of `cls` with the backend utilities attached (what Triton instantiates)."""
    return type("TritonPythonModel", (cls,), {"pb": pb_utils})


class PythonModel:
    pb: Any = None  # triton_python_backend_utils, set by bind()

    def initialize(self, args: dict) -> None:
        self.args = args
        self.model_config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.model_config.get("name", "?"))
        self.params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        self.setup()

    def setup(self) -> None:  # overridden
        pass

    # --- parameters and inputs ------------------------------------------------------------------------------------
    def param(self, name: str, default: Any = None, cast: type = str) -> Any:
        raw = self.params.get(name, "")
        if raw == "":
            return default
        return cast(raw) if cast is not bool else raw.lower() in ("1", "true", "yes")

    @property
    def export_dir(self) -> Path:
        """The export directory; the config holds it relative to the repository (no absolute paths are served)."""
        path = Path(self.param("export_dir"))
        if path.is_absolute():
            return path
        return (self.repository_dir / path).resolve()

    @property
    def repository_dir(self) -> Path:
        """The model repository's root (Triton passes this model's own directory)."""
        return Path(self.args.get("model_repository", ".")).resolve().parent

    def tensor(self, request: Any, name: str) -> np.ndarray | None:
        t = self.pb.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    @staticmethod
    def scalar(value: np.ndarray | None) -> Any:
        if value is None:
            return None
        flat = np.asarray(value).reshape(-1)
        return flat[0] if flat.size else None

    @staticmethod
    def text_of(value: np.ndarray | None) -> str | None:
        v = PythonModel.scalar(value)
        if v is None:
            return None
        return v.decode("utf-8", errors="replace") if isinstance(v, (bytes, np.bytes_)) else str(v)

    # --- responses ------------------------------------------------------------------------------------------------
    def out(self, name: str, value: Any, dtype: Any = None) -> Any:
        arr = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        return self.pb.Tensor(name, arr)

    def error_response(self, exc: BaseException) -> Any:
        return self.pb.InferenceResponse(output_tensors=[], error=self.triton_error(exc))

    def triton_error(self, exc: BaseException) -> Any:
        """The TritonError for an exception, with the status a client can act on (400 / INVALID_ARGUMENT for bad
        input, UNAVAILABLE at capacity, CANCELLED, else 500 / INTERNAL); unexpected exceptions are logged."""
        message = exc.one_line() if isinstance(exc, TTSError) else f"internal error: {type(exc).__name__}: {exc}"
        if not isinstance(exc, TTSError):
            self.log_error(f"{self.model_name}: {message}")
        name = error_code_name(exc)
        if self.model_name not in ENTRY_MODELS:
            # Triton 2.51 hands a BLS caller every error as INTERNAL: the status travels in the message instead,
            # and the entry model (models/tts.py) takes it back out.
            message = f"{STATUS_TAG_OPEN}{name}{STATUS_TAG_CLOSE}{message}"
        code = getattr(self.pb.TritonError, name, None)
        return self.pb.TritonError(message) if code is None else self.pb.TritonError(message, code)

    # --- internal models ------------------------------------------------------------------------------------------
    def internal_key(self) -> str:
        """The per-server secret that internal models require (set by `triton-tts serve`; empty: not enforced)."""
        return os.environ.get(INTERNAL_KEY_ENV, "")

    def check_internal(self, request: Any) -> None:
        """Refuse calls to an internal model that do not come from this server's own models."""
        key = self.internal_key()
        if not key:
            return
        got = self.text_of(self.tensor(request, INTERNAL_KEY.name))
        if got != key:
            raise InputError(f"model '{self.model_name}' is internal to the deployment",
                             "call the 'tts' (streaming) or 'tts_offline' model instead")

    def log_info(self, msg: str) -> None:
        if self.pb is not None:
            self.pb.Logger.log_info(msg)

    def log_error(self, msg: str) -> None:
        if self.pb is not None:
            self.pb.Logger.log_error(msg)


class Metrics:
    """Custom metric families on Triton's metrics endpoint (Python backend MetricFamily)."""

    def __init__(self, pb: Any, model: str, lock: threading.Lock | None = None):
        self.pb = pb
        # Metric updates are messages to the server; from many threads at once they must be serialized.
        self._lock = lock or threading.Lock()
        self.labels = {"model": model}
        self._families: dict[str, Any] = {}
        self._metrics: dict[str, Any] = {}

    def _metric(self, name: str, kind: str, description: str) -> Any:
        if name not in self._metrics:
            fam_kind = self.pb.MetricFamily.COUNTER if kind == "counter" else self.pb.MetricFamily.GAUGE
            fam = self.pb.MetricFamily(name=name, description=description, kind=fam_kind)
            self._families[name] = fam
            self._metrics[name] = fam.Metric(labels=self.labels)
        return self._metrics[name]

    def inc(self, name: str, value: float = 1.0, description: str = "") -> None:
        if self.pb is not None and value > 0:
            with self._lock:
                self._metric(name, "counter", description or name).increment(float(value))

    def set(self, name: str, value: float, description: str = "") -> None:
        if self.pb is not None:
            with self._lock:
                self._metric(name, "gauge", description or name).set(float(value))
