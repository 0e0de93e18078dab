"""The job workers of one gateway process: claim jobs from the store, synthesize them part by part, encode.

- At most `max_jobs` jobs run at once in this process (settings.max_jobs); the others stay queued in the store
  for whichever replica has room. Workers run on the gateway's event loop, independent of any HTTP connection.
- A job is a list of parts (plan.json: each chapter cut at paragraph/sentence ends into pieces of at most
  `part_chars`, never more than the server's max_text_chars). Up to `parts_in_flight` parts of a job stream at
  once (the server batches their sequences); each finished part's PCM goes to disk before it counts as done, so
  a gateway killed mid-job resumes from the finished parts — its claim goes stale after `stale_after_s` without
  heartbeats and any replica (or the restarted gateway) claims it again.
- Cancelling (DELETE) cancels the job's task: the Triton streams it was reading are cancelled with it (TritonTTS
  cancels the gRPC call when its consumer goes), so the server stops those sequences within a decode step. A job
  running on another replica is flagged in the store and stopped by that replica's next heartbeat.
- Transient server trouble (unreachable or restarting, not ready, timeout, at capacity) retries a part with
  backoff for up to `retry_for_s`; a request the server rejects fails the job with the server's one-line message.
- Progress is kept live in memory (segment by segment) and written to the store with every heartbeat and every
  finished part. The ETA divides the characters left by the characters per second measured on this job so far
  (before any is measured: the rate of the last jobs this process finished).

Tunables beyond GatewaySettings come from the environment (`JobConfig.from_env`, ``TTS_GATEWAY_JOB_*``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from client.errors import ModelUnavailable, RequestRejected, ServerTimeout, ServerUnavailable
from client.request import Controls
from engine_ref.errors import CapacityError, ConfigError, InputError, TTSError
from gateway.jobs.files import JobFiles, PartMeta, text_digest
from gateway.jobs.m4b import ChapterMark, Tags, job_format, write_audiobook
from gateway.jobs.store import JobRecord, JobStore
from gateway.jobs.text import Chapter, Part, plan_parts
from gateway.triton import UNKNOWN_SPEAKER_MARK

__all__ = ["JobConfig", "JobRunner", "LiveProgress", "chapter_marks"]

log = logging.getLogger("gateway.jobs")

_TRANSIENT = (ServerUnavailable, ModelUnavailable, ServerTimeout, CapacityError)
MIN_RATE_WINDOW_S = 0.25  # seconds of synthesis before this run's own rate (and so an ETA) is reported


@dataclass(frozen=True)
class JobConfig:
    """Worker tunables. `max_jobs` is GatewaySettings.max_jobs (--max-jobs / TTS_GATEWAY_MAX_JOBS); every other
    field has an environment variable TTS_GATEWAY_JOB_<FIELD> (e.g. TTS_GATEWAY_JOB_PART_CHARS=1000,
    TTS_GATEWAY_JOB_STALE_AFTER_S=60, TTS_GATEWAY_JOB_KEEP_PARTS=1)."""

    max_jobs: int = 2
    heartbeat_s: float = 2.0
    #: A running job without a heartbeat for this long belongs to a dead gateway and is claimed again.
    stale_after_s: float = 30.0
    #: How often an idle worker looks for queued jobs another replica added (local submissions wake it at once).
    poll_s: float = 1.0
    #: Characters per part (one Triton request): small enough that a resume loses little, large enough that the
    #: server's segmenter sees whole paragraphs. Capped by the server's max_text_chars.
    part_chars: int = 1500
    parts_in_flight: int = 2
    #: Silence after each chapter but the last.
    chapter_gap_s: float = 1.0
    #: Transient server trouble (unreachable, restarting, at capacity, timeouts) is retried with backoff (doubling
    #: from retry_backoff_s, at most 30 s apart) for this long per part before the job fails.
    retry_for_s: float = 600.0
    retry_backoff_s: float = 2.0
    #: Keep the parts' PCM after the file is encoded (debugging, tests); by default they are removed (an hour of
    #: 24 kHz audio is 170 MB of parts).
    keep_parts: bool = False
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    def __post_init__(self) -> None:
        for name in ("max_jobs", "part_chars", "parts_in_flight"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"job setting {name}={getattr(self, name)!r} must be at least 1",
                                  f"set TTS_GATEWAY_JOB_{name.upper()} to a positive whole number")
        for name in ("heartbeat_s", "stale_after_s", "poll_s"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"job setting {name}={getattr(self, name)!r} must be positive",
                                  f"set TTS_GATEWAY_JOB_{name.upper()} to a number of seconds")
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise ConfigError(f"stale_after_s={self.stale_after_s} must exceed two heartbeats ({self.heartbeat_s} s)",
                              "raise TTS_GATEWAY_JOB_STALE_AFTER_S or lower TTS_GATEWAY_JOB_HEARTBEAT_S")

    @classmethod
    def from_env(cls, max_jobs: int, env: Mapping[str, str] | None = None) -> "JobConfig":
        env = os.environ if env is None else env
        values: dict[str, Any] = {"max_jobs": max_jobs}
        types = {"heartbeat_s": float, "stale_after_s": float, "poll_s": float, "part_chars": int,
                 "parts_in_flight": int, "chapter_gap_s": float, "retry_for_s": float, "retry_backoff_s": float,
                 "replica_id": str, "keep_parts": _flag}
        for name, kind in types.items():
            raw = env.get(f"TTS_GATEWAY_JOB_{name.upper()}")
            if raw:
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ConfigError(f"TTS_GATEWAY_JOB_{name.upper()}={raw!r} is not a "
                                      f"{'boolean' if kind is _flag else kind.__name__}",
                                      "fix the variable") from None
        return cls(**values)


def _flag(raw: str) -> bool:
    if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(raw)
    return raw.strip().lower() in ("1", "true", "yes")


class LiveProgress:
    """A job's progress as its worker sees it, segment by segment; `snapshot()` is what the API shows."""

    def __init__(self, parts: list[Part], chapters: list[Chapter], done: dict[int, PartMeta],
                 prior_rate: float | None):
        self.parts = parts
        self.chapters = chapters
        self.done = dict(done)
        self.partial: dict[int, tuple[int, int]] = {}  # part -> (segments done, segment count)
        self.phase = "synthesizing"
        self.prior_rate = prior_rate
        self.started = time.monotonic()
        self.chars_at_start = self._chars_done()

    def segment(self, part: int, done: int, count: int) -> None:
        self.partial[part] = (done, max(count, 1))

    def reset(self, part: int) -> None:
        self.partial.pop(part, None)

    def finish(self, meta: PartMeta) -> None:
        self.partial.pop(meta.index, None)
        self.done[meta.index] = meta

    def _chars_done(self) -> float:
        total = float(sum(m.characters for m in self.done.values()))
        for index, (done, count) in self.partial.items():
            total += len(self.parts[index].text) * done / count
        return total

    def rate(self) -> float | None:
        """Characters per second of this run (None until something was measured). A quarter second of work is
        enough for a first estimate: short jobs (a few seconds) should show an ETA too, and it sharpens as parts end."""
        elapsed = time.monotonic() - self.started
        gained = self._chars_done() - self.chars_at_start
        if gained > 0 and elapsed >= MIN_RATE_WINDOW_S:
            return gained / elapsed
        return self.prior_rate

    def snapshot(self) -> dict[str, Any]:
        total_chars = sum(len(p.text) for p in self.parts)  # the parts' characters (cut points' spaces dropped)
        done_chars = self._chars_done()
        fraction = done_chars / total_chars if total_chars else 0.0
        book_chars = sum(len(c.text) for c in self.chapters)  # what the submission reported
        seg_done = sum(m.segments for m in self.done.values()) + sum(d for d, _ in self.partial.values())
        known = sum(m.segments for m in self.done.values()) + sum(c for _, c in self.partial.values())
        known_chars = sum(m.characters for m in self.done.values()) + sum(
            len(self.parts[i].text) for i in self.partial)
        unknown_chars = total_chars - known_chars
        per_char = known / known_chars if known_chars else None
        estimated = unknown_chars > 0
        seg_total = known + (int(round(unknown_chars * per_char)) if per_char and estimated else 0)
        rate = self.rate()
        left = max(total_chars - done_chars, 0.0)
        eta = None if rate is None else (0.0 if self.phase != "synthesizing" else left / rate)
        chapters: list[dict[str, Any]] = [{"title": c.title, "characters": len(c.text), "parts": 0, "parts_done": 0}
                                          for c in self.chapters]
        for p in self.parts:
            chapters[p.chapter]["parts"] += 1
            chapters[p.chapter]["parts_done"] += p.index in self.done
        audio_s = sum(m.samples / m.sample_rate for m in self.done.values() if m.sample_rate)
        return {"phase": self.phase, "characters_total": book_chars,
                "characters_done": book_chars if len(self.done) == len(self.parts) else int(fraction * book_chars),
                "parts_total": len(self.parts), "parts_done": len(self.done), "segments_done": seg_done,
                "segments_total": max(seg_total, seg_done) if (known or not estimated) else None,
                "segments_total_estimated": estimated, "audio_seconds": round(audio_s, 3),
                "characters_per_second": None if rate is None else round(rate, 2),
                "eta_seconds": None if eta is None else round(eta, 1),
                "fraction": round(fraction, 4),
                "chapters": [c for c in chapters if c["parts"]]}


def chapter_marks(parts: list[Part], metas: dict[int, PartMeta], titles: list[str], gap_samples: int
                  ) -> tuple[list[ChapterMark], list[tuple[int, int]]]:
    """Chapter markers over the concatenated parts (a gap of silence closes every chapter but the last), and the
    layout as (part index or -1 for a gap, samples) in file order."""
    layout: list[tuple[int, int]] = []
    marks: list[ChapterMark] = []
    chapters = sorted({p.chapter for p in parts})
    position = 0
    for n, chapter in enumerate(chapters):
        start = position
        for p in parts:
            if p.chapter == chapter:
                layout.append((p.index, metas[p.index].samples))
                position += metas[p.index].samples
        if n + 1 < len(chapters) and gap_samples > 0:
            layout.append((-1, gap_samples))
            position += gap_samples
        marks.append(ChapterMark(titles[chapter], start, position))
    return marks, layout


class _Stop(Exception):
    """Why a job's task was cancelled: 'cancel' (DELETE), 'lost' (another worker holds it), 'shutdown'."""


class JobRunner:
    """The workers of this gateway process; `start()` inside the event loop, `stop()` at shutdown."""

    def __init__(self, store: JobStore, jobs_dir: str | os.PathLike, tts: Any, config: JobConfig,
                 on_change: Callable[[dict[str, int]], None] | None = None):
        self.store = store
        self.jobs_dir = Path(jobs_dir)
        self.tts = tts
        self.config = config
        self.on_change = on_change
        self._tasks: dict[str, asyncio.Task] = {}
        self._live: dict[str, LiveProgress] = {}
        self._stop_reason: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self._stopping = False
        self._recent_rate: float | None = None

    async def _db(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # --- lifecycle ----------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._loops = [asyncio.create_task(self._claim_loop(), name="jobs-claim"),
                       asyncio.create_task(self._heartbeat_loop(), name="jobs-heartbeat")]

    async def stop(self) -> None:
        """Stop every job and give it back to the queue, so the next gateway resumes it at once."""
        self._stopping = True
        for task in self._loops:
            task.cancel()
        tasks = list(self._tasks.values())
        for job_id in list(self._tasks):
            self._interrupt(job_id, "shutdown")
        await asyncio.gather(*self._loops, *tasks, return_exceptions=True)

    def wake(self) -> None:
        """A job was queued here: look for work now instead of at the next poll."""
        self._wake.set()

    # --- queries ------------------------------------------------------------------------------------------------------
    def live(self, job_id: str) -> dict[str, Any] | None:
        progress = self._live.get(job_id)
        return progress.snapshot() if progress is not None else None

    def running(self) -> list[str]:
        return list(self._tasks)

    def _interrupt(self, job_id: str, reason: str) -> asyncio.Task | None:
        """Cancel a job's task once, saying why (a second cancel could land inside its clean-up)."""
        task = self._tasks.get(job_id)
        if task is not None and job_id not in self._stop_reason:
            self._stop_reason[job_id] = reason
            task.cancel()
        return task

    async def cancel(self, job_id: str) -> bool:
        """Stop a job running here (its store row is already flagged); False when it does not run here."""
        task = self._interrupt(job_id, "cancel")
        if task is None:
            return False
        await asyncio.gather(task, return_exceptions=True)
        return True

    async def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(await self._db(self.store.counts))
            except TTSError as exc:
                log.warning("cannot count jobs: %s", exc)

    # --- loops --------------------------------------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        while not self._stopping:
            record = None
            if len(self._tasks) < self.config.max_jobs:
                try:
                    record = await self._db(self.store.claim, self.config.replica_id, self.config.stale_after_s)
                except TTSError as exc:
                    log.warning("cannot claim jobs: %s", exc)
            if record is not None:
                log.info("job %s claimed by %s (attempt %d)", record.id, self.config.replica_id, record.attempts)
                self._tasks[record.id] = asyncio.create_task(self._run(record), name=f"job-{record.id}")
                await self._changed()
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)
            except asyncio.TimeoutError:
                pass

    async def _heartbeat_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.heartbeat_s)
            for job_id in list(self._tasks):
                live = self._live.get(job_id)
                try:
                    record = await self._db(self.store.heartbeat, job_id, self.config.replica_id,
                                            live.snapshot() if live else None)
                except TTSError as exc:
                    log.warning("heartbeat of job %s failed: %s", job_id, exc)
                    continue
                if record is None and job_id in self._tasks:
                    # Not ours any more: finished by its own task a moment ago (leave it be), or claimed elsewhere.
                    try:
                        current = await self._db(self.store.get, job_id)
                    except TTSError:
                        continue
                    if current is not None and not current.terminal and current.claimed_by != self.config.replica_id:
                        log.warning("job %s is no longer ours (claimed by %s); stopping it here", job_id,
                                    current.claimed_by)
                        self._interrupt(job_id, "lost")
                elif record is not None and record.cancel_requested:
                    self._interrupt(job_id, "cancel")

    # --- one job ------------------------------------------------------------------------------------------------------
    async def _run(self, record: JobRecord) -> None:
        job_id = record.id
        files = JobFiles(self.jobs_dir, job_id)
        worker = self.config.replica_id
        try:
            await self._work(record, files)
        except asyncio.CancelledError:
            reason = self._stop_reason.get(job_id, "shutdown")
            live = self._live.get(job_id)
            try:
                if reason == "cancel":
                    await self._db(self.store.finish_cancel, job_id, worker)
                    await asyncio.to_thread(files.remove_parts)
                    log.info("job %s cancelled", job_id)
                elif reason == "shutdown":
                    released = await self._db(self.store.release, job_id, worker, live.snapshot() if live else None)
                    current = None if released else await self._db(self.store.get, job_id)
                    if current is not None and current.state == "succeeded" and not self.config.keep_parts:
                        await asyncio.to_thread(files.remove_parts)  # stopped between success and clean-up
            except TTSError as exc:
                log.warning("job %s: could not record that it stopped (%s)", job_id, exc)
        except TTSError as exc:
            log.warning("job %s failed: %s", job_id, exc.one_line())
            await self._fail(job_id, exc.one_line())
        except Exception as exc:  # noqa: BLE001 - a bug: the job fails, the gateway keeps serving
            log.exception("job %s failed unexpectedly", job_id)
            await self._fail(job_id, f"internal error: {type(exc).__name__}: {exc}. Fix: report it with the "
                                     "gateway log")
        finally:
            self._tasks.pop(job_id, None)
            self._live.pop(job_id, None)
            self._stop_reason.pop(job_id, None)
            if not self._stopping:
                self._wake.set()
                await self._changed()

    async def _fail(self, job_id: str, message: str) -> None:
        live = self._live.get(job_id)
        try:
            await self._db(self.store.update, job_id, self.config.replica_id, state="failed", error=message,
                           progress=live.snapshot() if live else None)
        except TTSError as exc:
            log.warning("job %s: could not record its failure (%s)", job_id, exc)

    async def _work(self, record: JobRecord, files: JobFiles) -> None:
        request = record.request
        fmt = job_format(request.get("format", "mp3"))
        chapters = await asyncio.to_thread(files.chapters)
        parts = await asyncio.to_thread(files.plan)
        if parts is None:
            limit = min(self.config.part_chars, int(await self.tts.max_text_chars()))
            parts = await asyncio.to_thread(files.write_plan, plan_parts(chapters, limit), limit)
        done = {p.index: m for p in parts if (m := files.finished_part(p)) is not None}
        live = LiveProgress(parts, chapters, done, self._recent_rate)
        self._live[record.id] = live
        await self._db(self.store.update, record.id, self.config.replica_id, progress=live.snapshot())
        if done:
            log.info("job %s resumes with %d of %d parts finished", record.id, len(done), len(parts))

        voice = await asyncio.to_thread(files.voice_audio)
        todo = [p for p in parts if p.index not in live.done]
        await self._synthesize(record, files, todo, voice, live)
        if live.rate() is not None:
            self._recent_rate = live.rate()

        live.phase = "encoding"
        await self._db(self.store.update, record.id, self.config.replica_id, state="encoding",
                       progress=live.snapshot())
        await self._changed()
        result = await asyncio.to_thread(self._encode, record, files, parts, live.done, fmt)
        live.phase = "done"
        progress = live.snapshot()
        progress["chapters"] = [dict(c, start_s=m["start_s"], duration_s=m["duration_s"])
                                for c, m in zip(progress["chapters"], result.pop("chapters"))]
        updated = await self._db(self.store.update, record.id, self.config.replica_id, state="succeeded",
                                 result=result, progress=progress)
        if updated is not None and not self.config.keep_parts:
            await asyncio.to_thread(files.remove_parts)
        log.info("job %s succeeded: %s, %.1f s of audio", record.id, result["file"], result["duration_s"])

    async def _synthesize(self, record: JobRecord, files: JobFiles, todo: list[Part], voice: bytes,
                          live: LiveProgress) -> None:
        queue: asyncio.Queue[Part] = asyncio.Queue()
        for part in todo:
            queue.put_nowait(part)
        speaker: dict[str, str | None] = {"id": None}

        async def lane() -> None:
            while True:
                try:
                    part = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                meta, pcm = await self._synthesize_part(record, part, voice, speaker, live)
                await asyncio.to_thread(files.write_part, part, pcm, meta)
                live.finish(meta)
                await self._db(self.store.update, record.id, self.config.replica_id, progress=live.snapshot())

        lanes = [asyncio.create_task(lane()) for _ in range(min(self.config.parts_in_flight, max(len(todo), 1)))]
        try:
            await asyncio.gather(*lanes)
        finally:
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)

    async def _synthesize_part(self, record: JobRecord, part: Part, voice: bytes, speaker: dict[str, str | None],
                               live: LiveProgress) -> tuple[PartMeta, np.ndarray]:
        request = record.request
        params = dict(request.get("params") or {})
        per_segment = request.get("max_text_tokens_per_segment")
        controls = Controls(**request["controls"]) if request.get("controls") else None
        waited, backoff = 0.0, self.config.retry_backoff_s
        while True:
            chunks: list[np.ndarray] = []
            sample_rate, segments, started = 0, 0, time.monotonic()
            speaker_id = speaker["id"]
            try:
                async for chunk in self.tts.stream(part.text, None if speaker_id else voice, speaker_id, params,
                                                   request_id=f"{record.id}.p{part.index}.a{record.attempts}",
                                                   max_text_tokens_per_segment=per_segment, controls=controls):
                    if sample_rate and chunk.sample_rate != sample_rate:
                        raise InputError("the server changed its sample rate within a request",
                                         "use a gateway and a server from the same triton-tts version")
                    sample_rate = chunk.sample_rate
                    chunks.append(np.asarray(chunk.pcm, dtype=np.int16).reshape(-1))
                    segments = max(segments, chunk.segment_count, chunk.segment_index + 1)
                    live.segment(part.index, min(chunk.segment_index + 1, chunk.segment_count),
                                 chunk.segment_count)
                    if chunk.speaker_id:
                        speaker["id"] = chunk.speaker_id
                break
            except RequestRejected as exc:
                live.reset(part.index)
                if speaker_id and UNKNOWN_SPEAKER_MARK in str(exc):
                    speaker["id"] = None  # the server forgot the voice: send the audio again
                    continue
                raise
            except _TRANSIENT as exc:
                live.reset(part.index)
                if waited >= self.config.retry_for_s:
                    raise
                wait = min(backoff, 30.0, self.config.retry_for_s - waited)
                log.warning("job %s part %d: %s; retrying in %.0f s", record.id, part.index, exc.one_line(), wait)
                await asyncio.sleep(wait)
                waited, backoff = waited + wait, backoff * 2
        if not sample_rate:
            raise InputError(f"the server sent no audio for part {part.index + 1}",
                             "check the server log; the text may have nothing to read")
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        meta = PartMeta(part.index, sample_rate, int(pcm.shape[0]), segments, len(part.text), text_digest(part.text),
                        record.attempts, round(time.monotonic() - started, 3))
        return meta, pcm

    def _encode(self, record: JobRecord, files: JobFiles, parts: list[Part], metas: dict[int, PartMeta],
                fmt: Any) -> dict[str, Any]:
        rates = {m.sample_rate for m in metas.values()}
        if len(rates) != 1:
            raise InputError(f"the job's parts have different sample rates ({sorted(rates)})",
                             "the server changed models during the job; submit it again")
        sample_rate = rates.pop()
        book = files.book()
        titles = [c["title"] for c in book["chapters"]]
        gap = int(round(self.config.chapter_gap_s * sample_rate))
        marks, layout = chapter_marks(parts, metas, titles, gap)

        def pcm():
            for index, samples in layout:
                yield np.zeros(samples, np.int16) if index < 0 else files.part_pcm(index)

        request = record.request
        tags = Tags(title=request.get("title") or book.get("title"), author=request.get("author") or book.get("author"),
                    language=book.get("language"), cover=files.cover())
        path = write_audiobook(files.result_path(fmt.extension), fmt, sample_rate, pcm(), marks, tags,
                               request.get("bitrate"))
        total = sum(samples for _, samples in layout)
        return {"file": path.name, "format": fmt.name, "media_type": fmt.media_type, "bytes": path.stat().st_size,
                "duration_s": round(total / sample_rate, 3), "sample_rate": sample_rate,
                "chapters": [{"title": m.title, "start_s": round(m.start / sample_rate, 3),
                              "duration_s": round((m.end - m.start) / sample_rate, 3)} for m in marks]}
