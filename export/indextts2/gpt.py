"""ONNX export of IndexTTS2's GPT decoder: the 1.x prefill and decode-step graphs, run on UnifiedVoiceV2.

The graphs are exactly export/gpt.py's (`gpt_prefill`, `gpt_decode`: same tensor names, KV layout, positions and
masks; see that module), so export.runtime.OrtDecoder, model_repository's DecoderScheduler and the weight-only
int8/int4 and fp16 variants of export/precision.py apply unchanged. What differs is recorded in `extra`:

- conds has 34 rows, not 32: the 32 speaker latents + emovec, then speed_emb[1] and speed_emb[0]
  (`cond_rows` = `num_latents` = 34; `speaker_latents` = 32);
- generation drops text ids 0/1 before wrapping them in start/stop; the latent pass does not (`text_ids`);
- the latent pass is OrtDecoder.latents (prefill, then the codes replayed teacher-forced through gpt_decode with
  T > 1): upstream's separate forward pass, positions start 0, code k at k (not the generation positions);
- upstream's decoding defaults (3-beam sampling, T 0.8, top-k 30, top-p 0.8, repetition penalty 10, 1500 codes).

TensorRT: the decode graph gets two profiles, `step` (one new token: generation) and `replay` (the latent pass).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from engine_ref.families import INDEXTTS2
from engine_ref.indextts2.gpt import V2_GENERATION_DEFAULTS
from export import gpt as gpt_graphs
from export.common import ExportOptions
from export.manifest import Component

PREFILL = gpt_graphs.PREFILL
DECODE = gpt_graphs.DECODE


def v2_extra(model) -> dict:
    cfg = model.gpt.cfg
    return {
        "family": INDEXTTS2,
        "cond_rows": cfg.cond_rows,
        "num_latents": cfg.cond_rows,
        "speaker_latents": cfg.condition_num_latent,
        "conds": "(speaker latents + emovec) ‖ speed_emb[1] ‖ speed_emb[0]",
        "text_ids": "generation: ids equal to start/stop text dropped, then [start] + ids + [stop]; latent pass: "
                    "the raw ids wrapped (not dropped)",
        "latent_pass": "OrtDecoder.latents: prefill (start at mel position 0) + codes 1..n-1 replayed at positions "
                       "1..n-1 through gpt_decode; latent k = final_norm(hidden) of input position k",
        "generation_defaults": {k: v for k, v in asdict(V2_GENERATION_DEFAULTS).items() if v is not None},
    }


def _decode_profiles(decode: Component) -> list[dict]:
    def r(name: str) -> list[int]:
        d = decode.dims[name]
        return [d.min, d.opt, d.max]

    new = decode.dims["new_len"]
    return [
        {"name": "step", "dims": {"new_len": [1, 1, 1]}},
        {"name": "replay", "dims": {"new_len": [new.min, min(256, new.max), new.max], "past_len": r("past_len"),
                                    "total_len": r("total_len")}},
    ]


def export_components(model, out_dir: Path, opts: ExportOptions) -> dict[str, Component]:
    """gpt_prefill and gpt_decode (verified by export/gpt.py's own verifiers) with the v2 facts in `extra`."""
    extra = v2_extra(model)
    prefill = gpt_graphs.export_prefill(model, Path(out_dir), opts)
    decode = gpt_graphs.export_decode(model, Path(out_dir), opts)
    return {
        PREFILL: replace(prefill, extra={**prefill.extra, **extra}),
        DECODE: replace(decode, extra={**decode.extra, **extra, "trt_profiles": _decode_profiles(decode)}),
    }
