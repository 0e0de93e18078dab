"""What every Python-backend model here shares: config parameters, typed inputs, errors as responses, metrics.

The Triton Python backend injects `triton_python_backend_utils` only inside its stub process, so the generated
`model.py` passes it in: `TritonPythonModel = bind(SomeModel, pb_utils)`. Everything else is plain Python that
tests can import.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from engine_ref.errors import TTSError

log = logging.getLogger("model_repository")


def bind(cls: type, pb_utils: Any) -> type:
    """A subclass of `cls` with the backend utilities attached (what Triton instantiates)."""
    return type("TritonPythonModel", (cls,), {"pb": pb_utils})


class PythonModel:
    pb: Any = None  # triton_python_backend_utils, set by bind()

    def initialize(self, args: dict) -> None:
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
        return Path(self.param("export_dir"))

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
        message = exc.one_line() if isinstance(exc, TTSError) else f"internal error: {type(exc).__name__}: {exc}"
        if not isinstance(exc, TTSError):
            self.log_error(f"{self.model_name}: {message}")
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))

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
