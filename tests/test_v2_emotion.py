"""IndexTTS2 emotion control: row selection, mixing, alpha rules, validation, the Qwen reply parser and loader."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine_ref.errors import CheckpointError, InputError, ModelFilesError
from engine_ref.indextts2.emotion import (
    EMO_NUM,
    EMOTIONS,
    EmotionBank,
    apply_emotion_vector,
    load_emotion_bank,
    plan_emotion,
    scale_emotion_weights,
    validate_emo_alpha,
    validate_emotion_vector,
)
from engine_ref.indextts2.qwen_emotion import (
    QWEN_EMOTION_FILES,
    QwenEmotion,
    content_after_thinking,
    parse_emotion_reply,
    write_random_qwen_emotion,
)

ROWS = sum(EMO_NUM)  # 73
D = 24


@pytest.fixture(scope="module")
def matrices() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, 192, generator=g), torch.randn(ROWS, D, generator=g)


@pytest.fixture(scope="module")
def bank(matrices) -> EmotionBank:
    return EmotionBank.from_matrices(*matrices)


def _numpy_cosine_argmax(style: np.ndarray, spk: np.ndarray) -> list[int]:
    out, start = [], 0
    for n in EMO_NUM:
        rows = spk[start : start + n].astype(np.float64)
        cos = rows @ style / (np.linalg.norm(rows, axis=1) * np.linalg.norm(style))
        out.append(int(np.argmax(cos)))
        start += n
    return out


def test_rows_are_picked_by_cosine_similarity_to_the_style(bank, matrices):
    spk = matrices[0].numpy()
    for seed in range(5):
        style = torch.randn(1, 192, generator=torch.Generator().manual_seed(100 + seed))
        assert bank.select(style) == _numpy_cosine_argmax(style[0].numpy().astype(np.float64), spk)
    # A style equal to a stored row (scaled) must pick that row.
    target = 3 + 17 + 1  # second row of "sad"
    assert bank.select(3.0 * matrices[0][target : target + 1])[2] == 1


def test_random_rows_are_deterministic_per_seed(bank):
    a = bank.select(torch.zeros(1, 192), use_random=True, rng=random.Random(5))
    b = bank.select(torch.zeros(1, 192), use_random=True, rng=random.Random(5))
    ref = random.Random(5)
    assert a == b == [ref.randint(0, n - 1) for n in EMO_NUM]
    assert all(0 <= i < n for i, n in zip(a, EMO_NUM))
    draws = {tuple(bank.select(torch.zeros(1, 192), use_random=True, rng=random.Random(s))) for s in range(6)}
    assert len(draws) > 1


def test_mix_and_apply_follow_the_formula(bank, matrices):
    emo = matrices[1].numpy().astype(np.float64)
    idx = [2, 16, 0, 7, 3, 4, 9, 23]
    w = [0.2, 0.0, 0.5, 0.0, 0.1, 0.0, 0.0, 0.3]
    starts = np.cumsum([0, *EMO_NUM[:-1]])
    expected = sum(wi * emo[s + i] for wi, s, i in zip(w, starts, idx))
    mat = bank.mix(idx, w)
    assert mat.shape == (1, D)
    np.testing.assert_allclose(mat[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    audio = torch.randn(1, D, generator=torch.Generator().manual_seed(1))
    out = apply_emotion_vector(audio, mat, w)
    np.testing.assert_allclose(out[0].numpy(), expected + (1 - sum(w)) * audio[0].numpy(), rtol=1e-5, atol=1e-6)


def test_bank_shapes_are_checked_and_files_load(tmp_path, matrices):
    with pytest.raises(CheckpointError, match=r"expected \[73, dim\]"):
        EmotionBank.from_matrices(matrices[0][:70], matrices[1])
    with pytest.raises(CheckpointError, match="emo_num"):
        EmotionBank.from_matrices(matrices[0], matrices[1], emo_num=(73,))
    torch.save(matrices[0], tmp_path / "feat1.pt")
    torch.save(matrices[1], tmp_path / "feat2.pt")
    bank = load_emotion_bank(tmp_path / "feat1.pt", tmp_path / "feat2.pt")
    assert bank.emo_num == EMO_NUM and bank.emotion_rows[7].shape == (24, D)
    with pytest.raises(ModelFilesError, match="feat9.pt"):
        load_emotion_bank(tmp_path / "feat1.pt", tmp_path / "feat9.pt")


@pytest.mark.parametrize(
    "vector,match",
    [
        ([0.1] * 7, "has 7 values"),
        ([0.1] * 9, "has 9 values"),
        ([0, 0, -0.1, 0, 0, 0, 0, 0], "'sad'=-0.1 is out of range"),
        ([0, 0, 0, 0, 0, 0, 0, 1.3], "'calm'=1.3 is out of range"),
        ([0, float("nan"), 0, 0, 0, 0, 0, 0], "'angry' is nan"),
        ([0, 0, 0, "x", 0, 0, 0, 0], "'afraid' is 'x'"),
        ([1.0, 0.6, 0, 0, 0, 0, 0, 0], "sums to 1.6"),
    ],
)
def test_bad_vectors_are_input_errors(vector, match):
    with pytest.raises(InputError, match=match):
        validate_emotion_vector(vector)


def test_valid_vectors_and_the_text_mode_sum():
    assert validate_emotion_vector([0, 0.5, 0, 0, 0, 0, 0, 1]) == (0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    assert validate_emotion_vector([1.2] * 8, max_sum=None) == (1.2,) * 8  # QwenEmotion replies: no sum rule


@pytest.mark.parametrize("alpha", [-0.01, 1.01, float("nan"), True, "1"])
def test_emo_alpha_outside_0_1_is_an_input_error(alpha):
    with pytest.raises(InputError, match="emo_alpha"):
        validate_emo_alpha(alpha)


def test_alpha_rules_rel_and_head():
    w = [0.5, 0.123456, 0, 0, 0, 0, 0, 0.3]
    # REL: weights untouched, a vector drops the emotion audio, alpha forced to 1.
    plan = plan_emotion(w, alpha=0.7, has_emotion_audio=True)
    assert plan.weights == tuple(w) and plan.merge_alpha == 1.0 and plan.emotion_audio_is_speaker
    # HEAD: weights scaled by alpha and truncated to 4 decimals.
    head = plan_emotion(w, alpha=0.5, has_emotion_audio=True, mode="head")
    assert head.weights == (0.25, 0.0617, 0.0, 0.0, 0.0, 0.0, 0.0, 0.15) and head.merge_alpha == 1.0
    assert scale_emotion_weights(w, 1.0, "head") == tuple(w)
    # Emotion audio only: alpha is used; no emotion audio: the speaker's file with alpha 1.
    assert plan_emotion(alpha=0.4, has_emotion_audio=True) == type(plan)(None, 0.4, False)
    assert plan_emotion(alpha=0.4, has_emotion_audio=False) == type(plan)(None, 1.0, True)


# --- QwenEmotion ----------------------------------------------------------------------------------------------------
def _vec(d: dict) -> list[float]:
    assert list(d) == list(EMOTIONS)
    return list(d.values())


def test_reply_as_json():
    reply = '{"高兴": 0.8, "愤怒": 0.0, "悲伤": 0.1, "恐惧": 0.0, "反感": 0.0, "低落": 0.0, "惊讶": 0.3, "自然": 0.0}'
    assert _vec(parse_emotion_reply(reply, "what a day!")) == [0.8, 0.0, 0.1, 0.0, 0.0, 0.0, 0.3, 0.0]


def test_reply_fallback_regex_and_bad_numbers():
    reply = '高兴: 0.6, "悲伤":0.25 and 惊讶 : 1.2.3 自然"  :  0.5}'
    assert _vec(parse_emotion_reply(reply, "x")) == [0.6, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.5]
    # JSON values that are not numbers count as absent (upstream would raise).
    odd = '{"愤怒": "lots", "恐惧": null, "反感": 0.4}'
    assert _vec(parse_emotion_reply(odd, "x"))[1:5] == [0.0, 0.0, 0.0, 0.4]


def test_melancholy_words_swap_sad_and_melancholic():
    reply = '{"悲伤": 0.9, "低落": 0.1}'
    assert _vec(parse_emotion_reply(reply, "I feel so GLOOMY today"))[2:6] == [0.1, 0.0, 0.0, 0.9]
    assert _vec(parse_emotion_reply(reply, "心情低落"))[2:6] == [0.1, 0.0, 0.0, 0.9]
    assert _vec(parse_emotion_reply(reply, "I feel sad"))[2:6] == [0.9, 0.0, 0.0, 0.1]


def test_clamp_and_all_zero_means_calm():
    assert _vec(parse_emotion_reply('{"高兴": 2.5, "愤怒": -1}', "x"))[:2] == [1.2, 0.0]
    assert _vec(parse_emotion_reply("no scores at all", "x")) == [0.0] * 7 + [1.0]
    assert _vec(parse_emotion_reply('{"高兴": 0, "自然": 0}', "x")) == [0.0] * 7 + [1.0]


def test_content_after_the_last_think_end():
    assert content_after_thinking([5, 9, 6, 9, 7, 8], 9) == [7, 8]
    assert content_after_thinking([5, 6], 9) == [5, 6]


def test_missing_model_dir_fails_that_request_only(tmp_path):
    q = QwenEmotion(tmp_path / "qwen0.6bemo4-merge", max_new_tokens=4)
    with pytest.raises(InputError, match="qwen0.6bemo4-merge"):
        q.vector("今天真开心")
    write_random_qwen_emotion(tmp_path / "qwen0.6bemo4-merge", seed=0)  # the directory appears later
    assert len(q.vector("今天真开心")) == 8


def test_tiny_random_qwen_dir_gives_a_valid_vector(tmp_path):
    d = write_random_qwen_emotion(tmp_path / "qwen", seed=1)
    assert sorted(p.name for p in d.iterdir()) == sorted(QWEN_EMOTION_FILES)
    q = QwenEmotion(d, max_new_tokens=6)
    vec = q.vector("The danger is quietly approaching.")
    assert len(vec) == 8 and all(0.0 <= v <= 1.2 for v in vec) and sum(vec) > 0
    assert validate_emotion_vector(vec, max_sum=None) == vec
    assert q.vector("The danger is quietly approaching.") == vec  # greedy generation config: deterministic
