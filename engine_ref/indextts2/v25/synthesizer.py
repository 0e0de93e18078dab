"""The IndexTTS-2.5 reference pipeline: text + language + speaker reference (+ emotion) -> 22.05 kHz PCM.

Per request (infer_v2_5 at HEAD), differences from `engine_ref.indextts2.synthesizer.Synthesizer2` only:
1. speaker reference (both loading paths cut to 15 s, as 2.5 always does; `max_reference_seconds`): w2v-BERT
   layer-17 features (NOT codec-quantised), CAMPPlus style, 22.05 kHz ref mel, prompt_condition =
   regulator(features, T_ref), the GPT's speaker row spk_emb_proj(style), the base emovec;
2. emotion exactly as 2.0 (`EmotionOptions`, the same precedence and mixing); conds = (row + emovec) ‖ 0 ‖ 0;
3. text: the tiktoken front end (`TextFrontendV25`) for the request's language;
4. per bucket: codes (2.0's decoding defaults, the language embedding on every text row), no latent pass,
   S_infer = codec.decode(codes) [2N frames], regulated to int(2N * 1.72 * duration_factor) frames, the CFM
   (25 steps, cfg 0.7, per-segment seeded noise), BigVGAN v2, PCM16, 200 ms between segments.

Timings: `codec` is the codec decode per segment (2.0: the reference quantize), `latent` stays 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from engine_ref.indextts2.campplus import campplus_style
from engine_ref.indextts2.gpt import V2_GENERATION_DEFAULTS
from engine_ref.indextts2.reference import HEAD_CUT_SECONDS, load_speaker_audio
from engine_ref.indextts2.s2mel.cfm import DEFAULT_CFG_RATE, DEFAULT_STEPS
from engine_ref.indextts2.synthesizer import (
    INTERVAL_SILENCE_MS, AudioInput, Conditioning, EmotionOptions, EmotionReference, NoiseFn, Synthesizer2,
    TimingsV2, _Clock, lookup_reference,
)
from engine_ref.indextts2.v25.generate import generate_codes_v25
from engine_ref.indextts2.v25.languages import check_language
from engine_ref.indextts2.v25.loader import LoadedV25, load_v25_model
from engine_ref.indextts2.v25.s2mel import (
    check_duration_factor, prompt_condition_v25, target_mel_frames_v25,
)
from engine_ref.params import segment_seed
from engine_ref.sampling import GenerationParams
from engine_ref.indextts.synthesizer import SegmentAudio, SynthesisResult
from engine_ref.finishing import cut_warning

__all__ = ["Synthesizer25", "SpeakerV25", "RequestV25", "Conditioning", "EmotionOptions"]


@dataclass(frozen=True, eq=False)
class SpeakerV25:
    """Everything derived from one speaker reference (field names as `SpeakerV2` where the meaning is shared)."""

    fingerprint: str
    features: torch.Tensor  # spk_cond_emb [1, T_w, D]: normalised w2v-BERT layer 17 of audio_16k
    style: torch.Tensor  # [1, 192] CAMPPlus (the GPT's speaker input and the s2mel style)
    ref_mel: torch.Tensor  # [1, 80, T_ref]
    prompt_condition: torch.Tensor  # [1, T_ref, C] regulator(features, T_ref)
    latents: torch.Tensor  # [1, 1, model_dim] the GPT's speaker row spk_emb_proj(style)
    base_emovec: torch.Tensor  # [1, model_dim] get_emovec(features)
    self_emotion: EmotionReference  # the speaker file on the 16 kHz emotion path
    seconds: float
    trimmed: bool


@dataclass(frozen=True)
class RequestV25:
    """The per-request options 2.5 adds: the language and the s2mel duration factor."""

    lang: str
    duration_factor: float = 1.0

    @classmethod
    def checked(cls, lang: str | None, duration_factor: float) -> "RequestV25":
        return cls(check_language(lang), check_duration_factor(duration_factor))


class Synthesizer25(Synthesizer2):
    """IndexTTS-2.5 end to end; `stream` / `synthesize` take `lang` (zh, en, ja, es, ar, zhen; required: a
    missing one is an InputError, not a TypeError, so generic 2.0-style callers get a one-line fix) and
    `duration_factor` in [0.5, 2.0]. max_reference_seconds defaults to 15 (2.5 always cuts references there)."""

    def __init__(self, model: LoadedV25, *, speaker_cache_size: int = 16, emotion_cache_size: int = 16,
                 max_reference_seconds: float | None = HEAD_CUT_SECONDS, diffusion_steps: int = DEFAULT_STEPS,
                 cfg_rate: float = DEFAULT_CFG_RATE, interval_silence_ms: int = INTERVAL_SILENCE_MS,
                 qwen_max_new_tokens: int | None = None, s2mel_batch: bool = False):
        super().__init__(model, speaker_cache_size=speaker_cache_size,  # type: ignore[arg-type]
                         emotion_cache_size=emotion_cache_size, max_reference_seconds=max_reference_seconds,
                         diffusion_steps=diffusion_steps, cfg_rate=cfg_rate,
                         interval_silence_ms=interval_silence_ms, qwen_max_new_tokens=qwen_max_new_tokens,
                         s2mel_batch=s2mel_batch)

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike, *, cache_dir: str | None = None, **kwargs) -> "Synthesizer25":
        return cls(load_v25_model(ref, cache_dir=cache_dir), **kwargs)

    # --- references -------------------------------------------------------------------------------------------
    def speaker(self, reference: AudioInput | SpeakerV25,  # type: ignore[override]
                timings: TimingsV2 | None = None) -> tuple[SpeakerV25, bool]:
        """Conditioning for a speaker reference (bytes or path); returns (speaker, cache_hit)."""
        hit, data, key = lookup_reference(reference, SpeakerV25, self._speakers, "speaker reference audio",
                                          self._cache_key)
        if hit is not None:
            return hit, True
        timings = timings if timings is not None else TimingsV2()
        m = self.model
        audio = load_speaker_audio(data, cut_seconds=self.max_reference_seconds)
        a16, a22 = audio.audio_16k.samples, audio.audio_22k.samples
        feats = self._features(a16, timings)
        with torch.inference_mode():
            with _Clock(timings, "ref_mel"):
                ref_mel = m.ref_mel(a22.unsqueeze(0))
            with _Clock(timings, "campplus"):
                style = campplus_style(m.campplus, m.fbank(a16.unsqueeze(0))[0])
            with _Clock(timings, "s2mel"):
                prompt = prompt_condition_v25(m.s2mel, feats, ref_mel.shape[-1])
            with _Clock(timings, "conditioning"):
                row = m.gpt.speaker_rows(style)
                base = m.gpt.get_emovec(feats)
        own = self._emotion_from_bytes(data, "self:" + key, timings)
        speaker = SpeakerV25(key, feats, style, ref_mel, prompt, row, base, own, audio.audio_22k.seconds,
                             audio.audio_22k.trimmed)
        self._speakers.put(key, speaker)  # type: ignore[arg-type]
        return speaker, False

    # --- synthesis --------------------------------------------------------------------------------------------
    def stream(self, text: str, reference: AudioInput | SpeakerV25,  # type: ignore[override]
               params: GenerationParams = V2_GENERATION_DEFAULTS, *, lang: str | None = None,
               duration_factor: float = 1.0, emotion: EmotionOptions = EmotionOptions(),
               max_text_tokens_per_segment: int = 120,
               bucket_max_size: int = 4, noise_fn: NoiseFn | None = None, timings: TimingsV2 | None = None,
               warnings: list[str] | None = None) -> Iterator[SegmentAudio]:
        """Segments (22.05 kHz int16, no gaps) in text order; insert `interval_samples` zeros between them."""
        request = RequestV25.checked(lang, duration_factor)
        return self._stream(text, reference, params, request, emotion=emotion,
                            max_text_tokens_per_segment=max_text_tokens_per_segment, bucket_max_size=bucket_max_size,
                            noise_fn=noise_fn, timings=timings, warnings=warnings)

    def synthesize(self, text: str, reference: AudioInput | SpeakerV25,  # type: ignore[override]
                   params: GenerationParams = V2_GENERATION_DEFAULTS, *, lang: str | None = None,
                   duration_factor: float = 1.0, emotion: EmotionOptions = EmotionOptions(),
                   max_text_tokens_per_segment: int = 120,
                   bucket_max_size: int = 4, noise_fn: NoiseFn | None = None) -> SynthesisResult:
        """The whole utterance: segments joined with `interval_samples` zeros (upstream's interval_silence)."""
        request = RequestV25.checked(lang, duration_factor)
        return self._synthesize(text, reference, params, request, emotion=emotion,
                                max_text_tokens_per_segment=max_text_tokens_per_segment,
                                bucket_max_size=bucket_max_size, noise_fn=noise_fn)

    def _buckets(self, text: str, max_text_tokens_per_segment: int, bucket_max_size: int,
                 request: RequestV25) -> list:
        segments = self.model.frontend.prepare(text, request.lang, max_text_tokens_per_segment)
        return self.model.frontend.bucket(segments, bucket_max_size)

    def _synthesize_bucket(self, bucket, speaker: SpeakerV25, cond: Conditioning,  # type: ignore[override]
                           params: GenerationParams, seed: int, noise_fn: NoiseFn | None, timings: TimingsV2,
                           warnings: list[str], max_text_tokens_per_segment: int,
                           request: RequestV25 | None = None) -> list[SegmentAudio]:
        assert request is not None
        ids = [list(s.token_ids) for s in bucket]
        with _Clock(timings, "generate"):
            outs = generate_codes_v25(self.model.gpt, cond.conds, ids, [s.lang_id for s in bucket], params,
                                      [segment_seed(seed, s.index) for s in bucket])
        timings.tokens += sum(len(o.codes) + int(o.stopped) for o in outs)
        for seg, out in zip(bucket, outs):
            if not out.stopped:
                warnings.append(cut_warning(seg.index, params.max_mel_tokens))
        keep = [i for i, o in enumerate(outs) if o.codes]
        mels: dict[int, torch.Tensor] = {}
        if keep:
            groups = [keep] if self.s2mel_batch else [[i] for i in keep]
            for group in groups:
                rows = self.mel_frames_v25(speaker, [outs[i].codes for i in group], [bucket[i].index for i in group],
                                           seed, request.duration_factor, noise_fn, timings)
                mels.update(zip(group, rows))
        return self._vocode(bucket, outs, mels, timings, warnings)

    @torch.inference_mode()
    def mel_frames_v25(self, speaker: SpeakerV25, codes: Sequence[Sequence[int]], indices: Sequence[int], seed: int,
                       duration_factor: float = 1.0, noise_fn: NoiseFn | None = None,
                       timings: TimingsV2 | None = None) -> list[torch.Tensor]:
        """s2mel for a batch of segments: one mel [1, mels, int(2 N_i * 1.72 * duration_factor)] per segment."""
        timings = timings if timings is not None else TimingsV2()
        m = self.model
        lens = torch.tensor([len(c) for c in codes], dtype=torch.long)
        code_batch = torch.zeros(len(codes), int(lens.max()), dtype=torch.long)
        for i, c in enumerate(codes):
            code_batch[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        targets = torch.tensor(target_mel_frames_v25(lens.tolist(), duration_factor), dtype=torch.long)
        with _Clock(timings, "codec"):
            semantic = m.codec.decode(code_batch, lens)
        with _Clock(timings, "s2mel"):
            cond = m.s2mel.length_regulator(semantic, m.codec.frames(lens), targets)
            return self.sample_mels(speaker, cond, targets, indices, seed, noise_fn)
