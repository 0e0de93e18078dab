"""Reference audio I/O, the torchaudio-equivalent resampler and the conditioning log-mel.

References are independent of the code under test: librosa for the mel, a numpy transcription of
torchaudio's published sinc-resampler formula, scipy's resample_poly (a different filter: loose checks
only), published SHA-256 test vectors, and soundfile for decoding what we write.
"""

from __future__ import annotations

import io
import logging
import math

import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import torch

import engine_ref.audio as audio_mod
from engine_ref.audio import (AudioClip, audio_fingerprint, load_audio, resample, to_pcm16, wav_bytes,
                              write_wav)
from engine_ref.errors import InputError
from engine_ref.mel import LogMelSpectrogram, htk_mel_filterbank, mel_lengths

SR = 24000
LIBROSA_MEL = dict(sr=SR, n_fft=1024, hop_length=256, win_length=1024, window="hann", n_mels=100, fmin=0,
                   fmax=None, power=1.0, htk=True, norm=None, center=True, pad_mode="reflect")


def tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(data: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ mel


def test_filterbank_matches_librosa_htk_unnormalised():
    fb = htk_mel_filterbank()
    ref = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=100, fmin=0.0, fmax=None, htk=True, norm=None)
    assert fb.shape == (100, 513) and fb.dtype == torch.float32
    # torchaudio (and we) build the bank in float32, librosa in float64: they agree to ~1e-5 absolute.
    np.testing.assert_allclose(fb.numpy(), ref, rtol=0, atol=5e-5)
    assert float(fb.max()) <= 1.0 and float(fb.min()) == 0.0
    assert bool((fb.sum(dim=1) > 0).all())  # no empty band
    assert float(fb[:, -1].abs().max()) < 1e-5  # last band ends at Nyquist (f_max None = sr/2), float32 edge


def test_filterbank_rejects_bad_band_edges():
    with pytest.raises(ValueError):
        htk_mel_filterbank(f_min=0.0, f_max=13000.0)


@pytest.mark.parametrize("stft", ["torch", "conv"])
@pytest.mark.parametrize("kind", ["noise", "tones"])
def test_logmel_matches_librosa(stft, kind):
    rng = np.random.default_rng(7)
    if kind == "noise":
        y = (0.1 * rng.standard_normal(SR * 2)).astype(np.float32)
    else:
        y = tone(440.0, SR, 2.0) + tone(3000.0, SR, 2.0, amp=0.2)
    ref = librosa.feature.melspectrogram(y=y, **LIBROSA_MEL).astype(np.float64)
    out = LogMelSpectrogram(stft=stft)(torch.from_numpy(y)[None])
    assert out.shape == (1, 100, len(y) // 256 + 1) and out.dtype == torch.float32
    mel = np.exp(out[0].double().numpy())
    # Relative 1e-4 on the mel; bins at the float32 FFT noise floor (~1e-7 of the peak) get an absolute floor.
    np.testing.assert_allclose(mel, ref, rtol=1e-4, atol=1e-5 * ref.max())
    loud = ref > 1e-3 * ref.max()
    log_ref = np.log(np.maximum(ref, 1e-7))
    assert np.abs(out[0].numpy() - log_ref)[loud].max() < 1e-4


def test_logmel_clamps_silence_to_log_1e_minus_7():
    out = LogMelSpectrogram()(torch.zeros(1, 4096))
    torch.testing.assert_close(out, torch.full_like(out, math.log(1e-7)))


def test_logmel_batch_shapes_and_consistency():
    m = LogMelSpectrogram()
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((3, 5000)).astype(np.float32)) * 0.2
    out = m(x)
    assert out.shape == (3, 100, mel_lengths(5000))
    torch.testing.assert_close(out[1:2], m(x[1:2]), rtol=0, atol=1e-5)
    assert m(x[0]).shape == (100, mel_lengths(5000))  # [T] -> [n_mels, frames]
    assert m(x.reshape(3, 1, 5000)).shape == (3, 1, 100, mel_lengths(5000))


def test_logmel_conv_and_torch_stft_agree():
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 9000)).astype(np.float32)) * 0.3
    torch.testing.assert_close(LogMelSpectrogram(stft="conv")(x), LogMelSpectrogram(stft="torch")(x),
                               rtol=0, atol=1e-4)


def test_logmel_buffers_are_derived_not_checkpoint_state():
    m = LogMelSpectrogram(stft="conv")
    assert m.state_dict() == {}
    torch.testing.assert_close(m.window, torch.hann_window(1024, periodic=True))
    assert m.window[0] == 0 and m.window[512] == 1  # periodic Hann: peak at n/2, no trailing zero
    assert m.double().mel_fb.dtype == torch.float64  # moves with the module


def test_logmel_conv_variant_exports_to_onnx_with_dynamic_length():
    import warnings

    import onnxruntime as ort

    m = LogMelSpectrogram(stft="conv").eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 24000),), buf, opset_version=17, dynamo=False,
                          input_names=["wav"], output_names=["mel"],
                          dynamic_axes={"wav": {0: "batch", 1: "samples"}, "mel": {0: "batch", 2: "frames"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 37001)).astype(np.float32)) * 0.2
    got = session.run(None, {"wav": x.numpy()})[0]
    assert got.shape == (2, 100, mel_lengths(37001))
    np.testing.assert_allclose(got, LogMelSpectrogram()(x).numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [513, 1024, 12000, 24001, 65536])
def test_mel_lengths_match_frames(n):
    assert mel_lengths(n) == n // 256 + 1
    assert LogMelSpectrogram()(torch.randn(1, n)).shape[-1] == mel_lengths(n)
    assert int(mel_lengths(torch.tensor(n))) == n // 256 + 1


# ------------------------------------------------------------------------------------------------ resampler


def torchaudio_formula_resample(x: np.ndarray, orig_sr: int, new_sr: int, lpw: int = 6,
                                rolloff: float = 0.99) -> np.ndarray:
    """torchaudio's documented sinc_interp_hann resampler, transcribed to float64 numpy (dense kernel)."""
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    base = min(orig, new) * rolloff
    width = math.ceil(lpw * orig / base)
    # torchaudio divides an int64 arange by new_freq, which yields float32; only the offsets are float64.
    phase = (-np.arange(new) / new).astype(np.float32).astype(np.float64)
    t = phase[:, None] + (np.arange(-width, width + orig) / orig)[None, :]
    t = np.clip(t * base, -lpw, lpw)
    win = np.cos(t * np.pi / lpw / 2) ** 2
    t = t * np.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel = sinc * win * base / orig  # [new, 2*width + orig]
    xp = np.pad(x.astype(np.float64), (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(xp, kernel.shape[1])[::orig]
    out = (frames @ kernel.T).reshape(-1)  # block b, phase j -> output b*new + j
    return out[: math.ceil(new * len(x) / orig)]


RATE_PAIRS = [(44100, SR), (16000, SR), (48000, SR), (22050, SR), (8000, SR), (11025, SR), (SR, 16000),
              (1009, 240)]


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
@pytest.mark.parametrize("orig_sr,new_sr", RATE_PAIRS)
def test_resample_matches_torchaudio_formula(orig_sr, new_sr, dense, monkeypatch):
    if not dense:
        monkeypatch.setattr(audio_mod, "_DENSE_KERNEL_ELEMS", 0)
        monkeypatch.setattr(audio_mod, "_RESAMPLE_CHUNK_ELEMS", 1 << 17)  # exercise several chunks
    x = (0.5 * np.random.default_rng(orig_sr).standard_normal(2 * orig_sr + 17)).astype(np.float32)
    ours = resample(torch.from_numpy(x), orig_sr, new_sr).numpy()
    ref = torchaudio_formula_resample(x, orig_sr, new_sr)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 146, 147, 148, 44100, 44101, 100003])
@pytest.mark.parametrize("orig_sr", [44100, 16000, 48000, 44101])
def test_resample_length_is_ceil(n, orig_sr):
    out = resample(torch.zeros(n), orig_sr, SR)
    assert out.shape == (math.ceil(n * SR / orig_sr),)


@pytest.mark.parametrize("orig_sr", [44100, 48000, 16000, 8000, 44101])
def test_resample_preserves_tone_and_rejects_above_nyquist(orig_sr):
    y = resample(torch.from_numpy(tone(1000.0, orig_sr, 1.0)), orig_sr, SR).numpy()
    expected = tone(1000.0, SR, len(y) / SR)
    inner = slice(300, -300)  # the zero-padded edges are not band-limited
    assert np.abs(y - expected)[inner].max() < 2e-3
    if orig_sr > 2 * 15000:
        hi = resample(torch.from_numpy(tone(15000.0, orig_sr, 1.0)), orig_sr, SR).numpy()
        assert np.sqrt(np.mean(hi[inner] ** 2)) < 0.01  # 15 kHz cannot exist at 24 kHz: filtered out


def test_resample_loosely_agrees_with_scipy_resample_poly():
    rng = np.random.default_rng(5)
    x = scipy.signal.lfilter(scipy.signal.firwin(255, 0.4), 1, rng.standard_normal(44100)).astype(np.float32)
    ours = resample(torch.from_numpy(x), 44100, SR).numpy()
    ref = scipy.signal.resample_poly(x, 80, 147)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref)[300:-300].max() < 1e-2 * np.abs(ref).max()


def test_resample_identity_batch_and_errors():
    x = torch.randn(2, 3, 1000)
    assert resample(x, SR, SR) is x
    y = resample(x, 16000, SR)
    assert y.shape == (2, 3, 1500)
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 16000, SR), rtol=0, atol=1e-6)
    with pytest.raises(TypeError):
        resample(torch.zeros(10, dtype=torch.int16), 16000, SR)
    with pytest.raises(ValueError):
        resample(x, 0, SR)


# ---------------------------------------------------------------------------------------------- load_audio


@pytest.mark.parametrize("fmt,subtype,lossless", [("WAV", "PCM_16", True), ("WAV", "PCM_24", True),
                                                   ("WAV", "FLOAT", True), ("FLAC", "PCM_16", True),
                                                   ("MP3", None, False), ("OGG", "VORBIS", False)])
@pytest.mark.parametrize("rate,channels", [(16000, 1), (22050, 2), (44100, 1), (48000, 2), (SR, 1)])
def test_load_audio_formats_rates_channels(tmp_path, fmt, subtype, lossless, rate, channels):
    left = tone(440.0, rate, 1.2, amp=0.4)
    data = np.stack([left, 0.5 * left], axis=1) if channels == 2 else left
    path = tmp_path / f"ref.{fmt.lower()}"
    sf.write(path, data, rate, format=fmt, subtype=subtype)
    clip = load_audio(path)
    assert isinstance(clip, AudioClip)
    assert clip.sample_rate == SR and clip.original_sample_rate == rate and not clip.trimmed
    assert clip.samples.dtype == torch.float32 and clip.samples.ndim == 1
    assert clip.seconds == pytest.approx(clip.samples.shape[0] / SR)
    decoded = sf.read(path, dtype="float32", always_2d=True)[0]
    assert clip.samples.shape[0] == math.ceil(decoded.shape[0] * SR / rate)
    if lossless:
        mono = decoded.mean(axis=1)  # channel mean, not the first channel
        expected = torchaudio_formula_resample(mono, rate, SR) if rate != SR else mono
        np.testing.assert_allclose(clip.samples.numpy(), expected, rtol=0, atol=1e-5)
        assert clip.samples.abs().max() == pytest.approx(0.4 * (0.75 if channels == 2 else 1.0), rel=2e-3)
    else:  # lossy: same tone, same level
        spec = np.abs(np.fft.rfft(clip.samples.numpy()))
        assert abs(np.argmax(spec) * SR / len(clip.samples) - 440.0) < 2.0
        assert float(clip.samples.abs().max()) == pytest.approx(0.4 * (0.75 if channels == 2 else 1.0), rel=0.1)
    assert torch.equal(load_audio(path.read_bytes()).samples, clip.samples)  # bytes == path


def test_load_audio_accepts_bytearray_memoryview_and_str(tmp_path):
    raw = encode(tone(300.0, 16000, 1.0), 16000)
    (tmp_path / "a.wav").write_bytes(raw)
    ref = load_audio(raw).samples
    for src in (bytearray(raw), memoryview(raw), str(tmp_path / "a.wav")):
        assert torch.equal(load_audio(src).samples, ref)


def test_load_audio_does_not_clip_float_overs():
    clip = load_audio(encode(tone(200.0, SR, 1.0, amp=1.5), SR, subtype="FLOAT"))
    assert float(clip.samples.abs().max()) == pytest.approx(1.5, rel=1e-4)


def test_load_audio_target_rate_parameter():
    clip = load_audio(encode(tone(300.0, 44100, 1.0), 44100), target_sr=16000)
    assert clip.sample_rate == 16000 and clip.samples.shape == (16000,)


def test_trimming_warns_and_cuts(caplog):
    raw = encode(tone(250.0, 44100, 3.0), 44100)
    with caplog.at_level(logging.WARNING, logger="engine_ref.audio"):
        clip = load_audio(raw, max_seconds=1.5)
    assert clip.trimmed
    assert clip.samples.shape[0] == math.ceil(int(1.5 * 44100) * SR / 44100)
    warned = [r for r in caplog.records if r.name == "engine_ref.audio" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "3.0 s" in warned[0].getMessage() and "1.5" in warned[0].getMessage()
    # The kept part is the beginning of the full clip.
    full = load_audio(raw).samples
    np.testing.assert_allclose(clip.samples[:30000].numpy(), full[:30000].numpy(), atol=1e-5)


def test_no_trim_when_exactly_max_seconds(caplog):
    with caplog.at_level(logging.WARNING, logger="engine_ref.audio"):
        clip = load_audio(encode(tone(250.0, SR, 2.0), SR), max_seconds=2.0)
    assert not clip.trimmed and clip.samples.shape == (2 * SR,)
    assert not [r for r in caplog.records if r.name == "engine_ref.audio"]


class _LyingDecoder:
    """A decoder whose header claims 10**12 frames but which holds 100 000."""

    channels, frames = 1, 10**12

    def __init__(self):
        self.left, self.requests = 100_000, []

    def read(self, frames, dtype, always_2d):
        self.requests.append(frames)
        n = min(frames, self.left)
        self.left -= n
        return np.ones((n, 1), np.float32)


def test_reads_in_bounded_blocks_whatever_the_header_claims():
    dec = _LyingDecoder()
    assert audio_mod._read_frames(dec, None).shape == (100_000, 1)
    assert max(dec.requests) <= 1 << 16
    dec = _LyingDecoder()
    assert audio_mod._read_frames(dec, 70_000).shape == (70_000, 1) and sum(dec.requests) == 70_000


def test_flac_header_lying_about_length_gives_a_clean_outcome():
    flac = bytearray(encode(tone(300.0, SR, 1.0), SR, fmt="FLAC"))
    # STREAMINFO (right after "fLaC" + 4-byte block header): total-samples is the low 36 bits of bytes 18..26.
    packed = int.from_bytes(flac[18:26], "big")
    flac[18:26] = ((packed & ~((1 << 36) - 1)) | ((1 << 36) - 2)).to_bytes(8, "big")
    assert sf.info(io.BytesIO(bytes(flac))).frames > 10**10  # the lie is visible to libsndfile
    try:
        assert load_audio(bytes(flac)).samples.shape == (SR,)
    except InputError as exc:  # libsndfile 1.2 refuses such a stream; either way: no crash, no giant buffer
        assert "FLAC" in str(exc)


def test_bad_limits_are_programming_errors():
    raw = encode(tone(250.0, SR, 1.0), SR)
    with pytest.raises(ValueError):
        load_audio(raw, max_seconds=0.2, min_seconds=0.5)
    with pytest.raises(ValueError):
        load_audio(raw, target_sr=0)


def _input_error(source, *words, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_audio(source, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "Fix:" in msg, msg
    for word in words:
        assert word.lower() in msg.lower(), (word, msg)
    return msg


def test_error_missing_file_directory_and_empty(tmp_path):
    _input_error(tmp_path / "nope.wav", "does not exist", "nope.wav")
    _input_error(tmp_path, "directory")
    (tmp_path / "empty.wav").write_bytes(b"")
    _input_error(tmp_path / "empty.wav", "empty")
    _input_error(b"", "empty")
    _input_error(12345, "path or bytes")


@pytest.mark.parametrize("payload,words", [
    (np.random.default_rng(0).bytes(4000), ["could not be decoded", "WAV, FLAC, MP3"]),
    (b"<html><body>Not Found</body></html>", ["text", "not a supported format", "WAV"]),
    (b"\x00\x00\x00\x20ftypM4A " + bytes(200), ["MP4/M4A", "not a supported format", "FLAC"]),
    (b"\x1a\x45\xdf\xa3" + bytes(200), ["WebM", "not a supported format"]),
    (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(8), ["looks like WAV", "corrupt"]),
])
def test_error_undecodable_or_unsupported(payload, words):
    _input_error(payload, *words)


def test_error_decodable_but_unsupported_container():
    _input_error(encode(tone(300.0, SR, 1.0), SR, fmt="AU"), "unsupported format", "AU", "WAV, FLAC, MP3")


def test_error_silent_short_nonfinite_and_rate():
    _input_error(encode(np.zeros(SR, np.float32), SR), "silent")
    _input_error(encode(np.full(SR, 3e-5, np.float32), SR, subtype="FLOAT"), "silent")
    # Phase-inverted stereo averages to silence, which is what the model would hear.
    left = tone(300.0, SR, 1.0)
    _input_error(encode(np.stack([left, -left], axis=1), SR, subtype="FLOAT"), "silent")
    _input_error(encode(tone(300.0, SR, 0.3), SR), "too short", "0.30 s", "0.5 s")
    _input_error(encode(tone(300.0, SR, 0.9), SR), "too short", min_seconds=1.0)
    bad = tone(300.0, SR, 1.0)
    bad[100] = np.nan
    _input_error(encode(bad, SR, subtype="FLOAT"), "NaN")
    bad[100] = np.inf
    _input_error(encode(bad, SR, subtype="FLOAT"), "infinite")
    _input_error(encode(tone(300.0, 1000, 1.0), 1000), "sample rate", "1000 Hz")


def test_error_silent_within_kept_part_says_so():
    data = np.concatenate([np.zeros(2 * SR, np.float32), tone(300.0, SR, 1.0)])
    _input_error(encode(data, SR), "silent", "first 1.5 s", max_seconds=1.5)
    assert not load_audio(encode(data, SR)).trimmed  # the whole clip is fine


# ------------------------------------------------------------------------------------------------- helpers


def test_audio_fingerprint_is_sha256_of_raw_bytes():
    assert audio_fingerprint(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert audio_fingerprint(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert audio_fingerprint(bytearray(b"abc")) == audio_fingerprint(memoryview(b"abc"))


def test_to_pcm16_truncates_and_clamps_like_upstream():
    wav = np.array([0.0, 0.99999, -0.99999, 1.0, -1.0, 1.5, -2.0, -1e-5, 1e-5, 0.5, -0.5, np.nan], np.float32)
    assert to_pcm16(wav).tolist() == [0, 32766, -32766, 32767, -32767, 32767, -32767, 0, 0, 16383, -16383, 0]
    assert to_pcm16(wav).dtype == np.int16


def test_to_pcm16_equals_torch_formula_on_random_audio():
    x = torch.from_numpy(np.random.default_rng(11).uniform(-1.2, 1.2, (2, 50000)).astype(np.float32))
    upstream = torch.clamp(32767 * x, -32767.0, 32767.0).type(torch.int16).numpy()
    assert np.array_equal(to_pcm16(x), upstream)
    assert np.array_equal(to_pcm16(x.numpy().astype(np.float64)), upstream)  # scaled in float32 either way
    pcm = upstream[0]
    assert np.array_equal(to_pcm16(pcm), pcm)
    half = x.to(torch.bfloat16)
    expected = torch.clamp(32767 * half.float(), -32767.0, 32767.0).type(torch.int16).numpy()
    assert np.array_equal(to_pcm16(half), expected)
    with pytest.raises(TypeError):
        to_pcm16(np.zeros(4, np.int32))


def test_write_wav_and_wav_bytes_roundtrip(tmp_path):
    x = np.random.default_rng(2).uniform(-1, 1, 4800).astype(np.float32)
    path = write_wav(tmp_path / "sub" / "out.wav", torch.from_numpy(x), SR)
    data, rate = sf.read(path, dtype="int16")
    info = sf.info(path)
    assert rate == SR and info.subtype == "PCM_16" and info.channels == 1
    assert np.array_equal(data, to_pcm16(x))
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.wav"]  # no temp files left

    stereo = np.stack([x, -x])  # channels-first, like upstream tensors
    blob = wav_bytes(stereo, 22050)
    data, rate = sf.read(io.BytesIO(blob), dtype="int16")
    assert rate == 22050 and data.shape == (4800, 2)
    assert np.array_equal(data[:, 1], to_pcm16(-x))
    assert wav_bytes(to_pcm16(x)) == wav_bytes(x)  # int16 input is written as-is
    with pytest.raises(ValueError):
        wav_bytes(np.zeros((4800, 2), np.float32))  # [T, C] is ambiguous: refuse


def test_clip_feeds_the_mel_end_to_end():
    clip = load_audio(encode(tone(220.0, 44100, 2.0, amp=0.3), 44100))
    mel = LogMelSpectrogram()(clip.samples[None])
    assert mel.shape == (1, 100, mel_lengths(clip.samples.shape[0]))
    assert torch.isfinite(mel).all() and float(mel.max()) > math.log(1e-7) + 5
