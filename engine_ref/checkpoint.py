"""Strict loading of the official checkpoint files.

gpt.pth is a state dict (or {"model": state dict}); bigvgan_generator.pth is {"generator": state dict} with
old-style weight norm. Both are read with `weights_only=True` (no pickle code execution) and memory-mapped, then
checked key by key against the published layout before anything is copied, so a mismatch names the key and the
expected and found shapes instead of surfacing as a PyTorch traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from engine_ref.errors import CheckpointError, ModelFilesError

_MAX_NAMES = 5


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with mmap and weights_only; unreadable files become ModelFilesError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"checkpoint {path} does not exist", f"run `triton-tts verify {path.parent}` to see what is missing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError/... for damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFilesError(
            f"checkpoint {path} cannot be read ({first[:160]})",
            f"re-download it; `triton-tts verify {path.parent}` checks every file",
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict", "use the official checkpoint file")
    return obj


def _names(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:_MAX_NAMES])
    return shown + (f" (+{len(keys) - _MAX_NAMES} more)" if len(keys) > _MAX_NAMES else "")


def check_against_layout(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Same key set and the same shape for every key, or a CheckpointError that names them."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
        raise CheckpointError(
            f"{source} does not match the architecture in config.yaml: " + "; ".join(parts),
            "use the config.yaml shipped with this checkpoint (model_dim, layers, heads, ...) or the matching checkpoint",
        )
    for key, shape in expected.items():
        found = tuple(state[key].shape)
        if found != tuple(shape):
            raise CheckpointError(
                f"{source}: key '{key}' has shape {list(found)}, the config expects {list(shape)}",
                "use the config.yaml shipped with this checkpoint, or the checkpoint matching this config",
            )


def checked_float32(state: Mapping, layout: Mapping, source: str, what: str, fix: str,
                    floats_only: bool = False) -> dict[str, torch.Tensor]:
    """`state` with exactly `layout`'s keys (values with a `.shape`, or shapes) and shapes, floats cast to fp32;
    a CheckpointError naming the missing / unexpected keys or the first wrong shape otherwise (a dependency's
    loader: `what` names the architecture, `fix` the file to use). `floats_only`: integer tensors are cast too."""
    missing = sorted(set(layout) - set(state))
    unexpected = sorted(set(state) - set(layout))
    if missing or unexpected:
        parts = [f"missing {len(missing)}: {', '.join(missing[:_MAX_NAMES])}"] if missing else []
        parts += [f"unexpected {len(unexpected)}: {', '.join(unexpected[:_MAX_NAMES])}"] if unexpected else []
        raise CheckpointError(f"{source} keys do not match {what} ({'; '.join(parts)})", fix)
    out: dict[str, torch.Tensor] = {}
    for key, spec in layout.items():
        t, shape = state[key], tuple(getattr(spec, "shape", spec))
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            found = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{source}: '{key}' has shape {found}, expected {list(shape)}", fix)
        out[key] = t.to(torch.float32) if floats_only or t.is_floating_point() else t
    return out


def to_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official files may store fp16/bf16 tensors; the reference engine computes in fp32."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def gpt_state_dict(raw: dict) -> dict:
    """Unwrap the {"model": ...} container upstream's loader also accepts."""
    inner = raw.get("model", raw)
    if not isinstance(inner, dict):
        raise CheckpointError("gpt.pth's 'model' entry is not a state dict", "use the official gpt.pth")
    return inner
