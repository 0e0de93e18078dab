"""IndexTTS2 export on tiny-v2: `triton-tts export` end to end, each graph vs engine_ref v2 (fresh inputs, several batch
sizes and lengths), ORT greedy codes and latents vs engine_ref, a whole synthesis from the ORT graphs vs Synthesizer2
(within 2 LSB), the 1.x decoder contract (34 cond rows, precision variants), and TensorRT profiles without a GPU."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_ref.audio import write_wav
from engine_ref.errors import InputError
from engine_ref.generate import latent_pass
from engine_ref.indextts2.campplus import campplus_style
from engine_ref.indextts2.gpt import generate_codes, latent_pass_v2, v2_generation_params
from engine_ref.indextts2.loader import load_v2_model
from engine_ref.indextts2.presets import write_v2_preset
from engine_ref.indextts2.s2mel.model import target_mel_frames
from engine_ref.indextts2.synthesizer import EmotionOptions, Synthesizer2
from engine_ref.indextts.presets import demo_voice
from export.common import ExportOptions, ParityError, session
from export.gpt import greedy_parity
from export.indextts2 import cfm as cfm_export
from export.indextts2.pipeline import COMPONENTS
from export.indextts2.runtime import OrtIndexTTS2, make_conds
from export.manifest import read_manifest
from export.pipeline import ExportRequest, run_export
from export.runtime import OrtDecoder
from export.tensorrt import PlanOptions, TrtEnvironment, build_plans, resolve_profiles
from triton_tts.cli import main as cli

KEYS = ("semantic_encoder", "semantic_codec", "semantic_vq2emb", "campplus", "speaker_conditioner",
        "emotion_conditioner", "gpt_prefill", "gpt_decode", "s2mel_prompt", "s2mel_cond", "cfm_estimator", "vocoder")
MAX_BATCH = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_v2_preset("tiny-v2", tmp_path_factory.mktemp("v2x") / "tiny-v2", layout="flat")


@pytest.fixture(scope="module")
def model(model_dir):
    return load_v2_model(model_dir)


@pytest.fixture(scope="module")
def export_dir(model_dir, tmp_path_factory) -> Path:
    """The whole export through the CLI (what users run), verified on the way."""
    out = tmp_path_factory.mktemp("v2-export")
    assert cli(["export", "--model", str(model_dir), "--out", str(out), "--max-batch", str(MAX_BATCH)]) == 0
    return out


@pytest.fixture(scope="module")
def manifest(export_dir):
    return read_manifest(export_dir, deep=True)


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory) -> Path:
    return write_wav(tmp_path_factory.mktemp("v2x-voice") / "voice.wav", demo_voice(1.5, 24000), 24000)


def _sess(export_dir, manifest, name):
    return session(export_dir / manifest.component(name).file, threads=1)


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# ------------------------------------------------------------------------------------------------ manifest


def test_manifest_family_components_parity_and_assets(manifest, export_dir, model, model_dir):
    assert manifest.model["family"] == "indextts2" and manifest.model["sampling_rate"] == 22050
    assert manifest.model["request"]["components"] == list(COMPONENTS)
    assert set(manifest.components) == set(KEYS)
    for key, comp in manifest.components.items():
        assert comp.parity is not None and comp.parity.max_rel <= 1e-4 and len(comp.parity.cases) >= 3, key
        for t in (*comp.inputs, *comp.outputs):
            for d in t.shape:
                if isinstance(d, str):
                    r = comp.dims[d]
                    assert r.min <= r.opt <= r.max, (key, d)
    # padded rows: checked equal to the row alone where engine_ref is batch-exact, only measured elsewhere
    for key in ("semantic_encoder", "semantic_codec", "s2mel_prompt", "s2mel_cond", "cfm_estimator"):
        alone = manifest.component(key).parity.extra["padded_vs_alone"]
        assert alone["checked"] and alone["max_rel"] <= 1e-4, key
    assert not manifest.component("speaker_conditioner").parity.extra["padded_vs_alone"]["checked"]
    # assets beside the graphs, with what serving needs in Python
    speed = np.load(export_dir / manifest.assets["speed_emb"])
    assert np.array_equal(speed, model.gpt.speed_emb.weight.detach().numpy())
    for role in ("config", "bpe", "spk_matrix", "emo_matrix", "feature_extractor"):
        assert (export_dir / manifest.assets[role]).is_file(), role
    hashes = manifest.model["source_sha256"]
    assert {"gpt.pth", "s2mel.pth", "w2v_bert/model.safetensors", "semantic_codec/semantic_codec/model.safetensors",
            "campplus/campplus_cn_common.bin", "bigvgan/bigvgan_generator.pt"} <= set(hashes)


def test_gpt_graphs_keep_the_1x_contract_with_34_cond_rows(manifest, model):
    cfg = model.gpt.cfg
    pre, dec = manifest.component("gpt_prefill"), manifest.component("gpt_decode")
    assert pre.input("conds").shape == ("batch", 34, cfg.model_dim)
    for comp in (pre, dec):
        assert comp.extra["cond_rows"] == comp.extra["num_latents"] == 34 and comp.extra["speaker_latents"] == 32
        assert comp.extra["first_generated_position"] == 2 and comp.extra["family"] == "indextts2"
    hd = cfg.model_dim // cfg.heads
    assert dec.input("past_key_values.0.key").shape == ("batch", cfg.heads, "past_len", hd)
    assert [o.name for o in dec.outputs][:3] == ["logits", "hidden", "present.0.key"]
    assert [p["name"] for p in dec.extra["trt_profiles"]] == ["step", "replay"]


def test_export_rerun_is_a_noop_and_bad_components_are_named(model_dir, export_dir):
    _, exported = run_export(ExportRequest(str(model_dir), export_dir, options=ExportOptions(max_batch=MAX_BATCH)))
    assert not exported
    with pytest.raises(InputError, match="cond_encoder.*semantic_encoder"):
        run_export(ExportRequest(str(model_dir), export_dir, components=("cond_encoder",)))


# ------------------------------------------------------------------------------------------------ each graph


def test_semantic_encoder_padded_batch_vs_engine_ref(export_dir, manifest, model):
    rng = np.random.default_rng(101)
    lens = [57, 20, 33]
    x = np.full((3, 57, 160), 1.0, np.float32)
    mask = np.zeros((3, 57), np.int64)
    for i, n in enumerate(lens):
        x[i, :n] = rng.standard_normal((n, 160))
        mask[i, :n] = 1
    (got,) = _sess(export_dir, manifest, "semantic_encoder").run(None, {"input_features": x, "attention_mask": mask})
    with torch.inference_mode():
        for i, n in enumerate(lens):
            alone = model.semantic.encoder(torch.from_numpy(x[i : i + 1, :n]), torch.ones(1, n, dtype=torch.long))
            assert _rel(got[i : i + 1, :n], alone.numpy()) < 1e-4


def test_codec_quantize_vq2emb_and_campplus_vs_engine_ref(export_dir, manifest, model):
    rng = np.random.default_rng(102)
    h = model.codec.cfg.hidden_size
    feats = rng.standard_normal((2, 29, h)).astype(np.float32)
    codes, emb = _sess(export_dir, manifest, "semantic_codec").run(None, {"features": feats,
                                                                          "lengths": np.array([29, 29])})
    with torch.inference_mode():
        ref_codes, ref_emb = model.codec.quantize(torch.from_numpy(feats))  # upstream's unmasked computation
        assert np.array_equal(codes, ref_codes.numpy()) and _rel(emb, ref_emb.numpy()) < 1e-4
        batch = rng.integers(0, model.codec.cfg.codebook_size, (3, 11))
        (dec,) = _sess(export_dir, manifest, "semantic_vq2emb").run(None, {"codes": batch})
        for row in range(3):  # batch-correct: every row is its own codes' embedding, not row 0's
            assert _rel(dec[row], model.codec.vq2emb(torch.from_numpy(batch[row : row + 1]))[0].numpy()) < 1e-4
        fb = rng.normal(-4, 3, (2, 143, 80)).astype(np.float32)
        (style,) = _sess(export_dir, manifest, "campplus").run(None, {"fbank": fb})
        for row in range(2):
            assert _rel(style[row : row + 1], campplus_style(model.campplus, torch.from_numpy(fb[row])).numpy()) < 1e-4


def test_conditioners_vs_engine_ref_and_make_conds(export_dir, manifest, model):
    rng = np.random.default_rng(103)
    gpt = model.gpt
    feats = rng.standard_normal((1, 40, gpt.cfg.feature_dim)).astype(np.float32)
    lengths = np.array([min(40, gpt.cfg.feature_dim)])  # upstream's quirk: the feature width caps the frames
    (latents,) = _sess(export_dir, manifest, "speaker_conditioner").run(None, {"features": feats,
                                                                              "feature_lengths": lengths})
    (emovec,) = _sess(export_dir, manifest, "emotion_conditioner").run(None, {"features": feats,
                                                                             "feature_lengths": lengths})
    with torch.inference_mode():
        t = torch.from_numpy(feats)
        assert _rel(latents, gpt.speaker_latents(t).numpy()) < 1e-4  # lengths None = upstream's quirk
        assert _rel(emovec, gpt.get_emovec(t).numpy()) < 1e-4
        conds = make_conds(latents, emovec, np.load(export_dir / manifest.assets["speed_emb"]))
        ref = gpt.conditioning_rows(torch.from_numpy(latents), torch.from_numpy(emovec)).numpy()
    assert conds.shape == (1, 34, gpt.cfg.model_dim) and np.array_equal(conds, ref)


def test_s2mel_front_and_estimator_vs_engine_ref(export_dir, manifest, model):
    rng = np.random.default_rng(104)
    s2 = model.s2mel
    n = np.array([13, 8])
    codes = rng.integers(0, model.codec.cfg.codebook_size, (2, 13))
    lat = rng.standard_normal((2, 13, s2.gpt_latent_dim)).astype(np.float32)
    cond, frames = _sess(export_dir, manifest, "s2mel_cond").run(None, {"codes": codes, "latents": lat,
                                                                        "code_lengths": n})
    assert frames.tolist() == target_mel_frames(torch.from_numpy(n)).tolist() == [22, 13]
    with torch.inference_mode():
        for row in range(2):
            k = int(n[row])
            c = torch.from_numpy(codes[row : row + 1, :k])
            ref = s2.target_condition(model.codec.vq2emb(c), torch.from_numpy(lat[row : row + 1, :k]),
                                      torch.tensor([k]))
            assert _rel(cond[row : row + 1, : int(frames[row])], ref.numpy()) < 1e-4
            assert not cond[row, int(frames[row]):].any()
        sem = rng.standard_normal((1, 17, s2.cfg.length_regulator.in_channels)).astype(np.float32)
        (prompt,) = _sess(export_dir, manifest, "s2mel_prompt").run(None, {"semantic": sem,
                                                                         "semantic_lengths": np.array([17]),
                                                                         "mel_frames": np.array([29])})
        assert _rel(prompt, s2.prompt_condition(torch.from_numpy(sem), 29).numpy()) < 1e-4
        feeds = cfm_export.cfg_batch(rng, model, np.array([31, 19]), np.array([6, 3]))
        (v,) = _sess(export_dir, manifest, "cfm_estimator").run(None, feeds)
        ref = s2.cfm.estimator(*(torch.from_numpy(a) for a in feeds.values())).numpy()
        assert v.shape == (4, 80, 31) and _rel(v, ref) < 1e-4


def test_vocoder_vs_engine_ref(export_dir, manifest, model):
    mel = np.random.default_rng(105).normal(-5, 2, (2, 80, 7)).astype(np.float32)
    (wav,) = _sess(export_dir, manifest, "vocoder").run(None, {"mel": mel})
    with torch.inference_mode():
        ref = model.vocoder(torch.from_numpy(mel)).squeeze(1).numpy()
    assert wav.shape == (2, 7 * 256) and _rel(wav, ref) < 1e-4 and np.abs(wav).max() <= 1.0


def test_a_wrong_graph_fails_verification(export_dir, manifest, model):
    """The parity check can fail: the same graph against an estimator with one weight nudged."""
    other = copy.deepcopy(model.s2mel)
    with torch.no_grad():
        other.cfm.estimator.conv2.weight.mul_(1.01)
    with pytest.raises(ParityError, match="cfm_estimator"):
        cfm_export.verify_component(types.SimpleNamespace(s2mel=other), export_dir,
                                    manifest.component("cfm_estimator"), ExportOptions(max_batch=2))


# ------------------------------------------------------------------------------------------------ decoding


def test_ort_greedy_codes_equal_engine_ref_on_34_row_conds(export_dir, model):
    assert greedy_parity(model, export_dir, prompts=4, max_mel_tokens=40)["exact"] == 4
    dec = OrtDecoder.from_manifest(export_dir, threads=1)
    assert dec.cond_rows == 34
    gen = torch.Generator().manual_seed(3)
    conds = torch.randn(1, 34, model.gpt.cfg.model_dim, generator=gen)
    ids = [int(i) for i in torch.randint(2, model.gpt.cfg.text_vocab, (9,), generator=gen)]
    for params in (v2_generation_params(do_sample=False, num_beams=1, max_mel_tokens=50),
                   v2_generation_params(num_beams=1, max_mel_tokens=50)):  # greedy, then seeded sampling
        (ref,) = generate_codes(model.gpt, conds, [ids], params, seeds=[77])
        ours = dec.greedy(conds.numpy(), ids, params, seed=77)
        assert ours.codes == ref.codes and ours.stopped == ref.stopped and ref.codes
        (ref_lat,) = latent_pass_v2(model.gpt, conds, [ids], [ref.codes])
        (lat,) = dec.latents(conds.numpy(), [ids], [ref.codes])
        assert lat.shape == ref_lat.shape[1:] and _rel(lat, ref_lat[0].numpy()) < 1e-4


def test_latent_pass_of_a_padded_batch(export_dir, model):
    dec = OrtDecoder.from_manifest(export_dir, threads=1)
    gen = torch.Generator().manual_seed(4)
    conds = torch.randn(2, 34, model.gpt.cfg.model_dim, generator=gen)
    texts = [[5, 9, 13], [7, 8, 9, 10, 11, 12]]
    codes = [[int(c) for c in torch.randint(0, 8192, (n,), generator=gen)] for n in (12, 4)]
    ours = dec.latents(conds.numpy(), texts, codes)
    with torch.inference_mode():
        ref = latent_pass(model.gpt, conds, texts, codes)
    for o, r in zip(ours, ref):
        assert o.shape == tuple(r.shape) and _rel(o, r.numpy()) < 1e-4


def test_int8_and_fp16_decoder_variants_apply_unchanged(model_dir, tmp_path, model):
    out = tmp_path / "gpt-variants"
    manifest, _ = run_export(ExportRequest(str(model_dir), out, components=("gpt",),
                                           precisions=("fp32", "int8", "fp16"), options=ExportOptions(max_batch=2)))
    assert set(manifest.components) == {"gpt_prefill", "gpt_decode", "gpt_decode@int8", "gpt_prefill@fp16",
                                        "gpt_decode@fp16"}
    comp = manifest.component("gpt_decode", "int8")
    assert comp.extra["cond_rows"] == 34 and comp.parity.extra["token_agreement"] >= 0.8
    for name in ("gpt_prefill", "gpt_decode"):
        half = manifest.component(name, "fp16")
        assert half.parity.max_rel <= 1e-2 and half.extra["cond_rows"] == 34
    assert manifest.component("gpt_prefill", "fp16").input("conds").shape[1] == 34
    conds = np.random.default_rng(5).standard_normal((1, 34, model.gpt.cfg.model_dim)).astype(np.float32)
    params = v2_generation_params(do_sample=False, num_beams=1, max_mel_tokens=8)
    for prec in ("int8", "fp16"):
        dec = OrtDecoder.from_manifest(out, manifest, precision=prec, threads=1)
        assert 0 < len(dec.greedy(conds, [4, 5, 6], params).codes) <= 8


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def synth(model) -> Synthesizer2:
    return Synthesizer2(model)


@pytest.fixture(scope="module")
def ort_tts(export_dir) -> OrtIndexTTS2:
    return OrtIndexTTS2(export_dir, threads=1)


@pytest.mark.parametrize("emotion", [EmotionOptions(), EmotionOptions(vector=(0, 0.3, 0, 0, 0, 0, 0.2, 0))],
                         ids=["own-emotion", "vector"])
def test_synthesis_from_ort_graphs_equals_synthesizer2(synth, ort_tts, voice_wav, emotion):
    params = v2_generation_params(do_sample=False, num_beams=1, seed=11)
    text = "Hello world. This is a test."
    ref = synth.synthesize(text, voice_wav, params, emotion=emotion, max_text_tokens_per_segment=16)
    ours = ort_tts.synthesize(text, voice_wav, params, emotion=emotion, max_text_tokens_per_segment=16)
    assert len(ours.segments) == len(ref.segments) == 2 and ours.sample_rate == 22050
    assert [s.codes for s in ours.segments] == [s.codes for s in ref.segments]
    assert ours.pcm16.shape == ref.pcm16.shape and np.abs(ref.pcm16).max() > 100
    assert np.abs(ours.pcm16.astype(np.int32) - ref.pcm16.astype(np.int32)).max() <= 2
    gap = ref.segments[0].pcm16.shape[0]
    assert not ours.pcm16[gap : gap + 4410].any()


def test_runner_refuses_beams_and_a_1x_export(ort_tts, voice_wav, tmp_path):
    from engine_ref.errors import ModelFilesError
    from export.manifest import EXPORT_CODE_VERSION, FORMAT, Manifest, write_manifest

    with pytest.raises(InputError, match="num_beams"):
        ort_tts.synthesize("Hi there.", voice_wav, v2_generation_params(num_beams=3, seed=1))
    write_manifest(tmp_path, Manifest(FORMAT, EXPORT_CODE_VERSION, {"family": "indextts"}, {}, {}))
    with pytest.raises(ModelFilesError, match="not IndexTTS-2"):
        OrtIndexTTS2(tmp_path)


# ------------------------------------------------------------------------------------------------ TensorRT


ENV = TrtEnvironment("NVIDIA H200", "10.8.0", "9.0")


class FakeBuilder:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, onnx_path, comp, opts, out_path):
        self.calls.append(comp.name)
        Path(out_path).write_bytes(f"plan:{comp.name}".encode())


def test_tensorrt_profiles_for_every_v2_graph(manifest, model):
    resolved = resolve_profiles(manifest, PlanOptions(max_batch=2))
    assert set(resolved) == set(KEYS)
    dec = {p.name: p for p in resolved["gpt_decode"][1]}
    assert set(dec) == {"step", "replay"} and dec["step"]["mel_tokens"].max == (2, 1)
    assert dec["replay"]["mel_tokens"].max[1] == model.gpt.cfg.mel_positions
    layers = model.gpt.cfg.layers
    assert dec["step"][f"past_key_values.{layers - 1}.value"] == dec["step"]["past_key_values.0.key"]
    est = {p.name: p for p in resolved["cfm_estimator"][1]}
    assert est["pair"]["x"].max == (2, 80, 8192) and est["batched"]["x"].max[0] == 2  # capped by max_batch
    (voc,) = resolved["vocoder"][1]
    assert voc["mel"].min == (1, 80, 1) and voc["mel"].max == (2, 80, 8192)


def test_build_plans_over_a_v2_export_with_an_injected_builder(export_dir, tmp_path):
    fake = FakeBuilder()
    plans = build_plans(export_dir, tmp_path / "plans", PlanOptions(), builder=fake, env=ENV)
    assert sorted(fake.calls) == sorted(KEYS) and set(plans) == set(KEYS)
    index = json.loads((tmp_path / "plans" / "plans.json").read_text())
    assert [p["name"] for p in index["components"]["cfm_estimator"]["profiles"]] == ["pair", "batched"]
    again = FakeBuilder()
    assert build_plans(export_dir, tmp_path / "plans", PlanOptions(), builder=again, env=ENV) == plans
    assert again.calls == []


def test_build_plans_check_cli_lists_v2_profiles(export_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert cli(["build-plans", "--export", str(export_dir), "--cache", "unused", "--check",
                "--component", "cfm_estimator", "--override", "cfm_estimator/frames=2:500:4096"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "cfm_estimator profile 0 'pair': batch=1:2:2, frames=2:500:4096" in out


# ------------------------------------------------------------------------------------------------ benchmark script


def test_bench_v2_report_rows_and_targets_on_synthetic_numbers(tmp_path):
    from perf.export_bench_v2 import BenchConfigV2, ResultsV2, render, stage_labels, targets, write_report

    cfg = BenchConfigV2(preset="tiny-v2", out=tmp_path, reps=3)
    machine = {"host": "h", "date": "d", "cpu": "c", "cores": 2, "threads": 2, "load_avg_at_start": "0",
               "python": "3", "torch": "t", "onnxruntime": "o", "commit": "x", "command": "cmd"}
    res = ResultsV2(machine=machine, floor={"gpt_bytes": 2e9, "gpt_floor_ms": 100.0, "bw_used_gbps": 20.0,
                                            "bw_ort_gemv_gbps": 20.0, "gemm_gflops": 50.0})
    for i, label in enumerate(stage_labels(cfg)):
        row = {"eager": 10.0 + i, "ort": 5.0, "eager_best": 9.0, "ort_best": 4.0, "rel": 1e-6,
               "eager_s_per_unit": 0.5, "ort_s_per_unit": 0.2}
        if label.startswith("cfm"):
            row["floor_ms"] = 1.0  # 5x the floor: not met
        res.stages[label] = row
    res.stages["gpt step b4"]["ort"] = 140.0  # 1.4x the bandwidth floor, and slower than eager
    verdicts = {t: ok for t, _, ok in targets(res, cfg)}
    assert verdicts["gpt step b1 (ORT fp32) <= 1.3x the bandwidth floor"]
    assert not verdicts["gpt step b4 (ORT fp32) <= 1.3x the bandwidth floor"]
    assert not verdicts["gpt step b4: ORT no slower than eager"] and verdicts["vocoder: ORT no slower than eager"]
    assert not verdicts["cfm step rows 2 (ORT) <= 2x the FLOP floor"]
    text = render(res, cfg)
    for label in stage_labels(cfg):
        assert f"| {label} |" in text, label
    assert "| cfm step rows 8 (ORT) <= 2x the FLOP floor | 5.00x floor | NOT met |" in text
    path = write_report(res, cfg)
    assert path.parent == tmp_path and path.with_suffix(".json").is_file() and path.read_text() == text
