"""ONNX export of IndexTTS-2.5's 25 Hz codec decoder (codec.pth): GPT codes -> the semantics s2mel regulates.

Graph `codec_decoder`: codes [B, N] int64, code_lengths [B] int64 -> semantic [B, 2N, hidden],
semantic_lengths [B] = 2 * code_lengths; engine_ref's `Codec25.decode(codes, code_lengths)` unchanged:
up(nearest_x2(decoder(vq2emb(codes)))), every row decoded (batch-correct vq2emb). It replaces 2.0's
vq2emb + gpt_layer (2.5 has no GPT latent).

Padding: the decoder's time-mixing convs and `up` see zeros past each row's length, so a padded row's valid frames
equal the row alone (checked) and frames past 2n are zero; a full-length row is upstream's unmasked computation
(x * 1 is exact; checked against decode without lengths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.common import ExportOptions, ParityError, dim
from export.indextts2.common import (
    Case, GraphSpec, export_graph, finish_parity, lengths_for, run_cases, session_for, verified,
)
from export.manifest import Component, Parity

NAME = "codec_decoder"
OPT_CODES = 250  # 10 s of 25 Hz codes
_TRACE_SEED = 262_626


class CodecDecoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.codec = model.codec

    def forward(self, codes: torch.Tensor, code_lengths: torch.Tensor):
        return self.codec.decode(codes, code_lengths), self.codec.frames(code_lengths)


def max_codes(model) -> int:
    """The most codes one segment can have (the GPT's max_mel_tokens)."""
    return int(model.gpt.cfg.max_mel_tokens)


def code_inputs(rng: np.random.Generator, lengths: np.ndarray, book: int) -> dict[str, np.ndarray]:
    codes = np.zeros((len(lengths), int(lengths.max())), np.int64)
    for i, n in enumerate(lengths):
        codes[i, :n] = rng.integers(0, book, n)
    return {"codes": codes, "code_lengths": lengths.astype(np.int64)}


def export_component(model, out_dir: Path, opts: ExportOptions) -> Component:
    cfg = model.codec.cfg
    hidden, book = int(cfg.hidden_size), int(cfg.codebook_size)
    ex = code_inputs(np.random.default_rng(_TRACE_SEED), np.array([9, 6]), book)
    n_max = max_codes(model)
    spec = GraphSpec(
        name=NAME, module=CodecDecoderGraph(model), example=tuple(torch.from_numpy(v) for v in ex.values()),
        inputs=("codes", "code_lengths"), outputs=("semantic", "semantic_lengths"),
        dynamic_axes={"codes": {0: "batch", 1: "codes_len"}, "code_lengths": {0: "batch"},
                      "semantic": {0: "batch", 1: "frames"}, "semantic_lengths": {0: "batch"}},
        dims={"batch": dim(1, 1, opts.max_batch), "codes_len": dim(1, OPT_CODES, n_max),
              "frames": dim(2, 2 * OPT_CODES, 2 * n_max)},
        output_shapes={"semantic": ("batch", "frames", hidden), "semantic_lengths": ("batch",)},
        extra={"hidden": hidden, "codebook_size": book, "frames_per_code": 2,
               "semantic": "up(nearest_x2(decoder(vq2emb(codes)))) [B, 2N, hidden] (codec.pth's decode)",
               "padding": "exact: a padded row equals the row alone (verified); zeros past semantic_lengths"},
    )
    return verified(export_graph(spec, out_dir, opts), out_dir, opts, verify_component, model)


def default_cases(model, opts: ExportOptions) -> list[Case]:
    rng = np.random.default_rng(opts.seed + 71)
    book = int(model.codec.cfg.codebook_size)
    lengths = [np.array([1]), lengths_for(rng, 2, 23, 1), lengths_for(rng, opts.max_batch, 80, 1), np.array([300])]
    return [Case(f"b{len(n)}xn{int(n.max())}{n.tolist()}", code_inputs(rng, n, book)) for n in lengths]


@torch.inference_mode()
def verify_component(model, out_dir: Path, comp: Component, opts: ExportOptions,
                     cases: list[Case] | None = None) -> Parity:
    """semantic vs Codec25.decode on the same padded batch, padded rows vs alone (exact, checked), full-length rows
    vs upstream's unmasked decode, zeros past each row's 2n, semantic_lengths == 2n exactly."""
    sess = session_for(out_dir, comp)
    graph = CodecDecoderGraph(model).eval()
    cases = cases if cases is not None else default_cases(model, opts)
    for case in cases:
        semantic, frames = sess.run(["semantic", "semantic_lengths"], case.feeds)
        want = 2 * case.feeds["code_lengths"]
        if not np.array_equal(frames, want):
            raise ParityError(f"{NAME}: semantic_lengths {frames.tolist()} != 2 * code_lengths = {want.tolist()}")
        for row, n in enumerate(case.feeds["code_lengths"].tolist()):
            if semantic[row, 2 * n:].any():
                raise ParityError(f"{NAME}: row {row} is not zero past its {2 * n} frames")

    def alone(feeds, ours, row):
        n = int(feeds["code_lengths"][row])
        codes = torch.from_numpy(feeds["codes"][row : row + 1, :n])
        unmasked = model.codec.decode(codes)  # upstream's call: no lengths
        return {"semantic": (ours["semantic"][row : row + 1, : 2 * n], unmasked.numpy())}

    report = run_cases(sess, cases, lambda f: {"semantic": graph(f["codes"], f["code_lengths"])[0]}, ("semantic",),
                       alone)
    return finish_parity(NAME, cases, report, alone_checked=True)
