"""What the IndexTTS2 component exports share: one graph from a spec, and parity measured case by case.

Every v2 component is a thin `nn.Module` around engine_ref v2's own modules (no math of ours), exported with
`export.common.export_onnx` (so external data above 2 GB, opset and the TorchScript exporter are 1.x's), its
output shapes pinned, every symbolic dim given a [min, opt, max] range, and its files digested. Verification
then runs fresh random cases through ONNX Runtime and through engine_ref, output by output:

- `Parity.max_abs/max_rel` are the worst over the float outputs (rel = max|ours - ref| / max|ref|);
- `Parity.extra[<output>]` has each output's errors, `extra["padded_vs_alone"]` how a padded row compares with
  the same row run alone through engine_ref (checked where rows are exact under padding, only measured where
  engine_ref itself is not batch-independent: a component's docstring says which).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from export.common import FP32_TOLERANCE, ErrorMeter, ExportOptions, check_tolerance, export_onnx, graph_io
from export.cond_encoder import check_dims_named, open_checked_session, pin_output_shapes
from export.manifest import Component, DimRange, Parity, component_digest


@dataclass(frozen=True)
class GraphSpec:
    """One graph: the module, a tracing example, I/O names, dynamic axes, dim ranges and pinned output shapes."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    dims: Mapping[str, DimRange]
    output_shapes: Mapping[str, tuple[int | str, ...]] = field(default_factory=dict)
    extra: Mapping = field(default_factory=dict)
    file: str | None = None  # default <name>.onnx


def export_graph(spec: GraphSpec, out_dir: Path, opts: ExportOptions) -> Component:
    """Export, pin output shapes, check every symbolic dim has a range, digest; parity is added by the caller."""
    out_dir = Path(out_dir)
    path = out_dir / (spec.file or f"{spec.name}.onnx")
    with warnings.catch_warnings():
        # engine_ref's static input checks run once on the example and are (correctly) absent from the graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        warnings.filterwarnings("ignore", category=UserWarning)
        external = export_onnx(spec.module.eval(), spec.example, path, spec.inputs, spec.outputs,
                               spec.dynamic_axes, opts.opset)
    if spec.output_shapes:
        pin_output_shapes(path, spec.output_shapes)
    inputs, outputs = graph_io(path)
    dims = dict(spec.dims)
    check_dims_named(spec.name, (*inputs, *outputs), dims)
    comp = Component(
        name=spec.name, file=path.name, sha256="", opset=opts.opset, precision="fp32", inputs=inputs,
        outputs=outputs, dims=dims, parity=None, external_data=external, extra=dict(spec.extra),
    )
    return replace(comp, sha256=component_digest(out_dir, comp))


@dataclass
class Case:
    """One verification input: the graph's feeds and, per row that has padding, how to run it alone."""

    label: str
    feeds: dict[str, np.ndarray]


Reference = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]
#: (feeds of the padded batch, ours, row) -> (ours for the row's valid part, engine_ref's row alone) per output.
AloneFn = Callable[[dict[str, np.ndarray], Mapping[str, np.ndarray], int], Mapping[str, tuple[np.ndarray, np.ndarray]]]


@dataclass
class ParityReport:
    """Per-output meters and the padded-row-vs-alone meter of one component's verification."""

    outputs: dict[str, ErrorMeter] = field(default_factory=dict)
    alone: ErrorMeter = field(default_factory=ErrorMeter)
    alone_cases: int = 0
    extra: dict = field(default_factory=dict)

    def meter(self, name: str) -> ErrorMeter:
        return self.outputs.setdefault(name, ErrorMeter())


def run_cases(sess, cases: Sequence[Case], reference: Reference, compare: Sequence[str],
              alone: AloneFn | None = None, report: ParityReport | None = None) -> ParityReport:
    """Each case through ORT and engine_ref; `compare` names the float outputs measured (all rows, all frames)."""
    report = report or ParityReport()
    names = [o.name for o in sess.get_outputs()]
    for case in cases:
        ours = dict(zip(names, sess.run(None, case.feeds)))
        with torch.inference_mode():
            ref = reference({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in case.feeds.items()})
        for name in compare:
            report.meter(name).add(ours[name], ref[name].detach().numpy())
        if alone is not None:
            batch = next(iter(case.feeds.values())).shape[0]
            for row in range(batch):
                for _, (mine, theirs) in alone(case.feeds, ours, row).items():
                    report.alone.add(mine, theirs)
                    report.alone_cases += 1
    return report


def finish_parity(name: str, cases: Sequence[Case], report: ParityReport, *, alone_checked: bool,
                  tolerance: float = FP32_TOLERANCE, alone_note: str = "") -> Parity:
    """Check every output (and, if `alone_checked`, padded rows vs alone) against `tolerance`; the Parity record."""
    for out, meter in report.outputs.items():
        check_tolerance(f"{name}.{out}", meter, tolerance)
    if alone_checked and report.alone_cases:
        check_tolerance(f"{name} (padded row vs the row alone)", report.alone, tolerance)
    extra = {out: {"max_abs": m.max_abs, "max_rel": m.max_rel} for out, m in report.outputs.items()}
    if report.alone_cases:
        extra["padded_vs_alone"] = {"max_abs": report.alone.max_abs, "max_rel": report.alone.max_rel,
                                    "checked": alone_checked, **({"note": alone_note} if alone_note else {})}
    extra.update(report.extra)
    meters = list(report.outputs.values())
    return Parity(
        max_abs=max((m.max_abs for m in meters), default=0.0), max_rel=max((m.max_rel for m in meters), default=0.0),
        tolerance=tolerance, cases=tuple(c.label for c in cases), extra=extra,
    )


def verified(comp: Component, out_dir: Path, opts: ExportOptions, verify: Callable[..., Parity], model) -> Component:
    """The component with its parity, when opts.verify (else as exported)."""
    if not opts.verify:
        return comp
    return replace(comp, parity=verify(model, Path(out_dir), comp, opts))


def session_for(out_dir: Path, comp: Component):
    """An ORT session after checking the component's files against its sha256 (named errors otherwise)."""
    return open_checked_session(Path(out_dir), comp)


def lengths_for(rng: np.random.Generator, batch: int, longest: int, shortest: int) -> np.ndarray:
    """Row lengths: the first row is the longest (the padded width), the others random in [shortest, longest]."""
    rest = rng.integers(shortest, longest + 1, size=batch - 1)
    return np.asarray([longest, *rest], dtype=np.int64)


def frame_mask(lengths: np.ndarray, frames: int) -> np.ndarray:
    return np.arange(frames)[None, :] < lengths[:, None]
