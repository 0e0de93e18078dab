"""The official on-disk checkpoint layouts, written from the published key names and shapes.

This package is deliberately independent of the nn.Modules in `engine_ref.modules`: presets write model
directories from these tables, and the tests load those directories strictly into the modules, so a key or shape
that drifts on either side fails loudly. Each entry also says how a preset fills the tensor with deterministic
random (or fixed) values that keep the random model's outputs non-degenerate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint entry.

    init: "normal" (std, default 1/sqrt(fan_in) with fan_in = prod(shape[1:])), "zeros", "ones",
    "uniform" (in [low, high)), or "fixed" (value() gives the exact tensor, e.g. a stored sinusoid or
    an anti-aliasing filter).
    """

    shape: tuple[int, ...]
    init: str = "normal"
    std: float | None = None
    low: float = 0.0
    high: float = 1.0
    mean: float = 0.0
    value: Callable[[], torch.Tensor] | None = None


Layout = dict[str, TensorSpec]


def _key_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so adding or reordering keys never changes the values of the others."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def materialize_tensor(name: str, spec: TensorSpec, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The deterministic value of one checkpoint entry."""
    if spec.init == "fixed":
        if spec.value is None:
            raise ValueError(f"{name}: init 'fixed' needs a value")
        out = spec.value()
        if tuple(out.shape) != tuple(spec.shape):
            raise ValueError(f"{name}: fixed value has shape {tuple(out.shape)}, spec says {spec.shape}")
        return out if not out.is_floating_point() else out.to(dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    gen = torch.Generator().manual_seed(_key_seed(seed, name))
    if spec.init == "uniform":
        return (torch.rand(spec.shape, generator=gen) * (spec.high - spec.low) + spec.low).to(dtype)
    if spec.init == "normal":
        std = spec.std
        if std is None:
            fan_in = 1
            for d in spec.shape[1:]:
                fan_in *= d
            std = fan_in**-0.5
        return (torch.randn(spec.shape, generator=gen) * std + spec.mean).to(dtype)
    raise ValueError(f"{name}: unknown init {spec.init!r}")


def materialize(layout: Layout, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic tensors for every entry of a layout (used by presets and tests)."""
    return {name: materialize_tensor(name, spec, seed, dtype) for name, spec in layout.items()}
