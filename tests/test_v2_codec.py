"""MaskGCT semantic codec (RepCodec): layout, strict safetensors load, quantize and vq2emb.

The reference in this file is written from the published algorithm with raw tensors only (explicit weight-norm
formula, F.conv1d / F.layer_norm / erf GELU, nearest codeword by cosine similarity computed as a plain argmax of
normalised dot products), independent of the module's code. Real-size numbers come from facts §4
(44.29 M parameters, 177,183,712-byte file).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine_ref.errors import CheckpointError, ConfigError, InputError, ModelFilesError
from engine_ref.indextts2.semantic_codec import (INDEXTTS2_CODEC, SemanticCodec, SemanticCodecConfig, codec_layout,
                                                 load_semantic_codec, parse_semantic_codec_config)
from engine_ref.layout import materialize

TINY = SemanticCodecConfig(codebook_size=64, hidden_size=32, codebook_dim=4, vocos_dim=16, vocos_intermediate_dim=48,
                           vocos_num_layers=2)
Q = "quantizer.quantizers.0"


@pytest.fixture(scope="module")
def codec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("codec") / "model.safetensors"
    save_file(materialize(codec_layout(TINY), seed=11), str(path))
    return path


@pytest.fixture(scope="module")
def codec(codec_file):
    return load_semantic_codec(codec_file, TINY)


def wn(state, name):
    g, v = state[f"{name}.weight_g"], state[f"{name}.weight_v"]
    return g * v / v.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()


def reference_quantize(state, cfg, feats):
    """Raw-tensor RepCodec.quantize for [B, T, hidden] features: (codes, embedding)."""
    x = feats.transpose(1, 2)
    p = "encoder.0"
    x = F.conv1d(x, state[f"{p}.embed.weight"], state[f"{p}.embed.bias"], padding=3)
    d = cfg.vocos_dim
    x = F.layer_norm(x.transpose(1, 2), (d,), state[f"{p}.norm.weight"], state[f"{p}.norm.bias"], 1e-6).transpose(1, 2)
    for i in range(cfg.vocos_num_layers):
        b = f"{p}.convnext.{i}"
        h = F.conv1d(x, state[f"{b}.dwconv.weight"], state[f"{b}.dwconv.bias"], padding=3, groups=d).transpose(1, 2)
        h = F.layer_norm(h, (d,), state[f"{b}.norm.weight"], state[f"{b}.norm.bias"], 1e-6)
        h = h @ state[f"{b}.pwconv1.weight"].T + state[f"{b}.pwconv1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        h = h @ state[f"{b}.pwconv2.weight"].T + state[f"{b}.pwconv2.bias"]
        x = x + (state[f"{b}.gamma"] * h).transpose(1, 2)
    x = F.layer_norm(x.transpose(1, 2), (d,), state[f"{p}.final_layer_norm.weight"],
                     state[f"{p}.final_layer_norm.bias"], 1e-6)
    latent = x @ state["encoder.1.weight"].T + state["encoder.1.bias"]  # [B, T, hidden]
    z_e = latent @ wn(state, f"{Q}.in_project")[..., 0].T + state[f"{Q}.in_project.bias"]  # [B, T, dim]
    book = state[f"{Q}.codebook.weight"]
    cos = (z_e / z_e.norm(dim=-1, keepdim=True)) @ (book / book.norm(dim=-1, keepdim=True)).T
    codes = cos.argmax(dim=-1)
    emb = book[codes] @ wn(state, f"{Q}.out_project")[..., 0].T + state[f"{Q}.out_project.bias"]
    return codes, emb, cos


def test_layout_matches_published_size_and_module():
    layout = codec_layout(INDEXTTS2_CODEC)
    params = sum(math.prod(spec.shape) for spec in layout.values())
    assert params == 44_289_808  # facts §4: 44.29 M
    header = 177_183_712 - 4 * params  # fp32 payload + safetensors JSON header
    assert 0 < header < 50_000
    encoder = sum(math.prod(s.shape) for k, s in layout.items() if k.startswith("encoder."))
    assert round(encoder / 1e6, 1) == 22.1
    # folded layout == module state dict, key for key and shape for shape
    folded = {}
    for key, spec in layout.items():
        if key.endswith(".weight_v"):
            folded[key[: -len("_v")]] = tuple(spec.shape)
        elif not key.endswith(".weight_g"):
            folded[key] = tuple(spec.shape)
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in SemanticCodec(INDEXTTS2_CODEC).state_dict().items()}
    assert own == folded
    assert layout[f"{Q}.in_project.weight_g"].shape == (8, 1, 1)
    assert layout[f"{Q}.in_project.weight_v"].shape == (8, 1024, 1)
    assert layout[f"{Q}.codebook.weight"].shape == (8192, 8)


def test_quantize_matches_raw_tensor_reference(codec, codec_file):
    state = load_file(str(codec_file))
    feats = torch.randn(2, 23, TINY.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        codes, emb = codec.quantize(feats)
    ref_codes, ref_emb, cos = reference_quantize(state, TINY, feats)
    assert codes.shape == (2, 23) and codes.dtype == torch.long and emb.shape == (2, 23, TINY.hidden_size)
    # near-ties could legitimately flip; random data has none at this margin
    top2 = cos.topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-4
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-5)
    assert len(set(codes.flatten().tolist())) > 5  # not collapsed onto one codeword


def test_quantized_embedding_is_vq2emb_of_its_codes(codec):
    feats = torch.randn(1, 17, TINY.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes, emb = codec.quantize(feats)
        torch.testing.assert_close(codec.vq2emb(codes), emb, atol=1e-6, rtol=1e-6)


def test_vq2emb_decodes_every_row(codec, codec_file):
    state = load_file(str(codec_file))
    codes = torch.randint(0, TINY.codebook_size, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb = codec.vq2emb(codes)
        rows = torch.cat([codec.vq2emb(codes[i : i + 1]) for i in range(3)])
    expected = state[f"{Q}.codebook.weight"][codes] @ wn(state, f"{Q}.out_project")[..., 0].T \
        + state[f"{Q}.out_project.bias"]
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb, rows)
    # upstream's vq2emb(codes.unsqueeze(1)) indexes the quantizer axis: quantizer 0 gets codes[0:1] only
    upstream_view = codes.unsqueeze(1)[0]
    assert upstream_view.shape == (1, 9) and torch.equal(upstream_view[0], codes[0])
    assert not torch.allclose(emb[1], emb[0])
    with pytest.raises(InputError):
        codec.vq2emb(codes[0])


def test_masked_padded_row_equals_unpadded_run(codec):
    gen = torch.Generator().manual_seed(3)
    short, long = torch.randn(1, 11, 32, generator=gen), torch.randn(1, 20, 32, generator=gen)
    batch = torch.cat([torch.cat([short, 5.0 * torch.ones(1, 9, 32)], 1), long])
    mask = torch.tensor([[1] * 11 + [0] * 9, [1] * 20])
    with torch.no_grad():
        codes, emb = codec.quantize(batch, mask)
        c_short, e_short = codec.quantize(short)
        c_long, e_long = codec.quantize(long)
        unmasked_codes, unmasked = codec.quantize(batch)
    assert torch.equal(codes[0, :11], c_short[0]) and torch.equal(codes[1], c_long[0])
    torch.testing.assert_close(emb[0, :11], e_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[1], e_long[0], atol=1e-5, rtol=1e-5)
    # without the mask the padding leaks into the last valid frames (kernel-7 convs): the mask matters
    assert (unmasked[0, :11] - e_short[0]).abs().max() > 1e-3


def test_decoder_runs_and_is_distinct_from_encoder(codec):
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        out = codec.decode(x)
        enc = codec.encoder(x.transpose(1, 2))
    assert out.shape == (1, 6, 32) and torch.isfinite(out).all()
    assert not torch.allclose(out, enc)


def test_strict_load_names_bad_keys(codec_file, tmp_path):
    state = load_file(str(codec_file))

    def write(mutate):
        s = dict(state)
        mutate(s)
        path = tmp_path / "bad.safetensors"
        save_file(s, str(path))
        return path

    with pytest.raises(CheckpointError, match=r"missing 1: decoder\.0\.convnext\.1\.gamma"):
        load_semantic_codec(write(lambda s: s.pop("decoder.0.convnext.1.gamma")), TINY)
    with pytest.raises(CheckpointError, match=r"unexpected 1: quantizer\.quantizers\.1\.codebook\.weight"):
        load_semantic_codec(write(lambda s: s.update({"quantizer.quantizers.1.codebook.weight": torch.zeros(2)})),
                            TINY)
    with pytest.raises(CheckpointError, match=r"codebook\.weight' has shape \[64, 5\], expected \[64, 4\]"):
        load_semantic_codec(write(lambda s: s.update({f"{Q}.codebook.weight": torch.zeros(64, 5)})), TINY)
    with pytest.raises(CheckpointError):  # the real config against the tiny file
        load_semantic_codec(codec_file, INDEXTTS2_CODEC)
    with pytest.raises(ModelFilesError, match="does not exist"):
        load_semantic_codec(tmp_path / "absent.safetensors", TINY)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFilesError, match="cannot be read"):
        load_semantic_codec(tmp_path / "junk.safetensors", TINY)


def test_weight_norm_folded_into_plain_weights(codec, codec_file):
    state = load_file(str(codec_file))
    torch.testing.assert_close(codec.quantizer.quantizers[0].in_project.weight, wn(state, f"{Q}.in_project"))
    assert not any(k.endswith(("weight_g", "weight_v")) for k in codec.state_dict())


def test_config_section_parsing():
    section = dict(codebook_size=8192, hidden_size=1024, codebook_dim=8, vocos_dim=384, vocos_intermediate_dim=2048,
                   vocos_num_layers=12)
    assert parse_semantic_codec_config(section) == INDEXTTS2_CODEC
    with pytest.raises(ConfigError, match="semantic_codec.vocos_dim"):
        parse_semantic_codec_config({k: v for k, v in section.items() if k != "vocos_dim"})
    with pytest.raises(ConfigError, match="semantic_codec.codebook_dim"):
        parse_semantic_codec_config(dict(section, codebook_dim="8"))
    with pytest.raises(ConfigError, match="positive"):
        parse_semantic_codec_config(dict(section, vocos_num_layers=0))


def test_quantize_and_vq2emb_export_to_onnx(codec, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from export.common import export_onnx

    class Quantize(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, features, mask):
            return self.c.quantize(features, mask)

    class Decode(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, codes):
            return self.c.vq2emb(codes)

    axes = {0: "batch", 1: "frames"}
    export_onnx(Quantize(codec), (torch.randn(2, 12, 32), torch.ones(2, 12)), tmp_path / "q.onnx",
                ["features", "mask"], ["codes", "embedding"],
                {"features": axes, "mask": axes, "codes": axes, "embedding": axes})
    export_onnx(Decode(codec), (torch.zeros(2, 5, dtype=torch.long),), tmp_path / "e.onnx", ["codes"], ["embedding"],
                {"codes": axes, "embedding": axes})
    feats = torch.randn(3, 21, 32, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(3, 21)
    mask[1, 14:] = 0
    codes, emb = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"features": feats.numpy(),
                                                                           "mask": mask.numpy()})
    with torch.no_grad():
        ref_codes, ref_emb = codec.quantize(feats, mask)
        ref_dec = codec.vq2emb(ref_codes)
    assert (codes == ref_codes.numpy()).all()
    assert abs(emb - ref_emb.numpy()).max() < 1e-5
    dec = ort.InferenceSession(str(tmp_path / "e.onnx")).run(None, {"codes": ref_codes.numpy()})[0]
    assert abs(dec - ref_dec.numpy()).max() < 1e-5
