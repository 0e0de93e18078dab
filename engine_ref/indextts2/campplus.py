"""CAM++ speaker embedding (3D-Speaker / funasr ``campplus_cn_common.bin``): IndexTTS2's 192-d style vector.

IndexTTS2 calls ``CAMPPlus(feat_dim=80, embedding_size=192)`` on ``fbank - fbank.mean(time)`` of the 16 kHz
reference (kaldi fbank, 80 bins, dither 0; see fbank.py) and uses the [1, 192] output as the s2mel style and
for the emotion-matrix lookup. The checkpoint is a plain state dict loaded strictly, BatchNorm running stats
included. The architecture is fixed (no config): the tiny preset uses it at full size (~7 M parameters).

Network (config_str "batchnorm-relu" everywhere): FCM head (Conv2d 1->32 3x3, BN, ReLU, two stages of two
BasicResBlocks with frequency stride 2, Conv2d stride (2, 1), BN, ReLU; 80 bins -> 10, flattened to 320
channels) -> ``xvector``: tdnn (Conv1d 320->128 k5 stride 2 pad 2, BN, ReLU), three densely connected CAM
blocks (12 / 24 / 16 layers, growth 32, bottleneck 128, k3, dilation 1 / 2 / 2) each followed by a transit
layer (BN, ReLU, 1x1 conv halving the channels), BN+ReLU, statistics pooling (mean || unbiased std over time),
dense 1x1 conv 1024->192 and a non-affine BN. A CAM layer gates its local conv with
sigmoid(linear2(relu(linear1(mean_over_time + mean_over_100_frame_segment)))).

Differences from the original, deliberate:
- BatchNorm always uses the running statistics (inference only), whatever ``.train()`` says.
- Optional ``lengths`` (valid fbank frames per row, int [B]) make right-padded batches exact: the inputs of every
  conv that mixes time are zeroed past each row's end (equivalent to the zero padding an unpadded row gets), and
  the time mean, the 100-frame segment means and the statistics pooling count only valid frames. Each row then
  equals its unpadded run within float rounding. ``lengths=None`` is the original computation.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine_ref.checkpoint import checked_float32, read_checkpoint
from engine_ref.errors import InputError
from engine_ref.layout import Layout, TensorSpec

__all__ = ["CAMPPlus", "campplus_layout", "load_campplus", "load_campplus_state", "campplus_style",
           "FEAT_DIM", "EMBEDDING_SIZE"]

FEAT_DIM = 80
EMBEDDING_SIZE = 192
M_CHANNELS = 32  # FCM width
FCM_BLOCKS = (2, 2)
INIT_CHANNELS = 128
GROWTH = 32
BN_SIZE = 4  # bottleneck = BN_SIZE * GROWTH = 128
BLOCKS = ((12, 3, 1), (24, 3, 2), (16, 3, 2))  # (layers, kernel, dilation) of block1..3
SEG_LEN = 100  # CAM segment pooling
BN_EPS = 1e-5


# ---- masking helpers (all no-ops when mask is None) ----

def _apply(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _frame_mask(lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, frames] (1.0 for frames < length) on `like`'s device/dtype, frames = like.shape[-1]."""
    lengths = lengths.to(like.device)
    frames = torch.arange(like.shape[-1], device=like.device)
    return (frames[None, :] < lengths[:, None]).to(like.dtype).unsqueeze(1)


def _time_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(-1, keepdim=True)
    return (x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)


def _segment_means(x: torch.Tensor, mask: torch.Tensor | None, seg_len: int = SEG_LEN) -> torch.Tensor:
    """Mean of each `seg_len`-frame segment, broadcast back to every frame of it (the original's seg_pooling).

    Unmasked: avg_pool1d(ceil_mode=True), whose last, partial window averages only the frames it covers.
    Masked: the same averages over valid frames only (segments past a row's end give 0 and are never used).
    """
    frames = x.shape[-1]
    if mask is None:
        seg = F.avg_pool1d(x, kernel_size=seg_len, stride=seg_len, ceil_mode=True)
    else:
        pad = (-frames) % seg_len
        xs = F.pad(x * mask, (0, pad)).unflatten(-1, (-1, seg_len)).sum(-1)
        count = F.pad(mask, (0, pad)).unflatten(-1, (-1, seg_len)).sum(-1)
        seg = xs / count.clamp(min=1.0)
    return seg.unsqueeze(-1).expand(*seg.shape, seg_len).flatten(-2)[..., :frames]


def _stats(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """mean || unbiased std over time: [B, C, T] -> [B, 2C]."""
    if mask is None:
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)
    n = mask.sum(-1)
    mean = (x * mask).sum(-1) / n
    var = (((x - mean.unsqueeze(-1)) * mask) ** 2).sum(-1) / (n - 1)
    return torch.cat([mean, torch.sqrt(var)], dim=-1)


# ---- layers (names reproduce the checkpoint keys) ----

class FrozenBatchNorm(nn.Module):
    """BatchNorm (1d or 2d alike) that always uses running statistics; same parameter/buffer names as torch's."""

    def __init__(self, channels: int, affine: bool = True, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BNReLU(nn.Module):
    """``get_nonlinear('batchnorm-relu')``: keys ``<name>.batchnorm.*`` (ReLU holds nothing)."""

    def __init__(self, channels: int):
        super().__init__()
        self.batchnorm = FrozenBatchNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.batchnorm(x))


class BasicResBlock(nn.Module):
    """2-D residual block; stride acts on the frequency axis only. Input/output [B, C, F, T]."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = FrozenBatchNorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          FrozenBatchNorm(planes))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(_apply(x, mask))))
        out = self.bn2(self.conv2(_apply(out, mask)))
        return F.relu(out + self.shortcut(x))


class FCM(nn.Module):
    """Front 2-D conv module: [B, F, T] -> [B, 32 * F/8, T]."""

    def __init__(self, feat_dim: int = FEAT_DIM, m_channels: int = M_CHANNELS):
        super().__init__()
        self.conv1 = nn.Conv2d(1, m_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm(m_channels)
        self.layer1 = nn.Sequential(BasicResBlock(m_channels, m_channels, 2),
                                    *[BasicResBlock(m_channels, m_channels, 1) for _ in range(FCM_BLOCKS[0] - 1)])
        self.layer2 = nn.Sequential(BasicResBlock(m_channels, m_channels, 2),
                                    *[BasicResBlock(m_channels, m_channels, 1) for _ in range(FCM_BLOCKS[1] - 1)])
        self.conv2 = nn.Conv2d(m_channels, m_channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = FrozenBatchNorm(m_channels)
        self.out_channels = m_channels * (feat_dim // 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m2 = None if mask is None else mask.unsqueeze(1)  # [B, 1, 1, T]
        out = F.relu(self.bn1(self.conv1(_apply(x.unsqueeze(1), m2))))
        for block in list(self.layer1) + list(self.layer2):
            out = block(out, m2)
        out = F.relu(self.bn2(self.conv2(_apply(out, m2))))
        return out.flatten(1, 2)


class TDNNLayer(nn.Module):
    """Conv1d (no bias) -> BN -> ReLU; the xvector's first layer (k5, stride 2, "same" padding 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, dilation: int = 1):
        super().__init__()
        pad = (kernel_size - 1) // 2 * dilation
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=pad,
                                dilation=dilation, bias=False)
        self.nonlinear = BNReLU(out_channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.nonlinear(self.linear(_apply(x, mask)))


class CAMLayer(nn.Module):
    """Context-aware masking: local conv gated by a sigmoid of global + segment context."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int, reduction: int = 2):
        super().__init__()
        pad = (kernel_size - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size, padding=pad, dilation=dilation,
                                      bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // reduction, 1)
        self.linear2 = nn.Conv1d(bn_channels // reduction, out_channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.linear_local(_apply(x, mask))
        context = _time_mean(x, mask) + _segment_means(x, mask)
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return y * gate


class CAMDenseTDNNLayer(nn.Module):
    """BN-ReLU -> 1x1 bottleneck -> BN-ReLU -> CAM layer; output `growth` channels appended by the block."""

    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.nonlinear1 = BNReLU(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = BNReLU(bn_channels)
        self.cam_layer = CAMLayer(bn_channels, out_channels, kernel_size, dilation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))), mask)


class CAMDenseTDNNBlock(nn.Module):
    """Densely connected CAM layers ``tdnnd1..N``: each sees the concatenation of all previous outputs."""

    def __init__(self, num_layers: int, in_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.num_layers = num_layers
        for i in range(num_layers):
            self.add_module(f"tdnnd{i + 1}", CAMDenseTDNNLayer(in_channels + i * GROWTH, GROWTH, BN_SIZE * GROWTH,
                                                               kernel_size, dilation))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x, mask)], dim=1)
        return x


class TransitLayer(nn.Module):
    """BN-ReLU -> 1x1 conv (no bias) halving the channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = BNReLU(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    """1x1 conv (no bias) on the pooled vector -> non-affine BN (``nonlinear.batchnorm``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nn.Module()
        self.nonlinear.batchnorm = FrozenBatchNorm(out_channels, affine=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.nonlinear.batchnorm(self.linear(pooled.unsqueeze(-1)).squeeze(-1))


class XVector(nn.Module):
    """``xvector``: tdnn, block1, transit1, ..., out_nonlinear, (stats), dense; in checkpoint order."""

    def __init__(self, in_channels: int, embedding_size: int):
        super().__init__()
        self.tdnn = TDNNLayer(in_channels, INIT_CHANNELS, 5, stride=2)
        channels = INIT_CHANNELS
        for i, (layers, kernel, dilation) in enumerate(BLOCKS, start=1):
            self.add_module(f"block{i}", CAMDenseTDNNBlock(layers, channels, kernel, dilation))
            channels += layers * GROWTH
            self.add_module(f"transit{i}", TransitLayer(channels, channels // 2))
            channels //= 2
        self.out_nonlinear = BNReLU(channels)
        self.dense = DenseLayer(channels * 2, embedding_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if lengths is None else _frame_mask(lengths, x)
        x = self.tdnn(x, mask)
        if lengths is not None:  # k5, stride 2, pad 2: ceil(L / 2) outputs per row
            mask = _frame_mask((lengths + 1) // 2, x)
        for i in range(1, len(BLOCKS) + 1):
            x = getattr(self, f"transit{i}")(getattr(self, f"block{i}")(x, mask))
        return self.dense(_stats(self.out_nonlinear(x), mask))


class CAMPPlus(nn.Module):
    """fbank [B, T, 80] (mean-normalised over time) -> speaker/style embedding [B, 192]."""

    def __init__(self, feat_dim: int = FEAT_DIM, embedding_size: int = EMBEDDING_SIZE):
        super().__init__()
        self.head = FCM(feat_dim)
        self.xvector = XVector(self.head.out_channels, embedding_size)

    def forward(self, fbank: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if fbank.dim() != 3 or fbank.shape[-1] != FEAT_DIM:
            raise InputError(f"CAMPPlus expects fbank [batch, frames, {FEAT_DIM}], got {list(fbank.shape)}",
                             "compute an 80-bin kaldi fbank of the 16 kHz reference")
        x = fbank.transpose(1, 2)  # [B, F, T]
        mask = None if lengths is None else _frame_mask(lengths, x)
        return self.xvector(self.head(x, mask), lengths)


def campplus_style(model: CAMPPlus, fbank: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Upstream's style: ``campplus(fbank - fbank.mean(time))``; fbank [T, 80] or [B, T, 80] -> [B, 192].

    With `lengths`, each row's mean is over its valid frames and padded frames are zeroed.
    """
    if fbank.dim() == 2:
        fbank = fbank.unsqueeze(0)
    if lengths is None:
        return model(fbank - fbank.mean(dim=1, keepdim=True))
    mask = _frame_mask(lengths, fbank.transpose(1, 2)).transpose(1, 2)  # [B, T, 1]
    mean = (fbank * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return model((fbank - mean) * mask, lengths)


# ---- published layout (independent of the modules above) ----

def _bn(layout: Layout, name: str, channels: int, affine: bool = True) -> None:
    """BatchNorm entries with preset values near neutral (running stats not exactly 0/1 so wiring shows)."""
    if affine:
        layout[f"{name}.weight"] = TensorSpec((channels,), init="normal", mean=1.0, std=0.05)
        layout[f"{name}.bias"] = TensorSpec((channels,), init="normal", std=0.05)
    layout[f"{name}.running_mean"] = TensorSpec((channels,), init="normal", std=0.1)
    layout[f"{name}.running_var"] = TensorSpec((channels,), init="uniform", low=0.5, high=1.5)
    layout[f"{name}.num_batches_tracked"] = TensorSpec((), init="fixed", value=lambda: torch.tensor(0))


def _he(shape: tuple[int, ...]) -> TensorSpec:
    """Convs followed by ReLU: std sqrt(2 / fan_in) keeps activations O(1) through 60 layers."""
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return TensorSpec(shape, std=(2.0 / fan_in) ** 0.5)


def campplus_layout(feat_dim: int = FEAT_DIM, embedding_size: int = EMBEDDING_SIZE) -> Layout:
    """campplus_cn_common.bin: key -> TensorSpec (``.shape`` + preset init), from the published structure."""
    layout: Layout = {}
    m = M_CHANNELS
    layout["head.conv1.weight"] = _he((m, 1, 3, 3))
    _bn(layout, "head.bn1", m)
    for stage, blocks in (("layer1", FCM_BLOCKS[0]), ("layer2", FCM_BLOCKS[1])):
        for j in range(blocks):
            b = f"head.{stage}.{j}"
            layout[f"{b}.conv1.weight"] = _he((m, m, 3, 3))
            _bn(layout, f"{b}.bn1", m)
            layout[f"{b}.conv2.weight"] = _he((m, m, 3, 3))
            _bn(layout, f"{b}.bn2", m)
            if j == 0:  # stride 2 -> projection shortcut
                layout[f"{b}.shortcut.0.weight"] = _he((m, m, 1, 1))
                _bn(layout, f"{b}.shortcut.1", m)
    layout["head.conv2.weight"] = _he((m, m, 3, 3))
    _bn(layout, "head.bn2", m)
    channels = m * (feat_dim // 8)
    layout["xvector.tdnn.linear.weight"] = _he((INIT_CHANNELS, channels, 5))
    _bn(layout, "xvector.tdnn.nonlinear.batchnorm", INIT_CHANNELS)
    channels = INIT_CHANNELS
    bottleneck = BN_SIZE * GROWTH
    for i, (layers, kernel, _dilation) in enumerate(BLOCKS, start=1):
        for n in range(layers):
            p = f"xvector.block{i}.tdnnd{n + 1}"
            width = channels + n * GROWTH
            _bn(layout, f"{p}.nonlinear1.batchnorm", width)
            layout[f"{p}.linear1.weight"] = _he((bottleneck, width, 1))
            _bn(layout, f"{p}.nonlinear2.batchnorm", bottleneck)
            layout[f"{p}.cam_layer.linear_local.weight"] = TensorSpec((GROWTH, bottleneck, kernel))
            layout[f"{p}.cam_layer.linear1.weight"] = _he((bottleneck // 2, bottleneck, 1))
            layout[f"{p}.cam_layer.linear1.bias"] = TensorSpec((bottleneck // 2,), init="normal", std=0.05)
            layout[f"{p}.cam_layer.linear2.weight"] = TensorSpec((GROWTH, bottleneck // 2, 1))
            layout[f"{p}.cam_layer.linear2.bias"] = TensorSpec((GROWTH,), init="normal", std=0.05)
        channels += layers * GROWTH
        _bn(layout, f"xvector.transit{i}.nonlinear.batchnorm", channels)
        layout[f"xvector.transit{i}.linear.weight"] = TensorSpec((channels // 2, channels, 1))
        channels //= 2
    _bn(layout, "xvector.out_nonlinear.batchnorm", channels)
    layout["xvector.dense.linear.weight"] = TensorSpec((embedding_size, channels * 2, 1))
    _bn(layout, "xvector.dense.nonlinear.batchnorm", embedding_size, affine=False)
    return layout


# ---- loading ----

def load_campplus_state(module: CAMPPlus, state: dict, source: str = "CAMPPlus checkpoint") -> CAMPPlus:
    """Check `state` against the published layout (names, shapes), cast floats to fp32, load strictly."""
    layout = campplus_layout()
    fix = "use funasr/campplus campplus_cn_common.bin (a plain CAMPPlus(80, 192) state dict)"
    module.load_state_dict(checked_float32(state, layout, source, "CAMPPlus", fix), strict=True)
    return module


def load_campplus(path: str | Path) -> CAMPPlus:
    """CAMPPlus from campplus_cn_common.bin (torch.load weights_only, strict; named errors), eval mode, fp32."""
    raw = read_checkpoint(path)
    return load_campplus_state(CAMPPlus(), raw, Path(path).name).eval()
