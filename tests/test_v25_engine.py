"""IndexTTS-2.5 engine_ref on tiny-v2.5: the tiktoken front end against tiktoken driven directly with the vocabulary
file, the 25 Hz codec decoder against a hand-written torch.nn.functional formulation (and strict loading of a
codec.pth written here from the facts doc's key names), the campplus-mode GPT's 3 conditioning rows and language
embedding, strict gpt.pth loading, and Synthesizer25 end to end in the five languages (determinism,
duration_factor on the length regulator's targets, one-line input errors). Facts: indextts2-facts.md §9."""

from __future__ import annotations

import base64
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from engine_ref.audio import write_wav
from engine_ref.errors import CheckpointError, InputError
from engine_ref.indextts.presets import demo_voice
from engine_ref.indextts2.gpt import v2_generation_params
from engine_ref.indextts2.semantic_codec import INDEXTTS2_CODEC, SemanticCodecConfig
from engine_ref.indextts2.v25.codec_decoder import codec25_layout, load_codec25
from engine_ref.indextts2.v25.frontend import TextFrontendV25
from engine_ref.indextts2.v25.generate import generation_prefix_v25
from engine_ref.indextts2.v25.gpt import build_gpt_v25
from engine_ref.indextts2.v25.japanese import JapaneseWordSplitter
from engine_ref.indextts2.v25.synthesizer import Synthesizer25
from triton_tts.cli import main as cli

SR = 22050
VOCAB = "multilingual_zh_ja_yue_char_del.tiktoken"
#: language id = index in upstream's LANGUAGE_DICT (facts §9), written out here independently of our table
LANG_IDS = {"en": 0, "zh": 1, "es": 3, "ja": 7, "ar": 13}
TEXTS = {
    "zh": "你好，欢迎使用语音合成系统。今天天气很好！",
    "en": "Hello world, this is a test of the speech system.",
    "ja": "こんにちは、今日はいい天気ですね。音声合成のテストをします。",
    "es": "Hola mundo, esto es una prueba del sistema de voz.",
    "ar": "مرحبا بالعالم، هذا اختبار لنظام تحويل النص إلى كلام.",
}
SHORT = {"zh": "你好，欢迎。", "en": "Hello world.", "ja": "こんにちは。", "es": "Hola mundo.", "ar": "مرحبا بالعالم."}


# ---- fixtures ----------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_v25_model_dir) -> Path:
    return tiny_v25_model_dir  # the session's (read-only here; the export and serving tests share it)


@pytest.fixture(scope="module")
def synth(model_dir) -> Synthesizer25:
    return Synthesizer25.from_pretrained(model_dir, speaker_cache_size=2, diffusion_steps=3)


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory) -> Path:
    return write_wav(tmp_path_factory.mktemp("voice25") / "voice.wav", demo_voice(1.5, 24000), 24000)


def greedy(seed: int = 5):
    return v2_generation_params(do_sample=False, num_beams=1, seed=seed)


# ---- tokenizer: tiktoken driven directly -------------------------------------------------------------------------
_WHISPER_99 = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi ml "
    "cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am "
    "yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su").split()


def direct_encoding(path: Path):
    """A tiktoken Encoding built here from the file (upstream's get_encoding, facts §9), not through our code."""
    import tiktoken

    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    names = (["endoftext", "startoftranscript"] + _WHISPER_99
             + "ASR AED SER Speech /Speech BGM /BGM Laughter /Laughter Applause /Applause".split()
             + "HAPPY SAD ANGRY NEUTRAL".split()
             + "translate transcribe startoflm startofprev nospeech notimestamps".split()
             + [f"SPECIAL_TOKEN_{i}" for i in range(1, 31)]
             + "TTS/B TTS/O TTS/Q TTS/A TTS/CO TTS/CL TTS/H".split() + [f"TTS/SP{i:02d}" for i in range(1, 14)]
             + ["%.2f" % (i * 0.02) for i in range(1501)])
    assert len(_WHISPER_99) == 99 and len(names) == 1673
    specials = {f"<|{n}|>": len(ranks) + i for i, n in enumerate(names)}
    gpt2_pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="direct", pat_str=gpt2_pattern, mergeable_ranks=ranks, special_tokens=specials,
                             explicit_n_vocab=len(ranks) + len(specials))


@pytest.fixture(scope="module")
def frontend(synth) -> TextFrontendV25:
    return synth.model.frontend


@pytest.fixture(scope="module")
def enc(model_dir):
    return direct_encoding(model_dir / VOCAB)


@pytest.mark.parametrize("lang", list(TEXTS))
def test_ids_per_language_equal_tiktoken_driven_directly(frontend, enc, synth, lang):
    segments = frontend.prepare(TEXTS[lang], lang, max_text_tokens_per_segment=6)
    assert len(segments) >= 2  # the budget splits the text: every segment carries the prefix and the language
    tag = enc.encode_single_token(f"<|{lang}|>")
    assert tag == frontend.tokenizer.num_ranks + 2 + LANG_IDS[lang]  # these five: Whisper index == language id
    for seg in segments:
        expected = enc.encode(f"<|{lang}|> " + seg.text, allowed_special="all") + [1]
        assert list(seg.token_ids) == expected
        assert seg.token_ids[0] == tag and seg.lang_id == LANG_IDS[lang] and seg.lang == lang
        assert len(seg.token_ids) - 1 <= 6  # within budget (prefix included), plus the stop id
    assert enc.n_vocab == frontend.tokenizer.n_vocab == synth.model.config.gpt.number_text_tokens
    joined = "".join(s.text for s in segments)
    if lang in ("zh", "en", "ja"):
        assert joined == joined.lower()
    if lang == "es":
        assert joined == joined.upper() and "HOLA" in joined
    if lang == "ar":
        assert joined.startswith("مرحبا")


def test_pronunciation_annotations_become_special_token_pairs(frontend, enc):
    (seg,) = frontend.prepare("I <read|R EH1 D> it, 我<好|hao3>的.", "en")
    st1, st2 = enc.encode_single_token("<|SPECIAL_TOKEN_1|>"), enc.encode_single_token("<|SPECIAL_TOKEN_2|>")
    assert list(seg.token_ids).count(st1) == 2 and list(seg.token_ids).count(st2) == 2
    assert "<|SPECIAL_TOKEN_1|>R EH1 D<|SPECIAL_TOKEN_1|>" in seg.text
    assert list(seg.token_ids) == enc.encode("<|en|> " + seg.text, allowed_special="all") + [1]


@pytest.mark.parametrize("lang", ["fr", "", None, "english"])
def test_unknown_language_is_an_input_error_naming_the_choices(frontend, lang):
    with pytest.raises(InputError) as err:
        frontend.prepare("hello", lang)
    line = str(err.value)
    assert "\n" not in line and "Fix:" in line
    assert all(code in err.value.fix for code in ("zh", "en", "ja", "es", "ar"))


def test_japanese_splitting_uses_fugashi_when_installed(frontend):
    fugashi = pytest.importorskip("fugashi")
    pytest.importorskip("unidic_lite")
    text = "今日はいい天気ですね"
    words = " ".join(w.surface for w in fugashi.Tagger()(text))
    assert " " in words
    assert JapaneseWordSplitter().split(text) == words
    assert JapaneseWordSplitter().split("今日は  天気") == "今日 は  天気"  # runs of spaces kept as they are
    (seg,) = frontend.prepare(text, "ja")
    assert seg.text == words


def test_japanese_without_the_library_is_a_named_error_for_japanese_only(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "fugashi", None)  # import fugashi -> ImportError
    front = TextFrontendV25(model_dir / VOCAB)
    with pytest.raises(InputError, match="fugashi") as err:
        front.prepare("こんにちは", "ja")
    assert "pip install fugashi unidic-lite" in err.value.fix and "\n" not in str(err.value)
    for lang in ("zh", "en", "es", "ar"):
        assert front.prepare(SHORT[lang], lang)


# ---- codec decoder -----------------------------------------------------------------------------------------------
SMALL = SemanticCodecConfig(codebook_size=32, hidden_size=16, codebook_dim=4, vocos_dim=12, vocos_intermediate_dim=20,
                            vocos_num_layers=2)


def codec_keys(cfg: SemanticCodecConfig) -> dict[str, tuple[int, ...]]:
    """codec.pth['model'] from the facts doc (§4 MaskGCT codec + §9 down/up), written out by hand."""
    h, d, i, c = cfg.hidden_size, cfg.vocos_dim, cfg.vocos_intermediate_dim, cfg.codebook_dim
    keys: dict[str, tuple[int, ...]] = {}
    for side in ("encoder", "decoder"):
        keys |= {f"{side}.0.embed.weight": (d, h, 7), f"{side}.0.embed.bias": (d,)}
        for ln in ("norm", "final_layer_norm"):
            keys |= {f"{side}.0.{ln}.weight": (d,), f"{side}.0.{ln}.bias": (d,)}
        for n in range(cfg.vocos_num_layers):
            b = f"{side}.0.convnext.{n}"
            keys |= {f"{b}.dwconv.weight": (d, 1, 7), f"{b}.dwconv.bias": (d,), f"{b}.norm.weight": (d,),
                     f"{b}.norm.bias": (d,), f"{b}.pwconv1.weight": (i, d), f"{b}.pwconv1.bias": (i,),
                     f"{b}.pwconv2.weight": (d, i), f"{b}.pwconv2.bias": (d,), f"{b}.gamma": (d,)}
        keys |= {f"{side}.1.weight": (h, d), f"{side}.1.bias": (h,)}
    q = "quantizer.quantizers.0"
    keys |= {f"{q}.in_project.weight_g": (c, 1, 1), f"{q}.in_project.weight_v": (c, h, 1), f"{q}.in_project.bias": (c,),
             f"{q}.out_project.weight_g": (h, 1, 1), f"{q}.out_project.weight_v": (h, c, 1),
             f"{q}.out_project.bias": (h,), f"{q}.codebook.weight": (cfg.codebook_size, c)}
    keys |= {"down.weight": (h, h, 3), "down.bias": (h,), "up.weight": (h, h, 3), "up.bias": (h,)}
    return keys


def random_codec_state(cfg: SemanticCodecConfig, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in codec_keys(cfg).items():
        t = torch.randn(shape, generator=g) * 0.3
        if k.endswith(("norm.weight", "weight_g")):
            t = 1.0 + 0.1 * t
        state[k] = t
    return state


@pytest.fixture(scope="module")
def codec_pth(tmp_path_factory) -> tuple[Path, dict]:
    state = random_codec_state(SMALL)
    path = tmp_path_factory.mktemp("codec25") / "codec.pth"
    torch.save({"model": state}, path)
    return path, state


def test_codec_layout_key_count_and_names_match_the_facts():
    assert len(codec_keys(INDEXTTS2_CODEC)) == 243  # facts §9: codec.pth['model'] has 243 keys
    assert {k: tuple(v.shape) for k, v in codec25_layout(SMALL).items()} == codec_keys(SMALL)


def _wn(state, name):
    v, gn = state[f"{name}.weight_v"], state[f"{name}.weight_g"]
    return gn * v / v.flatten(1).norm(dim=1).reshape(-1, 1, 1)


def hand_decode(state: dict, cfg: SemanticCodecConfig, codes: torch.Tensor) -> torch.Tensor:
    """S_infer by hand: codebook lookup + weight-normed out_project, Vocos decoder, nearest x2, up conv."""
    q = "quantizer.quantizers.0"
    x = state[f"{q}.codebook.weight"][codes].transpose(1, 2)  # [B, c, N]
    x = F.conv1d(x, _wn(state, f"{q}.out_project"), state[f"{q}.out_project.bias"])  # [B, h, N]
    p = "decoder.0"
    d = cfg.vocos_dim

    def ln(t, name):  # over channels of [B, C, T]
        return F.layer_norm(t.transpose(1, 2), (d,), state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)

    x = F.conv1d(x, state[f"{p}.embed.weight"], state[f"{p}.embed.bias"], padding=3)
    x = ln(x, f"{p}.norm").transpose(1, 2)
    for n in range(cfg.vocos_num_layers):
        b = f"{p}.convnext.{n}"
        y = F.conv1d(x, state[f"{b}.dwconv.weight"], state[f"{b}.dwconv.bias"], padding=3, groups=d)
        y = ln(y, f"{b}.norm")
        y = F.linear(F.gelu(F.linear(y, state[f"{b}.pwconv1.weight"], state[f"{b}.pwconv1.bias"])),
                     state[f"{b}.pwconv2.weight"], state[f"{b}.pwconv2.bias"])
        x = x + (state[f"{b}.gamma"] * y).transpose(1, 2)
    x = F.linear(ln(x, f"{p}.final_layer_norm"), state["decoder.1.weight"], state["decoder.1.bias"])  # [B, N, h]
    x = F.interpolate(x.transpose(1, 2), scale_factor=2, mode="nearest")
    return F.conv1d(x, state["up.weight"], state["up.bias"], padding=1).transpose(1, 2)  # [B, 2N, h]


def test_codec_decode_matches_a_hand_formulation(codec_pth):
    path, state = codec_pth
    codec = load_codec25(path, SMALL)
    codes = torch.randint(0, SMALL.codebook_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = codec.decode(codes)
        vq = codec.quantizer.quantizers[0].vq2emb(codes)
    assert out.shape == (2, 18, SMALL.hidden_size)
    torch.testing.assert_close(out, hand_decode(state, SMALL, codes), atol=1e-5, rtol=1e-5)
    q = "quantizer.quantizers.0"
    by_hand = F.conv1d(state[f"{q}.codebook.weight"][codes].transpose(1, 2), _wn(state, f"{q}.out_project"),
                       state[f"{q}.out_project.bias"])
    torch.testing.assert_close(vq, by_hand, atol=1e-6, rtol=1e-6)
    assert out.abs().max() > 0.1  # not a degenerate all-zero path


def test_codec_padded_row_equals_its_solo_run(codec_pth):
    path, state = codec_pth
    codec = load_codec25(path, SMALL)
    codes = torch.randint(0, SMALL.codebook_size, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        batch = codec.decode(codes, torch.tensor([8, 5]))
        solo = codec.decode(codes[1:, :5])
    torch.testing.assert_close(batch[1, :10], solo[0], atol=1e-5, rtol=1e-5)
    assert batch[1, 10:].abs().max() == 0
    torch.testing.assert_close(batch[0], hand_decode(state, SMALL, codes[:1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("up.weight"), "up.weight"),
    (lambda s: s.pop("decoder.0.convnext.1.gamma"), "decoder.0.convnext.1.gamma"),
    (lambda s: s.update({"extra.weight": torch.zeros(1)}), "extra.weight"),
    (lambda s: s.update({"down.bias": torch.zeros(3)}), "down.bias"),
])
def test_codec_strict_load_names_the_bad_key(codec_pth, tmp_path, edit, needle):
    _, state = codec_pth
    bad = dict(state)
    edit(bad)
    path = tmp_path / "codec.pth"
    torch.save({"model": bad}, path)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")) as err:
        load_codec25(path, SMALL)
    assert err.value.fix and "\n" not in str(err.value)


# ---- GPT -----------------------------------------------------------------------------------------------------------
def test_three_conditioning_rows(synth):
    gpt = synth.model.gpt
    d = gpt.cfg.model_dim
    g = torch.Generator().manual_seed(4)
    style, emovec = torch.randn(1, 192, generator=g), torch.randn(1, d, generator=g)
    with torch.inference_mode():
        row = gpt.speaker_rows(style)
        conds = gpt.conditioning_rows(row, emovec)
    sd = gpt.state_dict()
    assert row.shape == (1, 1, d) and conds.shape == (1, 3, d)
    expected = F.linear(style, sd["spk_emb_proj.weight"], sd["spk_emb_proj.bias"]) + emovec
    torch.testing.assert_close(conds[0, 0], expected[0], atol=1e-5, rtol=1e-5)
    assert conds[0, 1:].abs().max() == 0


def test_language_embedding_is_added_on_every_text_row(synth):
    gpt, front = synth.model.gpt, synth.model.frontend
    (seg,) = front.prepare("Hello world.", "en")
    ids = list(seg.token_ids)
    conds = torch.randn(1, 3, gpt.cfg.model_dim, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        pa, va = generation_prefix_v25(gpt, conds, [ids], [LANG_IDS["en"]])
        pb, vb = generation_prefix_v25(gpt, conds, [ids], [LANG_IDS["ar"]])
    cleaned = [i for i in ids if i not in (0, 1)]
    n_text = len(cleaned) + 2  # start + ids + stop
    assert pa.shape == (1, 3 + n_text + 1, gpt.cfg.model_dim) and bool(va.all()) and torch.equal(va, vb)
    lang = gpt.state_dict()["lang_embedding.weight"]
    diff = (pa - pb)[0]
    assert diff[:3].abs().max() == 0 and diff[-1].abs().max() == 0  # conds and the start-mel row untouched
    torch.testing.assert_close(diff[3:3 + n_text], (lang[0] - lang[13]).expand(n_text, -1), atol=1e-5, rtol=1e-5)
    sd = gpt.state_dict()
    text = sd["text_embedding.weight"][[0, *cleaned, 1]] + sd["text_pos_embedding.emb.weight"][:n_text] + lang[0]
    torch.testing.assert_close(pa[0, 3:3 + n_text], text, atol=1e-5, rtol=1e-5)


def test_gpt_strict_load_names_a_missing_key(model_dir, synth):
    state = torch.load(model_dir / "gpt.pth", weights_only=True)
    cfg = synth.model.config.gpt
    assert len(state) == len(synth.model.gpt.state_dict())
    for key in ("lang_embedding.weight", "spk_emb_proj.bias", "gpt.h.0.attn.c_attn.weight"):
        bad = {k: v for k, v in state.items() if k != key}
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as err:
            build_gpt_v25(cfg, bad)
        assert err.value.fix and "\n" not in str(err.value)
    extra = dict(state, **{"speed_emb.weight": torch.zeros(2, cfg.model_dim)})
    with pytest.raises(CheckpointError, match="speed_emb"):
        build_gpt_v25(cfg, extra)
    v2_like = {k: v for k, v in extra.items() if not k.startswith("spk_emb_proj.")}
    with pytest.raises(CheckpointError, match=r"IndexTTS-2 \(2\.0\) gpt\.pth"):
        build_gpt_v25(cfg, v2_like)


# ---- Synthesizer25 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", list(SHORT))
def test_each_language_gives_22khz_audible_unclipped_audio(synth, voice_wav, lang):
    result = synth.synthesize(SHORT[lang], voice_wav, greedy(), lang=lang)
    assert result.sample_rate == SR and result.pcm16.dtype == np.int16 and result.pcm16.size > SR // 10
    wav = result.pcm16.astype(np.float32) / 32768
    rms, peak = float(np.sqrt(np.mean(wav**2))), float(np.abs(wav).max())
    assert 0.003 < rms < 0.5 and peak < 0.99, (rms, peak)
    assert result.timings.latent_s == 0 and result.timings.tokens > 0


def test_same_seed_twice_gives_identical_audio(synth, voice_wav):
    params = v2_generation_params(seed=9)  # the faithful sampling defaults (3 beams)
    a = synth.synthesize("Hello world. One more.", voice_wav, params, lang="en", max_text_tokens_per_segment=8)
    b = synth.synthesize("Hello world. One more.", voice_wav, params, lang="en", max_text_tokens_per_segment=8)
    assert len(a.segments) >= 2 and np.array_equal(a.pcm16, b.pcm16)


def test_batched_segments_equal_solo_runs(synth, voice_wav):
    """Upstream 2.5 runs one segment at a time; our buckets batch the GPT (and optionally the s2mel)."""
    text, kw = "Hello world. One more. And a third one.", {"lang": "en", "max_text_tokens_per_segment": 8}
    solo = synth.synthesize(text, voice_wav, greedy(), bucket_max_size=1, **kw)
    batched = synth.synthesize(text, voice_wav, greedy(), bucket_max_size=4, **kw)
    assert len(solo.segments) >= 3
    assert [s.codes for s in solo.segments] == [s.codes for s in batched.segments]
    assert np.array_equal(solo.pcm16, batched.pcm16)
    both = Synthesizer25(synth.model, diffusion_steps=3, s2mel_batch=True)
    joint = both.synthesize(text, voice_wav, greedy(), bucket_max_size=4, **kw)
    assert joint.pcm16.shape == solo.pcm16.shape
    assert np.abs(joint.pcm16.astype(np.int32) - solo.pcm16).max() <= 2  # fp32 reduction order only


def test_duration_factor_scales_the_regulator_target(synth, voice_wav, monkeypatch):
    m = synth.model
    seen: dict[str, list] = {"codes": [], "targets": []}
    decode = m.codec.decode

    def spy_decode(codes, code_lengths=None):
        seen["codes"].append(code_lengths.tolist())
        return decode(codes, code_lengths)

    def spy_regulate(module, args):
        x, x_lens, targets = args
        assert x.shape[1] == 2 * max(seen["codes"][-1]) and x_lens.tolist() == [2 * n for n in seen["codes"][-1]]
        seen["targets"].append(targets.tolist())

    monkeypatch.setattr(m.codec, "decode", spy_decode)
    hook = m.s2mel.length_regulator.register_forward_pre_hook(spy_regulate)
    audio = {}
    try:
        for f in (1.0, 2.0, 0.5):
            audio[f] = synth.synthesize("Hello world.", voice_wav, greedy(), lang="en", duration_factor=f).pcm16
    finally:
        hook.remove()
    (n1,), (n2,), (n3,) = seen["codes"]
    assert n1 == n2 == n3 > 0  # the GPT does not see the factor
    # facts §9: target = floor(1.72 * 2N * duration_factor)
    assert seen["targets"] == [[math.floor(1.72 * 2 * n1 * f)] for f in (1.0, 2.0, 0.5)]
    hop = audio[1.0].size // seen["targets"][0][0]
    assert [a.size for a in audio.values()] == [t[0] * hop for t in seen["targets"]]
    assert abs(audio[2.0].size / audio[1.0].size - 2.0) < 0.05


@pytest.mark.parametrize("kwargs, needle", [
    ({}, "zh, en, ja, es, ar"),  # lang omitted
    ({"lang": None}, "zh, en, ja, es, ar"),
    ({"lang": " "}, "zh, en, ja, es, ar"),
    ({"lang": "fr"}, "zh, en, ja, es, ar"),
    ({"lang": "en", "duration_factor": 0.1}, "0.5"),
    ({"lang": "en", "duration_factor": 3.0}, "2.0"),
    ({"lang": "en", "duration_factor": "fast"}, "0.5"),
])
def test_bad_requests_are_one_line_input_errors(synth, voice_wav, kwargs, needle):
    for call in (synth.synthesize, lambda *a, **k: list(synth.stream(*a, **k))):
        with pytest.raises(InputError) as err:
            call("Hello.", voice_wav, greedy(), **kwargs)
        assert "\n" not in str(err.value) and err.value.fix and needle in err.value.fix


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "Fix:" in lines[0], err
    return lines[0]


def test_cli_synth_needs_lang_and_writes_22khz(model_dir, voice_wav, tmp_path, capsys):
    out = tmp_path / "x.wav"
    args = ["synth", "--model", str(model_dir), "--ref", str(voice_wav), "--text", "Hola.", "--out", str(out),
            "--greedy", "--diffusion-steps", "3"]
    assert cli(args) == 2
    assert "--lang" in _error_line(capsys) and not out.exists()
    assert cli([*args, "--lang", "es", "--duration-factor", "2.5"]) == 2
    assert "duration_factor" in _error_line(capsys) and not out.exists()
    assert cli([*args, "--lang", "es", "--duration-factor", "1.5"]) == 0
    data, sr = sf.read(out, dtype="int16")
    assert sr == SR and data.size > 0
