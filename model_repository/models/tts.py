"""`tts` (decoupled, streaming) and `tts_offline` (one response): the entry models, thin adapters over
model_repository/orchestrator.py.

Both run on the Python backend's asyncio event loop: `execute` never blocks on another model. Each request becomes
a coroutine that awaits its own calls (`async_exec`) to `preprocess`, `cond_encoder`, `gpt_decoder` and `vocoder`,
so requests progress side by side and the decoder batches their sequences. Only messages to the server happen on
the loop thread (sends, cancellation checks, metrics); blocking `exec` calls run in the stub's executor, which is
sized here (its default of cpu_count + 4 threads would cap concurrent decoder calls at six on two cores).

`tts` streams one response per segment (then an empty final one); `tts_offline` answers once through its response
sender, after `execute` has returned, so offline requests overlap too. Every call to an internal model carries the
server's internal key; client requests to those models are refused (models/base.py).

`EntryModel` and `BlsStages` are what every family shares (the Triton entry point, responses, metrics, the speaker
cache, preprocess and decoder calls); `TtsModel` / `TritonStages` add IndexTTS 1.x's conditioning and vocoder.
IndexTTS-2's entry model lives in models/indextts2_tts.py.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from engine_ref.audio import audio_fingerprint, load_audio, to_pcm16
from engine_ref.cache import BoundedLRU
from engine_ref.indextts.config import load_config
from engine_ref.errors import InputError
from engine_ref.mel import LogMelSpectrogram
from engine_ref.params import GenerationParams
from export.manifest import read_manifest
from model_repository import contract as c
from model_repository.models.base import Metrics, PythonModel, split_status
from model_repository.orchestrator import (Cancelled, Chunk, ChunkPlan, DecodeResult, OrchestratorOptions, Segment,
                                           Speaker, StageError, SynthesisJob, merge_chunks, synthesize)


class BlsStages:
    """The orchestrator's calls every family makes (preprocess, the decoder), over the Python backend's async BLS."""

    def __init__(self, model: "EntryModel"):
        self.m = model
        self.pb = model.pb

    def _key(self) -> list:
        key = self.m.internal_key()
        return [self.pb.Tensor(c.INTERNAL_KEY.name, np.array([key.encode()], dtype=np.object_))] if key else []

    async def call(self, model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
        req = self.pb.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs + self._key())
        resp = await req.async_exec()
        if resp.has_error():
            raise _stage_error(resp.error())
        return {name: self.pb.get_output_tensor_by_name(resp, name).as_numpy() for name in outputs}

    async def decoupled(self, model: str, inputs: list, outputs: list[str]) -> list[Any]:
        req = self.pb.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs + self._key())
        responses = await req.async_exec(decoupled=True)
        out = []
        for resp in responses:  # the decoder answers once, flagged final: iterating does not block
            if resp.has_error():
                raise _stage_error(resp.error())
            out.append(resp)
        return out

    async def decode(self, seq_id: str, speaker: Speaker, segment: Segment, params: GenerationParams,
                     seed: int) -> DecodeResult:
        inputs = self._decode_inputs(seq_id, speaker, segment, params, seed)
        for resp in await self.decoupled(c.DECODER, inputs, [f.name for f in c.DECODER_OUTPUTS]):
            if self.pb.get_output_tensor_by_name(resp, c.CODES.name) is not None:
                return self._result(resp)
        raise StageError("gpt_decoder returned no result", "check the server log")

    def _decode_inputs(self, seq_id: str, speaker: Speaker, segment: Segment, params: GenerationParams,
                       seed: int) -> list:
        gpt = self.m.cfg.gpt
        raw = list(segment.ids)
        ids = [i for i in raw if i not in (gpt.start_text_token, gpt.stop_text_token)]
        p, T = params, self.pb.Tensor
        inputs = [
            T(c.SEQUENCE_ID.name, np.array([seq_id.encode()], dtype=np.object_)),
            T(c.CONDS.name, speaker.conds.astype(np.float32)),
            T(c.TEXT_IDS.name, np.asarray(ids, np.int64)),
            T(c.PARAMS["temperature"].name, np.array([p.temperature], np.float32)),
            T(c.PARAMS["top_p"].name, np.array([p.top_p], np.float32)),
            T(c.PARAMS["top_k"].name, np.array([p.top_k], np.int32)),
            T(c.PARAMS["repetition_penalty"].name, np.array([p.repetition_penalty], np.float32)),
            T(c.PARAMS["num_beams"].name, np.array([p.num_beams], np.int32)),
            T(c.PARAMS["max_mel_tokens"].name, np.array([p.max_mel_tokens], np.int32)),
            T(c.PARAMS["do_sample"].name, np.array([p.do_sample])),
            T(c.PARAMS["seed"].name, np.array([seed], np.int64)),
            T(c.PRIORITY.name, np.array([segment.index], np.int32)),
        ]
        if raw != ids:
            inputs.append(T(c.TEXT_IDS_RAW.name, np.asarray(raw, np.int64)))
        return inputs

    async def decode_parts(self, seq_id: str, speaker: Speaker, segment: Segment, params: GenerationParams,
                           seed: int, stream_at: list[int]):
        inputs = self._decode_inputs(seq_id, speaker, segment, params, seed)
        inputs.append(self.pb.Tensor(c.STREAM_AT.name, np.asarray(stream_at, np.int32)))
        req = self.pb.InferenceRequest(model_name=c.DECODER, inputs=inputs + self._key(),
                                       requested_output_names=[f.name for f in c.DECODER_OUTPUTS])
        responses = iter(await req.async_exec(decoupled=True))
        loop = asyncio.get_running_loop()
        while True:
            # The iterator blocks until the decoder's next response: wait for it off the event loop.
            resp = await loop.run_in_executor(None, next, responses, None)
            if resp is None:
                return
            if resp.has_error():
                raise _stage_error(resp.error())
            if self.pb.get_output_tensor_by_name(resp, c.CODES.name) is None:
                continue
            part = self._result(resp)
            yield part
            if not part.partial:
                return

    def _result(self, resp) -> DecodeResult:
        get = lambda f: self.pb.get_output_tensor_by_name(resp, f.name).as_numpy()  # noqa: E731
        offset = self.pb.get_output_tensor_by_name(resp, c.CODE_OFFSET.name)
        partial = self.pb.get_output_tensor_by_name(resp, c.PARTIAL.name)
        return DecodeResult(get(c.CODES), get(c.LATENTS), bool(get(c.STOPPED)[0]), bool(get(c.CANCELLED)[0]),
                            int(get(c.GENERATED)[0]), offset=int(offset.as_numpy()[0]) if offset is not None else 0,
                            partial=bool(partial.as_numpy()[0]) if partial is not None else False)

    async def cancel(self, seq_id: str) -> None:
        await self.decoupled(c.DECODER, [
            self.pb.Tensor(c.SEQUENCE_ID.name, np.array([seq_id.encode()], dtype=np.object_)),
            self.pb.Tensor(c.CANCEL.name, np.array([True])),
        ], [])

    async def preprocess(self, text: bytes, max_tokens: np.ndarray | None) -> tuple[Segment, ...]:
        return self.segments_of(await self.call_preprocess(text, max_tokens))

    async def call_preprocess(self, text: bytes, max_tokens: np.ndarray | None, extra_inputs: tuple = (),
                              extra_outputs: tuple[c.Field, ...] = ()) -> dict[str, np.ndarray]:
        inputs = [self.pb.Tensor(c.TEXT.name, np.array([text], dtype=np.object_))]
        if max_tokens is not None:
            inputs.append(self.pb.Tensor(c.MAX_TEXT_TOKENS_PER_SEGMENT.name, max_tokens))
        return await self.call(c.PREPROCESS, inputs + list(extra_inputs),
                               [f.name for f in (*c.PREPROCESS_OUTPUTS, *extra_outputs)])

    @staticmethod
    def segments_of(out: dict[str, np.ndarray]) -> tuple[Segment, ...]:
        """The preprocess model's flat tensors as segments."""
        ids, lengths, texts = out[c.SEGMENT_IDS.name], out[c.SEGMENT_LENGTHS.name], out[c.SEGMENT_TEXTS.name]
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
        return tuple(Segment(i, tuple(int(x) for x in ids[bounds[i]: bounds[i + 1]]),
                             t.decode("utf-8") if isinstance(t, bytes) else str(t))
                     for i, t in enumerate(texts))


class TritonStages(BlsStages):
    """IndexTTS 1.x: conditioning through cond_encoder, audio through the vocoder from the latents."""

    async def vocode(self, latents: np.ndarray, speaker: Speaker) -> np.ndarray:
        voc = self.m.voc
        names = [t.name for t in voc.inputs]
        out = await self.call(c.VOCODER, [self.pb.Tensor(names[0], latents[None].astype(np.float32)),
                                          self.pb.Tensor(names[1], speaker.speaker_embedding[None].astype(np.float32))],
                              [voc.outputs[0].name])
        return to_pcm16(out[voc.outputs[0].name].reshape(-1))

    async def encode_speaker(self, data: bytes, key: str) -> Speaker:
        m = self.m
        loop = asyncio.get_running_loop()
        clip, mel = await loop.run_in_executor(None, m.reference_mel, data)  # decoding + mel off the loop thread
        names = m.cond_names
        out = await self.call(c.COND_ENCODER, [
            self.pb.Tensor(names.inputs[0].name, mel),
            self.pb.Tensor(names.inputs[1].name, np.array([mel.shape[-1]], np.int64)),
        ], [t.name for t in names.outputs])
        conds, spk = (out[t.name][0] for t in names.outputs)
        return Speaker(key, conds, spk, clip.seconds, clip.trimmed)


def _stage_error(error: Any) -> StageError:
    code, message = split_status(error.message())
    exc = StageError(message)
    exc.triton_code = code
    return exc


class EntryModel(PythonModel):
    """What the entry models of every family share; subclasses set up their family and build each request's job.

    Subclass hooks: `setup_family()` (sets `cfg` with a `.gpt` section, `stages`, `base_params`, ...),
    `job_from(request, params, text, warnings)` and, optionally, `_plan` (chunked streaming).
    """

    #: the request parameters' defaults when a request leaves them out (the family's upstream defaults)
    base_params: GenerationParams = GenerationParams()
    #: family name shown in errors
    family_name: str = "IndexTTS 1.x"

    def setup(self) -> None:
        import torch

        torch.set_num_threads(1)  # the BLS's own tensors are small; the cores belong to the graphs
        self.manifest = read_manifest(self.export_dir)
        self.sample_rate = int(self.manifest.model["sampling_rate"])
        self.decoupled = bool(self.model_config.get("model_transaction_policy", {}).get("decoupled", False))
        self.max_reference_seconds = self.param("max_reference_seconds", 50.0, float)
        self.opts = OrchestratorOptions(
            segments_in_flight=max(1, self.param("segments_in_flight", 4, int)),
            request_timeout_s=self.param("request_timeout_s", 600.0, float), sample_rate=self.sample_rate)
        self.speakers: BoundedLRU[str, Any] = BoundedLRU(self.param("speaker_cache_size", 64, int))
        self.chunk_first = self.param("chunk_first_codes", c.DEFAULT_CHUNK_FIRST_CODES, int)
        self.chunk_max = self.param("chunk_max_codes", c.DEFAULT_CHUNK_MAX_CODES, int)
        # Threads for the stub's blocking exec calls (each in-flight decoder call holds one until its sequence ends).
        self._executor = ThreadPoolExecutor(max_workers=self.param("bls_threads", 512, int), thread_name_prefix="bls")
        self._loop_ready: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self.metrics = Metrics(self.pb, self.model_name)
        self._active = 0
        self.setup_family()

    def setup_family(self) -> None:  # overridden
        raise NotImplementedError

    def finalize(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- Triton entry point -----------------------------------------------------------------------------------
    async def execute(self, requests):
        loop = asyncio.get_running_loop()
        if self._loop_ready is not loop:
            loop.set_default_executor(self._executor)
            self._loop_ready = loop
        # Inputs and senders are taken here: request objects must not be read after execute has returned.
        work = [(self._snapshot(r), r.get_response_sender()) for r in requests]
        if self.decoupled:
            await asyncio.gather(*(self._serve(inputs, sender) for inputs, sender in work))
        else:
            for inputs, sender in work:
                task = loop.create_task(self._serve(inputs, sender))
                self._tasks.add(task)  # a strong reference until it ends
                task.add_done_callback(self._tasks.discard)
        return None

    def _snapshot(self, request) -> dict[str, np.ndarray]:
        out = {}
        for spec in self.model_config.get("input", []):
            value = self.tensor(request, spec["name"])
            if value is not None:
                out[spec["name"]] = np.array(value, copy=True)
        return out

    async def _serve(self, request: dict, sender) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        start = time.perf_counter()
        self._active += 1
        self.metrics.set("tts_active_requests", self._active, "requests being synthesized")
        status = "failed"
        try:
            job = await self._job(request)
            streaming = self.decoupled and job.stream
            chunks: list[Chunk] = []

            async def emit(chunk: Chunk) -> None:
                if streaming:
                    sender.send(self._response(chunk, job.speaker.key))
                else:
                    chunks.append(chunk)

            summary = await synthesize(job, self.stages, emit, lambda: _cancelled(sender), self.opts,
                                       plan=self._plan(request, job) if streaming else None)
            if streaming:
                sender.send(flags=final)
            else:
                sender.send(self._response(merge_chunks(chunks), job.speaker.key), flags=final)
            status = "completed"
            self.metrics.inc("tts_audio_seconds_total", summary.audio_seconds, "seconds of audio generated")
            if summary.first_audio_s is not None:
                self.metrics.set("tts_time_to_first_audio_seconds", summary.first_audio_s,
                                 "last request's time to first audio")
                self.metrics.inc("tts_time_to_first_audio_seconds_sum", summary.first_audio_s,
                                 "sum of times to first audio")
                self.metrics.inc("tts_time_to_first_audio_count", 1, "requests that produced audio")
        except Cancelled:
            status = "cancelled"
            _send_quietly(sender, None, final)
        except Exception as exc:  # every failure ends this request only, with a named error
            _send_quietly(sender, self.error_response(exc), final)
        finally:
            self._active -= 1
            self.metrics.set("tts_active_requests", self._active)
            self.metrics.inc(f"tts_requests_{status}_total", 1, f"requests {status}")
            self.metrics.inc("tts_request_seconds_sum", time.perf_counter() - start, "wall time of finished requests")

    # --- one request ------------------------------------------------------------------------------------------
    async def _job(self, request: dict) -> SynthesisJob:
        params = c.params_from_inputs({f.name: request.get(f.name) for f in c.PARAMS.values()}, self.base_params)
        params.validate(self.cfg.gpt)
        self._check_chunks(request)
        warnings: list[str] = []
        text = self.scalar(request.get(c.TEXT.name))
        if text is None:
            raise InputError("the request has no TEXT", "send the text to synthesize as TEXT (BYTES, shape [1])")
        text, replaced = c.decode_text(text)
        if replaced:
            warnings.append(f"TEXT was not valid UTF-8: {replaced} byte sequence(s) were replaced by U+FFFD")
        return await self.job_from(request, params, text, warnings)

    async def job_from(self, request: dict, params: GenerationParams, text: str,
                       warnings: list[str]) -> SynthesisJob:  # overridden
        raise NotImplementedError

    def refuse_inputs(self, request: dict, fields, owner: str) -> None:
        """Another family's inputs are refused by name (INVALID_ARGUMENT), never silently ignored."""
        given = [f.name for f in fields if request.get(f.name) is not None]
        if given:
            raise InputError(f"{', '.join(given)} {'is an input' if len(given) == 1 else 'are inputs'} of {owner}; "
                             f"this server runs {self.family_name}",
                             f"drop {', '.join(given)}, or send the request to an {owner} server")

    def stream_flag(self, request: dict) -> bool:
        flag = self.scalar(request.get(c.STREAM.name))
        return True if flag is None else bool(flag)

    @staticmethod
    def request_seed(params: GenerationParams) -> int:
        return params.seed if params.seed is not None else secrets.randbits(62)

    async def _speaker(self, request: dict):
        """The cached conditioning of the request's voice (REFERENCE_AUDIO, or SPEAKER_ID from an earlier response);
        a miss is encoded by `stages.encode_speaker(data, key)` and cached."""
        audio = self.scalar(request.get(c.REFERENCE_AUDIO.name))
        speaker_id = self.text_of(request.get(c.SPEAKER_ID.name))
        if audio is None or len(audio) == 0:
            if not speaker_id:
                raise InputError("the request has neither REFERENCE_AUDIO nor SPEAKER_ID",
                                 "send the reference recording (wav/flac/mp3 bytes) or a SPEAKER_ID from an earlier response")
            hit = self.speakers.get(speaker_id)
            self._count_cache(hit is not None)
            if hit is None:
                raise InputError(f"speaker id {speaker_id[:16]}... is not in this server's cache",
                                 "send REFERENCE_AUDIO again (the cache is bounded and per server instance)")
            return hit
        data = bytes(audio)
        key = f"{audio_fingerprint(data)[:40]}-{self.max_reference_seconds:g}"
        hit = self.speakers.get(key)
        self._count_cache(hit is not None)
        if hit is not None:
            return hit
        speaker = await self.stages.encode_speaker(data, key)
        self.speakers.put(key, speaker)
        return speaker

    def _plan(self, request: dict, job: SynthesisJob) -> ChunkPlan | None:
        return None

    def _check_chunks(self, request: dict) -> None:
        limit = self.cfg.gpt.max_mel_tokens
        for f in (c.CHUNK_FIRST_CODES, c.CHUNK_MAX_CODES):
            v = self.scalar(request.get(f.name))
            if v is not None and not 0 <= int(v) <= limit:
                raise InputError(f"{f.name}={int(v)} is out of range",
                                 f"send a value between 0 (one chunk per segment) and {limit}")

    def _count_cache(self, hit: bool) -> None:
        self.metrics.inc("tts_speaker_cache_hits_total" if hit else "tts_speaker_cache_misses_total", 1,
                         "speaker-conditioning cache hits" if hit else "speaker-conditioning cache misses")
        self.metrics.set("tts_speaker_cache_hit_ratio", self.speakers.hit_ratio, "hits / lookups since start")

    # --- responses --------------------------------------------------------------------------------------------
    def _response(self, chunk: Chunk, speaker_key: str) -> Any:
        return self.pb.InferenceResponse(output_tensors=[
            self.out(c.AUDIO.name, chunk.pcm.astype(np.int16)),
            self.out(c.SAMPLE_RATE.name, np.array([self.sample_rate], np.int32)),
            self.out(c.SEGMENT_INDEX.name, np.array([chunk.index], np.int32)),
            self.out(c.SEGMENT_COUNT.name, np.array([chunk.count], np.int32)),
            self.out(c.IS_LAST.name, np.array([chunk.last])),
            self.out(c.SPEAKER_ID_OUT.name, np.array([speaker_key.encode()], dtype=np.object_)),
            self.out(c.INFO.name, np.array([c.info_json(**chunk.info)], dtype=np.object_)),
            self.out(c.CHUNK_INDEX.name, np.array([chunk.chunk], np.int32)),
            self.out(c.SEGMENT_DONE.name, np.array([chunk.segment_done])),
            self.out(c.SAMPLE_OFFSET.name, np.array([chunk.sample_offset], np.int64)),
        ])


class TtsModel(EntryModel):
    """IndexTTS 1.x: cond_encoder conditioning per voice, the vocoder per segment or chunk, 24 kHz."""

    def setup_family(self) -> None:
        self.cfg = load_config(self.export_dir / "config.yaml")
        self.cond_names = self.manifest.component("cond_encoder")
        self.voc = self.manifest.component("vocoder")
        ctx = self.voc.extra.get("stream_context_frames")  # absent in exports older than chunked streaming
        self.chunk_context = (int(ctx["left"]), int(ctx["right"])) if ctx else None
        self.samples_per_latent = int(self.voc.extra["samples_per_latent"])
        self._mel = LogMelSpectrogram()
        self.stages = TritonStages(self)

    async def job_from(self, request: dict, params: GenerationParams, text: str,
                       warnings: list[str]) -> SynthesisJob:
        self.refuse_inputs(request, c.V2_INPUTS, "IndexTTS-2")
        self.refuse_inputs(request, c.V25_INPUTS, "IndexTTS-2.5")
        # Parameters are checked before any work, so a malformed request is refused at once.
        speaker_task = asyncio.ensure_future(self._speaker(request))
        try:
            segments = await self.stages.preprocess(text.encode("utf-8"), request.get(c.MAX_TEXT_TOKENS_PER_SEGMENT.name))
            speaker = await speaker_task
        except BaseException:
            speaker_task.cancel()
            raise
        if speaker.trimmed:
            warnings.append(f"reference audio was trimmed to {self.max_reference_seconds:g} s")
        return SynthesisJob(segments, speaker, params, self.request_seed(params), stream=self.stream_flag(request),
                            warnings=tuple(warnings))

    def _plan(self, request: dict, job: SynthesisJob) -> ChunkPlan | None:
        """The request's chunk schedule (CHUNK_FIRST_CODES / CHUNK_MAX_CODES, else the repository's), or None for
        one chunk per segment (also for beam search, whose codes are known only at the end)."""
        first = self.scalar(request.get(c.CHUNK_FIRST_CODES.name))
        most = self.scalar(request.get(c.CHUNK_MAX_CODES.name))
        first = self.chunk_first if first is None else int(first)
        most = self.chunk_max if most is None else int(most)
        if first <= 0 or job.params.num_beams > 1 or self.chunk_context is None:
            return None
        return ChunkPlan(first, max(first, most), *self.chunk_context, self.samples_per_latent)

    def reference_mel(self, data: bytes):
        """Decode the reference and compute its log-mel (runs in an executor thread)."""
        import torch

        clip = load_audio(data, target_sr=self.sample_rate, max_seconds=self.max_reference_seconds)
        with torch.inference_mode():
            mel = self._mel(clip.samples.unsqueeze(0)).numpy().astype(np.float32)
        return clip, mel


def _cancelled(sender) -> bool:
    check = getattr(sender, "is_cancelled", None)
    return bool(check()) if check is not None else False


def _send_quietly(sender, response, flags: int) -> None:
    """The last message of a request; a client that is already gone must not raise here."""
    try:
        if response is None:
            sender.send(flags=flags)
        else:
            sender.send(response, flags=flags)
    except Exception:
        pass
