"""IndexTTS2 reference audio: librosa.load-equal loading paths, the 22050->16000 sinc resample, the 22 kHz ref_mel."""

from __future__ import annotations

import inspect
import io
import warnings

import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import torch

from engine_ref.audio import resample
from engine_ref.errors import InputError
from engine_ref.indextts2.mel22k import (
    ReferenceMel22k,
    ref_mel_frames,
    slaney_mel_filterbank,
    upstream_fmax,
)
from engine_ref.indextts2.reference import (
    HEAD_CUT_SECONDS,
    load_emotion_audio,
    load_speaker_audio,
    speaker_16k_length,
)


def _voice(seconds: float, sr: int, channels: int, seed: int) -> np.ndarray:
    """Speech-like test signal [frames, channels]: a gliding harmonic tone, noise, and a silent gap."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    tone = sum(0.2 / k * np.sin(k * phase) for k in range(1, 6))
    x = tone[:, None] * (1 + 0.1 * np.arange(channels))[None, :] + 0.02 * rng.standard_normal((t.size, channels))
    x[int(0.4 * t.size):int(0.5 * t.size)] = 0.0  # exercises the mel floor and the magnitude epsilon
    return x.astype(np.float32)


FILES = [  # (rate, channels, subtype)
    (44100, 2, "PCM_16"),
    (22050, 1, "PCM_16"),
    (16000, 1, "FLOAT"),
    (48000, 3, "PCM_24"),
    (8000, 1, "PCM_16"),
    (44101, 2, "PCM_16"),  # an odd rate
]


@pytest.fixture(scope="module")
def wav_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    paths = {}
    for i, (sr, ch, sub) in enumerate(FILES):
        p = d / f"ref_{sr}_{ch}_{sub}.wav"
        sf.write(p, _voice(1.7, sr, ch, i), sr, subtype=sub)
        paths[(sr, ch, sub)] = p
    flac = d / "ref.flac"
    sf.write(flac, _voice(1.3, 44100, 2, 9), 44100, subtype="PCM_16")
    paths["flac"] = flac
    return paths


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(p, _voice(17.0, 44100, 2, 11), 44100, subtype="PCM_16")
    return p


# ---------------------------------------------------------------------------------------------- loading paths


@pytest.mark.parametrize("key", [*FILES, "flac"], ids=str)
def test_paths_equal_librosa_load(wav_files, key):
    path = wav_files[key]
    spk = load_speaker_audio(path)
    want22, sr22 = librosa.load(path)  # the speaker path: librosa's default 22050 Hz, soxr_hq
    want16, _ = librosa.load(path, sr=16000)  # the emotion path
    assert sr22 == 22050 == spk.audio_22k.sample_rate and spk.audio_16k.sample_rate == 16000
    np.testing.assert_array_equal(spk.audio_22k.samples.numpy(), want22)
    emo = load_emotion_audio(path)
    np.testing.assert_array_equal(emo.samples.numpy(), want16)
    assert emo.sample_rate == 16000 and spk.audio_22k.samples.dtype == torch.float32
    assert spk.audio_16k.samples.shape[-1] == speaker_16k_length(want22.shape[-1])
    # the 16 kHz speaker audio comes from the 22 kHz clip (not from the file), so the paths differ slightly
    torch.testing.assert_close(spk.audio_16k.samples, resample(spk.audio_22k.samples, 22050, 16000), rtol=0, atol=0)


def test_bytes_source_equals_path(wav_files):
    path = wav_files[(44100, 2, "PCM_16")]
    a = load_speaker_audio(path.read_bytes())
    b = load_speaker_audio(path)
    assert torch.equal(a.audio_22k.samples, b.audio_22k.samples)


def test_head_cut_keeps_the_first_15_seconds(long_file):
    whole22, _ = librosa.load(long_file)
    whole16, _ = librosa.load(long_file, sr=16000)
    spk = load_speaker_audio(long_file, cut_seconds=HEAD_CUT_SECONDS)
    assert spk.audio_22k.samples.shape[-1] == 330750 and spk.audio_22k.trimmed
    np.testing.assert_array_equal(spk.audio_22k.samples.numpy(), whole22[:330750])  # cut after resampling
    assert spk.audio_16k.samples.shape[-1] == 240000
    torch.testing.assert_close(spk.audio_16k.samples, resample(torch.from_numpy(whole22[:330750]), 22050, 16000),
                               rtol=0, atol=0)
    emo = load_emotion_audio(long_file, cut_seconds=HEAD_CUT_SECONDS)
    np.testing.assert_array_equal(emo.samples.numpy(), whole16[:240000])
    # the reference commit (default) keeps everything
    full = load_speaker_audio(long_file)
    assert full.audio_22k.samples.shape[-1] == whole22.shape[-1] > 330750 and not full.audio_22k.trimmed


def test_loading_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_speaker_audio(tmp_path / "nope.wav")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(22050, np.float32), 22050)
    with pytest.raises(InputError, match="silent"):
        load_emotion_audio(silent)
    short = tmp_path / "short.wav"
    sf.write(short, _voice(0.2, 22050, 1, 0), 22050)
    with pytest.raises(InputError, match="too short"):
        load_speaker_audio(short)
    with pytest.raises(InputError, match="could not be decoded|looks like"):
        load_speaker_audio(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")


# ------------------------------------------------------------------------------------ 22050 -> 16000 resampler


def test_resample_defaults_are_torchaudios():
    params = inspect.signature(resample).parameters
    assert params["lowpass_filter_width"].default == 6 and params["rolloff"].default == 0.99


def _sinc_hann_resample(x: np.ndarray, orig: int, new: int, width: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Band-limited interpolation written from its definition (float64): output n at time n/new seconds sums
    x[k] * (cutoff/orig) * sinc(cutoff * (k/orig - n/new)) * cos^2(pi t / (2 width)) over |t| <= width, with
    cutoff = rolloff * min(orig, new) Hz and zeros outside the signal."""
    cutoff = rolloff * min(orig, new)
    n_out = -(-len(x) * new // orig)
    k = np.arange(len(x))
    out = np.empty(n_out)
    for n in range(n_out):
        t = cutoff * (k / orig - n / new)
        keep = np.abs(t) <= width
        w = np.cos(np.pi * t[keep] / (2 * width)) ** 2
        out[n] = np.sum(x[keep] * np.sinc(t[keep]) * w) * cutoff / orig
    return out


def test_22k_to_16k_matches_the_sinc_formula():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(2205) * 0.3).astype(np.float32)  # 0.1 s, edges included
    got = resample(torch.from_numpy(x), 22050, 16000).numpy()
    want = _sinc_hann_resample(x.astype(np.float64), 22050, 16000)
    assert got.shape == want.shape == (1600,)
    # torchaudio (and so `resample`) computes the phase term in float32: ~1e-5 is its own rounding, while a
    # rolloff of 0.98/0.995 or a width of 5 would be off by 5e-3..2e-2 here.
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5)


# ---------------------------------------------------------------------------------------------------- ref_mel


@pytest.mark.parametrize("fmin, fmax", [(0.0, None), (0.0, 8000.0), (55.0, None)])
def test_filterbank_equals_librosa(fmin, fmax):
    got = slaney_mel_filterbank(22050, 1024, 80, fmin, fmax)
    want = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=fmin, fmax=fmax, htk=False, norm="slaney")
    assert got.dtype == torch.float32 and got.shape == (80, 513)
    np.testing.assert_array_equal(got.numpy(), want)


def _librosa_ref_mel(y: np.ndarray) -> np.ndarray:
    padded = np.pad(y, (384, 384), mode="reflect")
    spec = librosa.stft(padded, n_fft=1024, hop_length=256, win_length=1024, window="hann", center=False)
    magnitude = np.sqrt(spec.real.astype(np.float64) ** 2 + spec.imag.astype(np.float64) ** 2 + 1e-9)
    fb = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=None, htk=False, norm="slaney")
    return np.log(np.maximum(fb.astype(np.float64) @ magnitude, 1e-5))


@pytest.mark.parametrize("stft", ["torch", "conv"])
def test_ref_mel_matches_librosa(stft):
    y = _voice(1.5, 22050, 1, 5)[:, 0]
    got = ReferenceMel22k(stft=stft)(torch.from_numpy(y)[None])
    want = _librosa_ref_mel(y)
    assert got.shape == (1, 80, y.shape[0] // 256) == (1,) + want.shape
    assert float(got.min()) == pytest.approx(np.log(1e-5), abs=1e-6)  # the silent gap hits the floor
    np.testing.assert_allclose(got[0].numpy(), want, rtol=0, atol=1e-4)


def test_window_is_periodic_hann_and_buffers_are_not_state():
    m = ReferenceMel22k()
    np.testing.assert_allclose(m.window.numpy(), scipy.signal.get_window("hann", 1024, fftbins=True), atol=1e-6)
    assert m.state_dict() == {}


@pytest.mark.parametrize("n", [385, 511, 1024, 22050, 22051, 66150])
def test_frames_are_samples_over_hop(n):
    assert ref_mel_frames(n) == n // 256
    x = torch.from_numpy(np.random.default_rng(n).standard_normal((1, n)).astype(np.float32)) * 0.1
    assert ReferenceMel22k()(x).shape == (1, 80, n // 256)


def test_ref_mel_input_errors():
    with pytest.raises(InputError, match="needs more than 384"):
        ReferenceMel22k()(torch.zeros(1, 384))
    with pytest.raises(InputError, match=r"expected \[batch, samples\]"):
        ReferenceMel22k()(torch.zeros(1000))


def test_upstream_fmax_quirk():
    assert upstream_fmax({"fmax": "None"}) is None and upstream_fmax({}) is None
    assert upstream_fmax({"fmax": None}) == 8000.0 and upstream_fmax({"fmax": 11025}) == 8000.0


def test_conv_ref_mel_exports_to_onnx():
    import onnxruntime as ort

    m = ReferenceMel22k(stft="conv").eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 22050) * 0.1,), buf, opset_version=17, dynamo=False,
                          input_names=["wav"], output_names=["mel"],
                          dynamic_axes={"wav": {0: "batch", 1: "samples"}, "mel": {0: "batch", 2: "frames"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.from_numpy(_voice(0.9, 22050, 2, 7).T.copy())
    got = session.run(None, {"wav": x.numpy()})[0]
    assert got.shape == (2, 80, x.shape[1] // 256)
    np.testing.assert_allclose(got, ReferenceMel22k()(x).numpy(), rtol=0, atol=1e-4)


def test_the_two_16k_paths_differ_slightly(wav_files):
    """Speaker 16 kHz = sinc-Hann of the soxr 22 kHz clip; emotion 16 kHz = soxr straight from 44.1 kHz."""
    path = wav_files[(44100, 2, "PCM_16")]
    spk16 = load_speaker_audio(path).audio_16k.samples
    emo16 = load_emotion_audio(path).samples
    assert spk16.shape == emo16.shape
    diff = (spk16 - emo16).abs()
    assert 0 < float(diff.max()) < 0.05 and float(diff.mean()) < 5e-3
