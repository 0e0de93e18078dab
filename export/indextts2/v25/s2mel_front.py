"""ONNX export of IndexTTS-2.5's s2mel front: 2.0's prompt graph on the features, and the target condition.

- `s2mel_prompt`: 2.0's graph unchanged (export.indextts2.s2mel_front), fed the normalised w2v-BERT layer-17
  features instead of the codec-quantised S_ref (2.5 does not quantise the reference): semantic = features
  [B, T_w, hidden], semantic_lengths = T_w, mel_frames = T_ref.
- `s2mel_cond`: semantic [B, 2N, hidden] (the codec_decoder's output), semantic_lengths [B] (2N), target_lengths
  [B] -> cond [B, max(target_lengths), C] = length_regulator(semantic, 2N, target). The target is an INPUT:
  int(2N * 1.72 * duration_factor) is computed in Python with engine_ref's `target_mel_frames_v25` (double
  arithmetic, as upstream), which a float32 graph could not reproduce at every boundary.

The regulator resamples each row to its own target and sees only valid frames, so padded rows are exact (checked)
and frames past a row's target are zero. mu for the CFM = prompt_condition[:T_ref] ‖ cond[:target] per row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine_ref.indextts2.v25.s2mel import DURATION_FACTOR_RANGE, MEL_FRAMES_PER_SEMANTIC_FRAME, target_mel_frames_v25
from export.common import ExportOptions, dim
from export.indextts2.common import (
    Case, GraphSpec, export_graph, finish_parity, lengths_for, run_cases, session_for, verified,
)
from export.indextts2.s2mel_front import COND, PROMPT, PromptGraph, _alone_rows, export_prompt
from export.indextts2.v25.codec_decoder import OPT_CODES, max_codes
from export.manifest import Component, Parity

__all__ = ["PROMPT", "COND", "export_components", "verify_cond", "cond_inputs"]

_TRACE_SEED = 282_828
_FACTORS = (0.5, 0.83, 1.0, 1.37, 2.0)  # duration factors of the verification cases


def cond_inputs(rng: np.random.Generator, frames: np.ndarray, width: int, factor: float) -> dict[str, np.ndarray]:
    """Codec-like semantics of `frames` (even) valid frames per row and their 2.5 targets at `factor`."""
    sem = np.zeros((len(frames), int(frames.max()), width), np.float32)
    for i, n in enumerate(frames):
        sem[i, :n] = rng.standard_normal((n, width))
    targets = target_mel_frames_v25([n // 2 for n in frames.tolist()], factor)
    return {"semantic": sem, "semantic_lengths": frames.astype(np.int64),
            "target_lengths": np.asarray(targets, np.int64)}


def export_components(model, out_dir: Path, opts: ExportOptions) -> dict[str, Component]:
    reg = model.s2mel.cfg.length_regulator
    width, channels = reg.in_channels, reg.channels
    ex = cond_inputs(np.random.default_rng(_TRACE_SEED), np.array([18, 12]), width, 1.0)
    n_max = max_codes(model)
    t_max = target_mel_frames_v25([n_max], DURATION_FACTOR_RANGE[1])[0]
    cond = GraphSpec(
        name=COND, module=PromptGraph(model), example=tuple(torch.from_numpy(v) for v in ex.values()),
        inputs=tuple(ex), outputs=("cond",),
        dynamic_axes={"semantic": {0: "batch", 1: "frames"}, "semantic_lengths": {0: "batch"},
                      "target_lengths": {0: "batch"}, "cond": {0: "batch", 1: "cond_frames"}},
        dims={"batch": dim(1, 1, opts.max_batch), "frames": dim(2, 2 * OPT_CODES, 2 * n_max),
              "cond_frames": dim(1, target_mel_frames_v25([OPT_CODES])[0], t_max)},
        output_shapes={"cond": ("batch", "cond_frames", channels)},
        extra={"channels": channels, "in_channels": width, "mel_frames_per_semantic_frame":
               MEL_FRAMES_PER_SEMANTIC_FRAME, "duration_factor_range": list(DURATION_FACTOR_RANGE),
               "semantic": "codec_decoder's semantic and semantic_lengths (2N frames)",
               "target_lengths": "int(2N * 1.72 * duration_factor) in double precision, computed by the caller "
                                 "(engine_ref.indextts2.v25.s2mel.target_mel_frames_v25)",
               "padding": "exact: a padded row equals the row alone (verified); zeros past target_lengths"},
    )
    features = "the normalised w2v-BERT layer-17 features (IndexTTS-2.5 does not quantise the reference)"
    return {
        PROMPT: export_prompt(model, out_dir, opts, semantic=features),
        COND: verified(export_graph(cond, out_dir, opts), out_dir, opts, verify_cond, model),
    }


@torch.inference_mode()
def verify_cond(model, out_dir: Path, comp: Component, opts: ExportOptions,
                cases: list[Case] | None = None) -> Parity:
    """cond vs engine_ref's regulator on the same padded batch, and padded rows vs alone (exact), at duration
    factors across [0.5, 2.0]."""
    sess = session_for(out_dir, comp)
    graph = PromptGraph(model).eval()
    rng = np.random.default_rng(opts.seed + 81)
    width = model.s2mel.cfg.length_regulator.in_channels
    if cases is None:
        lengths = [np.array([1]), lengths_for(rng, 2, 25, 1), lengths_for(rng, opts.max_batch, 90, 1),
                   np.array([300]), lengths_for(rng, 2, 40, 1)]
        cases = [Case(f"b{len(n)}xn{int(n.max())}{n.tolist()} df={f:g}", cond_inputs(rng, 2 * n, width, f))
                 for n, f in zip(lengths, _FACTORS)]

    def alone(feeds, ours, row):
        return _alone_rows(graph, feeds, ours, row, "semantic_lengths", int(feeds["target_lengths"][row]), ("cond",))

    report = run_cases(sess, cases, lambda f: {"cond": graph(*f.values())}, ("cond",), alone)
    return finish_parity(COND, cases, report, alone_checked=True)
