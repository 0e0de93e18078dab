"""IndexTTS's BigVGAN vocoder: GPT latents + speaker embedding -> 24 kHz waveform.

Speaker-conditioned BigVGAN: a 1x1 projection of the ECAPA-TDNN embedding is added after conv_pre and after
every transposed-conv upsampler; each stage then averages `len(resblock_kernel_sizes)` AMP residual blocks whose
activations are anti-aliased Snake/SnakeBeta (see alias_free.py). tanh bounds the output to (-1, 1).

The official checkpoint stores weight-normalised convs (``weight_g``/``weight_v``); the module holds plain conv
weights and `load_bigvgan_state` folds them on load, exactly as ``remove_weight_norm()`` does in the original.
Submodule names reproduce the checkpoint keys so the folded state dict loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engine_ref.modules.configs import BigVGANConfig
from engine_ref.errors import CheckpointError, ConfigError, InputError
from engine_ref.layout.bigvgan import bigvgan_layout
from engine_ref.modules.alias_free import Activation1d, make_snake
from engine_ref.modules.ecapa import MIN_FRAMES, ECAPATDNN

# feat_upsample (unused by v1.0/v1.5) linearly stretches the latents 4x before conv_pre.
FEAT_UPSAMPLE_FACTOR = 4


def _exporting() -> bool:
    """True while tracing/compiling for export: value-dependent input checks must not enter the graph."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


def _same_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size * dilation - dilation) // 2


def _conv(channels: int, kernel_size: int, dilation: int) -> nn.Conv1d:
    pad = _same_padding(kernel_size, dilation)
    return nn.Conv1d(channels, channels, kernel_size, 1, dilation=dilation, padding=pad)


class AMPBlock1(nn.Module):
    """Three (act -> dilated conv -> act -> conv) residual branches applied in sequence ("resblock: 1")."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], activation: str, logscale: bool):
        super().__init__()
        self.convs1 = nn.ModuleList([_conv(channels, kernel_size, d) for d in dilations[:3]])
        self.convs2 = nn.ModuleList([_conv(channels, kernel_size, 1) for _ in dilations[:3]])
        # Interleaved as in the checkpoint: activations[2j] precedes convs1[j], activations[2j+1] precedes convs2[j].
        self.activations = nn.ModuleList(
            [Activation1d(make_snake(activation, channels, logscale)) for _ in range(2 * len(self.convs1))]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            branch = c2(self.activations[2 * j + 1](c1(self.activations[2 * j](x))))
            x = branch + x
        return x


class AMPBlock2(nn.Module):
    """Two (act -> dilated conv) residual branches ("resblock: 2"); not used by the released IndexTTS configs."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], activation: str, logscale: bool):
        super().__init__()
        self.convs = nn.ModuleList([_conv(channels, kernel_size, d) for d in dilations[:2]])
        self.activations = nn.ModuleList(
            [Activation1d(make_snake(activation, channels, logscale)) for _ in range(len(self.convs))]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.activations):
            x = conv(act(x)) + x
        return x


def validate_bigvgan_config(cfg: BigVGANConfig) -> None:
    """Reject configs the architecture cannot build, with the config key named (ConfigError)."""
    fix = "restore the bigvgan: section from the config.yaml shipped with the checkpoints"
    if cfg.activation not in ("snake", "snakebeta"):
        raise ConfigError(f"bigvgan.activation is '{cfg.activation}', expected 'snakebeta' or 'snake'", fix)
    if cfg.resblock not in ("1", "2"):
        raise ConfigError(f"bigvgan.resblock is '{cfg.resblock}', expected \"1\" or \"2\"", fix)
    if not cfg.upsample_rates or len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
        raise ConfigError(
            f"bigvgan.upsample_rates ({len(cfg.upsample_rates)} entries) and bigvgan.upsample_kernel_sizes "
            f"({len(cfg.upsample_kernel_sizes)}) must be non-empty and of equal length",
            fix,
        )
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        if u < 1 or k < u or (k - u) % 2:
            raise ConfigError(
                f"bigvgan.upsample_kernel_sizes[{i}]={k} with rate {u}: need kernel >= rate and an even difference "
                "so each stage multiplies the length exactly by its rate",
                fix,
            )
    if cfg.upsample_initial_channel % (2 ** len(cfg.upsample_rates)):
        raise ConfigError(
            f"bigvgan.upsample_initial_channel ({cfg.upsample_initial_channel}) must be divisible by "
            f"2^{len(cfg.upsample_rates)} (channels halve at every upsampling stage)",
            fix,
        )
    if not cfg.resblock_kernel_sizes or len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
        raise ConfigError(
            "bigvgan.resblock_kernel_sizes and bigvgan.resblock_dilation_sizes must be non-empty and of equal length",
            fix,
        )
    need = 3 if cfg.resblock == "1" else 2
    for i, (k, dil) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
        if k % 2 == 0 or len(dil) < need:
            raise ConfigError(
                f"bigvgan.resblock_kernel_sizes[{i}]={k} / resblock_dilation_sizes[{i}]={list(dil)}: kernels must be "
                f"odd and resblock \"{cfg.resblock}\" needs {need} dilations",
                fix,
            )
    for key in ("gpt_dim", "speaker_embedding_dim", "num_mels"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"bigvgan.{key} must be positive", fix)


class BigVGAN(nn.Module):
    """The IndexTTS vocoder with its speaker encoder (official submodule names; plain, folded conv weights).

    Shapes: latents [B, T, gpt_dim] (the GPT's final-normed hidden states), ref_mel [B, frames, num_mels] (log-mel
    of the reference, frames last-but-one), speaker embedding [B, speaker_embedding_dim, 1], waveform
    [B, 1, T * samples_per_latent] in (-1, 1).
    """

    def __init__(self, cfg: BigVGANConfig):
        super().__init__()
        validate_bigvgan_config(cfg)
        self.cfg = cfg
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.feat_upsample = cfg.feat_upsample
        ch0 = cfg.upsample_initial_channel
        spk = cfg.speaker_embedding_dim

        self.conv_pre = nn.Conv1d(cfg.gpt_dim, ch0, 7, 1, padding=3)
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            # Wrapped in a ModuleList so the key is ups.{i}.0.* like the checkpoint's.
            up = nn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            self.ups.append(nn.ModuleList([up]))

        block_cls = AMPBlock1 if cfg.resblock == "1" else AMPBlock2
        self.resblocks = nn.ModuleList()
        for i in range(len(cfg.upsample_rates)):
            ch = ch0 // 2 ** (i + 1)
            for k, dil in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(block_cls(ch, k, tuple(dil), cfg.activation, cfg.snake_logscale))

        ch_last = ch0 // 2 ** len(cfg.upsample_rates)
        self.activation_post = Activation1d(make_snake(cfg.activation, ch_last, cfg.snake_logscale))
        self.conv_post = nn.Conv1d(ch_last, 1, 7, 1, padding=3)

        self.speaker_encoder = ECAPATDNN(cfg.num_mels, spk)
        self.cond_layer = nn.Conv1d(spk, ch0, 1)
        self.conds = nn.ModuleList()
        if cfg.cond_d_vector_in_each_upsampling_layer:
            for i in range(len(cfg.upsample_rates)):
                self.conds.append(nn.Conv1d(spk, ch0 // 2 ** (i + 1), 1))

    @property
    def samples_per_latent(self) -> int:
        """Output samples per latent frame (1024 for IndexTTS 1.x)."""
        return self.cfg.hop_length * (FEAT_UPSAMPLE_FACTOR if self.feat_upsample else 1)

    # ---- input checks (shape checks are static; value checks are skipped while exporting) ----
    def _check_ref_mel(self, ref_mel: torch.Tensor, lengths: torch.Tensor | None) -> None:
        n_mels = self.cfg.num_mels
        if ref_mel.dim() != 3 or ref_mel.shape[-1] != n_mels:
            hint = (
                "pass mel.transpose(1, 2)"
                if ref_mel.dim() == 3 and ref_mel.shape[1] == n_mels
                else f"compute a {n_mels}-band log-mel of the reference audio"
            )
            raise InputError(f"reference mel has shape {tuple(ref_mel.shape)}, expected [B, frames, {n_mels}]", hint)
        if ref_mel.shape[1] < MIN_FRAMES:
            raise InputError(
                f"reference mel has {ref_mel.shape[1]} frames; the speaker encoder needs at least {MIN_FRAMES}",
                "use a longer reference recording (a few seconds of speech)",
            )
        if lengths is None:
            return
        if lengths.dim() != 1 or lengths.shape[0] != ref_mel.shape[0] or lengths.is_floating_point():
            raise InputError(
                f"lengths must be an integer tensor of shape [{ref_mel.shape[0]}] (frames per row), "
                f"got {lengths.dtype} {tuple(lengths.shape)}",
                "pass the number of valid mel frames of every batch row as a LongTensor",
            )
        if not _exporting() and bool(((lengths < MIN_FRAMES) | (lengths > ref_mel.shape[1])).any()):
            raise InputError(
                f"lengths {lengths.tolist()} must lie in [{MIN_FRAMES}, {ref_mel.shape[1]}] (the padded frame count)",
                "give each row's true frame count; drop references shorter than a few seconds",
            )

    def _check_decode_inputs(self, latents: torch.Tensor, spk: torch.Tensor) -> None:
        d = self.cfg.gpt_dim
        if latents.dim() != 3 or latents.shape[2] != d or latents.shape[1] < 1:
            raise InputError(
                f"latents have shape {tuple(latents.shape)}, expected [B, T >= 1, {d}]",
                "pass the GPT latent pass output (batch, frames, model_dim)",
            )
        e = self.cfg.speaker_embedding_dim
        if spk.dim() != 3 or spk.shape[1] != e or spk.shape[2] != 1 or spk.shape[0] not in (1, latents.shape[0]):
            raise InputError(
                f"speaker embedding has shape {tuple(spk.shape)}, expected [{latents.shape[0]} or 1, {e}, 1]",
                "pass the output of BigVGAN.speaker_embedding()",
            )

    # ---- public API ----
    def speaker_embedding(self, ref_mel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """ECAPA-TDNN embedding [B, speaker_embedding_dim, 1] of a log-mel [B, frames, num_mels].

        lengths: optional int [B] valid frame counts for right-padded batches (masks the pooling; convolution edges
        still see padding, so padded rows differ slightly from unpadded ones). None = every frame counts, as in
        the original.
        """
        self._check_ref_mel(ref_mel, lengths)
        return self.speaker_encoder(ref_mel, lengths)

    def decode(self, latents: torch.Tensor, spk: torch.Tensor) -> torch.Tensor:
        """Waveform [B, 1, T * samples_per_latent] from latents [B, T, gpt_dim] and spk [B or 1, D, 1].

        A batch-1 speaker embedding broadcasts over all latent rows. Rows are independent, but the receptive field
        reaches about 22 latent frames back (measured), so the padding of a right-padded row changes its last ~22
        frames' worth of samples: cut each row to length * samples_per_latent and expect differences near its end
        (decode unbatched when exact parity with the original matters).
        """
        self._check_decode_inputs(latents, spk)
        x = latents.transpose(1, 2)
        if self.feat_upsample:
            x = F.interpolate(x, scale_factor=float(FEAT_UPSAMPLE_FACTOR), mode="linear")
        x = self.conv_pre(x) + self.cond_layer(spk)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            if len(self.conds):
                x = x + self.conds[i](spk)
            acc = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                acc = acc + self.resblocks[i * self.num_kernels + j](x)
            x = acc / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x)

    def forward(
        self, latents: torch.Tensor, ref_mel: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The original call ``bigvgan(latent, cond_mel.transpose(1, 2))``: waveform [B, 1, samples] in (-1, 1).

        The original returns ``(wav, None)`` (the None is a training-only contrastive loss); we return the waveform.
        """
        return self.decode(latents, self.speaker_embedding(ref_mel, lengths))


# ---- checkpoint loading ----

_WEIGHT_G, _WEIGHT_V = ".weight_g", ".weight_v"


def fold_weight_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every ``X.weight_g``/``X.weight_v`` pair by ``X.weight = g * v / ||v||``.

    The norm is taken over all dims but 0, for Conv1d ([out, in, k]) and ConvTranspose1d ([in, out, k]) alike:
    that is torch's weight_norm default (dim=0) which the original applies to both. Uses torch's own kernel, so
    the result is bit-identical to what ``remove_weight_norm()`` leaves in the original. Half-precision pairs are
    folded in float32 and cast back. Other entries pass through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_WEIGHT_V):
            if key[: -len(_WEIGHT_V)] + _WEIGHT_G not in state_dict:
                raise CheckpointError(f"checkpoint has '{key}' without its '{_WEIGHT_G[1:]}'", "re-download the file")
            continue
        if not key.endswith(_WEIGHT_G):
            out[key] = value
            continue
        base = key[: -len(_WEIGHT_G)]
        v = state_dict.get(base + _WEIGHT_V)
        if v is None:
            raise CheckpointError(f"checkpoint has '{key}' without its '{_WEIGHT_V[1:]}'", "re-download the file")
        expected_g = (v.shape[0],) + (1,) * (v.dim() - 1)
        if tuple(value.shape) != expected_g:
            raise CheckpointError(
                f"'{key}' has shape {tuple(value.shape)}, expected {expected_g} for '{base}{_WEIGHT_V}' "
                f"{tuple(v.shape)} (weight norm over dim 0)",
                "re-download the file",
            )
        dtype = v.dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        out[base + ".weight"] = torch._weight_norm(v.to(work), value.to(work), 0).to(dtype)
    return out


def _name_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _config_summary(cfg: BigVGANConfig) -> str:
    return (
        f"upsample_initial_channel={cfg.upsample_initial_channel}, gpt_dim={cfg.gpt_dim}, "
        f"speaker_embedding_dim={cfg.speaker_embedding_dim}, num_mels={cfg.num_mels}"
    )


def _generator_state(raw: object) -> Mapping[str, torch.Tensor]:
    """The generator state dict inside what torch.load returned (``{"generator": sd}``, or sd itself)."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"the BigVGAN checkpoint holds a {type(raw).__name__}, not a dict",
            "use the official bigvgan_generator.pth",
        )
    sd = raw.get("generator", raw)
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(
            "the BigVGAN checkpoint has no 'generator' state dict (expected {'generator': {name: tensor}})",
            "use the official bigvgan_generator.pth, not a training checkpoint of another model",
        )
    return sd


def load_bigvgan_state(module: BigVGAN, raw: object) -> BigVGAN:
    """Check, fold and strictly load an official bigvgan_generator.pth (as returned by torch.load).

    Order: key set vs the published layout (missing/unexpected named), shapes vs the layout, finite values,
    cast to float32, fold weight norm, load strict. Every mismatch is a CheckpointError naming the key.
    """
    cfg = module.cfg
    sd = _generator_state(raw)
    layout = bigvgan_layout(cfg)
    fix = f"use the bigvgan_generator.pth released with this config.yaml ({_config_summary(cfg)})"
    missing = sorted(set(layout) - set(sd))
    unexpected = sorted(set(sd) - set(layout))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_name_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_name_list(unexpected)}")
        raise CheckpointError("BigVGAN checkpoint keys do not match the architecture; " + "; ".join(parts), fix)
    converted: dict[str, torch.Tensor] = {}
    for name, spec in layout.items():
        t = sd[name]
        if tuple(t.shape) != tuple(spec.shape):
            raise CheckpointError(
                f"BigVGAN checkpoint entry '{name}' has shape {tuple(t.shape)}, expected {tuple(spec.shape)}", fix
            )
        if t.is_floating_point():
            t = t.to(torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"BigVGAN checkpoint entry '{name}' holds NaN or Inf", "re-download the file")
        converted[name] = t
    folded = fold_weight_norm(converted)
    own = module.state_dict()
    for name, t in folded.items():
        want = own.get(name)
        if want is None or tuple(want.shape) != tuple(t.shape):
            found = None if want is None else tuple(want.shape)
            raise CheckpointError(
                f"folded entry '{name}' {tuple(t.shape)} does not fit the module ({found})",
                "report this: the layout table and the module disagree",
            )
    module.load_state_dict(folded, strict=True)
    return module
