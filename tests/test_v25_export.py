"""IndexTTS-2.5 export on tiny-v2.5: the manifest of the session's verified export (family, 3 cond rows, the reused
and the new graphs, parity of each), `triton-tts export` for 2.5 (components, no-op re-run, named errors), the new
graphs vs engine_ref (prefill embedding the language row from tagged ids, codec decoder with padded rows, s2mel
target condition at several duration factors, speaker row and conds), a wrong graph failing verification, TensorRT
profiles, and a whole synthesis from the ORT graphs == Synthesizer25 (same codes, audio within 2 LSB) in each of the
five languages, greedy and seeded sampling."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engine_ref.errors import InputError, ModelFilesError
from engine_ref.indextts2.gpt import v2_generation_params
from engine_ref.indextts2.v25.generate import generation_prefix_v25
from engine_ref.indextts2.v25.gpt import tag_text_ids
from engine_ref.indextts2.v25.languages import language_id
from engine_ref.indextts2.v25.loader import load_v25_model
from engine_ref.indextts2.v25.s2mel import target_condition_v25, target_mel_frames_v25
from engine_ref.indextts2.v25.synthesizer import Synthesizer25
from export.common import ExportOptions, ParityError, session
from export.indextts2.v25 import codec_decoder as codec_export
from export.indextts2.v25.gpt import prefill_verifier, tagged_texts
from export.indextts2.v25.pipeline import COMPONENTS_V25
from export.indextts2.v25.runtime import OrtIndexTTS25, make_conds_v25
from export.manifest import read_manifest
from export.pipeline import ExportRequest, run_export
from export.runtime import OrtDecoder
from export.tensorrt import PlanOptions, resolve_profiles
from triton_tts.cli import main as cli
from tests.test_v25_engine import TEXTS  # one sentence per language, shared by the 2.5 tests

KEYS = ("semantic_encoder", "campplus", "speaker_projection", "emotion_conditioner", "gpt_prefill", "gpt_decode",
        "codec_decoder", "s2mel_prompt", "s2mel_cond", "cfm_estimator", "vocoder")
LANGS = ("zh", "en", "ja", "es", "ar")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def export_dir(tiny_v25_export_dir):
    return tiny_v25_export_dir


@pytest.fixture(scope="module")
def manifest(export_dir):
    return read_manifest(export_dir, deep=True)


@pytest.fixture(scope="module")
def model(tiny_v25_model_dir):
    return load_v25_model(tiny_v25_model_dir)


def _sess(export_dir, manifest, name):
    return session(export_dir / manifest.component(name).file, threads=1)


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# ------------------------------------------------------------------------------------------------ manifest


def test_manifest_family_graphs_parity_and_assets(manifest, export_dir):
    m = manifest.model
    assert (m["family"], m["version"], m["cond_rows"], m["sampling_rate"]) == ("indextts2.5", "2.5", 3, 22050)
    assert m["request"]["components"] == list(COMPONENTS_V25) and m["languages"][:5] == list(LANGS)
    assert set(manifest.components) == set(KEYS)  # no semantic_codec / vq2emb, no speaker_conditioner
    for key, comp in manifest.components.items():
        assert comp.parity is not None and comp.parity.max_rel <= 1e-4 and len(comp.parity.cases) >= 3, key
    for key in ("speaker_projection", "codec_decoder", "s2mel_prompt", "s2mel_cond", "cfm_estimator"):
        alone = manifest.component(key).parity.extra["padded_vs_alone"]
        assert alone["checked"] and alone["max_rel"] <= 1e-4, key
    pre = manifest.component("gpt_prefill")
    assert pre.input("conds").shape[1] == 3 and pre.extra["language_rows"] == 107
    assert [p["name"] for p in manifest.component("gpt_decode").extra["trt_profiles"]] == ["step"]
    assert "speed_emb" not in manifest.assets and "bpe" not in manifest.assets
    for role in ("config", "tokenizer", "spk_matrix", "emo_matrix", "feature_extractor"):
        assert (export_dir / manifest.assets[role]).is_file(), role
    assert {"gpt.pth", "codec.pth", "multilingual_zh_ja_yue_char_del.tiktoken", "campplus/campplus_cn_common.bin",
            "w2v_bert/model.safetensors", "bigvgan/bigvgan_generator.pt"} <= set(m["source_sha256"])


def test_cli_exports_chosen_25_components_reruns_as_noop_and_names_bad_ones(tiny_v25_model_dir, tmp_path):
    out = tmp_path / "codec-only"
    assert cli(["export", "--model", str(tiny_v25_model_dir), "--out", str(out), "--max-batch", "2",
                "--components", "codec_decoder", "speaker_projection"]) == 0
    part = read_manifest(out, deep=True)
    assert set(part.components) == {"codec_decoder", "speaker_projection"}
    assert part.component("codec_decoder").parity.max_rel <= 1e-4
    _, exported = run_export(ExportRequest(str(tiny_v25_model_dir), out, components=("codec_decoder",
                                                                                       "speaker_projection"),
                                           options=ExportOptions(max_batch=2)))
    assert not exported
    with pytest.raises(InputError, match="IndexTTS-2.5: semantic_codec.*codec_decoder"):
        run_export(ExportRequest(str(tiny_v25_model_dir), out, components=("semantic_codec",)))


# ------------------------------------------------------------------------------------------------ the new graphs


def test_prefill_embeds_the_language_row_from_tagged_ids_as_engine_ref(export_dir, model):
    dec = OrtDecoder.from_manifest(export_dir, threads=1)
    uv = model.gpt
    gen = torch.Generator().manual_seed(21)
    conds = torch.randn(1, 3, uv.cfg.model_dim, generator=gen)
    raw = [int(x) for x in torch.randint(2, uv.cfg.text_vocab, (9,), generator=gen)]
    logits = {}
    for lang in LANGS:
        ids = tag_text_ids(raw, language_id(lang), uv.cfg.text_vocab)
        ours, hidden, _ = dec.prefill(conds.numpy(), [ids])
        with torch.inference_mode():
            embeds, valid = generation_prefix_v25(uv, conds, [raw], [language_id(lang)])
            ref_h, _ = uv.decode(embeds, valid)
            ref_logits, ref_hidden = uv.mel_logits(ref_h[:, -1]).numpy(), uv.latents(ref_h[:, -1]).numpy()
        assert _rel(ours, ref_logits) < 1e-5 and _rel(hidden, ref_hidden) < 1e-5, lang
        logits[lang] = ours
    # the language row matters (same token ids, five languages, five different predictions)
    assert min(_rel(logits[a], logits[b]) for a in LANGS for b in LANGS if a < b) > 1e-3
    # one padded batch mixing languages: every row equals its solo prefill
    texts = tagged_texts(uv, [4, 13, 7], gen)
    batch, _, _ = dec.prefill(np.repeat(conds.numpy(), 3, axis=0), texts)
    for row, ids in enumerate(texts):
        solo, _, _ = dec.prefill(conds.numpy(), [ids])
        assert _rel(batch[row : row + 1], solo) < 1e-5


def test_codec_decoder_padded_batch_vs_codec25_decode(export_dir, manifest, model):
    rng = np.random.default_rng(31)
    lens = np.array([17, 5, 11])
    feeds = codec_export.code_inputs(rng, lens, int(model.codec.cfg.codebook_size))
    semantic, frames = _sess(export_dir, manifest, "codec_decoder").run(None, feeds)
    assert frames.tolist() == (2 * lens).tolist() and semantic.shape == (3, 34, model.codec.cfg.hidden_size)
    with torch.inference_mode():
        for row, n in enumerate(lens.tolist()):
            alone = model.codec.decode(torch.from_numpy(feeds["codes"][row : row + 1, :n]))  # upstream: no lengths
            assert _rel(semantic[row : row + 1, : 2 * n], alone.numpy()) < 1e-5
            assert not semantic[row, 2 * n:].any()


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.37, 2.0])
def test_codec_then_s2mel_cond_equal_engine_ref_target_condition(export_dir, manifest, model, factor):
    rng = np.random.default_rng(32)
    lens = np.array([14, 9])
    feeds = codec_export.code_inputs(rng, lens, int(model.codec.cfg.codebook_size))
    semantic, frames = _sess(export_dir, manifest, "codec_decoder").run(None, feeds)
    targets = np.asarray(target_mel_frames_v25(lens.tolist(), factor), np.int64)
    (cond,) = _sess(export_dir, manifest, "s2mel_cond").run(None, {"semantic": semantic, "semantic_lengths": frames,
                                                                   "target_lengths": targets})
    assert cond.shape[1] == targets.max() == int(2 * 14 * 1.72 * factor)
    with torch.inference_mode():
        ref = target_condition_v25(model.s2mel, model.codec, torch.from_numpy(feeds["codes"]),
                                   torch.from_numpy(lens), torch.from_numpy(targets))
    assert _rel(cond, ref.numpy()) < 1e-5
    assert not cond[1, targets[1]:].any()


def test_speaker_projection_and_conds_vs_engine_ref(export_dir, manifest, model):
    rng = np.random.default_rng(33)
    style = rng.standard_normal((2, 192)).astype(np.float32)
    (row,) = _sess(export_dir, manifest, "speaker_projection").run(None, {"style": style})
    emovec = rng.standard_normal((2, model.gpt.cfg.model_dim)).astype(np.float32)
    with torch.inference_mode():
        ref_row = model.gpt.speaker_rows(torch.from_numpy(style))
        assert row.shape == (2, 1, model.gpt.cfg.model_dim) and _rel(row, ref_row.numpy()) < 1e-5
        ref = model.gpt.conditioning_rows(torch.from_numpy(row), torch.from_numpy(emovec)).numpy()
    conds = make_conds_v25(row, emovec)
    assert conds.shape == (2, 3, model.gpt.cfg.model_dim) and np.array_equal(conds, ref) and not conds[:, 1:].any()


def test_a_wrong_graph_fails_verification(export_dir, manifest, model):
    """The parity checks can fail: the exported graphs against a model with the language table or the codec nudged."""
    other = copy.copy(model)
    other.gpt = copy.deepcopy(model.gpt)
    with torch.no_grad():
        row = other.gpt.lang_embedding.weight[language_id("ja")]
        row += 0.05 * torch.randn(row.shape, generator=torch.Generator().manual_seed(0))  # not uniform: LayerNorm
    with pytest.raises(ParityError, match="gpt_prefill"):  # the verification reaches every language's row
        prefill_verifier()(other, export_dir, manifest.component("gpt_prefill"), ExportOptions(max_batch=2))
    other.codec = copy.deepcopy(model.codec)
    with torch.no_grad():
        other.codec.up.weight.mul_(1.01)
    with pytest.raises(ParityError, match="codec_decoder"):
        codec_export.verify_component(other, export_dir, manifest.component("codec_decoder"),
                                      ExportOptions(max_batch=2))


def test_tensorrt_profiles_for_every_25_graph(manifest):
    resolved = resolve_profiles(manifest, PlanOptions(max_batch=2))
    assert set(resolved) == set(KEYS)
    (step,) = resolved["gpt_decode"][1]
    assert step.name == "step" and step["mel_tokens"].max == (2, 1)
    (cond,) = resolved["s2mel_cond"][1]
    assert cond["semantic"].max[1] == 2 * manifest.component("codec_decoder").dims["codes_len"].max


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def synth(model) -> Synthesizer25:
    return Synthesizer25(model)


@pytest.fixture(scope="module")
def ort_tts(export_dir) -> OrtIndexTTS25:
    return OrtIndexTTS25(export_dir, threads=1)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("lang", LANGS)
def test_synthesis_from_ort_graphs_equals_synthesizer25(synth, ort_tts, v2_voice_wav, lang, sampled):
    params = v2_generation_params(do_sample=sampled, num_beams=1, seed=9 if sampled else 5)
    ref = synth.synthesize(TEXTS[lang], v2_voice_wav, params, lang=lang, duration_factor=1.3,
                           max_text_tokens_per_segment=20)
    ours = ort_tts.synthesize(TEXTS[lang], v2_voice_wav, params, lang=lang, duration_factor=1.3,
                              max_text_tokens_per_segment=20)
    assert ours.sample_rate == 22050 and len(ours.segments) == len(ref.segments) >= 1
    assert [s.codes for s in ours.segments] == [s.codes for s in ref.segments] and all(s.codes for s in ref.segments)
    assert ours.pcm16.shape == ref.pcm16.shape and np.abs(ref.pcm16).max() > 100
    assert np.abs(ours.pcm16.astype(np.int32) - ref.pcm16.astype(np.int32)).max() <= 2


def test_runner_refuses_a_missing_language_a_bad_factor_and_a_2_0_export(ort_tts, v2_voice_wav, tmp_path):
    from export.manifest import EXPORT_CODE_VERSION, FORMAT, Manifest, write_manifest

    with pytest.raises(InputError, match="needs the language"):
        ort_tts.synthesize("Hi there.", v2_voice_wav, v2_generation_params(num_beams=1, seed=1))
    with pytest.raises(InputError, match="duration_factor 3"):
        ort_tts.synthesize("Hi there.", v2_voice_wav, v2_generation_params(num_beams=1, seed=1), lang="en",
                           duration_factor=3)
    write_manifest(tmp_path, Manifest(FORMAT, EXPORT_CODE_VERSION, {"family": "indextts2"}, {}, {}))
    with pytest.raises(ModelFilesError, match="not IndexTTS-2.5"):
        OrtIndexTTS25(tmp_path)
