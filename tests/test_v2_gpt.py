"""IndexTTS2 GPT (UnifiedVoice v2): layout vs module, strict loading, conditioning rows, prefix, generation, latents."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from engine_ref.beam_search import decode_beams
from engine_ref.errors import CheckpointError, ConfigError, InputError
from engine_ref.indextts2.emotion import EMO_NUM, EmotionBank, plan_emotion
from engine_ref.indextts2.gpt import (
    INDEXTTS2_GPT,
    UnifiedVoiceV2,
    final_emovec,
    generate_codes,
    generation_prefix,
    gpt_v2_layout,
    latent_pass_v2,
    load_gpt_v2,
    make_conds,
    parse_gpt_v2,
    v2_generation_params,
)
from engine_ref.indextts2.gpt.generate import placeholder_prompt
from engine_ref.layout import materialize
from engine_ref.modules.conformer import ConditionModuleConfig
from engine_ref.sampling import GenerationParams, initial_seen

CFG = dataclasses.replace(
    INDEXTTS2_GPT, model_dim=64, layers=2, heads=4, max_mel_tokens=120, max_text_tokens=40,
    number_text_tokens=100, number_mel_codes=258, start_mel_token=256, stop_mel_token=257,
    condition_module=ConditionModuleConfig(32, 64, 2, 1, "conv2d2", 2),
    emo_condition_module=ConditionModuleConfig(32, 48, 2, 1, "conv2d2", 2),
    feature_dim=40, emo_latent_dim=48,
)
TEXTS = [[5, 6, 0, 7, 8, 9], [20, 21, 1], [30, 31, 32, 33, 34, 35, 36, 37, 38], [44]]
STOP_AFTER = 20  # the preset init's stop ramp


def _clean(ids):
    return [i for i in ids if i not in (0, 1)]


@pytest.fixture(scope="module")
def model() -> UnifiedVoiceV2:
    m = UnifiedVoiceV2(CFG).eval()
    m.load_state_dict(materialize(gpt_v2_layout(CFG, target_codes=STOP_AFTER), 0), strict=True)
    return m


@pytest.fixture(scope="module")
def feats() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 30, CFG.feature_dim, generator=g), torch.randn(1, 26, CFG.feature_dim, generator=g)


@pytest.fixture(scope="module")
def conds(model, feats) -> torch.Tensor:
    spk, emo = feats
    with torch.inference_mode():
        return make_conds(model, spk, model.merge_emovec(spk, emo, 0.6))


# --- layout, config, loading ----------------------------------------------------------------------------------------
def test_layout_equals_module_keys_and_shapes():
    for cfg in (CFG, INDEXTTS2_GPT):
        with torch.device("meta"):
            module = UnifiedVoiceV2(cfg)
        ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        layout = {k: tuple(s.shape) for k, s in gpt_v2_layout(cfg).items()}
        assert ours == layout


def test_real_layout_has_the_published_shapes_and_size():
    layout = {k: tuple(s.shape) for k, s in gpt_v2_layout(INDEXTTS2_GPT).items()}
    published = {
        "conditioning_encoder.embed.out.0.weight": (512, 261632),
        "emo_conditioning_encoder.embed.out.0.weight": (512, 261632),
        "conditioning_encoder.embed.pos_enc.pe": (1, 5000, 512),
        "emo_conditioning_encoder.embed.pos_enc.pe": (1, 5000, 512),
        "conditioning_encoder.encoders.5.self_attn.pos_bias_u": (8, 64),
        "emo_conditioning_encoder.encoders.3.self_attn.pos_bias_v": (4, 128),
        "conditioning_encoder.encoders.0.feed_forward.w_1.weight": (2048, 512),
        "emo_conditioning_encoder.encoders.0.feed_forward.w_1.weight": (1024, 512),
        "conditioning_encoder.encoders.0.conv_module.pointwise_conv1.weight": (1024, 512, 1),
        "conditioning_encoder.encoders.0.conv_module.depthwise_conv.weight": (512, 1, 15),
        "perceiver_encoder.proj_context.weight": (1280, 512),
        "perceiver_encoder.latents": (32, 1280),
        "perceiver_encoder.layers.1.0.to_q.weight": (512, 1280),
        "perceiver_encoder.layers.1.0.to_kv.weight": (1024, 1280),
        "perceiver_encoder.layers.1.0.to_out.weight": (1280, 512),
        "perceiver_encoder.layers.1.1.0.weight": (3412, 1280),
        "perceiver_encoder.layers.1.1.2.weight": (1280, 1706),
        "emo_perceiver_encoder.proj_context.weight": (1024, 512),
        "emo_perceiver_encoder.latents": (1, 1024),
        "emo_perceiver_encoder.layers.0.0.to_q.weight": (256, 1024),
        "emo_perceiver_encoder.layers.0.0.to_kv.weight": (512, 1024),
        "emo_perceiver_encoder.layers.0.0.to_out.weight": (1024, 256),
        "emo_perceiver_encoder.layers.1.1.0.weight": (2730, 1024),
        "emo_perceiver_encoder.layers.1.1.2.weight": (1024, 1365),
        "emo_perceiver_encoder.norm.gamma": (1024,),
        "speed_emb.weight": (2, 1280),
        "emo_layer.weight": (1280, 1280),
        "emovec_layer.weight": (1280, 1024),
        "text_embedding.weight": (12001, 1280),
        "mel_embedding.weight": (8194, 1280),
        "text_pos_embedding.emb.weight": (602, 1280),
        "mel_pos_embedding.emb.weight": (1818, 1280),
        "gpt.h.23.attn.c_attn.weight": (1280, 3840),
        "gpt.h.23.mlp.c_fc.weight": (1280, 5120),
        "gpt.ln_f.weight": (1280,),
        "final_norm.weight": (1280,),
        "text_head.weight": (12001, 1280),
        "mel_head.weight": (8194, 1280),
    }
    for key, shape in published.items():
        assert layout[key] == shape, key
    absent = ["gpt.h.24.ln_1.weight", "emo_conditioning_encoder.encoders.4.norm_ff.weight",
              "conditioning_encoder.encoders.6.norm_ff.weight", "gpt.wte.weight", "gpt.wpe.weight",
              "gpt.h.0.attn.bias", "perceiver_encoder.layers.2.0.to_q.weight"]
    assert not set(absent) & set(layout)
    # gpt.pth is 3,484,663,079 bytes of fp32 tensors plus container overhead (< 1 MB for ~665 records).
    overhead = 3_484_663_079 - 4 * sum(math.prod(s) for s in layout.values())
    assert 0 < overhead < 1_000_000


def _yaml_gpt_section() -> dict:
    """config.yaml's gpt: section as published (facts §3), as yaml.safe_load gives it."""
    return {
        "model_dim": 1280, "max_mel_tokens": 1815, "max_text_tokens": 600, "heads": 20, "use_mel_codes_as_input": True,
        "mel_length_compression": 1024, "layers": 24, "number_text_tokens": 12000, "number_mel_codes": 8194,
        "start_mel_token": 8192, "stop_mel_token": 8193, "start_text_token": 0, "stop_text_token": 1,
        "train_solo_embeddings": False, "condition_type": "conformer_perceiver",
        "condition_module": {"output_size": 512, "linear_units": 2048, "attention_heads": 8, "num_blocks": 6,
                             "input_layer": "conv2d2", "perceiver_mult": 2},
        "emo_condition_module": {"output_size": 512, "linear_units": 1024, "attention_heads": 4, "num_blocks": 4,
                                 "input_layer": "conv2d2", "perceiver_mult": 2},
    }


def test_config_parses_the_official_section_and_names_bad_keys():
    assert parse_gpt_v2(_yaml_gpt_section()) == INDEXTTS2_GPT
    broken = _yaml_gpt_section()
    del broken["emo_condition_module"]["num_blocks"]
    with pytest.raises(ConfigError, match=r"gpt\.emo_condition_module\.num_blocks"):
        parse_gpt_v2(broken)
    broken = _yaml_gpt_section() | {"heads": "twenty"}
    with pytest.raises(ConfigError, match=r"gpt\.heads"):
        parse_gpt_v2(broken)
    with pytest.raises(ConfigError, match="condition_type"):
        parse_gpt_v2(_yaml_gpt_section() | {"condition_type": "perceiver"})


@pytest.mark.parametrize("wrapped", [False, True])
def test_strict_load_from_a_file_written_from_the_layout(tmp_path, wrapped):
    state = materialize(gpt_v2_layout(CFG), seed=3)
    path = tmp_path / "gpt.pth"
    torch.save({"model": state} if wrapped else state, path)
    loaded = load_gpt_v2(CFG, path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_missing_unexpected_or_misshaped_keys_are_named(tmp_path):
    state = materialize(gpt_v2_layout(CFG), seed=3)
    path = tmp_path / "gpt.pth"
    missing = {k: v for k, v in state.items() if k != "emovec_layer.bias"}
    torch.save(missing, path)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): emovec_layer\.bias"):
        load_gpt_v2(CFG, path)
    torch.save(state | {"spk_emb_proj.weight": torch.zeros(64, 192)}, path)  # an IndexTTS-2.5 key
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): spk_emb_proj\.weight"):
        load_gpt_v2(CFG, path)
    torch.save(state | {"speed_emb.weight": torch.zeros(3, 64)}, path)
    with pytest.raises(CheckpointError, match=r"'speed_emb\.weight' has shape \[3, 64\]"):
        load_gpt_v2(CFG, path)


# --- conditioning ---------------------------------------------------------------------------------------------------
def test_conds_rows_are_latents_plus_emovec_then_speed_rows(model, feats):
    spk, emo = feats
    with torch.inference_mode():
        emovec = model.merge_emovec(spk, emo, 0.6)
        latents = model.speaker_latents(spk)
        conds = make_conds(model, spk, emovec)
    assert conds.shape == (1, 34, CFG.model_dim)
    torch.testing.assert_close(conds[0, :32], latents[0] + emovec[0])
    assert torch.equal(conds[0, 32], model.speed_emb.weight[1].detach())
    assert torch.equal(conds[0, 33], model.speed_emb.weight[0].detach())


def test_emovec_path_and_alpha_blend(model, feats):
    spk, emo = feats
    with torch.inference_mode():
        hidden, _ = model.emo_conditioning_encoder(emo, torch.tensor([emo.shape[1]]))
        latent = model.emo_perceiver_encoder(hidden, torch.ones(1, 1 + hidden.shape[1], dtype=torch.bool))
        by_hand = model.emo_layer(model.emovec_layer(latent[:, 0]))
        e, b = model.get_emovec(emo), model.get_emovec(spk)
        assert e.shape == (1, CFG.model_dim)
        torch.testing.assert_close(e, by_hand)
        assert torch.equal(model.merge_emovec(spk, emo, 0.0), b)
        torch.testing.assert_close(model.merge_emovec(spk, emo, 1.0), e)
        torch.testing.assert_close(model.merge_emovec(spk, emo, 0.3), b + 0.3 * (e - b))


def test_final_emovec_mixes_the_vector_rows_into_the_audio_emotion(model, feats):
    spk, emo = feats
    g = torch.Generator().manual_seed(4)
    spk_rows = torch.randn(sum(EMO_NUM), 192, generator=g)
    emo_rows = torch.randn(sum(EMO_NUM), CFG.model_dim, generator=g)
    bank = EmotionBank.from_matrices(spk_rows, emo_rows)
    style = torch.randn(1, 192, generator=g)
    with torch.inference_mode():
        audio_only = plan_emotion(alpha=0.3, has_emotion_audio=True)
        assert torch.equal(final_emovec(model, spk, emo, audio_only), model.merge_emovec(spk, emo, 0.3))
        w = [0.0, 0.4, 0.0, 0.0, 0.2, 0.0, 0.0, 0.1]
        plan = plan_emotion(w, alpha=0.3, has_emotion_audio=True)  # the vector drops the emotion audio: alpha 1
        out = final_emovec(model, spk, spk, plan, bank, style)
        merged = model.merge_emovec(spk, spk, 1.0)
    expected = (1 - sum(w)) * merged[0]
    start = 0
    for n, wi in zip(EMO_NUM, w):
        rows = spk_rows[start : start + n]
        cos = (rows @ style[0]) / (rows.norm(dim=1) * style[0].norm())
        expected = expected + wi * emo_rows[start + int(cos.argmax())]
        start += n
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_conformer_lengths_quirk_masks_frames_past_the_feature_width(model):
    g = torch.Generator().manual_seed(1)
    short = torch.randn(1, CFG.feature_dim - 4, CFG.feature_dim, generator=g)
    with torch.inference_mode():
        # Shorter than the feature width: every frame valid, as with the true length.
        true_len = torch.tensor([short.shape[1]])
        torch.testing.assert_close(model.speaker_latents(short), model.speaker_latents(short, true_len))
        long = torch.randn(1, CFG.feature_dim + 12, CFG.feature_dim, generator=g)
        changed = long.clone()
        changed[:, CFG.feature_dim:] += 5.0  # frames at/after index feature_dim are masked by the quirk
        torch.testing.assert_close(model.speaker_latents(long), model.speaker_latents(changed))
        torch.testing.assert_close(model.get_emovec(long), model.get_emovec(changed))
        true_len = torch.tensor([long.shape[1]])
        assert not torch.allclose(model.speaker_latents(long, true_len), model.speaker_latents(changed, true_len))


def test_features_of_the_wrong_width_are_input_errors(model):
    with pytest.raises(InputError, match=str(CFG.feature_dim)):
        model.speaker_latents(torch.zeros(1, 20, CFG.feature_dim + 1))


# --- prefix and generation -----------------------------------------------------------------------------------------
def _prefix_by_hand(model, conds, ids) -> torch.Tensor:
    text = torch.tensor([[0, *_clean(ids), 1]])
    t = model.text_embedding(text) + model.text_pos_embedding.emb.weight[: text.shape[1]]
    start = model.mel_embedding.weight[CFG.start_mel_token] + model.mel_pos_embedding.emb.weight[0]
    return torch.cat([conds, t, start.view(1, 1, -1)], dim=1)


def test_prefix_drops_ids_0_and_1_and_follows_the_layout(model, conds):
    with torch.inference_mode():
        emb, valid = generation_prefix(model, conds, [TEXTS[0]])
        assert valid.all()
        torch.testing.assert_close(emb, _prefix_by_hand(model, conds, TEXTS[0]))
        assert emb.shape[1] == 34 + len(_clean(TEXTS[0])) + 2 + 1
    # The repetition penalty sees upstream's placeholder prompt: as a set, {1, start code}.
    seen = initial_seen(1, CFG.number_mel_codes, CFG.start_mel_token)[0]
    assert set(seen.nonzero().flatten().tolist()) == set(placeholder_prompt(CFG, len(TEXTS[0])))
    assert len(placeholder_prompt(CFG, 7)) == 36 + 7 + 1


def _greedy_without_cache(model, conds, ids, max_new: int, penalty: float = 10.0) -> list[int]:
    """Independent decoder: the whole sequence recomputed each step; code k sits at mel position k + 1."""
    prefix = _prefix_by_hand(model, conds, ids)
    seen = {1, CFG.start_mel_token}
    codes: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new):
            rows = [prefix]
            for k, c in enumerate(codes, start=1):
                rows.append((model.mel_embedding.weight[c] + model.mel_pos_embedding.emb.weight[k + 1]).view(1, 1, -1))
            seq = torch.cat(rows, dim=1)
            hidden, _ = model.gpt(seq, torch.ones(1, seq.shape[1], dtype=torch.bool))
            logits = model.mel_head(model.final_norm(hidden[0, -1])).clone()
            for s in seen:
                logits[s] = logits[s] * penalty if logits[s] < 0 else logits[s] / penalty
            tok = int(torch.argmax(logits))
            if tok == CFG.stop_mel_token:
                break
            codes.append(tok)
            seen.add(tok)
    return codes


def test_greedy_with_kv_cache_equals_full_recomputation(model, conds):
    params = v2_generation_params(do_sample=False, num_beams=1, max_mel_tokens=60)
    for ids in TEXTS[:3]:
        out = generate_codes(model, conds, [ids], params)[0]
        assert out.stopped and len(out.codes) > 5
        assert out.codes == _greedy_without_cache(model, conds, ids, 60)


def test_one_beam_equals_greedy(model, conds):
    greedy = v2_generation_params(do_sample=False, num_beams=1, max_mel_tokens=60)
    for ids in TEXTS:
        a = generate_codes(model, conds, [ids], greedy)[0]
        b = decode_beams(model, conds, [_clean(ids)], [greedy], [0])[0]
        assert a.codes == b.codes and a.stopped == b.stopped


@pytest.mark.parametrize(
    "params",
    [
        v2_generation_params(do_sample=False, num_beams=1, max_mel_tokens=50),
        v2_generation_params(num_beams=1, max_mel_tokens=40),
        v2_generation_params(max_mel_tokens=30),  # the upstream default: 3-beam sampling
    ],
    ids=["greedy", "sampling", "beam-sampling"],
)
def test_batched_bucket_equals_each_segment_alone(model, conds, params):
    seeds = [11, 12, 13, 14]
    batched = generate_codes(model, conds, TEXTS, params, seeds)
    for ids, seed, out in zip(TEXTS, seeds, batched):
        alone = generate_codes(model, conds, [ids], params, [seed])[0]
        assert out.codes == alone.codes and out.stopped == alone.stopped
    if params.do_sample:
        other = generate_codes(model, conds, TEXTS[:1], params, [99])[0]
        again = generate_codes(model, conds, TEXTS[:1], params, [11])[0]
        assert again.codes == batched[0].codes
        assert other.codes != batched[0].codes


def test_defaults_are_upstreams():
    p = v2_generation_params()
    assert (p.do_sample, p.num_beams, p.top_k, p.top_p, p.temperature) == (True, 3, 30, 0.8, 0.8)
    assert (p.repetition_penalty, p.length_penalty, p.max_mel_tokens) == (10.0, 0.0, 1500)


def test_no_stop_keeps_codes_and_warns(model, conds, caplog):
    with caplog.at_level(logging.WARNING, logger="engine_ref.indextts2.generate"):
        out = generate_codes(model, conds, TEXTS[:1], v2_generation_params(do_sample=False, max_mel_tokens=4))[0]
    assert len(out.codes) == 4 and not out.stopped
    assert "max_mel_tokens" in caplog.text


def test_too_long_text_is_an_input_error(model, conds):
    with pytest.raises(InputError, match="at most 40"):
        generate_codes(model, conds, [[5] * 41], v2_generation_params(do_sample=False, num_beams=1, max_mel_tokens=10))


# --- latent pass ----------------------------------------------------------------------------------------------------
def test_latent_pass_follows_the_teacher_forced_layout(model, conds):
    ids, codes = TEXTS[0], [100, 7, 250, 3, 3]  # TEXTS[0] holds a 0: the latent pass keeps it
    lat = latent_pass_v2(model, conds, [ids], [codes])[0]
    assert lat.shape == (1, len(codes), CFG.model_dim)
    with torch.inference_mode():
        text = torch.tensor([[0, *ids, 1]])
        mel = torch.tensor([[CFG.start_mel_token, *codes, CFG.stop_mel_token]])
        seq = torch.cat([
            conds,
            model.text_embedding(text) + model.text_pos_embedding.emb.weight[: text.shape[1]],
            model.mel_embedding(mel) + model.mel_pos_embedding.emb.weight[: mel.shape[1]],
        ], dim=1)
        hidden, _ = model.gpt(seq, torch.ones(1, seq.shape[1], dtype=torch.bool))
        expected = model.final_norm(hidden)[:, -(len(codes) + 2) : -2]
    torch.testing.assert_close(lat, expected, rtol=1e-5, atol=1e-5)


def test_batched_latent_pass_equals_alone(model, conds):
    codes = [[100, 200], [7, 8, 9, 10, 11, 12], [40], [1, 2, 3]]
    batched = latent_pass_v2(model, conds, TEXTS, codes)
    for ids, c, lat in zip(TEXTS, codes, batched):
        torch.testing.assert_close(lat, latent_pass_v2(model, conds, [ids], [c])[0], rtol=1e-5, atol=1e-5)
