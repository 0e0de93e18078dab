"""IndexTTS2 style path: kaldi fbank (vs kaldi-native-fbank) and CAMPPlus (layout, strict load, math, batching).

References independent of the code under test: kaldi-native-fbank (a C++ Kaldi re-implementation) and a float64
transcription of Kaldi's mel-bank formula for the fbank; for CAMPPlus, the published file size, torch's own
nn.BatchNorm1d / torch.std, and a CAM dense layer written out with raw tensors and an explicit segment loop.
"""

from __future__ import annotations

import math

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_ref.errors import CheckpointError, InputError, ModelFilesError
from engine_ref.indextts2.campplus import (CAMPPlus, campplus_layout, campplus_style, load_campplus,
                                           load_campplus_state)
from engine_ref.indextts2.fbank import KaldiFbank, fbank_num_frames, kaldi_fbank, kaldi_mel_banks
from engine_ref.layout import materialize


def knf_fbank(wave: np.ndarray, **opts) -> np.ndarray:
    o = knf.FbankOptions()
    o.frame_opts.dither = 0.0
    o.frame_opts.snip_edges = True
    o.mel_opts.num_bins = 80
    for key, value in opts.items():
        setattr(o.frame_opts if key in ("window_type", "preemph_coeff") else o.mel_opts, key, value)
    fb = knf.OnlineFbank(o)
    fb.accept_waveform(16000, wave.tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])


def noise(n: int, seed: int, amp: float = 1.0) -> np.ndarray:
    return (amp * np.random.default_rng(seed).uniform(-1, 1, n)).astype(np.float32)


def tone(n: int, freq: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / 16000)).astype(np.float32)


# ---- fbank ----

@pytest.mark.parametrize("dft", ["fft", "matmul"])
@pytest.mark.parametrize("name,wave,atol", [("noise", noise(8000, 0), 5e-4), ("quiet", noise(8000, 1, 1e-3), 5e-4),
                                            ("tone", tone(8000), 1.5e-3)])
def test_fbank_matches_kaldi_native_fbank(dft, name, wave, atol):
    ref = knf_fbank(wave)
    got = kaldi_fbank(torch.from_numpy(wave)[None], num_mel_bins=80, dither=0.0, sample_rate=16000, dft=dft).numpy()
    assert got.shape == ref.shape == (fbank_num_frames(len(wave)), 80)
    diff = np.abs(got - ref)
    assert diff.max() < atol, (name, diff.max())
    assert np.median(diff) < 2e-5
    if name == "tone":  # the tone's band dominates, far bands sit many nats below it
        assert ref.max() - ref.min() > 10


def test_fbank_other_window_and_band_edges_match_knf():
    wave = noise(4000, 2)
    ref = knf_fbank(wave, window_type="hamming", low_freq=60.0, high_freq=-400.0)
    got = kaldi_fbank(torch.from_numpy(wave), window_type="hamming", low_freq=60.0, high_freq=-400.0).numpy()
    assert np.abs(got - ref).max() < 5e-4


def test_mel_banks_match_float64_kaldi_formula():
    banks = kaldi_mel_banks(80, 512, 16000.0, 20.0, 0.0)
    assert banks.shape == (80, 257) and banks.dtype == torch.float32
    assert torch.all(banks[:, 256] == 0)
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 81
    fft_mel = mel(np.arange(256) * 16000.0 / 512)
    ref = np.zeros((80, 256))
    for b in range(80):
        left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        up = (fft_mel - left) / (center - left)
        down = (right - fft_mel) / (right - center)
        ref[b] = np.maximum(0.0, np.minimum(up, down))
    assert np.abs(banks[:, :256].numpy() - ref).max() < 1e-4


def test_fbank_batch_rows_equal_single_rows_and_checks():
    a, b = torch.from_numpy(noise(4000, 3)), torch.from_numpy(tone(2600))
    batch = torch.stack([a, F.pad(b, (0, 1400))])
    module = KaldiFbank()
    out = module(batch)
    assert out.shape == (2, fbank_num_frames(4000), 80)
    n_b = int(module.num_frames(torch.tensor(2600)))
    torch.testing.assert_close(out[0], kaldi_fbank(a[None]))
    torch.testing.assert_close(out[1, :n_b], kaldi_fbank(b[None]))
    with pytest.raises(InputError, match="shorter than one"):
        kaldi_fbank(torch.zeros(1, 399))
    with pytest.raises(ValueError, match="dither"):
        kaldi_fbank(a[None], dither=1.0)
    with pytest.raises(InputError, match="channel"):
        kaldi_fbank(a[None], channel=1)


# ---- CAMPPlus ----

@pytest.fixture(scope="module")
def campplus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("campplus") / "campplus_cn_common.bin"
    torch.save(materialize(campplus_layout(), seed=4), path)
    return path


@pytest.fixture(scope="module")
def model(campplus_file):
    return load_campplus(campplus_file)


def test_layout_matches_published_size_and_module():
    layout = campplus_layout()
    numel = sum(math.prod(s.shape) for s in layout.values())
    params = sum(math.prod(s.shape) for k, s in layout.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert 6.8e6 < params < 7.0e6  # "≈7 M"
    overhead = 28_036_335 - 4 * numel  # campplus_cn_common.bin: fp32 payload + zip/pickle entries
    assert 0 < overhead < 400 * len(layout)
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in CAMPPlus().state_dict().items()}
    assert own == {k: tuple(s.shape) for k, s in layout.items()}
    assert layout["xvector.block2.tdnnd24.linear1.weight"].shape == (128, 256 + 23 * 32, 1)
    assert layout["xvector.dense.linear.weight"].shape == (192, 1024, 1)
    assert "xvector.dense.nonlinear.batchnorm.weight" not in layout  # affine=False


def test_strict_load_and_named_errors(campplus_file, tmp_path):
    state = torch.load(campplus_file, weights_only=True)
    model = CAMPPlus()
    load_campplus_state(model, state)
    torch.testing.assert_close(model.state_dict()["xvector.block3.tdnnd16.cam_layer.linear2.bias"],
                               state["xvector.block3.tdnnd16.cam_layer.linear2.bias"])
    bad = dict(state)
    bad.pop("head.layer1.0.shortcut.1.running_var")
    with pytest.raises(CheckpointError, match=r"missing 1: head\.layer1\.0\.shortcut\.1\.running_var"):
        load_campplus_state(CAMPPlus(), bad)
    bad = dict(state, **{"xvector.dense.nonlinear.batchnorm.weight": torch.ones(192)})
    with pytest.raises(CheckpointError, match=r"unexpected 1: xvector\.dense\.nonlinear\.batchnorm\.weight"):
        load_campplus_state(CAMPPlus(), bad)
    bad = dict(state, **{"xvector.tdnn.linear.weight": torch.zeros(128, 320, 3)})
    with pytest.raises(CheckpointError, match=r"xvector\.tdnn\.linear\.weight' has shape \[128, 320, 3\]"):
        load_campplus_state(CAMPPlus(), bad)
    with pytest.raises(ModelFilesError):
        load_campplus(tmp_path / "absent.bin")


def test_style_shape_and_eval_mode_batchnorm(model):
    fbank = torch.randn(90, 80, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        style = campplus_style(model, fbank)
        model.train()  # BN must keep using running statistics
        style_train = campplus_style(model, fbank)
        model.eval()
    assert style.shape == (1, 192) and torch.isfinite(style).all()
    assert float(style.std()) > 0.05
    torch.testing.assert_close(style, style_train, atol=0, rtol=0)
    # the frozen BN equals torch's BatchNorm in eval mode with the same statistics
    bn = model.xvector.block1.tdnnd3.nonlinear1.batchnorm
    ref = torch.nn.BatchNorm1d(bn.running_mean.numel()).eval()
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(2, bn.running_mean.numel(), 7)
    torch.testing.assert_close(bn(x), ref(x))


def test_padded_batch_with_lengths_equals_unpadded_runs(model):
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(63, 80, generator=gen), torch.randn(110, 80, generator=gen)  # 110 > one 100-frame segment
    batch = torch.stack([F.pad(a, (0, 0, 0, 47), value=3.0), b])
    with torch.no_grad():
        padded = campplus_style(model, batch, torch.tensor([63, 110]))
        alone = torch.cat([campplus_style(model, a), campplus_style(model, b)])
        again = torch.cat([campplus_style(model, a), campplus_style(model, b)])
        unmasked = campplus_style(model, batch)
    assert torch.equal(alone, again)  # deterministic
    torch.testing.assert_close(padded, alone, atol=2e-5, rtol=1e-4)
    assert (unmasked[0] - alone[0]).abs().max() > 1e-3  # without lengths, padding changes the embedding
    torch.testing.assert_close(unmasked[1], alone[1], atol=2e-5, rtol=1e-4)  # the full row is unaffected


def bn_ref(x, sd, prefix):
    w, b = sd.get(f"{prefix}.weight"), sd.get(f"{prefix}.bias")
    y = (x - sd[f"{prefix}.running_mean"][:, None]) / torch.sqrt(sd[f"{prefix}.running_var"][:, None] + 1e-5)
    return y * w[:, None] + b[:, None] if w is not None else y


def test_cam_dense_layer_against_hand_written_math(model):
    sd = model.state_dict()
    p = "xvector.block2.tdnnd5"  # dilation 2
    width = 256 + 4 * 32
    x = torch.randn(1, width, 130, generator=torch.Generator().manual_seed(7))
    h = torch.relu(bn_ref(x[0], sd, f"{p}.nonlinear1.batchnorm"))
    h = sd[f"{p}.linear1.weight"][..., 0] @ h
    h = torch.relu(bn_ref(h, sd, f"{p}.nonlinear2.batchnorm"))  # [128, T]
    local = F.conv1d(h[None], sd[f"{p}.cam_layer.linear_local.weight"], padding=2, dilation=2)[0]
    seg = torch.empty_like(h)
    for start in range(0, h.shape[1], 100):  # 100-frame segments, the last one partial
        seg[:, start:start + 100] = h[:, start:start + 100].mean(dim=1, keepdim=True)
    context = h.mean(dim=1, keepdim=True) + seg
    hidden = torch.relu(sd[f"{p}.cam_layer.linear1.weight"][..., 0] @ context + sd[f"{p}.cam_layer.linear1.bias"][:, None])
    gate = torch.sigmoid(sd[f"{p}.cam_layer.linear2.weight"][..., 0] @ hidden + sd[f"{p}.cam_layer.linear2.bias"][:, None])
    expected = local * gate
    with torch.no_grad():
        got = model.xvector.block2.tdnnd5(x)[0]
        masked = model.xvector.block2.tdnnd5(x, torch.ones(1, 1, 130))[0]  # masked formula, all frames valid
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=1e-5)


def test_stats_pooling_and_dense_head_against_torch(model):
    sd = model.state_dict()
    x = torch.randn(2, 512, 40, generator=torch.Generator().manual_seed(8))
    pooled = torch.cat([x.mean(-1), torch.std(x, dim=-1)], dim=-1)
    expected = bn_ref((sd["xvector.dense.linear.weight"][..., 0] @ pooled.T), sd, "xvector.dense.nonlinear.batchnorm").T
    from engine_ref.indextts2.campplus import _stats

    with torch.no_grad():
        got = model.xvector.dense(_stats(x, None))
        got_masked = model.xvector.dense(_stats(x, torch.ones(2, 1, 40)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_masked, expected, atol=1e-5, rtol=1e-5)


def test_fbank_to_style_end_to_end(model):
    wave = torch.from_numpy(tone(16000, 300.0) + noise(16000, 9, 0.05))
    fbank = kaldi_fbank(wave[None], num_mel_bins=80, dither=0.0, sample_rate=16000)
    with torch.no_grad():
        style = campplus_style(model, fbank)
        manual = model((fbank - fbank.mean(dim=0, keepdim=True))[None])
    torch.testing.assert_close(style, manual, atol=0, rtol=0)
    with pytest.raises(InputError, match="80"):
        model(torch.zeros(1, 20, 40))


def test_fbank_matmul_and_campplus_export_to_onnx(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from export.common import export_onnx

    class Style(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, fbank, lengths):
            return campplus_style(self.m, fbank, lengths)

    fb = KaldiFbank(dft="matmul")
    export_onnx(fb, (torch.randn(2, 3000),), tmp_path / "fbank.onnx", ["wave"], ["fbank"],
                {"wave": {0: "batch", 1: "samples"}, "fbank": {0: "batch", 1: "frames"}})
    export_onnx(Style(model), (torch.randn(2, 50, 80), torch.tensor([50, 31])), tmp_path / "campplus.onnx",
                ["fbank", "lengths"], ["style"], {"fbank": {0: "batch", 1: "frames"}, "lengths": {0: "batch"},
                                                  "style": {0: "batch"}})
    wave = torch.from_numpy(noise(5555, 10, 0.3))[None]
    got = ort.InferenceSession(str(tmp_path / "fbank.onnx")).run(None, {"wave": wave.numpy()})[0]
    assert got.shape == (1, fbank_num_frames(5555), 80)
    assert abs(got - kaldi_fbank(wave).numpy()).max() < 5e-4
    feats = torch.randn(2, 130, 80, generator=torch.Generator().manual_seed(11))
    lengths = torch.tensor([130, 88])
    style = ort.InferenceSession(str(tmp_path / "campplus.onnx")).run(None, {"fbank": feats.numpy(),
                                                                             "lengths": lengths.numpy()})[0]
    with torch.no_grad():
        ref = campplus_style(model, feats, lengths)
    assert abs(style - ref.numpy()).max() < 1e-4
