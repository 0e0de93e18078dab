"""`preprocess`: normalize, tokenize and segment the text with engine_ref's frontend (the same code as the
reference engine), and hand the segments to the BLS model as flat tensors.

IndexTTS 1.x and IndexTTS-2 share the front end (normaliser, BPE tokenizer, segmenting rules); only the config
that names the vocabulary and the token limits differs, so the family is read from the export's manifest.
IndexTTS-2.5 has its own (engine_ref.indextts2.v25.frontend: tiktoken, the language tag, pronunciation
annotations, the token-budget segmenter): its preprocess takes LANGUAGE (required) and also returns each
segment's language id (SEGMENT_LANG_IDS), which the entry model tags the generation ids with."""

from __future__ import annotations

import numpy as np

from engine_ref.errors import InputError, TTSError
from engine_ref.families import INDEXTTS2, INDEXTTS2_5
from engine_ref.text import TextFrontend
from export.manifest import read_manifest
from model_repository import contract as c
from model_repository.families import family_of
from model_repository.models.base import PythonModel


def load_family_config(export_dir, manifest):
    """The export's config.yaml parsed for its family (each has a .gpt section with the token settings)."""
    family = family_of(manifest.model)
    if family in (INDEXTTS2, INDEXTTS2_5):
        from engine_ref.indextts2.config import load_v2_config

        return load_v2_config(export_dir / manifest.assets.get("config", "config.yaml"), family=family)
    from engine_ref.indextts.config import load_config

    return load_config(export_dir / "config.yaml")


def check_language_input(value) -> str:
    """LANGUAGE (bytes or str) -> the lower-cased code; an InputError naming LANGUAGE and the choices otherwise."""
    from engine_ref.indextts2.v25.languages import SUPPORTED_LANGUAGES

    text = c.decode_text(value)[0] if value is not None else None
    lang = text.strip().lower() if text is not None else ""
    if lang not in SUPPORTED_LANGUAGES:
        problem = (f"LANGUAGE {text!r} is not a language of IndexTTS-2.5" if lang else
                   "LANGUAGE is required by IndexTTS-2.5 (it has no language detection) and the request has none")
        raise InputError(problem, f"send LANGUAGE as one of {', '.join(SUPPORTED_LANGUAGES)}")
    return lang


class PreprocessModel(PythonModel):
    def setup(self) -> None:
        manifest = read_manifest(self.export_dir)
        cfg = load_family_config(self.export_dir, manifest)
        self.v25 = family_of(manifest.model) == INDEXTTS2_5
        self.max_segment_tokens = self.param("max_text_tokens_per_segment", c.DEFAULT_MAX_TEXT_TOKENS_PER_SEGMENT, int)
        self.model_max_text_tokens = cfg.gpt.max_text_tokens
        max_chars = self.param("max_text_chars", c.DEFAULT_MAX_TEXT_CHARS, int)
        if self.v25:
            from engine_ref.indextts2.v25.frontend import TextFrontendV25

            self.frontend = TextFrontendV25(
                self.export_dir / manifest.assets["tokenizer"], number_text_tokens=cfg.gpt.number_text_tokens,
                text_positions=cfg.gpt.text_positions, start_text_token=cfg.gpt.start_text_token,
                stop_text_token=cfg.gpt.stop_text_token, max_text_chars=max_chars)
            return
        self.frontend = TextFrontend(
            self.export_dir / cfg.bpe_model, start_text_token=cfg.gpt.start_text_token,
            stop_text_token=cfg.gpt.stop_text_token, number_text_tokens=cfg.gpt.number_text_tokens,
            max_text_chars=max_chars,
        )

    def segments(self, text: str | None, max_tokens: int | None,
                 language=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        if text is None:
            raise InputError("the request has no TEXT", "send the text to synthesize as TEXT (BYTES, shape [1])")
        limit = self.max_segment_tokens if max_tokens is None else int(max_tokens)
        if not 1 <= limit <= self.model_max_text_tokens:
            raise InputError(
                f"MAX_TEXT_TOKENS_PER_SEGMENT={limit} is out of range",
                f"send a value between 1 and {self.model_max_text_tokens}",
            )
        if self.v25:
            segs = self.frontend.prepare(text, check_language_input(language), limit)
        else:
            segs = self.frontend.prepare(text, max_text_tokens_per_segment=limit)
        ids = np.array([i for s in segs for i in s.token_ids], np.int64)
        lengths = np.array([len(s.token_ids) for s in segs], np.int32)
        texts = np.array([s.text.encode("utf-8") for s in segs], dtype=np.object_)
        langs = np.array([s.lang_id for s in segs], np.int32) if self.v25 else None
        return ids, lengths, texts, langs

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                self.check_internal(request)
                text = self.text_of(self.tensor(request, c.TEXT.name))
                max_tokens = self.scalar(self.tensor(request, c.MAX_TEXT_TOKENS_PER_SEGMENT.name))
                language = self.scalar(self.tensor(request, c.LANGUAGE.name)) if self.v25 else None
                ids, lengths, texts, langs = self.segments(text, max_tokens, language)
                outputs = [self.out(c.SEGMENT_IDS.name, ids), self.out(c.SEGMENT_LENGTHS.name, lengths),
                           self.out(c.SEGMENT_TEXTS.name, texts)]
                if langs is not None:
                    outputs.append(self.out(c.SEGMENT_LANG_IDS.name, langs))
                responses.append(self.pb.InferenceResponse(output_tensors=outputs))
            except TTSError as exc:
                responses.append(self.error_response(exc))
            except Exception as exc:  # a bug must fail this request only
                responses.append(self.error_response(exc))
        return responses
