"""Speech conditioning path: Conformer encoder + perceiver resampler against the published gpt.pth layout."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

from engine_ref.modules.configs import ConditionModuleConfig, GPTConfig
from engine_ref.errors import ConfigError, InputError
from engine_ref.layout import materialize
from engine_ref.layout.conditioning import conditioning_layout
from engine_ref.modules.conformer import ConformerEncoder, RelPositionSelfAttention
from engine_ref.modules.perceiver import PerceiverResampler, SpeechConditioner


def make_cfg(model_dim: int, out: int, units: int, heads: int, blocks: int, mult: int = 2) -> GPTConfig:
    return GPTConfig(
        model_dim=model_dim, layers=2, heads=4, max_mel_tokens=100, max_text_tokens=100,
        number_text_tokens=100, number_mel_codes=8194, start_mel_token=8192, stop_mel_token=8193,
        start_text_token=0, stop_text_token=1, condition_type="conformer_perceiver",
        condition_module=ConditionModuleConfig(out, units, heads, blocks, "conv2d2", mult),
    )


TINY = make_cfg(64, 32, 128, 2, 2)
TINY_SAME_WIDTH = make_cfg(48, 48, 96, 2, 1)  # proj_context becomes an identity
V15 = make_cfg(1280, 512, 2048, 8, 6)


def loaded(cfg: GPTConfig, seed: int = 0) -> SpeechConditioner:
    model = SpeechConditioner(cfg)
    model.load_state_dict(materialize(conditioning_layout(cfg), seed), strict=True)
    return model.eval()


def log_mel_like(batch: int, frames: int, seed: int) -> torch.Tensor:
    """[B, 100, T] values in the range of a real log-mel (log(1e-7) .. ~2)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 100, frames, generator=g) * 2.5 - 5.0).clamp(min=math.log(1e-7))


# --- layout ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, TINY_SAME_WIDTH, V15], ids=["tiny", "same_width", "v1.5"])
def test_layout_matches_module_state_dict(cfg: GPTConfig) -> None:
    with torch.device("meta"):
        model = SpeechConditioner(cfg)
    module_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layout_shapes = {k: tuple(spec.shape) for k, spec in conditioning_layout(cfg).items()}
    assert sorted(module_shapes) == sorted(layout_shapes)
    assert module_shapes == layout_shapes


def test_v15_layout_has_published_shapes() -> None:
    layout = conditioning_layout(V15)
    expected = {
        "conditioning_encoder.embed.conv.0.weight": (512, 1, 3, 3),
        "conditioning_encoder.embed.out.0.weight": (512, 512 * 49),
        "conditioning_encoder.embed.pos_enc.pe": (1, 5000, 512),
        "conditioning_encoder.encoders.5.self_attn.linear_pos.weight": (512, 512),
        "conditioning_encoder.encoders.0.self_attn.pos_bias_u": (8, 64),
        "conditioning_encoder.encoders.0.feed_forward.w_1.weight": (2048, 512),
        "conditioning_encoder.encoders.0.conv_module.pointwise_conv1.weight": (1024, 512, 1),
        "conditioning_encoder.encoders.0.conv_module.depthwise_conv.weight": (512, 1, 15),
        "conditioning_encoder.after_norm.weight": (512,),
        "perceiver_encoder.latents": (32, 1280),
        "perceiver_encoder.proj_context.weight": (1280, 512),
        "perceiver_encoder.layers.1.0.to_q.weight": (512, 1280),
        "perceiver_encoder.layers.1.0.to_kv.weight": (1024, 1280),
        "perceiver_encoder.layers.1.0.to_out.weight": (1280, 512),
        "perceiver_encoder.layers.0.1.0.weight": (3412, 1280),
        "perceiver_encoder.layers.0.1.2.weight": (1280, 1706),
        "perceiver_encoder.norm.gamma": (1280,),
    }
    for key, shape in expected.items():
        assert tuple(layout[key].shape) == shape, key
    assert "conditioning_encoder.encoders.0.self_attn.linear_pos.bias" not in layout
    assert not any(k.startswith("perceiver_encoder.layers.2.") or k.startswith("conditioning_encoder.encoders.6.")
                   for k in layout)
    assert not any(".to_q.bias" in k or ".to_kv.bias" in k or ".to_out.bias" in k for k in layout)
    assert not any("proj_context" in k for k in conditioning_layout(TINY_SAME_WIDTH))


def test_strict_load_uses_stored_position_table() -> None:
    fresh = SpeechConditioner(TINY)
    model = loaded(TINY)
    pe = model.conditioning_encoder.embed.pos_enc.pe
    # Independent formula (float64): even channels sin(p * 10000^(-2i/d)), odd channels cos.
    d = TINY.condition_module.output_size
    pos = torch.arange(5000, dtype=torch.float64)[:, None]
    angle = pos * torch.pow(10000.0, -torch.arange(0, d, 2, dtype=torch.float64) / d)
    exact = torch.zeros(5000, d, dtype=torch.float64)
    exact[:, 0::2], exact[:, 1::2] = torch.sin(angle), torch.cos(angle)
    assert pe.shape == (1, 5000, d)
    assert torch.allclose(pe[0].double(), exact, atol=2**-8)  # bf16 keeps 8 significant bits
    assert torch.equal(pe, pe.to(torch.bfloat16).float())  # the loaded table is the bf16-rounded one
    assert not torch.equal(pe, fresh.conditioning_encoder.embed.pos_enc.pe)  # loaded, not regenerated


# --- masks, lengths, errors -------------------------------------------------------------------------------------


def test_mask_for_lengths() -> None:
    enc = loaded(TINY).conditioning_encoder
    mel = log_mel_like(4, 20, seed=1).transpose(1, 2)
    with torch.no_grad():
        hidden, mask = enc(mel, torch.tensor([20, 9, 3, 4]))
    assert hidden.shape == (4, 9, 32) and mask.shape == (4, 1, 9) and mask.dtype == torch.bool
    valid = [9, 4, 1, 1]  # (T - 1) // 2: output frame i covers input frames 2i..2i+2
    expected = torch.tensor([[j < n for j in range(9)] for n in valid]).unsqueeze(1)
    assert torch.equal(mask, expected)


def test_too_long_reference_raises_with_the_limit() -> None:
    assert ConformerEncoder(TINY.condition_module).max_mel_frames == 10000  # T' = (T-1)//2 must stay < 5000
    enc = ConformerEncoder(TINY.condition_module, pos_table_rows=16).eval()
    with torch.no_grad():
        hidden, _ = enc(torch.randn(1, 32, 100), torch.tensor([32]))  # T' = 15 < 16 rows: accepted
        assert hidden.shape == (1, 15, 32)
        with pytest.raises(InputError, match="at most 32 mel frames"):
            enc(torch.randn(1, 33, 100), torch.tensor([33]))


def test_bad_inputs_raise_input_errors() -> None:
    model = loaded(TINY)
    mel = log_mel_like(2, 30, seed=2)
    with pytest.raises(InputError, match="too short"):
        model(mel[:, :, :2], torch.tensor([2, 2]))
    with pytest.raises(InputError, match="lengths"):
        model(mel, torch.tensor([31, 30]))
    with pytest.raises(InputError, match="lengths"):
        model(mel, torch.tensor([2, 30]))
    with pytest.raises(InputError, match="integer"):
        model(mel, torch.tensor([30.0, 30.0]))
    with pytest.raises(InputError, match=r"\[batch, 100, frames\]"):
        model(mel.transpose(1, 2), torch.tensor([30, 30]))
    bad = mel.clone()
    bad[0, 3, 4] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        model(bad, torch.tensor([30, 30]))
    cm = TINY.condition_module
    with pytest.raises(ConfigError, match="conv2d2"):
        ConformerEncoder(ConditionModuleConfig(cm.output_size, cm.linear_units, cm.attention_heads,
                                               cm.num_blocks, "conv2d", cm.perceiver_mult))


# --- numerics ---------------------------------------------------------------------------------------------------


def test_padded_batch_equals_each_item_alone() -> None:
    model = loaded(TINY, seed=3)
    lengths = [64, 41, 3, 50, 17, 4]
    items = [log_mel_like(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    garbage = torch.Generator().manual_seed(99)
    batch = torch.randn(len(items), 100, max(lengths), generator=garbage) * 3.0  # padding must not matter
    for i, item in enumerate(items):
        batch[i, :, : item.shape[-1]] = item[0]
    lens = torch.tensor(lengths)
    with torch.no_grad():
        conds = model(batch, lens)
        hidden, mask = model.conditioning_encoder(batch.transpose(1, 2), lens)
        for i, item in enumerate(items):
            solo_conds = model(item, torch.tensor([item.shape[-1]]))
            solo_hidden, solo_mask = model.conditioning_encoder(item.transpose(1, 2), torch.tensor([item.shape[-1]]))
            n = solo_hidden.shape[1]
            assert bool(solo_mask.all()) and int(mask[i].sum()) == n
            assert (hidden[i, :n] - solo_hidden[0]).abs().max().item() < 1e-5
            assert (conds[i] - solo_conds[0]).abs().max().item() < 1e-5


def _rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """Transformer-XL relative shift (what a textbook port would add; IndexTTS does not)."""
    b, h, t1, t2 = scores.shape
    padded = torch.cat([scores.new_zeros(b, h, t1, 1), scores], dim=-1).view(b, h, t2 + 1, t1)
    return padded[:, :, 1:].reshape(b, h, t1, t2)


def test_attention_has_no_rel_shift() -> None:
    torch.manual_seed(5)
    dim, heads, t = 16, 2, 7
    attn = RelPositionSelfAttention(dim, heads)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, t, dim)
    pos = torch.randn(1, t, dim)
    key_mask = torch.tensor([[True] * t, [True] * 5 + [False] * 2]).unsqueeze(1)
    sd = {k: v.double() for k, v in attn.state_dict().items()}

    def reference(shift: bool) -> torch.Tensor:
        xd, pd, dk = x.double(), pos.double(), dim // heads
        q = (xd @ sd["linear_q.weight"].T + sd["linear_q.bias"]).view(2, t, heads, dk)
        k = (xd @ sd["linear_k.weight"].T + sd["linear_k.bias"]).view(2, t, heads, dk)
        v = (xd @ sd["linear_v.weight"].T + sd["linear_v.bias"]).view(2, t, heads, dk)
        p = (pd @ sd["linear_pos.weight"].T).view(1, t, heads, dk)
        ac = torch.einsum("bihd,bjhd->bhij", q + sd["pos_bias_u"], k)
        bd = torch.einsum("bihd,xjhd->bhij", q + sd["pos_bias_v"], p)
        scores = (ac + (_rel_shift(bd) if shift else bd)) / math.sqrt(dk)
        scores = scores.masked_fill(~key_mask[:, None], float("-inf"))
        out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(2, t, dim)
        return out @ sd["linear_out.weight"].T + sd["linear_out.bias"]

    with torch.no_grad():
        got = attn(x, key_mask, pos).double()
    assert (got - reference(shift=False)).abs().max().item() < 1e-5
    assert (got - reference(shift=True)).abs().max().item() > 1e-2  # the check can tell the two apart


def test_perceiver_matches_formula() -> None:
    torch.manual_seed(6)
    dim, ctx_dim, heads, dim_head, n_lat, mult = 24, 16, 2, 8, 4, 2
    per = PerceiverResampler(dim, dim_context=ctx_dim, ff_mult=mult, heads=heads, num_latents=n_lat,
                             dim_head=dim_head, depth=1)
    with torch.no_grad():
        for p in per.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    context = torch.randn(2, 5, ctx_dim)
    mask = torch.ones(2, n_lat + 5, dtype=torch.bool)
    mask[1, -2:] = False
    sd = {k: v.double() for k, v in per.state_dict().items()}
    ctx = context.double() @ sd["proj_context.weight"].T + sd["proj_context.bias"]
    lat = sd["latents"].expand(2, -1, -1)
    kv_in = torch.cat([lat, ctx], dim=1)
    q = (lat @ sd["layers.0.0.to_q.weight"].T).view(2, n_lat, heads, dim_head)
    kv = kv_in @ sd["layers.0.0.to_kv.weight"].T
    k = kv[..., : heads * dim_head].reshape(2, -1, heads, dim_head)
    v = kv[..., heads * dim_head :].reshape(2, -1, heads, dim_head)
    sim = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dim_head)
    sim = sim.masked_fill(~mask[:, None, None, :], float("-inf"))
    att = torch.einsum("bhij,bjhd->bihd", sim.softmax(-1), v).reshape(2, n_lat, heads * dim_head)
    lat = lat + att @ sd["layers.0.0.to_out.weight"].T
    inner = int(dim * mult * 2 / 3)
    h = lat @ sd["layers.0.1.0.weight"].T + sd["layers.0.1.0.bias"]
    gate = h[..., inner:]
    gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    lat = lat + (h[..., :inner] * gelu) @ sd["layers.0.1.2.weight"].T + sd["layers.0.1.2.bias"]
    expected = lat / lat.norm(dim=-1, keepdim=True) * math.sqrt(dim) * sd["norm.gamma"]
    with torch.no_grad():
        got = per(context, mask).double()
    assert got.shape == (2, n_lat, dim)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("cfg", [TINY, V15], ids=["tiny", "v1.5"])
def test_preset_init_gives_finite_unit_scale_outputs(cfg: GPTConfig) -> None:
    model = loaded(cfg, seed=7)
    pre_norm: list[torch.Tensor] = []
    model.perceiver_encoder.norm.register_forward_hook(lambda _m, args, _out: pre_norm.append(args[0]))
    mel = torch.cat([log_mel_like(1, 120, seed=20), log_mel_like(1, 120, seed=21)])
    with torch.no_grad():
        hidden, _ = model.conditioning_encoder(mel.transpose(1, 2), torch.tensor([120, 120]))
        conds = model(mel, torch.tensor([120, 120]))
    assert conds.shape == (2, 32, cfg.model_dim)
    assert bool(torch.isfinite(conds).all()) and bool(torch.isfinite(hidden).all())
    assert 0.5 < hidden.std().item() < 2.0
    assert 0.5 < conds.pow(2).mean().sqrt().item() < 2.0
    rms_before_norm = pre_norm[-1].pow(2).mean(-1).sqrt()
    assert 0.1 < rms_before_norm.min().item() and rms_before_norm.max().item() < 10.0
    assert conds.std(dim=1).mean().item() > 0.1  # latents differ from each other
    assert (conds[0] - conds[1]).abs().mean().item() > 1e-3  # and depend on the reference


def test_exports_to_onnx_with_dynamic_batch_and_time() -> None:
    import onnxruntime as ort

    model = loaded(TINY, seed=8)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (log_mel_like(2, 40, seed=30), torch.tensor([40, 31])), buf, input_names=["mel", "lengths"],
            output_names=["conds"], dynamic_axes={"mel": {0: "batch", 2: "frames"}, "lengths": {0: "batch"}},
            dynamo=False, opset_version=17,
        )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for batch, frames, lens in [(1, 90, [90]), (3, 57, [57, 20, 3])]:
        mel, lengths = log_mel_like(batch, frames, seed=frames), torch.tensor(lens)
        with torch.no_grad():
            expected = model(mel, lengths).numpy()
        got = session.run(None, {"mel": mel.numpy(), "lengths": lengths.numpy()})[0]
        assert np.abs(got - expected).max() < 1e-4
