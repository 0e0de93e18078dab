"""Load an IndexTTS-2.5 directory into ready modules: offline, strict, timed (the 2.0 loader's contract).

Main directory (IndexTeam/IndexTTS-2.5): config.yaml, gpt.pth, s2mel.pth, codec.pth,
multilingual_zh_ja_yue_char_del.tiktoken, wav2vec2bert_stats.pt, feat1.pt, feat2.pt, qwen0.6bemo4-merge/ (optional),
and the bundled dependencies under ``hf_cache/`` (w2v-bert-2.0/, bigvgan/, campplus_cn_common.bin; MaskGCT is not
used). Resolution and the integrity check are `engine_ref.indextts2.hub` / `.integrity` with family
"indextts2.5" (they accept the Hugging Face cache layout too). config.yaml names that are absolute paths (reported
for the hub file, unverified) are read from the model directory by their file name, as the integrity check does.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine_ref.errors import ModelFilesError
from engine_ref.families import FAMILY_NAMES, INDEXTTS2_5, detect_family
from engine_ref.indextts2.campplus import CAMPPlus, load_campplus
from engine_ref.indextts2.config import IndexTTS2Config, load_v2_config
from engine_ref.indextts2.emotion import EmotionBank
from engine_ref.indextts2.fbank import KaldiFbank
from engine_ref.indextts2.features import SemanticFrontEnd
from engine_ref.indextts2.hub import ResolvedDeps
from engine_ref.indextts2.loader import check_component_widths, reference_parts, resolve_model_dir
from engine_ref.indextts2.mel22k import ReferenceMel22k
from engine_ref.indextts2.qwen_emotion import QwenEmotion
from engine_ref.indextts2.s2mel import S2Mel, load_s2mel
from engine_ref.indextts2.v25.codec_decoder import CODEC_FILE, Codec25, load_codec25
from engine_ref.indextts2.v25.frontend import TextFrontendV25
from engine_ref.indextts2.v25.gpt import UnifiedVoiceV25, load_gpt_v25
from engine_ref.indextts2.v25.tokenizer import VOCAB_FILE
from engine_ref.indextts2.vocoder import BigVGANv2, load_bigvgan_v2

log = logging.getLogger("engine_ref.indextts2.v25.loader")

__all__ = ["LoadedV25", "load_v25_model", "local_file"]


@dataclass
class LoadedV25:
    """Every module of one IndexTTS-2.5 directory, eval mode, fp32, on the CPU (attribute names as `LoadedV2`)."""

    model_dir: Path
    config: IndexTTS2Config
    dependencies: ResolvedDeps
    frontend: TextFrontendV25
    semantic: SemanticFrontEnd
    codec: Codec25
    campplus: CAMPPlus
    fbank: KaldiFbank
    ref_mel: ReferenceMel22k
    gpt: UnifiedVoiceV25
    s2mel: S2Mel  # cfm + length_regulator (no gpt_layer)
    vocoder: BigVGANv2
    emotion_bank: EmotionBank
    qwen_emotion: QwenEmotion
    load_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def total_load_seconds(self) -> float:
        return sum(self.load_seconds.values())


def local_file(model_dir: Path, name: str) -> Path:
    """config.yaml's file name inside the model directory (an absolute path is reduced to its name)."""
    return model_dir / (Path(name).name if os.path.isabs(name) else name)


def load_v25_model(ref: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                   verify: bool = True) -> LoadedV25:
    """An IndexTTS-2.5 directory (or cached repo id) + its dependencies -> LoadedV25; never touches the network."""
    from engine_ref.indextts2.hub import resolve_dependencies

    times: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        return out

    model_dir = timed("resolve", lambda: resolve_model_dir(ref, cache_dir))
    family = detect_family(model_dir)
    if family != INDEXTTS2_5:
        raise ModelFilesError(f"{model_dir} is {FAMILY_NAMES.get(family, family)}, not IndexTTS-2.5 (no codec.pth / "
                              f"{VOCAB_FILE})", "load it with its own engine (`triton-tts synth --model` picks it)")
    cfg = timed("config", lambda: load_v2_config(model_dir / "config.yaml", family=INDEXTTS2_5))
    deps = timed("dependencies", lambda: resolve_dependencies(model_dir, cache_dir, family=INDEXTTS2_5))
    if verify:
        from engine_ref.indextts2.integrity import check_indextts2_dir

        timed("verify", lambda: check_indextts2_dir(model_dir, cache_dir=cache_dir,
                                                    family=INDEXTTS2_5).raise_for_problems())
    with torch.inference_mode(False):
        gpt = timed("gpt", lambda: load_gpt_v25(cfg.gpt, local_file(model_dir, cfg.gpt_checkpoint)))  # type: ignore
        semantic = timed("w2v_bert", lambda: SemanticFrontEnd(deps.w2v_bert_dir, local_file(model_dir, cfg.w2v_stat)))
        codec = timed("codec", lambda: load_codec25(model_dir / CODEC_FILE, cfg.semantic_codec))
        s2mel = timed("s2mel", lambda: load_s2mel(local_file(model_dir, cfg.s2mel_checkpoint), cfg.s2mel,
                                                  gpt_latent_dim=cfg.gpt.model_dim, with_gpt_layer=False))
        campplus = timed("campplus", lambda: load_campplus(deps.campplus_file))
        vocoder = timed("vocoder", lambda: load_bigvgan_v2(deps.bigvgan_dir))
    check_component_widths(cfg, semantic, vocoder)
    frontend = timed("text", lambda: TextFrontendV25(
        model_dir / VOCAB_FILE, number_text_tokens=cfg.gpt.number_text_tokens, text_positions=cfg.gpt.text_positions,
        start_text_token=cfg.gpt.start_text_token, stop_text_token=cfg.gpt.stop_text_token))
    bank, ref_mel, fbank = reference_parts(cfg, local_file(model_dir, cfg.spk_matrix),
                                           local_file(model_dir, cfg.emo_matrix), timed)
    qwen = QwenEmotion(local_file(model_dir, cfg.qwen_emo_path))
    loaded = LoadedV25(model_dir, cfg, deps, frontend, semantic, codec, campplus, fbank, ref_mel, gpt, s2mel,
                       vocoder, bank, qwen, times)
    log.info("loaded IndexTTS-2.5 %s in %.1f s (%s)", model_dir, loaded.total_load_seconds,
             ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    return loaded
