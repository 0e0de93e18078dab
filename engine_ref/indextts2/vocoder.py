"""IndexTTS2's vocoder: NVIDIA BigVGAN v2 (nvidia/bigvgan_v2_22khz_80band_256x), 80-band log-mel -> 22.05 kHz.

Same generator family as the IndexTTS 1.x vocoder (conv_pre -> per stage a transposed-conv upsampler and the
average of `len(resblock_kernel_sizes)` AMP blocks with anti-aliased SnakeBeta -> activation_post -> conv_post),
so the AMP blocks, the anti-aliased activations and weight-norm folding are the shared ones from
`engine_ref.modules`. What differs lives here: the input is a mel [B, num_mels, T] (no GPT latents, no speaker
encoder or conditioning), conv_post's bias and the final tanh are switched by config.json's
``use_bias_at_final`` / ``use_tanh_at_final`` (both false in the release: no bias, and the output is
*clamped* to [-1, 1] instead of tanh), and the hyper-parameters come from the hub repo's config.json.

IndexTTS2 runs the plain-torch anti-aliasing path in fp32 at the reference commit (HEAD may select NVIDIA's
fused CUDA kernel, which computes the same function); we have only the torch path.
The hub checkpoint stores weight-normalised convs; the module holds plain weights and
`load_bigvgan_v2_state` folds them (exactly what the original's ``remove_weight_norm()`` leaves), and it
also accepts an already-folded state dict, as the original's load-then-retry does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine_ref.errors import CheckpointError, ConfigError, InputError, ModelFilesError
from engine_ref.indextts2.vocoder_layout import bigvgan_v2_layout
from engine_ref.layout import materialize
from engine_ref.modules.alias_free import Activation1d, make_snake
from engine_ref.modules.bigvgan import AMPBlock1, fold_weight_norm
from engine_ref.typed_config import build_dataclass

__all__ = ["BigVGANv2Config", "BigVGANv2", "official_config_json", "tiny_config_json", "parse_bigvgan_v2_config",
           "load_bigvgan_v2_config", "load_bigvgan_v2_state", "load_bigvgan_v2", "write_random_bigvgan_v2",
           "CONFIG_FILE", "CHECKPOINT_FILE", "HUB_REPO"]

HUB_REPO = "nvidia/bigvgan_v2_22khz_80band_256x"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "bigvgan_generator.pt"


@dataclass(frozen=True)
class BigVGANv2Config:
    """The generator's hyper-parameters from the hub repo's config.json (training-only keys are ignored).

    Defaults are the original's ``h.get`` fallbacks (tanh and a conv_post bias ON for old configs); every other
    field is read unconditionally by the original, so it is required here too. The STFT fields are not used by
    the generator; they describe the mel the model expects and are checked against the product of the rates.
    """

    resblock: str
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    activation: str
    snake_logscale: bool
    num_mels: int
    sampling_rate: int
    use_tanh_at_final: bool = True
    use_bias_at_final: bool = True
    hop_size: int | None = None
    n_fft: int | None = None
    win_size: int | None = None
    fmin: float | None = None
    fmax: float | None = None

    @property
    def samples_per_frame(self) -> int:
        """Output samples per mel frame: the product of the upsample rates (256 for the release)."""
        n = 1
        for r in self.upsample_rates:
            n *= r
        return n


def official_config_json() -> dict:
    """A fresh copy of the release's config.json content (NVIDIA's configs/bigvgan_v2_22khz_80band_256x.json).

    The hub file is 1,405 B; its exact formatting (and whether it carries extra keys such as use_cuda_kernel)
    is unverified. The generator keys below are the published ones.
    """
    return {
        "resblock": "1", "num_gpus": 0, "batch_size": 4, "learning_rate": 0.0001, "adam_b1": 0.8, "adam_b2": 0.99,
        "lr_decay": 0.9999996, "seed": 1234,
        "upsample_rates": [4, 4, 2, 2, 2, 2], "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4],
        "upsample_initial_channel": 1536, "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "use_tanh_at_final": False, "use_bias_at_final": False,
        "activation": "snakebeta", "snake_logscale": True,
        "use_cqtd_instead_of_mrd": True, "cqtd_filters": 128, "cqtd_max_filters": 1024, "cqtd_filters_scale": 1,
        "cqtd_dilations": [1, 2, 4], "cqtd_hop_lengths": [512, 256, 256], "cqtd_n_octaves": [9, 9, 9],
        "cqtd_bins_per_octaves": [24, 36, 48],
        "mpd_reshapes": [2, 3, 5, 7, 11], "use_spectral_norm": False, "discriminator_channel_mult": 1,
        "use_multiscale_melloss": True, "lambda_melloss": 15, "clip_grad_norm": 500,
        "segment_size": 65536, "num_mels": 80, "num_freq": 1025, "n_fft": 1024, "hop_size": 256, "win_size": 1024,
        "sampling_rate": 22050, "fmin": 0, "fmax": None, "fmax_for_loss": None, "num_workers": 4,
        "dist_config": {"dist_backend": "nccl", "dist_url": "tcp://localhost:54321", "world_size": 1},
    }


def tiny_config_json(channels: int = 128) -> dict:
    """The release's config with only the width shrunk: same rates, kernels and 256x hop, fast on a CPU.

    `channels` must be divisible by 64 (six stages halve it); 128 leaves 2 channels before conv_post.
    """
    return {**official_config_json(), "upsample_initial_channel": channels}


# ---- config ----

def _fix() -> str:
    return f"use the config.json of {HUB_REPO} (or the one bundled in indextts/s2mel/modules/bigvgan/)"


def validate_bigvgan_v2_config(cfg: BigVGANv2Config) -> None:
    """Reject configs the generator cannot build (or the original could not run), naming the key."""
    fix = _fix()
    if cfg.activation not in ("snake", "snakebeta"):
        raise ConfigError(f"activation is '{cfg.activation}', expected 'snakebeta' or 'snake'", fix)
    if cfg.resblock != "1":
        # The v2 AMPBlock2 bundled with IndexTTS2 has a forward that returns None: "2" cannot run there.
        raise ConfigError(f"resblock is '{cfg.resblock}'; only \"1\" (AMPBlock1) is supported by BigVGAN v2 here",
                          fix)
    if not cfg.upsample_rates or len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
        raise ConfigError(
            f"upsample_rates ({len(cfg.upsample_rates)} entries) and upsample_kernel_sizes "
            f"({len(cfg.upsample_kernel_sizes)}) must be non-empty and of equal length", fix)
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        if u < 1 or k < u or (k - u) % 2:
            raise ConfigError(
                f"upsample_kernel_sizes[{i}]={k} with rate {u}: need kernel >= rate and an even difference so "
                "each stage multiplies the length exactly by its rate", fix)
    n_stages = len(cfg.upsample_rates)
    if cfg.upsample_initial_channel < 2**n_stages or cfg.upsample_initial_channel % (2**n_stages):
        raise ConfigError(
            f"upsample_initial_channel ({cfg.upsample_initial_channel}) must be a positive multiple of "
            f"2^{n_stages} (channels halve at every upsampling stage)", fix)
    if not cfg.resblock_kernel_sizes or len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
        raise ConfigError("resblock_kernel_sizes and resblock_dilation_sizes must be non-empty and of equal length",
                          fix)
    for i, (k, dil) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
        # The shared AMPBlock1 takes up to three dilations (all published BigVGAN configs have three).
        if k % 2 == 0 or not 1 <= len(dil) <= 3 or min(dil) < 1:
            raise ConfigError(
                f"resblock_kernel_sizes[{i}]={k} / resblock_dilation_sizes[{i}]={list(dil)}: kernels must be odd "
                "and each block needs 1 to 3 positive dilations", fix)
    if cfg.num_mels < 1 or cfg.sampling_rate < 1:
        raise ConfigError("num_mels and sampling_rate must be positive", fix)
    if cfg.hop_size is not None and cfg.hop_size != cfg.samples_per_frame:
        raise ConfigError(
            f"hop_size ({cfg.hop_size}) differs from the product of upsample_rates ({cfg.samples_per_frame})", fix)


def parse_bigvgan_v2_config(mapping: Mapping, source: str = CONFIG_FILE) -> BigVGANv2Config:
    """Typed, validated config from a parsed config.json; a missing or mistyped key is a ConfigError naming it."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source} holds a {type(mapping).__name__}, not a JSON object", _fix())
    try:
        cfg = build_dataclass(BigVGANv2Config, dict(mapping), "")
    except ConfigError as exc:
        # build_dataclass words its messages for config.yaml; this file is the vocoder's config.json.
        raise ConfigError(f"{source}: " + exc.problem.replace("config.yaml", "the vocoder config"), _fix()) from None
    validate_bigvgan_v2_config(cfg)
    return cfg


def load_bigvgan_v2_config(path: str | os.PathLike) -> BigVGANv2Config:
    """Read and validate a BigVGAN v2 config.json."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFilesError(f"vocoder config '{path}' does not exist",
                              f"download {CONFIG_FILE} from {HUB_REPO} next to {CHECKPOINT_FILE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"vocoder config '{path}' cannot be read ({exc})", "re-download the file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"vocoder config '{path}' is not valid JSON ({exc.msg}, line {exc.lineno})",
                          "re-download the file") from None
    return parse_bigvgan_v2_config(data, str(path))


# ---- module ----

class BigVGANv2(nn.Module):
    """BigVGAN v2 generator with the hub checkpoint's submodule names (plain, folded conv weights).

    forward(mel [B, num_mels, T]) -> waveform [B, 1, T * samples_per_frame] in [-1, 1] (clamped, or tanh when
    use_tanh_at_final). Rows of a batch are independent, but right padding changes a padded row's tail.
    """

    def __init__(self, cfg: BigVGANv2Config):
        super().__init__()
        validate_bigvgan_v2_config(cfg)
        self.cfg = cfg
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        ch0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, ch0, 7, 1, padding=3)
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            up = nn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            self.ups.append(nn.ModuleList([up]))  # key ups.{i}.0.* as in the checkpoint
        self.resblocks = nn.ModuleList()
        for i in range(len(cfg.upsample_rates)):
            ch = ch0 // 2 ** (i + 1)
            for k, dil in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(AMPBlock1(ch, k, tuple(dil), cfg.activation, cfg.snake_logscale))
        ch_last = ch0 // 2 ** len(cfg.upsample_rates)
        self.activation_post = Activation1d(make_snake(cfg.activation, ch_last, cfg.snake_logscale))
        self.conv_post = nn.Conv1d(ch_last, 1, 7, 1, padding=3, bias=cfg.use_bias_at_final)

    @property
    def sampling_rate(self) -> int:
        return self.cfg.sampling_rate

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.samples_per_frame

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        n_mels = self.cfg.num_mels
        if mel.dim() != 3 or mel.shape[1] != n_mels or mel.shape[2] < 1:
            hint = ("pass mel.transpose(1, 2)" if mel.dim() == 3 and mel.shape[-1] == n_mels
                    else f"pass a {n_mels}-band log-mel shaped [batch, {n_mels}, frames]")
            raise InputError(f"vocoder input has shape {tuple(mel.shape)}, expected [B, {n_mels}, T >= 1]", hint)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            acc = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                acc = acc + self.resblocks[i * self.num_kernels + j](x)
            x = acc / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        if self.cfg.use_tanh_at_final:
            return torch.tanh(x)
        return torch.clamp(x, min=-1.0, max=1.0)


# ---- checkpoint ----

def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _generator_state(raw: object) -> Mapping[str, torch.Tensor]:
    """The state dict inside what torch.load returned: ``{"generator": sd}`` (hub layout) or sd itself."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"the BigVGAN v2 checkpoint holds a {type(raw).__name__}, not a dict",
                              f"use {CHECKPOINT_FILE} from {HUB_REPO}")
    sd = raw.get("generator", raw)
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("the BigVGAN v2 checkpoint has no 'generator' state dict "
                              "(expected {'generator': {name: tensor}})",
                              f"use {CHECKPOINT_FILE} from {HUB_REPO}, not a training checkpoint of another model")
    return sd


def load_bigvgan_v2_state(module: BigVGANv2, raw: object) -> BigVGANv2:
    """Check, fold and strictly load a bigvgan_generator.pt (as torch.load returned it) into `module`.

    The checkpoint is either weight-normalised (any ``.weight_g`` key; the hub file) or already folded, never
    a mix (the original loads one or the other). Key set and shapes are checked against the published layout,
    values must be finite; floats are cast to float32. Every mismatch is a CheckpointError naming the key.
    """
    cfg = module.cfg
    sd = _generator_state(raw)
    normed = any(k.endswith(".weight_g") or k.endswith(".weight_v") for k in sd)
    layout = bigvgan_v2_layout(cfg, weight_norm=normed)
    fix = (f"use the {CHECKPOINT_FILE} released with this config.json (upsample_initial_channel="
           f"{cfg.upsample_initial_channel}, num_mels={cfg.num_mels}, use_bias_at_final={cfg.use_bias_at_final})")
    missing = sorted(set(layout) - set(sd))
    unexpected = sorted(set(sd) - set(layout))
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_names(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {_names(unexpected)}"] if unexpected else []
        form = "weight-normalised" if normed else "folded (no weight_g/weight_v)"
        raise CheckpointError(f"BigVGAN v2 checkpoint ({form}) keys do not match the architecture; "
                              + "; ".join(parts), fix)
    checked: dict[str, torch.Tensor] = {}
    for name, spec in layout.items():
        t = sd[name]
        if tuple(t.shape) != tuple(spec.shape):
            raise CheckpointError(
                f"BigVGAN v2 checkpoint entry '{name}' has shape {tuple(t.shape)}, expected {tuple(spec.shape)}",
                fix)
        if not t.is_floating_point():
            raise CheckpointError(f"BigVGAN v2 checkpoint entry '{name}' has dtype {t.dtype}, expected float",
                                  "re-download the file")
        t = t.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"BigVGAN v2 checkpoint entry '{name}' holds NaN or Inf", "re-download the file")
        checked[name] = t
    folded = fold_weight_norm(checked) if normed else checked
    module.load_state_dict(folded, strict=True)
    return module


def load_bigvgan_v2(directory: str | os.PathLike, device: str | torch.device = "cpu") -> BigVGANv2:
    """The vocoder from a hub-style folder holding config.json and bigvgan_generator.pt, in eval mode, fp32."""
    directory = Path(directory)
    cfg = load_bigvgan_v2_config(directory / CONFIG_FILE)
    ckpt = directory / CHECKPOINT_FILE
    if not ckpt.is_file():
        raise ModelFilesError(f"vocoder checkpoint '{ckpt}' does not exist",
                              f"download {CHECKPOINT_FILE} from {HUB_REPO} into {directory}")
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds: all mean the file is unusable
        raise CheckpointError(f"vocoder checkpoint '{ckpt}' cannot be read ({type(exc).__name__}: {exc})",
                              "re-download the file") from None
    model = BigVGANv2(cfg)
    load_bigvgan_v2_state(model, raw)
    return model.to(device).eval()


def write_random_bigvgan_v2(directory: str | os.PathLike, config: Mapping | BigVGANv2Config | None = None,
                            seed: int = 0, weight_norm: bool = True) -> Path:
    """Write config.json + bigvgan_generator.pt ({'generator': sd}) like the hub repo, with random weights.

    config: a config.json mapping (written as given, e.g. `tiny_config_json()`), a BigVGANv2Config, or None for
    the release's. Values are deterministic per (seed, key) from the published layout; weight_norm=False
    writes the folded form instead. Files appear atomically (temp file + rename). Returns the directory.
    """
    if config is None:
        config = official_config_json()
    if isinstance(config, BigVGANv2Config):
        data = {k: (list(map(list, v)) if k == "resblock_dilation_sizes" else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(config).items()}
    else:
        data = json.loads(json.dumps(dict(config)))  # a plain deep copy that is surely JSON-serialisable
    cfg = parse_bigvgan_v2_config(data)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = materialize(bigvgan_v2_layout(cfg, weight_norm=True), seed)
    state = {"generator": sd if weight_norm else fold_weight_norm(sd)}  # same weights either way
    for name, write in ((CONFIG_FILE, lambda p: p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")),
                        (CHECKPOINT_FILE, lambda p: torch.save(state, p))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        os.close(fd)
        try:
            write(Path(tmp))
            os.replace(tmp, directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return directory
