"""Published layout of s2mel.pth's ``['net']``: per submodule, key -> shape, exactly as stored in the file.

Written from the official key names (facts doc §4), independent of the nn.Modules in this package: presets write
random s2mel.pth files from it and the tests check that the modules, after weight-norm folding, hold exactly these
keys and shapes. Weight-normalised layers appear as ``weight_g`` ([out, 1] for Linear, [out, 1, 1] for Conv1d) +
``weight_v``; the SConv1d wrappers of the WaveNet add two ``conv.`` levels (``in_layers.0.conv.conv.weight_g``).
Stored buffers: ``estimator.t_embedder(2).freqs`` (float [128]) and ``estimator.input_pos`` (int64 [16384]); their
exact values come from `s2mel_fixed_buffers`. Keys of layers the inference never runs (x_embedder, cond_embedder,
content_mask_embedder, length_regulator.embedding / mask_token) are present in the file and listed here.
"""

from __future__ import annotations

import math

import torch

from engine_ref.indextts2.s2mel.config import GPT_LATENT_DIM, GPT_LAYER_HIDDEN, POSITION_TABLE, TIME_FREQ_DIM, S2MelConfig
from engine_ref.layout import TensorSpec, materialize_tensor

Shapes = dict[str, tuple[int, ...]]

SUBMODULES = ("cfm", "length_regulator", "gpt_layer")


def _linear(out: Shapes, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _wn_linear(out: Shapes, name: str, n_out: int, n_in: int) -> None:
    out[f"{name}.weight_g"] = (n_out, 1)
    out[f"{name}.weight_v"] = (n_out, n_in)
    out[f"{name}.bias"] = (n_out,)


def _wn_sconv(out: Shapes, name: str, n_out: int, n_in: int, kernel: int) -> None:
    """SConv1d(norm='weight_norm'): SConv1d.conv (NormConv1d) .conv (weight-normed nn.Conv1d)."""
    out[f"{name}.conv.conv.weight_g"] = (n_out, 1, 1)
    out[f"{name}.conv.conv.weight_v"] = (n_out, n_in, kernel)
    out[f"{name}.conv.conv.bias"] = (n_out,)


def _timestep_embedder(out: Shapes, name: str, hidden: int) -> None:
    out[f"{name}.freqs"] = (TIME_FREQ_DIM // 2,)
    _linear(out, f"{name}.mlp.0", hidden, TIME_FREQ_DIM)
    _linear(out, f"{name}.mlp.2", hidden, hidden)


def _ada_norm(out: Shapes, name: str, dim: int) -> None:
    _linear(out, f"{name}.project_layer", 2 * dim, dim)
    out[f"{name}.norm.weight"] = (dim,)


def estimator_layout(cfg: S2MelConfig) -> Shapes:
    """The CFM's ``estimator.*`` keys (the DiT with its WaveNet final layer)."""
    dit, wn = cfg.DiT, cfg.wavenet
    d, mels = dit.hidden_dim, dit.in_channels
    ffn = dit.ffn_dim
    out: Shapes = {}
    p = "estimator."
    for i in range(dit.depth):
        layer = f"{p}transformer.layers.{i}"
        _linear(out, f"{layer}.attention.wqkv", 3 * d, d, bias=False)
        _linear(out, f"{layer}.attention.wo", d, d, bias=False)
        _linear(out, f"{layer}.feed_forward.w1", ffn, d, bias=False)
        _linear(out, f"{layer}.feed_forward.w3", ffn, d, bias=False)
        _linear(out, f"{layer}.feed_forward.w2", d, ffn, bias=False)
        _ada_norm(out, f"{layer}.ffn_norm", d)
        _ada_norm(out, f"{layer}.attention_norm", d)
        if dit.uvit_skip_connection:
            _linear(out, f"{layer}.skip_in_linear", d, 2 * d)
    _ada_norm(out, f"{p}transformer.norm", d)
    _wn_linear(out, f"{p}x_embedder", d, mels)
    out[f"{p}cond_embedder.weight"] = (dit.content_codebook_size, d)
    _linear(out, f"{p}cond_projection", d, dit.content_dim)
    _timestep_embedder(out, f"{p}t_embedder", d)
    out[f"{p}input_pos"] = (POSITION_TABLE,)
    # final_layer_type == 'wavenet'
    h = wn.hidden_dim
    _timestep_embedder(out, f"{p}t_embedder2", h)
    _linear(out, f"{p}conv1", h, d)
    out[f"{p}conv2.weight"] = (mels, h, 1)
    out[f"{p}conv2.bias"] = (mels,)
    _wn_sconv(out, f"{p}wavenet.cond_layer", 2 * h * wn.num_layers, h, 1)
    for i in range(wn.num_layers):
        _wn_sconv(out, f"{p}wavenet.in_layers.{i}", 2 * h, h, wn.kernel_size)
        _wn_sconv(out, f"{p}wavenet.res_skip_layers.{i}", 2 * h if i < wn.num_layers - 1 else h, h, 1)
    _wn_linear(out, f"{p}final_layer.linear", h, h)
    _linear(out, f"{p}final_layer.adaLN_modulation.1", 2 * h, h)
    _linear(out, f"{p}res_projection", h, d)
    out[f"{p}content_mask_embedder.weight"] = (1, d)
    _linear(out, f"{p}skip_linear", d, d + mels)
    style = cfg.style_encoder.dim if dit.style_condition else 0
    _linear(out, f"{p}cond_x_merge_linear", d, d + 2 * mels + style)
    return out


def length_regulator_layout(cfg: S2MelConfig) -> Shapes:
    lr = cfg.length_regulator
    c = lr.channels
    out: Shapes = {}
    for i in range(len(lr.sampling_ratios)):
        out[f"model.{3 * i}.weight"] = (c, c, 3)
        out[f"model.{3 * i}.bias"] = (c,)
        out[f"model.{3 * i + 1}.weight"] = (c,)  # GroupNorm(1, c) affine
        out[f"model.{3 * i + 1}.bias"] = (c,)
    last = 3 * len(lr.sampling_ratios)
    out[f"model.{last}.weight"] = (c, c, 1)
    out[f"model.{last}.bias"] = (c,)
    out["embedding.weight"] = (lr.content_codebook_size, c)
    out["mask_token"] = (1, c)
    _linear(out, "content_in_proj", c, lr.in_channels)
    return out


def gpt_layer_layout(cfg: S2MelConfig, gpt_latent_dim: int = GPT_LATENT_DIM) -> Shapes:
    dims = (gpt_latent_dim, *GPT_LAYER_HIDDEN, cfg.length_regulator.in_channels)
    out: Shapes = {}
    for i in range(len(dims) - 1):
        _linear(out, str(i), dims[i + 1], dims[i])
    return out


def s2mel_layout(cfg: S2MelConfig, gpt_latent_dim: int = GPT_LATENT_DIM,
                 with_gpt_layer: bool = True) -> dict[str, Shapes]:
    """Per ``net`` entry (cfm, length_regulator, gpt_layer): key -> shape, as stored in s2mel.pth.

    with_gpt_layer=False: the entries IndexTTS-2.5 reads (no GPT-latent projection)."""
    out = {"cfm": estimator_layout(cfg), "length_regulator": length_regulator_layout(cfg)}
    if with_gpt_layer:
        out["gpt_layer"] = gpt_layer_layout(cfg, gpt_latent_dim)
    return out


def time_embedding_freqs(dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """exp(-ln(max_period) * i / half), i = 0..half-1, in float32 (the stored ``freqs`` buffers)."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)


def s2mel_fixed_buffers(cfg: S2MelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Exact values of the stored buffers (a random preset must not randomise them)."""
    freqs = time_embedding_freqs()
    return {
        "cfm": {
            "estimator.t_embedder.freqs": freqs.clone(),
            "estimator.t_embedder2.freqs": freqs.clone(),
            "estimator.input_pos": torch.arange(POSITION_TABLE, dtype=torch.int64),
        }
    }


def _random_spec(key: str, shape: tuple[int, ...]) -> TensorSpec:
    """Deterministic random init that keeps a random s2mel numerically tame (unit-norm rows, near-1 norms)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "weight_g":
        return TensorSpec(shape, init="normal", mean=1.0, std=0.05)
    if leaf == "bias":
        return TensorSpec(shape, init="normal", std=0.02)
    if key.endswith("norm.weight") or (len(shape) == 1 and leaf == "weight"):  # RMSNorm / GroupNorm scales
        return TensorSpec(shape, init="normal", mean=1.0, std=0.05)
    if leaf in ("mask_token",) or key.endswith(("embedding.weight", "embedder.weight")):
        return TensorSpec(shape, init="normal", std=0.02)
    return TensorSpec(shape)  # N(0, 1/fan_in)


def random_s2mel_net(cfg: S2MelConfig, seed: int = 0, gpt_latent_dim: int = GPT_LATENT_DIM) -> dict[str, dict[str, torch.Tensor]]:
    """A complete random ``net`` (layout shapes, exact buffers), deterministic per seed and key."""
    fixed = s2mel_fixed_buffers(cfg)
    net: dict[str, dict[str, torch.Tensor]] = {}
    for sub, shapes in s2mel_layout(cfg, gpt_latent_dim).items():
        net[sub] = {
            key: fixed.get(sub, {}).get(key) if key in fixed.get(sub, {}) else materialize_tensor(f"{sub}.{key}", _random_spec(key, shape), seed)
            for key, shape in shapes.items()
        }
    return net
