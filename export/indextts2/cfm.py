"""ONNX export of the CFM estimator: one call of the DiT + WaveNet velocity field, batched per row.

Graph `cfm_estimator`: x [B, mels, T] (the current Euler state), prompt_x [B, mels, T] (reference mel on the prompt
frames, 0 elsewhere), x_lens [B] int64, t [B] float32, style [B, style_dim], cond [B, T, content] (mu) ->
velocity [B, mels, T] = engine_ref's DiT unchanged. Every row has its own t and length (key mask in attention,
reflect padding at each row's own end in the WaveNet), so a padded row equals the row alone on its valid frames
(checked) and one call can hold rows of different requests at different steps and lengths.

Classifier-free guidance is the caller's batch layout, as upstream: for B requests the call holds 2B rows,
[(x, prompt_x, style, mu) for each request] then [(x, 0, 0, 0) for each]; v = (1 + cfg) * v_cond - cfg * v_uncond,
x += dt * v, then prompt frames and padding are zeroed (engine_ref.indextts2.s2mel.cfm.euler_step, which
export/indextts2/runtime.py drives with this graph). Schedule: euler_schedule(25), cfg 0.7.

Frames: RoPE positions come from the stored 16384-row `input_pos`; the exported range stops at 8192 (upstream's
own RoPE table size, and the TensorRT port's profile max).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine_ref.indextts2.s2mel.cfm import DEFAULT_CFG_RATE, DEFAULT_STEPS
from export.common import ExportOptions, dim
from export.indextts2.common import Case, GraphSpec, export_graph, finish_parity, run_cases, session_for, verified
from export.manifest import Component, Parity

NAME = "cfm_estimator"
MIN_FRAMES = 2
OPT_FRAMES = 1300  # a 5 s prompt + a 10 s segment
MAX_FRAMES = 8192
_TRACE_SEED = 919_191


class EstimatorGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.estimator = model.s2mel.cfm.estimator

    def forward(self, x, prompt_x, x_lens, t, style, cond):
        return self.estimator(x, prompt_x, x_lens, t, style, cond)


def cfg_batch(rng: np.random.Generator, model, totals: np.ndarray, prompts: np.ndarray) -> dict[str, np.ndarray]:
    """A guided estimator batch for len(totals) requests: conditioned rows, then their unconditioned copies."""
    s2 = model.s2mel
    mels, content, style_dim = s2.cfm.n_mels, s2.cfm.content_dim, s2.cfm.style_dim
    b, frames = len(totals), int(totals.max())
    valid = np.arange(frames)[None, :] < totals[:, None]
    in_prompt = np.arange(frames)[None, :] < prompts[:, None]
    x = np.where((valid & ~in_prompt)[:, None], rng.standard_normal((b, mels, frames)), 0).astype(np.float32)
    prompt_x = np.where(in_prompt[:, None], rng.normal(-5.0, 2.0, (b, mels, frames)), 0).astype(np.float32)
    cond = np.where(valid[..., None], rng.standard_normal((b, frames, content)), 0).astype(np.float32)
    style = rng.standard_normal((b, style_dim)).astype(np.float32)
    t = rng.uniform(0.0, 1.0, b).astype(np.float32)
    zeros = np.zeros_like
    return {
        "x": np.concatenate([x, x]), "prompt_x": np.concatenate([prompt_x, zeros(prompt_x)]),
        "x_lens": np.concatenate([totals, totals]).astype(np.int64), "t": np.concatenate([t, t]),
        "style": np.concatenate([style, zeros(style)]), "cond": np.concatenate([cond, zeros(cond)]),
    }


def export_component(model, out_dir: Path, opts: ExportOptions) -> Component:
    s2 = model.s2mel
    ex = cfg_batch(np.random.default_rng(_TRACE_SEED), model, np.array([23, 16]), np.array([7, 5]))
    b, bt = {0: "batch"}, {0: "batch", 2: "frames"}
    rows = 2 * opts.max_batch
    spec = GraphSpec(
        name=NAME, module=EstimatorGraph(model), example=tuple(torch.from_numpy(v) for v in ex.values()),
        inputs=tuple(ex), outputs=("velocity",),
        dynamic_axes={"x": bt, "prompt_x": bt, "x_lens": b, "t": b, "style": b, "cond": {0: "batch", 1: "frames"},
                      "velocity": bt},
        dims={"batch": dim(1, 2, rows), "frames": dim(MIN_FRAMES, OPT_FRAMES, MAX_FRAMES)},
        output_shapes={"velocity": ("batch", s2.cfm.n_mels, "frames")},
        extra={
            "mels": s2.cfm.n_mels, "content_dim": s2.cfm.content_dim, "style_dim": s2.cfm.style_dim,
            "steps": DEFAULT_STEPS, "cfg_rate": DEFAULT_CFG_RATE,
            "schedule": "engine_ref.indextts2.s2mel.cfm.euler_schedule (t accumulated as t += dt)",
            "cfg_layout": "rows [conditioned B | unconditioned B]; unconditioned rows have prompt_x, style, cond = 0",
            "update": "v = (1 + cfg) * v_cond - cfg * v_uncond; x += dt * v; zero prompt frames and padding",
            "padding": "exact on valid frames: a padded row equals the row alone (verified); padded frames are "
                       "garbage, zeroed by the update",
            "position_table": int(s2.cfm.estimator.max_frames),
            "max_rows": rows,
            "trt_profiles": [
                {"name": "pair", "dims": {"batch": [1, 2, 2]}},
                {"name": "batched", "dims": {"batch": [2, min(8, rows), rows]}},
            ],
        },
    )
    return verified(export_graph(spec, out_dir, opts), out_dir, opts, verify_component, model)


def default_cases(model, opts: ExportOptions) -> list[Case]:
    rng = np.random.default_rng(opts.seed + 61)
    shapes = [([MIN_FRAMES + 1], [1]), ([40, 26], [9, 4]),
              (list(rng.integers(8, 90, opts.max_batch)), list(rng.integers(1, 8, opts.max_batch))), ([300], [100])]
    cases = []
    for totals, prompts in shapes:
        totals, prompts = np.asarray(totals, np.int64), np.asarray(prompts, np.int64)
        totals[0] = totals.max()
        cases.append(Case(f"requests={len(totals)} (rows {2 * len(totals)}) frames={totals.tolist()}",
                          cfg_batch(rng, model, totals, prompts)))
    return cases


@torch.inference_mode()
def verify_component(model, out_dir: Path, comp: Component, opts: ExportOptions,
                     cases: list[Case] | None = None) -> Parity:
    sess = session_for(out_dir, comp)
    graph = EstimatorGraph(model).eval()
    cases = cases if cases is not None else default_cases(model, opts)

    def alone(feeds, ours, row):
        n = int(feeds["x_lens"][row])
        if n == feeds["x"].shape[2]:
            return {}
        solo = graph(*(torch.from_numpy(_row(k, v, row, n)) for k, v in feeds.items()))
        return {"velocity": (ours["velocity"][row : row + 1, :, :n], solo.numpy())}

    report = run_cases(sess, cases, lambda f: {"velocity": graph(*f.values())}, ("velocity",), alone)
    return finish_parity(NAME, cases, report, alone_checked=True)


def _row(name: str, value: np.ndarray, row: int, n: int) -> np.ndarray:
    """One row of a feed, cut to n frames (time is axis 2 of x/prompt_x, axis 1 of cond)."""
    v = value[row : row + 1]
    if name in ("x", "prompt_x"):
        return v[:, :, :n]
    if name == "cond":
        return v[:, :n]
    return v
