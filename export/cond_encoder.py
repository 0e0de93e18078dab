"""ONNX export of the conditioning encoder: reference log-mel -> GPT conditioning latents + speaker embedding.

Both outputs come from the same reference mel and are cached together by serving (keyed by the audio hash), so
they live in one graph: the Conformer + Perceiver (`UnifiedVoice.conditioning`) and BigVGAN's ECAPA-TDNN
(`BigVGAN.speaker_embedding`). The graph wraps engine_ref's modules unchanged; padding is handled by the masks
those modules build from `mel_lengths`, so one padded batch serves references of different lengths.

What the graph does NOT check (engine_ref does it in Python, skipped while tracing): frame count within
[min, max] of the `frames` DimRange, and every mel_lengths value in [min frames, padded frames]. Serving must
validate both against the manifest before calling the graph.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from engine_ref.errors import ModelFilesError
from engine_ref.indextts.loader import LoadedModel
from engine_ref.mel import HOP_LENGTH, LOG_CLAMP, N_MELS, SAMPLE_RATE
from engine_ref.modules import conformer, ecapa
from export.common import (
    FP32_TOLERANCE, ErrorMeter, ExportOptions, check_tolerance, dim, export_onnx, graph_io, session,
)
from export.manifest import Component, DimRange, Parity, component_digest

NAME = "cond_encoder"
# The speaker encoder's "same" reflect padding needs 5 frames; the Conformer's subsampling only 3.
MIN_FRAMES = max(conformer.MIN_MEL_FRAMES, ecapa.MIN_FRAMES)
OPT_SECONDS = 10.0  # a typical reference clip
# Serving should right-pad with log-mel silence: it is what the reference's own edges look like, so the ECAPA
# convolutions (which do see padding near each row's end) are disturbed least.
PAD_VALUE = math.log(LOG_CLAMP)
_TRACE_SEED = 987_654_321  # tracing inputs come from a seed no verification case uses


class CondEncoderGraph(nn.Module):
    """The exported function: engine_ref's own modules, no math of ours."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.gpt = model.gpt
        self.bigvgan = model.bigvgan

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conds = self.gpt.conditioning(mel, mel_lengths)
        speaker = self.bigvgan.speaker_embedding(mel.transpose(1, 2), mel_lengths)
        return conds, speaker


@dataclass(frozen=True)
class CondCase:
    """One verification batch: padded frame count and the valid frames of each row."""

    lengths: tuple[int, ...]

    @property
    def frames(self) -> int:
        return max(self.lengths)

    def label(self) -> str:
        return f"b{len(self.lengths)}xf{self.frames}{list(self.lengths)}"


def frame_range(model: LoadedModel) -> DimRange:
    hi = model.gpt.max_mel_frames
    opt = min(hi, round(OPT_SECONDS * SAMPLE_RATE / HOP_LENGTH))
    return dim(MIN_FRAMES, opt, hi)


def default_cases(model: LoadedModel, opts: ExportOptions) -> tuple[CondCase, ...]:
    """Batch 1, 2 and max_batch, shortest to longest, rows of different lengths (seeded by opts.seed)."""
    rng = np.random.default_rng(opts.seed)
    frames = frame_range(model)

    def padded(batch: int, longest: int) -> CondCase:
        rest = rng.integers(MIN_FRAMES, longest + 1, size=batch - 1)
        return CondCase((longest, *(int(x) for x in rest)))

    return (
        CondCase((MIN_FRAMES,)),
        padded(2, MIN_FRAMES + 2 + int(rng.integers(0, 60))),
        padded(opts.max_batch, 150 + int(rng.integers(0, 100))),
        # The longest input reaches the last row of the stored position table: checks the traced slice.
        CondCase((frames.max,)),
    )


def _random_mel(rng: np.random.Generator, case: CondCase, bins: int) -> np.ndarray:
    """Log-mel-like values (natural log of magnitudes), right-padded with silence."""
    mel = np.full((len(case.lengths), bins, case.frames), PAD_VALUE, dtype=np.float32)
    for i, n in enumerate(case.lengths):
        mel[i, :, :n] = rng.normal(-4.0, 2.5, size=(bins, n))
    return mel


def export_component(model: LoadedModel, out_dir: Path, opts: ExportOptions) -> Component:
    """Write out_dir/cond_encoder.onnx, describe it, and (opts.verify) verify it against engine_ref."""
    out_dir = Path(out_dir)
    path = out_dir / f"{NAME}.onnx"
    gcfg, vcfg = model.config.gpt, model.config.bigvgan
    trace_rng = np.random.default_rng(_TRACE_SEED)
    trace_case = CondCase((48, 29))
    example = (torch.from_numpy(_random_mel(trace_rng, trace_case, N_MELS)), torch.tensor(trace_case.lengths))
    with warnings.catch_warnings():
        # engine_ref's static input checks run once on the example and are (correctly) absent from the graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        external = export_onnx(
            CondEncoderGraph(model), example, path,
            input_names=["mel", "mel_lengths"], output_names=["conds", "speaker_embedding"],
            dynamic_axes={"mel": {0: "batch", 2: "frames"}, "mel_lengths": {0: "batch"},
                          "conds": {0: "batch"}, "speaker_embedding": {0: "batch"}},
            opset=opts.opset,
        )
    pin_output_shapes(path, {
        "conds": ("batch", gcfg.condition_num_latent, gcfg.model_dim),
        "speaker_embedding": ("batch", vcfg.speaker_embedding_dim, 1),
    })
    inputs, outputs = graph_io(path)
    dims = {"batch": dim(1, 1, opts.max_batch), "frames": frame_range(model)}
    check_dims_named(NAME, (*inputs, *outputs), dims)
    comp = Component(
        name=NAME, file=path.name, sha256="", opset=opts.opset, precision="fp32", inputs=inputs, outputs=outputs,
        dims=dims, parity=None, external_data=external,
        extra={
            "mel_bins": N_MELS,
            "num_latents": gcfg.condition_num_latent,
            "model_dim": gcfg.model_dim,
            "speaker_embedding_dim": vcfg.speaker_embedding_dim,
            "mel_lengths_range": [MIN_FRAMES, "frames"],
            "mel_pad_value": PAD_VALUE,
            "mel": "log(clamp(mel, 1e-7)) of the 24 kHz reference (engine_ref.mel.LogMelSpectrogram), time last",
            "padding": "conds: a padded row equals the row alone (verified); speaker_embedding: pooling is masked "
                       "but ECAPA convolutions see the padding near each row's end, so a padded row approximates "
                       "the row alone (gap in speaker_embedding_padded_vs_alone, shrinks roughly as 1/valid frames); "
                       "encode alone for bit parity with upstream",
            "unchecked_in_graph": "frames range and mel_lengths in [min, frames]: validate before calling",
        },
    )
    comp = replace(comp, sha256=component_digest(out_dir, comp))
    if opts.verify:
        parity = verify_component(model, out_dir, comp, opts)
        gap = parity.extra["speaker_embedding_padded_vs_alone"]
        comp = replace(comp, parity=parity, extra={**comp.extra, "speaker_embedding_padded_vs_alone": gap})
    return comp


def verify_component(
    model: LoadedModel, out_dir: Path, comp: Component, opts: ExportOptions,
    cases: Sequence[CondCase] | None = None,
) -> Parity:
    """ONNX Runtime vs engine_ref on the same fresh padded batches; raises ParityError above FP32_TOLERANCE.

    Also checks that each padded row's conds equal engine_ref on the row alone, and measures (no check) the
    same gap for the speaker embedding.
    """
    sess = open_checked_session(Path(out_dir), comp)
    cases = tuple(cases) if cases is not None else default_cases(model, opts)
    rng = np.random.default_rng(opts.seed + 1)
    graph = CondEncoderGraph(model).eval()
    meters = {"conds": ErrorMeter(), "speaker_embedding": ErrorMeter()}
    conds_alone, spk_alone = ErrorMeter(), ErrorMeter()
    spk_gap_by_length: dict[int, float] = {}
    for case in cases:
        mel = _random_mel(rng, case, N_MELS)
        lengths = np.asarray(case.lengths, dtype=np.int64)
        ours = dict(zip(("conds", "speaker_embedding"), sess.run(["conds", "speaker_embedding"],
                                                                  {"mel": mel, "mel_lengths": lengths})))
        with torch.no_grad():
            ref = graph(torch.from_numpy(mel), torch.from_numpy(lengths))
            for name, r in zip(("conds", "speaker_embedding"), ref):
                meters[name].add(ours[name], r.numpy())
            if len(case.lengths) > 1:
                for i, n in enumerate(case.lengths):
                    alone = graph(torch.from_numpy(mel[i : i + 1, :, :n]), torch.tensor([n]))
                    conds_alone.add(ours["conds"][i : i + 1], alone[0].numpy())
                    row = ErrorMeter()
                    row.add(ours["speaker_embedding"][i : i + 1], alone[1].numpy())
                    spk_alone.max_abs = max(spk_alone.max_abs, row.max_abs)
                    spk_alone.max_rel = max(spk_alone.max_rel, row.max_rel)
                    if n < case.frames:
                        spk_gap_by_length[n] = max(spk_gap_by_length.get(n, 0.0), row.max_rel)
    for name, meter in meters.items():
        check_tolerance(f"{NAME}.{name}", meter, FP32_TOLERANCE)
    check_tolerance(f"{NAME}.conds (padded row vs the row alone)", conds_alone, FP32_TOLERANCE)
    return Parity(
        max_abs=max(m.max_abs for m in meters.values()),
        max_rel=max(m.max_rel for m in meters.values()),
        tolerance=FP32_TOLERANCE,
        cases=tuple(c.label() for c in cases),
        extra={
            **{name: {"max_abs": m.max_abs, "max_rel": m.max_rel} for name, m in meters.items()},
            "conds_padded_vs_alone": {"max_abs": conds_alone.max_abs, "max_rel": conds_alone.max_rel},
            # Known approximation, not checked: shrinks roughly as 1/length (the ECAPA convolutions reach ~11
            # frames past a row's end); keyed by the padded row's valid frames.
            "speaker_embedding_padded_vs_alone": {
                "max_abs": spk_alone.max_abs, "max_rel": spk_alone.max_rel,
                "max_rel_by_length": {str(n): spk_gap_by_length[n] for n in sorted(spk_gap_by_length)},
            },
        },
    )


# ---- helpers shared with export/vocoder.py ----

def pin_output_shapes(path: Path, shapes: Mapping[str, tuple[int | str, ...]]) -> None:
    """Write the known output shapes into the graph.

    The exporter's shape inference loses static dims through some ops (the conds came out as
    ['batch', 'Mulconds_dim_1', 'Mulconds_dim_2']); serving and TensorRT need the real ones. Weights kept in an
    external file stay where they are (the graph proto is rewritten without loading them).
    """
    model = onnx.load(str(path), load_external_data=False)
    for out in model.graph.output:
        if out.name not in shapes:
            continue
        want = shapes[out.name]
        shape = out.type.tensor_type.shape
        if len(shape.dim) != len(want):
            raise RuntimeError(f"{path.name}: output {out.name} has rank {len(shape.dim)}, expected {len(want)}")
        for d, w in zip(shape.dim, want):
            if isinstance(w, str):
                d.ClearField("dim_value")
                d.dim_param = w
            else:
                d.ClearField("dim_param")
                d.dim_value = w
    onnx.save(model, str(path))


def check_dims_named(component: str, tensors, dims: Mapping[str, DimRange]) -> None:
    """Every symbolic dim of the graph must be one we give a range for (catches exporter-invented names)."""
    for t in tensors:
        for d in t.shape:
            if isinstance(d, str) and d not in dims:
                raise RuntimeError(f"{component}: tensor {t.name} has symbolic dim {d!r} without a range {t.shape}")


def open_checked_session(out_dir: Path, comp: Component):
    """An ORT session on the component's graph, after checking the files against the recorded sha256."""
    path = out_dir / comp.file
    fix = f"re-run `triton-tts export` into {out_dir}"
    for fname in (comp.file, *comp.external_data):
        if not (out_dir / fname).is_file():
            raise ModelFilesError(f"artifact {fname} of component '{comp.name}' is missing from {out_dir}", fix)
    if comp.sha256 and component_digest(out_dir, comp) != comp.sha256:
        raise ModelFilesError(
            f"artifact {comp.file} of component '{comp.name}' does not match its sha256 (altered or corrupt)", fix
        )
    try:
        return session(path)
    except Exception as exc:  # ORT raises several unrelated types for unreadable graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFilesError(
            f"ONNX Runtime cannot load {comp.file} of component '{comp.name}' ({first[:200]})", fix
        ) from None
