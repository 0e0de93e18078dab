"""IndexTTS2 semantic features: SeamlessM4T extractor -> w2v-BERT layer 17 (17 layers built) -> stats normalisation.

References independent of engine_ref.indextts2.features: transformers' own full-depth Wav2Vec2BertModel loaded
with from_pretrained (its hidden_states[17], default attention implementation), the stats file read with
torch.load and normalised by hand, transformers' extractor called the way upstream calls it, and the published
byte sizes of the hub's config files.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_ref.errors import CheckpointError, ConfigError, InputError, ModelFilesError
from engine_ref.indextts2 import features as feat

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=19, output_hidden_size=32,
            conv_depthwise_kernel_size=7)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("w2v")
    model_dir = feat.write_random_w2v_bert(root / "w2v-bert-2.0", TINY, seed=3)
    stats = feat.write_random_w2v_stats(root / "wav2vec2bert_stats.pt", hidden_size=32, seed=3)
    return model_dir, stats


@pytest.fixture(scope="module")
def front(snapshot):
    return feat.SemanticFrontEnd(*snapshot)


def clip(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def copy_snapshot(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_hub_config_files_have_the_published_sizes(snapshot):
    # facts §4: config.json 1,874 B, preprocessor_config.json 275 B. Our rebuilt contents serialise to exactly that.
    assert len(feat._hub_json(feat.HUB_CONFIG).encode()) == 1874
    assert len(feat._hub_json(feat.HUB_PREPROCESSOR_CONFIG).encode()) == 275
    written = json.loads((snapshot[0] / "preprocessor_config.json").read_text())
    assert written["padding_value"] == 1 and written["stride"] == 2 and written["feature_size"] == 80


def test_seventeen_layers_equal_full_model_hidden_state_17(snapshot, front):
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertModel

    model_dir, stats_path = snapshot
    assert len(front.encoder.w2v_bert.encoder.layers) == 17
    assert not any(k.startswith(("encoder.layers.17.", "encoder.layers.18."))
                   for k in front.encoder.w2v_bert.state_dict())

    audio = clip(12000, 0)
    # upstream's calls, verbatim in spirit: full model, output_hidden_states, hidden_states[17], stats by hand
    extractor = SeamlessM4TFeatureExtractor.from_pretrained(str(model_dir), local_files_only=True)
    inputs = extractor(torch.from_numpy(audio)[None], sampling_rate=16000, return_tensors="pt")
    full = Wav2Vec2BertModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.no_grad():
        hidden = full(input_features=inputs["input_features"], attention_mask=inputs["attention_mask"],
                      output_hidden_states=True).hidden_states
    assert len(hidden) == 20
    stats = torch.load(stats_path, weights_only=True)
    expected = (hidden[17] - stats["mean"]) / torch.sqrt(stats["var"])

    got, counts = front([audio])
    assert got.shape == expected.shape and int(counts[0]) == expected.shape[1]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    # and it is not simply the last layer of the full model
    assert (got - (hidden[19] - stats["mean"]) / torch.sqrt(stats["var"])).abs().max() > 1e-2
    assert float(got.std()) > 0.1


def test_padded_batch_rows_equal_unbatched_runs(front):
    # 12000 samples -> 73 fbank frames (odd: the last stacked frame is half padding and masked, kept like upstream)
    a, b = clip(12000, 1), clip(6400, 2)  # b: 38 fbank frames
    batch, counts = front([a, b])
    assert counts.tolist() == [37, 19]
    assert batch.shape[:2] == (2, 37)
    for row, audio in enumerate((a, b)):
        alone, n = front([audio])
        assert alone.shape[1] == int(n[0]) == int(counts[row])
        torch.testing.assert_close(batch[row, : counts[row]], alone[0], atol=1e-5, rtol=1e-5)


def test_input_features_mask_marks_odd_last_frame(front):
    inputs = feat.extract_input_features(front.extractor, [clip(12000, 1), clip(6400, 2)])
    assert inputs.input_features.shape == (2, 37, 160)
    assert inputs.attention_mask[0].tolist() == [1] * 36 + [0]  # 73 frames: the 37th stacked frame is masked
    assert inputs.attention_mask[1].tolist() == [1] * 19 + [0] * 18
    # padding_value 1 fills the missing half of the odd frame and the padded rows
    assert torch.all(inputs.input_features[0, 36, 80:] == 1.0)
    assert torch.all(inputs.input_features[1, 19:] == 1.0)


def test_too_short_clip_and_wrong_rate_are_input_errors(front):
    with pytest.raises(InputError, match="fbank frames"):
        front([np.zeros(500, np.float32)])
    with pytest.raises(InputError, match="16000 Hz"):
        feat.extract_input_features(front.extractor, [clip(4000, 0)], sample_rate=22050)


def test_missing_unexpected_and_misshaped_keys_are_named(snapshot, tmp_path):
    model_dir, _ = snapshot
    state = load_file(str(model_dir / "model.safetensors"))

    def variant(name, mutate):
        d = copy_snapshot(model_dir, tmp_path / name)
        s = dict(state)
        mutate(s)
        save_file(s, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    d = variant("missing", lambda s: s.pop("encoder.layers.3.self_attn.linear_q.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1: encoder\.layers\.3\.self_attn\.linear_q\.weight"):
        feat.load_w2v_bert(d)
    d = variant("unexpected", lambda s: s.update({"encoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1: encoder\.extra\.weight"):
        feat.load_w2v_bert(d)
    d = variant("beyond", lambda s: s.update({"encoder.layers.25.ffn1.output_dense.bias": torch.zeros(32)}))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.25"):  # past the config's 19 layers
        feat.load_w2v_bert(d)
    d = variant("shape", lambda s: s.update({"feature_projection.projection.bias": torch.zeros(31)}))
    with pytest.raises(CheckpointError, match=r"feature_projection\.projection\.bias' has shape \[31\]"):
        feat.load_w2v_bert(d)
    # the training-only SpecAugment vector may be absent; later layers are never read even if garbage-shaped
    d = variant("lenient", lambda s: (s.pop("masked_spec_embed"),
                                      s.update({"encoder.layers.18.ffn1.output_dense.bias": torch.zeros(3)})))
    model = feat.load_w2v_bert(d)
    ref = feat.load_w2v_bert(model_dir)
    x = torch.randn(1, 9, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, ref(x).last_hidden_state)


def test_missing_files_and_shallow_config(snapshot, tmp_path):
    model_dir, _ = snapshot
    with pytest.raises(ModelFilesError, match="does not exist"):
        feat.load_w2v_bert(tmp_path / "nowhere")
    d = copy_snapshot(model_dir, tmp_path / "nofile")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelFilesError, match="model.safetensors"):
        feat.load_w2v_bert(d)
    d = copy_snapshot(model_dir, tmp_path / "shallow")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_hidden_layers=16"):
        feat.load_w2v_bert(d)


def test_stats_file_checks(tmp_path):
    torch.save({"mean": torch.zeros(4)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="'mean' and 'var'"):
        feat.load_w2v_stats(tmp_path / "bad.pt")
    with pytest.raises(ModelFilesError):
        feat.load_w2v_stats(tmp_path / "absent.pt")
    feat.write_w2v_stats(tmp_path / "ok.pt", torch.tensor([1.0, 2.0]), torch.tensor([4.0, 9.0]))
    mean, std = feat.load_w2v_stats(tmp_path / "ok.pt")
    assert mean.tolist() == [1.0, 2.0] and std.tolist() == [2.0, 3.0]


def test_random_snapshot_is_deterministic(tmp_path):
    small = dict(TINY, num_hidden_layers=17)
    a = feat.write_random_w2v_bert(tmp_path / "a", small, seed=5)
    b = feat.write_random_w2v_bert(tmp_path / "b", small, seed=5)
    c = feat.write_random_w2v_bert(tmp_path / "c", small, seed=6)
    sa, sb, sc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["feature_projection.projection.weight"], sc["feature_projection.projection.weight"])
    assert "masked_spec_embed" in sa  # mask_time_prob 0.05 in the hub config: transformers saves it
