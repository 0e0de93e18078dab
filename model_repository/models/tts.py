"""`tts_bls` / `tts_bls_offline`: the orchestrating BLS model.

Per request: validate; get the segments (from `preprocess` in the ensemble, or by calling it when TEXT comes
directly); resolve the speaker (LRU cache keyed by the audio's sha256 — a hit skips the conditioning encoder);
send segments to `gpt_decoder` (a window of them in flight; when streaming, the first one alone so the first audio
comes as early as possible); vocode each segment as soon as it and all before it are decoded; stream 16-bit PCM
chunks in order (decoupled) or return the whole utterance once (offline). A cancelled request cancels its
in-flight sequences in the decoder, which stops them within one decode step.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from engine_ref.audio import audio_fingerprint, load_audio, to_pcm16
from engine_ref.config import load_config
from engine_ref.errors import InputError, TTSError
from engine_ref.generate import generation_ids, segment_seed
from engine_ref.mel import LogMelSpectrogram
from engine_ref.sampling import GenerationParams
from export.manifest import read_manifest
from model_repository import contract as c
from model_repository.models.base import Metrics, PythonModel


class RemoteError(TTSError):
    """An error another model returned; its message already names the problem and the fix."""

    def one_line(self) -> str:
        return self.problem


class Cancelled(Exception):
    pass


@dataclass(frozen=True)
class Speaker:
    key: str
    conds: np.ndarray  # [32, D]
    speaker_embedding: np.ndarray  # [spk, 1]
    seconds: float
    trimmed: bool


@dataclass
class Segments:
    ids: list[list[int]]
    texts: list[str]


class TtsModel(PythonModel):
    def setup(self) -> None:
        manifest = read_manifest(self.export_dir)
        self.cfg = load_config(self.export_dir / "config.yaml")
        self.sample_rate = int(manifest.model["sampling_rate"])
        self.decoupled = bool(self.model_config.get("model_transaction_policy", {}).get("decoupled", False))
        self.cond_names = manifest.component("cond_encoder")
        self.voc = manifest.component("vocoder")
        self.max_reference_seconds = self.param("max_reference_seconds", 50.0, float)
        self.segments_in_flight = max(1, self.param("segments_in_flight", 4, int))
        self.speaker_cache_size = self.param("speaker_cache_size", 64, int)
        self.request_timeout_s = self.param("request_timeout_s", 600.0, float)
        self._speakers: OrderedDict[str, Speaker] = OrderedDict()
        self._speaker_lock = threading.Lock()
        self._mel = LogMelSpectrogram()
        self._pool = ThreadPoolExecutor(max_workers=self.param("decoder_calls", 64, int), thread_name_prefix="tts-dec")
        # The Python backend's stub-to-server messaging is not safe from many threads at once (Triton 2.51 crashes
        # under concurrent requests): every call that messages the server goes through this lock, except waiting
        # for a decoupled decoder response, which only reads.
        self._ipc_lock = threading.Lock()
        self.metrics = Metrics(self.pb, self.model_name, self._ipc_lock)
        self._active = 0
        self._counts = {"hits": 0, "misses": 0}
        self._state_lock = threading.Lock()

    # --- Triton entry points ----------------------------------------------------------------------------------
    def execute(self, requests):
        # Everything a worker thread needs is taken from the request here, inside execute: the backend's request
        # objects are not safe to read from other threads once execute has returned (seen: SIGSEGV under load).
        snapshots = [self._snapshot(r) for r in requests]
        if self.decoupled:
            for request, inputs in zip(requests, snapshots):
                sender = request.get_response_sender()
                threading.Thread(target=self._serve_stream, args=(inputs, sender), daemon=True).start()
            return None
        results: list[Any] = [None] * len(requests)
        threads = [threading.Thread(target=self._serve_offline, args=(inp, results, i))
                   for i, inp in enumerate(snapshots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def _snapshot(self, request) -> dict[str, np.ndarray]:
        out = {}
        for spec in self.model_config.get("input", []):
            value = self.tensor(request, spec["name"])
            if value is not None:
                out[spec["name"]] = np.array(value, copy=True)
        return out

    def finalize(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _serve_stream(self, request: dict, sender) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            stream = self._bool(request, c.STREAM, default=True)
            if stream:
                self._run(request, lambda chunk: self._send(sender, self._response(chunk)),
                          lambda: self._cancelled(sender))
            else:
                chunks: list[dict] = []
                self._run(request, chunks.append, lambda: self._cancelled(sender))
                self._send(sender, self._response(self._merge(chunks)))
            self._send(sender, flags=final)
        except Cancelled:
            self._send(sender, flags=final)
        except Exception as exc:
            self._send(sender, self.error_response(exc), flags=final)

    def _cancelled(self, sender) -> bool:
        with self._ipc_lock:
            return bool(sender.is_cancelled())

    def _send(self, sender, response=None, flags: int = 0) -> None:
        with self._ipc_lock:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)

    def _serve_offline(self, request: dict, results: list, index: int) -> None:
        try:
            chunks: list[dict] = []
            self._run(request, chunks.append, lambda: False)
            results[index] = self._response(self._merge(chunks))
        except Exception as exc:
            results[index] = self.error_response(exc)

    # --- the pipeline -----------------------------------------------------------------------------------------
    def _run(self, request: dict, emit: Callable[[dict], None], is_cancelled: Callable[[], bool]) -> None:
        start = time.perf_counter()
        with self._state_lock:
            self._active += 1
        self.metrics.set("tts_active_requests", self._active, "requests being synthesized")
        status = "failed"
        try:
            params = self._params(request)
            segments = self._segments(request)
            speaker, hit = self._speaker(request)
            seed = params.seed if params.seed is not None else secrets.randbits(62)
            self._synthesize(segments, speaker, params, seed, emit, is_cancelled, start)
            status = "completed"
        except Cancelled:
            status = "cancelled"
            raise
        finally:
            with self._state_lock:
                self._active -= 1
            self.metrics.set("tts_active_requests", self._active)
            self.metrics.inc(f"tts_requests_{status}_total", 1, f"requests {status}")

    def _bool(self, request: dict, field: c.Field, default: bool) -> bool:
        v = self.scalar(request.get(field.name))
        return default if v is None else bool(v)

    def _params(self, request: dict) -> GenerationParams:
        values = {f.name: request.get(f.name) for f in c.PARAMS.values()}
        params = c.params_from_inputs(values)
        params.validate(self.cfg.gpt)
        return params

    def _segments(self, request: dict) -> Segments:
        ids = request.get(c.SEGMENT_IDS.name)
        if ids is None:  # TEXT sent directly to the BLS: run preprocess ourselves
            text = request.get(c.TEXT.name)
            if text is None:
                raise InputError("the request has no TEXT", "send the text to synthesize as TEXT (BYTES, shape [1])")
            inputs = [self.pb.Tensor(c.TEXT.name, text)]
            mt = request.get(c.MAX_TEXT_TOKENS_PER_SEGMENT.name)
            if mt is not None:
                inputs.append(self.pb.Tensor(c.MAX_TEXT_TOKENS_PER_SEGMENT.name, mt))
            out = self._call(c.PREPROCESS, inputs, [f.name for f in c.PREPROCESS_OUTPUTS])
            ids, lengths, texts = out[c.SEGMENT_IDS.name], out[c.SEGMENT_LENGTHS.name], out[c.SEGMENT_TEXTS.name]
        else:
            lengths = request.get(c.SEGMENT_LENGTHS.name)
            texts = request.get(c.SEGMENT_TEXTS.name)
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
        seg_ids = [[int(x) for x in ids[bounds[i]: bounds[i + 1]]] for i in range(len(lengths))]
        seg_texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts]
        return Segments(seg_ids, seg_texts)

    def _speaker(self, request: dict) -> tuple[Speaker, bool]:
        audio = self.scalar(request.get(c.REFERENCE_AUDIO.name))
        speaker_id = self.text_of(request.get(c.SPEAKER_ID.name))
        if audio is None or len(audio) == 0:
            if not speaker_id:
                raise InputError("the request has neither REFERENCE_AUDIO nor SPEAKER_ID",
                                 "send the reference recording (wav/flac/mp3 bytes) or a SPEAKER_ID from an earlier response")
            with self._speaker_lock:
                hit = self._speakers.get(speaker_id)
                if hit is not None:
                    self._speakers.move_to_end(speaker_id)
            if hit is None:
                raise InputError(f"speaker id {speaker_id[:16]}... is not in this server's cache",
                                 "send REFERENCE_AUDIO again (the cache is bounded and per server instance)")
            self._count_cache(True)
            return hit, True
        data = bytes(audio)
        key = f"{audio_fingerprint(data)[:40]}-{self.max_reference_seconds:g}"
        with self._speaker_lock:
            hit = self._speakers.get(key)
            if hit is not None:
                self._speakers.move_to_end(key)
        if hit is not None:
            self._count_cache(True)
            return hit, True
        self._count_cache(False)
        clip = load_audio(data, target_sr=self.sample_rate, max_seconds=self.max_reference_seconds)
        with torch.inference_mode():
            mel = self._mel(clip.samples.unsqueeze(0)).numpy().astype(np.float32)
        out = self._call(c.COND_ENCODER, [
            self.pb.Tensor(self.cond_names.inputs[0].name, mel),
            self.pb.Tensor(self.cond_names.inputs[1].name, np.array([mel.shape[-1]], np.int64)),
        ], [t.name for t in self.cond_names.outputs])
        conds, spk = (out[t.name][0] for t in self.cond_names.outputs)
        speaker = Speaker(key, conds, spk, clip.seconds, clip.trimmed)
        with self._speaker_lock:
            self._speakers[key] = speaker
            while len(self._speakers) > self.speaker_cache_size:
                self._speakers.popitem(last=False)
        return speaker, False

    def _count_cache(self, hit: bool) -> None:
        with self._state_lock:
            self._counts["hits" if hit else "misses"] += 1
            total = self._counts["hits"] + self._counts["misses"]
            ratio = self._counts["hits"] / total
        self.metrics.inc("tts_speaker_cache_hits_total" if hit else "tts_speaker_cache_misses_total", 1,
                         "speaker-conditioning cache hits" if hit else "speaker-conditioning cache misses")
        self.metrics.set("tts_speaker_cache_hit_ratio", ratio, "hits / lookups since start")

    def _synthesize(self, segs: Segments, speaker: Speaker, params: GenerationParams, seed: int,
                    emit: Callable[[dict], None], is_cancelled: Callable[[], bool], start: float) -> None:
        gpt = self.cfg.gpt
        n = len(segs.ids)
        request_id = uuid.uuid4().hex[:12]
        futures: dict[int, Future] = {}
        in_flight: deque[int] = deque()
        next_submit = 0
        audio_samples = 0
        first_audio: float | None = None
        warnings: list[str] = []
        if speaker.trimmed:
            warnings.append(f"reference audio was trimmed to {self.max_reference_seconds:g} s")
        deadline = start + self.request_timeout_s
        try:
            for index in range(n):
                window = 1 if (index == 0 and first_audio is None and self.decoupled) else self.segments_in_flight
                while next_submit < n and len(in_flight) < window:
                    i = next_submit
                    ids = segs.ids[i]
                    futures[i] = self._pool.submit(
                        self._decode, f"{request_id}-{i}", speaker.conds, generation_ids(ids, gpt.start_text_token,
                        gpt.stop_text_token), ids, params, segment_seed(seed, i))
                    in_flight.append(i)
                    next_submit += 1
                result = self._wait(futures[index], is_cancelled, deadline)
                in_flight.remove(index)
                del futures[index]
                seg_warnings = []
                if not result["stopped"]:
                    seg_warnings.append(
                        f"segment {index} was cut at max_mel_tokens={params.max_mel_tokens} before the model ended it; "
                        "raise MAX_MEL_TOKENS or lower MAX_TEXT_TOKENS_PER_SEGMENT")
                codes = result["codes"]
                if len(codes):
                    pcm = self._vocode(result["latents"], speaker.speaker_embedding)
                else:
                    seg_warnings.append(f"segment {index} produced no speech codes; it is silent")
                    pcm = np.zeros(0, np.int16)
                if first_audio is None and pcm.size:
                    first_audio = time.perf_counter() - start
                    self.metrics.set("tts_time_to_first_audio_seconds", first_audio, "last request's time to first audio")
                    self.metrics.inc("tts_time_to_first_audio_seconds_sum", first_audio, "sum of times to first audio")
                    self.metrics.inc("tts_time_to_first_audio_count", 1, "requests that produced audio")
                audio_samples += pcm.size
                warnings.extend(seg_warnings)
                info = {"segment": index, "text": segs.texts[index], "codes": len(codes), "stopped": result["stopped"],
                        "warnings": seg_warnings, "seed": seed}
                last = index == n - 1
                if last:
                    total = time.perf_counter() - start
                    audio_s = audio_samples / self.sample_rate
                    info["timings"] = {"ttfa_s": first_audio, "total_s": total, "audio_s": audio_s,
                                       "rtf": total / audio_s if audio_s else None}
                    info["all_warnings"] = warnings
                    self.metrics.inc("tts_audio_seconds_total", audio_s, "seconds of audio generated")
                emit({"pcm": pcm, "index": index, "count": n, "last": last, "speaker": speaker.key, "info": info})
        except Cancelled:
            for i in list(in_flight):
                self._cancel(f"{request_id}-{i}")
            for i in list(in_flight):
                try:
                    futures[i].result(timeout=30)
                except Exception:
                    pass
            raise

    def _wait(self, fut: Future, is_cancelled: Callable[[], bool], deadline: float) -> dict:
        while True:
            try:
                return fut.result(timeout=0.02)
            except FutureTimeout:
                pass
            except Exception:
                raise
            if is_cancelled():
                raise Cancelled()
            if time.perf_counter() > deadline:
                raise TTSError(f"the request took longer than {self.request_timeout_s:g} s",
                               "send shorter text or raise request_timeout_s")

    # --- calls to other models --------------------------------------------------------------------------------
    def _call(self, model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
        req = self.pb.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs)
        with self._ipc_lock:
            resp = req.exec()
        if resp.has_error():
            raise RemoteError(resp.error().message())
        return {name: self.pb.get_output_tensor_by_name(resp, name).as_numpy() for name in outputs}

    def _decode(self, seq_id: str, conds: np.ndarray, ids: list[int], raw: list[int], params: GenerationParams,
                seed: int) -> dict:
        p = params
        inputs = [
            self.pb.Tensor(c.SEQUENCE_ID.name, np.array([seq_id.encode()], dtype=np.object_)),
            self.pb.Tensor(c.CONDS.name, conds.astype(np.float32)),
            self.pb.Tensor(c.TEXT_IDS.name, np.asarray(ids, np.int64)),
            self.pb.Tensor(c.PARAMS["temperature"].name, np.array([p.temperature], np.float32)),
            self.pb.Tensor(c.PARAMS["top_p"].name, np.array([p.top_p], np.float32)),
            self.pb.Tensor(c.PARAMS["top_k"].name, np.array([p.top_k], np.int32)),
            self.pb.Tensor(c.PARAMS["repetition_penalty"].name, np.array([p.repetition_penalty], np.float32)),
            self.pb.Tensor(c.PARAMS["num_beams"].name, np.array([p.num_beams], np.int32)),
            self.pb.Tensor(c.PARAMS["max_mel_tokens"].name, np.array([p.max_mel_tokens], np.int32)),
            self.pb.Tensor(c.PARAMS["do_sample"].name, np.array([p.do_sample])),
            self.pb.Tensor(c.PARAMS["seed"].name, np.array([seed], np.int64)),
        ]
        if raw != ids:
            inputs.append(self.pb.Tensor(c.TEXT_IDS_RAW.name, np.asarray(raw, np.int64)))
        req = self.pb.InferenceRequest(model_name=c.DECODER, inputs=inputs,
                                       requested_output_names=[f.name for f in c.DECODER_OUTPUTS])
        result = None
        with self._ipc_lock:
            responses = req.exec(decoupled=True)
        for resp in responses:
            if resp.has_error():
                raise RemoteError(resp.error().message())
            codes = self.pb.get_output_tensor_by_name(resp, c.CODES.name)
            if codes is None:
                continue  # the empty final response
            result = {
                "codes": codes.as_numpy(),
                "latents": self.pb.get_output_tensor_by_name(resp, c.LATENTS.name).as_numpy(),
                "stopped": bool(self.pb.get_output_tensor_by_name(resp, c.STOPPED.name).as_numpy()[0]),
                "cancelled": bool(self.pb.get_output_tensor_by_name(resp, c.CANCELLED.name).as_numpy()[0]),
            }
        if result is None:
            raise TTSError("gpt_decoder returned no result", "check the server log")
        return result

    def _cancel(self, seq_id: str) -> None:
        req = self.pb.InferenceRequest(model_name=c.DECODER, requested_output_names=[], inputs=[
            self.pb.Tensor(c.SEQUENCE_ID.name, np.array([seq_id.encode()], dtype=np.object_)),
            self.pb.Tensor(c.CANCEL.name, np.array([True])),
        ])
        with self._ipc_lock:
            responses = req.exec(decoupled=True)
        for _ in responses:
            pass

    def _vocode(self, latents: np.ndarray, spk: np.ndarray) -> np.ndarray:
        names = [t.name for t in self.voc.inputs]
        out = self._call(c.VOCODER, [self.pb.Tensor(names[0], latents[None].astype(np.float32)),
                                     self.pb.Tensor(names[1], spk[None].astype(np.float32))],
                         [self.voc.outputs[0].name])
        return to_pcm16(out[self.voc.outputs[0].name].reshape(-1))

    # --- responses --------------------------------------------------------------------------------------------
    def _merge(self, chunks: list[dict]) -> dict:
        last = chunks[-1]
        info = dict(last["info"])
        info["segments"] = [ch["info"] for ch in chunks]
        return {"pcm": np.concatenate([ch["pcm"] for ch in chunks]), "index": -1, "count": last["count"],
                "last": True, "speaker": last["speaker"], "info": info}

    def _response(self, chunk: dict) -> Any:
        return self.pb.InferenceResponse(output_tensors=[
            self.out(c.AUDIO.name, chunk["pcm"].astype(np.int16)),
            self.out(c.SAMPLE_RATE.name, np.array([self.sample_rate], np.int32)),
            self.out(c.SEGMENT_INDEX.name, np.array([chunk["index"]], np.int32)),
            self.out(c.SEGMENT_COUNT.name, np.array([chunk["count"]], np.int32)),
            self.out(c.IS_LAST.name, np.array([chunk["last"]])),
            self.out(c.SPEAKER_ID_OUT.name, np.array([chunk["speaker"].encode()], dtype=np.object_)),
            self.out(c.INFO.name, np.array([c.info_json(**chunk["info"])], dtype=np.object_)),
        ])
