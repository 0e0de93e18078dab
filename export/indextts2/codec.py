"""ONNX export of the MaskGCT semantic codec: quantize (features -> codes + quantised embedding) and vq2emb.

- `semantic_codec`: features [B, T, hidden] (the semantic encoder's output), lengths [B] int64 -> codes [B, T]
  int64, embedding [B, T, hidden] = engine_ref's SemanticCodec.quantize with the mask built from `lengths`
  (the time-mixing convs see zeros past each row's end, so padded rows are exact; a full-length row is upstream's
  unmasked computation, x * 1 being exact). The embedding is S_ref, what s2mel's prompt condition regulates.
- `semantic_vq2emb`: codes [B, N] int64 -> embedding [B, N, hidden] = out_project(codebook[codes]) for EVERY
  row (upstream's `vq2emb(codes.unsqueeze(1))` decodes only row 0 of a batch; facts §6). s2mel_cond contains
  the same computation; this graph is the codec's own, for callers that need the embedding alone.

Codes are compared exactly; a code that differs is accepted only where engine_ref's own cosine scores of the two
codewords tie within CODE_TIE (float rounding of a near tie), and such frames are left out of the embedding error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.common import ExportOptions, ParityError, dim
from export.indextts2.common import (
    Case, GraphSpec, ParityReport, export_graph, finish_parity, lengths_for, run_cases, session_for, verified,
)
from export.indextts2.features import MAX_FRAMES, OPT_FRAMES
from export.manifest import Component, Parity

QUANTIZE = "semantic_codec"
VQ2EMB = "semantic_vq2emb"
CODE_TIE = 1e-5  # |score(ref code) - score(our code)| below which a different code is a float-rounding tie
MAX_CODES = 2048  # vq2emb rows: more than one segment's codes (max_mel_tokens 1815)
_TRACE_SEED = 515_151


def _mask(lengths: torch.Tensor, frames: int, like: torch.Tensor) -> torch.Tensor:
    return (torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]).to(like.dtype)


class QuantizeGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.codec = model.codec

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        codes, embedding = self.codec.quantize(features, _mask(lengths, features.shape[1], features))
        return codes, embedding


class Vq2EmbGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.codec = model.codec

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec.vq2emb(codes)


def _hidden(model) -> int:
    return int(model.codec.cfg.hidden_size)


def _features(rng: np.random.Generator, lengths: np.ndarray, hidden: int) -> dict[str, np.ndarray]:
    """Normalised-feature-like inputs (unit scale), zero padding."""
    feats = np.zeros((len(lengths), int(lengths.max()), hidden), np.float32)
    for i, n in enumerate(lengths):
        feats[i, :n] = rng.standard_normal((n, hidden))
    return {"features": feats, "lengths": lengths.astype(np.int64)}


def export_components(model, out_dir: Path, opts: ExportOptions) -> dict[str, Component]:
    hidden = _hidden(model)
    book = int(model.codec.cfg.codebook_size)
    ex = _features(np.random.default_rng(_TRACE_SEED), np.array([19, 11]), hidden)
    axes = {0: "batch", 1: "frames"}
    common = {"hidden": hidden, "codebook_size": book, "codebook_dim": int(model.codec.cfg.codebook_dim)}
    quantize = GraphSpec(
        name=QUANTIZE, module=QuantizeGraph(model),
        example=(torch.from_numpy(ex["features"]), torch.from_numpy(ex["lengths"])),
        inputs=("features", "lengths"), outputs=("codes", "embedding"),
        dynamic_axes={"features": axes, "lengths": {0: "batch"}, "codes": axes, "embedding": axes},
        dims={"batch": dim(1, 1, opts.max_batch), "frames": dim(1, OPT_FRAMES, MAX_FRAMES)},
        output_shapes={"codes": ("batch", "frames"), "embedding": ("batch", "frames", hidden)},
        extra={**common, "input": "semantic_encoder features, sliced or padded; lengths = valid frames per row",
               "embedding": "straight-through quantised embedding (S_ref), out_project(z_e + (codeword - z_e))",
               "padding": "exact: rows are masked before every time-mixing conv (verified vs each row alone)",
               "code_tie": CODE_TIE},
    )
    codes_ex = torch.randint(0, book, (2, 7), generator=torch.Generator().manual_seed(_TRACE_SEED))
    vq2emb = GraphSpec(
        name=VQ2EMB, module=Vq2EmbGraph(model), example=(codes_ex,), inputs=("codes",), outputs=("embedding",),
        dynamic_axes={"codes": {0: "batch", 1: "codes_len"}, "embedding": {0: "batch", 1: "codes_len"}},
        dims={"batch": dim(1, 1, opts.max_batch), "codes_len": dim(1, 256, MAX_CODES)},
        output_shapes={"embedding": ("batch", "codes_len", hidden)},
        extra={**common, "batch_correct": "every row decoded (upstream's vq2emb(codes.unsqueeze(1)) is B=1 only)"},
    )
    return {
        QUANTIZE: verified(export_graph(quantize, out_dir, opts), out_dir, opts, verify_quantize, model),
        VQ2EMB: verified(export_graph(vq2emb, out_dir, opts), out_dir, opts, verify_vq2emb, model),
    }


def quantize_cases(model, opts: ExportOptions) -> list[Case]:
    rng = np.random.default_rng(opts.seed + 21)
    h = _hidden(model)
    lengths = [np.array([1]), lengths_for(rng, 2, 37, 1), lengths_for(rng, opts.max_batch, 150, 1), np.array([400])]
    return [Case(f"b{len(n)}xf{int(n.max())}{n.tolist()}", _features(rng, n, h)) for n in lengths]


def _scores(model, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """engine_ref's nearest-codeword scores -(|e|^2 - 2 e.c + |c|^2) per frame [B, T, codebook]."""
    vq = model.codec.quantizer.quantizers[0]
    latent = model.codec.encoder(features.transpose(1, 2), _mask(lengths, features.shape[1], features).unsqueeze(1))
    z_e = vq.in_project(latent.transpose(1, 2))
    enc = F.normalize(z_e.transpose(1, 2), dim=-1)
    book = F.normalize(vq.codebook.weight)
    return -(enc.pow(2).sum(-1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1)[None, None])


@torch.inference_mode()
def verify_quantize(model, out_dir: Path, comp: Component, opts: ExportOptions,
                    cases: list[Case] | None = None) -> Parity:
    """Codes exact (ties excepted, see the module docstring), embeddings within fp32 tolerance; padded rows vs
    alone (exact, checked)."""
    sess = session_for(out_dir, comp)
    graph = QuantizeGraph(model).eval()
    cases = cases if cases is not None else quantize_cases(model, opts)
    report = ParityReport()
    ties = compared = 0
    for case in cases:
        codes, emb = sess.run(["codes", "embedding"], case.feeds)
        feats, lens = (torch.from_numpy(case.feeds[k]) for k in ("features", "lengths"))
        ref_codes, ref_emb = (t.numpy() for t in graph(feats, lens))
        valid = np.arange(codes.shape[1])[None, :] < case.feeds["lengths"][:, None]
        differ = (codes != ref_codes) & valid
        if differ.any():
            scores = _scores(model, feats, lens).numpy()
            b, t = np.nonzero(differ)
            gap = np.abs(scores[b, t, ref_codes[b, t]] - scores[b, t, codes[b, t]])
            if gap.max() > CODE_TIE:
                raise ParityError(f"{QUANTIZE}: ONNX Runtime picks other codes than engine_ref at {int(differ.sum())} "
                                  f"frame(s) (score gap up to {gap.max():.3g} > tie {CODE_TIE:g}); the graph is wrong")
            ties += int(differ.sum())
            emb = np.where(differ[..., None], ref_emb, emb)  # a tie's codeword is a different vector: not an error
        compared += int(valid.sum())
        report.meter("embedding").add(np.where(valid[..., None], emb, 0), np.where(valid[..., None], ref_emb, 0))
        for row, n in enumerate(case.feeds["lengths"].tolist()):
            if n == codes.shape[1]:
                continue
            solo_codes, solo_emb = graph(feats[row : row + 1, :n], lens[row : row + 1])
            same = codes[row, :n] == solo_codes[0].numpy()
            report.alone.add(np.where(same[:, None], emb[row, :n], 0), np.where(same[:, None], solo_emb[0].numpy(), 0))
            report.alone_cases += 1
    report.extra["codes"] = {"compared_frames": compared, "ties": ties}
    return finish_parity(QUANTIZE, cases, report, alone_checked=True)


@torch.inference_mode()
def verify_vq2emb(model, out_dir: Path, comp: Component, opts: ExportOptions) -> Parity:
    """Every row of a batch decoded (B = 1, 2, max_batch; lengths up to 300) vs engine_ref."""
    sess = session_for(out_dir, comp)
    graph = Vq2EmbGraph(model).eval()
    rng = np.random.default_rng(opts.seed + 22)
    book = int(model.codec.cfg.codebook_size)
    cases = [Case(f"b{b}xn{n}", {"codes": rng.integers(0, book, (b, n)).astype(np.int64)})
             for b, n in ((1, 1), (2, 17), (opts.max_batch, 300))]

    def alone(feeds, ours, row):  # rows are independent: row r of the batch vs row r decoded alone
        solo = graph(torch.from_numpy(feeds["codes"][row : row + 1]))
        return {"embedding": (ours["embedding"][row : row + 1], solo.numpy())}

    report = run_cases(sess, cases, lambda f: {"embedding": graph(f["codes"])}, ("embedding",), alone)
    return finish_parity(VQ2EMB, cases, report, alone_checked=True)
