"""IndexTTS2 generation: conditioning rows, the generation prefix, code generation and the latent pass.

The sequence layout is 1.x's with 34 conditioning rows instead of 32, so the shared code runs it unchanged:
    prefill:  conds [34] | text_emb([0] + ids + [1]) @ text pos 0..L+1 | mel_emb(8192) @ mel pos 0
              (ids equal to 0 or 1 are dropped first)
    step k:   mel_emb(code_k) @ mel pos k + 1   (k = 1, 2, ...; upstream's mask arithmetic skips pos 1)
    latents:  conds | text_emb([0] + ids + [1]) (ids NOT cleaned) | mel_emb([8192, c_1..c_N, 8193]) @ 0..N+1
              -> GPT-2 (ln_f) -> final_norm -> the mel part minus its last two rows = [N, D]
The repetition penalty sees upstream's placeholder prompt [1] * (36 + L) + [8192]: as a set, {1, 8192} — exactly
what `engine_ref.sampling.initial_seen` marks, so v2 shares it.

Upstream runs one segment at a time; a bucket of segments here is left-padded with a key mask, so each row
decodes exactly as alone, and each segment samples from its own seeded generator. Upstream also always samples
(infer_v2 passes do_sample=True whatever the caller asked); greedy is offered for tests and parity checks.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from typing import Sequence

import torch

from engine_ref.beam_search import decode_beams
from engine_ref.errors import InputError
from engine_ref.generate import DecodeOutput, build_prefix, decode_sampling, generation_ids, latent_pass
from engine_ref.indextts2.emotion import EmotionBank, EmotionPlan, apply_emotion_vector
from engine_ref.indextts2.gpt.model import UnifiedVoiceV2
from engine_ref.sampling import GenerationParams

log = logging.getLogger("engine_ref.indextts2.generate")

# infer_v2's defaults (REL and HEAD): 3-beam sampling, T 0.8, top-k 30, top-p 0.8, rep-penalty 10, 1500 new codes.
V2_GENERATION_DEFAULTS = GenerationParams(
    do_sample=True, temperature=0.8, top_p=0.8, top_k=30, repetition_penalty=10.0, num_beams=3,
    length_penalty=0.0, max_mel_tokens=1500,
)


def v2_generation_params(**overrides) -> GenerationParams:
    """Upstream IndexTTS2 defaults with the given fields replaced."""
    return replace(V2_GENERATION_DEFAULTS, **overrides)


@torch.inference_mode()
def final_emovec(
    model: UnifiedVoiceV2,
    speaker_features: torch.Tensor,
    emotion_features: torch.Tensor,
    plan: EmotionPlan,
    bank: EmotionBank | None = None,
    style: torch.Tensor | None = None,
    use_random: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """The emovec [1, D] a request conditions on (infer_v2's order of operations).

    emotion_features: the emotion reference's features (the speaker's own file, loaded on the 16 kHz emotion
    path, when plan.emotion_audio_is_speaker). With plan.weights, one row per category is picked (cosine to the
    CAMPPlus `style`, or `rng`) and mixed in: emovec_mat + (1 - sum w) * merged. Upstream picks the rows once per
    request, so call this once per request, not per segment.
    """
    emovec = model.merge_emovec(speaker_features, emotion_features, plan.merge_alpha)
    if plan.weights is None:
        return emovec
    if bank is None or (style is None and not use_random):
        raise ValueError("an emotion vector needs the emotion bank and the CAMPPlus style (or use_random)")
    rows = bank.select(style if style is not None else torch.zeros(1), use_random, rng)
    return apply_emotion_vector(emovec, bank.mix(rows, plan.weights).to(emovec.dtype), plan.weights)


@torch.inference_mode()
def make_conds(
    model: UnifiedVoiceV2, speaker_features: torch.Tensor, emovec: torch.Tensor,
    speaker_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Speaker features [1, T, 1024] + final emovec [1, D] -> conds [1, 34, D] (shared by every segment)."""
    return model.conditioning_rows(model.speaker_latents(speaker_features, speaker_lengths), emovec)


def generation_prefix(
    model: UnifiedVoiceV2, conds: torch.Tensor, text_ids: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill embeddings [B, P, D] and key mask [B, P] (left padded) from raw segment ids (0/1 dropped here)."""
    cfg = model.cfg
    clean = [generation_ids(ids, cfg.start_text_token, cfg.stop_text_token) for ids in text_ids]
    return build_prefix(model, conds, clean)  # type: ignore[arg-type]  # same interface as 1.x UnifiedVoice


def placeholder_prompt(cfg, text_len: int) -> list[int]:
    """Upstream's fake input_ids for one segment of `text_len` ids (what the repetition penalty sees)."""
    return [1] * (cfg.cond_rows + text_len + 2) + [cfg.start_mel_token]


def check_text_lengths(cfg, text_ids: Sequence[Sequence[int]]) -> None:
    """Each segment plus start/stop must fit text_pos_embedding (602 rows: 600 ids)."""
    for i, ids in enumerate(text_ids):
        if len(ids) + 2 > cfg.text_positions:
            raise InputError(
                f"text segment {i} has {len(ids)} tokens, the model takes at most {cfg.text_positions - 2}",
                "split the text into shorter segments (max_text_tokens_per_segment, default 120)",
            )


def generate_codes(
    model: UnifiedVoiceV2,
    conds: torch.Tensor,
    text_ids: Sequence[Sequence[int]],
    params: GenerationParams = V2_GENERATION_DEFAULTS,
    seeds: Sequence[int] | None = None,
) -> list[DecodeOutput]:
    """Codes of each segment of one bucket, cut before the first stop code (8193).

    text_ids are the raw segment ids (0/1 are dropped here, as upstream does before generation). Beam search
    (num_beams > 1) follows the old Hugging Face beam-sample semantics; one beam is plain sampling/greedy. A segment
    that reaches max_mel_tokens without a stop keeps all its codes and logs a warning (`stopped` is False).
    """
    cfg = model.cfg
    params.validate(cfg)  # type: ignore[arg-type]
    check_text_lengths(cfg, text_ids)
    if seeds is None:
        seeds = [0] * len(text_ids)
    if len(seeds) != len(text_ids):
        raise ValueError(f"{len(text_ids)} segments but {len(seeds)} seeds")
    clean = [generation_ids(ids, cfg.start_text_token, cfg.stop_text_token) for ids in text_ids]
    decode = decode_sampling if params.num_beams == 1 else decode_beams
    outs = decode(model, conds, clean, [params] * len(clean), list(seeds))  # type: ignore[arg-type]
    for i, out in enumerate(outs):
        if not out.stopped:
            log.warning(
                "segment %d: generation stopped at max_mel_tokens (%d) without a stop code; consider a smaller "
                "max_text_tokens_per_segment or a larger max_mel_tokens", i, params.max_mel_tokens,
            )
    return outs


def latent_pass_v2(
    model: UnifiedVoiceV2,
    conds: torch.Tensor,
    text_ids: Sequence[Sequence[int]],
    codes: Sequence[Sequence[int]],
) -> list[torch.Tensor]:
    """Teacher-forced pass (upstream UnifiedVoice.forward): one [1, N_i, D] latent per segment.

    text_ids are the raw (uncleaned) segment ids; codes are the generated codes without the stop code.
    """
    check_text_lengths(model.cfg, text_ids)
    limit = model.cfg.mel_positions - 2
    for i, c in enumerate(codes):
        if len(c) > limit:
            raise InputError(f"segment {i} has {len(c)} codes, the latent pass takes at most {limit}",
                             "generate with max_mel_tokens <= gpt.max_mel_tokens")
    return [lat.unsqueeze(0) for lat in latent_pass(model, conds, text_ids, codes)]  # type: ignore[arg-type]
