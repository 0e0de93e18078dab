"""ONNX export of the speech feature encoder: w2v-BERT 2.0 up to layer 17 + wav2vec2bert_stats normalisation.

Graph `semantic_encoder`: input_features [B, F, 160] (SeamlessM4T stacked fbank), attention_mask [B, F] int64
-> features [B, F, hidden] = (hidden_states[17] - mean) / sqrt(var), engine_ref's SemanticFeatureEncoder
unchanged (transformers' Wav2Vec2BertModel built with 17 layers, eager attention).

The SeamlessM4T feature extractor stays in Python (numpy, as in the TensorRT port): its per-clip normalisation
and padding_value 1 are cheap and exact there; serving loads it from the `feature_extractor` asset
(preprocessor_config.json copied beside the graphs). Rows of a padded batch are exact: the model zeroes masked
frames, masks attention keys and the depthwise conv input, so each row's valid frames equal its solo run
(checked). Slice each row to its stacked frame count (`engine_ref.indextts2.features.stacked_frame_counts`),
which upstream keeps even for a last, masked frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine_ref.indextts2.features import W2V_LAYER
from export.common import ExportOptions, dim
from export.indextts2.common import (
    Case, GraphSpec, ParityReport, export_graph, finish_parity, lengths_for, run_cases, session_for, verified,
)
from export.manifest import Component, Parity

NAME = "semantic_encoder"
FEATURE_DIM = 160  # two stacked 80-bin fbank frames
FRAMES_PER_SECOND = 50
MAX_FRAMES = 3000  # 60 s of reference (REL uses references whole; HEAD cuts them to 15 s = 750 frames)
OPT_FRAMES = 500
PAD_VALUE = 1.0  # the extractor's padding_value
_TRACE_SEED = 424_242


class SemanticEncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder = model.semantic.encoder

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features, attention_mask)


def _hidden(model) -> int:
    return int(model.semantic.encoder.w2v_bert.config.hidden_size)


def _inputs(rng: np.random.Generator, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Normalised-fbank-like features (per-bin unit scale), padded with the extractor's padding value."""
    frames = int(lengths.max())
    feats = np.full((len(lengths), frames, FEATURE_DIM), PAD_VALUE, np.float32)
    mask = np.zeros((len(lengths), frames), np.int64)
    for i, n in enumerate(lengths):
        feats[i, :n] = rng.standard_normal((n, FEATURE_DIM))
        mask[i, :n] = 1
    return {"input_features": feats, "attention_mask": mask}


def export_component(model, out_dir: Path, opts: ExportOptions) -> Component:
    example = _inputs(np.random.default_rng(_TRACE_SEED), np.array([23, 17]))
    axes = {0: "batch", 1: "frames"}
    spec = GraphSpec(
        name=NAME, module=SemanticEncoderGraph(model),
        example=(torch.from_numpy(example["input_features"]), torch.from_numpy(example["attention_mask"])),
        inputs=("input_features", "attention_mask"), outputs=("features",),
        dynamic_axes={"input_features": axes, "attention_mask": axes, "features": axes},
        dims={"batch": dim(1, 1, opts.max_batch), "frames": dim(1, OPT_FRAMES, MAX_FRAMES)},
        output_shapes={"features": ("batch", "frames", _hidden(model))},
        extra={
            "layer": W2V_LAYER, "hidden": _hidden(model), "input_dim": FEATURE_DIM,
            "frames_per_second": FRAMES_PER_SECOND, "pad_value": PAD_VALUE,
            "extractor": "SeamlessM4TFeatureExtractor in Python (asset feature_extractor); this graph starts at "
                         "its input_features",
            "normalisation": "(hidden_states[17] - mean) / sqrt(var) of wav2vec2bert_stats.pt, inside the graph",
            "padding": "exact: a padded row's valid frames equal the row alone (verified); slice each row to its "
                       "stacked frame count",
        },
    )
    return verified(export_graph(spec, out_dir, opts), out_dir, opts, verify_component, model)


def default_cases(opts: ExportOptions) -> list[Case]:
    rng = np.random.default_rng(opts.seed + 11)
    lengths = [np.array([1]), lengths_for(rng, 2, 40, 2), lengths_for(rng, opts.max_batch, 120, 1), np.array([300])]
    return [Case(f"b{len(n)}xf{int(n.max())}{n.tolist()}", _inputs(rng, n)) for n in lengths]


@torch.inference_mode()
def verify_component(model, out_dir: Path, comp: Component, opts: ExportOptions,
                     cases: list[Case] | None = None) -> Parity:
    """ORT vs engine_ref on padded batches; each padded row also vs its solo engine_ref run (exact, checked)."""
    sess = session_for(out_dir, comp)
    graph = SemanticEncoderGraph(model).eval()
    cases = cases if cases is not None else default_cases(opts)

    def reference(feeds):
        return {"features": graph(feeds["input_features"], feeds["attention_mask"])}

    def alone(feeds, ours, row):
        n = int(feeds["attention_mask"][row].sum())
        if n == feeds["attention_mask"].shape[1]:
            return {}
        solo = graph(torch.from_numpy(feeds["input_features"][row : row + 1, :n]), torch.ones(1, n, dtype=torch.long))
        return {"features": (ours["features"][row : row + 1, :n], solo.numpy())}

    report = run_cases(sess, cases, reference, ("features",), alone, ParityReport())
    return finish_parity(NAME, cases, report, alone_checked=True)
