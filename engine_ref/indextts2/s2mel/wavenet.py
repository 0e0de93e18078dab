"""WaveNet final layer of the s2mel DiT (VITS-style WN over encodec SConv1d convolutions).

Upstream builds every conv as ``SConv1d(norm='weight_norm')``, which pads the input ITSELF with reflect padding
(the ``padding=`` argument WN passes is swallowed and ignored) and, for inputs not longer than the padding, first
appends zeros so the reflection is defined. Gates are tanh(a) * sigmoid(b) of (conv(x) + cond), first half tanh.

Batch rows may be padded: reflect padding is applied at each row's OWN end (``x_lens``), by gathering the padded
input with per-row indices. For a full-length row this is exactly ``F.pad(x, (left, right), mode='reflect')``, so
a padded row gives its solo result on its valid frames; everything is plain gather/where/conv1d (ONNX-friendly).
"""

from __future__ import annotations

import torch
from torch import nn


class _Conv(nn.Module):
    """NormConv1d's place in the key path: holds ``.conv`` (the weight-norm folded nn.Conv1d)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel, dilation=dilation)


def reflect_source_index(x_lens: torch.Tensor, frames: int, left: int, right: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, which input frame feeds each of the ``frames + left + right`` padded positions.

    Mirrors encodec's ``pad1d(mode='reflect')`` at the row's own length L: a row no longer than the largest pad is
    first extended with zeros to max_pad + 1 frames, then reflected. Returns (index [B, P] clamped into range,
    valid [B, P] False where the padded value is a zero).
    """
    lens = x_lens.to(torch.int64).unsqueeze(1)  # [B, 1]
    pos = torch.arange(frames + left + right, device=x_lens.device, dtype=torch.int64).unsqueeze(0) - left
    ext = torch.clamp(lens, min=max(left, right) + 1)  # length after encodec's zero extension
    src = torch.where(pos < 0, -pos, pos)
    src = torch.where(src >= ext, 2 * (ext - 1) - src, src)
    valid = (src >= 0) & (src < lens)
    return torch.clamp(src, 0, frames - 1), valid


class ReflectConv1d(nn.Module):
    """SConv1d (non-causal, stride 1): reflect padding of the effective kernel split right = total // 2."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int = 1):
        super().__init__()
        self.conv = _Conv(in_ch, out_ch, kernel, dilation)
        total = (kernel - 1) * dilation
        self.right = total // 2
        self.left = total - self.right

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor) -> torch.Tensor:
        if self.left == 0 and self.right == 0:
            return self.conv.conv(x)
        index, valid = reflect_source_index(x_lens, x.shape[-1], self.left, self.right)
        gathered = torch.gather(x, 2, index.unsqueeze(1).expand(x.shape[0], x.shape[1], index.shape[1]))
        padded = torch.where(valid.unsqueeze(1), gathered, torch.zeros_like(gathered))
        return self.conv.conv(padded)


class WaveNet(nn.Module):
    """WN(hidden, kernel, dilation_rate, n_layers, gin_channels=hidden): residual gated convs with a skip sum."""

    def __init__(self, hidden: int, kernel: int, dilation_rate: int, n_layers: int, cond_channels: int):
        super().__init__()
        self.hidden = hidden
        self.n_layers = n_layers
        self.cond_layer = ReflectConv1d(cond_channels, 2 * hidden * n_layers, 1)
        self.in_layers = nn.ModuleList(
            ReflectConv1d(hidden, 2 * hidden, kernel, dilation=dilation_rate**i) for i in range(n_layers)
        )
        self.res_skip_layers = nn.ModuleList(
            ReflectConv1d(hidden, 2 * hidden if i < n_layers - 1 else hidden, 1) for i in range(n_layers)
        )

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, x_lens: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """x [B, H, T], x_mask [B, 1, T] (bool), x_lens [B], g [B, cond, 1] -> [B, H, T] (masked)."""
        output = torch.zeros_like(x)
        g = self.cond_layer(g, x_lens)
        h = self.hidden
        for i in range(self.n_layers):
            x_in = self.in_layers[i](x, x_lens)
            pre = x_in + g[:, i * 2 * h : (i + 1) * 2 * h, :]
            acts = torch.tanh(pre[:, :h]) * torch.sigmoid(pre[:, h:])
            res_skip = self.res_skip_layers[i](acts, x_lens)
            if i < self.n_layers - 1:
                x = (x + res_skip[:, :h]) * x_mask
                output = output + res_skip[:, h:]
            else:
                output = output + res_skip
        return output * x_mask
