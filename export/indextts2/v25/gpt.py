"""ONNX export of IndexTTS-2.5's GPT decoder: 1.x's prefill/decode contract, the prefill embedding the language.

The decode graph is export/gpt.py's unchanged. The prefill graph has the same inputs and outputs; its text rows are
UnifiedVoiceV25.text_embeds' arithmetic with explicit positions: text_ids are TAGGED ids (`tag_text_ids`: id +
lang * text_vocab, after ids 0/1 are dropped; start/stop and padding untagged), the row's language is
max(row) // text_vocab and each position gets text_embedding(id % text_vocab) + text_pos(position) +
lang_embedding(lang). So OrtDecoder, the decoder model's scheduler and the precision variants apply unchanged and
a batch may mix languages (verified per language, padded rows included). `extra` records the facts:
cond_rows 3 ((spk_emb_proj(style) + emovec) ‖ 0 ‖ 0), language_rows (107: text ids are valid below text_vocab *
language_rows), no latent pass (2.5 reads no GPT latents; the decoder model skips it).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, replace
from pathlib import Path

import torch

from engine_ref.families import INDEXTTS2_5
from engine_ref.indextts2.v25.generate import V25_GENERATION_DEFAULTS
from engine_ref.indextts2.v25.gpt import tag_text_ids
from engine_ref.indextts2.v25.languages import SUPPORTED_LANGUAGES, language_id
from export import gpt as gpt_graphs
from export.common import ExportOptions
from export.manifest import Component

PREFILL = gpt_graphs.PREFILL
DECODE = gpt_graphs.DECODE
#: the lang_embedding rows verification cycles through: the supported languages' rows (zhen is `common`)
#: TensorRT: generation only ever feeds the decode graph one new token (no latent pass, so no replay profile)
STEP_PROFILE = [{"name": "step", "dims": {"new_len": [1, 1, 1]}}]
VERIFIED_LANGUAGES = tuple(sorted({language_id(lang) for lang in SUPPORTED_LANGUAGES}))


class PrefillGraphV25(gpt_graphs.PrefillGraph):
    """export/gpt.py's prefill with 2.5's text rows (module docstring)."""

    def text_rows(self, text_ids, text_positions):
        uv = self.uv
        vocab = uv.cfg.text_vocab
        lang = text_ids.max(dim=1).values // vocab
        return (uv.text_embedding(text_ids % vocab) + uv.text_pos_embedding(text_positions)
                + uv.lang_embedding(lang).unsqueeze(1))


def tagged_texts(uv, lengths: list[int], gen: torch.Generator, first_row: int = 0) -> list[list[int]]:
    """Random cleaned texts, the verification's row k (counted over all its cases) tagged with the k-th verified
    language (cycling): the prefill's parity texts."""
    texts = gpt_graphs.random_texts(uv, lengths, gen)
    langs = VERIFIED_LANGUAGES
    return [tag_text_ids(t, langs[(first_row + r) % len(langs)], uv.cfg.text_vocab) for r, t in enumerate(texts)]


def prefill_verifier():
    """verify_prefill on tagged texts, over at least one row of every verified language."""
    return functools.partial(gpt_graphs.verify_prefill, texts_for=tagged_texts, min_rows=len(VERIFIED_LANGUAGES))


def v25_extra(model) -> dict:
    cfg = model.gpt.cfg
    return {
        "family": INDEXTTS2_5,
        "cond_rows": cfg.cond_rows,
        "num_latents": cfg.cond_rows,
        "conds": "(spk_emb_proj(style) + emovec) ‖ 0 ‖ 0",
        "language_rows": cfg.language_rows,
        "text_ids": "generation: ids equal to start/stop text dropped, then tagged id + lang * text_vocab "
                    "(engine_ref.indextts2.v25.gpt.tag_text_ids), then [start] + ids + [stop] (untagged)",
        "language": "max(row) // text_vocab; each text position adds lang_embedding(language)",
        "latent_pass": "none (IndexTTS-2.5 reads no GPT latents)",
        "generation_defaults": {k: v for k, v in asdict(V25_GENERATION_DEFAULTS).items() if v is not None},
    }


def export_components(model, out_dir: Path, opts: ExportOptions) -> dict[str, Component]:
    """gpt_prefill (2.5's text rows, verified on tagged ids in every supported language) and gpt_decode."""
    extra = v25_extra(model)
    verifier = prefill_verifier()
    prefill = gpt_graphs.export_prefill(model, Path(out_dir), opts, graph=PrefillGraphV25(model.gpt),
                                        verifier=verifier)
    decode = gpt_graphs.export_decode(model, Path(out_dir), opts)
    return {PREFILL: replace(prefill, extra={**prefill.extra, **extra}),
            DECODE: replace(decode, extra={**decode.extra, **extra, "trt_profiles": STEP_PROFILE})}
