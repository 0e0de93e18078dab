"""IndexTTS2 emotion control: the 8-value emotion vector, the emotion bank (feat1.pt / feat2.pt), alpha rules.

Order of the 8 values: happy, angry, sad, afraid, disgusted, melancholic, surprised, calm (upstream's
高兴 愤怒 悲伤 恐惧 反感 低落 惊讶 自然). feat1.pt holds speaker-style rows [73, 192], feat2.pt emotion rows
[73, D]; both are split per category by emo_num [3, 17, 2, 8, 4, 5, 10, 24]. For each category one row is
picked — the speaker row most cosine-similar to the reference's CAMPPlus style, or (use_random) a Python
`randint` — and the vector weights the matching emotion rows:

    emovec_mat = sum_i w_i * emo_row_i          [1, D]
    emovec     = emovec_mat + (1 - sum_i w_i) * emovec_from_audio

Alpha rules (which emotion audio, which alpha, which weights) differ between releases, see `plan_emotion`:
- REL (41577b8, the reference): a vector (or emotion text) drops the emotion audio; with no emotion audio the
  speaker's file is the emotion reference and alpha is forced to 1; the weights are used as given.
- HEAD (c605114 on): the same, but the weights are first scaled by clamp(alpha, 0, 1) and truncated to 4
  decimals (only when the scale is not 1).
Validation is stricter than upstream's `infer` (which checks nothing): the WebUI's rules are applied, see
`validate_emotion_vector`. Randomness comes only from the `random.Random` the caller passes (no global state).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from engine_ref.errors import CheckpointError, InputError, ModelFilesError

EMOTIONS = ("happy", "angry", "sad", "afraid", "disgusted", "melancholic", "surprised", "calm")
EMO_NUM = (3, 17, 2, 8, 4, 5, 10, 24)  # config.yaml emo_num: rows per category in feat1.pt / feat2.pt
MAX_WEIGHT = 1.2  # QwenEmotion's clamp; the WebUI sliders stop at 1.0
MAX_WEIGHT_SUM = 1.5  # WebUI rule: "the emotion vector's sum may not exceed 1.5"

AlphaMode = Literal["rel", "head"]


def validate_emo_alpha(alpha: float) -> float:
    """emo_alpha must be a number in [0, 1] (REL's WebUI slider went to 1.6; extrapolation is not offered)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise InputError(
            f"emo_alpha={alpha!r} is out of range", "pass an emo_alpha in [0, 1] (1 = the emotion audio only)"
        )
    return float(alpha)


def validate_emotion_vector(
    values: Sequence[float], max_weight: float = MAX_WEIGHT, max_sum: float | None = MAX_WEIGHT_SUM
) -> tuple[float, ...]:
    """8 finite numbers, each in [0, max_weight], summing to at most max_sum (None: no sum rule, text mode)."""
    order = ", ".join(EMOTIONS)
    try:
        vals = [v for v in values]
    except TypeError:
        raise InputError(f"emotion vector must be a list of 8 numbers, got {type(values).__name__}",
                         f"pass 8 weights in the order {order}") from None
    if len(vals) != len(EMOTIONS):
        raise InputError(f"emotion vector has {len(vals)} values, it needs {len(EMOTIONS)}",
                         f"pass 8 weights in the order {order}")
    out = []
    for name, v in zip(EMOTIONS, vals):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"emotion weight '{name}' is {v!r}, not a finite number", "pass numbers only")
        if not 0.0 <= v <= max_weight:
            raise InputError(f"emotion weight '{name}'={v!r} is out of range", f"pass weights in [0, {max_weight:g}]")
        out.append(float(v))
    if max_sum is not None and sum(out) > max_sum:
        raise InputError(f"emotion vector sums to {sum(out):g}, more than {max_sum:g}",
                         f"lower the weights so that they sum to at most {max_sum:g}")
    return tuple(out)


def scale_emotion_weights(weights: Sequence[float], alpha: float, mode: AlphaMode = "rel") -> tuple[float, ...]:
    """REL: weights unchanged. HEAD: scale by clamp(alpha, 0, 1), truncated to 4 decimals, when the scale is not 1."""
    if mode == "rel":
        return tuple(float(w) for w in weights)
    if mode != "head":
        raise ValueError(f"unknown alpha mode {mode!r}")
    scale = max(0.0, min(1.0, float(alpha)))
    if scale == 1.0:
        return tuple(float(w) for w in weights)
    return tuple(int(w * scale * 10000) / 10000 for w in weights)


@dataclass(frozen=True)
class EmotionPlan:
    """What one request's emotion settings resolve to.

    weights: the 8 weights to mix in (None: audio emotion only); merge_alpha: the alpha of
    base + alpha * (emo - base); emotion_audio_is_speaker: use the speaker's file as the emotion reference
    (loaded on the 16 kHz emotion path, so its features differ slightly from the speaker path's).
    """

    weights: tuple[float, ...] | None
    merge_alpha: float
    emotion_audio_is_speaker: bool


def plan_emotion(
    vector: Sequence[float] | None = None,
    alpha: float = 1.0,
    has_emotion_audio: bool = False,
    mode: AlphaMode = "rel",
    from_text: bool = False,
) -> EmotionPlan:
    """Resolve upstream's precedence: a vector (user or emotion text) drops the emotion audio, and without emotion
    audio the speaker's file is used with alpha 1. from_text: the vector came from QwenEmotion (no sum rule)."""
    alpha = validate_emo_alpha(alpha)
    weights = None
    if vector is not None:
        weights = scale_emotion_weights(
            validate_emotion_vector(vector, max_sum=None if from_text else MAX_WEIGHT_SUM), alpha, mode
        )
        has_emotion_audio = False
    if not has_emotion_audio:
        return EmotionPlan(weights, 1.0, True)
    return EmotionPlan(weights, alpha, False)


@dataclass(frozen=True)
class EmotionBank:
    """feat1.pt / feat2.pt split per category: speaker-style rows [n_i, 192] and emotion rows [n_i, D]."""

    speaker_rows: tuple[torch.Tensor, ...]
    emotion_rows: tuple[torch.Tensor, ...]

    @classmethod
    def from_matrices(
        cls, spk_matrix: torch.Tensor, emo_matrix: torch.Tensor, emo_num: Sequence[int] = EMO_NUM,
        source: str = "feat1.pt/feat2.pt",
    ) -> "EmotionBank":
        emo_num = [int(n) for n in emo_num]
        if len(emo_num) != len(EMOTIONS) or min(emo_num) < 1:
            raise CheckpointError(f"emo_num {emo_num} must hold {len(EMOTIONS)} positive row counts",
                                  "restore emo_num from the official config.yaml")
        for name, m in (("feat1.pt (speaker rows)", spk_matrix), ("feat2.pt (emotion rows)", emo_matrix)):
            if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != sum(emo_num):
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise CheckpointError(f"{source}: {name} is {shape}, expected [{sum(emo_num)}, dim] (sum of emo_num)",
                                      "use the feat1.pt/feat2.pt and config.yaml of the same IndexTTS2 release")
        return cls(tuple(torch.split(spk_matrix.float(), emo_num)), tuple(torch.split(emo_matrix.float(), emo_num)))

    @property
    def emo_num(self) -> tuple[int, ...]:
        return tuple(int(r.shape[0]) for r in self.speaker_rows)

    def select(self, style: torch.Tensor, use_random: bool = False, rng: random.Random | None = None) -> list[int]:
        """One row index per category: argmax cosine(style, speaker rows), or rng.randint(0, n_i - 1) in order."""
        if use_random:
            if rng is None:
                raise ValueError("use_random needs a random.Random")
            return [rng.randint(0, n - 1) for n in self.emo_num]
        style = style.reshape(1, -1).float()
        return [int(torch.argmax(F.cosine_similarity(style, rows, dim=1))) for rows in self.speaker_rows]

    def mix(self, indices: Sequence[int], weights: Sequence[float]) -> torch.Tensor:
        """emovec_mat [1, D] = sum_i w_i * emotion_rows_i[indices_i] (upstream's product-then-sum, fp32)."""
        rows = torch.stack([r[i] for r, i in zip(self.emotion_rows, indices)])
        w = torch.tensor(list(weights), dtype=torch.float32)
        return torch.sum(w.unsqueeze(1) * rows, 0).unsqueeze(0)


def apply_emotion_vector(emovec: torch.Tensor, emovec_mat: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """emovec_mat + (1 - sum w) * emovec: the vector's rows replace that share of the audio emotion."""
    w = torch.tensor(list(weights), dtype=torch.float32)
    return emovec_mat + (1 - torch.sum(w)) * emovec


def load_emotion_bank(
    spk_path: str | Path, emo_path: str | Path, emo_num: Sequence[int] = EMO_NUM
) -> EmotionBank:
    """feat1.pt (speaker-style rows) and feat2.pt (emotion rows): plain tensors, read weights_only."""
    mats = []
    for path in (Path(spk_path), Path(emo_path)):
        if not path.is_file():
            raise ModelFilesError(f"{path} does not exist", "copy feat1.pt and feat2.pt from the IndexTTS2 release")
        try:
            mats.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # damaged file: torch raises several types
            raise ModelFilesError(f"{path} cannot be read ({type(exc).__name__})", "re-download it") from None
    return EmotionBank.from_matrices(mats[0], mats[1], emo_num, source=f"{Path(spk_path).name}/{Path(emo_path).name}")
