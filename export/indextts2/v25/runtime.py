"""IndexTTS-2.5 assembled from its exported graphs (ONNX Runtime): `OrtIndexTTS25` = Synthesizer25 on the graphs.

It is `export.indextts2.runtime.OrtIndexTTS2` with 2.5's hooks, stage for stage as
`engine_ref.indextts2.v25.synthesizer.Synthesizer25` (s2mel per segment, as its default):
- text: the tiktoken front end for the request's language (`TextFrontendV25`); generation ids = the segment's ids
  with 0/1 dropped, tagged with its language (`tag_text_ids`), decoded by gpt_prefill/gpt_decode;
- speaker: semantic_encoder (features, not quantised) -> s2mel_prompt(features, T_ref); campplus (style) ->
  speaker_projection (the GPT's speaker row); emotion_conditioner (the base emovec); the 16 kHz emotion path;
- conds [1, 3, D] = (speaker_row + emovec) ‖ 0 ‖ 0 (`make_conds_v25`, float32 as engine_ref), the emotion
  precedence and mix being 2.0's (inherited);
- per segment: no latent pass; codec_decoder(codes) -> s2mel_cond(semantic, 2N, target) with target =
  int(2N * 1.72 * duration_factor) from engine_ref's `target_mel_frames_v25`; the CFM, vocoder, PCM16 and interval
  silence are 2.0's (inherited).
Same seed, same request -> the same codes and, within 2 LSB, the same audio as Synthesizer25 (tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from engine_ref.families import INDEXTTS2_5
from engine_ref.generate import generation_ids
from engine_ref.indextts2.gpt.generate import check_text_lengths
from engine_ref.indextts2.synthesizer import EmotionOptions, NoiseFn, TimingsV2, lookup_reference
from engine_ref.indextts2.v25.generate import V25_GENERATION_DEFAULTS
from engine_ref.indextts2.v25.gpt import ZERO_ROWS, tag_text_ids
from engine_ref.indextts2.v25.s2mel import target_mel_frames_v25
from engine_ref.indextts2.v25.synthesizer import RequestV25, SpeakerV25
from engine_ref.indextts.synthesizer import SegmentAudio, SynthesisResult
from engine_ref.sampling import GenerationParams
from export.indextts2.runtime import OrtIndexTTS2, _clock

__all__ = ["OrtIndexTTS25", "make_conds_v25", "generation_ids_v25"]


def make_conds_v25(speaker_row: np.ndarray, emovec: np.ndarray) -> np.ndarray:
    """Speaker row [B, 1, D] + emovec [B, D] -> conds [B, 3, D] = (row + emovec) ‖ 0 ‖ 0 (float32, as engine_ref's
    UnifiedVoiceV25.conditioning_rows)."""
    row = np.asarray(speaker_row, np.float32)
    emovec = np.asarray(emovec, np.float32).reshape(row.shape[0], 1, -1)
    return np.concatenate([row + emovec, np.zeros((row.shape[0], ZERO_ROWS, row.shape[2]), np.float32)], axis=1)


def generation_ids_v25(token_ids: Sequence[int], lang_id: int, gpt_cfg) -> list[int]:
    """A segment's ids as the decoder takes them: start/stop text dropped, then tagged with the language."""
    ids = generation_ids(list(token_ids), gpt_cfg.start_text_token, gpt_cfg.stop_text_token)
    return tag_text_ids(ids, lang_id, gpt_cfg.text_vocab)


class OrtIndexTTS25(OrtIndexTTS2):
    """Synthesizer25's request path on the exported graphs (module docstring); `stream` / `synthesize` take
    `lang` (required) and `duration_factor` like Synthesizer25."""

    FAMILY = INDEXTTS2_5
    GRAPHS = ("semantic_encoder", "campplus", "speaker_projection", "emotion_conditioner", "codec_decoder",
              "s2mel_prompt", "s2mel_cond", "cfm_estimator", "vocoder")

    def __init__(self, export_dir: str | Path, **kwargs):
        from engine_ref.indextts2.reference import HEAD_CUT_SECONDS

        kwargs.setdefault("max_reference_seconds", HEAD_CUT_SECONDS)  # 2.5 always cuts references at 15 s
        super().__init__(export_dir, **kwargs)

    # --- family hooks ---------------------------------------------------------------------------------------
    def _load_config(self):
        from engine_ref.indextts2.config import load_v2_config

        return load_v2_config(self.export_dir / self.manifest.assets["config"], family=INDEXTTS2_5)

    def _text_frontend(self):
        from engine_ref.indextts2.v25.frontend import TextFrontendV25

        gpt = self.config.gpt
        return TextFrontendV25(self.export_dir / self.manifest.assets["tokenizer"],
                               number_text_tokens=gpt.number_text_tokens, text_positions=gpt.text_positions,
                               start_text_token=gpt.start_text_token, stop_text_token=gpt.stop_text_token)

    def _conds(self, speaker, emovec: torch.Tensor) -> np.ndarray:
        return make_conds_v25(speaker.latents.numpy(), emovec.numpy())

    def _segments(self, text: str, max_text_tokens_per_segment: int, request: RequestV25):
        cfg = self.config.gpt
        segments = self.frontend.prepare(text, request.lang, max_text_tokens_per_segment)
        pairs = [(s, generation_ids_v25(s.token_ids, s.lang_id, cfg)) for s in segments]
        check_text_lengths(cfg, [ids for _, ids in pairs])
        return pairs

    def _segment_mel(self, speaker, conds: np.ndarray, seg, codes: list[int], seed: int, noise_fn: NoiseFn | None,
                     timings: TimingsV2, request: RequestV25) -> torch.Tensor:
        (mel,) = self.mel_frames_v25(speaker, [codes], [seg.index], seed, request.duration_factor, noise_fn, timings)
        return mel

    # --- references -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def speaker(self, reference) -> SpeakerV25:  # type: ignore[override]
        """A speaker reference (bytes or path) -> engine_ref's SpeakerV25, every network an exported graph."""
        from engine_ref.indextts2.reference import load_speaker_audio

        hit, data, key = lookup_reference(reference, SpeakerV25, self._speakers, "speaker reference audio", self._key)
        if hit is not None:
            return hit
        audio = load_speaker_audio(data, cut_seconds=self.max_reference_seconds)
        a16, a22 = audio.audio_16k.samples, audio.audio_22k.samples
        feats = self.features(a16)
        ref_mel = self.ref_mel(a22.unsqueeze(0))
        (style,) = self.run("campplus", fbank=self.fbank(a16.unsqueeze(0)).numpy())
        (prompt,) = self.run("s2mel_prompt", semantic=feats, semantic_lengths=np.array([feats.shape[1]], np.int64),
                             mel_frames=np.array([ref_mel.shape[-1]], np.int64))
        (row,) = self.run("speaker_projection", style=style)
        base = self._conditioner("emotion_conditioner", feats)
        own = self._emotion_from_bytes(data, "self:" + key)
        t = torch.from_numpy
        speaker = SpeakerV25(key, t(feats), t(style), ref_mel, t(prompt), t(row), t(base), own,
                             audio.audio_22k.seconds, audio.audio_22k.trimmed)
        self._speakers.put(key, speaker)  # type: ignore[arg-type]
        return speaker

    # --- s2mel ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def mel_frames_v25(self, speaker: SpeakerV25, codes: Sequence[Sequence[int]], indices: Sequence[int], seed: int,
                       duration_factor: float = 1.0, noise_fn: NoiseFn | None = None,
                       timings: TimingsV2 | None = None) -> list[torch.Tensor]:
        """Generated mels [1, mels, int(2 N_i * 1.72 * duration_factor)] of a padded batch of segments."""
        timings = timings if timings is not None else TimingsV2()
        lens = np.array([len(c) for c in codes], np.int64)
        code_batch = np.zeros((len(codes), int(lens.max())), np.int64)
        for i, c in enumerate(codes):
            code_batch[i, : len(c)] = c
        targets = np.asarray(target_mel_frames_v25(lens.tolist(), duration_factor), np.int64)
        with _clock(timings, "codec"):
            semantic, frames = self.run("codec_decoder", codes=code_batch, code_lengths=lens)
        with _clock(timings, "s2mel"):
            (cond,) = self.run("s2mel_cond", semantic=semantic, semantic_lengths=frames, target_lengths=targets)
            return self.sample_mels(speaker, torch.from_numpy(cond), torch.from_numpy(targets), indices, seed,
                                    noise_fn)

    # --- requests -------------------------------------------------------------------------------------------
    def stream(self, text: str, reference, params: GenerationParams = V25_GENERATION_DEFAULTS, *,  # type: ignore
               lang: str | None = None, duration_factor: float = 1.0, emotion: EmotionOptions = EmotionOptions(),
               max_text_tokens_per_segment: int = 120, noise_fn: NoiseFn | None = None,
               timings: TimingsV2 | None = None, warnings: list[str] | None = None) -> Iterator[SegmentAudio]:
        """Segments in text order (no gaps), each as Synthesizer25 makes it for the same seed."""
        return self._stream(text, reference, params, RequestV25.checked(lang, duration_factor), emotion=emotion,
                            max_text_tokens_per_segment=max_text_tokens_per_segment, noise_fn=noise_fn,
                            timings=timings, warnings=warnings)

    def synthesize(self, text: str, reference, params: GenerationParams = V25_GENERATION_DEFAULTS, *,  # type: ignore
                   lang: str | None = None, duration_factor: float = 1.0, emotion: EmotionOptions = EmotionOptions(),
                   max_text_tokens_per_segment: int = 120, noise_fn: NoiseFn | None = None) -> SynthesisResult:
        """The whole utterance, segments joined with interval_samples zeros (Synthesizer25.synthesize)."""
        return self._synthesize(text, reference, params, RequestV25.checked(lang, duration_factor), emotion=emotion,
                                max_text_tokens_per_segment=max_text_tokens_per_segment, noise_fn=noise_fn)
