"""InterpolateRegulator (continuous input): semantic features -> content condition at the mel frame rate.

Upstream: content_in_proj, nearest interpolation of the whole sequence to ``ylens.max()`` frames, then
[Conv1d k3 p1, GroupNorm(1, C), Mish] x len(sampling_ratios), a 1x1 Conv1d, times the frame mask.

Here every row is resampled to ITS OWN target length (upstream stretches all rows to the longest, which only
matters for B > 1, never used upstream) and the conv stack sees zeros beyond each row's end with GroupNorm
statistics over its valid frames only. For a full-length row both are exactly upstream's operations (the nearest
index is torch's own float32 formula floor(j * (in / out)), clamped); for a padded row they reproduce its solo run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_ref.indextts2.s2mel.config import LengthRegulatorConfig

GROUP_NORM_EPS = 1e-5


def nearest_source_index(src_lens: torch.Tensor, out_lens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, T] source frame of each output frame j in ``positions`` ([T] int): min(floor(j * float32(in / out)), in - 1).

    Same float32 arithmetic as ATen's nearest interpolation with an explicit output size (scale = in / out computed
    in float, index = floorf(j * scale)); frames past a row's target get an in-range dummy index.
    """
    src = src_lens.to(torch.float32).unsqueeze(1)
    out = torch.clamp(out_lens, min=1).to(torch.float32).unsqueeze(1)
    idx = torch.floor(positions.to(torch.float32).unsqueeze(0) * (src / out)).to(torch.int64)
    upper = torch.clamp(src_lens.to(torch.int64).unsqueeze(1) - 1, min=0)
    return torch.minimum(idx, upper)


class MaskedGroupNorm1(nn.GroupNorm):
    """GroupNorm(1, C) over a row's valid frames only (biased variance, eps 1e-5, then the affine)."""

    def __init__(self, channels: int):
        super().__init__(1, channels, eps=GROUP_NORM_EPS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [B, C, T], mask [B, 1, T] float
        count = mask.sum(dim=(1, 2), keepdim=True) * x.shape[1]
        mean = (x * mask).sum(dim=(1, 2), keepdim=True) / count
        centered = (x - mean) * mask
        var = (centered * centered).sum(dim=(1, 2), keepdim=True) / count
        normed = (x - mean) * torch.rsqrt(var + self.eps)
        return normed * self.weight[None, :, None] + self.bias[None, :, None]


class LengthRegulator(nn.Module):
    """forward(x [B, N, in_channels], x_lens [B], ylens [B]) -> [B, max(ylens), channels] (zeros past ylens)."""

    def __init__(self, cfg: LengthRegulatorConfig):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = []
        for _ in cfg.sampling_ratios:
            layers += [nn.Conv1d(c, c, 3, 1, 1), MaskedGroupNorm1(c), nn.Mish()]
        layers.append(nn.Conv1d(c, c, 1, 1))
        self.model = nn.Sequential(*layers)  # keys model.{0,3,..} conv, {1,4,..} norm, last 1x1
        self.embedding = nn.Embedding(cfg.content_codebook_size, c)  # discrete input only: stored, never run
        self.mask_token = nn.Parameter(torch.zeros(1, c))  # stored, never run
        self.content_in_proj = nn.Linear(cfg.in_channels, c)

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor, ylens: torch.Tensor) -> torch.Tensor:
        h = self.content_in_proj(x)  # [B, N, C]
        positions = torch.arange(ylens.max(), device=x.device)
        index = nearest_source_index(x_lens, ylens, positions)  # [B, T]
        h = torch.gather(h, 1, index.unsqueeze(2).expand(-1, -1, h.shape[2])).transpose(1, 2)  # [B, C, T]
        mask = (positions.unsqueeze(0) < ylens.unsqueeze(1)).unsqueeze(1).to(h.dtype)  # [B, 1, T]
        for layer in self.model:
            if isinstance(layer, nn.Conv1d):
                h = layer(h * mask)
            elif isinstance(layer, MaskedGroupNorm1):
                h = layer(h, mask)
            else:
                h = layer(h)
        return (h * mask).transpose(1, 2)
