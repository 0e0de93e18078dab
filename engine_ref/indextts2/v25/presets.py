"""IndexTTS-2.5 model directories in the official layout, with deterministic random weights.

A preset writes what IndexTeam/IndexTTS-2.5 ships: config.yaml (version 2.5, no dataset section), gpt.pth
(campplus mode, 456 keys at full size), s2mel.pth (``net`` = cfm, length_regulator and the unused gpt_layer: the
release's 414.9 MB file matches the 2.0 net's size including it, so it is presumably still there; our loader
ignores it), codec.pth (``{'model': ...}``, 243 keys at full size), multilingual_zh_ja_yue_char_del.tiktoken (a
small vocabulary, `engine_ref.indextts2.v25.vocab`), wav2vec2bert_stats.pt, feat1.pt, feat2.pt,
qwen0.6bemo4-merge/ (a tiny random Qwen, as for 2.0) and the bundled dependencies in ``hf_cache/``
(w2v-bert-2.0/, bigvgan/, campplus_cn_common.bin; flat layout, as the release bundles them).

`tiny-v2.5` is tiny-v2's sizes (CAMPPlus at its real size) with a text vocabulary of the small vocabulary's size;
its random GPT stops after about 12 codes (tiny-v2: 24; 2.5 codes are 25 Hz, so about the same audio length).
`v2.5` has the release's sizes (gpt number_text_tokens 60509; the vocabulary file stays the small one, so text
ids stay below a few thousand: benchmarks only) and stops after about 60 codes (v2: 120).
"""

from __future__ import annotations

import copy
import functools
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from engine_ref.errors import InputError
from engine_ref.families import INDEXTTS2_5
from engine_ref.indextts2.campplus import campplus_layout
from engine_ref.indextts2.config import IndexTTS2Config, parse_v2_config, v2_config_to_mapping
from engine_ref.indextts2.hub import BIGVGAN, CAMPPLUS, FLAT_DIR, W2V_BERT
from engine_ref.indextts2.presets import V2_PRESETS, _emotion_matrices
from engine_ref.indextts2.s2mel.layout import random_s2mel_net
from engine_ref.indextts2.semantic_codec import SemanticCodecConfig
from engine_ref.indextts2.v25.codec_decoder import CODEC_FILE, codec25_layout
from engine_ref.indextts2.v25.gpt import gpt_v25_layout
from engine_ref.indextts2.v25.tokenizer import SPECIAL_TOKENS, VOCAB_FILE, read_ranks
from engine_ref.indextts2.v25.vocab import write_vocabulary
from engine_ref.layout import materialize

log = logging.getLogger("engine_ref.indextts2.v25.presets")

__all__ = ["PresetV25", "V25_PRESETS", "v25_preset_names", "preset_config_v25", "write_v25_preset",
           "VOCAB_MERGES", "RELEASE_TEXT_TOKENS"]

VOCAB_MERGES = 600  # merges asked of the vocabulary trainer (the corpus allows fewer)
RELEASE_TEXT_TOKENS = 60509  # configs/config_v2_5.yaml gpt.number_text_tokens


@dataclass(frozen=True)
class PresetV25:
    name: str
    base: str  # the 2.0 preset whose sizes (and dependency configs) it shares
    target_codes: int
    description: str
    release_vocab: bool = False  # number_text_tokens 60509 (else: the small vocabulary's own size)


V25_PRESETS: dict[str, PresetV25] = {
    "tiny-v2.5": PresetV25("tiny-v2.5", "tiny-v2", 12,
                           "IndexTTS-2.5 pipeline in seconds on CPU (tests, demo); CAMPPlus at its real size"),
    "v2.5": PresetV25("v2.5", "v2", 60, "IndexTTS-2.5 real sizes (several GB; benchmarks only)", release_vocab=True),
}


def v25_preset_names() -> list[str]:
    return list(V25_PRESETS)


def _preset(name: str) -> PresetV25:
    if name not in V25_PRESETS:
        raise InputError(f"unknown IndexTTS-2.5 preset '{name}'", f"choose one of: {', '.join(V25_PRESETS)}")
    return V25_PRESETS[name]


@functools.lru_cache(maxsize=None)
def _vocab_size() -> int:
    """ranks + specials of the small vocabulary (built once, in a temporary file)."""
    with tempfile.TemporaryDirectory() as tmp:
        ranks = read_ranks(write_vocabulary(Path(tmp) / VOCAB_FILE, VOCAB_MERGES))
    return len(ranks) + len(SPECIAL_TOKENS)


def _mapping(base: IndexTTS2Config, text_tokens: int, tiny_widths: bool) -> dict:
    doc = copy.deepcopy(v2_config_to_mapping(base, hardcoded_widths=tiny_widths))
    doc.pop("dataset")
    doc["gpt"]["number_text_tokens"] = text_tokens
    doc["vocoder"] = {"type": "bigvgan", "name": "bigvgan_generator.pt"}
    doc["version"] = 2.5
    return doc


@functools.lru_cache(maxsize=None)
def preset_config_v25(name: str) -> IndexTTS2Config:
    preset = _preset(name)
    base = V2_PRESETS[preset.base]
    tokens = RELEASE_TEXT_TOKENS if preset.release_vocab else _vocab_size()
    return parse_v2_config(_mapping(base.config, tokens, base.tiny_widths_in_config), name, family=INDEXTTS2_5)


def _write_dependencies(flat: Path, base_name: str, seed: int) -> None:
    """hf_cache/{w2v-bert-2.0/, bigvgan/, campplus_cn_common.bin} (what the 2.5 release bundles)."""
    from engine_ref.indextts2.features import write_random_w2v_bert
    from engine_ref.indextts2.presets import _bigvgan_json
    from engine_ref.indextts2.vocoder import write_random_bigvgan_v2

    base = V2_PRESETS[base_name]
    write_random_w2v_bert(flat / W2V_BERT.file("config").flat_path.split("/")[0], base.w2v_overrides, seed=seed + 1)
    torch.save(materialize(campplus_layout(), seed + 3), flat / CAMPPLUS.file("weights").flat_path)
    write_random_bigvgan_v2(flat / BIGVGAN.file("config").flat_path.split("/")[0], _bigvgan_json(base), seed=seed + 4)


def _codec_state(cfg: SemanticCodecConfig, seed: int) -> dict:
    return {"model": materialize(codec25_layout(cfg), seed)}


def write_v25_preset(name: str, out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Write a complete IndexTTS-2.5 directory (main files + bundled hf_cache/); atomic (temp dir renamed)."""
    from engine_ref.indextts2.features import write_random_w2v_stats
    from engine_ref.indextts2.qwen_emotion import write_random_qwen_emotion

    preset = _preset(name)
    out = Path(out_dir)
    if out.exists():
        if not force:
            raise InputError(f"{out} already exists", "pass --force to overwrite it, or choose another --out")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = preset_config_v25(name)
    tiny = V2_PRESETS[preset.base].tiny_widths_in_config
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_name:
        tmp = Path(tmp_name)
        doc = v2_config_to_mapping(cfg, hardcoded_widths=tiny)
        (tmp / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
        write_vocabulary(tmp / VOCAB_FILE, VOCAB_MERGES)
        gpt = materialize(gpt_v25_layout(cfg.gpt, target_codes=preset.target_codes, seed=seed), seed)  # type: ignore
        torch.save(gpt, tmp / cfg.gpt_checkpoint)
        del gpt
        torch.save({"net": random_s2mel_net(cfg.s2mel, seed=seed + 5, gpt_latent_dim=cfg.gpt.model_dim)},
                   tmp / cfg.s2mel_checkpoint)
        torch.save(_codec_state(cfg.semantic_codec, seed + 2), tmp / CODEC_FILE)
        write_random_w2v_stats(tmp / cfg.w2v_stat, hidden_size=cfg.semantic_dim, seed=seed + 6)
        spk, emo = _emotion_matrices(cfg, seed + 7)
        torch.save(spk, tmp / cfg.spk_matrix)
        torch.save(emo, tmp / cfg.emo_matrix)
        write_random_qwen_emotion(tmp / cfg.qwen_emo_path, seed=seed + 8)
        _write_dependencies(tmp / FLAT_DIR, preset.base, seed)
        tmp.chmod(0o755)
        tmp.rename(out)
    log.info("wrote IndexTTS-2.5 preset %s to %s", name, out)
    return out
