"""ONNX export of CAMPPlus, the 192-d speaker style: fbank [B, T, 80] -> style [B, 192].

The graph is engine_ref's `campplus_style(model, fbank)`, upstream's own computation: campplus(fbank minus its
time mean). Rows of a batch must have the same length (no padding input): engine_ref's masked variant
(`lengths`) pads each 100-frame segment by an amount computed in Python from the frame count, which the
TorchScript exporter freezes into the graph (it then fails on any other batch or length), and serving conditions
each reference once, alone, which is upstream's exact path anyway.

The kaldi fbank stays in Python (as in the TensorRT port): engine_ref's `KaldiFbank` (torchaudio kaldi.fbank,
80 bins, dither 0, the 16 kHz reference left in [-1, 1]) uses torch.fft; its ONNX-friendly matmul-DFT variant
differs by ~5e-4 in the log-mel, which would be this graph's whole error budget. Serving computes the fbank and
calls this graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine_ref.indextts2.campplus import EMBEDDING_SIZE, FEAT_DIM, campplus_style
from export.common import ExportOptions, dim
from export.indextts2.common import Case, GraphSpec, export_graph, finish_parity, run_cases, session_for, verified
from export.manifest import Component, Parity

NAME = "campplus"
MIN_FRAMES = 4  # the statistics pooling's unbiased std needs two frames after the stride-2 TDNN
OPT_FRAMES = 1000  # 10 s at 100 frames/s
MAX_FRAMES = 6000  # 60 s (see export.indextts2.features.MAX_FRAMES)
_TRACE_SEED = 616_161


class CAMPPlusGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.campplus = model.campplus

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return campplus_style(self.campplus, fbank)


def _inputs(rng: np.random.Generator, batch: int, frames: int) -> dict[str, np.ndarray]:
    """kaldi-log-mel-like values (natural log of power, roughly -15..5)."""
    return {"fbank": rng.normal(-4.0, 3.0, size=(batch, frames, FEAT_DIM)).astype(np.float32)}


def export_component(model, out_dir: Path, opts: ExportOptions) -> Component:
    ex = _inputs(np.random.default_rng(_TRACE_SEED), 2, 130)
    spec = GraphSpec(
        name=NAME, module=CAMPPlusGraph(model), example=(torch.from_numpy(ex["fbank"]),),
        inputs=("fbank",), outputs=("style",),
        dynamic_axes={"fbank": {0: "batch", 1: "frames"}, "style": {0: "batch"}},
        dims={"batch": dim(1, 1, opts.max_batch), "frames": dim(MIN_FRAMES, OPT_FRAMES, MAX_FRAMES)},
        output_shapes={"style": ("batch", EMBEDDING_SIZE)},
        extra={
            "fbank": "engine_ref.indextts2.fbank.KaldiFbank(16000, 80 bins, dither 0) of the 16 kHz reference "
                     "in [-1, 1], computed in Python; the graph subtracts each row's time mean",
            "fbank_bins": FEAT_DIM, "style_dim": EMBEDDING_SIZE, "frames_per_second": 100,
            "padding": "none: rows of one call must have equal frame counts (condition references alone)",
        },
    )
    return verified(export_graph(spec, out_dir, opts), out_dir, opts, verify_component, model)


def default_cases(opts: ExportOptions) -> list[Case]:
    rng = np.random.default_rng(opts.seed + 31)
    shapes = ((1, MIN_FRAMES), (2, 230), (opts.max_batch, 160), (1, 601))
    return [Case(f"b{b}xf{t}", _inputs(rng, b, t)) for b, t in shapes]


@torch.inference_mode()
def verify_component(model, out_dir: Path, comp: Component, opts: ExportOptions,
                     cases: list[Case] | None = None) -> Parity:
    """ORT vs engine_ref; each row of a batch also vs the row alone (rows are independent: checked)."""
    sess = session_for(out_dir, comp)
    graph = CAMPPlusGraph(model).eval()
    cases = cases if cases is not None else default_cases(opts)

    def alone(feeds, ours, row):
        if feeds["fbank"].shape[0] == 1:
            return {}
        solo = graph(torch.from_numpy(feeds["fbank"][row : row + 1]))
        return {"style": (ours["style"][row : row + 1], solo.numpy())}

    report = run_cases(sess, cases, lambda f: {"style": graph(f["fbank"])}, ("style",), alone)
    return finish_parity(NAME, cases, report, alone_checked=True)
