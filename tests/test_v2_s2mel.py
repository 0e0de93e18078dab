"""IndexTTS2 s2mel: layout, strict loading, and the DiT / regulator / CFM maths against hand-written references.

The references in this file are written from upstream's formulas (index-tts 41577b8) independently of
engine_ref.indextts2.s2mel: complex-number RoPE, explicit softmax attention, F.pad(mode='reflect') WaveNet convs,
F.interpolate(nearest) + F.group_norm regulator, and upstream's solve_euler loop with in-place prompt zeroing.
All on tiny random weights (dims ~32), so the file runs in seconds.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from engine_ref.errors import CheckpointError, ConfigError
from engine_ref.indextts2.s2mel import (
    S2Mel,
    euler_schedule,
    euler_step,
    load_s2mel,
    parse_s2mel_config,
    prompt_inputs,
    random_s2mel_net,
    s2mel_layout,
    target_mel_frames,
)
from engine_ref.indextts2.s2mel.config import indextts2_s2mel_defaults
from engine_ref.indextts2.s2mel.dit import TimestepEmbedder, apply_interleaved_rope, rope_cos_sin, rope_inverse_frequencies
from engine_ref.indextts2.s2mel.layout import SUBMODULES
from engine_ref.indextts2.s2mel.load import load_s2mel_state
from engine_ref.indextts2.s2mel.wavenet import ReflectConv1d

GPT_DIM = 20


def tiny_mapping() -> dict:
    m = copy.deepcopy(indextts2_s2mel_defaults())
    m["style_encoder"]["dim"] = 6
    m["length_regulator"].update(channels=24, in_channels=16, content_codebook_size=11, sampling_ratios=[1, 1])
    m["DiT"].update(hidden_dim=32, num_heads=2, depth=5, in_channels=10, content_dim=24, content_codebook_size=13)
    m["wavenet"].update(hidden_dim=32, num_layers=3, kernel_size=5, dilation_rate=2)
    return m


@pytest.fixture(scope="module")
def cfg():
    return parse_s2mel_config(tiny_mapping())


@pytest.fixture(scope="module")
def net(cfg):
    return random_s2mel_net(cfg, seed=1, gpt_latent_dim=GPT_DIM)


@pytest.fixture(scope="module")
def model(cfg, net):
    torch.manual_seed(0)
    m = S2Mel(cfg, GPT_DIM)
    load_s2mel_state(m, {"net": net})
    return m.eval()


# ---------------------------------------------------------------- hand-written references


def fold(net_sub: dict) -> dict:
    """w = g * v / ||v|| (norm over all dims but 0), written out."""
    out = {}
    for k, v in net_sub.items():
        if k.endswith(".weight_g"):
            continue
        if k.endswith(".weight_v"):
            g = net_sub[k[:-2] + "_g"]
            norm = v.flatten(1).norm(dim=1).reshape(g.shape)
            out[k[:-2]] = g * v / norm
        else:
            out[k] = v
    return out


def ref_rope(x: torch.Tensor, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Complex rotation: (x[2i] + i x[2i+1]) * exp(i * pos * 10000^(-2i/d))."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angle = positions.float()[:, None] * inv[None, :]
    rot = torch.polar(torch.ones_like(angle), angle)  # [T, D/2]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())  # [B, T, H, D/2]
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(3)


def ref_time(w: dict, prefix: str, t: torch.Tensor) -> torch.Tensor:
    args = 1000 * t[:, None] * w[prefix + "freqs"][None]
    feat = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    h = F.silu(F.linear(feat, w[prefix + "mlp.0.weight"], w[prefix + "mlp.0.bias"]))
    return F.linear(h, w[prefix + "mlp.2.weight"], w[prefix + "mlp.2.bias"])


def ref_adanorm(w: dict, prefix: str, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    proj = F.linear(c, w[prefix + "project_layer.weight"], w[prefix + "project_layer.bias"])
    rms = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w[prefix + "norm.weight"]
    return proj[..., :d] * rms + proj[..., d:]


def ref_dit(cfg, cfm_net: dict, x, prompt_x, t, style, mu) -> torch.Tensor:
    """Upstream DiT.forward for full-length rows (no padding), from the raw weights."""
    w = {k[len("estimator."):]: v for k, v in fold(cfm_net).items()}
    dit, wn = cfg.DiT, cfg.wavenet
    b, _, frames = x.shape
    heads, hd = dit.num_heads, dit.hidden_dim // dit.num_heads
    t1 = ref_time(w, "t_embedder.", t)
    xt = x.transpose(1, 2)
    parts = [xt, prompt_x.transpose(1, 2), F.linear(mu, w["cond_projection.weight"], w["cond_projection.bias"]),
             style[:, None, :].repeat(1, frames, 1)]
    h = F.linear(torch.cat(parts, -1), w["cond_x_merge_linear.weight"], w["cond_x_merge_linear.bias"])
    c = t1[:, None, :]
    pos = torch.arange(frames)
    stack = []
    for i in range(dit.depth):
        p = f"transformer.layers.{i}."
        if i > dit.depth // 2:
            h = F.linear(torch.cat([h, stack.pop()], -1), w[p + "skip_in_linear.weight"], w[p + "skip_in_linear.bias"])
        a = ref_adanorm(w, p + "attention_norm.", h, c)
        q, k, v = F.linear(a, w[p + "attention.wqkv.weight"]).chunk(3, dim=-1)
        q = ref_rope(q.reshape(b, frames, heads, hd), pos, hd).transpose(1, 2)
        k = ref_rope(k.reshape(b, frames, heads, hd), pos, hd).transpose(1, 2)
        v = v.reshape(b, frames, heads, hd).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        h = h + F.linear(att.transpose(1, 2).reshape(b, frames, -1), w[p + "attention.wo.weight"])
        f = ref_adanorm(w, p + "ffn_norm.", h, c)
        ff = F.silu(F.linear(f, w[p + "feed_forward.w1.weight"])) * F.linear(f, w[p + "feed_forward.w3.weight"])
        h = h + F.linear(ff, w[p + "feed_forward.w2.weight"])
        if i < dit.depth // 2:
            stack.append(h)
    h = ref_adanorm(w, "transformer.norm.", h, c)
    x_res = F.linear(torch.cat([h, xt], -1), w["skip_linear.weight"], w["skip_linear.bias"])
    y = F.linear(x_res, w["conv1.weight"], w["conv1.bias"]).transpose(1, 2)
    g = F.conv1d(ref_time(w, "t_embedder2.", t)[:, :, None], w["wavenet.cond_layer.conv.conv.weight"],
                 w["wavenet.cond_layer.conv.conv.bias"])
    hid = wn.hidden_dim
    skip = torch.zeros_like(y)
    for i in range(wn.num_layers):
        dil = wn.dilation_rate**i
        pad = (wn.kernel_size - 1) * dil // 2
        z = F.conv1d(F.pad(y, (pad, pad), mode="reflect"), w[f"wavenet.in_layers.{i}.conv.conv.weight"],
                     w[f"wavenet.in_layers.{i}.conv.conv.bias"], dilation=dil)
        z = z + g[:, 2 * hid * i: 2 * hid * (i + 1)]
        acts = torch.tanh(z[:, :hid]) * torch.sigmoid(z[:, hid:])
        rs = F.conv1d(acts, w[f"wavenet.res_skip_layers.{i}.conv.conv.weight"], w[f"wavenet.res_skip_layers.{i}.conv.conv.bias"])
        if i < wn.num_layers - 1:
            y = y + rs[:, :hid]
            skip = skip + rs[:, hid:]
        else:
            skip = skip + rs
    y = skip.transpose(1, 2) + F.linear(x_res, w["res_projection.weight"], w["res_projection.bias"])
    mod = F.linear(F.silu(t1), w["final_layer.adaLN_modulation.1.weight"], w["final_layer.adaLN_modulation.1.bias"])
    shift, scale = mod[:, :hid], mod[:, hid:]
    y = F.layer_norm(y, (hid,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    y = F.linear(y, w["final_layer.linear.weight"], w["final_layer.linear.bias"]).transpose(1, 2)
    return F.conv1d(y, w["conv2.weight"], w["conv2.bias"])


def ref_regulator(cfg, lr_net: dict, x: torch.Tensor, ylen: int) -> torch.Tensor:
    """Upstream InterpolateRegulator.forward for one row."""
    h = F.linear(x, lr_net["content_in_proj.weight"], lr_net["content_in_proj.bias"]).transpose(1, 2)
    h = F.interpolate(h, size=ylen, mode="nearest")
    n = len(cfg.length_regulator.sampling_ratios)
    for i in range(n):
        h = F.conv1d(h, lr_net[f"model.{3 * i}.weight"], lr_net[f"model.{3 * i}.bias"], padding=1)
        h = F.mish(F.group_norm(h, 1, lr_net[f"model.{3 * i + 1}.weight"], lr_net[f"model.{3 * i + 1}.bias"], eps=1e-5))
    h = F.conv1d(h, lr_net[f"model.{3 * n}.weight"], lr_net[f"model.{3 * n}.bias"])
    return h.transpose(1, 2)


def inputs(cfg, b: int, frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mels, content, style = cfg.DiT.in_channels, cfg.DiT.content_dim, cfg.style_encoder.dim
    return (torch.randn(b, mels, frames, generator=g), torch.randn(b, mels, frames, generator=g),
            torch.rand(b, generator=g), torch.randn(b, style, generator=g), torch.randn(b, frames, content, generator=g))


# ---------------------------------------------------------------- layout and loading


def _folded_layout(shapes: dict) -> dict:
    out = {}
    for k, s in shapes.items():
        if k.endswith(".weight_g"):
            continue
        out[k[:-2] if k.endswith(".weight_v") else k] = s
    return out


@pytest.mark.parametrize("size", ["tiny", "official"])
def test_layout_equals_module_keys_and_shapes(size, cfg):
    c = cfg if size == "tiny" else parse_s2mel_config(indextts2_s2mel_defaults())
    gpt_dim = GPT_DIM if size == "tiny" else 1280
    with torch.device("meta"):
        m = S2Mel(c, gpt_dim)
    layout = s2mel_layout(c, gpt_dim)
    assert set(layout) == set(SUBMODULES)
    for name in SUBMODULES:
        got = {k: tuple(v.shape) for k, v in getattr(m, name).state_dict().items()}
        assert got == _folded_layout(layout[name]), name
    if size == "official":
        cfm = layout["cfm"]
        assert cfm["estimator.cond_x_merge_linear.weight"] == (512, 864)
        assert cfm["estimator.skip_linear.weight"] == (512, 592)
        assert cfm["estimator.wavenet.cond_layer.conv.conv.weight_v"] == (8192, 512, 1)
        assert cfm["estimator.wavenet.res_skip_layers.7.conv.conv.weight_v"] == (512, 512, 1)
        assert cfm["estimator.final_layer.linear.weight_g"] == (512, 1)
        assert cfm["estimator.transformer.layers.12.feed_forward.w2.weight"] == (512, 1536)
        assert cfm["estimator.input_pos"] == (16384,) and cfm["estimator.t_embedder2.freqs"] == (128,)
        total = sum(math.prod(s) for sub in layout.values() for s in sub.values())
        assert abs(total - 103.7e6) < 0.1e6  # facts doc §7: 103.7 M (net ≈ 415 MB fp32)


def _write(tmp_path, net: dict, prefix: bool) -> str:
    stored = {name: {("module." + k if prefix else k): v for k, v in sub.items()} for name, sub in net.items()}
    path = tmp_path / "s2mel.pth"
    torch.save({"net": stored, "optimizer": {"state": {}, "lr": [torch.zeros(3)]}, "epoch": 7, "iters": 1234}, path)
    return str(path)


def test_strict_load_from_layout_file(tmp_path, cfg, net):
    path = _write(tmp_path, net, prefix=True)
    m = load_s2mel(path, cfg, gpt_latent_dim=GPT_DIM)
    sd = m.cfm.state_dict()
    g = net["cfm"]["estimator.wavenet.in_layers.1.conv.conv.weight_g"]
    v = net["cfm"]["estimator.wavenet.in_layers.1.conv.conv.weight_v"]
    expected = g * v / torch.sqrt((v * v).sum(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(sd["estimator.wavenet.in_layers.1.conv.conv.weight"], expected, rtol=1e-6, atol=1e-7)
    g, v = net["cfm"]["estimator.final_layer.linear.weight_g"], net["cfm"]["estimator.final_layer.linear.weight_v"]
    torch.testing.assert_close(sd["estimator.final_layer.linear.weight"], g * v / v.norm(dim=1, keepdim=True))
    assert torch.equal(sd["estimator.input_pos"], torch.arange(16384))
    assert torch.equal(m.gpt_layer.state_dict()["2.weight"], net["gpt_layer"]["2.weight"])
    assert torch.equal(m.length_regulator.state_dict()["model.4.bias"], net["length_regulator"]["model.4.bias"])
    assert not m.training


def test_missing_key_is_named(tmp_path, cfg, net):
    broken = {k: dict(v) for k, v in net.items()}
    del broken["cfm"]["estimator.transformer.layers.3.skip_in_linear.weight"]
    with pytest.raises(CheckpointError, match=r"net\['cfm'\].*missing 1 key.*layers\.3\.skip_in_linear\.weight"):
        load_s2mel(_write(tmp_path, broken, prefix=False), cfg, gpt_latent_dim=GPT_DIM)


def test_wrong_shape_is_named(tmp_path, cfg, net):
    broken = {k: dict(v) for k, v in net.items()}
    broken["length_regulator"]["content_in_proj.weight"] = torch.zeros(24, 17)
    with pytest.raises(CheckpointError, match=r"content_in_proj\.weight' has shape \[24, 17\].*\[24, 16\]"):
        load_s2mel(_write(tmp_path, broken, prefix=True), cfg, gpt_latent_dim=GPT_DIM)


def test_unexpected_key_and_missing_net_are_named(cfg, net):
    extra = {k: dict(v) for k, v in net.items()}
    extra["gpt_layer"]["3.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key.*3\.weight"):
        load_s2mel_state(S2Mel(cfg, GPT_DIM), {"net": extra})
    with pytest.raises(CheckpointError, match="lacks gpt_layer"):
        load_s2mel_state(S2Mel(cfg, GPT_DIM), {"net": {k: v for k, v in net.items() if k != "gpt_layer"}})


def test_config_errors_name_the_key():
    m = tiny_mapping()
    del m["DiT"]["hidden_dim"]
    with pytest.raises(ConfigError, match=r"s2mel\.DiT\.hidden_dim"):
        parse_s2mel_config(m)
    m = tiny_mapping()
    m["DiT"]["time_as_token"] = True
    with pytest.raises(ConfigError, match=r"s2mel\.DiT\.time_as_token"):
        parse_s2mel_config(m)
    official = parse_s2mel_config(indextts2_s2mel_defaults())
    assert official.DiT.ffn_dim == 1536 and official.preprocess_params.spect_params.fmax_hz is None


# ---------------------------------------------------------------- maths


def test_rope_is_interleaved_complex_rotation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 3, 8, generator=g)
    pos = torch.arange(7) + 5
    cos, sin = rope_cos_sin(pos, rope_inverse_frequencies(8))
    torch.testing.assert_close(apply_interleaved_rope(x, cos, sin), ref_rope(x, pos, 8), rtol=1e-6, atol=1e-6)
    # half-split ("rotate_half") pairing would differ
    half = torch.cat([x[..., :4] * cos[None, :, None] - x[..., 4:] * sin[None, :, None],
                      x[..., 4:] * cos[None, :, None] + x[..., :4] * sin[None, :, None]], -1)
    assert not torch.allclose(half, ref_rope(x, pos, 8), atol=1e-3)


def test_timestep_embedding_is_cos_then_sin():
    emb = TimestepEmbedder(16)
    t = torch.tensor([0.0, 0.04, 0.5, 0.96])
    i = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * i / 128)
    args = 1000.0 * t.double()[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()
    torch.testing.assert_close(emb.features(t), expected, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(emb.freqs, freqs.float())


def test_dit_matches_reference(model, cfg, net):
    x, prompt_x, t, style, mu = inputs(cfg, 2, 23)
    lens = torch.tensor([23, 23])
    with torch.no_grad():
        got = model.cfm.estimator(x, prompt_x, lens, t, style, mu)
    torch.testing.assert_close(got, ref_dit(cfg, net["cfm"], x, prompt_x, t, style, mu), rtol=1e-4, atol=1e-5)


def test_dit_padded_batch_rows_equal_solo(model, cfg):
    x, prompt_x, _, style, mu = inputs(cfg, 2, 26, seed=5)
    t = torch.tensor([0.2, 0.84])
    lens = torch.tensor([26, 17])
    est = model.cfm.estimator
    with torch.no_grad():
        batch = est(x, prompt_x, lens, t, style, mu)
        solo0 = est(x[:1], prompt_x[:1], lens[:1], t[:1], style[:1], mu[:1])
        solo1 = est(x[1:, :, :17], prompt_x[1:, :, :17], lens[1:], t[1:], style[1:], mu[1:, :17])
    torch.testing.assert_close(batch[:1], solo0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1:, :, :17], solo1, rtol=1e-5, atol=1e-5)


def test_reflect_conv_short_rows_follow_encodec_pad1d():
    conv = ReflectConv1d(3, 4, 5, dilation=1)
    for frames in (1, 2, 3, 6):
        x = torch.randn(1, 3, frames)
        # encodec pad1d: zero-extend to max_pad + 1 frames first, reflect, crop the extension
        extra = max(0, 2 - frames + 1)
        padded = F.pad(F.pad(x, (0, extra)), (2, 2), mode="reflect")[..., : frames + 4]
        expected = F.conv1d(padded, conv.conv.conv.weight, conv.conv.conv.bias)
        with torch.no_grad():
            torch.testing.assert_close(conv(x, torch.tensor([frames])), expected)


def test_length_regulator_matches_reference_and_is_batch_correct(model, cfg, net):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 7, 16, generator=g)
    x_lens, ylens = torch.tensor([7, 5]), torch.tensor([12, 9])
    with torch.no_grad():
        batch = model.length_regulator(x, x_lens, ylens)
        for row, (n, L) in enumerate(((7, 12), (5, 9))):
            ref = ref_regulator(cfg, net["length_regulator"], x[row: row + 1, :n], L)
            torch.testing.assert_close(batch[row: row + 1, :L], ref, rtol=1e-4, atol=1e-5)
            solo = model.length_regulator(x[row: row + 1, :n], x_lens[row: row + 1], ylens[row: row + 1])
            torch.testing.assert_close(batch[row: row + 1, :L], solo, rtol=1e-5, atol=1e-5)
        assert torch.all(batch[1, 9:] == 0)
        # 50 codes -> 86 frames: a non-integer ratio through torch's own nearest rule
        x = torch.randn(1, 50, 16, generator=g)
        torch.testing.assert_close(model.length_regulator(x, torch.tensor([50]), torch.tensor([86])),
                                   ref_regulator(cfg, net["length_regulator"], x, 86), rtol=1e-4, atol=1e-5)


def test_target_frames_use_float32_products():
    got = target_mel_frames(torch.tensor([25, 50, 1, 100, 7]))
    assert got.tolist() == [43, 86, 1, 172, 12]  # float64 would give 42 for 25 codes


def test_one_euler_step_is_cfg_of_two_independent_calls(model, cfg):
    est = model.cfm.estimator
    x, prompt_mel, _, style, mu = inputs(cfg, 1, 21, seed=11)
    tp = 6
    x0, prompt_x = prompt_inputs(x, prompt_mel[:, :, :tp], torch.tensor([tp]))
    lens, t, dt = torch.tensor([21]), torch.tensor([0.36]), torch.tensor([0.04])
    with torch.no_grad():
        v_c = est(x0, prompt_x, lens, t, style, mu)
        v_u = est(x0, torch.zeros_like(prompt_x), lens, t, torch.zeros_like(style), torch.zeros_like(mu))
        expected = x0 + 0.04 * (1.7 * v_c - 0.7 * v_u)
        expected[:, :, :tp] = 0
        got = euler_step(est, x0, prompt_x, lens, torch.tensor([tp]), t, dt, style, mu, cfg_rate=0.7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(x0[:, :, :tp] == 0) and torch.equal(prompt_x[:, :, :tp], prompt_mel[:, :, :tp])


def test_euler_step_batches_independent_requests(model, cfg):
    est = model.cfm.estimator
    x, prompt_x, _, style, mu = inputs(cfg, 2, 24, seed=13)
    lens, plens = torch.tensor([24, 15]), torch.tensor([5, 3])
    t, dt = torch.tensor([0.0, 0.6]), torch.tensor([0.04, 0.04])
    with torch.no_grad():
        batch = euler_step(est, x, prompt_x, lens, plens, t, dt, style, mu)
        solo = euler_step(est, x[1:, :, :15], prompt_x[1:, :, :15], lens[1:], plens[1:], t[1:], dt[1:], style[1:], mu[1:, :15])
    torch.testing.assert_close(batch[1:, :, :15], solo, rtol=1e-5, atol=1e-5)
    assert torch.all(batch[1, :, 15:] == 0) and torch.all(batch[:, :, :3] == 0)


def upstream_solve_euler(est, z, prompt, mu, style, n_steps, cfg_rate):
    """BASECFM.solve_euler as written upstream (batch-2 CFG, t accumulated, in-place prompt zeroing)."""
    t_span = torch.linspace(0, 1, n_steps + 1)
    t = t_span[0]
    x = z.clone()
    tp = prompt.size(-1)
    prompt_x = torch.zeros_like(x)
    prompt_x[..., :tp] = prompt[..., :tp]
    x[..., :tp] = 0
    x_lens = torch.LongTensor([mu.size(1)])
    for step in range(1, len(t_span)):
        dt = t_span[step] - t_span[step - 1]
        out = est(torch.cat([x, x]), torch.cat([prompt_x, torch.zeros_like(prompt_x)]), torch.cat([x_lens, x_lens]),
                  torch.cat([t.unsqueeze(0), t.unsqueeze(0)]), torch.cat([style, torch.zeros_like(style)]),
                  torch.cat([mu, torch.zeros_like(mu)]))
        v_c, v_u = out.chunk(2, dim=0)
        x = x + dt * ((1.0 + cfg_rate) * v_c - cfg_rate * v_u)
        t = t + dt
        x[:, :, :tp] = 0
    return x[:, :, tp:]


def test_sample_matches_upstream_loop_and_is_deterministic(model, cfg):
    _, prompt_mel, _, style, mu = inputs(cfg, 1, 20, seed=17)
    prompt = prompt_mel[:, :, :7]
    shape = (1, cfg.DiT.in_channels, 20)
    with torch.no_grad():
        a = model.cfm.sample(mu, prompt, style, n_steps=4, generator=torch.Generator().manual_seed(3))
        b = model.cfm.sample(mu, prompt, style, n_steps=4, generator=torch.Generator().manual_seed(3))
        c = model.cfm.sample(mu, prompt, style, n_steps=4, generator=torch.Generator().manual_seed(4))
        z = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        d = model.cfm.sample(mu, prompt, style, n_steps=4, noise=z)
        ref = upstream_solve_euler(model.cfm.estimator, z, prompt, mu, style, 4, 0.7)
    assert a.shape == (1, cfg.DiT.in_channels, 13)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.allclose(a, c)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


def test_euler_schedule_accumulates_t():
    t, dt = euler_schedule(25)
    span = torch.linspace(0, 1, 26)
    assert t.dtype == torch.float32 and t.shape == (25,)
    assert torch.equal(dt, span[1:] - span[:-1])
    acc = span[0]
    for k in range(25):
        assert torch.equal(t[k], acc)
        acc = acc + (span[k + 1] - span[k])


def test_s2mel_glue_shapes(model, cfg):
    g = torch.Generator().manual_seed(21)
    prompt_cond = model.prompt_condition(torch.randn(1, 9, 16, generator=g), 15)
    cond = model.target_condition(torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, GPT_DIM, generator=g), torch.tensor([5]))
    mel = model.generate_mel(prompt_cond, cond, torch.randn(1, cfg.DiT.in_channels, 15, generator=g),
                             torch.randn(1, 6, generator=g), n_steps=2, generator=torch.Generator().manual_seed(0))
    assert prompt_cond.shape == (1, 15, 24) and cond.shape == (1, 8, 24) and mel.shape == (1, cfg.DiT.in_channels, 8)
    assert torch.isfinite(mel).all()


# ---------------------------------------------------------------- ONNX


def test_estimator_and_regulator_export_to_onnx_with_dynamic_batch_and_length(tmp_path, model, cfg):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from export.common import export_onnx

    est = model.cfm.estimator
    x, prompt_x, t, style, mu = inputs(cfg, 2, 16)
    path = tmp_path / "dit.onnx"
    names = ["x", "prompt_x", "x_lens", "t", "style", "cond"]
    dyn = {"x": {0: "B", 2: "T"}, "prompt_x": {0: "B", 2: "T"}, "x_lens": {0: "B"}, "t": {0: "B"}, "style": {0: "B"},
           "cond": {0: "B", 1: "T"}, "v": {0: "B", 2: "T"}}
    export_onnx(est, (x, prompt_x, torch.tensor([16, 12]), t, style, mu), path, names, ["v"], dyn)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, prompt_x, t, style, mu = inputs(cfg, 3, 29, seed=2)
    lens = torch.tensor([29, 20, 11])
    feed = dict(zip(names, (x.numpy(), prompt_x.numpy(), lens.numpy(), t.numpy(), style.numpy(), mu.numpy())))
    with torch.no_grad():
        expected = est(x, prompt_x, lens, t, style, mu)
    got = torch.from_numpy(sess.run(None, feed)[0])
    for row, n in enumerate(lens.tolist()):
        torch.testing.assert_close(got[row, :, :n], expected[row, :, :n], rtol=1e-4, atol=1e-4)

    reg = model.length_regulator
    rpath = tmp_path / "regulator.onnx"
    export_onnx(reg, (torch.randn(2, 6, 16), torch.tensor([6, 4]), torch.tensor([10, 7])), rpath,
                ["x", "x_lens", "ylens"], ["cond"], {"x": {0: "B", 1: "N"}, "x_lens": {0: "B"}, "ylens": {0: "B"},
                                                      "cond": {0: "B", 1: "T"}})
    rs = ort.InferenceSession(str(rpath), providers=["CPUExecutionProvider"])
    xr, xl, yl = torch.randn(3, 9, 16), torch.tensor([9, 5, 8]), torch.tensor([15, 9, 14])
    got = torch.from_numpy(rs.run(None, {"x": xr.numpy(), "x_lens": xl.numpy(), "ylens": yl.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, reg(xr, xl, yl), rtol=1e-4, atol=1e-5)
