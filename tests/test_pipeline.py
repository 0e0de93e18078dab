"""engine_ref end to end on the tiny preset: strict loading, synthesis, determinism, caching, bad input via the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from engine_ref.indextts.config import load_config
from engine_ref.errors import CheckpointError, ModelFilesError
from engine_ref.layout.gpt import gpt_layout
from engine_ref.indextts.loader import load_model
from engine_ref.modules.unified_voice import UnifiedVoice
from engine_ref.indextts.presets import PRESETS
from engine_ref.sampling import GenerationParams
from engine_ref.indextts.synthesizer import Synthesizer
from triton_tts.cli import main as cli

TEXT = "Hello world. This is a test of the tiny model, with numbers like 42! Does it work? Yes, it does."

# Published shapes of the official IndexTTS 1.5 gpt.pth (indextts-facts.md), typed in by hand.
V15_PUBLISHED = {
    "text_embedding.weight": (12001, 1280),
    "mel_embedding.weight": (8194, 1280),
    "text_pos_embedding.emb.weight": (602, 1280),
    "mel_pos_embedding.emb.weight": (803, 1280),
    "conditioning_encoder.embed.pos_enc.pe": (1, 5000, 512),
    "perceiver_encoder.latents": (32, 1280),
    "perceiver_encoder.layers.0.1.0.weight": (3412, 1280),
    "perceiver_encoder.layers.0.1.2.weight": (1280, 1706),
    "gpt.h.0.attn.c_attn.weight": (1280, 3840),
    "gpt.h.23.mlp.c_proj.weight": (5120, 1280),
    "mel_head.weight": (8194, 1280),
    "text_head.weight": (12001, 1280),
}


@pytest.fixture(scope="module")
def synth(tiny_model_dir) -> Synthesizer:
    return Synthesizer.from_pretrained(tiny_model_dir, speaker_cache_size=2)


def test_v15_layout_has_the_published_shapes_and_matches_the_module():
    cfg = PRESETS["v1.5"].config.gpt
    layout = {k: spec.shape for k, spec in gpt_layout(cfg).items()}
    for key, shape in V15_PUBLISHED.items():
        assert layout[key] == shape, key
    assert "gpt.h.24.ln_1.weight" not in layout and not any(k.startswith(("gpt.wte", "gpt.wpe", "inference_model")) for k in layout)
    with torch.device("meta"):
        module = UnifiedVoice(cfg)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == layout


def test_tiny_preset_loads_strictly_and_is_official_format(tiny_model_dir):
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert names == ["bigvgan_generator.pth", "bpe.model", "config.yaml", "gpt.pth"]
    raw = yaml.safe_load((tiny_model_dir / "config.yaml").read_text())
    assert {"vqvae", "dataset", "gpt", "bigvgan", "version"} <= set(raw)  # training-only sections are present
    assert "generator" in torch.load(tiny_model_dir / "bigvgan_generator.pth", weights_only=True, mmap=True)
    bv = torch.load(tiny_model_dir / "bigvgan_generator.pth", weights_only=True, mmap=True)["generator"]
    assert "conv_pre.weight_g" in bv and "conv_pre.weight_v" in bv and "conv_pre.weight" not in bv
    loaded = load_model(tiny_model_dir)
    assert loaded.config.version == "1.5"
    assert "vqvae" in loaded.config.ignored_keys


def test_preset_is_deterministic(tmp_path, tiny_model_dir):
    from engine_ref.indextts.presets import write_preset

    again = write_preset("tiny", tmp_path / "again")
    for name in ("gpt.pth", "bigvgan_generator.pth", "bpe.model"):
        a = torch.load(tiny_model_dir / name, weights_only=True) if name.endswith(".pth") else (tiny_model_dir / name).read_bytes()
        b = torch.load(again / name, weights_only=True) if name.endswith(".pth") else (again / name).read_bytes()
        if isinstance(a, bytes):
            assert a == b
        else:
            flat_a = a.get("generator", a)
            flat_b = b.get("generator", b)
            assert flat_a.keys() == flat_b.keys()
            assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)


def test_synthesis_is_non_degenerate(synth, voice_wav):
    result = synth.synthesize(TEXT, voice_wav, GenerationParams(seed=3), max_text_tokens_per_segment=16)
    assert result.sample_rate == 24000
    assert len(result.segments) >= 2
    for seg in result.segments:
        assert len(seg.codes) > 5, "the random decoder must not stop at the first steps"
        assert seg.pcm16.shape[0] == len(seg.codes) * 1024
    wav = result.waveform
    rms, peak = float(np.sqrt(np.mean(wav**2))), float(np.abs(wav).max())
    assert 0.005 < rms < 0.5 and peak < 0.999, (rms, peak)
    assert np.mean(np.abs(result.pcm16) >= 32767) < 0.001  # not clipped
    t = result.timings
    assert t.audio_s == pytest.approx(len(wav) / 24000) and t.tokens > 0 and t.rtf > 0


def test_same_seed_same_audio_and_greedy_batching_is_exact(synth, voice_wav):
    seg = {"max_text_tokens_per_segment": 16}
    a = synth.synthesize(TEXT, voice_wav, GenerationParams(seed=7), **seg)
    b = synth.synthesize(TEXT, voice_wav, GenerationParams(seed=7), **seg)
    assert len(a.segments) >= 3
    assert np.array_equal(a.pcm16, b.pcm16)
    # Sampling draws per segment, so bucketing does not change a seeded result either.
    c = synth.synthesize(TEXT, voice_wav, GenerationParams(seed=7), bucket_max_size=1, **seg)
    assert np.array_equal(a.pcm16, c.pcm16)
    g4 = synth.synthesize(TEXT, voice_wav, GenerationParams.greedy(), bucket_max_size=4, **seg)
    g1 = synth.synthesize(TEXT, voice_wav, GenerationParams.greedy(), bucket_max_size=1, **seg)
    assert [s.codes for s in g4.segments] == [s.codes for s in g1.segments]
    assert np.array_equal(g4.pcm16, g1.pcm16)


def test_speaker_cache_hits_and_stays_bounded(synth, voice_wav, tmp_path):
    synth.synthesize("One.", voice_wav, GenerationParams.greedy(max_mel_tokens=30))
    hit = synth.synthesize("Two.", voice_wav, GenerationParams.greedy(max_mel_tokens=30))
    assert hit.timings.speaker_cache_hit
    data, sr = sf.read(voice_wav, dtype="float32")
    for i in range(4):  # new references push old ones out: the cache never exceeds its size
        path = tmp_path / f"v{i}.wav"
        sf.write(path, data * (0.5 + 0.1 * i), sr, subtype="PCM_16")
        synth.synthesize("Three.", path, GenerationParams.greedy(max_mel_tokens=30))
    assert len(synth._speakers) == 2


def test_max_mel_tokens_cut_is_reported(synth, voice_wav):
    result = synth.synthesize("A sentence long enough.", voice_wav, GenerationParams.greedy(max_mel_tokens=8))
    assert any("max_mel_tokens=8" in w for w in result.warnings)
    assert not result.segments[0].stopped and len(result.segments[0].codes) == 8


def test_reference_longer_than_limit_is_trimmed_with_warning(tiny_model_dir, voice_wav, tmp_path):
    s = Synthesizer.from_pretrained(tiny_model_dir, max_reference_seconds=1.0)
    result = s.synthesize("Hi there.", voice_wav, GenerationParams.greedy(max_mel_tokens=20))
    assert any("trimmed" in w for w in result.warnings)


# --- bad input: one line naming the problem and the fix, exit status 2, no traceback --------------------------------

def _run_cli(capsys, *args) -> tuple[int, str]:
    code = cli(list(args))
    err = capsys.readouterr().err
    return code, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert "Fix:" in lines[0]
    return lines[0]


@pytest.fixture()
def bad_refs(tmp_path, voice_wav) -> dict[str, Path]:
    sr = 24000
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(sr * 2, np.float32), sr)
    short = tmp_path / "short.wav"
    data, _ = sf.read(voice_wav, dtype="float32")
    sf.write(short, data[: sr // 10], sr)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    m4a = tmp_path / "voice.m4a"
    m4a.write_bytes(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 200)
    return {"silent": silent, "short": short, "corrupt": corrupt, "m4a": m4a, "missing": tmp_path / "nope.wav"}


@pytest.mark.parametrize(
    "case,needle",
    [
        ("empty_text", "empty"),
        ("punct_text", "nothing"),
        ("missing_ref", "does not exist"),
        ("silent_ref", "silent"),
        ("short_ref", "short"),
        ("corrupt_ref", "wav"),
        ("m4a_ref", "m4a"),
    ],
)
def test_bad_input_gives_one_line_error(case, needle, capsys, tiny_model_dir, voice_wav, bad_refs, tmp_path):
    text, ref = TEXT, voice_wav
    if case == "empty_text":
        text = "   "
    elif case == "punct_text":
        text = "?!... ,,, --"
    else:
        ref = bad_refs[case.split("_")[0]]
    code, err = _run_cli(capsys, "synth", "--model", str(tiny_model_dir), "--text", text, "--ref", str(ref),
                         "--out", str(tmp_path / "o.wav"), "--greedy", "--max-mel-tokens", "20")
    assert code == 2
    assert needle.lower() in _error_line(err).lower()
    assert not (tmp_path / "o.wav").exists()


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_wrong_config_is_named(capsys, tiny_model_dir, voice_wav, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    cfg = yaml.safe_load((model / "config.yaml").read_text())
    del cfg["gpt"]["heads"]
    (model / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, err = _run_cli(capsys, "synth", "--model", str(model), "--text", "Hi.", "--ref", str(voice_wav),
                         "--out", str(tmp_path / "o.wav"))
    assert code == 2 and "gpt.heads" in _error_line(err)


def test_truncated_checkpoint_is_named(capsys, tiny_model_dir, voice_wav, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    data = (model / "gpt.pth").read_bytes()
    (model / "gpt.pth").write_bytes(data[: len(data) // 2])
    code, err = _run_cli(capsys, "synth", "--model", str(model), "--text", "Hi.", "--ref", str(voice_wav),
                         "--out", str(tmp_path / "o.wav"))
    line = _error_line(err)
    assert code == 2 and "gpt.pth" in line and "truncated" in line.lower()
    code, err = _run_cli(capsys, "verify", str(model))
    assert code == 1


def test_config_checkpoint_mismatch_names_key_and_shapes(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    cfg = yaml.safe_load((model / "config.yaml").read_text())
    cfg["gpt"]["max_text_tokens"] = 100  # changes text_pos_embedding rows
    (model / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"text_pos_embedding\.emb\.weight.*\[602, 64\].*\[102, 64\]"):
        load_model(model)


def test_missing_model_dir_fails_fast(tmp_path):
    with pytest.raises(ModelFilesError):
        load_model(tmp_path / "does-not-exist")


def test_cli_process_prints_no_traceback(tmp_path):
    """The real console script, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "triton_tts", "synth", "--model", str(tmp_path / "none"), "--text", "x",
         "--ref", "x.wav", "--out", str(tmp_path / "o.wav")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:")


def test_demo_command_writes_24k_wav(tmp_path, capsys):
    assert cli(["demo", "--engine-ref", "--workdir", str(tmp_path / "demo")]) == 0
    info = sf.info(tmp_path / "demo" / "demo.wav")
    assert info.samplerate == 24000 and info.channels == 1 and info.frames > 24000 and info.subtype == "PCM_16"
    assert load_config(tmp_path / "demo" / "tiny-model" / "config.yaml").version == "1.5"
