"""Batched diffusion across requests: the heart of the IndexTTS-2 `s2mel` Triton model, free of Triton.

IndexTTS-2 spends much of its time in s2mel: 25 Euler steps, each one call of the DiT + WaveNet estimator on the
CFG pair of a segment. Served one segment at a time, every call is a batch of 2 and the weights are read 25
times per segment. Here every live request's NEXT step runs in ONE estimator call, whatever step each one is at:

    each iteration: drop cancelled requests -> admit queued ones (their step 0) -> one guided Euler step for all
    live rows (padded to the longest, each row with its own t, dt, length and prompt length) -> hand back the
    requests that just took their last step.

Rows never interact: the estimator masks every row to its own length (key mask, per-row WaveNet padding; the
export checks a padded row against the row alone), and the update is engine_ref's `euler_step`, elementwise per
row. So a request's mel equals what it gets alone, within fp32 rounding. Its noise is drawn from its own
generator exactly as `Synthesizer2.mel_frames` draws it (torch.randn of [1, mels, frames] from
torch.Generator().manual_seed(noise_seed), prompt frames zeroed by `prompt_inputs`), so served audio equals
engine_ref's for the same seed.

Bounds: at most `max_rows` estimator rows per call (2 per request with CFG); the rest wait in a FIFO queue of at
most `max_queue` (then `submit` raises QueueFull). Cancellation (`cancel` for live or queued requests, or a live
request's own is_cancelled) is applied at the start of every iteration, so a cancelled request takes part in at most one more step (measured:
`DiffusionStats.cancel_lag_steps_max`). A failing batched call is retried row by row, so only the request that
fails alone fails; a failure nobody owns fails the live batch and the scheduler keeps serving; a dying scheduler
thread calls `on_fatal` (the model exits its process so the server's watchdog restarts the deployment).
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

from engine_ref.errors import InputError
from engine_ref.indextts2.s2mel import euler_schedule, euler_step, prompt_inputs
from model_repository.scheduler_loop import SchedulerLoop

log = logging.getLogger("model_repository.s2mel")

#: estimator(x, prompt_x, x_lens, t, style, cond) -> velocity, torch tensors (engine_ref DiT or an ORT adaptor).
Estimator = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DiffusionConfig:
    """The CFM settings and tensor widths every request must match (from the export's manifest)."""

    mels: int = 80
    content_dim: int = 512
    style_dim: int = 192
    max_frames: int = 8192  # prompt + target frames of one request (the exported position range)
    steps: int = 25
    cfg_rate: float = 0.7

    @property
    def rows_per_request(self) -> int:
        return 2 if self.cfg_rate > 0 else 1


@dataclass
class DiffusionRequest:
    seq_id: str
    mu: np.ndarray  # [frames, content]: prompt condition ‖ target condition
    prompt_mel: np.ndarray  # [mels, prompt_frames]: the reference mel
    style: np.ndarray  # [style_dim]
    noise_seed: int
    on_done: Callable[["DiffusionResult"], None]
    is_cancelled: Callable[[], bool] | None = None
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class DiffusionResult:
    seq_id: str
    mel: np.ndarray | None  # [mels, frames - prompt_frames], the generated part
    cancelled: bool = False
    error: str | None = None
    steps: int = 0  # Euler steps this request took part in
    queue_s: float = 0.0
    diffuse_s: float = 0.0


@dataclass
class DiffusionStats:
    active: int = 0
    queued: int = 0
    steps: int = 0  # estimator calls (one per iteration with live requests)
    last_rows: int = 0  # estimator rows of the last call
    peak_rows: int = 0  # most rows in one call since start
    shared_steps: int = 0  # calls that held more than one request
    done: int = 0
    cancelled: int = 0
    failed: int = 0
    cancel_lag_steps_max: int = 0  # most steps a cancelled request took part in after its cancel arrived
    joined_mid_diffusion: int = 0  # requests admitted while another live request was past its first step


class QueueFull(Exception):
    """More requests are waiting than the configured bound."""


class _Live:
    """One admitted request: its Euler state lives in the scheduler's padded batch (row `row`)."""

    def __init__(self, req: DiffusionRequest, x: torch.Tensor, prompt_x: torch.Tensor, mu: torch.Tensor,
                 style: torch.Tensor, prompt_len: int):
        self.req = req
        self.x, self.prompt_x, self.mu, self.style = x, prompt_x, mu, style  # [1, M, T], [1, M, T], [1, T, C], [1, S]
        self.total = int(mu.shape[1])
        self.prompt_len = prompt_len
        self.step = 0
        self.row = -1
        self.started = time.perf_counter()


class DiffusionScheduler(SchedulerLoop):
    _loop_name = "s2mel"

    def __init__(self, estimator: Estimator, config: DiffusionConfig = DiffusionConfig(), max_rows: int = 16,
                 max_queue: int = 64, on_step: Callable[[DiffusionStats], None] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        if max_rows < config.rows_per_request:
            raise InputError(f"max_rows={max_rows} cannot hold one request ({config.rows_per_request} rows with "
                             f"cfg_rate {config.cfg_rate:g})", f"use max_rows >= {config.rows_per_request}")
        if max_queue < 0:
            raise InputError(f"max_queue={max_queue} must be >= 0", "pass a queue bound of 0 or more")
        self.estimator = estimator
        self.config = config
        self.max_rows = max_rows
        self.max_live = max_rows // config.rows_per_request
        self.max_queue = max_queue
        self.ts, self.dts = euler_schedule(config.steps)
        self.stats = DiffusionStats()
        self._init_loop()
        self._on_step = on_step
        self._on_fatal = on_fatal
        self._queue: deque[DiffusionRequest] = deque()
        self._cancelled: dict[str, int] = {}  # seq_id -> stats.steps when the cancel arrived
        self._live: list[_Live] = []
        self._batch: dict[str, torch.Tensor] | None = None  # padded tensors of the live set, rows in _live order

    # --- public API (any thread) ---------------------------------------------------------------------------------
    def validate(self, req: DiffusionRequest) -> None:
        """InputError naming what is wrong with a request's tensors (checked at submit, before it queues)."""
        cfg = self.config
        mu, mel, style = np.asarray(req.mu), np.asarray(req.prompt_mel), np.asarray(req.style).reshape(-1)
        if mu.ndim != 2 or mu.shape[1] != cfg.content_dim:
            raise InputError(f"MU must be [frames, {cfg.content_dim}], got {list(mu.shape)}",
                             "send the prompt condition followed by the s2mel_cond output")
        if mel.ndim != 2 or mel.shape[0] != cfg.mels:
            raise InputError(f"PROMPT_MEL must be [{cfg.mels}, prompt frames], got {list(mel.shape)}",
                             "send the reference mel")
        frames, prompt = int(mu.shape[0]), int(mel.shape[1])
        if not 1 <= prompt < frames:
            raise InputError(f"the prompt mel ({prompt} frames) must be shorter than MU ({frames} frames)",
                             "append the target condition after the prompt condition")
        if frames > cfg.max_frames:
            raise InputError(f"{frames} mel frames exceed the estimator's {cfg.max_frames}",
                             "shorten the reference audio or the text segment")
        if style.shape != (cfg.style_dim,):
            raise InputError(f"STYLE must hold {cfg.style_dim} values, got {style.size}", "send the CAMPPlus style")
        for name, arr in (("MU", mu), ("PROMPT_MEL", mel), ("STYLE", style)):
            if not np.isfinite(arr).all():
                raise InputError(f"{name} holds NaN or infinite values", "send the graphs' outputs unchanged")
        if not 0 <= int(req.noise_seed) < 2**63:
            raise InputError(f"NOISE_SEED={req.noise_seed} is out of range", "send a seed in [0, 2**63)")

    def submit(self, req: DiffusionRequest) -> None:
        self.validate(req)
        with self._lock:
            if not self.alive:
                raise QueueFull("the s2mel scheduler has stopped")
            waiting = len(self._queue)
            if len(self._live) + waiting + 1 - self.max_live > self.max_queue:  # it would wait beyond the bound
                raise QueueFull(f"{waiting} diffusion requests are already queued (limit {self.max_queue})")
            self._queue.append(req)
            self.stats.queued = len(self._queue)
            self._wake.notify()

    def cancel(self, seq_id: str) -> None:
        """Stop `seq_id` before the next step (an id that is not live or queued is forgotten after one iteration)."""
        with self._lock:
            self._cancelled.setdefault(seq_id, self.stats.steps)
            self._wake.notify()

    # --- scheduler thread ----------------------------------------------------------------------------------------
    def _stopped(self, req: DiffusionRequest) -> None:
        self._deliver(req, DiffusionResult(req.seq_id, None, error="s2mel scheduler stopped"))

    @torch.inference_mode()
    def iterate(self) -> None:
        """One iteration (public so tests can drive the scheduler deterministically without its thread)."""
        self._drop_cancelled()
        self._admit()
        if self._live:
            self._step()
        self._retire()
        self.stats.active = len(self._live)
        with self._lock:
            self.stats.queued = len(self._queue)
            if self._cancelled:  # keep only ids still to act on
                known = {r.seq_id for r in self._queue} | {lv.req.seq_id for lv in self._live}
                self._cancelled = {k: v for k, v in self._cancelled.items() if k in known}
        if self._on_step:
            self._on_step(self.stats)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = dict(self._cancelled)
            queued = [r for r in self._queue if r.seq_id in cancelled]
            if queued:
                gone = {id(r) for r in queued}
                self._queue = deque(r for r in self._queue if id(r) not in gone)
        for req in queued:
            self._finish_cancelled(req, 0, cancelled.get(req.seq_id))
        dropped = [lv for lv in self._live if lv.req.seq_id in cancelled or _flagged(lv.req)]
        if dropped:
            self._leave(dropped)
            for lv in dropped:
                self._finish_cancelled(lv.req, lv.step, cancelled.get(lv.req.seq_id), lv.started)

    def _finish_cancelled(self, req: DiffusionRequest, steps: int, cancelled_at: int | None,
                          started: float | None = None) -> None:
        if cancelled_at is not None:
            self.stats.cancel_lag_steps_max = max(self.stats.cancel_lag_steps_max, self.stats.steps - cancelled_at)
            with self._lock:
                self._cancelled.pop(req.seq_id, None)
        self.stats.cancelled += 1
        now = time.perf_counter()
        self._deliver(req, DiffusionResult(req.seq_id, None, cancelled=True, steps=steps,
                                           queue_s=(started or now) - req.submitted_at,
                                           diffuse_s=now - started if started else 0.0))

    def _admit(self) -> None:
        with self._lock:
            new = []
            while self._queue and len(self._live) + len(new) < self.max_live:
                new.append(self._queue.popleft())
        for req in new:
            mid = any(lv.step > 0 for lv in self._live)
            try:
                live = self._start(req)
            except Exception as exc:  # this request's tensors alone
                log.exception("admitting %s failed", req.seq_id)
                self._fail(req, f"s2mel failure: admission: {exc}")
                continue
            self._sync_rows()  # membership changes: the padded batch is rebuilt before the next step
            self._batch = None
            self._live.append(live)
            self.stats.joined_mid_diffusion += int(mid)

    def _start(self, req: DiffusionRequest) -> _Live:
        """Step 0 of a request: Synthesizer2.mel_frames's noise and prompt layout for one segment."""
        cfg = self.config
        mu = torch.from_numpy(np.ascontiguousarray(req.mu, np.float32))[None]
        mel = torch.from_numpy(np.ascontiguousarray(req.prompt_mel, np.float32))[None]
        style = torch.from_numpy(np.ascontiguousarray(req.style, np.float32).reshape(1, -1))
        frames, prompt = mu.shape[1], mel.shape[2]
        gen = torch.Generator().manual_seed(int(req.noise_seed))
        z = torch.randn((1, cfg.mels, frames), generator=gen)
        x, prompt_x = prompt_inputs(z, mel, torch.tensor([prompt], dtype=torch.long))
        return _Live(req, x, prompt_x, mu, style, prompt)

    def _leave(self, lives: list[_Live]) -> None:
        """Take requests out of the batch (their Euler state is copied out first)."""
        gone = {id(lv) for lv in lives}
        self._sync_rows()
        self._live = [lv for lv in self._live if id(lv) not in gone]
        self._batch = None

    def _sync_rows(self) -> None:
        """Copy each live request's x out of the padded batch (before the batch is rebuilt)."""
        if self._batch is None:
            return
        x = self._batch["x"]
        for lv in self._live:
            if lv.row >= 0:
                lv.x = x[lv.row : lv.row + 1, :, : lv.total].clone()

    def _build(self) -> dict[str, torch.Tensor]:
        lives, cfg = self._live, self.config
        b, frames = len(lives), max(lv.total for lv in lives)
        x = torch.zeros(b, cfg.mels, frames)
        prompt_x = torch.zeros(b, cfg.mels, frames)
        mu = torch.zeros(b, frames, cfg.content_dim)
        for i, lv in enumerate(lives):
            x[i, :, : lv.total] = lv.x[0]
            prompt_x[i, :, : lv.total] = lv.prompt_x[0]
            mu[i, : lv.total] = lv.mu[0]
            lv.row = i
        return {"x": x, "prompt_x": prompt_x, "mu": mu, "style": torch.cat([lv.style for lv in lives]),
                "x_lens": torch.tensor([lv.total for lv in lives], dtype=torch.long),
                "prompt_lens": torch.tensor([lv.prompt_len for lv in lives], dtype=torch.long)}

    def _step(self) -> None:
        if self._batch is None:
            self._batch = self._build()
        bt, cfg = self._batch, self.config
        k = torch.tensor([lv.step for lv in self._live], dtype=torch.long)
        t, dt = self.ts[k], self.dts[k]
        try:
            x = euler_step(self.estimator, bt["x"], bt["prompt_x"], bt["x_lens"], bt["prompt_lens"], t, dt,
                           bt["style"], bt["mu"], cfg.cfg_rate)
            failed: dict[int, str] = {}
        except Exception as exc:
            if len(self._live) == 1:
                x, failed = bt["x"], {0: f"s2mel failure: estimator: {exc}"}
            else:  # find the row that fails alone; the others take their step alone
                log.warning("batched s2mel step failed (%s); retrying row by row", exc)
                x, failed = self._step_rows(bt, t, dt)
        rows = len(self._live) * cfg.rows_per_request
        self.stats.steps += 1
        self.stats.last_rows = rows
        self.stats.peak_rows = max(self.stats.peak_rows, rows)
        self.stats.shared_steps += int(len(self._live) > 1)
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        bt["x"] = x
        bad = []
        for i, lv in enumerate(self._live):
            if i in failed or not bool(finite[i]):
                bad.append((lv, failed.get(i, f"s2mel failure: step {lv.step} produced non-finite values")))
            else:
                lv.step += 1
        if bad:
            self._leave([lv for lv, _ in bad])
            for lv, msg in bad:
                self._fail(lv.req, msg, lv.step)

    def _step_rows(self, bt: dict[str, torch.Tensor], t: torch.Tensor, dt: torch.Tensor):
        x = bt["x"].clone()
        failed: dict[int, str] = {}
        for i, lv in enumerate(self._live):
            n = lv.total
            try:
                x[i : i + 1, :, :n] = euler_step(
                    self.estimator, bt["x"][i : i + 1, :, :n], bt["prompt_x"][i : i + 1, :, :n], bt["x_lens"][i : i + 1],
                    bt["prompt_lens"][i : i + 1], t[i : i + 1], dt[i : i + 1], bt["style"][i : i + 1],
                    bt["mu"][i : i + 1, :n], self.config.cfg_rate)
            except Exception as exc:
                log.warning("s2mel step of %s failed: %s", lv.req.seq_id, exc)
                failed[i] = f"s2mel failure: estimator: {exc}"
        return x, failed

    def _retire(self) -> None:
        done = [lv for lv in self._live if lv.step >= self.config.steps]
        if not done:
            return
        x = self._batch["x"] if self._batch is not None else None
        results = []
        for lv in done:
            state = x[lv.row] if x is not None and lv.row >= 0 else lv.x[0]
            results.append((lv, state[:, lv.prompt_len : lv.total].numpy().copy()))
        self._leave(done)
        now = time.perf_counter()
        for lv, mel in results:
            self.stats.done += 1
            self._deliver(lv.req, DiffusionResult(lv.req.seq_id, mel, steps=lv.step,
                                                  queue_s=lv.started - lv.req.submitted_at,
                                                  diffuse_s=now - lv.started))

    def _fail(self, req: DiffusionRequest, message: str, steps: int = 0) -> None:
        self.stats.failed += 1
        self._deliver(req, DiffusionResult(req.seq_id, None, error=message, steps=steps))

    def _deliver(self, req: DiffusionRequest, result: DiffusionResult) -> None:
        try:
            req.on_done(result)
        except Exception:  # a broken callback must not stop other requests
            log.exception("delivering the result of %s failed", req.seq_id)

    def _fail_all(self, message: str) -> None:
        victims, self._live, self._batch = self._live, [], None
        for lv in victims:
            self._fail(lv.req, message, lv.step)


def _flagged(req: DiffusionRequest) -> bool:
    try:
        return bool(req.is_cancelled and req.is_cancelled())
    except Exception:  # a broken probe must not fail the batch
        return False


def run_to_completion(scheduler: DiffusionScheduler, requests: list[DiffusionRequest], timeout: float = 600,
                      between: Callable[[int], None] | None = None) -> None:
    """Drive a scheduler synchronously until `requests` are done (tests and offline tools).

    between(iteration) runs before each iteration: a test submits or cancels mid-diffusion there.
    """
    pending = {r.seq_id for r in requests}
    finished: "queue.Queue[str]" = queue.Queue()
    for r in requests:
        inner = r.on_done

        def wrap(res, inner=inner):
            inner(res)
            finished.put(res.seq_id)

        r.on_done = wrap
        scheduler.submit(r)
    deadline = time.monotonic() + timeout
    iteration = 0
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError("s2mel scheduler did not finish in time")
        if between is not None:
            between(iteration)
        scheduler.iterate()
        iteration += 1
        while not finished.empty():
            pending.discard(finished.get())
