"""ONNX export of the conditioning encoder and the vocoder (tiny preset), verified against engine_ref."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engine_ref.errors import ModelFilesError
from engine_ref.indextts.loader import LoadedModel, load_model
from engine_ref.mel import LogMelSpectrogram
from engine_ref.indextts.presets import demo_voice
from export import cond_encoder, vocoder
from export.common import FP32_TOLERANCE, ExportOptions, ParityError, session
from export.manifest import (
    EXPORT_CODE_VERSION, FORMAT, Component, Manifest, TensorInfo, read_manifest, sha256_file, write_manifest,
)

OPTS = ExportOptions(max_batch=4, seed=0)


@dataclasses.dataclass(frozen=True)
class Exported:
    model: LoadedModel
    out_dir: Path
    cond: Component
    voc: Component


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> Exported:
    torch.set_num_threads(1)
    model = load_model(tiny_model_dir)
    out = tmp_path_factory.mktemp("export")
    cond = cond_encoder.export_component(model, out, OPTS)
    voc = vocoder.export_component(model, out, OPTS)
    return Exported(model, out, cond, voc)


def _symbolic(comp: Component) -> set[str]:
    return {d for t in (*comp.inputs, *comp.outputs) for d in t.shape if isinstance(d, str)}


def _copy_export(ex: Exported, comp: Component, dest: Path) -> Path:
    for fname in (comp.file, *comp.external_data):
        shutil.copy(ex.out_dir / fname, dest / fname)
    return dest


def _perturbed(model: LoadedModel) -> LoadedModel:
    """Same architecture, slightly different weights: a graph exported from `model` must fail against it."""
    gpt, bigvgan = copy.deepcopy(model.gpt), copy.deepcopy(model.bigvgan)
    with torch.no_grad():
        gpt.perceiver_encoder.norm.gamma.mul_(1.01)
        bigvgan.speaker_encoder.fc.conv.bias.add_(0.05)
        bigvgan.conv_post.bias.add_(0.05)
    return dataclasses.replace(model, gpt=gpt, bigvgan=bigvgan)


# ---- the manifest entries ----

def test_cond_encoder_component_fields(exported):
    c, cfg = exported.cond, exported.model.config
    assert (c.name, c.file, c.precision, c.opset) == ("cond_encoder", "cond_encoder.onnx", "fp32", 17)
    assert c.sha256 == sha256_file(exported.out_dir / c.file) and c.external_data == ()
    assert c.inputs == (TensorInfo("mel", "float32", ("batch", 100, "frames")),
                        TensorInfo("mel_lengths", "int64", ("batch",)))
    assert c.outputs == (
        TensorInfo("conds", "float32", ("batch", cfg.gpt.condition_num_latent, cfg.gpt.model_dim)),
        TensorInfo("speaker_embedding", "float32", ("batch", cfg.bigvgan.speaker_embedding_dim, 1)),
    )
    assert set(c.dims) == _symbolic(c) == {"batch", "frames"}
    assert (c.dims["frames"].min, c.dims["frames"].max) == (5, exported.model.gpt.max_mel_frames) == (5, 10000)
    assert c.dims["batch"].max == OPTS.max_batch
    for r in c.dims.values():
        assert 1 <= r.min <= r.opt <= r.max
    assert c.extra["num_latents"] == 32 and c.extra["mel_bins"] == 100
    gap = c.extra["speaker_embedding_padded_vs_alone"]
    assert gap["max_rel"] > 0 and gap["max_rel_by_length"]  # measured, documented, not hidden


def test_vocoder_component_fields(exported):
    v, cfg = exported.voc, exported.model.config.bigvgan
    assert (v.name, v.file, v.precision, v.opset) == ("vocoder", "vocoder.onnx", "fp32", 17)
    assert v.sha256 == sha256_file(exported.out_dir / v.file)
    assert v.inputs == (TensorInfo("latents", "float32", ("batch", "latent_frames", cfg.gpt_dim)),
                        TensorInfo("speaker_embedding", "float32", ("batch", cfg.speaker_embedding_dim, 1)))
    assert v.outputs == (TensorInfo("waveform", "float32", ("batch", "samples")),)
    assert set(v.dims) == _symbolic(v) == {"batch", "latent_frames", "samples"}
    spl = v.extra["samples_per_latent"]
    assert spl == exported.model.bigvgan.samples_per_latent == 1024 and v.extra["sample_rate"] == 24000
    lf, s = v.dims["latent_frames"], v.dims["samples"]
    assert (lf.min, lf.max) == (1, 2048)
    assert (s.min, s.opt, s.max) == (lf.min * spl, lf.opt * spl, lf.max * spl)


def test_parity_recorded_and_manifest_round_trip(exported):
    for comp in (exported.cond, exported.voc):
        assert comp.parity is not None and comp.parity.tolerance == FP32_TOLERANCE
        assert 0 <= comp.parity.max_rel <= FP32_TOLERANCE and len(comp.parity.cases) >= 4
    assert exported.cond.parity.extra["conds_padded_vs_alone"]["max_rel"] <= FP32_TOLERANCE
    manifest = Manifest(FORMAT, EXPORT_CODE_VERSION, {"version": "1.5"}, {},
                        {"cond_encoder": exported.cond, "vocoder": exported.voc})
    write_manifest(exported.out_dir, manifest)
    back = read_manifest(exported.out_dir, deep=True)
    assert back.components == manifest.components


# ---- parity on inputs the export never saw ----

def test_cond_encoder_parity_on_new_shapes(exported):
    cases = [cond_encoder.CondCase((6,)), cond_encoder.CondCase((77, 5, 31)), cond_encoder.CondCase((40, 40))]
    parity = cond_encoder.verify_component(exported.model, exported.out_dir, exported.cond,
                                           dataclasses.replace(OPTS, seed=11), cases=cases)
    assert parity.max_rel <= FP32_TOLERANCE
    assert parity.extra["conds_padded_vs_alone"]["max_rel"] <= FP32_TOLERANCE
    assert set(parity.extra["speaker_embedding_padded_vs_alone"]["max_rel_by_length"]) == {"5", "31"}


def test_cond_encoder_on_a_real_log_mel(exported):
    mel = LogMelSpectrogram()(torch.from_numpy(demo_voice(seconds=1.5)).float()).unsqueeze(0)  # [1, 100, T]
    lengths = torch.tensor([mel.shape[-1]])
    conds, spk = session(exported.out_dir / exported.cond.file).run(
        None, {"mel": mel.numpy(), "mel_lengths": lengths.numpy()})
    with torch.no_grad():
        ref_conds = exported.model.gpt.conditioning(mel, lengths)
        ref_spk = exported.model.bigvgan.speaker_embedding(mel.transpose(1, 2))  # the original call: no lengths
    np.testing.assert_allclose(conds, ref_conds.numpy(), atol=FP32_TOLERANCE * float(ref_conds.abs().max()))
    np.testing.assert_allclose(spk, ref_spk.numpy(), atol=FP32_TOLERANCE * float(ref_spk.abs().max()))


def test_vocoder_parity_on_new_shapes(exported):
    cases = [vocoder.VocoderCase(3, 2), vocoder.VocoderCase(1, 41), vocoder.VocoderCase(4, 5)]
    parity = vocoder.verify_component(exported.model, exported.out_dir, exported.voc,
                                      dataclasses.replace(OPTS, seed=11), cases=cases)
    assert parity.max_rel <= FP32_TOLERANCE and parity.cases == ("b3xt2", "b1xt41", "b4xt5")


def test_vocoder_output_length_and_range(exported):
    sess = session(exported.out_dir / exported.voc.file)
    rng = np.random.default_rng(5)
    (wav,) = sess.run(None, {"latents": rng.standard_normal((2, 7, 64)).astype(np.float32),
                             "speaker_embedding": rng.standard_normal((2, 64, 1)).astype(np.float32)})
    assert wav.shape == (2, 7 * 1024) and wav.dtype == np.float32
    assert np.all(np.abs(wav) < 1.0) and float(np.abs(wav).max()) > 1e-4


def test_session_without_spinning_sets_the_option_and_computes_the_same(exported):
    """Serving turns ORT's busy-waiting off (processes share the cores); the numbers must not change."""
    rng = np.random.default_rng(6)
    feeds = {"latents": rng.standard_normal((1, 5, 64)).astype(np.float32),
             "speaker_embedding": rng.standard_normal((1, 64, 1)).astype(np.float32)}
    spin = session(exported.out_dir / exported.voc.file, threads=2)
    calm = session(exported.out_dir / exported.voc.file, threads=2, spinning=False)
    assert calm.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="allow_spinning"):  # not set: ORT's default, which spins
        spin.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    np.testing.assert_allclose(calm.run(None, feeds)[0], spin.run(None, feeds)[0], rtol=0, atol=1e-6)


# ---- failures are clear ----

@pytest.mark.parametrize("which", ["cond", "voc"])
def test_wrong_graph_raises_parity_error(exported, which):
    wrong = _perturbed(exported.model)
    if which == "cond":
        with pytest.raises(ParityError, match=r"cond_encoder\.(conds|speaker_embedding).*tolerance"):
            cond_encoder.verify_component(wrong, exported.out_dir, exported.cond, OPTS,
                                          cases=[cond_encoder.CondCase((20, 9))])
    else:
        with pytest.raises(ParityError, match=r"vocoder\.waveform.*tolerance"):
            vocoder.verify_component(wrong, exported.out_dir, exported.voc, OPTS, cases=[vocoder.VocoderCase(1, 4)])


def test_corrupted_graph_fails_with_sha256_error(exported, tmp_path):
    _copy_export(exported, exported.voc, tmp_path)
    data = bytearray((tmp_path / "vocoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "vocoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelFilesError, match=r"vocoder\.onnx.*sha256.*Fix: re-run `triton-tts export`"):
        vocoder.verify_component(exported.model, tmp_path, exported.voc, OPTS)


def test_unloadable_graph_fails_with_clear_error(exported, tmp_path):
    _copy_export(exported, exported.cond, tmp_path)
    path = tmp_path / "cond_encoder.onnx"
    path.write_bytes(path.read_bytes()[:5000])  # truncated, and the manifest agrees with the truncated bytes
    comp = dataclasses.replace(exported.cond, sha256=sha256_file(path))
    with pytest.raises(ModelFilesError, match=r"ONNX Runtime cannot load cond_encoder\.onnx") as info:
        cond_encoder.verify_component(exported.model, tmp_path, comp, OPTS)
    assert "\n" not in str(info.value)


def test_missing_graph_is_named(exported, tmp_path):
    with pytest.raises(ModelFilesError, match=r"artifact vocoder\.onnx .*missing"):
        vocoder.verify_component(exported.model, tmp_path, exported.voc, OPTS)


def test_invented_symbolic_dims_are_rejected():
    bad = (TensorInfo("conds", "float32", ("batch", "Mulconds_dim_1", 64)),)
    with pytest.raises(RuntimeError, match="Mulconds_dim_1"):
        cond_encoder.check_dims_named("cond_encoder", bad, {"batch": None})


def test_pinned_output_shapes_are_in_the_graph(exported):
    graph = onnx.load(str(exported.out_dir / exported.cond.file), load_external_data=False).graph
    onnx.checker.check_model(onnx.load(str(exported.out_dir / exported.cond.file)))
    conds = next(o for o in graph.output if o.name == "conds")
    dims = [d.dim_param or d.dim_value for d in conds.type.tensor_type.shape.dim]
    assert dims == ["batch", 32, 64]
