"""ONNX export of s2mel's front: the prompt condition and the generated-part condition (length regulator).

- `s2mel_prompt`: semantic [B, N, in] (S_ref, the codec's quantised embedding of the reference), semantic_lengths
  [B], mel_frames [B] (the reference mel's frame count) -> prompt_condition [B, max(mel_frames), C] =
  S2Mel.prompt_condition = length_regulator(S_ref, N, T_ref).
- `s2mel_cond`: codes [B, N] int64, latents [B, N, gpt_dim] (the teacher-forced GPT latents), code_lengths [B]
  -> cond [B, max(cond_lengths), C], cond_lengths [B] = floor(1.72 N) (float32 product, as upstream):
  S_infer = vq2emb(codes) + gpt_layer(latents) (vq2emb batch-correct), regulated to cond_lengths.

Both are engine_ref's modules unchanged. The regulator resamples every row to its own target (nearest, the float32
floor(j * in / out) index) and its convs / GroupNorm see only valid frames, so padded rows are exact (checked);
frames past a row's target are zero. mu for the CFM = prompt_condition[:T_ref] ‖ cond[:floor(1.72 N)] per row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine_ref.indextts2.s2mel.model import MEL_FRAMES_PER_CODE, target_mel_frames
from export.common import ExportOptions, dim
from export.indextts2.common import (
    Case, GraphSpec, export_graph, finish_parity, lengths_for, run_cases, session_for, verified,
)
from export.indextts2.features import MAX_FRAMES, OPT_FRAMES
from export.manifest import Component, Parity

PROMPT = "s2mel_prompt"
COND = "s2mel_cond"
MEL_FRAMES_PER_SECOND = 22050 / 256
MAX_PROMPT_FRAMES = 5200  # 60 s of reference mel (86.13 frames/s), the semantic encoder's 3000-frame range
OPT_PROMPT_FRAMES = 861  # 10 s
_TRACE_SEED = 818_181


class PromptGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.regulator = model.s2mel.length_regulator

    def forward(self, semantic: torch.Tensor, semantic_lengths: torch.Tensor, mel_frames: torch.Tensor):
        return self.regulator(semantic, semantic_lengths, mel_frames)


class CondGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.codec = model.codec
        self.s2mel = model.s2mel

    def forward(self, codes: torch.Tensor, latents: torch.Tensor, code_lengths: torch.Tensor):
        cond = self.s2mel.target_condition(self.codec.vq2emb(codes), latents, code_lengths)
        return cond, target_mel_frames(code_lengths)


def max_codes(model) -> int:
    """The latent pass's limit (mel positions minus start and stop)."""
    return int(model.gpt.cfg.mel_positions - 2)


def _prompt_inputs(rng: np.random.Generator, lengths: np.ndarray, width: int) -> dict[str, np.ndarray]:
    sem = np.zeros((len(lengths), int(lengths.max()), width), np.float32)
    for i, n in enumerate(lengths):
        sem[i, :n] = rng.standard_normal((n, width))
    # the reference mel has ~1.72 frames per semantic frame; jitter it (and allow shrinking) to cover the index math
    frames = np.maximum(1, np.floor(lengths * MEL_FRAMES_PER_CODE) + rng.integers(-3, 4, len(lengths)))
    return {"semantic": sem, "semantic_lengths": lengths.astype(np.int64), "mel_frames": frames.astype(np.int64)}


def _cond_inputs(rng: np.random.Generator, lengths: np.ndarray, book: int, gpt_dim: int) -> dict[str, np.ndarray]:
    width = int(lengths.max())
    codes = np.zeros((len(lengths), width), np.int64)
    lat = np.zeros((len(lengths), width, gpt_dim), np.float32)
    for i, n in enumerate(lengths):
        codes[i, :n] = rng.integers(0, book, n)
        lat[i, :n] = rng.standard_normal((n, gpt_dim))
    return {"codes": codes, "latents": lat, "code_lengths": lengths.astype(np.int64)}


def prompt_spec(model, opts: ExportOptions, semantic: str | None = None) -> GraphSpec:
    """s2mel_prompt's graph; `semantic` says what the family feeds it (IndexTTS-2: S_ref; 2.5: the features)."""
    s2 = model.s2mel
    width, channels = s2.cfg.length_regulator.in_channels, s2.cfg.length_regulator.channels
    pex = _prompt_inputs(np.random.default_rng(_TRACE_SEED), np.array([21, 13]), width)
    extra = {"channels": channels, "in_channels": width, "mel_frames": "the reference mel's frame count (T_ref)",
             "prompt_frames": "max(mel_frames); rows are zero past their own mel_frames",
             "padding": "exact: a padded row equals the row alone (verified)"}
    return GraphSpec(
        name=PROMPT, module=PromptGraph(model), example=tuple(torch.from_numpy(v) for v in pex.values()),
        inputs=tuple(pex), outputs=("prompt_condition",),
        dynamic_axes={"semantic": {0: "batch", 1: "frames"}, "semantic_lengths": {0: "batch"},
                      "mel_frames": {0: "batch"}, "prompt_condition": {0: "batch", 1: "prompt_frames"}},
        dims={"batch": dim(1, 1, opts.max_batch), "frames": dim(1, OPT_FRAMES, MAX_FRAMES),
              "prompt_frames": dim(1, OPT_PROMPT_FRAMES, MAX_PROMPT_FRAMES)},
        output_shapes={"prompt_condition": ("batch", "prompt_frames", channels)},
        extra={**extra, **({"semantic": semantic} if semantic else {})},
    )


def export_prompt(model, out_dir: Path, opts: ExportOptions, semantic: str | None = None) -> Component:
    return verified(export_graph(prompt_spec(model, opts, semantic), out_dir, opts), out_dir, opts, verify_prompt,
                    model)


def export_components(model, out_dir: Path, opts: ExportOptions) -> dict[str, Component]:
    s2 = model.s2mel
    width, channels = s2.cfg.length_regulator.in_channels, s2.cfg.length_regulator.channels
    gpt_dim, book = s2.gpt_latent_dim, int(model.codec.cfg.codebook_size)
    rng = np.random.default_rng(_TRACE_SEED)
    _prompt_inputs(rng, np.array([21, 13]), width)  # keeps the cond example's draws as they were
    cex = _cond_inputs(rng, np.array([9, 6]), book, gpt_dim)
    batch = dim(1, 1, opts.max_batch)
    n_max = max_codes(model)
    f_max = int(n_max * MEL_FRAMES_PER_CODE) + 1
    cond = GraphSpec(
        name=COND, module=CondGraph(model), example=tuple(torch.from_numpy(v) for v in cex.values()),
        inputs=tuple(cex), outputs=("cond", "cond_lengths"),
        dynamic_axes={"codes": {0: "batch", 1: "codes_len"}, "latents": {0: "batch", 1: "codes_len"},
                      "code_lengths": {0: "batch"}, "cond": {0: "batch", 1: "cond_frames"},
                      "cond_lengths": {0: "batch"}},
        dims={"batch": batch, "codes_len": dim(1, 256, n_max), "cond_frames": dim(1, 440, f_max)},
        output_shapes={"cond": ("batch", "cond_frames", channels), "cond_lengths": ("batch",)},
        extra={"channels": channels, "gpt_dim": gpt_dim, "mel_frames_per_code": MEL_FRAMES_PER_CODE,
               "cond_lengths": "floor(float32(code_lengths) * 1.72) (upstream's (N * 1.72).long())",
               "s_infer": "vq2emb(codes) + gpt_layer(latents), every row (batch-correct vq2emb)",
               "padding": "exact: a padded row equals the row alone (verified); zeros past cond_lengths"},
    )
    return {
        PROMPT: export_prompt(model, out_dir, opts),
        COND: verified(export_graph(cond, out_dir, opts), out_dir, opts, verify_cond, model),
    }


def _alone_rows(graph: nn.Module, feeds: dict[str, np.ndarray], ours, row: int, length_key: str,
                out_len: int, names: tuple[str, ...]) -> dict:
    n = int(feeds[length_key][row])
    width = next(v for k, v in feeds.items() if v.ndim >= 2).shape[1]
    if n == width:
        return {}
    solo_feeds = [torch.from_numpy(v[row : row + 1, :n] if v.ndim >= 2 else v[row : row + 1]) for v in feeds.values()]
    solo = graph(*solo_feeds)
    solo = solo if isinstance(solo, tuple) else (solo,)
    return {names[0]: (ours[names[0]][row : row + 1, :out_len], solo[0].numpy()[:, :out_len])}


@torch.inference_mode()
def verify_prompt(model, out_dir: Path, comp: Component, opts: ExportOptions,
                  cases: list[Case] | None = None) -> Parity:
    sess = session_for(out_dir, comp)
    graph = PromptGraph(model).eval()
    rng = np.random.default_rng(opts.seed + 51)
    width = model.s2mel.cfg.length_regulator.in_channels
    if cases is None:
        lengths = [np.array([1]), lengths_for(rng, 2, 30, 1), lengths_for(rng, opts.max_batch, 120, 1),
                   np.array([350])]
        cases = [Case(f"b{len(n)}xn{int(n.max())}{n.tolist()}", _prompt_inputs(rng, n, width)) for n in lengths]

    def alone(feeds, ours, row):
        return _alone_rows(graph, feeds, ours, row, "semantic_lengths", int(feeds["mel_frames"][row]),
                           ("prompt_condition",))

    report = run_cases(sess, cases, lambda f: {"prompt_condition": graph(*f.values())}, ("prompt_condition",), alone)
    return finish_parity(PROMPT, cases, report, alone_checked=True)


@torch.inference_mode()
def verify_cond(model, out_dir: Path, comp: Component, opts: ExportOptions,
                cases: list[Case] | None = None) -> Parity:
    """cond vs engine_ref (padded rows also vs alone, exact); cond_lengths must equal target_mel_frames exactly."""
    from export.common import ParityError

    sess = session_for(out_dir, comp)
    graph = CondGraph(model).eval()
    rng = np.random.default_rng(opts.seed + 52)
    book, gpt_dim = int(model.codec.cfg.codebook_size), model.s2mel.gpt_latent_dim
    if cases is None:
        lengths = [np.array([1]), lengths_for(rng, 2, 25, 1), lengths_for(rng, opts.max_batch, 90, 1),
                   np.array([300])]
        cases = [Case(f"b{len(n)}xn{int(n.max())}{n.tolist()}", _cond_inputs(rng, n, book, gpt_dim))
                 for n in lengths]
    for case in cases:  # the frame counts are integers: exactly upstream's, or the graph is wrong
        (got,) = sess.run(["cond_lengths"], case.feeds)
        want = target_mel_frames(torch.from_numpy(case.feeds["code_lengths"])).numpy()
        if not np.array_equal(got, want):
            raise ParityError(f"{COND}: cond_lengths {got.tolist()} != floor(1.72 N) = {want.tolist()}")

    def alone(feeds, ours, row):
        frames = int(target_mel_frames(torch.tensor(int(feeds["code_lengths"][row]))))
        return _alone_rows(graph, feeds, ours, row, "code_lengths", frames, ("cond",))

    report = run_cases(sess, cases, lambda f: {"cond": graph(*f.values())[0]}, ("cond",), alone)
    return finish_parity(COND, cases, report, alone_checked=True)
