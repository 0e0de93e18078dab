"""Load an IndexTTS2 directory and its four hub dependencies into ready modules: offline, strict, timed.

Order, for users: the model reference resolves offline (a directory or a repo id in the local hub cache), the
dependencies resolve offline (flat ``<model_dir>/hf_cache/`` first, then the Hugging Face cache layout), the
shallow integrity check runs (seconds), and only then are the checkpoints read, each strictly against its
published layout (a wrong key or shape names itself).
Nothing here opens a socket: the w2v-BERT snapshot is read with ``local_files_only`` from a directory, the other
files with torch/safetensors. The Qwen emotion model is NOT loaded here: `QwenEmotion` reads its directory on the
first request that asks for text emotion.

Load time is recorded per component (`LoadedV2.load_seconds`), as upstream prints after each piece.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine_ref.errors import ConfigError
from engine_ref.indextts2.campplus import EMBEDDING_SIZE, CAMPPlus, load_campplus
from engine_ref.indextts2.config import IndexTTS2Config, load_v2_config
from engine_ref.indextts2.emotion import EmotionBank, load_emotion_bank
from engine_ref.indextts2.fbank import KaldiFbank
from engine_ref.indextts2.features import SemanticFrontEnd
from engine_ref.indextts2.gpt import UnifiedVoiceV2, load_gpt_v2
from engine_ref.indextts2.mel22k import ReferenceMel22k, upstream_fmax
from engine_ref.indextts2.qwen_emotion import QwenEmotion
from engine_ref.indextts2.s2mel import S2Mel, load_s2mel
from engine_ref.indextts2.semantic_codec import SemanticCodec, load_semantic_codec
from engine_ref.indextts2.vocoder import BigVGANv2, load_bigvgan_v2
from engine_ref.text import TextFrontend

log = logging.getLogger("engine_ref.indextts2.loader")

__all__ = ["DependencyPaths", "LoadedV2", "find_dependencies", "load_v2_model", "check_component_widths",
           "resolve_model_dir"]


@dataclass(frozen=True)
class DependencyPaths:
    """Where each hub dependency was found, and in which layout ("flat" or "hub:<cache dir>")."""

    w2v_bert_dir: Path
    semantic_codec: Path
    campplus: Path
    vocoder_dir: Path
    layouts: dict = field(default_factory=dict)  # role -> layout description


@dataclass
class LoadedV2:
    """Every module of one IndexTTS2 directory, eval mode, fp32, on the CPU (like the 1.x reference engine: the
    shared decoding code builds its index tensors on the CPU)."""

    model_dir: Path
    config: IndexTTS2Config
    dependencies: DependencyPaths
    frontend: TextFrontend
    semantic: SemanticFrontEnd  # SeamlessM4T extractor + w2v-BERT (17 layers) + stats
    codec: SemanticCodec
    campplus: CAMPPlus
    fbank: KaldiFbank  # CAMPPlus input features (torchaudio kaldi.fbank, 80 bins, dither 0)
    ref_mel: ReferenceMel22k
    gpt: UnifiedVoiceV2
    s2mel: S2Mel
    vocoder: BigVGANv2
    emotion_bank: EmotionBank
    qwen_emotion: QwenEmotion  # lazy: nothing read until text emotion is requested
    load_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def total_load_seconds(self) -> float:
        return sum(self.load_seconds.values())


# ---- dependency resolution (offline, filesystem only) ----

def find_dependencies(model_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> DependencyPaths:
    """Locate w2v-bert-2.0, the MaskGCT semantic codec, CAMPPlus and BigVGAN v2 without any network access.

    `engine_ref.indextts2.hub.resolve_dependencies` decides: flat ``<model_dir>/hf_cache/`` first, then Hugging
    Face caches (the model dir's hf_cache/ as a cache, cache_dir or HF_HUB_CACHE / HF_HOME); it also switches the
    process to offline mode. A missing dependency is a ModelFilesError naming the places looked and the fix.
    """
    from engine_ref.families import INDEXTTS2
    from engine_ref.indextts2.hub import resolve_dependencies

    resolved = resolve_dependencies(model_dir, cache_dir=cache_dir, family=INDEXTTS2)
    return DependencyPaths(
        w2v_bert_dir=resolved.w2v_bert_dir, semantic_codec=resolved.semantic_codec_file,
        campplus=resolved.campplus_file, vocoder_dir=resolved.bigvgan_dir,
        layouts={key: f"{dep.layout}: {dep.source}" for key, dep in resolved.deps.items()},
    )


# ---- loading ----

def check_component_widths(cfg: IndexTTS2Config, semantic: SemanticFrontEnd, vocoder: BigVGANv2) -> None:
    """The dependencies must fit config.yaml: w2v-BERT width, vocoder mel bands, rate and hop."""
    hidden = semantic.encoder.w2v_bert.config.hidden_size
    if hidden != cfg.semantic_dim:
        raise ConfigError(f"the w2v-BERT snapshot is {hidden} wide but config.yaml expects {cfg.semantic_dim} "
                          "(gpt.feature_dim / semantic_codec.hidden_size)",
                          "use facebook/w2v-bert-2.0 with the IndexTTS-2 config.yaml")
    spect = cfg.s2mel.preprocess_params.spect_params
    voc = vocoder.cfg
    if (voc.num_mels, voc.sampling_rate, voc.samples_per_frame) != (spect.n_mels, cfg.sample_rate, spect.hop_length):
        raise ConfigError(
            f"the vocoder takes {voc.num_mels} mel bands at {voc.sampling_rate} Hz, hop {voc.samples_per_frame}; "
            f"config.yaml's s2mel makes {spect.n_mels} bands at {cfg.sample_rate} Hz, hop {spect.hop_length}",
            f"use {cfg.vocoder.name} (config.yaml vocoder.name)")
    if cfg.s2mel.style_encoder.dim != EMBEDDING_SIZE:
        raise ConfigError(f"s2mel.style_encoder.dim is {cfg.s2mel.style_encoder.dim}; CAMPPlus gives "
                          f"{EMBEDDING_SIZE}-d styles", "restore it from the official config.yaml")


def resolve_model_dir(ref: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    """A directory, or a repo id in the local Hugging Face cache -> the model directory (never downloads)."""
    from engine_ref.hub_cache import resolve_model

    return resolve_model(ref, cache_dir=cache_dir)



def reference_parts(cfg: IndexTTS2Config, spk_matrix: Path, emo_matrix: Path, timed) -> tuple:
    """(emotion bank, 22.05 kHz reference mel, CAMPPlus fbank): what 2.0 and 2.5 build alike from config.yaml;
    the bank's widths are checked against the GPT (a ConfigError names the files otherwise)."""
    bank = timed("emotion_bank", lambda: load_emotion_bank(spk_matrix, emo_matrix, cfg.emo_num))
    if bank.emotion_rows[0].shape[1] != cfg.gpt.model_dim or bank.speaker_rows[0].shape[1] != EMBEDDING_SIZE:
        raise ConfigError(
            f"{cfg.spk_matrix}/{cfg.emo_matrix} rows are {bank.speaker_rows[0].shape[1]}/"
            f"{bank.emotion_rows[0].shape[1]} wide; the model needs {EMBEDDING_SIZE}/{cfg.gpt.model_dim}",
            "use the feat1.pt and feat2.pt released with this gpt.pth")
    spect = cfg.s2mel.preprocess_params.spect_params
    ref_mel = ReferenceMel22k(sample_rate=cfg.sample_rate, n_fft=spect.n_fft, hop_length=spect.hop_length,
                              win_length=spect.win_length, n_mels=spect.n_mels, f_min=float(spect.fmin),
                              f_max=upstream_fmax({"fmax": spect.fmax}))
    return bank, ref_mel.eval(), KaldiFbank(sample_rate=16000.0, num_mel_bins=80)

def load_v2_model(
    ref: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = True,
) -> LoadedV2:
    """An IndexTTS2 directory (or cached repo id) + its dependencies -> LoadedV2; never touches the network.

    verify: run the shallow integrity check (headers, sizes, key shapes; seconds) first, so a broken install
    fails with its file and fix before gigabytes are read.
    """
    times: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        return out

    model_dir = timed("resolve", lambda: resolve_model_dir(ref, cache_dir))
    cfg = timed("config", lambda: load_v2_config(model_dir / "config.yaml"))
    deps = timed("dependencies", lambda: find_dependencies(model_dir, cache_dir))
    if verify:
        from engine_ref.families import INDEXTTS2
        from engine_ref.indextts2.integrity import check_indextts2_dir

        timed("verify", lambda: check_indextts2_dir(model_dir, cache_dir=cache_dir,
                                                    family=INDEXTTS2).raise_for_problems())
    with torch.inference_mode(False):
        gpt = timed("gpt", lambda: load_gpt_v2(cfg.gpt, model_dir / cfg.gpt_checkpoint))
        semantic = timed("w2v_bert", lambda: SemanticFrontEnd(deps.w2v_bert_dir, model_dir / cfg.w2v_stat))
        codec = timed("semantic_codec", lambda: load_semantic_codec(deps.semantic_codec, cfg.semantic_codec))
        s2mel = timed("s2mel", lambda: load_s2mel(model_dir / cfg.s2mel_checkpoint, cfg.s2mel,
                                                  gpt_latent_dim=cfg.gpt.model_dim))
        campplus = timed("campplus", lambda: load_campplus(deps.campplus))
        vocoder = timed("vocoder", lambda: load_bigvgan_v2(deps.vocoder_dir))
    check_component_widths(cfg, semantic, vocoder)
    frontend = timed("text", lambda: TextFrontend(
        model_dir / cfg.bpe_model, start_text_token=cfg.gpt.start_text_token,
        stop_text_token=cfg.gpt.stop_text_token, number_text_tokens=cfg.gpt.number_text_tokens))
    bank, ref_mel, fbank = reference_parts(cfg, model_dir / cfg.spk_matrix, model_dir / cfg.emo_matrix, timed)
    qwen = QwenEmotion(model_dir / cfg.qwen_emo_path)
    loaded = LoadedV2(model_dir, cfg, deps, frontend, semantic, codec, campplus, fbank, ref_mel, gpt, s2mel,
                      vocoder, bank, qwen, times)
    log.info("loaded IndexTTS2 %s in %.1f s (%s)", model_dir, loaded.total_load_seconds,
             ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    return loaded
