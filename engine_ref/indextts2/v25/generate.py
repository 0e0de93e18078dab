"""IndexTTS-2.5 code generation on the shared decoder (engine_ref.generate / beam_search), 3 conditioning rows.

Sequence layout (upstream prepare_gpt_inputs / inference_speech in campplus mode):
    prefill:  conds [3] | text_emb([0] + ids + [1]) + text_pos 0..L+1 + lang_emb(lang) | mel_emb(8192) @ mel pos 0
              (ids = the segment's encode(prefix + text) + [1] with every 0/1 dropped first)
    step k:   mel_emb(code_k) @ mel pos k + 1   (same mask arithmetic as 1.x / 2.0)
Upstream always left-pads the B = 1 prefix by at least one masked row (its text_tokens carry a trailing stop id
that prepare_gpt_inputs drops): masked keys get zero attention weight, so the result is the unpadded one here.
The repetition penalty sees upstream's placeholder prompt, {1, 8192} as a set (`engine_ref.sampling.initial_seen`).
Defaults are 2.0's (3-beam sampling, T 0.8, top-k 30, top-p 0.8, rep-penalty 10, 1500 codes).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from engine_ref.beam_search import decode_beams
from engine_ref.generate import DecodeOutput, build_prefix, decode_sampling, generation_ids
from engine_ref.indextts2.gpt.generate import V2_GENERATION_DEFAULTS, check_text_lengths
from engine_ref.indextts2.v25.gpt import UnifiedVoiceV25, tag_text_ids
from engine_ref.sampling import GenerationParams

log = logging.getLogger("engine_ref.indextts2.v25.generate")

__all__ = ["V25_GENERATION_DEFAULTS", "generation_text_ids", "generation_prefix_v25", "generate_codes_v25"]

V25_GENERATION_DEFAULTS = V2_GENERATION_DEFAULTS  # infer_v2_5's defaults are 2.0's


def generation_text_ids(model: UnifiedVoiceV25, text_ids: Sequence[Sequence[int]],
                        lang_ids: Sequence[int]) -> list[list[int]]:
    """Each segment's ids with start/stop text dropped (upstream), then tagged with its language."""
    cfg = model.cfg
    if len(lang_ids) != len(text_ids):
        raise ValueError(f"{len(text_ids)} segments but {len(lang_ids)} language ids")
    return [tag_text_ids(generation_ids(ids, cfg.start_text_token, cfg.stop_text_token), lang, cfg.text_vocab)
            for ids, lang in zip(text_ids, lang_ids)]


def generation_prefix_v25(model: UnifiedVoiceV25, conds: torch.Tensor, text_ids: Sequence[Sequence[int]],
                          lang_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill embeddings [B, P, D] and key mask [B, P] (left padded) from raw segment ids."""
    return build_prefix(model, conds, generation_text_ids(model, text_ids, lang_ids))  # type: ignore[arg-type]


def generate_codes_v25(
    model: UnifiedVoiceV25,
    conds: torch.Tensor,
    text_ids: Sequence[Sequence[int]],
    lang_ids: Sequence[int],
    params: GenerationParams = V25_GENERATION_DEFAULTS,
    seeds: Sequence[int] | None = None,
) -> list[DecodeOutput]:
    """Codes of each segment of one bucket, cut before the first stop code (see the 2.0 `generate_codes`)."""
    cfg = model.cfg
    params.validate(cfg)  # type: ignore[arg-type]
    tagged = generation_text_ids(model, text_ids, lang_ids)
    check_text_lengths(cfg, tagged)
    seeds = [0] * len(tagged) if seeds is None else list(seeds)
    if len(seeds) != len(tagged):
        raise ValueError(f"{len(tagged)} segments but {len(seeds)} seeds")
    decode = decode_sampling if params.num_beams == 1 else decode_beams
    outs = decode(model, conds, tagged, [params] * len(tagged), seeds)  # type: ignore[arg-type]
    for i, out in enumerate(outs):
        if not out.stopped:
            log.warning("segment %d: generation stopped at max_mel_tokens (%d) without a stop code", i,
                        params.max_mel_tokens)
    return outs
