"""`tts` / `tts_offline` for IndexTTS-2.5: IndexTTS-2's entry models (models/indextts2_tts.py) with 2.5's stages.

What differs from IndexTTS-2, per request:
- LANGUAGE (required: zh, en, ja, es, ar, zhen; 2.5 has no language detection, so a missing or unknown one is an
  INVALID_ARGUMENT naming LANGUAGE and the choices, never a default) and DURATION_FACTOR (fp32 in [0.5, 2.0],
  default 1.0; read as the shortest decimal that rounds to the fp32 value, so 1.1 sent means engine_ref's 1.1), both
  checked before any work;
- text: `preprocess` runs the tiktoken front end for LANGUAGE and returns each segment's language id; the
  generation ids are the segment's ids with 0/1 dropped, tagged with it (`generation_ids_v25`), which the
  decoder's prefill graph turns into the language embedding;
- the voice (cached per audio hash): semantic_encoder features -> s2mel_prompt; campplus -> speaker_projection (the
  speaker row); emotion_conditioner; conds [3, D] = (row + emovec) ‖ 0 ‖ 0 (`mix_emotion_v25`);
- per segment: the decoder without a latent pass -> codec_decoder -> s2mel_cond to int(2N * 1.72 * factor) frames
  (engine_ref's `target_mel_frames_v25`) -> `s2mel` (batched diffusion, 2.0's) -> vocoder -> 22.05 kHz PCM16.
Emotion inputs, interval silence, cancellation and streaming (one chunk per segment) are IndexTTS-2's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine_ref.errors import InputError
from model_repository import contract as c
from model_repository.models.indextts2_tts import TritonStagesV2, TtsModelV2, _naming
from model_repository.orchestrator import DecodeResult, Segment

__all__ = ["TtsModelV25", "TritonStagesV25", "duration_factor_input"]


def duration_factor_input(value) -> float:
    """DURATION_FACTOR (fp32 on the wire) -> the double engine_ref takes: the shortest decimal that rounds to the
    fp32 value (so 1.1 is 1.1, not 1.100000023841858), range-checked; InputError naming DURATION_FACTOR."""
    from engine_ref.indextts2.v25.s2mel import DURATION_FACTOR_RANGE, check_duration_factor

    arr = np.asarray(value).reshape(-1)
    lo, hi = DURATION_FACTOR_RANGE
    fix = f"send DURATION_FACTOR between {lo:g} (faster) and {hi:g} (slower); 1.0 keeps the natural pace"
    if arr.size != 1:
        raise InputError(f"DURATION_FACTOR must hold exactly one value, got {arr.size}", fix)
    x = np.float32(arr[0])
    if not np.isfinite(x):
        raise InputError(f"DURATION_FACTOR {float(x)!r} is not a finite number", fix)
    factor = float(np.format_float_positional(x, unique=True, trim="-"))
    with _naming(c.DURATION_FACTOR.name):
        return check_duration_factor(factor)


class TritonStagesV25(TritonStagesV2):
    """IndexTTS-2.5's calls: preprocess with LANGUAGE, and a segment's condition from the codec decoder."""

    async def preprocess_v25(self, text: bytes, max_tokens: np.ndarray | None, lang: str) -> tuple[Segment, ...]:
        from export.indextts2.v25.runtime import generation_ids_v25

        language = self.pb.Tensor(c.LANGUAGE.name, np.array([lang.encode()], dtype=np.object_))
        out = await self.call_preprocess(text, max_tokens, (language,), (c.SEGMENT_LANG_IDS,))
        segments = self.segments_of(out)
        langs = out[c.SEGMENT_LANG_IDS.name].reshape(-1).tolist()
        gpt = self.m.cfg.gpt
        return tuple(dataclasses.replace(s, ids=tuple(generation_ids_v25(s.ids, int(lang_id), gpt)))
                     for s, lang_id in zip(segments, langs))

    async def target_condition(self, speaker, result: DecodeResult) -> np.ndarray:
        """codec_decoder(codes) -> s2mel_cond(semantic, 2N, target): [target, content]."""
        from engine_ref.indextts2.v25.s2mel import target_mel_frames_v25

        n = len(result.codes)
        decoded = await self.graph("codec_decoder", {"codes": np.asarray(result.codes, np.int64)[None],
                                                     "code_lengths": np.array([n], np.int64)})
        (target,) = target_mel_frames_v25([n], speaker.duration_factor)
        out = await self.graph("s2mel_cond", {"semantic": decoded["semantic"],
                                              "semantic_lengths": decoded["semantic_lengths"],
                                              "target_lengths": np.array([target], np.int64)})
        return out["cond"][0, :target]


class TtsModelV25(TtsModelV2):
    """IndexTTS-2.5: IndexTTS-2's entry model with LANGUAGE, DURATION_FACTOR and 2.5's conditioning and stages."""

    family_name = "IndexTTS-2.5"

    def load_config(self):
        from engine_ref.families import INDEXTTS2_5
        from engine_ref.indextts2.config import load_v2_config

        return load_v2_config(self.export_dir / self.manifest.assets["config"], family=INDEXTTS2_5)

    def setup_conditioning(self) -> None:
        """2.5 has no speed rows: conds are (row + emovec) ‖ 0 ‖ 0."""

    def make_stages(self) -> TritonStagesV25:
        return TritonStagesV25(self)

    def make_encoder(self):
        from model_repository.indextts2.conditioning import VoiceEncoderV25

        return VoiceEncoderV25(self.front, self.stages.graph, self._blocking, int(self.cfg.semantic_dim))

    def request_options(self, request: dict):
        from engine_ref.indextts2.v25.synthesizer import RequestV25
        from model_repository.models.preprocess import check_language_input

        lang = check_language_input(self.scalar(request.get(c.LANGUAGE.name)))
        factor = request.get(c.DURATION_FACTOR.name)
        return RequestV25(lang, 1.0 if factor is None else duration_factor_input(factor))

    async def segments(self, text: str, request: dict, options) -> tuple[Segment, ...]:
        return await self.stages.preprocess_v25(text.encode("utf-8"),
                                                request.get(c.MAX_TEXT_TOKENS_PER_SEGMENT.name), options.lang)

    def conditioning(self, speaker, plan, emo, use_random: bool, seed: int):
        from model_repository.indextts2.conditioning import mix_emotion_v25

        return mix_emotion_v25(speaker, plan, emo, use_random, self.bank, seed)

    def voice(self, speaker, cond, options):
        from model_repository.indextts2.conditioning import VoiceV25, voice_for_request

        return voice_for_request(speaker, cond, VoiceV25, duration_factor=options.duration_factor)
