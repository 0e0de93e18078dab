"""IndexTTS2 model directories in the official on-disk layout, with deterministic random weights.

A preset writes what the IndexTeam/IndexTTS-2 repo ships (config.yaml, gpt.pth, s2mel.pth, bpe.model,
wav2vec2bert_stats.pt, feat1.pt, feat2.pt, qwen0.6bemo4-merge/) and the four Hugging Face dependencies upstream
fetches at start-up (facebook/w2v-bert-2.0, amphion/MaskGCT semantic_codec, funasr/campplus,
nvidia/bigvgan_v2_22khz_80band_256x), every file from the component modules' published layouts and writers.
The dependencies go in either or both places upstream reads them from (`layout`):
- "flat": ``<out>/hf_cache/{w2v-bert-2.0/, semantic_codec_model.safetensors, campplus_cn_common.bin, bigvgan/}``
  (upstream HEAD's ensure_models_available layout);
- "hub": a Hugging Face cache ``models--org--name/{refs/main, snapshots/<rev>/..., blobs/}`` with relative
  symlinks into blobs/ (what hf_hub_download leaves). By default it goes in ``<out>/hf_cache/`` too, where REL
  puts its cache (infer_v2 sets HF_HUB_CACHE=./checkpoints/hf_cache), so both layouts resolve without a
  --cache-dir; `hub_dir` moves it elsewhere (e.g. "hf_hub", then pass that folder as the cache dir);
- "both" (default): the flat files are hard links to the hub blobs where the filesystem allows (no extra space).

`tiny-v2` shrinks every width and depth (CAMPPlus keeps its fixed real size; mel bands, sample rate, hop, codebook
size and emo_num are the official ones; the vocoder keeps its rates and kernels with one AMP block per stage, w2v-BERT
has 18 layers so the loader's skipping of layers past 17 runs) so the whole pipeline runs in about a second on a
CPU; `v2` has the real sizes (about 8 GB; benchmarks only). Both write a TINY random Qwen emotion model (the real
one is a 0.6 B Qwen3 fine-tune; text emotion only needs the file layout here). The random GPT stops by itself
after about `target_codes` codes (the shared stop ramp of the 1.x layouts). The revisions in refs/main are
deterministic stand-ins, not the hub's commit hashes.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from engine_ref.errors import InputError
from engine_ref.indextts2.campplus import EMBEDDING_SIZE, campplus_layout
from engine_ref.indextts2.config import IndexTTS2Config, parse_v2_config, v2_config_to_mapping
from engine_ref.indextts2.emotion import EMO_NUM
from engine_ref.indextts2.gpt.config import INDEXTTS2_GPT, GPTv2Config
from engine_ref.indextts2.gpt.layout import gpt_v2_layout
from engine_ref.indextts2.hub import DEPENDENCIES, FLAT_DIR
from engine_ref.indextts2.s2mel.config import indextts2_s2mel_defaults
from engine_ref.indextts2.s2mel.layout import random_s2mel_net, s2mel_layout
from engine_ref.indextts2.semantic_codec import INDEXTTS2_CODEC, SemanticCodecConfig, codec_layout
from engine_ref.layout import TensorSpec, materialize, materialize_tensor
from engine_ref.modules.conformer import ConditionModuleConfig

log = logging.getLogger("engine_ref.indextts2.presets")

__all__ = ["PresetV2", "V2_PRESETS", "v2_preset_names", "write_v2_preset", "preset_config", "HUB_DIR",
           "component_shapes"]

HUB_DIR = FLAT_DIR  # default place of a preset's Hugging Face cache: REL's HF_HUB_CACHE=./checkpoints/hf_cache
LAYOUTS = ("flat", "hub", "both")


@dataclass(frozen=True)
class PresetV2:
    name: str
    config: IndexTTS2Config
    w2v_overrides: dict = field(default_factory=dict)  # replaces fields of the hub w2v-bert-2.0 config.json
    bigvgan_overrides: dict = field(default_factory=dict)  # replaces fields of the release's BigVGAN config.json
    bpe_vocab: int = 12000
    target_codes: int = 120
    tiny_widths_in_config: bool = False  # write gpt.feature_dim / emo_latent_dim (not official keys)
    description: str = ""


def _s2mel_section(tiny: bool) -> dict:
    m = copy.deepcopy(indextts2_s2mel_defaults())
    if tiny:
        m["length_regulator"].update(channels=32, in_channels=32, content_codebook_size=16, sampling_ratios=[1, 1])
        m["DiT"].update(hidden_dim=32, num_heads=2, depth=3, content_dim=32, content_codebook_size=16)
        m["wavenet"].update(hidden_dim=32, num_layers=2, kernel_size=5, dilation_rate=1)
    return m


def _config_mapping(gpt: GPTv2Config, codec: SemanticCodecConfig, tiny: bool) -> dict:
    """Build the config.yaml mapping for these sections through the real parser (so presets cannot drift)."""
    return {
        "dataset": {"bpe_model": "bpe.model"},
        "gpt": {**{k: v for k, v in vars(gpt).items() if k not in ("condition_module", "emo_condition_module")},
                "condition_module": vars(gpt.condition_module), "emo_condition_module": vars(gpt.emo_condition_module)},
        "semantic_codec": vars(codec),
        "s2mel": _s2mel_section(tiny),
        "gpt_checkpoint": "gpt.pth",
        "w2v_stat": "wav2vec2bert_stats.pt",
        "s2mel_checkpoint": "s2mel.pth",
        "emo_matrix": "feat2.pt",
        "spk_matrix": "feat1.pt",
        "emo_num": list(EMO_NUM),
        "qwen_emo_path": "qwen0.6bemo4-merge",
        "vocoder": {"type": "bigvgan", "name": "nvidia/bigvgan_v2_22khz_80band_256x"},
        "version": 2.0,
    }


_TINY_WIDTH = 32
_TINY_GPT = GPTv2Config(
    model_dim=64, layers=2, heads=4, max_mel_tokens=1815, max_text_tokens=600, number_text_tokens=512,
    number_mel_codes=8194, start_mel_token=8192, stop_mel_token=8193, start_text_token=0, stop_text_token=1,
    condition_type="conformer_perceiver",
    condition_module=ConditionModuleConfig(32, 128, 2, 2, "conv2d2", 2),
    emo_condition_module=ConditionModuleConfig(32, 64, 2, 1, "conv2d2", 2),
    feature_dim=_TINY_WIDTH, emo_latent_dim=_TINY_WIDTH,
)
_TINY_CODEC = SemanticCodecConfig(codebook_size=8192, hidden_size=_TINY_WIDTH, codebook_dim=8, vocos_dim=16,
                                  vocos_intermediate_dim=48, vocos_num_layers=2)
# Same rates, kernels and 256x hop as the release; 128 channels and one AMP block per stage instead of three.
_TINY_BIGVGAN = {"upsample_initial_channel": 128, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]]}
_TINY_W2V = dict(hidden_size=_TINY_WIDTH, num_attention_heads=2, intermediate_size=64, num_hidden_layers=18,
                 output_hidden_size=_TINY_WIDTH, conv_depthwise_kernel_size=7)

V2_PRESETS: dict[str, PresetV2] = {
    "tiny-v2": PresetV2(
        "tiny-v2", parse_v2_config(_config_mapping(_TINY_GPT, _TINY_CODEC, tiny=True), "tiny-v2"),
        w2v_overrides=_TINY_W2V, bigvgan_overrides=_TINY_BIGVGAN, bpe_vocab=512, target_codes=24,
        tiny_widths_in_config=True,
        description="IndexTTS2 pipeline in seconds on CPU (tests, demo); CAMPPlus at its real size",
    ),
    "v2": PresetV2(
        "v2", parse_v2_config(_config_mapping(INDEXTTS2_GPT, INDEXTTS2_CODEC, tiny=False), "v2"),
        description="IndexTTS-2 real sizes (several GB; benchmarks only)",
    ),
}


def v2_preset_names() -> list[str]:
    return list(V2_PRESETS)


def preset_config(name: str) -> IndexTTS2Config:
    return _preset(name).config


def _preset(name: str) -> PresetV2:
    if name not in V2_PRESETS:
        raise InputError(f"unknown IndexTTS2 preset '{name}'", f"choose one of: {', '.join(V2_PRESETS)}")
    return V2_PRESETS[name]


def _bigvgan_json(preset: PresetV2) -> dict:
    from engine_ref.indextts2.vocoder import official_config_json

    return {**official_config_json(), **preset.bigvgan_overrides}


def component_shapes(name: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per file, key -> shape of what `write_v2_preset` writes, without materialising any tensor.

    Keys: gpt, s2mel (the three ``net`` entries flattened as ``<sub>.<key>``), semantic_codec, campplus, vocoder,
    w2v_bert (built on the meta device from the preset's config.json). Used to check sizes against the release.
    """
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    from engine_ref.indextts2.features import HUB_CONFIG
    from engine_ref.indextts2.vocoder import parse_bigvgan_v2_config
    from engine_ref.indextts2.vocoder_layout import bigvgan_v2_layout

    preset = _preset(name)
    cfg = preset.config
    s2mel = {f"{sub}.{k}": shape for sub, shapes in s2mel_layout(cfg.s2mel, cfg.gpt.model_dim).items()
             for k, shape in shapes.items()}
    w2v_cfg = Wav2Vec2BertConfig(**{**HUB_CONFIG, **preset.w2v_overrides})
    with torch.device("meta"):
        w2v = {k: tuple(v.shape) for k, v in Wav2Vec2BertModel(w2v_cfg).state_dict().items()}
    return {
        "gpt": {k: s.shape for k, s in gpt_v2_layout(cfg.gpt).items()},
        "s2mel": s2mel,
        "semantic_codec": {k: s.shape for k, s in codec_layout(cfg.semantic_codec).items()},
        "campplus": {k: s.shape for k, s in campplus_layout().items()},
        "vocoder": {k: s.shape for k, s in bigvgan_v2_layout(parse_bigvgan_v2_config(_bigvgan_json(preset))).items()},
        "w2v_bert": w2v,
    }


# ---- writing ----

def _emotion_matrices(cfg: IndexTTS2Config, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """feat1.pt [73, 192] and feat2.pt [73, model_dim]: N(0, 1) rows (emovec-sized entries)."""
    rows = sum(cfg.emo_num)
    spk = materialize_tensor("feat1", TensorSpec((rows, EMBEDDING_SIZE), init="normal", std=1.0), seed)
    emo = materialize_tensor("feat2", TensorSpec((rows, cfg.gpt.model_dim), init="normal", std=1.0), seed)
    return spk, emo


def _write_dependencies(stage: Path, preset: PresetV2, seed: int) -> None:
    """Each dependency's files under its flat name in `stage` (hf_cache/ layout)."""
    from safetensors.torch import save_file

    from engine_ref.indextts2.features import write_random_w2v_bert
    from engine_ref.indextts2.vocoder import write_random_bigvgan_v2

    cfg = preset.config
    write_random_w2v_bert(stage / "w2v-bert-2.0", preset.w2v_overrides, seed=seed + 1)
    codec = materialize(codec_layout(cfg.semantic_codec), seed + 2)
    save_file({k: v.contiguous() for k, v in codec.items()}, str(stage / "semantic_codec_model.safetensors"),
              metadata={"format": "pt"})
    del codec
    torch.save(materialize(campplus_layout(), seed + 3), stage / "campplus_cn_common.bin")
    write_random_bigvgan_v2(stage / "bigvgan", _bigvgan_json(preset), seed=seed + 4)


def _revision(repo: str, seed: int) -> str:
    return hashlib.sha1(f"triton-tts preset snapshot of {repo}, seed {seed}".encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _place(src: Path, dst: Path, move: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if move:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links: a copy
        shutil.copy2(src, dst)


def _arrange(stage: Path, out: Path, layout: str, seed: int, hub_dir: str) -> None:
    """Move the staged flat files into the hub cache and/or hf_cache/ of `out`."""
    flat = out / FLAT_DIR
    for dep in DEPENDENCIES:
        if layout in ("hub", "both"):
            folder = out / hub_dir / dep.folder
            rev = _revision(dep.repo_id, seed)
            for f in dep.files:
                repo_path, flat_path = f.repo_path, f.flat_path
                src = stage / flat_path
                blob = folder / "blobs" / _sha256(src)
                if not blob.exists():
                    _place(src, blob, move=layout == "hub")
                if layout == "both":
                    _place(blob, flat / flat_path, move=False)
                link = folder / "snapshots" / rev / repo_path
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.relpath(blob, link.parent), link)
            (folder / "refs").mkdir(parents=True, exist_ok=True)
            (folder / "refs" / "main").write_text(rev, encoding="utf-8")  # no trailing newline, as the hub
        else:
            for f in dep.files:
                _place(stage / f.flat_path, flat / f.flat_path, move=True)


def write_v2_preset(name: str, out_dir: str | Path, seed: int = 0, force: bool = False, layout: str = "both",
                    hub_dir: str = HUB_DIR) -> Path:
    """Write a complete IndexTTS2 directory (main files + dependencies); atomic: a temp dir renamed into place.

    layout: "flat", "hub" or "both" (see the module docstring); hub_dir: the hub cache's folder inside out_dir.
    """
    from engine_ref.indextts2.features import write_random_w2v_stats
    from engine_ref.indextts2.qwen_emotion import write_random_qwen_emotion
    from engine_ref.indextts.presets import corpus_text
    from engine_ref.text.tokenizer import train_bpe

    preset = _preset(name)
    if layout not in LAYOUTS:
        raise InputError(f"unknown dependency layout '{layout}'", f"choose one of: {', '.join(LAYOUTS)}")
    out = Path(out_dir)
    if out.exists():
        if not force:
            raise InputError(f"{out} already exists", "pass --force to overwrite it, or choose another --out")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = preset.config
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_name:
        tmp = Path(tmp_name)
        doc = v2_config_to_mapping(cfg, hardcoded_widths=preset.tiny_widths_in_config)
        (tmp / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
        train_bpe(corpus_text(), tmp / cfg.bpe_model, vocab_size=preset.bpe_vocab, seed=seed)
        gpt = materialize(gpt_v2_layout(cfg.gpt, target_codes=preset.target_codes, seed=seed), seed)
        torch.save(gpt, tmp / cfg.gpt_checkpoint)
        del gpt
        torch.save({"net": random_s2mel_net(cfg.s2mel, seed=seed + 5, gpt_latent_dim=cfg.gpt.model_dim)},
                   tmp / cfg.s2mel_checkpoint)
        write_random_w2v_stats(tmp / cfg.w2v_stat, hidden_size=cfg.semantic_dim, seed=seed + 6)
        spk, emo = _emotion_matrices(cfg, seed + 7)
        torch.save(spk, tmp / cfg.spk_matrix)
        torch.save(emo, tmp / cfg.emo_matrix)
        write_random_qwen_emotion(tmp / cfg.qwen_emo_path, seed=seed + 8)
        stage = tmp / ".deps"
        _write_dependencies(stage, preset, seed)
        _arrange(stage, tmp, layout, seed, hub_dir)
        shutil.rmtree(stage)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shared read-only
        tmp.rename(out)
    log.info("wrote IndexTTS2 preset %s to %s (dependencies: %s)", name, out, layout)
    return out
