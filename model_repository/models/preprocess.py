"""`preprocess`: normalize, tokenize and segment the text with engine_ref's frontend (the same code as the
reference engine), and hand the segments to the BLS model as flat tensors."""

from __future__ import annotations

import numpy as np

from engine_ref.config import load_config
from engine_ref.errors import InputError, TTSError
from engine_ref.text import TextFrontend
from model_repository import contract as c
from model_repository.models.base import PythonModel


class PreprocessModel(PythonModel):
    def setup(self) -> None:
        cfg = load_config(self.export_dir / "config.yaml")
        self.max_segment_tokens = self.param("max_text_tokens_per_segment", c.DEFAULT_MAX_TEXT_TOKENS_PER_SEGMENT, int)
        self.model_max_text_tokens = cfg.gpt.max_text_tokens
        self.frontend = TextFrontend(
            self.export_dir / cfg.bpe_model, start_text_token=cfg.gpt.start_text_token,
            stop_text_token=cfg.gpt.stop_text_token, number_text_tokens=cfg.gpt.number_text_tokens,
            max_text_chars=self.param("max_text_chars", c.DEFAULT_MAX_TEXT_CHARS, int),
        )

    def segments(self, text: str | None, max_tokens: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if text is None:
            raise InputError("the request has no TEXT", "send the text to synthesize as TEXT (BYTES, shape [1])")
        limit = self.max_segment_tokens if max_tokens is None else int(max_tokens)
        if not 1 <= limit <= self.model_max_text_tokens:
            raise InputError(
                f"MAX_TEXT_TOKENS_PER_SEGMENT={limit} is out of range",
                f"send a value between 1 and {self.model_max_text_tokens}",
            )
        segs = self.frontend.prepare(text, max_text_tokens_per_segment=limit)
        ids = np.array([i for s in segs for i in s.token_ids], np.int64)
        lengths = np.array([len(s.token_ids) for s in segs], np.int32)
        texts = np.array([s.text.encode("utf-8") for s in segs], dtype=np.object_)
        return ids, lengths, texts

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = self.text_of(self.tensor(request, c.TEXT.name))
                max_tokens = self.scalar(self.tensor(request, c.MAX_TEXT_TOKENS_PER_SEGMENT.name))
                ids, lengths, texts = self.segments(text, max_tokens)
                responses.append(self.pb.InferenceResponse(output_tensors=[
                    self.out(c.SEGMENT_IDS.name, ids), self.out(c.SEGMENT_LENGTHS.name, lengths),
                    self.out(c.SEGMENT_TEXTS.name, texts),
                ]))
            except TTSError as exc:
                responses.append(self.error_response(exc))
            except Exception as exc:  # a bug must fail this request only
                responses.append(self.error_response(exc))
        return responses
