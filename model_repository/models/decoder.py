"""`gpt_decoder`: owns the KV cache of every live sequence and batches their decode steps (decoupled model).

`execute` only enqueues: the DecoderScheduler thread runs the continuous batch and answers each sequence from that
thread when it ends (codes, latents, stop flag). A request carrying CANCEL=true stops the named sequence at the
next step; a sequence whose own request is cancelled stops the same way. KV tensors never leave this process.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque

import numpy as np

from engine_ref.errors import InputError
from engine_ref.params import MAX_BEAMS
from export.manifest import read_manifest, verify_component
from export.runtime import OrtDecoder
from model_repository import contract as c
from model_repository.decoder_core import (DecoderScheduler, QueueFull, SchedulerStats, SequencePartial,
                                           SequenceRequest, SequenceResult)
from model_repository.models.base import Metrics
from model_repository.models.scheduled import ScheduledModel

PUBLISH_S = 0.1  # metrics refresh at least this often while the counts of sequences stay the same
STEP_WINDOW = 512  # decode steps behind the step-time percentiles
PEAK_WINDOW_S = 1.0  # the batch peak gauge looks back this far


class DecoderModel(ScheduledModel):
    queue_full = QueueFull

    def setup(self) -> None:
        import torch

        # Token picks run in torch between ORT steps: with several threads a sampled pick cost ~16 ms per sequence
        # (thread start-up on tiny tensors) against ~0.8 ms on one; ORT keeps its own threads for the graphs.
        torch.set_num_threads(1)
        providers = [p for p in self.param("providers", "CPUExecutionProvider").split(",") if p]
        manifest = read_manifest(self.export_dir)
        precision = self.param("precision", None)
        for comp in (manifest.component("gpt_prefill", precision if precision == "fp16" else None),
                     manifest.component("gpt_decode", precision)):
            verify_component(self.export_dir, comp)  # a tampered graph fails the load, by name
        self.decoder = OrtDecoder.from_manifest(
            self.export_dir, manifest, precision=precision, threads=self.param("threads", None, int),
            providers=providers, spinning=self.param("spin_threads", True, bool),
        )
        self.max_mel_tokens = int(self.decoder.prefill_comp.extra["max_mel_tokens"])
        # One lock for every message to the server (responses from the scheduler thread, control replies from
        # execute, metrics): the Python backend's messaging is not safe from several threads at once.
        self._ipc_lock = threading.Lock()
        self.metrics = Metrics(self.pb, self.model_name, self._ipc_lock)
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)  # (time, tokens_total) for tokens/s
        self._step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self._recent_batches: deque[tuple[float, int]] = deque()  # (time, sequences) of the steps in PEAK_WINDOW_S
        self._reported: dict[str, int] = {}
        self._published_shape: tuple[int, ...] = ()
        self._published_at = 0.0
        extra = self.decoder.prefill_comp.extra
        self.model_dim = int(extra["model_dim"])
        self.cond_rows = int(extra["num_latents"])
        self.max_text_tokens = int(extra["max_text_tokens"])
        # IndexTTS-2.5's ids carry their language (id + lang * text_vocab): valid below text_vocab * language_rows
        self.text_vocab = int(extra.get("text_vocab", 0)) * int(extra.get("language_rows", 1)) or None
        self.scheduler = DecoderScheduler(
            self.decoder, max_sequences=self.param("max_sequences", 8, int),
            max_queue=self.param("max_queue", 256, int), on_step=self._on_step,
            max_rows=self.param("max_rows", None, int), on_fatal=self._on_fatal,
            remove_silence=self.param("remove_long_silence", True, bool),  # IndexTTS-2 repositories: off
            latent_pass=self.param("latent_pass", True, bool),  # IndexTTS-2.5 repositories: off
        ).start()

    def _on_fatal(self, exc: BaseException) -> None:
        """The scheduler thread died: nothing would answer again. Exit the stub so the supervisor (`triton-tts
        serve`) sees a dead model, stops the server and lets the orchestrator restart it."""
        self.log_error(f"{self.model_name}: decoder scheduler died ({type(exc).__name__}: {exc}); exiting the model process")
        os._exit(70)

    def _on_step(self, stats: SchedulerStats) -> None:
        """Called after every scheduler iteration; publishes the metrics at most every PUBLISH_S unless the
        sequence counts changed. Each update is a message to the server under the IPC lock that responses also
        take, so publishing per ~1 ms step slowed decoding and delayed answers while /metrics was scraped."""
        now = time.perf_counter()
        if stats.last_step_s > 0:
            self._step_times.append(stats.last_step_s)
        if stats.last_step_s > 0:
            self._recent_batches.append((now, stats.last_step_sequences))
        while self._recent_batches and now - self._recent_batches[0][0] > PEAK_WINDOW_S:
            self._recent_batches.popleft()
        peak = max((n for _, n in self._recent_batches), default=0)
        shape = (stats.active, stats.queued, stats.sequences_cancelled, stats.sequences_done, peak)
        if shape == self._published_shape and now - self._published_at < PUBLISH_S:
            return
        self._published_shape, self._published_at = shape, now
        self._rate.append((now, stats.tokens_total))
        t0, n0 = self._rate[0]
        tps = (stats.tokens_total - n0) / (now - t0) if now > t0 else 0.0
        self._count("tts_generated_tokens_total", stats.tokens_total, "mel codes decoded")
        self.metrics.set("tts_decoder_active_sequences", stats.active, "sequences being decoded now")
        self.metrics.set("tts_decoder_step_sequences_peak", peak,
                         f"most sequences in one decode step over the last {PEAK_WINDOW_S:g} s (a scrape misses "
                         "peaks of a few steps in tts_decoder_active_sequences)")
        self.metrics.set("tts_decoder_queued_sequences", stats.queued, "sequences waiting for a decoder slot")
        self.metrics.set("tts_decoder_tokens_per_second", tps, "decode throughput over the recent steps")
        self.metrics.set("tts_decoder_batch_rows", stats.last_batch_rows, "rows in the last decode step")
        self._count("tts_decoder_steps_total", stats.steps,
                    "batched decode steps run (one per token of every live sequence at once)")
        self._count("tts_decoder_sequences_cancelled_total", stats.sequences_cancelled,
                    "sequences stopped by cancellation")
        if self._step_times:
            p50, p99 = np.percentile(np.fromiter(self._step_times, float), [50, 99])
            self.metrics.set("tts_decoder_step_seconds_p50", float(p50),
                             f"median batched decode step over the last {STEP_WINDOW} steps")
            self.metrics.set("tts_decoder_step_seconds_p99", float(p99),
                             f"99th percentile batched decode step over the last {STEP_WINDOW} steps")

    def _respond(self, sender, result: SequenceResult) -> None:
        if result.error:
            self._send(sender, self.error_response(RuntimeError(result.error)))
            return
        self._send(sender, self._outputs(result.codes, result.latents, result.stopped, result.cancelled,
                                         result.generated, result.offset, partial=False))

    def _respond_partial(self, sender, part: SequencePartial) -> None:
        response = self._outputs(part.codes, part.latents, False, False, part.generated, part.offset, partial=True)
        with self._ipc_lock:
            sender.send(response)  # not final: more follow for this sequence

    def _outputs(self, codes, latents, stopped: bool, cancelled: bool, generated: int, offset: int, partial: bool):
        dim = self.decoder.prefill_comp.extra["model_dim"]
        latents = latents if latents is not None else np.zeros((0, dim), np.float32)
        return self.pb.InferenceResponse(output_tensors=[
            self.out(c.CODES.name, np.asarray(codes, np.int64)),
            self.out(c.LATENTS.name, np.asarray(latents, np.float32)),
            self.out(c.STOPPED.name, np.array([stopped])),
            self.out(c.CANCELLED.name, np.array([cancelled])),
            self.out(c.GENERATED.name, np.array([generated], np.int32)),
            self.out(c.CODE_OFFSET.name, np.array([offset], np.int32)),
            self.out(c.PARTIAL.name, np.array([partial])),
        ])

    def _parse(self, request, sender) -> SequenceRequest:
        seq_id = self.text_of(self.tensor(request, c.SEQUENCE_ID.name))
        conds = self.tensor(request, c.CONDS.name)
        ids = self.tensor(request, c.TEXT_IDS.name)
        if not seq_id or conds is None or ids is None:
            raise InputError("gpt_decoder needs SEQUENCE_ID, CONDS and TEXT_IDS", "send all three (tts does)")
        values = {f.name: self.tensor(request, f.name) for f in c.PARAMS.values()}
        params = c.params_from_inputs(values)
        params.validate(self.max_mel_tokens, max_beams=min(MAX_BEAMS, self.scheduler.max_rows))
        conds = np.asarray(conds)
        if conds.reshape(-1, conds.shape[-1]).shape != (self.cond_rows, self.model_dim) or not np.isfinite(conds).all():
            raise InputError(f"CONDS must be {self.cond_rows} finite rows of {self.model_dim}, got {list(conds.shape)}",
                             "send the cond_encoder's output unchanged")
        for name, arr in (("TEXT_IDS", ids), ("TEXT_IDS_RAW", self.tensor(request, c.TEXT_IDS_RAW.name))):
            if arr is None:
                continue
            arr = np.asarray(arr).reshape(-1)
            if arr.size > self.max_text_tokens or (arr.size and (arr.min() < 0 or (self.text_vocab and arr.max() >= self.text_vocab))):
                raise InputError(f"{name} holds {arr.size} ids (range {arr.min() if arr.size else 0}.."
                                 f"{arr.max() if arr.size else 0}); the model takes at most {self.max_text_tokens} ids "
                                 f"in [0, {self.text_vocab or '?'})", "send the preprocess model's ids unchanged")
        raw = self.tensor(request, c.TEXT_IDS_RAW.name)
        stream_at = self.tensor(request, c.STREAM_AT.name)
        stream_at = sorted({int(x) for x in np.asarray(stream_at).reshape(-1) if int(x) > 0}) if stream_at is not None else None
        priority = self.tensor(request, c.PRIORITY.name)
        return SequenceRequest(
            priority=int(self.scalar(priority)) if priority is not None else 0,
            seq_id=seq_id, conds=conds.astype(np.float32), text_ids=[int(i) for i in ids], params=params,
            seed=int(params.seed or 0), on_done=lambda r, s=sender: self._respond(s, r),
            text_ids_raw=None if raw is None else [int(i) for i in raw], is_cancelled=lambda s=sender: self._cancelled(s),
            stream_at=stream_at or None, on_partial=lambda p, s=sender: self._respond_partial(s, p),
        )
