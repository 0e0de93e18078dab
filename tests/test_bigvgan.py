"""BigVGAN vocoder, ECAPA-TDNN and anti-aliased activations: layout, loading, numerics, input errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.signal
import torch
from torch import nn

from engine_ref.modules.configs import BigVGANConfig
from engine_ref.errors import CheckpointError, ConfigError, InputError
from engine_ref.layout import materialize
from engine_ref.layout.bigvgan import bigvgan_layout
from engine_ref.modules.alias_free import (
    Activation1d,
    DownSample1d,
    Snake,
    SnakeBeta,
    UpSample1d,
    kaiser_sinc_filter,
)
from engine_ref.modules.bigvgan import BigVGAN, fold_weight_norm, load_bigvgan_state

HOP = 1024
# Measured bound (tiny and v1.5 share the architecture): latents at frame k never change samples before
# (k - 22) * HOP; 24 leaves a margin.
RECEPTIVE_MARGIN_FRAMES = 24


def _cfg(ch: int, gpt_dim: int, spk: int, **kw) -> BigVGANConfig:
    base = dict(
        resblock="1",
        upsample_rates=(4, 4, 4, 4, 2, 2),
        upsample_kernel_sizes=(8, 8, 4, 4, 4, 4),
        upsample_initial_channel=ch,
        resblock_kernel_sizes=(3, 7, 11),
        resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        speaker_embedding_dim=spk,
        gpt_dim=gpt_dim,
        activation="snakebeta",
        num_mels=100,
        sampling_rate=24000,
    )
    base.update(kw)
    return BigVGANConfig(**base)


V15 = _cfg(1536, 1280, 512)
TINY = _cfg(64, 64, 64)


def _loaded(cfg: BigVGANConfig, seed: int = 0) -> BigVGAN:
    model = BigVGAN(cfg).eval()
    load_bigvgan_state(model, {"generator": materialize(bigvgan_layout(cfg), seed)})
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These small convs gain nothing from intra-op threads, and on a busy 2-core box OpenMP spin-waiting makes
    them 10-50x slower; one thread keeps the file fast and its timing stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> BigVGAN:
    torch.manual_seed(0)
    return _loaded(TINY)


def _mel(batch: int, frames: int, seed: int) -> torch.Tensor:
    """Log-mel-like values (log of clamped magnitudes: mostly -10..0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 100, generator=g) * 2.5 - 5.0


def _latents(batch: int, frames: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, dim, generator=g)


# ---------------------------------------------------------------- layout vs module


def _folded_shapes(layout) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, spec in layout.items():
        if name.endswith(".weight_g"):
            continue
        if name.endswith(".weight_v"):
            out[name[: -len("_v")]] = tuple(spec.shape)
        else:
            out[name] = tuple(spec.shape)
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        V15,
        _cfg(64, 48, 32, resblock="2", cond_d_vector_in_each_upsampling_layer=False),
        _cfg(128, 32, 16, activation="snake", snake_logscale=False,
             upsample_rates=(8, 8, 16), upsample_kernel_sizes=(16, 16, 32)),
    ],
    ids=["tiny", "v1.5", "resblock2-noconds", "snake-3stages"],
)
def test_layout_names_and_shapes_match_module(cfg):
    with torch.device("meta"):  # v1.5 is ~110M parameters: compare shapes without allocating
        module = BigVGAN(cfg)
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert _folded_shapes(bigvgan_layout(cfg)) == own


def test_v15_layout_has_published_entries():
    layout = bigvgan_layout(V15)
    expected = {
        "conv_pre.weight_g": (1536, 1, 1),
        "conv_pre.weight_v": (1536, 1280, 7),
        "ups.0.0.weight_g": (1536, 1, 1),  # ConvTranspose: weight norm over dim 0 = input channels
        "ups.0.0.weight_v": (1536, 768, 8),
        "ups.5.0.weight_v": (48, 24, 4),
        "resblocks.0.convs1.2.weight_v": (768, 768, 3),
        "resblocks.17.convs2.0.weight_v": (24, 24, 11),
        "resblocks.17.activations.5.act.beta": (24,),
        "resblocks.17.activations.5.downsample.lowpass.filter": (1, 1, 12),
        "activation_post.upsample.filter": (1, 1, 12),
        "conv_post.weight_v": (1, 24, 7),
        "conv_post.bias": (1,),
        "cond_layer.weight": (1536, 512, 1),
        "conds.5.weight": (24, 512, 1),
        "speaker_encoder.blocks.0.conv.conv.weight": (512, 100, 5),
        "speaker_encoder.blocks.0.norm.norm.running_var": (512,),
        "speaker_encoder.blocks.0.norm.norm.num_batches_tracked": (),
        "speaker_encoder.blocks.3.res2net_block.blocks.6.conv.conv.weight": (64, 64, 3),
        "speaker_encoder.blocks.1.se_block.conv1.conv.weight": (128, 512, 1),
        "speaker_encoder.mfa.conv.conv.weight": (1536, 1536, 1),
        "speaker_encoder.asp.tdnn.conv.conv.weight": (128, 4608, 1),
        "speaker_encoder.asp.conv.conv.weight": (1536, 128, 1),
        "speaker_encoder.asp_bn.norm.running_mean": (3072,),
        "speaker_encoder.fc.conv.weight": (512, 3072, 1),
    }
    for name, shape in expected.items():
        assert tuple(layout[name].shape) == shape, name
    assert not any(k.startswith("conv_pre.weight") and k.endswith("weight") for k in layout)
    assert "resblocks.18.convs1.0.weight_g" not in layout
    assert "speaker_encoder.blocks.4.tdnn1.conv.conv.weight" not in layout


def test_tiny_layout_loads_strictly(tiny):
    sd = tiny.state_dict()
    assert sd["speaker_encoder.blocks.0.norm.norm.num_batches_tracked"].dtype == torch.long
    assert all(t.dtype == torch.float32 for k, t in sd.items() if not k.endswith("num_batches_tracked"))
    # preset filters hold the real Kaiser-sinc values
    assert torch.equal(sd["activation_post.upsample.filter"], kaiser_sinc_filter(0.25, 0.3, 12))


# ---------------------------------------------------------------- weight norm folding


@pytest.mark.parametrize("kind", ["conv", "transpose"])
def test_fold_weight_norm_matches_torch(kind):
    torch.manual_seed(1)
    conv = nn.Conv1d(6, 10, 5) if kind == "conv" else nn.ConvTranspose1d(12, 6, 8, 4, padding=2)
    wn = nn.utils.parametrizations.weight_norm(conv)  # dim=0 default, as the original applies it
    with torch.no_grad():
        wn.parametrizations.weight.original0.uniform_(0.2, 2.0)  # g
        wn.parametrizations.weight.original1.normal_()  # v
    g = wn.parametrizations.weight.original0.detach()
    v = wn.parametrizations.weight.original1.detach()
    folded = fold_weight_norm({"x.weight_g": g, "x.weight_v": v, "x.bias": conv.bias.detach()})
    assert set(folded) == {"x.weight", "x.bias"}
    assert torch.equal(folded["x.weight"], wn.weight.detach())
    # independent formula: each slice along dim 0 has norm g
    norms = folded["x.weight"].flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, g.flatten(), rtol=1e-5, atol=1e-6)


def test_fold_weight_norm_legacy_state_dict_roundtrip():
    torch.manual_seed(2)
    conv = nn.utils.weight_norm(nn.ConvTranspose1d(8, 4, 4, 2, padding=1))  # old-style keys weight_g/weight_v
    sd = {k: v.detach().clone() for k, v in conv.state_dict().items()}
    assert {"weight_g", "weight_v", "bias"} <= set(sd)
    plain = nn.ConvTranspose1d(8, 4, 4, 2, padding=1)
    plain.load_state_dict({k[1:]: v for k, v in fold_weight_norm({"." + k: v for k, v in sd.items()}).items()})
    x = torch.randn(2, 8, 9)
    torch.testing.assert_close(plain(x), conv(x), rtol=1e-6, atol=1e-6)


def test_fold_rejects_bad_pairs():
    v = torch.randn(4, 3, 5)
    with pytest.raises(CheckpointError, match=r"a\.weight_g"):
        fold_weight_norm({"a.weight_g": torch.ones(3, 1, 1), "a.weight_v": v})
    with pytest.raises(CheckpointError, match="weight_g"):
        fold_weight_norm({"a.weight_v": v})


# ---------------------------------------------------------------- anti-aliasing


def _scipy_kaiser_sinc(cutoff: float, half_width: float, taps: int) -> np.ndarray:
    """Independent construction: scipy's Kaiser design formulas, window and numpy's sinc."""
    half = taps // 2
    atten = scipy.signal.kaiser_atten(half, 4 * half_width)  # 2.285 (N-1) pi dw + 7.95
    window = scipy.signal.windows.kaiser(taps, scipy.signal.kaiser_beta(atten), sym=True)
    t = np.arange(-half, half) + 0.5 if taps % 2 == 0 else np.arange(taps) - half
    h = 2 * cutoff * window * np.sinc(2 * cutoff * t)
    return h / h.sum()


# Covers the three Kaiser beta branches (attenuation > 50, 21..50, < 21) and an odd tap count.
@pytest.mark.parametrize(
    "cutoff,half_width,taps", [(0.25, 0.3, 12), (0.5 / 3, 0.2, 18), (0.25, 0.3, 13), (0.25, 0.1, 12), (0.1, 0.02, 12)]
)
def test_kaiser_sinc_matches_scipy(cutoff, half_width, taps):
    ours = kaiser_sinc_filter(cutoff, half_width, taps)
    assert ours.shape == (1, 1, taps)
    expected = _scipy_kaiser_sinc(cutoff, half_width, taps)
    np.testing.assert_allclose(ours.flatten().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_resampling_lengths_and_passband():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 37)
    up, down = UpSample1d(2, 12), DownSample1d(2, 12)
    assert up(x).shape == (2, 3, 74)
    assert down(up(x)).shape == x.shape
    assert Activation1d(nn.Identity())(x).shape == x.shape
    # a tone well below the cutoff survives up -> down almost unchanged away from the edges
    n = torch.arange(200, dtype=torch.float32)
    tone = torch.sin(2 * math.pi * 0.05 * n).view(1, 1, -1)
    back = down(up(tone))
    torch.testing.assert_close(back[..., 20:-20], tone[..., 20:-20], rtol=0, atol=0.02)
    # a tone above the low-rate Nyquist (after upsampling) is removed by the decimator's low-pass
    hi = torch.sin(2 * math.pi * 0.45 * torch.arange(400, dtype=torch.float32)).view(1, 1, -1)
    assert down(hi)[..., 10:-10].abs().max() < 0.05


def test_snake_formulas():
    torch.manual_seed(4)
    x = torch.randn(2, 5, 7)
    sb = SnakeBeta(5, logscale=True)
    with torch.no_grad():
        sb.alpha.normal_()
        sb.beta.normal_()
    a, b = sb.alpha.exp().view(1, 5, 1), sb.beta.exp().view(1, 5, 1)
    torch.testing.assert_close(sb(x), x + torch.sin(a * x) ** 2 / (b + 1e-9))
    lin = SnakeBeta(5, logscale=False)
    with torch.no_grad():
        lin.alpha.uniform_(0.5, 2)
        lin.beta.uniform_(0.5, 2)
    a, b = lin.alpha.view(1, 5, 1), lin.beta.view(1, 5, 1)
    torch.testing.assert_close(lin(x), x + torch.sin(a * x) ** 2 / (b + 1e-9))
    s = Snake(5, logscale=True)
    with torch.no_grad():
        s.alpha.normal_()
    a = s.alpha.exp().view(1, 5, 1)
    torch.testing.assert_close(s(x), x + torch.sin(a * x) ** 2 / (a + 1e-9))


# ---------------------------------------------------------------- vocoder behaviour


@torch.no_grad()
def test_output_length_and_forward(tiny):
    spk = tiny.speaker_embedding(_mel(1, 40, 0))
    assert spk.shape == (1, TINY.speaker_embedding_dim, 1)
    for frames in (1, 3, 17):
        wav = tiny.decode(_latents(2, frames, 64, frames), spk)
        assert wav.shape == (2, 1, frames * HOP)
    lat, mel = _latents(1, 5, 64, 9), _mel(1, 40, 0)
    assert torch.equal(tiny(lat, mel), tiny.decode(lat, spk))
    assert tiny.samples_per_latent == HOP


@torch.no_grad()
def test_random_weights_give_nondegenerate_audio():
    for seed in (0, 1, 2):
        model = _loaded(TINY, seed)
        wav = model(_latents(1, 24, 64, 100 + seed), _mel(1, 150, 200 + seed))[0, 0]
        assert torch.isfinite(wav).all()
        rms = wav.pow(2).mean().sqrt().item()
        assert 0.02 < rms < 0.5, rms
        assert wav.abs().max().item() < 0.99
        assert wav.std().item() > 0.01
        assert wav.diff().abs().mean().item() > 1e-3  # not a constant or a slow drift


@torch.no_grad()
def test_padded_batch_matches_unbatched_prefix(tiny):
    spk = tiny.speaker_embedding(_mel(2, 60, 1))
    short, long = _latents(1, 40, 64, 11), _latents(1, 64, 64, 12)
    batch = torch.cat([torch.cat([short, torch.randn(1, 24, 64) * 3], dim=1), long])
    out = tiny.decode(batch, spk)
    solo_short = tiny.decode(short, spk[:1])
    solo_long = tiny.decode(long, spk[1:])
    keep = (40 - RECEPTIVE_MARGIN_FRAMES) * HOP
    torch.testing.assert_close(out[0:1, :, :keep], solo_short[:, :, :keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1:2], solo_long, rtol=1e-4, atol=1e-5)
    # the padding does reach the tail of the short row: the margin is real, not slack
    assert (out[0, :, 40 * HOP - HOP : 40 * HOP] - solo_short[0, :, -HOP:]).abs().max() > 1e-4


@torch.no_grad()
def test_batch_one_speaker_broadcasts(tiny):
    spk = tiny.speaker_embedding(_mel(1, 50, 2))
    lat = _latents(3, 6, 64, 13)
    torch.testing.assert_close(tiny.decode(lat, spk), tiny.decode(lat, spk.expand(3, -1, -1)), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- ECAPA-TDNN


@torch.no_grad()
def test_ecapa_lengths_mask_padding(tiny):
    real = _mel(1, 300, 3)
    padded = torch.full((2, 400, 100), math.log(1e-7))
    padded[0, :300] = real[0]
    padded[1] = _mel(1, 400, 4)[0]
    alone = tiny.speaker_embedding(real)
    full = tiny.speaker_embedding(padded)
    masked = tiny.speaker_embedding(padded, torch.tensor([300, 400]))
    # lengths == frame count is exactly the unmasked (original) computation
    assert torch.equal(masked[1], full[1])
    err_masked = ((masked[0] - alone[0]).norm() / alone[0].norm()).item()
    err_unmasked = ((full[0] - alone[0]).norm() / alone[0].norm()).item()
    assert err_masked < 0.05  # only conv edges see the padding
    assert err_unmasked > 5 * err_masked


@torch.no_grad()
def test_ecapa_ignores_train_mode():
    model = _loaded(TINY, 5)
    mel = _mel(2, 80, 5)
    ref = model.speaker_embedding(mel)
    model.train()
    assert torch.equal(model.speaker_embedding(mel), ref)


# ---------------------------------------------------------------- checkpoint loading errors


def test_wrong_shape_names_key_and_shapes():
    sd = materialize(bigvgan_layout(TINY), 0)
    sd["conds.2.weight"] = torch.zeros(9, 64, 1)
    with pytest.raises(CheckpointError) as info:
        load_bigvgan_state(BigVGAN(TINY), {"generator": sd})
    msg = str(info.value)
    assert "conds.2.weight" in msg and "(9, 64, 1)" in msg and "(8, 64, 1)" in msg and "Fix:" in msg


def test_missing_and_unexpected_keys_named():
    sd = materialize(bigvgan_layout(TINY), 0)
    del sd["resblocks.4.convs2.1.weight_g"]
    del sd["speaker_encoder.asp_bn.norm.running_var"]
    sd["logit_scale"] = torch.zeros(())
    with pytest.raises(CheckpointError) as info:
        load_bigvgan_state(BigVGAN(TINY), {"generator": sd})
    msg = str(info.value)
    for name in ("resblocks.4.convs2.1.weight_g", "speaker_encoder.asp_bn.norm.running_var", "logit_scale"):
        assert name in msg
    assert "2 missing" in msg and "1 unexpected" in msg


def test_already_folded_checkpoint_is_rejected_by_name():
    sd = fold_weight_norm(materialize(bigvgan_layout(TINY), 0))
    with pytest.raises(CheckpointError, match=r"conv_pre\.weight_g"):
        load_bigvgan_state(BigVGAN(TINY), {"generator": sd})


@torch.no_grad()
def test_half_precision_checkpoint_loads_as_float32(tiny):
    sd = materialize(bigvgan_layout(TINY), 0)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    model = load_bigvgan_state(BigVGAN(TINY).eval(), {"generator": half})
    assert model.conv_pre.weight.dtype == torch.float32
    lat, spk = _latents(1, 4, 64, 14), tiny.speaker_embedding(_mel(1, 40, 6))
    torch.testing.assert_close(model.decode(lat, spk), tiny.decode(lat, spk), rtol=0, atol=0.05)


def test_bad_container_and_nonfinite():
    with pytest.raises(CheckpointError, match="generator"):
        load_bigvgan_state(BigVGAN(TINY), {"model": {"x": 1}})
    with pytest.raises(CheckpointError, match="not a dict"):
        load_bigvgan_state(BigVGAN(TINY), [1, 2])
    sd = materialize(bigvgan_layout(TINY), 0)
    sd["conv_post.bias"] = torch.tensor([float("nan")])
    with pytest.raises(CheckpointError, match="conv_post.bias"):
        load_bigvgan_state(BigVGAN(TINY), {"generator": sd})


# ---------------------------------------------------------------- user input and config errors


def test_input_errors(tiny):
    with pytest.raises(InputError, match=r"transpose\(1, 2\)"):
        tiny.speaker_embedding(torch.zeros(1, 100, 40))
    with pytest.raises(InputError, match="at least"):
        tiny.speaker_embedding(torch.zeros(1, 3, 100))
    with pytest.raises(InputError, match="lengths"):
        tiny.speaker_embedding(torch.zeros(2, 40, 100), torch.tensor([40, 50]))
    with pytest.raises(InputError, match="lengths"):
        tiny.speaker_embedding(torch.zeros(2, 40, 100), torch.tensor([0.5, 1.0]))
    spk = torch.zeros(1, 64, 1)
    with pytest.raises(InputError, match="latents"):
        tiny.decode(torch.zeros(1, 5, 32), spk)
    with pytest.raises(InputError, match="latents"):
        tiny.decode(torch.zeros(1, 0, 64), spk)
    with pytest.raises(InputError, match="speaker embedding"):
        tiny.decode(torch.zeros(2, 5, 64), torch.zeros(3, 64, 1))


@pytest.mark.parametrize(
    "change,key",
    [
        (dict(activation="relu"), "bigvgan.activation"),
        (dict(resblock="3"), "bigvgan.resblock"),
        (dict(upsample_initial_channel=48), "upsample_initial_channel"),
        (dict(upsample_kernel_sizes=(8, 8, 4, 4, 4, 5)), "upsample_kernel_sizes"),
        (dict(resblock_dilation_sizes=((1, 3), (1, 3, 5), (1, 3, 5))), "resblock_dilation_sizes"),
    ],
)
def test_config_errors(change, key):
    with pytest.raises(ConfigError, match=key):
        BigVGAN(dataclasses.replace(TINY, **change))
