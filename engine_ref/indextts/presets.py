"""Model directories in the official on-disk format, filled with deterministic random weights.

Official weights cannot be downloaded everywhere (CI, air-gapped clusters), yet the loading code must be the real
one. A preset writes exactly what the official release ships — config.yaml (training-only sections included),
gpt.pth, bigvgan_generator.pth, bpe.model — with the official key names and shapes, from the layout tables in
`engine_ref.layout` (independent of the nn.Modules). `tiny` runs the whole pipeline in seconds on a CPU; `v1.5`
and `v1.0` have the real sizes, for benchmarks (never committed).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import yaml

from engine_ref.modules.configs import BigVGANConfig, ConditionModuleConfig, GPTConfig

from engine_ref.indextts.config import ModelConfig, config_to_yaml
from engine_ref.layout import materialize
from engine_ref.layout.bigvgan import bigvgan_layout
from engine_ref.layout.gpt import gpt_layout

log = logging.getLogger("engine_ref.indextts.presets")

_V15_CONDITION = ConditionModuleConfig(
    output_size=512, linear_units=2048, attention_heads=8, num_blocks=6, input_layer="conv2d2", perceiver_mult=2
)


def _bigvgan(gpt_dim: int, initial_channel: int, speaker_dim: int) -> BigVGANConfig:
    return BigVGANConfig(
        resblock="1",
        upsample_rates=(4, 4, 4, 4, 2, 2),
        upsample_kernel_sizes=(8, 8, 4, 4, 4, 4),
        upsample_initial_channel=initial_channel,
        resblock_kernel_sizes=(3, 7, 11),
        resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        speaker_embedding_dim=speaker_dim,
        gpt_dim=gpt_dim,
        activation="snakebeta",
        num_mels=100,
        sampling_rate=24000,
        feat_upsample=False,
        cond_d_vector_in_each_upsampling_layer=True,
        snake_logscale=True,
    )


def _gpt(dim: int, layers: int, heads: int, max_mel: int, max_text: int, text_tokens: int,
         condition: ConditionModuleConfig) -> GPTConfig:
    return GPTConfig(
        model_dim=dim, layers=layers, heads=heads, max_mel_tokens=max_mel, max_text_tokens=max_text,
        number_text_tokens=text_tokens, number_mel_codes=8194, start_mel_token=8192, stop_mel_token=8193,
        start_text_token=0, stop_text_token=1, condition_type="conformer_perceiver", condition_module=condition,
        mel_length_compression=1024, use_mel_codes_as_input=True, train_solo_embeddings=False,
    )


@dataclass(frozen=True)
class Preset:
    name: str
    config: ModelConfig
    bpe_vocab: int  # pieces requested from SentencePiece (<= gpt.number_text_tokens)
    target_codes: int  # where the random decoder starts emitting the stop code
    description: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        ModelConfig(
            gpt=_gpt(64, 2, 4, 800, 600, 512, ConditionModuleConfig(32, 128, 2, 2, "conv2d2", 2)),
            bigvgan=_bigvgan(64, 64, 64),
            version="1.5",
        ),
        bpe_vocab=512, target_codes=40,
        description="whole pipeline in seconds on CPU (tests, demo)",
    ),
    "v1.5": Preset(
        "v1.5",
        ModelConfig(gpt=_gpt(1280, 24, 20, 800, 600, 12000, _V15_CONDITION), bigvgan=_bigvgan(1280, 1536, 512),
                    version="1.5"),
        bpe_vocab=12000, target_codes=120,
        description="IndexTTS 1.5 sizes (benchmarks)",
    ),
    "v1.0": Preset(
        "v1.0",
        ModelConfig(gpt=_gpt(1024, 20, 16, 605, 402, 12000, _V15_CONDITION), bigvgan=_bigvgan(1024, 1536, 512),
                    version="1.0"),
        bpe_vocab=12000, target_codes=120,
        description="IndexTTS 1.0 sizes (benchmarks)",
    ),
}

# The official config.yaml carries these training-only sections; presets write them too so that parsing the real
# file's extra keys is exercised everywhere.
_TRAINING_ONLY = {
    "vqvae": {"channels": 100, "num_tokens": 8192, "hidden_dim": 512, "num_resnet_blocks": 3, "codebook_dim": 512,
              "num_layers": 2, "positional_dims": 1, "kernel_size": 3, "smooth_l1_loss": True,
              "use_transposed_convs": False},
    "bigvgan": {"adam_b1": 0.8, "adam_b2": 0.99, "lr_decay": 0.999998, "seed": 1234, "use_cqtd_instead_of_mrd": True,
                "resolutions": [[1024, 120, 600], [2048, 240, 1200], [512, 50, 240]],
                "mpd_reshapes": [2, 3, 5, 7, 11], "use_spectral_norm": False, "segment_size": 16384,
                "num_freq": 1025, "n_fft": 1024, "hop_size": 256, "win_size": 1024, "fmin": 0, "fmax": None,
                "fmax_for_loss": None, "mel_type": "pytorch", "num_workers": 2},
    "dataset": {"mel": {"sample_rate": 24000, "n_fft": 1024, "hop_length": 256, "win_length": 1024, "n_mels": 100,
                        "mel_fmin": 0, "normalize": False}},
}


def preset_names() -> list[str]:
    return list(PRESETS)


def _config_yaml(cfg: ModelConfig) -> str:
    doc = yaml.safe_load(config_to_yaml(cfg))
    doc["vqvae"] = _TRAINING_ONLY["vqvae"]
    doc["bigvgan"] = {**doc["bigvgan"], **_TRAINING_ONLY["bigvgan"]}
    doc["dataset"] = {**doc["dataset"], **_TRAINING_ONLY["dataset"]}
    doc["dvae_checkpoint"] = "dvae.pth"
    order = ["dataset", "gpt", "vqvae", "bigvgan", "dvae_checkpoint", "gpt_checkpoint", "bigvgan_checkpoint", "version"]
    return yaml.safe_dump({k: doc[k] for k in order if k in doc}, sort_keys=False)


def corpus_text() -> str:
    """The text embedded in the package that presets train their bpe.model on."""
    return resources.files("engine_ref").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def write_preset(name: str, out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Write a complete model directory; atomic (a temp dir renamed into place), so a crash leaves nothing half-done."""
    from engine_ref.text.tokenizer import train_bpe

    if name not in PRESETS:
        from engine_ref.errors import InputError

        raise InputError(f"unknown preset '{name}'", f"choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    out = Path(out_dir)
    if out.exists():
        if not force:
            from engine_ref.errors import InputError

            raise InputError(f"{out} already exists", "pass --force to overwrite it, or choose another --out")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = preset.config
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "config.yaml").write_text(_config_yaml(cfg), encoding="utf-8")
        train_bpe(corpus_text(), tmp / cfg.bpe_model, vocab_size=preset.bpe_vocab, seed=seed)
        gpt = materialize(gpt_layout(cfg.gpt, target_codes=preset.target_codes, seed=seed), seed)
        torch.save(gpt, tmp / cfg.gpt_checkpoint)
        del gpt
        torch.save({"generator": materialize(bigvgan_layout(cfg.bigvgan), seed + 1)}, tmp / cfg.bigvgan_checkpoint)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shared read-only
        tmp.rename(out)
        # TemporaryDirectory's cleanup tolerates the directory being gone.
    log.info("wrote preset %s to %s", name, out)
    return out


def demo_voice(seconds: float = 3.0, sample_rate: int = 24000, seed: int = 0) -> np.ndarray:
    """A deterministic voice-like reference: a gliding harmonic tone with formant-ish weights, jitter and breath.

    No recording is committed to the repository; this gives tests and the demo a non-silent, non-trivial prompt.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 25 * np.sin(2 * math.pi * 0.7 * t) + 4 * np.sin(2 * math.pi * 5.5 * t)
    phase = 2 * math.pi * np.cumsum(f0) / sample_rate
    wave = np.zeros_like(t)
    for h in range(1, 25):
        freq = h * f0
        weight = (np.exp(-((freq - 700) / 300) ** 2) + 0.6 * np.exp(-((freq - 1200) / 400) ** 2) + 0.2) / h
        wave += weight * np.sin(h * phase + rng.uniform(0, 2 * math.pi))
    syllables = 0.55 + 0.45 * np.sin(2 * math.pi * 3.0 * t) ** 2
    wave = wave * syllables + 0.01 * rng.standard_normal(t.shape)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)
