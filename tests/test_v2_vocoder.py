"""IndexTTS2 vocoder (BigVGAN v2 22 kHz 80-band 256x): layout, strict loading, numerics vs independent code."""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_ref.errors import CheckpointError, ConfigError, InputError, ModelFilesError
from engine_ref.indextts2.vocoder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    BigVGANv2,
    load_bigvgan_v2,
    load_bigvgan_v2_config,
    load_bigvgan_v2_state,
    official_config_json,
    parse_bigvgan_v2_config,
    tiny_config_json,
    write_random_bigvgan_v2,
)
from engine_ref.indextts2.vocoder_layout import bigvgan_v2_layout
from engine_ref.layout import materialize
from engine_ref.modules.alias_free import Activation1d, SnakeBeta

HUB_FILE_BYTES = 449_228_171  # bigvgan_generator.pt of nvidia/bigvgan_v2_22khz_80band_256x


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small convs gain nothing from threads; on a shared 2-core box spin-waiting only slows them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_JSON = tiny_config_json(128)
TINY = parse_bigvgan_v2_config(TINY_JSON)
OFFICIAL = parse_bigvgan_v2_config(official_config_json())


def _mel(frames: int, seed: int, batch: int = 1) -> torch.Tensor:
    """Log-mel-like input: a sloped spectrum around -6 with a loudness envelope, clipped to the ln(1e-5) floor."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-3.0, -9.0, 80)[None, :, None]
    env = torch.randn(batch, 1, frames, generator=g) * 1.5
    return (base + env + torch.randn(batch, 80, frames, generator=g)).clamp(-11.51, 2.0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_bigvgan_v2(tmp_path_factory.mktemp("bigvgan_v2"), TINY_JSON, seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> BigVGANv2:
    return load_bigvgan_v2(tiny_dir)


# ---------------------------------------------------------------------------------------------- config/layout


def test_official_config_values():
    c = OFFICIAL
    assert c.upsample_rates == (4, 4, 2, 2, 2, 2) and c.upsample_kernel_sizes == (8, 8, 4, 4, 4, 4)
    assert c.upsample_initial_channel == 1536 and c.resblock_kernel_sizes == (3, 7, 11)
    assert c.resblock_dilation_sizes == ((1, 3, 5),) * 3
    assert (c.activation, c.snake_logscale, c.resblock, c.num_mels) == ("snakebeta", True, "1", 80)
    assert c.use_tanh_at_final is False and c.use_bias_at_final is False
    assert c.sampling_rate == 22050 and c.samples_per_frame == 256 == c.hop_size
    assert c.fmax is None and c.fmin == 0.0 and c.n_fft == 1024 == c.win_size


def test_original_defaults_for_old_configs():
    """The original's h.get fallbacks: tanh and a conv_post bias when the keys are absent."""
    data = {k: v for k, v in TINY_JSON.items() if k not in ("use_tanh_at_final", "use_bias_at_final")}
    cfg = parse_bigvgan_v2_config(data)
    assert cfg.use_tanh_at_final and cfg.use_bias_at_final
    assert "conv_post.bias" in bigvgan_v2_layout(cfg)
    assert BigVGANv2(cfg).conv_post.bias is not None


@pytest.mark.parametrize("bias", [False, True])
def test_layout_equals_module_keys_after_folding(bias):
    cfg = parse_bigvgan_v2_config({**TINY_JSON, "use_bias_at_final": bias})
    own = BigVGANv2(cfg).state_dict()
    folded = bigvgan_v2_layout(cfg, weight_norm=False)
    assert set(own) == set(folded)
    assert all(tuple(own[k].shape) == folded[k].shape for k in own)
    normed = bigvgan_v2_layout(cfg)
    assert ("conv_post.bias" in normed) is bias
    # every conv is weight-normalised in the hub file: g [C0, 1, 1] next to v, no plain weight
    bases = {k[: -len(".weight_v")] for k in normed if k.endswith(".weight_v")}
    assert bases and not any(k.endswith(".weight") for k in normed)
    for b in bases:
        assert normed[b + ".weight_g"].shape == (normed[b + ".weight_v"].shape[0], 1, 1)


def test_official_layout_matches_the_hub_file():
    lay = bigvgan_v2_layout(OFFICIAL)
    shapes = {k: v.shape for k, v in lay.items()}
    assert len(lay) == 783
    assert shapes["conv_pre.weight_v"] == (1536, 80, 7) and shapes["conv_pre.weight_g"] == (1536, 1, 1)
    assert shapes["ups.0.0.weight_v"] == (1536, 768, 8) and shapes["ups.0.0.weight_g"] == (1536, 1, 1)
    assert shapes["ups.5.0.weight_v"] == (48, 24, 4) and shapes["ups.5.0.bias"] == (24,)
    assert shapes["resblocks.17.convs1.2.weight_v"] == (24, 24, 11)
    assert shapes["resblocks.0.activations.5.act.beta"] == (768,)
    assert shapes["resblocks.3.activations.0.downsample.lowpass.filter"] == (1, 1, 12)
    assert shapes["activation_post.upsample.filter"] == (1, 1, 12) and shapes["activation_post.act.alpha"] == (24,)
    assert shapes["conv_post.weight_v"] == (1, 24, 7) and "conv_post.bias" not in lay
    assert "resblocks.18.convs1.0.weight_v" not in lay and not any("speaker" in k or "cond" in k for k in lay)
    n = sum(math.prod(s) for s in shapes.values())
    assert abs(n - 112.2e6) < 0.1e6  # facts: 112.2 M
    # fp32 payload vs the published file size: the remainder (~0.07%) is zip/pickle overhead
    assert 0 < HUB_FILE_BYTES - 4 * n < 0.001 * HUB_FILE_BYTES
    with torch.device("meta"):
        module = BigVGANv2(OFFICIAL)
    own = module.state_dict()
    folded = bigvgan_v2_layout(OFFICIAL, weight_norm=False)
    assert set(own) == set(folded) and all(tuple(own[k].shape) == folded[k].shape for k in own)


# ------------------------------------------------------------------------------------------------- loading


def test_written_directory_loads_strictly(tiny_dir, tiny):
    assert json.loads((tiny_dir / CONFIG_FILE).read_text())["upsample_initial_channel"] == 128
    raw = torch.load(tiny_dir / CHECKPOINT_FILE, weights_only=True)
    assert set(raw) == {"generator"}
    assert set(raw["generator"]) == set(bigvgan_v2_layout(TINY))
    assert tiny.sampling_rate == 22050 and tiny.samples_per_frame == 256 and not tiny.training
    with torch.no_grad():
        out = tiny(_mel(7, 0))
    assert out.shape == (1, 1, 7 * 256) and out.dtype == torch.float32
    assert 0.01 < float(out.pow(2).mean().sqrt()) < 0.5  # random weights still make sound
    # weight norm folded exactly as remove_weight_norm(): g * v / ||v|| over all dims but 0
    g, v = raw["generator"]["ups.2.0.weight_g"], raw["generator"]["ups.2.0.weight_v"]
    want = g * v / v.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    torch.testing.assert_close(tiny.ups[2][0].weight, want, rtol=1e-6, atol=1e-7)


def test_folded_checkpoint_loads_to_the_same_model(tmp_path, tiny):
    write_random_bigvgan_v2(tmp_path, TINY_JSON, seed=3, weight_norm=False)
    raw = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["generator"]
    assert not any(k.endswith(("weight_g", "weight_v")) for k in raw) and "conv_pre.weight" in raw
    folded = load_bigvgan_v2(tmp_path)
    x = _mel(5, 1)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), tiny(x), rtol=0, atol=1e-6)


def test_seeds_are_deterministic_and_distinct():
    a = materialize(bigvgan_v2_layout(TINY), 5)
    b = materialize(bigvgan_v2_layout(TINY), 5)
    c = materialize(bigvgan_v2_layout(TINY), 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_pre.weight_v"], c["conv_pre.weight_v"])


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    return materialize(bigvgan_v2_layout(TINY), seed)


def test_missing_key_is_named():
    sd = _state()
    del sd["resblocks.4.convs2.1.weight_g"]
    with pytest.raises(CheckpointError, match=r"1 missing: resblocks\.4\.convs2\.1\.weight_g"):
        load_bigvgan_v2_state(BigVGANv2(TINY), {"generator": sd})


def test_unexpected_key_and_bias_mismatch_are_named():
    sd = _state()
    sd["conv_post.bias"] = torch.zeros(1)  # a use_bias_at_final=true checkpoint against a false config
    with pytest.raises(CheckpointError, match=r"unexpected: conv_post\.bias"):
        load_bigvgan_v2_state(BigVGANv2(TINY), {"generator": sd})


def test_wrong_shape_is_named():
    sd = _state()
    sd["conv_pre.weight_v"] = torch.zeros(128, 100, 7)  # a 100-band (24 kHz) vocoder
    want = r"'conv_pre\.weight_v' has shape \(128, 100, 7\), expected \(128, 80, 7\)"
    with pytest.raises(CheckpointError, match=want):
        load_bigvgan_v2_state(BigVGANv2(TINY), {"generator": sd})


def test_mixed_normalised_and_folded_is_rejected():
    sd = _state()
    g, v = sd.pop("conv_pre.weight_g"), sd.pop("conv_pre.weight_v")
    sd["conv_pre.weight"] = g * v / v.norm(dim=(1, 2), keepdim=True)
    with pytest.raises(CheckpointError, match=r"missing: conv_pre\.weight_g.*unexpected: conv_pre\.weight"):
        load_bigvgan_v2_state(BigVGANv2(TINY), {"generator": sd})


def test_bad_containers_values_and_files(tmp_path):
    m = BigVGANv2(TINY)
    with pytest.raises(CheckpointError, match="not a dict"):
        load_bigvgan_v2_state(m, [1, 2])
    with pytest.raises(CheckpointError, match="no 'generator' state dict"):
        load_bigvgan_v2_state(m, {"generator": {"a": 1}})
    sd = _state()
    sd["activation_post.act.alpha"] = torch.full((2,), float("nan"))
    with pytest.raises(CheckpointError, match=r"'activation_post\.act\.alpha' holds NaN"):
        load_bigvgan_v2_state(m, {"generator": sd})
    with pytest.raises(ModelFilesError, match="config.json' does not exist"):
        load_bigvgan_v2(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(TINY_JSON))
    with pytest.raises(ModelFilesError, match="bigvgan_generator.pt' does not exist"):
        load_bigvgan_v2(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_bigvgan_v2(tmp_path)


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"num_mels": None}, r"missing the required key 'num_mels'"),
        ({"snake_logscale": None}, r"missing the required key 'snake_logscale'"),
        ({"upsample_rates": 4}, r"'upsample_rates' must be a list"),
        ({"use_tanh_at_final": "no"}, r"'use_tanh_at_final' must be true or false"),
        ({"resblock": "2"}, r"only \"1\""),
        ({"activation": "relu"}, r"activation is 'relu'"),
        ({"hop_size": 300}, r"hop_size \(300\) differs"),
        ({"upsample_initial_channel": 100}, r"multiple of 2\^6"),
        ({"upsample_kernel_sizes": [8, 8, 4, 4, 4, 5]}, r"upsample_kernel_sizes\[5\]=5"),
        ({"resblock_dilation_sizes": [[1, 3, 5, 7]] * 3}, r"resblock_dilation_sizes\[0\]"),
    ],
)
def test_config_errors_name_the_key(change, pattern, tmp_path):
    data = dict(TINY_JSON)
    for k, v in change.items():
        if v is None:
            del data[k]
        else:
            data[k] = v
    path = tmp_path / CONFIG_FILE
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=pattern) as info:
        load_bigvgan_v2_config(path)
    assert "config.yaml" not in str(info.value)
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_bigvgan_v2_config(path)


def test_input_shape_errors(tiny):
    with pytest.raises(InputError, match=r"pass mel\.transpose\(1, 2\)"):
        tiny(torch.zeros(1, 9, 80))
    with pytest.raises(InputError, match="expected"):
        tiny(torch.zeros(80, 9))


# ------------------------------------------------------------------------------------------------- numerics


def _np_kaiser_sinc(cutoff: float, half_width: float, taps: int = 12) -> np.ndarray:
    """The alias-free Kaiser-windowed sinc low-pass, from its formula (numpy; even tap count)."""
    half = taps // 2
    atten = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    beta = 0.1102 * (atten - 8.7) if atten > 50 else (
        0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21) if atten >= 21 else 0.0)
    t = np.arange(-half, half) + 0.5
    h = 2 * cutoff * np.kaiser(taps, beta) * np.sinc(2 * cutoff * t)
    return h / h.sum()


def _np_upsample2(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """2x: replicate-pad 5 low-rate samples, zero-stuff, full convolution with 2*h, drop 15 samples per side."""
    pad = len(h) // 2 - 1
    xp = np.concatenate([np.repeat(x[:1], pad), x, np.repeat(x[-1:], pad)])
    stuffed = np.zeros(2 * len(xp) - 1)
    stuffed[::2] = xp
    y = np.convolve(stuffed, 2 * h)
    crop = pad * 2 + (len(h) - 2) // 2
    return y[crop: crop + 2 * len(x)]


def _np_downsample2(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Anti-alias low-pass (replicate pad 5 left / 6 right, correlation) keeping every second sample."""
    xp = np.concatenate([np.repeat(x[:1], len(h) // 2 - 1), x, np.repeat(x[-1:], len(h) // 2)])
    full = np.array([np.dot(xp[n:n + len(h)], h) for n in range(len(xp) - len(h) + 1)])
    return full[::2]


def test_activation1d_matches_direct_convolutions():
    torch.manual_seed(0)
    channels, n = 3, 41
    act = SnakeBeta(channels, logscale=True)
    with torch.no_grad():
        act.alpha.copy_(torch.tensor([0.3, -0.2, 0.1]))
        act.beta.copy_(torch.tensor([-0.4, 0.25, 0.0]))
    module = Activation1d(act)
    h = _np_kaiser_sinc(0.25, 0.3)
    np.testing.assert_allclose(module.upsample.filter.view(-1).numpy(), h, rtol=0, atol=1e-7)
    np.testing.assert_allclose(module.downsample.lowpass.filter.view(-1).numpy(), h, rtol=0, atol=1e-7)
    x = torch.randn(1, channels, n)
    with torch.no_grad():
        got_up = module.upsample(x)[0].double().numpy()
        got = module(x)[0].double().numpy()
    alpha, beta = np.exp(act.alpha.detach().double().numpy()), np.exp(act.beta.detach().double().numpy())
    for c in range(channels):
        up = _np_upsample2(x[0, c].double().numpy(), h)
        np.testing.assert_allclose(got_up[c], up, rtol=0, atol=2e-6)
        snake = up + np.sin(alpha[c] * up) ** 2 / (beta[c] + 1e-9)
        np.testing.assert_allclose(got[c], _np_downsample2(snake, h), rtol=0, atol=5e-6)
    assert got.shape == (channels, n)


def _wn(sd: dict, name: str) -> torch.Tensor:
    g, v = sd[name + ".weight_g"], sd[name + ".weight_v"]
    return g * v / v.pow(2).sum(dim=tuple(range(1, v.dim())), keepdim=True).sqrt()


def _reference_forward(sd: dict, cfg: dict, mel: torch.Tensor) -> torch.Tensor:
    """BigVGAN v2 written out with functional ops from the raw hub-style state dict (transposed-conv upsampling
    as the original writes it, not the module's polyphase form)."""

    def act(x, name):
        c = x.shape[1]
        up_f = sd[name + ".upsample.filter"].expand(c, -1, -1)
        y = 2 * F.conv_transpose1d(F.pad(x, (5, 5), mode="replicate"), up_f, stride=2, groups=c)[..., 15:-15]
        a = sd[name + ".act.alpha"].exp()[None, :, None]
        b = sd[name + ".act.beta"].exp()[None, :, None]
        y = y + torch.sin(a * y) ** 2 / (b + 1e-9)
        down_f = sd[name + ".downsample.lowpass.filter"].expand(c, -1, -1)
        return F.conv1d(F.pad(y, (5, 6), mode="replicate"), down_f, stride=2, groups=c)

    x = F.conv1d(mel, _wn(sd, "conv_pre"), sd["conv_pre.bias"], padding=3)
    n_k = len(cfg["resblock_kernel_sizes"])
    for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
        x = F.conv_transpose1d(x, _wn(sd, f"ups.{i}.0"), sd[f"ups.{i}.0.bias"], stride=u, padding=(k - u) // 2)
        total = 0
        for j, (ks, dils) in enumerate(zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"])):
            rb, y = f"resblocks.{i * n_k + j}", x
            for m, d in enumerate(dils):
                t = act(y, f"{rb}.activations.{2 * m}")
                t = F.conv1d(t, _wn(sd, f"{rb}.convs1.{m}"), sd[f"{rb}.convs1.{m}.bias"], padding=d * (ks - 1) // 2,
                             dilation=d)
                t = act(t, f"{rb}.activations.{2 * m + 1}")
                t = F.conv1d(t, _wn(sd, f"{rb}.convs2.{m}"), sd[f"{rb}.convs2.{m}.bias"], padding=(ks - 1) // 2)
                y = y + t
            total = total + y
        x = total / n_k
    x = F.conv1d(act(x, "activation_post"), _wn(sd, "conv_post"), sd.get("conv_post.bias"), padding=3)
    return torch.tanh(x) if cfg["use_tanh_at_final"] else x.clamp(-1, 1)


def test_generator_matches_functional_reference(tiny_dir, tiny):
    sd = torch.load(tiny_dir / CHECKPOINT_FILE, weights_only=True)["generator"]
    mel = _mel(9, 2, batch=2)
    with torch.no_grad():
        want = _reference_forward(sd, TINY_JSON, mel)
        got = tiny(mel)
    assert got.shape == want.shape == (2, 1, 9 * 256)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def _pre_final(model: BigVGANv2, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    hook = model.conv_post.register_forward_hook(lambda _m, _i, out: seen.__setitem__("pre", out.detach()))
    try:
        with torch.no_grad():
            out = model(mel)
    finally:
        hook.remove()
    return seen["pre"], out


@pytest.mark.parametrize("tanh", [False, True])
def test_final_bound_is_clamp_or_tanh(tanh):
    data = {**TINY_JSON, "use_tanh_at_final": tanh, "use_bias_at_final": tanh}
    cfg = parse_bigvgan_v2_config(data)
    sd = materialize(bigvgan_v2_layout(cfg), 1)
    sd["conv_post.weight_g"] = sd["conv_post.weight_g"] * 40  # drive the pre-activation well past +-1
    model = load_bigvgan_v2_state(BigVGANv2(cfg), {"generator": sd}).eval()
    pre, out = _pre_final(model, _mel(6, 3))
    assert float(pre.abs().max()) > 1.5 and float((pre.abs() < 0.9).float().mean()) > 0.05
    if tanh:
        torch.testing.assert_close(out, torch.tanh(pre), rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, pre.clamp(-1.0, 1.0), rtol=0, atol=0)
        assert float(out.abs().max()) == 1.0 and bool((out.abs() == 1.0).any())


def test_batch_rows_are_independent(tiny):
    a, b = _mel(6, 4), _mel(6, 5)
    with torch.no_grad():
        both = tiny(torch.cat([a, b]))
        torch.testing.assert_close(both[1:], tiny(b), rtol=0, atol=1e-6)


def test_onnx_export_matches_eager():
    """Exportability of the generator's code paths; two 16x stages (still 256x) keep the trace ~1 s."""
    import onnxruntime as ort

    cfg = parse_bigvgan_v2_config({**tiny_config_json(64), "upsample_rates": [16, 16],
                                   "upsample_kernel_sizes": [32, 32], "resblock_kernel_sizes": [3],
                                   "resblock_dilation_sizes": [[1, 3]]})
    small = load_bigvgan_v2_state(BigVGANv2(cfg), {"generator": materialize(bigvgan_v2_layout(cfg), 2)}).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(small, (_mel(4, 0),), buf, opset_version=17, dynamo=False, input_names=["mel"],
                          output_names=["wav"], dynamic_axes={"mel": {0: "batch", 2: "frames"},
                                                              "wav": {0: "batch", 2: "samples"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = _mel(11, 6)
    got = session.run(None, {"mel": x.numpy()})[0]
    assert got.shape == (1, 1, 11 * 256)
    with torch.no_grad():
        np.testing.assert_allclose(got, small(x).numpy(), rtol=0, atol=1e-5)
