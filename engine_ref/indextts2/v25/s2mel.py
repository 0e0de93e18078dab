"""IndexTTS-2.5's s2mel glue: codec-decoded semantics regulated to the target mel length (infer_v2_5 at HEAD).

    S_infer = codec.decode(codes)                                   [B, 2N, hidden] (50 Hz from 25 Hz codes)
    target  = int(2N * 1.72 * duration_factor)                      Python float (double) arithmetic, truncated
    cond    = length_regulator(S_infer, 2N, target)                 [B, target, channels]
    prompt  = length_regulator(spk_cond_emb, T_w, T_ref)            the normalised w2v layer-17 features (2.0:
                                                                    the codec-quantised S_ref)
then the CFM, the vocoder and everything after are 2.0's. `duration_factor` (upstream's `infer(...,
duration_factor=1.0)`) only stretches the s2mel target; it must lie in [0.5, 2.0] here (upstream does not check).
The float arithmetic differs from 2.0's target (float32 product there): int(2N * 1.72 * f) in double, as written
upstream, e.g. 25 codes (50 frames) give 86 frames.
"""

from __future__ import annotations

from typing import Sequence

import torch

from engine_ref.errors import InputError
from engine_ref.indextts2.s2mel import S2Mel
from engine_ref.indextts2.v25.codec_decoder import Codec25

__all__ = ["MEL_FRAMES_PER_SEMANTIC_FRAME", "DURATION_FACTOR_RANGE", "check_duration_factor",
           "target_mel_frames_v25", "target_condition_v25", "prompt_condition_v25"]

MEL_FRAMES_PER_SEMANTIC_FRAME = 1.72
DURATION_FACTOR_RANGE = (0.5, 2.0)


def check_duration_factor(value: object) -> float:
    lo, hi = DURATION_FACTOR_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise InputError(f"duration_factor {value!r} is outside [{lo:g}, {hi:g}]",
                         "pass a number between 0.5 (faster) and 2.0 (slower); 1.0 keeps the natural pace")
    return float(value)


def target_mel_frames_v25(code_lengths: Sequence[int], duration_factor: float = 1.0) -> list[int]:
    """int(2N * 1.72 * duration_factor) per segment (double precision, left to right, as upstream)."""
    return [int(2 * int(n) * MEL_FRAMES_PER_SEMANTIC_FRAME * duration_factor) for n in code_lengths]


def target_condition_v25(s2mel: S2Mel, codec: Codec25, codes: torch.Tensor, code_lengths: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """Codes [B, N] (padded) -> cond [B, max(targets), channels], zeros past each row's target."""
    semantic = codec.decode(codes, code_lengths)  # masks multiply full-length rows by 1: upstream's values
    return s2mel.length_regulator(semantic, codec.frames(code_lengths), targets)


def prompt_condition_v25(s2mel: S2Mel, features: torch.Tensor, ref_mel_frames: int) -> torch.Tensor:
    """Speaker features [1, T_w, hidden] -> prompt condition [1, T_ref, channels]."""
    return s2mel.prompt_condition(features, ref_mel_frames)
