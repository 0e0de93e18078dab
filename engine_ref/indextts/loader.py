"""Resolve, verify and load a model directory into ready modules.

Order matters for users: resolution is offline (never a download), the integrity check runs before any large
read so a broken install fails in seconds with the file and the fix, and only then are the checkpoints loaded,
strictly, with shape errors that name the key.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine_ref.checkpoint import check_against_layout, gpt_state_dict, read_checkpoint, to_float32
from engine_ref.indextts.config import ModelConfig, load_config
from engine_ref.hub_cache import resolve_model
from engine_ref.integrity import check_model_dir
from engine_ref.layout.gpt import gpt_layout
from engine_ref.modules.bigvgan import BigVGAN, load_bigvgan_state
from engine_ref.modules.unified_voice import UnifiedVoice
from engine_ref.text import TextFrontend

log = logging.getLogger("engine_ref.indextts.loader")


@dataclass
class LoadedModel:
    """The modules of one model directory, in eval mode, fp32, on CPU."""

    model_dir: Path
    config: ModelConfig
    gpt: UnifiedVoice
    bigvgan: BigVGAN
    frontend: TextFrontend
    load_seconds: float


def load_gpt(cfg: ModelConfig, path: Path) -> UnifiedVoice:
    state = gpt_state_dict(read_checkpoint(path))
    expected = {k: spec.shape for k, spec in gpt_layout(cfg.gpt).items()}
    check_against_layout(state, expected, path.name)
    model = UnifiedVoice(cfg.gpt)
    model.load_state_dict(to_float32(state), strict=True)
    return model.eval()


def load_bigvgan(cfg: ModelConfig, path: Path) -> BigVGAN:
    module = BigVGAN(cfg.bigvgan)
    load_bigvgan_state(module, read_checkpoint(path))
    return module.eval()


def load_model(ref: str | os.PathLike, *, cache_dir: str | None = None, verify: bool = True) -> LoadedModel:
    """Local directory or Hugging Face repo id (from the local cache only) -> loaded modules."""
    start = time.perf_counter()
    model_dir = resolve_model(ref, cache_dir=cache_dir)
    if verify:
        check_model_dir(model_dir).raise_for_problems()
    cfg = load_config(model_dir / "config.yaml")
    with torch.inference_mode(False):
        gpt = load_gpt(cfg, model_dir / cfg.gpt_checkpoint)
        bigvgan = load_bigvgan(cfg, model_dir / cfg.bigvgan_checkpoint)
    frontend = TextFrontend(
        model_dir / cfg.bpe_model, start_text_token=cfg.gpt.start_text_token, stop_text_token=cfg.gpt.stop_text_token
    )
    seconds = time.perf_counter() - start
    log.info("loaded %s (IndexTTS %s) in %.1f s", model_dir, cfg.version, seconds)
    return LoadedModel(model_dir, cfg, gpt, bigvgan, frontend, seconds)
