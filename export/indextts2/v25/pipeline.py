"""`triton-tts export` for IndexTTS-2.5: 2.0's graphs where 2.5 keeps the modules, new ones where it changes them.

Called by export/pipeline.run_export once detect_family says "indextts2.5"; the skeleton (fingerprints and source
hashes, a no-op re-run, the manifest written last) is export.indextts2.pipeline.run_family_export.

Components (`--components`, default all) and the manifest keys they write:
    semantic_encoder     semantic_encoder        2.0's graph: w2v-BERT 2.0 layer 17 + stats
    campplus             campplus                2.0's graph: style from the kaldi fbank
    speaker_projection   speaker_projection      NEW: the GPT's speaker row spk_emb_proj(style)
    emotion_conditioner  emotion_conditioner     2.0's graph (2.5 keeps the emotion path)
    gpt                  gpt_prefill, gpt_decode the prefill embeds the language from tagged ids; decode unchanged
    codec_decoder        codec_decoder           NEW: codec.pth's 25 Hz decode, codes -> [B, 2N, hidden]
    s2mel_front          s2mel_prompt, s2mel_cond 2.0's prompt graph on the features; NEW cond = the regulator
                                                 to a target given as input (int(2N * 1.72 * duration_factor))
    cfm                  cfm_estimator           2.0's graph
    vocoder              vocoder                 2.0's graph (BigVGAN v2)

Not exported (2.5 has none of them): the semantic codec's quantize (the reference is not quantised), the speaker
conditioner, speed_emb and the GPT latent pass. Assets beside the graphs: config.yaml, the tiktoken vocabulary,
feat1.pt / feat2.pt and the w2v-BERT preprocessor_config.json. In Python (as engine_ref): the tiktoken front end,
the extractor, the kaldi fbank, the 22.05 kHz reference mel, the emotion mix, conds assembly, the s2mel target
arithmetic, the Euler loop and CFG combination.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from engine_ref.families import INDEXTTS2_5
from export.indextts2.pipeline import FamilyExport, copy_feature_extractor, model_section_v2, run_family_export
from export.manifest import Manifest
from export.pipeline import ExportRequest

#: component group -> (module under export.indextts2, the function that exports it)
GROUPS_V25: dict[str, tuple[str, str]] = {
    "semantic_encoder": ("features", "export_component"),
    "campplus": ("campplus", "export_component"),
    "speaker_projection": ("v25.speaker", "export_component"),
    "emotion_conditioner": ("conditioners", "export_emotion"),
    "gpt": ("v25.gpt", "export_components"),
    "codec_decoder": ("v25.codec_decoder", "export_component"),
    "s2mel_front": ("v25.s2mel_front", "export_components"),
    "cfm": ("cfm", "export_component"),
    "vocoder": ("vocoder", "export_component"),
}
COMPONENTS_V25 = tuple(GROUPS_V25)


def _config(model_dir: Path):
    from engine_ref.indextts2.config import load_v2_config

    return load_v2_config(model_dir / "config.yaml", family=INDEXTTS2_5)


def source_files_v25(model_dir: Path) -> dict[str, Path]:
    """Every file the export reads: main directory files by name, dependency files as `<dependency>/<path>`."""
    from engine_ref.indextts2.hub import resolve_dependencies
    from engine_ref.indextts2.v25.codec_decoder import CODEC_FILE
    from engine_ref.indextts2.v25.loader import local_file
    from engine_ref.indextts2.v25.tokenizer import VOCAB_FILE

    cfg = _config(model_dir)
    names = ("config.yaml", cfg.gpt_checkpoint, cfg.s2mel_checkpoint, CODEC_FILE, VOCAB_FILE, cfg.w2v_stat,
             cfg.spk_matrix, cfg.emo_matrix)
    files = {Path(n).name: local_file(model_dir, n) for n in names}
    deps = resolve_dependencies(model_dir, family=INDEXTTS2_5)
    for key, dep in deps.deps.items():
        for f in dep.dependency.files:
            files[f"{key}/{f.repo_path}"] = dep.path(f.role)
    return files


def _load(model_dir: Path):
    from engine_ref.indextts2.v25.loader import load_v25_model

    return load_v25_model(model_dir, verify=False)


def _assets(model, model_dir: Path, out_dir: Path) -> dict[str, str]:
    from engine_ref.indextts2.v25.loader import local_file
    from engine_ref.indextts2.v25.tokenizer import VOCAB_FILE

    cfg = model.config
    assets = {"config": "config.yaml", "tokenizer": VOCAB_FILE, "spk_matrix": Path(cfg.spk_matrix).name,
              "emo_matrix": Path(cfg.emo_matrix).name}
    for name in assets.values():
        shutil.copyfile(local_file(model_dir, name), out_dir / name)
    return {**assets, "feature_extractor": copy_feature_extractor(model, out_dir)}


def _model_section(model, model_dir: Path, hashes: dict[str, str], req: ExportRequest) -> dict:
    from engine_ref.indextts2.v25.languages import SUPPORTED_LANGUAGES
    from engine_ref.indextts2.v25.s2mel import DURATION_FACTOR_RANGE, MEL_FRAMES_PER_SEMANTIC_FRAME

    return {
        **model_section_v2(model, model_dir, hashes, req, INDEXTTS2_5),
        "languages": list(SUPPORTED_LANGUAGES), "duration_factor_range": list(DURATION_FACTOR_RANGE),
        "mel_frames_per_semantic_frame": MEL_FRAMES_PER_SEMANTIC_FRAME,
        "in_python": ["tiktoken text front end (language tag, annotations, token-budget segmenter)",
                      "SeamlessM4T feature extractor", "kaldi fbank (CAMPPlus input)", "22.05 kHz reference mel",
                      "emotion-vector mix (feat1/feat2)", "conds (speaker_row + emovec) ‖ 0 ‖ 0",
                      "s2mel target int(2N * 1.72 * duration_factor)", "Qwen text emotion",
                      "Euler loop + CFG combination"],
    }


V25_EXPORT = FamilyExport(INDEXTTS2_5, GROUPS_V25, source_files_v25, _load, _assets, _model_section)


def run_export_v25(req: ExportRequest, model_dir: Path) -> tuple[Manifest, bool]:
    """The IndexTTS-2.5 export of `model_dir` into req.out_dir; returns (manifest, exported) like run_export."""
    return run_family_export(req, model_dir, V25_EXPORT)
