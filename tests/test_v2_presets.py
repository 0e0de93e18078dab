"""IndexTTS2 presets: official file layout in both dependency layouts, determinism, strict loading, typed config
errors, and the real-size `v2` layout against the published parameter counts (meta device, nothing written)."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from engine_ref.errors import CheckpointError, ConfigError
from engine_ref.indextts2.config import load_v2_config, parse_v2_config, v2_config_to_mapping
from engine_ref.indextts2.loader import find_dependencies, load_v2_model
from engine_ref.indextts2.presets import component_shapes, preset_config, write_v2_preset
from triton_tts.cli import main as cli

MAIN_FILES = ["bpe.model", "config.yaml", "feat1.pt", "feat2.pt", "gpt.pth", "hf_cache", "qwen0.6bemo4-merge",
              "s2mel.pth", "wav2vec2bert_stats.pt"]
HUB_FILES = {  # repo folder -> files of its snapshot (facts §5)
    "models--facebook--w2v-bert-2.0": {"config.json", "preprocessor_config.json", "model.safetensors"},
    "models--amphion--MaskGCT": {"semantic_codec/model.safetensors"},
    "models--funasr--campplus": {"campplus_cn_common.bin"},
    "models--nvidia--bigvgan_v2_22khz_80band_256x": {"config.json", "bigvgan_generator.pt"},
}
FLAT_FILES = {"w2v-bert-2.0/config.json", "w2v-bert-2.0/preprocessor_config.json", "w2v-bert-2.0/model.safetensors",
              "semantic_codec_model.safetensors", "campplus_cn_common.bin", "bigvgan/config.json",
              "bigvgan/bigvgan_generator.pt"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p") / "tiny-hub"
    assert cli(["preset", "tiny-v2", "--out", str(out), "--layout", "hub", "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory) -> Path:
    return write_v2_preset("tiny-v2", tmp_path_factory.mktemp("p") / "tiny-flat", layout="flat")


def test_hub_layout_is_a_huggingface_cache_that_resolves_offline_and_loads(hub_dir):
    assert sorted(p.name for p in hub_dir.iterdir()) == MAIN_FILES
    cache = hub_dir / "hf_cache"  # REL's HF_HUB_CACHE=./checkpoints/hf_cache
    assert {p.name for p in cache.iterdir()} == set(HUB_FILES)
    for folder, files in HUB_FILES.items():
        rev = (cache / folder / "refs" / "main").read_text()
        assert re.fullmatch(r"[0-9a-f]{40}", rev)  # no trailing newline, as the hub writes it
        snap = cache / folder / "snapshots" / rev
        found = {str(p.relative_to(snap)) for p in snap.rglob("*") if not p.is_dir()}
        assert found == files
        for name in files:
            link = snap / name
            target = os.readlink(link)
            assert link.is_symlink() and not os.path.isabs(target) and target.startswith("../")
            blob = link.resolve()
            assert blob.parent == (cache / folder / "blobs").resolve() and blob.name == sha256(blob)
    deps = find_dependencies(hub_dir)
    assert all(v.startswith("hub") for v in deps.layouts.values()), deps.layouts
    loaded = load_v2_model(hub_dir)  # strict loads of every component, from the snapshots
    assert "snapshots" in str(loaded.dependencies.w2v_bert_dir) and "snapshots" in str(loaded.dependencies.campplus)


def test_flat_layout_and_determinism(flat_dir, hub_dir):
    flat = flat_dir / "hf_cache"
    assert {str(p.relative_to(flat)) for p in flat.rglob("*") if p.is_file()} == FLAT_FILES
    assert not any(p.is_symlink() for p in flat.rglob("*"))
    assert all(v.startswith("flat") for v in find_dependencies(flat_dir).layouts.values())
    # same seed, same bytes (the two layouts hold the same files)
    for name in ("gpt.pth", "s2mel.pth", "feat1.pt", "feat2.pt", "wav2vec2bert_stats.pt", "bpe.model", "config.yaml"):
        assert sha256(flat_dir / name) == sha256(hub_dir / name), name
    snap = next((hub_dir / "hf_cache" / "models--amphion--MaskGCT" / "snapshots").iterdir())
    assert sha256(flat / "semantic_codec_model.safetensors") == sha256(snap / "semantic_codec" / "model.safetensors")


def _farm(src: Path, dst: Path, replace: dict[str, object]) -> Path:
    """dst with links to src's entries, except the files in `replace` (written with torch.save)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name in replace:
            torch.save(replace[p.name], dst / p.name)
        else:
            (dst / p.name).symlink_to(p)
    return dst


def test_strict_loading_names_the_key(flat_dir, tmp_path):
    gpt = torch.load(flat_dir / "gpt.pth", weights_only=True)
    gpt.pop("emo_layer.weight")
    with pytest.raises(CheckpointError, match="emo_layer.weight"):
        load_v2_model(_farm(flat_dir, tmp_path / "a", {"gpt.pth": gpt}), verify=False)
    s2mel = torch.load(flat_dir / "s2mel.pth", weights_only=True)
    s2mel["net"]["gpt_layer"]["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="0.weight"):
        load_v2_model(_farm(flat_dir, tmp_path / "b", {"s2mel.pth": s2mel}), verify=False)


def test_config_errors_name_the_dotted_key(flat_dir):
    base = yaml.safe_load((flat_dir / "config.yaml").read_text())
    assert parse_v2_config(base) == load_v2_config(flat_dir / "config.yaml")

    def broken(edit) -> ConfigError:
        data = copy.deepcopy(base)
        edit(data)
        with pytest.raises(ConfigError) as info:
            parse_v2_config(data)
        return info.value

    assert "s2mel.DiT.hidden_dim" in str(broken(lambda d: d["s2mel"]["DiT"].pop("hidden_dim")))
    assert "vocoder.name" in str(broken(lambda d: d["vocoder"].pop("name")))
    assert "'emo_num'" in str(broken(lambda d: d.pop("emo_num")))
    assert "dataset.bpe_model" in str(broken(lambda d: d["dataset"].pop("bpe_model")))
    assert "gpt.model_dim" in str(broken(lambda d: d["gpt"].update(model_dim="wide")))
    assert "2.5" in str(broken(lambda d: d.update(version=2.5)))
    assert "semantic_codec.hidden_size" in str(broken(lambda d: d["semantic_codec"].update(hidden_size=48)))
    assert "8 positive" in str(broken(lambda d: d.update(emo_num=[3, 17])))


def test_v2_config_is_the_official_one():
    cfg = preset_config("v2")
    doc = v2_config_to_mapping(cfg)
    assert "feature_dim" not in doc["gpt"] and "emo_latent_dim" not in doc["gpt"]  # not official keys
    assert (doc["gpt"]["model_dim"], doc["gpt"]["layers"], doc["gpt"]["heads"]) == (1280, 24, 20)
    assert (doc["gpt"]["max_mel_tokens"], doc["gpt"]["max_text_tokens"], doc["gpt"]["number_text_tokens"]) == \
        (1815, 600, 12000)
    assert doc["gpt"]["emo_condition_module"] == {"output_size": 512, "linear_units": 1024, "attention_heads": 4,
                                                  "num_blocks": 4, "input_layer": "conv2d2", "perceiver_mult": 2}
    assert doc["semantic_codec"] == {"codebook_size": 8192, "hidden_size": 1024, "codebook_dim": 8, "vocos_dim": 384,
                                     "vocos_intermediate_dim": 2048, "vocos_num_layers": 12}
    dit = doc["s2mel"]["DiT"]
    assert (dit["hidden_dim"], dit["num_heads"], dit["depth"], dit["in_channels"]) == (512, 8, 13, 80)
    assert doc["emo_num"] == [3, 17, 2, 8, 4, 5, 10, 24] and doc["version"] == 2.0
    assert doc["vocoder"]["name"] == "nvidia/bigvgan_v2_22khz_80band_256x"
    assert doc["qwen_emo_path"] == "qwen0.6bemo4-merge"
    assert parse_v2_config(doc) == cfg  # round trip through the official key set


def _millions(shapes: dict, keep=lambda k: True) -> float:
    return sum(math.prod(s) for k, s in shapes.items() if keep(k)) / 1e6


def test_v2_layout_matches_the_published_parameter_counts():
    """facts §7 (computed from constructor code; gpt.pth 3,484,663,079 B = 4 B x (866.0 M + 5.1 M))."""
    sh = component_shapes("v2")
    g = sh["gpt"]
    pe = lambda k: k.endswith("pos_enc.pe")  # noqa: E731  stored conformer position tables (buffers)
    assert _millions(g, lambda k: not pe(k)) == pytest.approx(866.0, abs=0.05)
    assert _millions(g, pe) == pytest.approx(5.1, abs=0.05)
    assert 4 * (_millions(g) * 1e6) == pytest.approx(3_484_663_079, rel=1e-4)
    parts = {"conditioning_encoder.": 159.3, "perceiver_encoder.": 19.1, "emo_conditioning_encoder.": 146.6,
             "emo_perceiver_encoder.": 11.0, "gpt.": 472.3}
    for prefix, published in parts.items():
        assert _millions(g, lambda k: k.startswith(prefix) and not pe(k)) == pytest.approx(published, abs=0.05), prefix
    s = sh["s2mel"]
    assert _millions(s) == pytest.approx(103.7, abs=0.05)
    assert _millions(s, lambda k: ".transformer." in k) == pytest.approx(65.3, abs=0.05)  # DiT blocks
    assert _millions(s, lambda k: ".wavenet." in k) == pytest.approx(29.1, abs=0.05)
    assert _millions(s, lambda k: k.startswith("length_regulator.")) == pytest.approx(5.0, abs=0.05)
    assert _millions(s, lambda k: k.startswith("gpt_layer.")) == pytest.approx(0.5, abs=0.05)
    assert _millions(sh["semantic_codec"]) == pytest.approx(44.29, abs=0.005)
    assert _millions(sh["campplus"]) == pytest.approx(7.0, abs=0.1)
    assert _millions(sh["vocoder"]) == pytest.approx(112.2, abs=0.05)
    w2v = sh["w2v_bert"]
    assert _millions(w2v) == pytest.approx(580.5, abs=0.05)
    late = lambda k: any(k.startswith(f"encoder.layers.{i}.") for i in range(17, 24))  # noqa: E731
    assert _millions(w2v, lambda k: not late(k)) == pytest.approx(411, abs=0.5)  # the 17 layers loaded
