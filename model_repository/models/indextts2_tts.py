"""`tts` / `tts_offline` for IndexTTS-2: the entry models of models/tts.py with IndexTTS-2's stages.

Per request: the speaker reference's conditioning (cached per audio hash: model_repository/indextts2/conditioning.py
over the leaf graphs), the emotion control (EMOTION_AUDIO + EMO_ALPHA, EMO_VECTOR, EMO_TEXT through the Qwen
text-emotion model when the export or the source model directory has it, EMO_RANDOM; engine_ref's validators), the
34 conditioning rows, then per segment, through the shared orchestrator: decode in `gpt_decoder` (continuous
batching, beams, seeds, cancellation; no silence trimming) -> `s2mel_cond` -> `s2mel` (the diffusion steps batched
across every live request; the segment's noise seed as Synthesizer2 draws it) -> `vocoder` -> 22.05 kHz PCM16,
INTERVAL_SILENCE_MS of zeros after every segment but the last.

Blocking Python work (audio decoding and resampling, the SeamlessM4T extractor, the fbank, the reference mel,
Qwen) runs in the model's executor, never on the event loop thread. A cancelled request cancels its diffusion in
`s2mel` as well as its sequences in the decoder. s2mel is not causal: one chunk per segment, whatever
CHUNK_FIRST_CODES says (it is range-checked and otherwise ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from pathlib import Path

import numpy as np

from engine_ref.audio import audio_fingerprint, to_pcm16
from engine_ref.cache import BoundedLRU
from engine_ref.errors import InputError
from engine_ref.finishing import interval_samples
from engine_ref.params import GenerationParams, segment_seed
from model_repository import contract as c
from model_repository.models.tts import BlsStages, EntryModel, _stage_error
from model_repository.orchestrator import Cancelled, DecodeResult, Segment, StageError, SynthesisJob

__all__ = ["TtsModelV2", "TritonStagesV2"]


class TritonStagesV2(BlsStages):
    """IndexTTS-2's calls: the reference graphs, and a segment's audio = s2mel_cond -> s2mel -> vocoder."""

    async def graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        comp = self.m.components[name]
        inputs = [self.pb.Tensor(t.name, np.ascontiguousarray(feeds[t.name], np.dtype(t.dtype))) for t in comp.inputs]
        return await self.call(name, inputs, [t.name for t in comp.outputs])

    async def encode_speaker(self, data: bytes, key: str):
        with _naming(c.REFERENCE_AUDIO.name):
            return await self.m.encoder.speaker(data, key)

    async def target_condition(self, speaker, result: DecodeResult) -> np.ndarray:
        """The segment's s2mel condition [frames, content]: s2mel_cond(codes, GPT latents), floor(1.72 N) frames."""
        n = len(result.codes)
        out = await self.graph("s2mel_cond", {
            "codes": np.asarray(result.codes, np.int64)[None], "latents": np.asarray(result.latents, np.float32)[None],
            "code_lengths": np.array([n], np.int64)})
        return out["cond"][0, : int(out["cond_lengths"][0])]

    async def segment_audio(self, seq_id: str, speaker, segment: Segment, result: DecodeResult,
                            seed: int) -> np.ndarray:
        from engine_ref.indextts2.synthesizer import _NOISE_SALT

        mu = np.concatenate([speaker.prompt_condition, await self.target_condition(speaker, result)])
        mel = await self.diffuse(seq_id, mu, speaker.ref_mel, speaker.speaker_embedding,
                                 segment_seed(seed ^ _NOISE_SALT, segment.index))
        wav = await self.graph(c.VOCODER, {"mel": mel[None]})
        return to_pcm16(next(iter(wav.values())).reshape(-1))

    async def diffuse(self, seq_id: str, mu: np.ndarray, prompt_mel: np.ndarray, style: np.ndarray,
                      noise_seed: int) -> np.ndarray:
        """One segment's 25 Euler steps in `s2mel` (batched there with every other live request's)."""
        T = self.pb.Tensor
        req = self.pb.InferenceRequest(model_name=c.S2MEL, requested_output_names=[f.name for f in c.S2MEL_OUTPUTS],
                                       inputs=[T(c.SEQUENCE_ID.name, np.array([seq_id.encode()], dtype=np.object_)),
                                               T(c.MU.name, np.ascontiguousarray(mu, np.float32)),
                                               T(c.PROMPT_MEL.name, np.ascontiguousarray(prompt_mel, np.float32)),
                                               T(c.STYLE.name, np.ascontiguousarray(style, np.float32)),
                                               T(c.NOISE_SEED.name, np.array([noise_seed], np.int64))] + self._key())
        try:
            responses = await req.async_exec(decoupled=True)
        except asyncio.CancelledError:  # the request was cancelled or ran out of time: free its rows in s2mel too
            await asyncio.shield(self.cancel_diffusion(seq_id))
            raise
        for resp in responses:  # s2mel answers once, flagged final: iterating does not block
            if resp.has_error():
                raise _stage_error(resp.error())
            mel = self.pb.get_output_tensor_by_name(resp, c.MEL.name)
            if mel is None:
                continue
            if bool(self.pb.get_output_tensor_by_name(resp, c.CANCELLED.name).as_numpy()[0]):
                raise Cancelled()
            return mel.as_numpy()
        raise StageError("s2mel returned no result", "check the server log")

    async def cancel_diffusion(self, seq_id: str) -> None:
        try:
            await self.decoupled(c.S2MEL, [
                self.pb.Tensor(c.SEQUENCE_ID.name, np.array([seq_id.encode()], dtype=np.object_)),
                self.pb.Tensor(c.CANCEL.name, np.array([True])),
            ], [])
        except Exception as exc:  # the request is ending anyway; s2mel drops it when its own check fires
            self.m.log_error(f"{self.m.model_name}: cancelling diffusion {seq_id} failed: {exc}")


class TtsModelV2(EntryModel):
    """IndexTTS-2: reference graphs + emotion per request, decoder, s2mel, vocoder; 22.05 kHz."""

    family_name = "IndexTTS-2"

    def setup_family(self) -> None:
        from engine_ref.indextts2.emotion import load_emotion_bank
        from engine_ref.indextts2.gpt import V2_GENERATION_DEFAULTS
        from engine_ref.indextts2.qwen_emotion import QwenEmotion
        from model_repository.indextts2.conditioning import ReferenceFrontEnd

        m, export = self.manifest, self.export_dir
        self.cfg = self.load_config()
        self.base_params = V2_GENERATION_DEFAULTS
        self.components = m.components
        self.bank = load_emotion_bank(export / m.assets["spk_matrix"], export / m.assets["emo_matrix"],
                                      self.cfg.emo_num)
        self.setup_conditioning()
        self.front = ReferenceFrontEnd(export, m, self.cfg, self.max_reference_seconds)
        self.stages = self.make_stages()
        self.encoder = self.make_encoder()
        self.emotions: BoundedLRU[str, object] = BoundedLRU(self.param("emotion_cache_size", 64, int))
        self.opts = dataclasses.replace(self.opts, interval_silence=self._gap(None))
        qwen_dir = self._qwen_dir()
        limit = self.param("qwen_max_new_tokens", 0, int)
        self.qwen = None if qwen_dir is None else QwenEmotion(qwen_dir, **({"max_new_tokens": limit} if limit else {}))
        self._qwen_lock = threading.Lock()  # Qwen seeds torch's global RNG around generate: one call at a time

    # --- what IndexTTS-2.5 changes (models/indextts25_tts.py overrides these) -----------------------------------
    def load_config(self):
        from engine_ref.indextts2.config import load_v2_config

        return load_v2_config(self.export_dir / self.manifest.assets["config"])

    def setup_conditioning(self) -> None:
        self.speed_emb = np.load(self.export_dir / self.manifest.assets["speed_emb"])

    def make_stages(self) -> TritonStagesV2:
        return TritonStagesV2(self)

    def make_encoder(self):
        from model_repository.indextts2.conditioning import VoiceEncoderV2

        return VoiceEncoderV2(self.front, self.stages.graph, self._blocking, int(self.cfg.semantic_dim))

    def request_options(self, request: dict):
        """The family's own per-request options, checked before any work (IndexTTS-2: none; 2.5's are refused)."""
        self.refuse_inputs(request, c.V25_INPUTS, "IndexTTS-2.5")
        return None

    async def segments(self, text: str, request: dict, options) -> tuple[Segment, ...]:
        return await self.stages.preprocess(text.encode("utf-8"), request.get(c.MAX_TEXT_TOKENS_PER_SEGMENT.name))

    def conditioning(self, speaker, plan, emo, use_random: bool, seed: int):
        from model_repository.indextts2.conditioning import mix_emotion

        return mix_emotion(speaker, plan, emo, use_random, self.bank, self.speed_emb, seed)

    def voice(self, speaker, cond, options):
        from model_repository.indextts2.conditioning import voice_for_request

        return voice_for_request(speaker, cond)

    def _qwen_dir(self) -> Path | None:
        """The text-emotion model: beside the export, else in the source model directory (None: neither has it)."""
        candidates = [self.export_dir / self.cfg.qwen_emo_path]
        source = self.manifest.model.get("qwen_emotion_dir")
        if source:
            candidates.append(Path(source))
        return next((d for d in candidates if (d / "config.json").is_file()), None)

    async def _blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _gap(self, ms) -> int:
        if ms is None:
            ms = self.param("interval_silence_ms", 200, int)
        return interval_samples(self.sample_rate, int(ms))

    # --- one request ------------------------------------------------------------------------------------------
    def emotion_options(self, request: dict):
        """EmotionOptions from the request's IndexTTS-2 inputs, validated by engine_ref; every refusal names the
        input(s) at fault (INVALID_ARGUMENT), before any work."""
        from engine_ref.indextts2.emotion import validate_emo_alpha, validate_emotion_vector
        from engine_ref.indextts2.synthesizer import EmotionOptions

        audio = self.scalar(request.get(c.EMOTION_AUDIO.name))
        alpha = self.scalar(request.get(c.EMO_ALPHA.name))
        vector = request.get(c.EMO_VECTOR.name)
        text = request.get(c.EMO_TEXT.name)
        rand = self.scalar(request.get(c.EMO_RANDOM.name))
        if text is not None:
            text, _ = c.decode_text(self.scalar(text))
        alpha = 1.0 if alpha is None else float(alpha)
        with _naming(c.EMO_ALPHA.name):
            validate_emo_alpha(alpha)
        if vector is not None:
            vector = tuple(float(v) for v in np.asarray(vector).reshape(-1))
            with _naming(c.EMO_VECTOR.name):
                validate_emotion_vector(vector)
        opts = EmotionOptions(reference=bytes(audio) if audio is not None and len(audio) else None, alpha=alpha,
                              vector=vector, text=text, random=bool(rand) if rand is not None else False)
        if opts.vector is not None and opts.from_text:
            names = f"{c.EMO_VECTOR.name} and {c.EMO_TEXT.name}"
        elif opts.random and opts.vector is None and not opts.from_text:
            names = c.EMO_RANDOM.name
        else:
            names = c.EMO_TEXT.name if opts.from_text else "emotion inputs"
        with _naming(names):
            opts.validate()
        return opts

    def _interval(self, request: dict) -> int:
        ms = self.scalar(request.get(c.INTERVAL_SILENCE_MS.name))
        if ms is not None and not 0 <= int(ms) <= c.MAX_INTERVAL_SILENCE_MS:
            raise InputError(f"{c.INTERVAL_SILENCE_MS.name}={int(ms)} is out of range",
                             f"send 0..{c.MAX_INTERVAL_SILENCE_MS} ms (default {self.param('interval_silence_ms', 200)})")
        return self._gap(ms)

    async def job_from(self, request: dict, params: GenerationParams, text: str,
                       warnings: list[str]) -> SynthesisJob:
        from model_repository.indextts2.conditioning import plan_request_emotion

        options = self.request_options(request)  # every value is checked before any work
        emotion = self.emotion_options(request)
        gap = self._interval(request)
        if emotion.from_text and self.qwen is None:
            raise InputError("EMO_TEXT needs the Qwen text-emotion model, which this deployment does not have",
                             "send EMO_VECTOR or EMOTION_AUDIO instead, or put qwen0.6bemo4-merge/ beside the export")
        seed = self.request_seed(params)
        speaker_task = asyncio.ensure_future(self._speaker(request))
        vector_task = asyncio.ensure_future(self._text_vector(emotion.text, seed)) if emotion.from_text else None
        try:
            segments = await self.segments(text, request, options)
            speaker = await speaker_task
            vector = await vector_task if vector_task is not None else emotion.vector
        except BaseException:
            speaker_task.cancel()
            if vector_task is not None:
                vector_task.cancel()
            raise
        if speaker.trimmed:
            warnings.append(f"reference audio was cut to its first {self.max_reference_seconds:g} s")
        plan = plan_request_emotion(emotion, vector, warnings)
        emo = speaker.self_emotion if plan.emotion_audio_is_speaker else await self._emotion_reference(emotion.reference)
        cond = self.conditioning(speaker, plan, emo, emotion.random, seed)
        return SynthesisJob(segments, self.voice(speaker, cond, options), params, seed,
                            stream=self.stream_flag(request), warnings=tuple(warnings), interval_silence=gap)

    async def _text_vector(self, text: str, seed: int) -> tuple[float, ...]:
        def run():
            with self._qwen_lock:
                return self.qwen.vector(text, seed)

        return await self._blocking(run)

    async def _emotion_reference(self, data: bytes):
        key = f"{audio_fingerprint(data)[:40]}-{self.max_reference_seconds:g}"
        hit = self.emotions.get(key)
        self.metrics.inc("tts_emotion_cache_hits_total" if hit is not None else "tts_emotion_cache_misses_total", 1,
                         "emotion-reference cache hits" if hit is not None else "emotion-reference cache misses")
        if hit is not None:
            return hit
        with _naming(c.EMOTION_AUDIO.name):
            ref = await self.encoder.emotion(data, key)
        self.emotions.put(key, ref)
        return ref


@contextlib.contextmanager
def _naming(names: str):
    """Prefix an InputError raised inside with the request input(s) it is about (clients see which one to fix)."""
    try:
        yield
    except InputError as exc:
        if exc.problem.startswith(names):
            raise
        raise InputError(f"{names}: {exc.problem}", exc.fix) from None
