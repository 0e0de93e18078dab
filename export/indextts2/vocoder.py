"""ONNX export of BigVGAN v2 (22.05 kHz, 80 bands, 256x): mel [B, 80, T] -> waveform [B, 256 T] in [-1, 1].

The graph is engine_ref's BigVGANv2.forward unchanged (weight norm folded by the loader; anti-aliased SnakeBeta as
plain pad/conv/elementwise ops; the final clamp), with the channel axis squeezed. Upstream vocodes one segment's
generated mel at a time, in fp32; PCM16 is clamp(32767 * wav, +-32767) truncated (engine_ref.audio.to_pcm16).

Rows are independent, but right-padding a shorter row changes its last samples (the convolutions reach past its
end): the gap is measured (`padded_vs_alone`, not checked). Batch equal lengths, or vocode each segment alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.common import ExportOptions, dim
from export.indextts2.common import Case, GraphSpec, export_graph, finish_parity, run_cases, session_for, verified
from export.manifest import Component, Parity

NAME = "vocoder"
MIN_FRAMES = 1
OPT_FRAMES = 430  # 5 s
MAX_FRAMES = 8192  # 95 s; one segment has at most floor(1.72 * 1816) = 3123 frames
_TRACE_SEED = 121_212


class VocoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vocoder = model.vocoder

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.vocoder(mel).squeeze(1)


def _mel(rng: np.random.Generator, batch: int, frames: int, bands: int) -> np.ndarray:
    return rng.normal(-5.0, 2.0, (batch, bands, frames)).astype(np.float32)


def export_component(model, out_dir: Path, opts: ExportOptions) -> Component:
    voc = model.vocoder
    bands, spl = voc.cfg.num_mels, voc.samples_per_frame
    ex = _mel(np.random.default_rng(_TRACE_SEED), 2, 9, bands)
    spec = GraphSpec(
        name=NAME, module=VocoderGraph(model), example=(torch.from_numpy(ex),), inputs=("mel",), outputs=("waveform",),
        dynamic_axes={"mel": {0: "batch", 2: "mel_frames"}, "waveform": {0: "batch", 1: "samples"}},
        dims={"batch": dim(1, 1, opts.max_batch), "mel_frames": dim(MIN_FRAMES, OPT_FRAMES, MAX_FRAMES),
              "samples": dim(MIN_FRAMES * spl, OPT_FRAMES * spl, MAX_FRAMES * spl)},
        output_shapes={"waveform": ("batch", "samples")},
        extra={
            "family_vocoder": "BigVGAN v2 (nvidia/bigvgan_v2_22khz_80band_256x)", "mel_bins": bands,
            "samples_per_frame": spl, "sample_rate": voc.sampling_rate, "samples": "mel_frames * samples_per_frame",
            "waveform_range": [-1.0, 1.0],
            "pcm16": "clamp(32767 * waveform, -32767, 32767) truncated toward zero (engine_ref.audio.to_pcm16)",
            "padding": "rows independent; right-padding changes a row's last samples (padded_vs_alone, measured): "
                       "batch equal lengths or vocode alone",
        },
    )
    return verified(export_graph(spec, out_dir, opts), out_dir, opts, verify_component, model)


@torch.inference_mode()
def verify_component(model, out_dir: Path, comp: Component, opts: ExportOptions,
                     cases: list[Case] | None = None) -> Parity:
    sess = session_for(out_dir, comp)
    graph = VocoderGraph(model).eval()
    bands, spl = model.vocoder.cfg.num_mels, model.vocoder.samples_per_frame
    rng = np.random.default_rng(opts.seed + 71)
    if cases is None:
        shapes = ((1, 1), (1, 3), (2, 17), (opts.max_batch, 24), (1, 64))
        cases = [Case(f"b{b}xt{t}", {"mel": _mel(rng, b, t, bands)}) for b, t in shapes]

    def alone(feeds, ours, row):  # row 0's first half as its own input: the gap right padding leaves
        mel = feeds["mel"]
        if row or mel.shape[0] < 2 or mel.shape[2] < 4:
            return {}
        n = mel.shape[2] // 2
        padded = mel[row : row + 1].copy()
        padded[:, :, n:] = -11.5  # log(1e-5): the silence floor of the mel
        solo = graph(torch.from_numpy(padded[:, :, :n])).numpy()
        full = graph(torch.from_numpy(padded)).numpy()[:, : n * spl]
        return {"waveform": (full, solo)}

    report = run_cases(sess, cases, lambda f: {"waveform": graph(f["mel"])}, ("waveform",), alone)
    return finish_parity(NAME, cases, report, alone_checked=False,
                         alone_note="engine_ref on a row padded with log(1e-5) vs the row alone (a model property)")
