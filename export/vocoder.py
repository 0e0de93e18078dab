"""ONNX export of the BigVGAN vocoder: GPT latents + speaker embedding -> 24 kHz waveform.

The graph is `BigVGAN.decode` unchanged (weight norm is already folded by engine_ref's loader; the anti-aliased
SnakeBeta activations are plain pad/conv/elementwise ops), with the channel axis squeezed so serving gets
[batch, samples] directly. Every convolution zero- or replicate-pads, so a single latent frame is a valid input.

Rows of a batch are independent, but right-padding a shorter row changes its last samples (the receptive field
reaches ~22 latent frames back, see tests/test_bigvgan.py): serving should batch equal lengths or cut each row
to length * samples_per_latent and accept differences near its end.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from engine_ref.indextts.loader import LoadedModel
from export.common import FP32_TOLERANCE, ErrorMeter, ExportOptions, check_tolerance, dim, export_onnx, graph_io
from export.cond_encoder import check_dims_named, open_checked_session, pin_output_shapes
from export.manifest import Component, DimRange, Parity, component_digest

NAME = "vocoder"
MIN_LATENT_FRAMES = 1
OPT_LATENT_FRAMES = 256  # ~11 s: two typical segments (upstream infer_fast vocodes two segments at a time)
# 2048 frames = 87 s at 1024 samples/latent: two full segments of v1.5's max_mel_tokens (800) with margin.
MAX_LATENT_FRAMES = 2048
RECEPTIVE_FIELD_LATENTS = 22  # measured in tests/test_bigvgan.py (how far padding reaches back into a row)
_TRACE_SEED = 123_456_789  # tracing inputs come from a seed no verification case uses


class VocoderGraph(nn.Module):
    """The exported function: engine_ref's BigVGAN.decode, channel axis dropped."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.bigvgan = model.bigvgan

    def forward(self, latents: torch.Tensor, speaker_embedding: torch.Tensor) -> torch.Tensor:
        return self.bigvgan.decode(latents, speaker_embedding).squeeze(1)


@dataclass(frozen=True)
class VocoderCase:
    batch: int
    latent_frames: int

    def label(self) -> str:
        return f"b{self.batch}xt{self.latent_frames}"


def latent_range(model: LoadedModel) -> DimRange:
    hi = max(MAX_LATENT_FRAMES, 2 * model.config.gpt.max_mel_tokens)
    return dim(MIN_LATENT_FRAMES, OPT_LATENT_FRAMES, hi)


@dataclass(frozen=True)
class VocoderContext:
    """How many latent frames before and after a sample's own frame can change it (BigVGAN's receptive field).

    Vocoding latents [a - left, b + right) and keeping the samples of frames [a, b) gives exactly the samples of
    vocoding the whole segment (chunked streaming relies on it); measured on the module, not assumed.
    """

    left: int
    right: int


#: Chunked streaming's budget: a chunk's samples may differ from the whole segment's by at most this much
#: (0.5 LSB of 16-bit PCM), far below what the int16 conversion itself rounds away.
CHUNK_TOLERANCE = 0.5 / 32767


@torch.no_grad()
def effective_context(graph: nn.Module, gpt_dim: int, speaker_dim: int, spl: int, exact: VocoderContext,
                      tolerance: float = CHUNK_TOLERANCE, chunk: int = 16) -> tuple[VocoderContext, float]:
    """The smallest symmetric context whose chunk output stays within `tolerance` of the whole segment's.

    Frames far from a sample still touch it (the exact receptive field), but by amounts far below one LSB; the
    look-ahead a stream waits for is what matters for time to first audio. Returns the context and the largest
    error measured with it (random unit-scale latents, three chunk positions)."""
    frames = 2 * max(exact.left, exact.right) + 4 * chunk
    gen = torch.Generator().manual_seed(_TRACE_SEED + 1)
    x = torch.randn(1, frames, gpt_dim, generator=gen)
    spk = torch.randn(1, speaker_dim, 1, generator=gen)
    whole = graph(x, spk).reshape(-1)

    def error(c: int) -> float:
        worst = 0.0
        for a in (max(exact.left, exact.right), frames // 2, frames - max(exact.left, exact.right) - chunk):
            lo, hi = max(0, a - c), min(frames, a + chunk + c)
            part = graph(x[:, lo:hi], spk).reshape(-1)[(a - lo) * spl:(a - lo + chunk) * spl]
            worst = max(worst, float((part - whole[a * spl:(a + chunk) * spl]).abs().max()))
        return worst

    full = max(exact.left, exact.right)
    lo, hi = 0, full
    while lo < hi:  # the error only shrinks as the context grows
        mid = (lo + hi) // 2
        if error(mid) <= tolerance:
            hi = mid
        else:
            lo = mid + 1
    return VocoderContext(lo, lo), error(lo)


@torch.no_grad()
def measure_context(graph: nn.Module, gpt_dim: int, speaker_dim: int, spl: int, frames: int = 96) -> VocoderContext:
    """Perturb the middle frame of a random input and see which output samples change (exactly zero elsewhere:
    same shapes, same data, same kernels)."""
    gen = torch.Generator().manual_seed(_TRACE_SEED)
    x = torch.randn(1, frames, gpt_dim, generator=gen)
    spk = torch.randn(1, speaker_dim, 1, generator=gen)
    mid = frames // 2
    y = x.clone()
    y[:, mid] += 1.0
    diff = (graph(y, spk) - graph(x, spk)).abs().reshape(-1)
    changed = torch.nonzero(diff > 0).reshape(-1)
    if changed.numel() == 0:
        return VocoderContext(0, 0)
    first, last = int(changed[0]) // spl, int(changed[-1]) // spl
    if first == 0 or last == frames - 1:
        raise RuntimeError(f"the vocoder's receptive field exceeds {frames // 2} frames: measure with more frames")
    # A change at frame `mid` reaches samples of frames [first, last]: a sample of frame f needs frames
    # [f - (last - mid), f + (mid - first)].
    return VocoderContext(left=last - mid, right=mid - first)


def default_cases(opts: ExportOptions) -> tuple[VocoderCase, ...]:
    """Batch 1, 2 and max_batch; 1 and 3 frames (the shortest inputs) up to beyond the receptive field."""
    return (
        VocoderCase(1, 1),
        VocoderCase(1, 3),
        VocoderCase(2, 17),
        VocoderCase(opts.max_batch, 24),
        VocoderCase(1, 3 * RECEPTIVE_FIELD_LATENTS),
    )


def _random_inputs(rng: np.random.Generator, case: VocoderCase, model: LoadedModel) -> dict[str, np.ndarray]:
    """Latents ~ final-LayerNorm outputs (unit scale); speaker embeddings at a similar scale."""
    cfg = model.config.bigvgan
    return {
        "latents": rng.standard_normal((case.batch, case.latent_frames, cfg.gpt_dim)).astype(np.float32),
        "speaker_embedding": rng.standard_normal((case.batch, cfg.speaker_embedding_dim, 1)).astype(np.float32),
    }


def export_component(model: LoadedModel, out_dir: Path, opts: ExportOptions) -> Component:
    """Write out_dir/vocoder.onnx, describe it, and (opts.verify) verify it against engine_ref."""
    out_dir = Path(out_dir)
    path = out_dir / f"{NAME}.onnx"
    cfg = model.config.bigvgan
    spl = model.bigvgan.samples_per_latent
    example = _random_inputs(np.random.default_rng(_TRACE_SEED), VocoderCase(2, 9), model)
    with warnings.catch_warnings():
        # engine_ref's static input checks run once on the example and are (correctly) absent from the graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        external = export_onnx(
            VocoderGraph(model), (torch.from_numpy(example["latents"]), torch.from_numpy(example["speaker_embedding"])),
            path, input_names=["latents", "speaker_embedding"], output_names=["waveform"],
            dynamic_axes={"latents": {0: "batch", 1: "latent_frames"}, "speaker_embedding": {0: "batch"},
                          "waveform": {0: "batch", 1: "samples"}},
            opset=opts.opset,
        )
    pin_output_shapes(path, {"waveform": ("batch", "samples")})
    inputs, outputs = graph_io(path)
    frames = latent_range(model)
    dims = {
        "batch": dim(1, min(4, opts.max_batch), opts.max_batch),
        "latent_frames": frames,
        "samples": dim(frames.min * spl, frames.opt * spl, frames.max * spl),
    }
    check_dims_named(NAME, (*inputs, *outputs), dims)
    graph = VocoderGraph(model).eval()
    context = measure_context(graph, cfg.gpt_dim, cfg.speaker_embedding_dim, spl)
    stream_ctx, stream_err = effective_context(graph, cfg.gpt_dim, cfg.speaker_embedding_dim, spl, context)
    comp = Component(
        name=NAME, file=path.name, sha256="", opset=opts.opset, precision="fp32", inputs=inputs, outputs=outputs,
        dims=dims, parity=None, external_data=external,
        extra={
            "samples_per_latent": spl,
            "sample_rate": cfg.sampling_rate,
            "gpt_dim": cfg.gpt_dim,
            "speaker_embedding_dim": cfg.speaker_embedding_dim,
            "samples": "latent_frames * samples_per_latent",
            "waveform_range": [-1.0, 1.0],
            "pcm16": "clamp(32767 * waveform) then truncate toward zero (upstream's .type(torch.int16))",
            "receptive_field_latents": RECEPTIVE_FIELD_LATENTS,
            "context_frames": {"left": context.left, "right": context.right},
            # What chunked streaming vocodes around each chunk: within chunk_tolerance of the whole segment.
            "stream_context_frames": {"left": stream_ctx.left, "right": stream_ctx.right,
                                      "max_error": stream_err, "chunk_tolerance": CHUNK_TOLERANCE},
            "padding": "rows are independent; right-padding a row changes its last ~receptive_field_latents frames "
                       "of audio: batch equal lengths or decode alone for exact parity",
        },
    )
    comp = replace(comp, sha256=component_digest(out_dir, comp))
    if opts.verify:
        comp = replace(comp, parity=verify_component(model, out_dir, comp, opts))
    return comp


def verify_component(
    model: LoadedModel, out_dir: Path, comp: Component, opts: ExportOptions,
    cases: Sequence[VocoderCase] | None = None,
) -> Parity:
    """ONNX Runtime vs engine_ref on fresh random latents/embeddings; raises ParityError above FP32_TOLERANCE."""
    sess = open_checked_session(Path(out_dir), comp)
    cases = tuple(cases) if cases is not None else default_cases(opts)
    rng = np.random.default_rng(opts.seed + 2)
    graph = VocoderGraph(model).eval()
    meter = ErrorMeter()
    for case in cases:
        feed = _random_inputs(rng, case, model)
        (ours,) = sess.run(["waveform"], feed)
        with torch.no_grad():
            ref = graph(torch.from_numpy(feed["latents"]), torch.from_numpy(feed["speaker_embedding"]))
        meter.add(ours, ref.numpy())
    check_tolerance(f"{NAME}.waveform", meter, FP32_TOLERANCE)
    return Parity(
        max_abs=meter.max_abs, max_rel=meter.max_rel, tolerance=FP32_TOLERANCE,
        cases=tuple(c.label() for c in cases),
        extra={"waveform": {"max_abs": meter.max_abs, "max_rel": meter.max_rel}},
    )
