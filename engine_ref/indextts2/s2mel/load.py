"""Strict loading of the official s2mel.pth.

The file is a training checkpoint: only ``['net']`` = {cfm, length_regulator, gpt_layer} is read (other top-level
content, ~0.8 GB in the IndexTTS-2 file, and other ``net`` entries are ignored, as upstream does). Keys may carry a
DDP ``module.`` prefix, stripped like upstream's loader. Upstream then loads non-strictly with a shape filter, so
a wrong key or shape silently leaves random weights; here every entry is checked against the published layout
first and any missing, unexpected or mis-shaped key is a CheckpointError naming it. Weight norm is folded
(w = g * v / ||v||, norm over all dims but 0) so the modules hold plain weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from engine_ref.checkpoint import check_against_layout, read_checkpoint
from engine_ref.errors import CheckpointError
from engine_ref.indextts2.s2mel.config import GPT_LATENT_DIM, S2MelConfig
from engine_ref.indextts2.s2mel.layout import SUBMODULES, s2mel_layout
from engine_ref.indextts2.s2mel.model import S2Mel
from engine_ref.modules.bigvgan import fold_weight_norm

_DDP_PREFIX = "module."
_INTEGER_KEYS = ("estimator.input_pos",)


def strip_ddp_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop one leading ``module.`` from each key (a stripped key replaces an unprefixed duplicate, as upstream)."""
    out = {k: v for k, v in state.items() if not k.startswith(_DDP_PREFIX)}
    for k, v in state.items():
        if k.startswith(_DDP_PREFIX):
            out[k[len(_DDP_PREFIX):]] = v
    return out


def _net(raw: Mapping[str, Any], source: str, wanted: tuple[str, ...] = SUBMODULES) -> Mapping[str, Any]:
    net = raw.get("net")
    if not isinstance(net, Mapping):
        raise CheckpointError(
            f"{source} has no 'net' entry (found top-level keys: {', '.join(map(str, list(raw)[:8]))})",
            "use the official IndexTTS-2 s2mel.pth",
        )
    missing = [name for name in wanted if name not in net]
    if missing:
        raise CheckpointError(
            f"{source}['net'] lacks {', '.join(missing)} (has {', '.join(map(str, net))})",
            f"use the official s2mel.pth of this release (it stores {', '.join(wanted)})",
        )
    return net


def _prepare(state: Any, expected: Mapping[str, tuple[int, ...]], source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} is not a state dict of tensors", "use the official IndexTTS-2 s2mel.pth")
    state = strip_ddp_prefix(state)
    check_against_layout(state, expected, source)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key in _INTEGER_KEYS:
            if t.is_floating_point() or t.is_complex():
                raise CheckpointError(f"{source}: '{key}' must hold integer positions, found {t.dtype}", "re-download s2mel.pth")
            out[key] = t.to(torch.int64)
            continue
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: '{key}' must be floating point, found {t.dtype}", "re-download s2mel.pth")
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: '{key}' holds NaN or Inf", "re-download s2mel.pth")
        out[key] = t
    return fold_weight_norm(out)


def load_s2mel_state(model: S2Mel, raw: Mapping[str, Any], source: str = "s2mel.pth") -> S2Mel:
    """Check, fold and strictly load a deserialised s2mel.pth into `model`."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source} holds a {type(raw).__name__}, not a dict", "use the official IndexTTS-2 s2mel.pth")
    layout = s2mel_layout(model.cfg, model.gpt_latent_dim, model.with_gpt_layer)
    net = _net(raw, source, tuple(layout))
    for name in layout:
        where = f"{source} net['{name}']"
        folded = _prepare(net[name], layout[name], where)
        module = getattr(model, name)
        try:
            module.load_state_dict(folded, strict=True)
        except RuntimeError as exc:  # the layout and the module disagree: a bug in this package, still named
            raise CheckpointError(f"{where} does not fit the module: {str(exc).splitlines()[0]}", "report this as a bug") from None
    return model


def load_s2mel(
    path: str | Path, cfg: S2MelConfig, device: str | torch.device = "cpu", gpt_latent_dim: int = GPT_LATENT_DIM,
    with_gpt_layer: bool = True,
) -> S2Mel:
    """Read s2mel.pth (weights_only, memory-mapped), load it strictly, return the fp32 model in eval mode.

    with_gpt_layer=False (IndexTTS-2.5): only net['cfm'] and net['length_regulator'] are read and required."""
    raw = read_checkpoint(path)
    model = S2Mel(cfg, gpt_latent_dim, with_gpt_layer)
    load_s2mel_state(model, raw, source=Path(path).name)
    return model.to(device).eval()
