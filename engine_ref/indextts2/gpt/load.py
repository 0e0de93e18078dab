"""Strict loading of IndexTTS2's gpt.pth into UnifiedVoiceV2.

gpt.pth is a flat fp32 state dict (a {"model": state dict} wrapper is accepted too, as upstream does). Every key
and shape is checked against the published layout before anything is copied, so a mismatch names the key, the
expected and found shapes, and the fix. REL loads strictly as here; HEAD (2.5 release) loads non-strict, which
would hide exactly these mistakes. gpt.pth has no weight-normed layers, so nothing is folded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from engine_ref.checkpoint import check_against_layout, gpt_state_dict, read_checkpoint, to_float32
from engine_ref.indextts2.gpt.config import GPTv2Config
from engine_ref.indextts2.gpt.layout import gpt_v2_shapes
from engine_ref.indextts2.gpt.model import UnifiedVoiceV2


def build_gpt_v2(cfg: GPTv2Config, state: Mapping[str, torch.Tensor], source: str = "gpt.pth") -> UnifiedVoiceV2:
    """A state dict (flat or under 'model') -> UnifiedVoiceV2 in eval mode, fp32; CheckpointError on mismatch."""
    flat = gpt_state_dict(dict(state))
    check_against_layout(flat, gpt_v2_shapes(cfg), source)
    with torch.inference_mode(False):
        model = UnifiedVoiceV2(cfg)
        model.load_state_dict(to_float32(flat), strict=True)
    return model.eval()


def load_gpt_v2(cfg: GPTv2Config, path: str | Path) -> UnifiedVoiceV2:
    """Read gpt.pth (weights_only, memory-mapped) and load it strictly."""
    path = Path(path)
    return build_gpt_v2(cfg, read_checkpoint(path), path.name)
