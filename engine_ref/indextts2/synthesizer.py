"""The IndexTTS2 reference pipeline: text + speaker reference (+ emotion control) -> 22.05 kHz PCM and timings.

Per request (infer_v2 at 41577b8, facts §2):
1. speaker reference (cached by the hash of its bytes + the cut option): 22.05 kHz load and its sinc-Hann 16 kHz
   resample -> w2v-BERT layer-17 features -> codec quantize (S_ref); CAMPPlus style of the 16 kHz kaldi fbank;
   22.05 kHz ref mel; prompt_condition = regulator(S_ref, T_ref); the GPT's speaker latents; the speaker file
   again on the 16 kHz EMOTION path (librosa.load(sr=16000)), the default emotion reference;
2. emotion: `EmotionOptions` (reference audio + alpha, an 8-value vector, rows chosen at random, or a vector
   from text through the Qwen model) resolved by `emotion.plan_emotion`, mixed into emovec and conds (34 rows);
3. text: the 1.x front end (same normaliser, tokenizer and segmenting rules as v1.5/REL), bucketed;
4. per bucket: code generation (upstream defaults: 3-beam sampling, T 0.8, top-k 30, top-p 0.8, rep-penalty 10,
   1500 codes) with one seeded generator per segment, the teacher-forced latent pass, S_infer = vq2emb(codes) +
   gpt_layer(latent) regulated to floor(1.72 N) frames, 25 Euler steps with cfg 0.7 from noise drawn per
   segment from its own seeded generator (or the caller's `noise_fn`), BigVGAN v2 per segment,
   int16(clamp(32767 * wav)) (truncation), 200 ms (4410 samples) of zeros between segments.

Batching never changes a segment: the GPT decodes a bucket left-padded with key masks (exact, as 1.x), every
random draw comes from the segment's own generator, and s2mel and the vocoder run per segment, so the same seed
gives bit-identical audio whatever the bucket size. `s2mel_batch=True` runs a bucket's s2mel as one padded batch
instead (per-row lengths in the regulator, DiT attention and WaveNet padding): faster on wide hardware, equal to
the solo run within float rounding (about 1e-6 in the mel, at most a unit or two in the int16 output).

Upstream always samples (do_sample is forced on); greedy decoding is offered for tests and parity checks.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch

from engine_ref.audio import audio_fingerprint, to_pcm16
from engine_ref.cache import BoundedLRU
from engine_ref.errors import InputError
from engine_ref.indextts2.campplus import campplus_style
from engine_ref.indextts2.emotion import (
    AlphaMode,
    EmotionPlan,
    apply_emotion_vector,
    plan_emotion,
    validate_emo_alpha,
    validate_emotion_vector,
)
from engine_ref.indextts2.features import extract_input_features
from engine_ref.indextts2.gpt import V2_GENERATION_DEFAULTS, generate_codes, latent_pass_v2
from engine_ref.indextts2.loader import LoadedV2, load_v2_model
from engine_ref.indextts2.reference import load_emotion_audio, load_speaker_audio
from engine_ref.indextts2.s2mel import euler_schedule, euler_step, prompt_inputs, target_mel_frames
from engine_ref.indextts2.s2mel.cfm import DEFAULT_CFG_RATE, DEFAULT_STEPS
from engine_ref.params import segment_seed
from engine_ref.sampling import GenerationParams
from engine_ref.indextts.synthesizer import SegmentAudio, SynthesisResult
from engine_ref.finishing import cut_warning, interval_samples, join_segments, silent_warning

log = logging.getLogger("engine_ref.indextts2.synthesizer")

__all__ = ["Synthesizer2", "SpeakerV2", "EmotionReference", "EmotionOptions", "Conditioning", "TimingsV2",
           "NoiseFn", "INTERVAL_SILENCE_MS"]

AudioInput = Union[str, os.PathLike, bytes]
#: noise_fn(segment_index, shape) -> the CFM's initial noise for that segment ([1, mels, prompt + target frames]).
NoiseFn = Callable[[int, tuple], torch.Tensor]
INTERVAL_SILENCE_MS = 200  # upstream interval_silence
_NOISE_SALT = 0x2545F4914F6CDD1D  # CFM noise seeds differ from the GPT sampling seeds of the same segment


@dataclass(frozen=True, eq=False)
class SpeakerV2:
    """Everything derived from one speaker reference; shared by every segment and request that uses it."""

    fingerprint: str
    features: torch.Tensor  # spk_cond_emb [1, T_w, D]: normalised w2v-BERT layer 17 of audio_16k
    s_ref: torch.Tensor  # [1, T_w, D] codec-quantised features
    style: torch.Tensor  # [1, 192] CAMPPlus
    ref_mel: torch.Tensor  # [1, 80, T_ref] 22.05 kHz log-mel
    prompt_condition: torch.Tensor  # [1, T_ref, C] regulator(S_ref, T_ref)
    latents: torch.Tensor  # [1, 32, model_dim] the GPT's speaker conditioning
    base_emovec: torch.Tensor  # [1, model_dim] get_emovec(features): the "base" of emotion mixing
    self_emotion: "EmotionReference"  # the speaker file on the 16 kHz emotion path (default emotion reference)
    seconds: float
    trimmed: bool


@dataclass(frozen=True, eq=False)
class EmotionReference:
    """An emotion reference loaded with librosa.load(sr=16000): its features and emovec."""

    fingerprint: str
    features: torch.Tensor  # [1, T, D]
    emovec: torch.Tensor  # [1, model_dim] get_emovec(features)
    seconds: float
    trimmed: bool


@dataclass(frozen=True)
class EmotionOptions:
    """One request's emotion control (infer_v2 arguments; defaults = the speaker's own emotion).

    reference: emo_audio_prompt; alpha: emo_alpha in [0, 1] (REL applies it only with emotion audio);
    vector: 8 weights (happy, angry, sad, afraid, disgusted, melancholic, surprised, calm), which drop the emotion
    audio as upstream does; use_text / text: the vector comes from the Qwen emotion model reading `text` (or the
    synthesised text when text is None); random: pick the bank rows with a seeded Python `random` instead of the
    cosine match (only meaningful with a vector); alpha_mode: "rel" (reference commit) or "head" (HEAD scales the
    vector by alpha).
    """

    reference: AudioInput | None = None
    alpha: float = 1.0
    vector: tuple[float, ...] | None = None
    text: str | None = None
    use_text: bool = False
    random: bool = False
    alpha_mode: AlphaMode = "rel"

    @property
    def from_text(self) -> bool:
        return self.use_text or self.text is not None

    def validate(self) -> None:
        """One-line InputErrors for bad values and combinations that would silently do nothing."""
        validate_emo_alpha(self.alpha)
        if self.alpha_mode not in ("rel", "head"):
            raise InputError(f"emotion alpha mode {self.alpha_mode!r} is unknown", "use 'rel' or 'head'")
        if self.vector is not None and self.from_text:
            raise InputError("both an emotion vector and text emotion were given",
                             "pass either the 8-value vector or the emotion text, not both")
        if self.vector is not None:
            validate_emotion_vector(self.vector)
        if self.text is not None and not (isinstance(self.text, str) and self.text.strip()):
            raise InputError("the emotion text is empty", "pass a sentence describing the emotion, or omit it")
        if self.random and self.vector is None and not self.from_text:
            raise InputError("random emotion rows only apply to an emotion vector, and none was given",
                             "add an emotion vector or emotion text, or drop the random option")


@dataclass(frozen=True, eq=False)
class Conditioning:
    """What the GPT conditions every segment of one request on."""

    conds: torch.Tensor  # [1, 34, model_dim]
    emovec: torch.Tensor  # [1, model_dim]
    plan: EmotionPlan
    vector: tuple[float, ...] | None  # the 8 weights used (after the alpha rule), None for audio emotion
    rows: tuple[int, ...] | None  # bank row chosen per category, None without a vector


@dataclass
class TimingsV2:
    """Seconds per stage (summed over segments), plus totals. Speaker stages are 0 on a cache hit."""

    text_s: float = 0.0
    features_s: float = 0.0  # SeamlessM4T features + w2v-BERT (speaker and emotion paths)
    codec_s: float = 0.0  # semantic codec quantize of the reference
    campplus_s: float = 0.0  # kaldi fbank + CAMPPlus
    ref_mel_s: float = 0.0
    conditioning_s: float = 0.0  # GPT speaker/emotion conformers + perceivers, emovec, conds
    emotion_text_s: float = 0.0  # Qwen emotion model
    generate_s: float = 0.0
    latent_s: float = 0.0
    s2mel_s: float = 0.0  # prompt condition, S_infer, regulator, CFM
    vocoder_s: float = 0.0
    total_s: float = 0.0
    audio_s: float = 0.0
    tokens: int = 0
    speaker_cache_hit: bool = False
    emotion_cache_hit: bool = False

    STAGES = ("text", "features", "codec", "campplus", "ref_mel", "conditioning", "emotion_text", "generate",
              "latent", "s2mel", "vocoder")

    def stages(self) -> dict[str, float]:
        return {name: getattr(self, f"{name}_s") for name in self.STAGES}

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds of compute per second of audio (lower is faster)."""
        return self.total_s / self.audio_s if self.audio_s else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generate_s if self.generate_s else 0.0


class _Clock:
    """Adds the elapsed time of a `with` block to one TimingsV2 field."""

    def __init__(self, timings: TimingsV2, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        attr = f"{self.name}_s"
        setattr(self.timings, attr, getattr(self.timings, attr) + time.perf_counter() - self.t0)


def lookup_reference(reference, built: type, cache, what: str, key_of: Callable[[bytes], str]) -> tuple[Any, bytes, str]:
    """(the built reference or its cache entry, else None; the audio bytes; their cache key) for a reference given
    as audio (bytes or path) or as an already-built `built`: the lookup engine_ref and the ONNX runtime share."""
    if isinstance(reference, built):
        return reference, b"", ""
    data = _read_bytes(reference, what)
    key = key_of(data)
    return cache.get(key), data, key


class Synthesizer2:
    """IndexTTS2 end to end; the same method names as the 1.x `engine_ref.indextts.synthesizer.Synthesizer`.

    max_reference_seconds: None uses references whole (REL); 15 reproduces HEAD's cut. diffusion_steps / cfg_rate:
    the CFM settings (upstream 25 / 0.7). qwen_max_new_tokens: the Qwen emotion model's generation limit
    (upstream 32768). s2mel_batch: one padded s2mel batch per bucket (see the module docstring). Caches: speaker
    and emotion references, each a bounded LRU keyed by the bytes' hash (+ the cut option).
    """

    def __init__(
        self,
        model: LoadedV2,
        *,
        speaker_cache_size: int = 16,
        emotion_cache_size: int = 16,
        max_reference_seconds: float | None = None,
        diffusion_steps: int = DEFAULT_STEPS,
        cfg_rate: float = DEFAULT_CFG_RATE,
        interval_silence_ms: int = INTERVAL_SILENCE_MS,
        qwen_max_new_tokens: int | None = None,
        s2mel_batch: bool = False,
    ):
        if speaker_cache_size < 0 or emotion_cache_size < 0:
            raise ValueError("cache sizes must be >= 0")
        if diffusion_steps < 1 or not cfg_rate >= 0 or interval_silence_ms < 0:
            raise ValueError("diffusion_steps must be >= 1, cfg_rate and interval_silence_ms >= 0")
        if max_reference_seconds is not None and not max_reference_seconds > 0:
            raise ValueError("max_reference_seconds must be positive or None")
        self.model = model
        self.max_reference_seconds = max_reference_seconds
        self.diffusion_steps = diffusion_steps
        self.cfg_rate = cfg_rate
        self.s2mel_batch = s2mel_batch
        self.interval_samples = interval_samples(self.sample_rate, interval_silence_ms)
        if qwen_max_new_tokens is not None:
            model.qwen_emotion.max_new_tokens = qwen_max_new_tokens
        self._speakers: BoundedLRU[str, SpeakerV2] = BoundedLRU(speaker_cache_size)
        self._emotions: BoundedLRU[str, EmotionReference] = BoundedLRU(emotion_cache_size)

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike, *, cache_dir: str | None = None, **kwargs) -> "Synthesizer2":
        return cls(load_v2_model(ref, cache_dir=cache_dir), **kwargs)

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    # --- references -------------------------------------------------------------------------------------------
    def _cache_key(self, data: bytes) -> str:
        return f"{audio_fingerprint(data)}:{self.max_reference_seconds}"

    @torch.inference_mode()
    def _features(self, samples_16k: torch.Tensor, timings: TimingsV2) -> torch.Tensor:
        with _Clock(timings, "features"):
            inputs = extract_input_features(self.model.semantic.extractor, [samples_16k])
            feats = self.model.semantic.encoder(inputs.input_features, inputs.attention_mask)
        return feats[:, : int(inputs.frame_counts[0])]

    def _emotion_from_bytes(self, data: bytes, key: str, timings: TimingsV2) -> EmotionReference:
        clip = load_emotion_audio(data, cut_seconds=self.max_reference_seconds)
        feats = self._features(clip.samples, timings)
        with _Clock(timings, "conditioning"), torch.inference_mode():
            emovec = self.model.gpt.get_emovec(feats)
        return EmotionReference(key, feats, emovec, clip.seconds, clip.trimmed)

    def speaker(self, reference: AudioInput | SpeakerV2, timings: TimingsV2 | None = None) -> tuple[SpeakerV2, bool]:
        """Conditioning for a speaker reference (bytes or path); returns (speaker, cache_hit)."""
        hit, data, key = lookup_reference(reference, SpeakerV2, self._speakers, "speaker reference audio",
                                          self._cache_key)
        if hit is not None:
            return hit, True
        timings = timings if timings is not None else TimingsV2()
        m = self.model
        audio = load_speaker_audio(data, cut_seconds=self.max_reference_seconds)
        a16, a22 = audio.audio_16k.samples, audio.audio_22k.samples
        feats = self._features(a16, timings)
        with torch.inference_mode():
            with _Clock(timings, "codec"):
                _, s_ref = m.codec.quantize(feats)
            with _Clock(timings, "ref_mel"):
                ref_mel = m.ref_mel(a22.unsqueeze(0))
            with _Clock(timings, "campplus"):
                style = campplus_style(m.campplus, m.fbank(a16.unsqueeze(0))[0])
            with _Clock(timings, "s2mel"):
                prompt = m.s2mel.prompt_condition(s_ref, ref_mel.shape[-1])
            with _Clock(timings, "conditioning"):
                latents = m.gpt.speaker_latents(feats)
                base = m.gpt.get_emovec(feats)
        own = self._emotion_from_bytes(data, "self:" + key, timings)
        speaker = SpeakerV2(key, feats, s_ref, style, ref_mel, prompt, latents, base, own,
                            audio.audio_22k.seconds, audio.audio_22k.trimmed)
        self._speakers.put(key, speaker)
        return speaker, False

    def emotion_reference(self, reference: AudioInput | EmotionReference,
                          timings: TimingsV2 | None = None) -> tuple[EmotionReference, bool]:
        """An emotion reference (bytes or path) on the 16 kHz emotion path; returns (reference, cache_hit)."""
        hit, data, key = lookup_reference(reference, EmotionReference, self._emotions, "emotion reference audio",
                                          self._cache_key)
        if hit is not None:
            return hit, True
        timings = timings if timings is not None else TimingsV2()
        ref = self._emotion_from_bytes(data, key, timings)
        self._emotions.put(key, ref)
        return ref, False

    # --- emotion + conds --------------------------------------------------------------------------------------
    def conditioning(self, speaker: SpeakerV2, emotion: EmotionOptions = EmotionOptions(), *, text: str = "",
                     seed: int = 0, timings: TimingsV2 | None = None,
                     warnings: list[str] | None = None) -> Conditioning:
        """conds [1, 34, D] for one request (upstream's emotion precedence; rows picked once per request)."""
        timings = timings if timings is not None else TimingsV2()
        emotion.validate()
        vector = emotion.vector
        if emotion.from_text:
            with _Clock(timings, "emotion_text"):
                vector = self.model.qwen_emotion.vector(emotion.text if emotion.text is not None else text, seed)
            log.info("emotion from text: %s", vector)
        if vector is not None and emotion.reference is not None and warnings is not None:
            warnings.append("an emotion vector/text overrides the emotion reference audio (as upstream); it is unused")
        plan = plan_emotion(vector, emotion.alpha, emotion.reference is not None, emotion.alpha_mode,
                            from_text=emotion.from_text)
        alpha_unused = plan.merge_alpha == 1.0 and (plan.weights is None or emotion.alpha_mode == "rel")
        if emotion.alpha != 1.0 and alpha_unused and warnings is not None:
            warnings.append(f"emo_alpha={emotion.alpha:g} has no effect without emotion reference audio "
                            f"(alpha mode {emotion.alpha_mode}); upstream ignores it too")
        if plan.emotion_audio_is_speaker:
            emo = speaker.self_emotion
        else:
            emo, hit = self.emotion_reference(emotion.reference, timings)  # type: ignore[arg-type]
            timings.emotion_cache_hit = hit
        gpt, bank = self.model.gpt, self.model.emotion_bank
        rows = None
        with _Clock(timings, "conditioning"), torch.inference_mode():
            base = speaker.base_emovec
            emovec = base + plan.merge_alpha * (emo.emovec - base)  # UnifiedVoice.merge_emovec's order
            if plan.weights is not None:
                rng = random.Random(seed) if emotion.random else None
                rows = tuple(bank.select(speaker.style, emotion.random, rng))
                emovec = apply_emotion_vector(emovec, bank.mix(rows, plan.weights).to(emovec), plan.weights)
            conds = gpt.conditioning_rows(speaker.latents, emovec)
        return Conditioning(conds, emovec, plan, plan.weights, rows)

    # --- synthesis --------------------------------------------------------------------------------------------
    def stream(
        self,
        text: str,
        reference: AudioInput | SpeakerV2,
        params: GenerationParams = V2_GENERATION_DEFAULTS,
        *,
        emotion: EmotionOptions = EmotionOptions(),
        max_text_tokens_per_segment: int = 120,
        bucket_max_size: int = 4,
        noise_fn: NoiseFn | None = None,
        timings: TimingsV2 | None = None,
        warnings: list[str] | None = None,
    ) -> Iterator[SegmentAudio]:
        """Yield segments (22.05 kHz int16, no gaps) in text order as soon as each one and all before it exist.

        Insert `interval_samples` zeros between consecutive segments to get upstream's output (`synthesize` does).
        """
        return self._stream(text, reference, params, None, emotion=emotion,
                            max_text_tokens_per_segment=max_text_tokens_per_segment, bucket_max_size=bucket_max_size,
                            noise_fn=noise_fn, timings=timings, warnings=warnings)

    def _buckets(self, text: str, max_text_tokens_per_segment: int, bucket_max_size: int, request) -> list:
        """The text's segments, bucketed (`request`: per-request options of a subclass; None for 2.0)."""
        cfg = self.model.config.gpt
        segments = self.model.frontend.prepare(text, max_text_tokens_per_segment=max_text_tokens_per_segment)
        too_long = [s for s in segments if len(s.token_ids) + 2 > cfg.text_positions]
        if too_long:
            raise InputError(
                f"segment {too_long[0].index} has {len(too_long[0].token_ids)} text tokens; the model takes at "
                f"most {cfg.max_text_tokens}",
                f"lower max_text_tokens_per_segment (now {max_text_tokens_per_segment})")
        return self.model.frontend.bucket(segments, bucket_max_size)

    def _stream(self, text: str, reference, params: GenerationParams, request, *, emotion: EmotionOptions,
                max_text_tokens_per_segment: int, bucket_max_size: int, noise_fn: NoiseFn | None,
                timings: TimingsV2 | None, warnings: list[str] | None) -> Iterator[SegmentAudio]:
        """`stream`'s body; `request` carries a subclass's per-request options to its hooks (None for 2.0)."""
        cfg = self.model.config.gpt
        params.validate(cfg)  # type: ignore[arg-type]
        emotion.validate()
        if bucket_max_size < 1:
            raise InputError(f"bucket_max_size={bucket_max_size} must be >= 1", "pass a bucket size of 1 or more")
        timings = timings if timings is not None else TimingsV2()
        warnings = warnings if warnings is not None else []
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        with _Clock(timings, "text"):
            buckets = self._buckets(text, max_text_tokens_per_segment, bucket_max_size, request)
        speaker, hit = self.speaker(reference, timings)
        timings.speaker_cache_hit = hit
        if speaker.trimmed:
            warnings.append(f"reference audio was cut to its first {self.max_reference_seconds:g} s")
        cond = self.conditioning(speaker, emotion, text=text, seed=seed, timings=timings, warnings=warnings)
        ready: dict[int, SegmentAudio] = {}
        next_index = 0
        for bucket in buckets:
            for seg in self._synthesize_bucket(bucket, speaker, cond, params, seed, noise_fn, timings, warnings,
                                               max_text_tokens_per_segment, request):
                ready[seg.index] = seg
            while next_index in ready:
                yield ready.pop(next_index)
                next_index += 1
        while ready:  # only if the frontend skipped an index; never drop audio silently
            yield ready.pop(min(ready))

    def synthesize(
        self,
        text: str,
        reference: AudioInput | SpeakerV2,
        params: GenerationParams = V2_GENERATION_DEFAULTS,
        *,
        emotion: EmotionOptions = EmotionOptions(),
        max_text_tokens_per_segment: int = 120,
        bucket_max_size: int = 4,
        noise_fn: NoiseFn | None = None,
    ) -> SynthesisResult:
        """The whole utterance: segments joined with `interval_samples` zeros (upstream's interval_silence)."""
        return self._synthesize(text, reference, params, None, emotion=emotion,
                                max_text_tokens_per_segment=max_text_tokens_per_segment,
                                bucket_max_size=bucket_max_size, noise_fn=noise_fn)

    def _synthesize(self, text: str, reference, params: GenerationParams, request, *, emotion: EmotionOptions,
                    max_text_tokens_per_segment: int, bucket_max_size: int,
                    noise_fn: NoiseFn | None) -> SynthesisResult:
        start = time.perf_counter()
        timings = TimingsV2()
        warnings: list[str] = []
        if params.seed is None:
            params = replace(params, seed=secrets.randbits(62))
        segments = list(self._stream(text, reference, params, request, emotion=emotion,
                                     max_text_tokens_per_segment=max_text_tokens_per_segment,
                                     bucket_max_size=bucket_max_size, noise_fn=noise_fn, timings=timings,
                                     warnings=warnings))
        pcm = join_segments([seg.pcm16 for seg in segments], self.interval_samples)
        timings.total_s = time.perf_counter() - start
        timings.audio_s = pcm.shape[0] / self.sample_rate
        return SynthesisResult(pcm, self.sample_rate, segments, timings, int(params.seed), warnings)  # type: ignore

    # --- one bucket -------------------------------------------------------------------------------------------
    def _synthesize_bucket(self, bucket, speaker: SpeakerV2, cond: Conditioning, params: GenerationParams,
                           seed: int, noise_fn: NoiseFn | None, timings: TimingsV2, warnings: list[str],
                           max_text_tokens_per_segment: int, request=None) -> list[SegmentAudio]:
        gpt = self.model.gpt
        ids = [list(s.token_ids) for s in bucket]
        with _Clock(timings, "generate"):
            outs = generate_codes(gpt, cond.conds, ids, params, [segment_seed(seed, s.index) for s in bucket])
        timings.tokens += sum(len(o.codes) + int(o.stopped) for o in outs)
        for seg, out in zip(bucket, outs):
            if not out.stopped:
                warnings.append(cut_warning(seg.index, params.max_mel_tokens))
        keep = [i for i, o in enumerate(outs) if o.codes]
        mels: dict[int, torch.Tensor] = {}
        if keep:
            with _Clock(timings, "latent"):
                latents = latent_pass_v2(gpt, cond.conds, [ids[i] for i in keep], [outs[i].codes for i in keep])
            with _Clock(timings, "s2mel"):
                if self.s2mel_batch:
                    rows = self.mel_frames(speaker, [outs[i].codes for i in keep], latents,
                                           [bucket[i].index for i in keep], seed, noise_fn)
                else:
                    rows = [self.mel_frames(speaker, [outs[i].codes], [lat], [bucket[i].index], seed, noise_fn)[0]
                            for i, lat in zip(keep, latents)]
            mels = dict(zip(keep, rows))
        return self._vocode(bucket, outs, mels, timings, warnings)

    def _vocode(self, bucket, outs, mels: dict, timings: TimingsV2, warnings: list[str]) -> list[SegmentAudio]:
        """BigVGAN per segment, PCM16; a segment without codes is silent (and warned about)."""
        results = []
        with _Clock(timings, "vocoder"):
            for i, seg in enumerate(bucket):
                if i in mels:
                    with torch.inference_mode():
                        wav = self.model.vocoder(mels[i])
                    pcm = to_pcm16(wav.reshape(-1))
                else:
                    msg = silent_warning(seg.index)
                    log.warning(msg)
                    warnings.append(msg)
                    pcm = np.zeros(0, np.int16)
                results.append(SegmentAudio(seg.index, seg.text, outs[i].codes, outs[i].stopped, pcm))
        return results

    @torch.inference_mode()
    def mel_frames(self, speaker: SpeakerV2, codes: Sequence[Sequence[int]], latents: Sequence[torch.Tensor],
                   indices: Sequence[int], seed: int, noise_fn: NoiseFn | None = None) -> list[torch.Tensor]:
        """s2mel for a batch of segments: one generated mel [1, mels, floor(1.72 N_i)] per segment.

        Rows are padded to the longest and carry their own lengths everywhere, so each equals its solo run;
        segment `indices[i]`'s noise comes from its own generator (or noise_fn(index, shape)).
        """
        m = self.model
        lens = torch.tensor([len(c) for c in codes], dtype=torch.long)
        width = int(lens.max())
        code_batch = torch.zeros(len(codes), width, dtype=torch.long)
        latent_batch = latents[0].new_zeros(len(codes), width, latents[0].shape[-1])
        for i, (c, lat) in enumerate(zip(codes, latents)):
            code_batch[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
            latent_batch[i, : len(c)] = lat[0]
        cond = m.s2mel.target_condition(m.codec.vq2emb(code_batch), latent_batch, lens)  # zeros past each target
        return self.sample_mels(speaker, cond, target_mel_frames(lens), indices, seed, noise_fn)

    @torch.inference_mode()
    def sample_mels(self, speaker, cond: torch.Tensor, targets: torch.Tensor, indices: Sequence[int], seed: int,
                    noise_fn: NoiseFn | None = None) -> list[torch.Tensor]:
        """The CFM for a padded batch: target condition [B, max T, C] (zeros past each row's `targets`) ->
        one generated mel [1, mels, targets_i] per row, prompted by the speaker's mel and prompt condition."""
        m = self.model
        n_mels = m.config.s2mel.n_mels
        t_ref = speaker.ref_mel.shape[-1]
        b = cond.shape[0]
        mu = torch.cat([speaker.prompt_condition.expand(b, -1, -1), cond], dim=1)
        totals = t_ref + targets
        frames = mu.shape[1]
        z = mu.new_zeros(b, n_mels, frames)
        for i, (index, total) in enumerate(zip(indices, totals.tolist())):
            shape = (1, n_mels, total)
            if noise_fn is not None:
                noise = noise_fn(index, shape)
                if tuple(noise.shape) != shape:
                    raise InputError(f"noise_fn gave {list(noise.shape)} for segment {index}, expected {list(shape)}",
                                     "return noise of the requested shape")
            else:
                gen = torch.Generator().manual_seed(segment_seed(seed ^ _NOISE_SALT, index))
                noise = torch.randn(shape, generator=gen)
            z[i, :, :total] = noise[0].to(z)
        prompt_lens = torch.full((b,), t_ref, dtype=torch.long)
        x, prompt_x = prompt_inputs(z, speaker.ref_mel.expand(b, -1, -1), prompt_lens)
        style = speaker.style.expand(b, -1)
        ts, dts = euler_schedule(self.diffusion_steps)
        estimator = m.s2mel.cfm.estimator
        for k in range(self.diffusion_steps):
            x = euler_step(estimator, x, prompt_x, totals, prompt_lens, ts[k], dts[k], style, mu, self.cfg_rate)
        return [x[i : i + 1, :, t_ref:total] for i, total in enumerate(totals.tolist())]


def _read_bytes(reference: AudioInput, what: str) -> bytes:
    if isinstance(reference, (bytes, bytearray, memoryview)):
        return bytes(reference)
    if not isinstance(reference, (str, os.PathLike)):
        raise InputError(f"{what} must be a path or bytes, got {type(reference).__name__}",
                         "pass the path of a wav/flac/mp3 file")
    path = Path(reference)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist", "pass the path of a wav/flac/mp3 file") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory", "pass the path of a wav/flac/mp3 file") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}", "check the path and permissions") from None
