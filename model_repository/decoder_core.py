"""Continuous batching of GPT decode steps across requests (the heart of the `gpt_decoder` Triton model).

Every live sequence owns rows of one shared KV batch (1 row when sampling/greedy, `num_beams` rows for beam
search). Each scheduler iteration:
  1. admits queued sequences up to `max_sequences` live ones: prefills them together, picks their first token;
  2. runs ONE decode step for all live rows (weights are read once per step, whatever the batch);
  3. picks each row's next token with its own parameters and generator (engine_ref.sampling / BeamSearch);
  4. retires finished or cancelled sequences at once: their latents are computed (teacher-forced pass reusing the
     saved prefix KV) and their rows leave the batch, so their memory goes with them.
A sequence joining mid-generation gets exactly the codes it gets alone (greedy), because rows never interact:
the KV batch is padded with masked columns, and positions are explicit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from engine_ref.beam_search import BeamSearch
from engine_ref.generate import remove_long_silence
from engine_ref.sampling import GenerationParams, RowParams, initial_seen, make_generator, select_next
from export.runtime import KVState, OrtDecoder

log = logging.getLogger("model_repository.decoder")


@dataclass
class SequenceRequest:
    seq_id: str
    conds: np.ndarray  # [32, D] (or [1, 32, D])
    text_ids: list[int]  # cleaned ids (generation)
    params: GenerationParams
    seed: int
    on_done: Callable[["SequenceResult"], None]
    text_ids_raw: list[int] | None = None  # latent pass ids when they differ from text_ids (upstream quirk)
    is_cancelled: Callable[[], bool] | None = None
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class SequenceResult:
    seq_id: str
    codes: list[int]
    latents: np.ndarray | None
    stopped: bool
    cancelled: bool = False
    error: str | None = None
    generated: int = 0  # tokens decoded (before silence removal), stop included
    queue_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class SchedulerStats:
    active: int = 0
    queued: int = 0
    tokens_total: int = 0
    sequences_done: int = 0
    sequences_cancelled: int = 0
    steps: int = 0
    last_batch_rows: int = 0


class QueueFull(Exception):
    """More sequences are waiting than the configured bound."""


class _Live:
    """Book-keeping of one admitted sequence."""

    def __init__(self, req: SequenceRequest, vocab: int, start: int, stop: int, prefix: KVState,
                 start_hidden: np.ndarray):
        self.req = req
        self.prefix = prefix  # KV of [conds | text | start] for the latent pass
        self.start_hidden = start_hidden
        self.beam = BeamSearch(req.params, req.seed, vocab, start, stop) if req.params.num_beams > 1 else None
        self.generator = make_generator(req.seed) if (self.beam is None and req.params.do_sample) else None
        self.seen = initial_seen(1, vocab, start) if self.beam is None else None
        self.codes: list[int] = []
        self.generated = 0
        self.step = 0
        self.pending: list[int] = []  # tokens to feed next, one per row
        self.beam_sources: list[int] = []  # which of its current rows each next row continues
        self.started = time.perf_counter()
        self.result: tuple[list[int], bool] | None = None  # (codes, stopped) once finished

    @property
    def rows(self) -> int:
        return 1 if self.beam is None else self.beam.num_rows


class DecoderScheduler:
    def __init__(self, decoder: OrtDecoder, max_sequences: int = 8, max_queue: int = 1024,
                 on_step: Callable[[SchedulerStats], None] | None = None):
        self.decoder = decoder
        self.max_sequences = max_sequences
        self.max_queue = max_queue
        self.stats = SchedulerStats()
        self._queue: deque[SequenceRequest] = deque()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._live: list[_Live] = []
        self._state: KVState | None = None  # rows of all live sequences, in _live order
        self._retiring: list[_Live] = []  # finished this iteration, latents still to compute
        self._thread: threading.Thread | None = None
        self._stop = False
        self._on_step = on_step

    # --- public API (any thread) ---------------------------------------------------------------------------------
    def submit(self, req: SequenceRequest) -> None:
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} sequences are already queued (limit {self.max_queue})")
            self._queue.append(req)
            self.stats.queued = len(self._queue)
            self._wake.notify()

    def cancel(self, seq_id: str) -> None:
        with self._lock:
            self._cancelled.add(seq_id)
            self._wake.notify()

    def start(self) -> "DecoderScheduler":
        self._thread = threading.Thread(target=self._run, name="decoder-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout)

    # --- scheduler thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._queue and not self._live:
                    self._wake.wait()
                if self._stop:
                    break
            try:
                self.iterate()
            except Exception as exc:  # never let one bad batch kill the model: fail its sequences, keep serving
                log.exception("decoder iteration failed")
                self._fail_all(f"decoder failure: {exc}")

    def iterate(self) -> None:
        """One scheduler iteration (public for deterministic tests that drive it without the thread)."""
        self._drop_cancelled()
        self._admit()
        if self._live:
            self._decode_step()
        self._retire()
        self.stats.active = len(self._live)
        with self._lock:
            self.stats.queued = len(self._queue)
        if self._on_step:
            self._on_step(self.stats)

    def _take_new(self) -> list[SequenceRequest]:
        with self._lock:
            free = self.max_sequences - len(self._live)
            new = []
            while self._queue and len(new) < free:
                req = self._queue.popleft()
                if req.seq_id in self._cancelled:
                    self._cancelled.discard(req.seq_id)
                    self._finish_cancelled_unstarted(req)
                    continue
                new.append(req)
            return new

    def _admit(self) -> None:
        new = self._take_new()
        if not new:
            return
        try:
            conds = np.stack([np.asarray(r.conds, np.float32).reshape(-1, r.conds.shape[-1]) for r in new])
            logits, hidden, state = self.decoder.prefill(conds, [r.text_ids for r in new])
        except Exception as exc:  # bad inputs of these requests must not touch the sequences already running
            log.exception("prefill failed")
            for req in new:
                self._deliver(req, SequenceResult(req.seq_id, [], None, False, error=f"decoder failure: {exc}"))
            return
        entries = []
        for i, req in enumerate(new):
            live = _Live(req, self.decoder.vocab, self.decoder.start_mel, self.decoder.stop_mel,
                         state.select([i]), hidden[i : i + 1])
            rows = [i] * live.rows
            self._pick(live, torch.from_numpy(logits[rows]))
            entries.append((live, rows))
        # Rows of sequences that already finished at step 1 are not added to the batch.
        joining = [(lv, rows) for lv, rows in entries if lv.result is None]
        finished = [lv for lv, _ in entries if lv.result is not None]
        if joining:
            idx = [r for lv, rows in joining for r in (rows if lv.beam is None else [rows[s] for s in lv.beam_sources])]
            new_state = state.select(idx)
            self._state = new_state if self._state is None else KVState.join([self._state, new_state])
            self._live.extend(lv for lv, _ in joining)
        self._retiring.extend(finished)

    def _pick(self, live: _Live, logits: torch.Tensor) -> None:
        """Choose the next token(s) of one sequence from its rows' logits; sets live.pending or live.result."""
        live.step += 1
        live.generated += 1
        stop = self.decoder.stop_mel
        if live.beam is not None:
            out = live.beam.step(logits)
            if out.done:
                live.result = (out.result.codes, out.result.stopped)
            else:
                live.beam_sources = out.sources
                live.pending = out.tokens
            return
        p = live.req.params
        rows = RowParams.stack([p])
        tok = int(select_next(logits[:1].float(), live.seen, rows, torch.tensor([p.do_sample]), [live.generator])[0])
        if tok == stop:
            live.result = (live.codes, True)
            return
        live.codes.append(tok)
        live.seen[0, tok] = True
        if live.step >= p.max_mel_tokens:
            live.result = (live.codes, False)
            return
        live.pending = [tok]
        live.beam_sources = [0]

    def _decode_step(self) -> None:
        tokens = np.array([t for lv in self._live for t in lv.pending], np.int64).reshape(-1, 1)
        positions = np.array([lv.step + self.decoder.first_position - 1 for lv in self._live for _ in lv.pending],
                             np.int64).reshape(-1, 1)
        assert self._state is not None and tokens.shape[0] == self._state.batch
        logits, _, self._state = self.decoder.decode(tokens, positions, self._state)
        self.stats.steps += 1
        self.stats.last_batch_rows = int(tokens.shape[0])
        self.stats.tokens_total += len(self._live)
        t_logits = torch.from_numpy(logits)
        offset = 0
        keep_rows: list[int] = []
        still: list[_Live] = []
        for lv in self._live:
            n = lv.rows
            self._pick(lv, t_logits[offset : offset + n])
            if lv.result is None:
                keep_rows.extend(offset + s for s in lv.beam_sources)
                still.append(lv)
            else:
                self._retiring.append(lv)
            offset += n
        if len(keep_rows) != self._state.batch or keep_rows != list(range(self._state.batch)):
            self._state = self._state.select(keep_rows) if keep_rows else None
        self._live = still

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = set(self._cancelled)
        flagged = {lv.req.seq_id for lv in self._live if lv.req.is_cancelled and lv.req.is_cancelled()}
        gone = cancelled | flagged
        if not gone:
            return
        keep_rows, still, offset = [], [], 0
        for lv in self._live:
            if lv.req.seq_id in gone:
                self._deliver(lv.req, SequenceResult(lv.req.seq_id, lv.codes, None, False, cancelled=True,
                                                     generated=lv.generated))
                self.stats.sequences_cancelled += 1
                with self._lock:
                    self._cancelled.discard(lv.req.seq_id)
            else:
                keep_rows.extend(range(offset, offset + lv.rows))
                still.append(lv)
            offset += lv.rows
        if len(still) != len(self._live):
            self._state = self._state.select(keep_rows) if keep_rows else None
            self._live = still

    def _retire(self) -> None:
        done, self._retiring = self._retiring, []
        if not done:
            return
        results = []
        for lv in done:
            codes, stopped = lv.result  # type: ignore[misc]
            results.append((lv, remove_long_silence(codes), stopped))
        with_codes = [(lv, c) for lv, c, _ in results if c]
        latents: dict[int, np.ndarray] = {}
        if with_codes:
            lat = self._latents([lv for lv, _ in with_codes], [c for _, c in with_codes])
            latents = {id(lv): x for (lv, _), x in zip(with_codes, lat)}
        for lv, codes, stopped in results:
            now = time.perf_counter()
            self._deliver(lv.req, SequenceResult(
                lv.req.seq_id, codes, latents.get(id(lv)), stopped, generated=lv.generated,
                queue_s=lv.started - lv.req.submitted_at, decode_s=now - lv.started,
            ))
            self.stats.sequences_done += 1

    def _latents(self, lives: list[_Live], codes: list[list[int]]) -> list[np.ndarray]:
        """Teacher-forced latents reusing each sequence's prefix KV (or a fresh prefill when raw ids differ)."""
        dec = self.decoder
        raw = [lv.req.text_ids_raw for lv in lives]
        if any(r is not None and r != lv.req.text_ids for r, lv in zip(raw, lives)):
            conds = np.stack([np.asarray(lv.req.conds, np.float32).reshape(-1, lv.req.conds.shape[-1]) for lv in lives])
            return dec.latents(conds, [r if r is not None else lv.req.text_ids for r, lv in zip(raw, lives)], codes)
        state = KVState.join([lv.prefix for lv in lives])
        return dec.latents_after_prefix(state, np.concatenate([lv.start_hidden for lv in lives]), codes)

    def _finish_cancelled_unstarted(self, req: SequenceRequest) -> None:
        self._deliver(req, SequenceResult(req.seq_id, [], None, False, cancelled=True))
        self.stats.sequences_cancelled += 1

    def _deliver(self, req: SequenceRequest, result: SequenceResult) -> None:
        try:
            req.on_done(result)
        except Exception:  # a broken callback must not stop other sequences
            log.exception("delivering the result of %s failed", req.seq_id)

    def _fail_all(self, message: str) -> None:
        victims = self._live + self._retiring
        self._live, self._state, self._retiring = [], None, []
        for lv in victims:
            self._deliver(lv.req, SequenceResult(lv.req.seq_id, [], None, False, error=message))


def run_to_completion(scheduler: DecoderScheduler, requests: list[SequenceRequest], timeout: float = 600) -> None:
    """Drive a scheduler synchronously until the given requests are done (tests and offline tools)."""
    pending = {r.seq_id for r in requests}
    results: "queue.Queue[str]" = queue.Queue()
    for r in requests:
        inner = r.on_done

        def wrap(res, inner=inner):
            inner(res)
            results.put(res.seq_id)

        r.on_done = wrap
        scheduler.submit(r)
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError("scheduler did not finish in time")
        scheduler.iterate()
        while not results.empty():
            pending.discard(results.get())
