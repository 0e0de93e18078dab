"""IndexTTS2 end to end on the tiny-v2 preset: strict load, 22.05 kHz output with 200 ms gaps, determinism,
batching invariance, injected CFM noise, every emotion control (vs hand computations), one-line errors, the CLI."""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from engine_ref.audio import write_wav
from engine_ref.errors import ConfigError, InputError
from engine_ref.indextts2.emotion import EMO_NUM
from engine_ref.indextts2.gpt import v2_generation_params
from engine_ref.indextts2.loader import load_v2_model
from engine_ref.indextts2.presets import write_v2_preset
from engine_ref.indextts2.qwen_emotion import QwenEmotion
from engine_ref.indextts2.reference import load_emotion_audio
from engine_ref.indextts2.s2mel.model import target_mel_frames
from engine_ref.indextts2.synthesizer import EmotionOptions, Synthesizer2
from engine_ref.indextts.presets import demo_voice
from engine_ref.sampling import GenerationParams
from triton_tts.cli import main as cli

SR = 22050
GAP = 4410  # int(22050 * 200 / 1000)
TEXT = "Hello world. This is a test. Does it work?"
SEG = {"max_text_tokens_per_segment": 16}  # three segments


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_v2_preset("tiny-v2", tmp_path_factory.mktemp("v2") / "tiny-v2")


@pytest.fixture(scope="module")
def synth(model_dir) -> Synthesizer2:
    return Synthesizer2.from_pretrained(model_dir, speaker_cache_size=2, qwen_max_new_tokens=4)


@pytest.fixture(scope="module")
def fast(synth) -> Synthesizer2:
    """The same loaded model with 3 CFM steps (the default 25 run in the CLI and noise tests): fast plumbing."""
    return Synthesizer2(synth.model, speaker_cache_size=2, diffusion_steps=3)


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory) -> Path:
    """A short speaker reference (1.5 s, 24 kHz): the DiT's prompt part stays small."""
    return write_wav(tmp_path_factory.mktemp("voice") / "voice.wav", demo_voice(1.5, 24000), 24000)


@pytest.fixture(scope="module")
def emo_wav(tmp_path_factory) -> Path:
    """A second, different voice at 16 kHz (the emotion reference)."""
    return write_wav(tmp_path_factory.mktemp("emo") / "emo.wav", demo_voice(2.0, 16000, seed=5) * 1.7, 16000)


def greedy(seed: int = 11, **kw) -> GenerationParams:
    return v2_generation_params(do_sample=False, num_beams=1, seed=seed, **kw)


def test_preset_dir_loads_strictly_with_per_component_timings(synth, model_dir):
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == ["bpe.model", "config.yaml", "feat1.pt", "feat2.pt", "gpt.pth", "hf_cache", "qwen0.6bemo4-merge",
                     "s2mel.pth", "wav2vec2bert_stats.pt"]
    m = synth.model
    assert {"verify", "gpt", "w2v_bert", "semantic_codec", "s2mel", "campplus", "vocoder"} <= set(m.load_seconds)
    assert all(v >= 0 for v in m.load_seconds.values())
    assert m.dependencies.layouts["w2v_bert"].startswith("flat")  # flat files win over the hub copy beside them
    assert m.config.version == "2.0" and m.sample_rate == SR
    # strict: the modules hold exactly the published keys (gpt.pth is not weight-normed: same names)
    assert set(m.gpt.state_dict()) == set(torch.load(model_dir / "gpt.pth", weights_only=True, mmap=True))


def test_synth_is_22k_int16_with_200ms_gaps(fast, voice_wav):
    r = fast.synthesize(TEXT, voice_wav, greedy(), **SEG)
    assert r.sample_rate == SR and r.pcm16.dtype == np.int16 and len(r.segments) >= 3
    pos = 0
    for i, seg in enumerate(r.segments):
        assert seg.stopped and len(seg.codes) > 5  # the random GPT stops by itself, not at once
        assert seg.pcm16.shape[0] == int(target_mel_frames(torch.tensor([len(seg.codes)]))) * 256
        assert np.array_equal(r.pcm16[pos:pos + len(seg.pcm16)], seg.pcm16)
        pos += len(seg.pcm16)
        if i < len(r.segments) - 1:
            assert not r.pcm16[pos:pos + GAP].any()
            pos += GAP
    assert pos == len(r.pcm16)
    t = r.timings
    assert t.audio_s == pytest.approx(len(r.pcm16) / SR) and t.tokens > 0 and t.rtf > 0
    assert t.generate_s > 0 and t.latent_s > 0 and t.s2mel_s > 0 and t.vocoder_s > 0


def test_greedy_and_beam_are_deterministic_and_batching_never_changes_a_segment(fast, voice_wav):
    a = fast.synthesize(TEXT, voice_wav, greedy(), bucket_max_size=4, **SEG)
    b = fast.synthesize(TEXT, voice_wav, greedy(), bucket_max_size=1, **SEG)
    assert [s.codes for s in a.segments] == [s.codes for s in b.segments]
    assert np.array_equal(a.pcm16, b.pcm16)
    beams = v2_generation_params(seed=7)  # upstream defaults: 3-beam sampling
    c = fast.synthesize(TEXT, voice_wav, beams, bucket_max_size=4, **SEG)
    e = fast.synthesize(TEXT, voice_wav, beams, bucket_max_size=1, **SEG)
    assert [s.codes for s in c.segments] == [s.codes for s in e.segments]
    assert np.array_equal(c.pcm16, e.pcm16)
    assert [s.codes for s in c.segments] != [s.codes for s in a.segments]  # beam sampling is not greedy
    # s2mel as one padded batch per bucket: the same audio within float rounding
    batched = Synthesizer2(fast.model, diffusion_steps=3, s2mel_batch=True).synthesize(TEXT, voice_wav, beams, **SEG)
    assert np.abs(batched.pcm16.astype(int) - c.pcm16).max() <= 2


def test_reference_caches_hit_by_content_and_stay_bounded(fast, voice_wav, tmp_path):
    first, _ = fast.speaker(voice_wav)
    again, hit = fast.speaker(voice_wav.read_bytes())  # same bytes, other form: same entry
    assert hit and again is first
    data, sr = sf.read(voice_wav, dtype="float32")
    for i in range(3):  # new references push old ones out: never more than the capacity (2)
        path = tmp_path / f"v{i}.wav"
        sf.write(path, data * (0.5 + 0.1 * i), sr, subtype="PCM_16")
        assert not fast.speaker(path)[1]
    assert len(fast._speakers) == 2
    assert fast.speaker(path)[1] and not fast.speaker(voice_wav)[1]


def test_injected_cfm_noise_is_used_and_matches_the_cfm_sampler(synth, voice_wav):
    """Default 25 steps and cfg 0.7 here."""
    calls = []

    def zeros(index, shape):
        calls.append((index, shape))
        return torch.zeros(shape)

    default = synth.synthesize("Hello there.", voice_wav, greedy())
    quiet = synth.synthesize("Hello there.", voice_wav, greedy(), noise_fn=zeros)
    speaker, _ = synth.speaker(voice_wav)
    n = len(default.segments[0].codes)
    assert calls == [(0, (1, 80, speaker.ref_mel.shape[-1] + int(target_mel_frames(torch.tensor([n])))))]
    assert default.segments[0].codes == quiet.segments[0].codes and not np.array_equal(default.pcm16, quiet.pcm16)
    # mel_frames with given noise == the s2mel module's own CFM sampler on that noise (H1's CFM.sample)
    m = synth.model
    cond = synth.conditioning(speaker)
    codes = default.segments[0].codes
    from engine_ref.indextts2.gpt import latent_pass_v2

    seg = m.frontend.prepare("Hello there.")[0]
    latent = latent_pass_v2(m.gpt, cond.conds, [list(seg.token_ids)], [codes])[0]
    noise = torch.randn(calls[0][1], generator=torch.Generator().manual_seed(3))
    mine = synth.mel_frames(speaker, [codes], [latent], [0], seed=0, noise_fn=lambda i, s: noise)[0]
    with torch.inference_mode():
        target = m.s2mel.target_condition(m.codec.vq2emb(torch.tensor([codes])), latent, torch.tensor([len(codes)]))
        ref = m.s2mel.generate_mel(speaker.prompt_condition, target, speaker.ref_mel, speaker.style, noise=noise)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)


# ---- emotion ----

def _hand_emovec(m, feats_a: torch.Tensor, feats_b: torch.Tensor, alpha: float) -> torch.Tensor:
    with torch.inference_mode():
        base, emo = m.gpt.get_emovec(feats_a), m.gpt.get_emovec(feats_b)
    return base + alpha * (emo - base)


def _cosine_rows(model_dir: Path, style: torch.Tensor) -> list[int]:
    spk = torch.load(model_dir / "feat1.pt", weights_only=True).double()
    s = style[0].double()
    out, start = [], 0
    for n in EMO_NUM:
        rows = spk[start:start + n]
        cos = (rows @ s) / (rows.norm(dim=1) * s.norm())
        out.append(int(torch.argmax(cos)))
        start += n
    return out


def _mix(model_dir: Path, rows: list[int], weights) -> torch.Tensor:
    emo = torch.load(model_dir / "feat2.pt", weights_only=True)
    offsets = np.cumsum([0, *EMO_NUM[:-1]])
    return sum(w * emo[o + r] for w, o, r in zip(weights, offsets, rows)).unsqueeze(0)


def test_emotion_controls_match_hand_computations_and_change_the_audio(fast, voice_wav, emo_wav, model_dir):
    synth = fast
    m = synth.model
    speaker, _ = synth.speaker(voice_wav)
    default = synth.conditioning(speaker)
    # default: the speaker file on the 16 kHz emotion path, alpha 1
    own = load_emotion_audio(voice_wav.read_bytes()).samples
    own_feats, _ = m.semantic([own])
    torch.testing.assert_close(default.emovec, _hand_emovec(m, speaker.features, own_feats, 1.0))
    assert not torch.equal(own_feats, speaker.features)  # two resampling paths, as upstream
    torch.testing.assert_close(default.conds[:, :32], speaker.latents + default.emovec.unsqueeze(1))
    torch.testing.assert_close(default.conds[0, 32:], m.gpt.speed_emb.weight[[1, 0]].detach())
    # emotion audio + alpha
    alpha = synth.conditioning(speaker, EmotionOptions(reference=emo_wav, alpha=0.6))
    emo_feats, _ = m.semantic([load_emotion_audio(emo_wav.read_bytes()).samples])
    torch.testing.assert_close(alpha.emovec, _hand_emovec(m, speaker.features, emo_feats, 0.6))
    # vector: cosine-picked bank rows + (1 - sum w) * the audio emotion (alpha forced to 1)
    w = (0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.3)
    vec = synth.conditioning(speaker, EmotionOptions(vector=w, alpha=0.2))
    rows = _cosine_rows(model_dir, speaker.style)
    assert list(vec.rows) == rows
    torch.testing.assert_close(vec.emovec, _mix(model_dir, rows, w) + (1 - sum(w)) * default.emovec)
    # random rows: Python random seeded with the request seed, one randint per category in order
    rnd = synth.conditioning(speaker, EmotionOptions(vector=w, random=True), seed=1234)
    rng = random.Random(1234)
    hand_rows = [rng.randint(0, n - 1) for n in EMO_NUM]
    assert list(rnd.rows) == hand_rows and hand_rows != rows
    torch.testing.assert_close(rnd.emovec, _mix(model_dir, hand_rows, w) + (1 - sum(w)) * default.emovec)
    # text: the Qwen model's vector (tiny random model: parser fallback) goes the vector route
    txt = synth.conditioning(speaker, EmotionOptions(text="I am so happy today!"), seed=3)
    assert txt.vector == m.qwen_emotion.vector("I am so happy today!", 3)
    # every control changes the audio vs the default
    audio = {}
    for name, opts in {"default": EmotionOptions(), "alpha": EmotionOptions(reference=emo_wav, alpha=0.6),
                       "vector": EmotionOptions(vector=w), "random": EmotionOptions(vector=w, random=True),
                       "text": EmotionOptions(use_text=True)}.items():
        audio[name] = synth.synthesize("Hello there.", voice_wav, greedy(), emotion=opts).pcm16
    for name in ("alpha", "vector", "random", "text"):
        same = audio[name].shape == audio["default"].shape and np.array_equal(audio[name], audio["default"])
        assert not same, name
    assert not np.array_equal(audio["vector"][:1000], audio["random"][:1000])


@pytest.mark.parametrize("opts,needle", [
    (EmotionOptions(vector=(0.1,) * 7), "8"),
    (EmotionOptions(vector=(0.0,) * 7 + (1.3,)), "calm"),
    (EmotionOptions(vector=(0.9, 0.9, 0, 0, 0, 0, 0, 0)), "sum"),
    (EmotionOptions(alpha=1.5), "emo_alpha"),
    (EmotionOptions(random=True), "random"),
    (EmotionOptions(vector=(0.0,) * 7 + (1.0,), text="calm"), "either"),
])
def test_bad_emotion_options_are_one_line_input_errors(fast, voice_wav, opts, needle):
    with pytest.raises(InputError, match=needle) as info:
        fast.synthesize("Hello.", voice_wav, greedy(), emotion=opts)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_max_mel_tokens_cut_and_an_unused_alpha_are_reported(fast, voice_wav):
    r = fast.synthesize("A sentence long enough.", voice_wav, greedy(max_mel_tokens=8),
                        emotion=EmotionOptions(vector=(0.0,) * 7 + (1.0,), alpha=0.5))
    assert not r.segments[0].stopped and len(r.segments[0].codes) == 8
    assert any("max_mel_tokens=8" in w for w in r.warnings) and any("emo_alpha=0.5" in w for w in r.warnings)


def test_text_emotion_without_the_qwen_dir_fails_only_that_request(fast, voice_wav, tmp_path):
    no_qwen = Synthesizer2(dataclasses.replace(fast.model, qwen_emotion=QwenEmotion(tmp_path / "absent")),
                           diffusion_steps=3)
    with pytest.raises(InputError, match="Qwen emotion model"):
        no_qwen.synthesize("Hello.", voice_wav, greedy(), emotion=EmotionOptions(use_text=True))
    assert no_qwen.synthesize("Hello.", voice_wav, greedy()).segments  # the next request is fine


def test_families_are_refused_by_the_other_engine(model_dir, tiny_model_dir):
    with pytest.raises(ConfigError, match="IndexTTS 1.5 model"):
        load_v2_model(tiny_model_dir)
    from engine_ref.indextts.config import load_config

    with pytest.raises(ConfigError, match="IndexTTS2 model"):
        load_config(model_dir / "config.yaml")


# ---- CLI ----

def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "Fix:" in lines[0], err
    return lines[0]


def test_cli_synth_writes_a_22k_wav_with_sane_levels_and_prints_stage_timings(model_dir, voice_wav, emo_wav,
                                                                              tmp_path, capsys):
    """The faithful defaults (3-beam sampling, 25 CFM steps, cfg 0.7) from the command line."""
    out = tmp_path / "x.wav"
    code = cli(["synth", "--model", str(model_dir), "--ref", str(voice_wav), "--text", "Hello there. How are you?",
                "--out", str(out), "--seed", "3", "--emo-ref", str(emo_wav), "--emo-alpha", "0.5"])
    assert code == 0
    data, sr = sf.read(out, dtype="int16")
    assert sr == SR and data.size > 0 and data.dtype == np.int16
    wav = data.astype(np.float32) / 32768
    rms, peak = float(np.sqrt(np.mean(wav**2))), float(np.abs(wav).max())
    assert 0.003 < rms < 0.5 and peak < 0.99, (rms, peak)  # neither silent nor clipped
    assert np.mean(np.abs(data) >= 32767) < 0.001
    printed = capsys.readouterr().out
    assert "RTF" in printed and "s2mel" in printed and "vocoder" in printed and "loaded" in printed


@pytest.mark.parametrize("extra,needle", [
    (["--emo-vector", "0,0,1"], "8"),
    (["--emo-vector", "a,b,c,d,e,f,g,h"], "numbers"),
    (["--emo-alpha", "1.5"], "emo_alpha"),
    (["--emo-random"], "random"),
])
def test_cli_bad_emotion_flags_are_one_line_errors(model_dir, voice_wav, tmp_path, capsys, extra, needle):
    out = tmp_path / "x.wav"
    code = cli(["synth", "--model", str(model_dir), "--ref", str(voice_wav), "--text", "Hi.", "--out", str(out),
                "--greedy", *extra])
    assert code == 2 and needle in _error_line(capsys) and not out.exists()


def test_cli_text_emotion_without_model_and_v2_flags_on_a_1x_model(model_dir, tiny_model_dir, voice_wav, tmp_path,
                                                                  capsys):
    bare = tmp_path / "no-qwen"
    bare.mkdir()
    for p in model_dir.iterdir():
        if p.name != "qwen0.6bemo4-merge":
            (bare / p.name).symlink_to(p)
    out = tmp_path / "x.wav"
    args = ["synth", "--ref", str(voice_wav), "--text", "Hi.", "--out", str(out), "--greedy"]
    assert cli([*args, "--model", str(bare), "--emo-text", "so happy"]) == 2
    assert "Qwen emotion model" in _error_line(capsys) and not out.exists()
    assert cli([*args, "--model", str(tiny_model_dir), "--emo-vector", "0,0,0,0,0,0,0,1"]) == 2
    assert "IndexTTS-2" in _error_line(capsys) and not out.exists()
    shutil.rmtree(bare)
