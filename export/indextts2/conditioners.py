"""ONNX export of the GPT's speaker and emotion conditioners (Conformer + perceiver; the emotion-vector layers).

- `speaker_conditioner`: features [B, T, feature_dim] (normalised w2v-BERT layer 17), feature_lengths [B] ->
  latents [B, 32, model_dim] = UnifiedVoiceV2.speaker_latents (conditioning_encoder + perceiver_encoder).
- `emotion_conditioner`: the same inputs -> emovec [B, model_dim] = UnifiedVoiceV2.get_emovec
  (emo_conditioning_encoder + emo_perceiver_encoder, then emovec_layer and emo_layer).

Lengths: upstream hands both Conformers `features.shape[-1]` (the feature WIDTH, 1024) as the frame count, so a
lone reference has min(T, feature_dim) valid frames (`extra.upstream_lengths`); serving passes exactly that to
match upstream, or true lengths (the TensorRT port's choice; equal up to feature_dim frames).

Padding is NOT batch-exact, by engine_ref's design: the Conformers keep upstream's padded-frame behaviour
(glu(bias) of a masked frame reaches the depthwise conv, `mask_after_glu=False`), so a padded row differs from the
row alone near its end. The graphs equal engine_ref on the same padded batch (checked); the padded-row gap is
measured (`padded_vs_alone`, not checked). Conditioning runs once per reference (cached by serving): run each
reference alone (B = 1) for upstream's numbers.

What serving does with the outputs (numpy, float32, as engine_ref): emovec = base + alpha * (emo - base) (base =
emovec of the speaker's features, emo = of the emotion reference), the emotion-vector mix with the feat1/feat2
assets (engine_ref.indextts2.emotion), then conds = (latents + emovec) ‖ speed_emb[1] ‖ speed_emb[0] with the
`speed_emb` asset [2, model_dim] -> [B, 34, model_dim] for gpt_prefill (`export.indextts2.runtime.make_conds`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.common import ExportOptions, dim
from export.indextts2.common import (
    Case, GraphSpec, export_graph, finish_parity, lengths_for, run_cases, session_for, verified,
)
from export.indextts2.features import MAX_FRAMES, OPT_FRAMES
from export.manifest import Component, Parity

SPEAKER = "speaker_conditioner"
EMOTION = "emotion_conditioner"
MIN_FRAMES = 3  # the Conformer's conv2d2 subsampling: T' = (T - 3) // 2 + 1
_TRACE_SEED = 717_171
_NOTE = "engine_ref keeps upstream's padded-frame conv behaviour (mask_after_glu=False): not batch-exact"


class SpeakerConditionerGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.gpt = model.gpt

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> torch.Tensor:
        return self.gpt.speaker_latents(features, feature_lengths)


class EmotionConditionerGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.gpt = model.gpt

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> torch.Tensor:
        return self.gpt.get_emovec(features, feature_lengths)


def _inputs(rng: np.random.Generator, lengths: np.ndarray, width: int) -> dict[str, np.ndarray]:
    feats = np.zeros((len(lengths), int(lengths.max()), width), np.float32)
    for i, n in enumerate(lengths):
        feats[i, :n] = rng.standard_normal((n, width))
    return {"features": feats, "feature_lengths": lengths.astype(np.int64)}


def _common_extra(cfg) -> dict:
    return {
        "feature_dim": cfg.feature_dim, "model_dim": cfg.model_dim,
        "upstream_lengths": f"min(frames, {cfg.feature_dim}) per lone reference (upstream passes the feature width)",
        "min_frames": MIN_FRAMES,
        "padding": "equal to engine_ref on the same padded batch; a padded row is NOT its solo result "
                   "(padded_vs_alone, measured): condition each reference alone for upstream's numbers",
    }


def _example(cfg, opts: ExportOptions):
    ex = _inputs(np.random.default_rng(_TRACE_SEED), np.array([29, 18]), cfg.feature_dim)
    example = (torch.from_numpy(ex["features"]), torch.from_numpy(ex["feature_lengths"]))
    axes = {"features": {0: "batch", 1: "frames"}, "feature_lengths": {0: "batch"}}
    dims = {"batch": dim(1, 1, opts.max_batch), "frames": dim(MIN_FRAMES, OPT_FRAMES, MAX_FRAMES)}
    return example, axes, dims


def emotion_spec(model, opts: ExportOptions, mixing: str | None = None) -> GraphSpec:
    """The emotion conditioner's graph (shared by IndexTTS-2 and 2.5: the same modules and weights' names)."""
    cfg = model.gpt.cfg
    example, axes, dims = _example(cfg, opts)
    return GraphSpec(
        name=EMOTION, module=EmotionConditionerGraph(model), example=example,
        inputs=("features", "feature_lengths"), outputs=("emovec",),
        dynamic_axes={**axes, "emovec": {0: "batch"}}, dims=dims,
        output_shapes={"emovec": ("batch", cfg.model_dim)},
        extra={**_common_extra(cfg), "emo_latent_dim": cfg.emo_latent_dim,
               "emovec": "emo_layer(emovec_layer(emo_perceiver(emo_conformer(features))))",
               "mixing": mixing or "emovec = base + alpha * (emo - base); vector: mix + (1 - sum w) * emovec "
                                   "(in Python)"},
    )


def export_emotion(model, out_dir: Path, opts: ExportOptions, mixing: str | None = None) -> Component:
    """emotion_conditioner alone (IndexTTS-2.5 has no speaker conditioner)."""
    return verified(export_graph(emotion_spec(model, opts, mixing), out_dir, opts), out_dir, opts, verify_emotion,
                    model)


def export_components(model, out_dir: Path, opts: ExportOptions) -> dict[str, Component]:
    cfg = model.gpt.cfg
    example, axes, dims = _example(cfg, opts)
    speaker = GraphSpec(
        name=SPEAKER, module=SpeakerConditionerGraph(model), example=example,
        inputs=("features", "feature_lengths"), outputs=("latents",),
        dynamic_axes={**axes, "latents": {0: "batch"}}, dims=dims,
        output_shapes={"latents": ("batch", cfg.condition_num_latent, cfg.model_dim)},
        extra={**_common_extra(cfg), "num_latents": cfg.condition_num_latent, "cond_rows": cfg.cond_rows,
               "conds": "conds = (latents + emovec[:, None]) ‖ speed_emb[1] ‖ speed_emb[0] (asset speed_emb)"},
    )
    return {
        SPEAKER: verified(export_graph(speaker, out_dir, opts), out_dir, opts, verify_speaker, model),
        EMOTION: export_emotion(model, out_dir, opts),
    }


def default_cases(model, opts: ExportOptions) -> list[Case]:
    rng = np.random.default_rng(opts.seed + 41)
    width = model.gpt.cfg.feature_dim
    lengths = [np.array([MIN_FRAMES]), lengths_for(rng, 2, 45, MIN_FRAMES),
               lengths_for(rng, opts.max_batch, 130, MIN_FRAMES), np.array([400])]
    return [Case(f"b{len(n)}xf{int(n.max())}{n.tolist()}", _inputs(rng, n, width)) for n in lengths]


def _verify(name: str, graph: nn.Module, output: str, out_dir: Path, comp: Component, opts: ExportOptions,
            model, cases: list[Case] | None) -> Parity:
    sess = session_for(out_dir, comp)
    graph = graph.eval()
    cases = cases if cases is not None else default_cases(model, opts)

    def reference(feeds):
        return {output: graph(feeds["features"], feeds["feature_lengths"])}

    def alone(feeds, ours, row):
        n = int(feeds["feature_lengths"][row])
        if n == feeds["features"].shape[1]:
            return {}
        solo = graph(torch.from_numpy(feeds["features"][row : row + 1, :n]), torch.tensor([n]))
        return {output: (ours[output][row : row + 1], solo.numpy())}

    with torch.inference_mode():
        report = run_cases(sess, cases, reference, (output,), alone)
    return finish_parity(name, cases, report, alone_checked=False, alone_note=_NOTE)


def verify_speaker(model, out_dir: Path, comp: Component, opts: ExportOptions,
                   cases: list[Case] | None = None) -> Parity:
    return _verify(SPEAKER, SpeakerConditionerGraph(model), "latents", out_dir, comp, opts, model, cases)


def verify_emotion(model, out_dir: Path, comp: Component, opts: ExportOptions,
                   cases: list[Case] | None = None) -> Parity:
    return _verify(EMOTION, EmotionConditionerGraph(model), "emovec", out_dir, comp, opts, model, cases)
