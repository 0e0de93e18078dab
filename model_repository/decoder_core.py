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

`remove_silence`: IndexTTS 1.x trims runaway silent codes (engine_ref.generate.remove_long_silence) before the
latent pass; IndexTTS-2 keeps every code (infer_v2 has no such step), so its repositories turn it off.
`latent_pass`: IndexTTS-2.5 reads no GPT latents, so its repositories turn the teacher-forced pass off: results
carry no latents (None) and no prefix KV is kept per sequence. (Chunked streaming's incremental latents need it
on; 2.5's entry model never asks for chunks.)
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from engine_ref.beam_search import BeamSearch
from engine_ref.generate import SilenceFilter, remove_long_silence
from engine_ref.errors import InputError
from engine_ref.sampling import MAX_BEAMS, GenerationParams, RowParams, initial_seen, make_generator, select_next
from export.runtime import KVState, OrtDecoder
from model_repository.scheduler_loop import SchedulerLoop

log = logging.getLogger("model_repository.decoder")

#: How many admissions a wide sequence lets narrower ones pass before it reserves the rows it needs.
MAX_BYPASS = 64
#: How long a cancel of an id the scheduler does not hold is kept: the BLS may cancel a segment whose decode call is
#: still on its way (the two messages travel separately), and that sequence must still stop when it arrives.
CANCEL_MEMORY_S = 30.0
MAX_CANCEL_MEMORY = 4096  # and at most this many such ids (the oldest go first)


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
    #: Chunked streaming: send a partial result (new codes + their latents) whenever this many cleaned codes exist
    #: (ascending counts); None = one result at the end. Beam search knows its codes only at the end: ignored there.
    stream_at: list[int] | None = None
    on_partial: Callable[["SequencePartial"], None] | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    bypassed: int = 0  # admissions in which narrower sequences went ahead of it
    priority: int = 0  # admission order among queued sequences: lower first (the segment's index in its request)


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
    offset: int = 0  # index of codes[0] in the sequence (> 0 after partial results were sent)


@dataclass
class SequencePartial:
    """Codes that are final (silence removal cannot change them any more) and their teacher-forced latents."""

    seq_id: str
    offset: int  # index of codes[0] in the sequence
    codes: list[int]
    latents: np.ndarray  # [len(codes), D]
    generated: int


@dataclass
class SchedulerStats:
    active: int = 0
    queued: int = 0
    tokens_total: int = 0
    sequences_done: int = 0
    sequences_cancelled: int = 0
    steps: int = 0
    last_batch_rows: int = 0
    last_step_s: float = 0.0  # wall time of the last batched decode step (0 when the iteration had none)
    last_step_sequences: int = 0  # sequences in the last decode step (finishing ones included)


class QueueFull(Exception):
    """More sequences are waiting than the configured bound."""


class _KeepAll:
    """SilenceFilter's interface without trimming (families whose upstream keeps every code)."""

    @staticmethod
    def feed(token: int) -> list[int]:
        return [token]

    @staticmethod
    def finish() -> list[int]:
        return []


class _Live:
    """Book-keeping of one admitted sequence."""

    def __init__(self, req: SequenceRequest, vocab: int, start: int, stop: int, prefix: KVState | None,
                 start_hidden: np.ndarray, remove_silence: bool = True):
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
        # Chunked streaming (sampling/greedy only): cleaned codes as they become certain, latents computed
        # incrementally over them with a KV of their own (the latent pass's positions differ from generation's).
        streaming = bool(req.stream_at) and self.beam is None
        self.thresholds: deque[int] = deque(sorted(req.stream_at)) if streaming else deque()
        self.filter = (SilenceFilter() if remove_silence else _KeepAll()) if streaming else None
        self.clean: list[int] = []
        self.latents: list[np.ndarray] = []
        self.lat_state: KVState | None = None
        self.emitted = 0

    @property
    def rows(self) -> int:
        return 1 if self.beam is None else self.beam.num_rows


class DecoderScheduler(SchedulerLoop):
    _loop_name = "decoder"

    def __init__(self, decoder: OrtDecoder, max_sequences: int = 8, max_queue: int = 1024,
                 on_step: Callable[[SchedulerStats], None] | None = None, max_rows: int | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None, remove_silence: bool = True,
                 clock: Callable[[], float] = time.monotonic, latent_pass: bool = True):
        self.decoder = decoder
        self._clock = clock
        self.remove_silence = remove_silence
        self.latent_pass = latent_pass
        self.max_sequences = max_sequences
        #: KV rows decoded per step (a beam-search sequence takes num_beams rows): bounds each step's cost.
        self.max_rows = max_rows if max_rows is not None else max(3 * max_sequences, MAX_BEAMS)
        self.max_queue = max_queue
        self._on_fatal = on_fatal
        self._init_loop()
        self.stats = SchedulerStats()
        self._queue: deque[SequenceRequest] = deque()
        self._cancelled: dict[str, float] = {}  # seq id -> when its cancel arrived
        self._live: list[_Live] = []
        self._state: KVState | None = None  # rows of all live sequences, in _live order
        self._retiring: list[_Live] = []  # finished this iteration, latents still to compute
        self._on_step = on_step

    # --- public API (any thread) ---------------------------------------------------------------------------------
    def submit(self, req: SequenceRequest) -> None:
        if req.params.num_beams > self.max_rows:
            raise InputError(f"num_beams={req.params.num_beams} exceeds this decoder's {self.max_rows} rows per step",
                             f"send num_beams <= {self.max_rows}")
        with self._lock:
            if not self.alive:
                raise QueueFull("the decoder scheduler has stopped")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} sequences are already queued (limit {self.max_queue})")
            self._queue.append(req)
            self.stats.queued = len(self._queue)
            self._wake.notify()

    def cancel(self, seq_id: str) -> None:
        """Stop `seq_id` at the next step, or when it arrives (a cancel for an id not held is kept CANCEL_MEMORY_S)."""
        with self._lock:
            self._cancelled[seq_id] = self._clock()
            self._wake.notify()

    # --- scheduler thread ----------------------------------------------------------------------------------------
    def _stopped(self, req: SequenceRequest) -> None:
        self._deliver(req, SequenceResult(req.seq_id, [], None, False, error="decoder scheduler stopped"))

    def iterate(self) -> None:
        """One scheduler iteration (public for deterministic tests that drive it without the thread)."""
        self._drop_cancelled()
        self._admit()
        self.stats.last_step_s = 0.0
        self.stats.last_step_sequences = len(self._live)
        if self._live:
            t0 = time.perf_counter()
            self._decode_step()
            self.stats.last_step_s = time.perf_counter() - t0
        self._stream_partials()
        self._retire()
        self.stats.active = len(self._live)
        with self._lock:
            self.stats.queued = len(self._queue)
            if self._cancelled:  # a cancel for an ended (or never sent) sequence must not be remembered forever
                self._forget_old_cancels()
        if self._on_step:
            self._on_step(self.stats)

    def _take_new(self) -> list[SequenceRequest]:
        """Admit queued sequences that fit the free slots and rows, in order. A sequence too wide for the rows
        left (a large beam search) is passed by narrower ones, so it never stalls them; once it has been passed
        over `MAX_BYPASS` times, nothing else is admitted until it fits (no starvation either way)."""
        with self._lock:
            free = self.max_sequences - len(self._live)
            rows = sum(lv.rows for lv in self._live)
            new: list[SequenceRequest] = []
            waiting: deque[SequenceRequest] = deque()
            blocked = False
            # Lowest segment number first, then arrival: a request's first segment (its time to first audio) never
            # waits behind segments other requests decode ahead of their playback.
            ordered = sorted(self._queue, key=lambda r: (r.priority, r.submitted_at))
            self._queue = deque(ordered)
            while self._queue:
                req = self._queue.popleft()
                if req.seq_id in self._cancelled:
                    del self._cancelled[req.seq_id]
                    self._finish_cancelled_unstarted(req)
                    continue
                if blocked or len(new) >= free or rows + req.params.num_beams > self.max_rows:
                    waiting.append(req)
                    blocked = blocked or req.bypassed >= MAX_BYPASS
                    continue
                for earlier in waiting:  # it goes ahead of these
                    earlier.bypassed += 1
                rows += req.params.num_beams
                new.append(req)
            self._queue = waiting
            return new

    def _prefill(self, new: list[SequenceRequest]):
        """Prefill the newcomers together; if that fails, each alone, so only a faulty one fails."""
        conds = lambda reqs: np.stack([np.asarray(r.conds, np.float32).reshape(-1, r.conds.shape[-1])  # noqa: E731
                                       for r in reqs])
        try:
            logits, hidden, state = self.decoder.prefill(conds(new), [r.text_ids for r in new])
            return [(r, logits[i:i + 1], hidden[i:i + 1], state.select([i])) for i, r in enumerate(new)]
        except Exception:
            if len(new) == 1:
                raise
        out = []
        for req in new:
            try:
                out.extend(self._prefill([req]))
            except Exception as exc:
                log.exception("prefill of %s failed", req.seq_id)
                self._deliver(req, SequenceResult(req.seq_id, [], None, False, error=f"decoder failure: prefill: {exc}"))
        return out

    def _admit(self) -> None:
        new = self._take_new()
        if not new:
            return
        try:
            prefilled = self._prefill(new)
        except Exception as exc:  # bad inputs of this request must not touch the sequences already running
            log.exception("prefill failed")
            self._deliver(new[0], SequenceResult(new[0].seq_id, [], None, False, error=f"decoder failure: prefill: {exc}"))
            return
        if not prefilled:
            return
        state = KVState.join([st for _, _, _, st in prefilled])
        entries = []
        for i, (req, logits, hidden, one) in enumerate(prefilled):
            live = _Live(req, self.decoder.vocab, self.decoder.start_mel, self.decoder.stop_mel,
                         one if self.latent_pass else None, hidden, self.remove_silence)
            rows = [i] * live.rows
            if not self._safe_pick(live, torch.from_numpy(logits[[0] * live.rows])):
                continue
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

    def _safe_pick(self, live: _Live, logits: torch.Tensor) -> bool:
        """`_pick` for one sequence; an error fails that sequence alone (named), never the batch."""
        try:
            self._pick(live, logits)
            return True
        except Exception as exc:
            log.warning("sequence %s failed at step %d: %s", live.req.seq_id, live.step, exc)
            self._deliver(live.req, SequenceResult(
                live.req.seq_id, [], None, False, generated=live.generated,
                error=f"decoding failed at step {live.step} with these generation parameters ({exc}); "
                      "use a larger TEMPERATURE or DO_SAMPLE=false"))
            return False

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
        if live.filter is not None:
            live.clean.extend(live.filter.feed(tok))
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
            if not self._safe_pick(lv, t_logits[offset : offset + n]):
                pass  # failed alone: its rows leave the batch
            elif lv.result is None:
                keep_rows.extend(offset + s for s in lv.beam_sources)
                still.append(lv)
            else:
                self._retiring.append(lv)
            offset += n
        if len(keep_rows) != self._state.batch or keep_rows != list(range(self._state.batch)):
            self._state = self._state.select(keep_rows) if keep_rows else None
        self._live = still

    def _forget_old_cancels(self) -> None:
        """(Under the lock.) Drop cancels older than CANCEL_MEMORY_S for ids not held, and the oldest beyond
        MAX_CANCEL_MEMORY."""
        held = {r.seq_id for r in self._queue} | {lv.req.seq_id for lv in self._live}
        horizon = self._clock() - CANCEL_MEMORY_S
        for seq_id, at in list(self._cancelled.items()):
            if at < horizon and seq_id not in held:
                del self._cancelled[seq_id]
        while len(self._cancelled) > MAX_CANCEL_MEMORY:
            del self._cancelled[min(self._cancelled, key=self._cancelled.__getitem__)]

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
                    self._cancelled.pop(lv.req.seq_id, None)
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
        streamed = []
        for lv in done:
            codes, stopped = lv.result  # type: ignore[misc]
            if lv.filter is not None:
                streamed.append((lv, stopped))
            else:
                results.append((lv, remove_long_silence(codes) if self.remove_silence else list(codes), stopped))
        for lv, stopped in streamed:
            self._finish_streamed(lv, stopped)
        with_codes = [(lv, c) for lv, c, _ in results if c] if self.latent_pass else []
        latents: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        if with_codes:
            try:
                lat = self._latents([lv for lv, _ in with_codes], [c for _, c in with_codes])
                latents = {id(lv): x for (lv, _), x in zip(with_codes, lat)}
            except Exception:  # retry one by one: only a faulty sequence fails
                for lv, c in with_codes:
                    try:
                        latents[id(lv)] = self._latents([lv], [c])[0]
                    except Exception as exc:
                        log.exception("latent pass of %s failed", lv.req.seq_id)
                        failed[id(lv)] = f"decoder failure: latent pass: {exc}"
        for lv, codes, stopped in results:
            now = time.perf_counter()
            if id(lv) in failed:
                self._deliver(lv.req, SequenceResult(lv.req.seq_id, [], None, False, error=failed[id(lv)]))
                continue
            self._deliver(lv.req, SequenceResult(
                lv.req.seq_id, codes, latents.get(id(lv)), stopped, generated=lv.generated,
                queue_s=lv.started - lv.req.submitted_at, decode_s=now - lv.started,
            ))
            self.stats.sequences_done += 1

    # --- chunked streaming ----------------------------------------------------------------------------------------
    def _extend_latents(self, lv: _Live, upto: int) -> None:
        """Latents 0..upto-1 of the cleaned codes, appending to what this sequence already has (its own KV)."""
        dec = self.decoder
        if lv.lat_state is None:
            raw = lv.req.text_ids_raw
            if raw is not None and raw != lv.req.text_ids:  # upstream's latent pass sees the raw ids
                conds = np.asarray(lv.req.conds, np.float32).reshape(1, -1, lv.req.conds.shape[-1])
                _, start_hidden, lv.lat_state = dec.prefill(conds, [raw])
            else:
                start_hidden, lv.lat_state = lv.start_hidden, lv.prefix
            lv.latents.append(np.asarray(start_hidden[0]))
        have = len(lv.latents)
        if upto <= have:
            return
        # Latent j (j >= 1) is the hidden state after feeding cleaned code j-1 at position j.
        tok = np.asarray(lv.clean[have - 1: upto - 1], np.int64).reshape(1, -1)
        pos = np.arange(have, upto, dtype=np.int64).reshape(1, -1)
        _, hidden, lv.lat_state = dec.decode(tok, pos, lv.lat_state)
        lv.latents.extend(np.asarray(hidden[0]))

    def _stream_partials(self) -> None:
        for lv in self._live:
            if not lv.thresholds or len(lv.clean) < lv.thresholds[0]:
                continue
            target = 0
            while lv.thresholds and len(lv.clean) >= lv.thresholds[0]:
                target = lv.thresholds.popleft()
            if target <= lv.emitted:
                continue
            try:
                self._extend_latents(lv, target)
            except Exception as exc:  # fails this sequence alone
                log.exception("incremental latents of %s failed", lv.req.seq_id)
                lv.result = (lv.codes, False)
                lv.thresholds.clear()
                lv.failed = f"decoder failure: latent pass: {exc}"
                continue
            part = SequencePartial(lv.req.seq_id, lv.emitted, lv.clean[lv.emitted:target],
                                   np.stack(lv.latents[lv.emitted:target]), lv.generated)
            lv.emitted = target
            if lv.req.on_partial is not None:
                try:
                    lv.req.on_partial(part)
                except Exception:
                    log.exception("delivering a partial result of %s failed", lv.req.seq_id)

    def _finish_streamed(self, lv: _Live, stopped: bool) -> None:
        now = time.perf_counter()
        error = getattr(lv, "failed", None)
        if error is None:
            lv.clean.extend(lv.filter.finish())
            try:
                self._extend_latents(lv, len(lv.clean))
            except Exception as exc:
                log.exception("incremental latents of %s failed", lv.req.seq_id)
                error = f"decoder failure: latent pass: {exc}"
        lv.lat_state = None
        if error is not None:
            self._deliver(lv.req, SequenceResult(lv.req.seq_id, [], None, False, error=error))
            return
        rest = lv.clean[lv.emitted:]
        latents = np.stack(lv.latents[lv.emitted:len(lv.clean)]) if rest else None
        self._deliver(lv.req, SequenceResult(
            lv.req.seq_id, rest, latents, stopped, generated=lv.generated,
            queue_s=lv.started - lv.req.submitted_at, decode_s=now - lv.started, offset=lv.emitted))
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
