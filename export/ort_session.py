"""ONNX Runtime sessions as every runner and served graph opens them; torch-free, so a served leaf model (one
Python-backend process per graph) starts without importing torch (export.common re-exports `session`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def session(path: Path, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",),
            optimization: str = "all", spinning: bool = True):
    """An ORT session. spinning=False stops idle worker threads from busy-waiting between ops, which leaves the
    cores to other processes; serving keeps ORT's spinning by default (see RepoOptions.spin_threads for why)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
