"""The Conformer encoder of IndexTTS 1.x's speech conditioning path (``conditioning_encoder.*`` in gpt.pth).

Reference log-mel frames [B, T, 100] -> 2x subsampled hidden states [B, T', D] plus their validity mask. The
attribute names mirror the official checkpoint keys so `load_state_dict(strict=True)` works unchanged.

Faithfulness notes (each one changes numbers if done the "textbook" way):
- relative-position attention WITHOUT rel_shift: the position term scores query i against the absolute
  sinusoid of key j (IndexTTS trained it that way);
- the positional table `embed.pos_enc.pe` is a stored buffer (bf16-rounded in the official file); the
  embedding scales x by sqrt(D) but never adds the table to x: positions enter only via linear_pos;
- pre-norm blocks (attention, convolution, feed-forward, then norm_final), no macaron feed-forward, SiLU,
  symmetric depthwise convolution, LayerNorm eps 1e-5, no dropout.

Batch independence: every padded frame is masked out of attention keys and zeroed around the depthwise
convolution, so a padded batch gives each item's solo result. Upstream zeroes only before pointwise_conv1 and
after pointwise_conv2, which leaks glu(bias) from padded frames into the last valid ones in a padded batch; we
also zero after the GLU. With one unpadded item (how IndexTTS conditions) that extra mask is a no-op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine_ref.modules.configs import ConditionModuleConfig
from engine_ref.errors import ConfigError, InputError

# Fixed by the upstream architecture, not by config.yaml.
POS_TABLE_ROWS = 5000  # rows of embed.pos_enc.pe
CONV_KERNEL = 15  # depthwise kernel of the convolution module
LN_EPS = 1e-5
MIN_MEL_FRAMES = 3  # the 3x3 stride-2 subsampling needs 3 frames for one output frame
MEL_FRAMES_PER_STEP = 2  # time subsampling factor of conv2d2


def sinusoid_table(rows: int, dim: int) -> torch.Tensor:
    """[1, rows, dim] sin/cos table (even channels sin, odd cos), as the encoder was trained with."""
    position = torch.arange(rows, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(rows, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table.unsqueeze(0)


def _exporting() -> bool:
    """True while traced/exported: value checks that need a host sync are skipped then."""
    return bool(
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


class ScaledPositions(nn.Module):
    """Holds the stored position table; scales x by sqrt(D) and hands back the first T' rows separately."""

    def __init__(self, dim: int, rows: int = POS_TABLE_ROWS):
        super().__init__()
        self.xscale = math.sqrt(dim)
        # Persistent: the checkpoint's (bf16-rounded) copy replaces this exact one on load.
        self.register_buffer("pe", sinusoid_table(rows, dim), persistent=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.xscale, self.pe[:, : x.size(1)].to(x.dtype)


class ConvSubsample2x(nn.Module):
    """Conv2d(1, D, 3, stride 2) + ReLU over (time, mel), flatten (channel-major) -> Linear: T' = (T - 1) // 2."""

    def __init__(self, in_bins: int, dim: int, pos_rows: int = POS_TABLE_ROWS):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, dim, 3, 2), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(dim * ((in_bins - 1) // 2), dim))
        self.pos_enc = ScaledPositions(dim, pos_rows)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, T, bins] -> (x [B, T', D] scaled by sqrt(D), positions [1, T', D])."""
        x = self.conv(mel.unsqueeze(1))  # [B, D, T', F']
        x = x.transpose(1, 2).flatten(2)  # [B, T', D * F']
        return self.pos_enc(self.out(x))


class RelPositionSelfAttention(nn.Module):
    """Transformer-XL style attention (content + position terms with biases u, v), rel_shift NOT applied."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.d_k = dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.size(0), -1, self.heads, self.d_k)  # [B, T, H, d_k]

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], key_mask [B, 1, T] (True = valid frame), pos [1, T, D] -> [B, T, D]."""
        q = self._split(self.linear_q(x))
        k = self._split(self.linear_k(x)).transpose(1, 2)
        v = self._split(self.linear_v(x)).transpose(1, 2)
        p = self._split(self.linear_pos(pos)).transpose(1, 2)  # [1, H, T, d_k]
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))
        position = torch.matmul(q_v, p.transpose(-2, -1))  # key j's absolute position: no rel_shift
        scores = (content + position) / math.sqrt(self.d_k)
        blocked = ~key_mask.unsqueeze(1)  # [B, 1, 1, T]
        # finfo.min instead of -inf: same weights, but a row with no valid key gives 0 rather than NaN.
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(weights, v).transpose(1, 2)  # [B, T, H, d_k]
        return self.linear_out(out.reshape(out.size(0), -1, self.heads * self.d_k))


class FeedForward(nn.Module):
    """Position-wise D -> units -> D with SiLU."""

    def __init__(self, dim: int, units: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, units)
        self.w_2 = nn.Linear(units, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConvModule(nn.Module):
    """Pointwise conv -> GLU -> depthwise conv (symmetric, k=15) -> LayerNorm -> SiLU -> pointwise conv.

    mask_after_glu=False reproduces upstream exactly (padded frames carry glu(bias) into the depthwise conv); it
    only matters when a frame is masked, e.g. IndexTTS2 at REL with a reference longer than its length quirk.
    """

    def __init__(self, dim: int, kernel: int = CONV_KERNEL, mask_after_glu: bool = True):
        super().__init__()
        self.mask_after_glu = mask_after_glu
        self.pointwise_conv1 = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise_conv = nn.Conv1d(dim, dim, kernel, padding=(kernel - 1) // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pointwise_conv2 = nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], frame_mask [B, 1, T] -> [B, T, D] with padded frames zero."""
        pad = ~frame_mask
        y = x.transpose(1, 2).masked_fill(pad, 0.0)
        y = F.glu(self.pointwise_conv1(y), dim=1)
        if self.mask_after_glu:
            y = y.masked_fill(pad, 0.0)  # padded frames must look like the conv's own zero padding
        y = self.depthwise_conv(y)
        y = F.silu(self.norm(y.transpose(1, 2))).transpose(1, 2)
        y = self.pointwise_conv2(y).masked_fill(pad, 0.0)
        return y.transpose(1, 2)


class ConformerBlock(nn.Module):
    """Pre-norm: x += attn(norm_mha x); x += conv(norm_conv x); x += ffn(norm_ff x); x = norm_final x."""

    def __init__(self, dim: int, heads: int, units: int, mask_after_glu: bool = True):
        super().__init__()
        self.self_attn = RelPositionSelfAttention(dim, heads)
        self.feed_forward = FeedForward(dim, units)
        self.conv_module = ConvModule(dim, mask_after_glu=mask_after_glu)
        self.norm_ff = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_mha = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_conv = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_final = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), frame_mask, pos)
        x = x + self.conv_module(self.norm_conv(x), frame_mask)
        x = x + self.feed_forward(self.norm_ff(x))
        return self.norm_final(x)


class ConformerEncoder(nn.Module):
    """Conv2d 2x subsampling + N Conformer blocks + after_norm, built from gpt.condition_module.

    mask_after_glu: see ConvModule (False = upstream's exact padded-frame behaviour, not batch-independent).
    """

    def __init__(
        self,
        cfg: ConditionModuleConfig,
        input_size: int = 100,
        pos_table_rows: int = POS_TABLE_ROWS,
        mask_after_glu: bool = True,
    ):
        super().__init__()
        if cfg.input_layer != "conv2d2":
            raise ConfigError(
                f"gpt.condition_module.input_layer is '{cfg.input_layer}', IndexTTS 1.x uses only 'conv2d2'",
                "restore input_layer: conv2d2 from the official config.yaml",
            )
        if cfg.output_size % cfg.attention_heads:
            raise ConfigError(
                f"gpt.condition_module.output_size ({cfg.output_size}) is not divisible by attention_heads "
                f"({cfg.attention_heads})",
                "restore both values from the official config.yaml",
            )
        self.input_size = input_size
        self.output_size = cfg.output_size
        self.pos_table_rows = pos_table_rows
        self.embed = ConvSubsample2x(input_size, cfg.output_size, pos_table_rows)
        self.encoders = nn.ModuleList(
            ConformerBlock(cfg.output_size, cfg.attention_heads, cfg.linear_units, mask_after_glu)
            for _ in range(cfg.num_blocks)
        )
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=LN_EPS)

    @property
    def max_mel_frames(self) -> int:
        """Longest input accepted: upstream requires the subsampled length T' = (T-1)//2 < pe rows."""
        return MEL_FRAMES_PER_STEP * self.pos_table_rows

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Valid subsampled frames for `lengths` mel frames."""
        return torch.div(lengths - 1, MEL_FRAMES_PER_STEP, rounding_mode="floor")

    def check_inputs(self, mel: torch.Tensor, lengths: torch.Tensor) -> None:
        """Raise InputError for anything the encoder cannot encode faithfully (shape, length, values)."""
        if mel.dim() != 3 or mel.size(2) != self.input_size or not mel.is_floating_point():
            raise InputError(
                f"conditioning mel must be a float tensor [batch, frames, {self.input_size}], got "
                f"{mel.dtype} {tuple(mel.shape)}",
                f"pass the {self.input_size}-bin log-mel of the reference audio, time on axis 1",
            )
        frames = mel.size(1)
        if frames < MIN_MEL_FRAMES:
            raise InputError(
                f"reference audio is too short: {frames} mel frames, the encoder needs at least {MIN_MEL_FRAMES}",
                "use a reference clip of at least a few seconds",
            )
        if frames > self.max_mel_frames:
            raise InputError(
                f"reference audio is too long: {frames} mel frames, the conditioning encoder accepts at most "
                f"{self.max_mel_frames} (its position table has {self.pos_table_rows} rows)",
                f"trim the reference to at most {self.max_mel_frames} mel frames (the reference-length limit)",
            )
        if lengths.dim() != 1 or lengths.size(0) != mel.size(0) or lengths.is_floating_point():
            raise InputError(
                f"mel lengths must be an integer tensor [{mel.size(0)}], got {lengths.dtype} {tuple(lengths.shape)}",
                "pass one frame count per batch item",
            )
        if _exporting():
            return
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < MIN_MEL_FRAMES or hi > frames:
            raise InputError(
                f"mel lengths must lie in [{MIN_MEL_FRAMES}, {frames}] (the padded frame count), got {lo}..{hi}",
                "pass each reference's true frame count and pad the batch to the longest",
            )
        if not bool(torch.isfinite(mel).all()):
            raise InputError(
                "conditioning mel contains NaN or infinite values",
                "decode the reference audio again; log-mel must clamp at 1e-7 before the log",
            )

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, T, bins], lengths [B] int64 -> (hidden [B, T', D], mask [B, 1, T'] bool, True = valid)."""
        self.check_inputs(mel, lengths)
        steps = torch.arange(mel.size(1), device=mel.device)
        frame_mask = (steps.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1)  # [B, 1, T]
        x, pos = self.embed(mel)
        # Output frame i sees input frames 2i..2i+2: it is valid iff frame 2i+2 is.
        mask = frame_mask[:, :, 2::2]
        for block in self.encoders:
            x = block(x, mask, pos)
        return self.after_norm(x), mask
