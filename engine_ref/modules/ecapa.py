"""ECAPA-TDNN speaker encoder inside IndexTTS's BigVGAN (speechbrain layout, inference only).

The vocoder conditions every upsampling stage on a speaker embedding computed from the reference log-mel. The
checkpoint was written by speechbrain-style wrappers, so the key names nest twice (``blocks.0.conv.conv.weight``,
``blocks.0.norm.norm.running_mean``); the small wrapper modules below exist only to reproduce those names.

Differences from the original, all deliberate:
- BatchNorm always uses its running statistics (inference only), whatever ``.train()`` says: a train-mode BN
  would silently compute batch statistics and change the embedding.
- Optional ``lengths`` (absolute frame counts, int [B]) mask the squeeze-excitation means and the attentive
  statistics pooling, so right-padded batches pool only real frames. The original ignores lengths entirely
  (every frame counts); ``lengths=None`` reproduces it exactly. Padding still leaks through the convolutions near
  the end of each shorter row (kernels up to 5 wide, dilations up to 4, and "same" reflect padding applied at the
  padded tensor's edge, not the row's), so a padded row's embedding differs slightly from the unpadded one; run
  unbatched when bit parity with the original matters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Hard-coded in the original (only lin_neurons comes from config.yaml).
CHANNELS = (512, 512, 512, 512, 1536)
KERNEL_SIZES = (5, 3, 3, 3, 1)
DILATIONS = (1, 2, 3, 4, 1)
ATTENTION_CHANNELS = 128
RES2NET_SCALE = 8
SE_CHANNELS = 128
BN_EPS = 1e-5
STATS_EPS = 1e-12

# "same" reflect padding needs more frames than the widest half-receptive field of one conv (dilation 4, k 3).
MIN_FRAMES = max((k - 1) * d // 2 for k, d in zip(KERNEL_SIZES, DILATIONS)) + 1


class SameConv1d(nn.Module):
    """Stride-1 conv with symmetric reflect padding that keeps the length (speechbrain's "same" mode).

    Holds the real conv as `.conv` so the key is `<name>.conv.weight` like the checkpoint's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError("same padding needs an odd kernel")
        self.pad = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad, self.pad), mode="reflect")
        return self.conv(x)


class FrozenBatchNorm1d(nn.Module):
    """BatchNorm1d that always normalises with the stored running statistics.

    Same parameter/buffer names as nn.BatchNorm1d (weight, bias, running_mean, running_var, num_batches_tracked),
    so it loads the checkpoint's entries unchanged.
    """

    def __init__(self, channels: int, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _NormWrap(nn.Module):
    """Gives the `<name>.norm.<param>` nesting of the checkpoint."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = FrozenBatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class TDNNBlock(nn.Module):
    """conv -> ReLU -> BatchNorm (this order: the norm comes after the activation in the original)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv = SameConv1d(in_channels, out_channels, kernel_size, dilation)
        self.norm = _NormWrap(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.conv(x)))


class Res2NetBlock(nn.Module):
    """Splits channels into `scale` groups; group i>1 sees group i plus the previous group's output (hierarchical)."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int):
        super().__init__()
        if channels % scale:
            raise ValueError("channels must divide by the res2net scale")
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList([TDNNBlock(width, width, kernel_size, dilation) for _ in range(scale - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(x, self.scale, dim=1)
        outs = [parts[0]]
        prev = parts[0]
        for i, block in enumerate(self.blocks):
            inp = parts[i + 1] if i == 0 else parts[i + 1] + prev
            prev = block(inp)
            outs.append(prev)
        return torch.cat(outs, dim=1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over time [B, C, 1]; with a [B, 1, T] 0/1 mask, over the valid frames only."""
    if mask is None:
        return x.mean(dim=2, keepdim=True)
    return (x * mask).sum(dim=2, keepdim=True) / mask.sum(dim=2, keepdim=True)


class SEBlock(nn.Module):
    """Squeeze-excitation: per-channel gates from the time-averaged features."""

    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = SameConv1d(channels, se_channels, 1)
        self.conv2 = SameConv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = torch.relu(self.conv1(_masked_mean(x, mask)))
        return torch.sigmoid(self.conv2(s)) * x


class SERes2NetBlock(nn.Module):
    """TDNN(1x1) -> Res2Net -> TDNN(1x1) -> SE, plus the identity residual (in == out channels here)."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.tdnn1 = TDNNBlock(channels, channels, 1, 1)
        self.res2net_block = Res2NetBlock(channels, RES2NET_SCALE, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(channels, channels, 1, 1)
        self.se_block = SEBlock(channels, SE_CHANNELS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.tdnn2(self.res2net_block(self.tdnn1(x)))
        return self.se_block(y, mask) + x


def _weighted_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and std over time; w sums to 1 along time. std is clamped for a stable sqrt."""
    mean = (w * x).sum(dim=2)
    var = (w * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)
    return mean, torch.sqrt(var.clamp(STATS_EPS))


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling with global context: [B, C, T] -> [B, 2C, 1] (weighted mean ++ std).

    The attention sees each frame next to the utterance-level mean and std, so it can weigh frames relative to the
    whole utterance.
    """

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TDNNBlock(channels * 3, attention_channels, 1, 1)
        self.conv = SameConv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        frames = x.shape[-1]
        if mask is None:
            mask = torch.ones(x.shape[0], 1, frames, dtype=x.dtype, device=x.device)
        uniform = mask / mask.sum(dim=2, keepdim=True)
        mean, std = _weighted_stats(x, uniform)
        context = torch.cat(
            [x, mean.unsqueeze(2).expand(-1, -1, frames), std.unsqueeze(2).expand(-1, -1, frames)], dim=1
        )
        scores = self.conv(torch.tanh(self.tdnn(context)))
        scores = scores.masked_fill(mask == 0, float("-inf"))
        mean, std = _weighted_stats(x, torch.softmax(scores, dim=2))
        return torch.cat([mean, std], dim=1).unsqueeze(2)


class ECAPATDNN(nn.Module):
    """Log-mel [B, frames, n_mels] -> speaker embedding [B, embedding_dim, 1] (channels-first, ready for 1x1 convs).

    The original returns [B, 1, D] and the vocoder transposes it to [B, D, 1] straight away; we return the
    conv-ready layout directly.
    """

    def __init__(self, n_mels: int, embedding_dim: int):
        super().__init__()
        self.n_mels = n_mels
        self.embedding_dim = embedding_dim
        blocks: list[nn.Module] = [TDNNBlock(n_mels, CHANNELS[0], KERNEL_SIZES[0], DILATIONS[0])]
        for i in range(1, len(CHANNELS) - 1):
            blocks.append(SERes2NetBlock(CHANNELS[i], KERNEL_SIZES[i], DILATIONS[i]))
        self.blocks = nn.ModuleList(blocks)
        self.mfa = TDNNBlock(CHANNELS[-2] * (len(CHANNELS) - 2), CHANNELS[-1], KERNEL_SIZES[-1], DILATIONS[-1])
        self.asp = AttentiveStatsPool(CHANNELS[-1], ATTENTION_CHANNELS)
        self.asp_bn = _NormWrap(CHANNELS[-1] * 2)
        self.fc = SameConv1d(CHANNELS[-1] * 2, embedding_dim, 1)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """mel: [B, frames, n_mels]; lengths: optional int [B] valid frame counts (see the module docstring)."""
        x = mel.transpose(1, 2)
        mask = None
        if lengths is not None:
            frames = torch.arange(x.shape[-1], device=x.device)
            mask = (frames.unsqueeze(0) < lengths.to(x.device).unsqueeze(1)).unsqueeze(1).to(x.dtype)
        x = self.blocks[0](x)
        stage_outputs = []
        for block in self.blocks[1:]:
            x = block(x, mask)
            stage_outputs.append(x)
        x = self.mfa(torch.cat(stage_outputs, dim=1))
        x = self.asp_bn(self.asp(x, mask))
        return self.fc(x)
