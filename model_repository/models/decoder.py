"""`gpt_decoder`: owns the KV cache of every live sequence and batches their decode steps (decoupled model).

`execute` only enqueues: the DecoderScheduler thread runs the continuous batch and answers each sequence from that
thread when it ends (codes, latents, stop flag). A request carrying CANCEL=true stops the named sequence at the
next step; a sequence whose own request is cancelled stops the same way. KV tensors never leave this process.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from engine_ref.errors import InputError, TTSError
from export.runtime import OrtDecoder
from model_repository import contract as c
from model_repository.decoder_core import DecoderScheduler, QueueFull, SchedulerStats, SequenceRequest, SequenceResult
from model_repository.models.base import Metrics, PythonModel


class DecoderModel(PythonModel):
    def setup(self) -> None:
        providers = [p for p in self.param("providers", "CPUExecutionProvider").split(",") if p]
        self.decoder = OrtDecoder.from_manifest(
            self.export_dir, precision=self.param("precision", None), threads=self.param("threads", None, int),
            providers=providers, spinning=self.param("spin_threads", True, bool),
        )
        self.max_mel_tokens = int(self.decoder.prefill_comp.extra["max_mel_tokens"])
        # One lock for every message to the server (responses from the scheduler thread, control replies from
        # execute, metrics): the Python backend's messaging is not safe from several threads at once.
        self._ipc_lock = threading.Lock()
        self.metrics = Metrics(self.pb, self.model_name, self._ipc_lock)
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)  # (time, tokens_total) for tokens/s
        self.scheduler = DecoderScheduler(
            self.decoder, max_sequences=self.param("max_sequences", 8, int),
            max_queue=self.param("max_queue", 256, int), on_step=self._on_step,
        ).start()

    def _on_step(self, stats: SchedulerStats) -> None:
        now = time.perf_counter()
        self._rate.append((now, stats.tokens_total))
        t0, n0 = self._rate[0]
        tps = (stats.tokens_total - n0) / (now - t0) if now > t0 else 0.0
        last = getattr(self, "_tokens_reported", 0)
        self.metrics.inc("tts_generated_tokens_total", stats.tokens_total - last, "mel codes decoded")
        self._tokens_reported = stats.tokens_total
        self.metrics.set("tts_decoder_active_sequences", stats.active, "sequences being decoded now")
        self.metrics.set("tts_decoder_queued_sequences", stats.queued, "sequences waiting for a decoder slot")
        self.metrics.set("tts_decoder_tokens_per_second", tps, "decode throughput over the recent steps")
        self.metrics.set("tts_decoder_batch_rows", stats.last_batch_rows, "rows in the last decode step")

    def _cancelled(self, sender) -> bool:
        with self._ipc_lock:
            return bool(sender.is_cancelled())

    def _send(self, sender, response=None) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        with self._ipc_lock:
            if response is None:
                sender.send(flags=final)
            else:
                sender.send(response, flags=final)

    def _respond(self, sender, result: SequenceResult) -> None:
        if result.error:
            self._send(sender, self.error_response(RuntimeError(result.error)))
            return
        dim = self.decoder.prefill_comp.extra["model_dim"]
        latents = result.latents if result.latents is not None else np.zeros((0, dim), np.float32)
        response = self.pb.InferenceResponse(output_tensors=[
            self.out(c.CODES.name, np.asarray(result.codes, np.int64)),
            self.out(c.LATENTS.name, latents.astype(np.float32, copy=False)),
            self.out(c.STOPPED.name, np.array([result.stopped])),
            self.out(c.CANCELLED.name, np.array([result.cancelled])),
            self.out(c.GENERATED.name, np.array([result.generated], np.int32)),
        ])
        self._send(sender, response)

    def _parse(self, request, sender) -> SequenceRequest:
        seq_id = self.text_of(self.tensor(request, c.SEQUENCE_ID.name))
        conds = self.tensor(request, c.CONDS.name)
        ids = self.tensor(request, c.TEXT_IDS.name)
        if not seq_id or conds is None or ids is None:
            raise InputError("gpt_decoder needs SEQUENCE_ID, CONDS and TEXT_IDS", "send all three (tts_bls does)")
        values = {f.name: self.tensor(request, f.name) for f in c.PARAMS.values()}
        params = c.params_from_inputs(values)
        if params.max_mel_tokens > self.max_mel_tokens:
            raise InputError(f"MAX_MEL_TOKENS={params.max_mel_tokens} is out of range",
                             f"send at most {self.max_mel_tokens}")
        raw = self.tensor(request, c.TEXT_IDS_RAW.name)
        return SequenceRequest(
            seq_id=seq_id, conds=conds.astype(np.float32), text_ids=[int(i) for i in ids], params=params,
            seed=int(params.seed or 0), on_done=lambda r, s=sender: self._respond(s, r),
            text_ids_raw=None if raw is None else [int(i) for i in raw], is_cancelled=lambda s=sender: self._cancelled(s),
        )

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                if bool(self.scalar(self.tensor(request, c.CANCEL.name)) or False):
                    self.scheduler.cancel(self.text_of(self.tensor(request, c.SEQUENCE_ID.name)) or "")
                    self._send(sender)
                    continue
                self.scheduler.submit(self._parse(request, sender))
            except QueueFull as exc:
                self._send(sender, self.error_response(TTSError(f"the server is at capacity ({exc})",
                                                                "retry later or scale out")))
            except Exception as exc:
                self._send(sender, self.error_response(exc))
        return None

    def finalize(self) -> None:
        self.scheduler.stop()
