"""ONNX export of IndexTTS-2.5's GPT speaker row: `speaker_projection` = spk_emb_proj of the CAMPPlus style.

Graph `speaker_projection`: style [B, 192] (the campplus graph's output) -> speaker_row [B, 1, model_dim] =
UnifiedVoiceV25.speaker_rows. It replaces 2.0's speaker_conditioner (Conformer + perceiver, 32 rows).

A graph rather than weights in an asset: every network weight of the export lives in a digested, verified graph,
so the serving code does no network arithmetic of its own and the gpu flavor can run it natively like every other
leaf. It runs once per speaker reference (serving caches the result), so the extra call costs nothing per segment.
conds = (speaker_row + emovec) ‖ 0 ‖ 0 is then assembled in numpy (export.indextts2.v25.runtime.make_conds_v25).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.common import ExportOptions, dim
from export.indextts2.common import Case, GraphSpec, export_graph, finish_parity, run_cases, session_for, verified
from export.manifest import Component, Parity

NAME = "speaker_projection"
_TRACE_SEED = 252_525


class SpeakerProjectionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.gpt = model.gpt

    def forward(self, style: torch.Tensor) -> torch.Tensor:
        return self.gpt.speaker_rows(style)


def _style(rng: np.random.Generator, batch: int, width: int) -> dict[str, np.ndarray]:
    return {"style": rng.standard_normal((batch, width)).astype(np.float32)}


def export_component(model, out_dir: Path, opts: ExportOptions) -> Component:
    cfg = model.gpt.cfg
    ex = _style(np.random.default_rng(_TRACE_SEED), 2, cfg.style_dim)
    spec = GraphSpec(
        name=NAME, module=SpeakerProjectionGraph(model), example=(torch.from_numpy(ex["style"]),),
        inputs=("style",), outputs=("speaker_row",),
        dynamic_axes={"style": {0: "batch"}, "speaker_row": {0: "batch"}},
        dims={"batch": dim(1, 1, opts.max_batch)},
        output_shapes={"speaker_row": ("batch", 1, cfg.model_dim)},
        extra={"style_dim": cfg.style_dim, "model_dim": cfg.model_dim,
               "speaker_row": "spk_emb_proj(style) (Linear style_dim -> model_dim)",
               "conds": "(speaker_row + emovec[:, None]) ‖ 0 ‖ 0 -> [B, 3, model_dim] (in Python)",
               "padding": "rows independent (verified vs each row alone)"},
    )
    return verified(export_graph(spec, out_dir, opts), out_dir, opts, verify_component, model)


@torch.inference_mode()
def verify_component(model, out_dir: Path, comp: Component, opts: ExportOptions,
                     cases: list[Case] | None = None) -> Parity:
    sess = session_for(out_dir, comp)
    graph = SpeakerProjectionGraph(model).eval()
    rng = np.random.default_rng(opts.seed + 61)
    width = model.gpt.cfg.style_dim
    cases = cases or [Case(f"b{b}", _style(rng, b, width)) for b in (1, 2, opts.max_batch)]

    def alone(feeds, ours, row):
        solo = graph(torch.from_numpy(feeds["style"][row : row + 1]))
        return {"speaker_row": (ours["speaker_row"][row : row + 1], solo.numpy())}

    report = run_cases(sess, cases, lambda f: {"speaker_row": graph(f["style"])}, ("speaker_row",), alone)
    return finish_parity(NAME, cases, report, alone_checked=True)
