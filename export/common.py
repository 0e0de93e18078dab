"""What every component export shares: the ONNX export call, external data, sessions, error measurement.

Graphs are exported with the TorchScript-based exporter (`dynamo=False`): it handles our dynamic batch/length axes
and produces the op patterns ONNX Runtime's transformer optimizer recognises. Graphs larger than protobuf's 2 GB
limit (the v1.5 decoder in fp32) keep their weights in one external `<file>.data` beside them.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch

from export.manifest import DimRange, TensorInfo
from export.ort_session import session  # noqa: F401  (its home is torch-free, for the serving leaves)

log = logging.getLogger("export")

DEFAULT_OPSET = 17
# Stay well under protobuf's hard 2 GiB limit when deciding to externalize weights.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2

_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool", onnx.TensorProto.BFLOAT16: "bfloat16",
}


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    max_batch: int = 8
    verify: bool = True
    seed: int = 0


def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int = DEFAULT_OPSET,
) -> tuple[str, ...]:
    """Export `module(*args)` to `path`; returns the external data file names (empty for small graphs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream but is the one whose output ORT's fusions know.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, args, str(path), dynamo=False, input_names=list(input_names), output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, opset_version=opset, do_constant_folding=True,
        )
    return consolidate_external_data(path)


def consolidate_external_data(path: Path) -> tuple[str, ...]:
    """Keep a graph in one file when it fits, else move all weights to a single `<name>.data` file.

    Only the files the graph itself references as external data are touched (the legacy exporter writes one
    file per initializer for graphs over 2 GB); nothing else in the output directory is.
    """
    graph = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for t in graph.graph.initializer for entry in t.external_data if entry.key == "location"
    }
    weight_bytes = sum(
        int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in graph.graph.initializer
    )
    data_name = path.name + ".data"
    if weight_bytes < EXTERNAL_DATA_THRESHOLD and not locations:
        return ()
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)
    for name in locations - {data_name}:
        (path.parent / name).unlink(missing_ok=True)
    (path.parent / data_name).chmod(0o644)  # onnx writes it private; servers often run as another user
    return (data_name,)


def graph_io(path: Path) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Inputs and outputs of a saved graph, with dtypes and (symbolic) dims, for the manifest."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def info(v) -> TensorInfo:
        tt = v.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim)
        return TensorInfo(v.name, _ONNX_TO_NP.get(tt.elem_type, str(tt.elem_type)), dims)

    return tuple(info(v) for v in graph.input), tuple(info(v) for v in graph.output)


@dataclass
class ErrorMeter:
    """Accumulates max |ours - ref| and max |ours - ref| / max |ref| over verification cases."""

    max_abs: float = 0.0
    max_rel: float = 0.0

    def add(self, ours: np.ndarray, ref: np.ndarray) -> None:
        ours = np.asarray(ours, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if ours.shape != ref.shape:
            raise AssertionError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
        diff = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        self.max_abs = max(self.max_abs, diff)
        self.max_rel = max(self.max_rel, diff / scale if scale > 0 else diff)


class ParityError(RuntimeError):
    """An exported graph disagrees with engine_ref beyond tolerance: the export must not be used."""


def check_tolerance(component: str, meter: ErrorMeter, tolerance: float) -> None:
    if not meter.max_rel <= tolerance:
        raise ParityError(
            f"{component}: ONNX Runtime differs from engine_ref by max_rel={meter.max_rel:.3g} "
            f"(max_abs={meter.max_abs:.3g}) > tolerance {tolerance:g}; the graph is wrong, not exported"
        )


def dim(lo: int, opt: int, hi: int) -> DimRange:
    return DimRange(min=lo, opt=opt, max=hi)


def threads_default() -> int:
    return max(1, min(os.cpu_count() or 1, 16))
