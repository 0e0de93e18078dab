"""One synthesis request from segments to audio chunks: the tts BLS models' logic, free of Triton.

The Triton models (`models/tts.py`) are thin adapters: they turn a request into a `SynthesisJob`, give this module
the three calls it needs (`Stages`: decode a segment, cancel a sequence, vocode latents) as coroutines, and send
what `synthesize` emits. Everything that decides order, overlap, cancellation and deadlines lives here, so it is
tested without a server (tests/test_orchestrator.py) and no lock is ever held across another model's work: many
requests run side by side on one event loop, each awaiting its own calls.

Per request: a window of segments decodes at once (the first one alone when streaming, so that the first audio
comes as early as possible); segment i is vocoded as soon as it and every segment before it are decoded, while
later ones keep decoding; chunks are emitted in order. Cancellation and the deadline are checked every
`poll_s` while waiting; on either, every in-flight sequence is cancelled in the decoder and awaited.

Families: a segment's audio is `Stages.vocode(latents)` (IndexTTS 1.x), or `Stages.segment_audio(...)` when the
stages define it (IndexTTS-2: s2mel needs the codes, the segment's seed and a cancellable diffusion call; a
cancelled request cancels that call too). `SynthesisJob.interval_silence` zeros end every segment but the last
(IndexTTS-2's 200 ms), so the chunks add up to upstream's joined utterance and a player has the pause in hand
while the next segment is made.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Protocol

import numpy as np

from engine_ref.errors import TTSError
from engine_ref.finishing import segment_warnings
from engine_ref.params import GenerationParams, segment_seed


class Cancelled(Exception):
    """The client cancelled the request (or disconnected)."""


class DeadlineExceeded(TTSError):
    """The request ran past its time limit."""


class StageError(TTSError):
    """Another model answered with an error; its message already names the problem and the fix."""

    def one_line(self) -> str:
        return self.problem


@dataclass(frozen=True)
class Segment:
    index: int
    ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Speaker:
    """Conditioning of one reference voice, as the decoder and vocoder take it (cached per audio hash)."""

    key: str
    conds: np.ndarray
    speaker_embedding: np.ndarray
    seconds: float
    trimmed: bool


@dataclass(frozen=True)
class SynthesisJob:
    segments: tuple[Segment, ...]
    speaker: Speaker
    params: GenerationParams
    seed: int
    stream: bool = True
    warnings: tuple[str, ...] = ()  # request-level warnings (trimmed reference, replaced bytes, ...)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    interval_silence: int | None = None  # zero samples after every segment but the last (None: the options')


@dataclass(frozen=True)
class DecodeResult:
    codes: np.ndarray  # [N] int64 (after silence removal)
    latents: np.ndarray  # [N, D]
    stopped: bool
    cancelled: bool = False
    generated: int = 0
    offset: int = 0  # chunked streaming: index of codes[0] in the segment
    partial: bool = False  # chunked streaming: more parts follow


@dataclass(frozen=True)
class ChunkPlan:
    """Chunked streaming of a segment: chunk k covers codes [b_(k-1), b_k), b_1 = first, sizes doubling up to
    `max_codes`. A chunk is vocoded with `left` latents before and `right` after it (the vocoder's context, measured
    at export) and only its own samples are kept, so the chunks add up to the segment vocoded whole."""

    first: int
    max_codes: int
    left: int
    right: int
    samples_per_latent: int

    def boundaries(self, limit: int) -> list[int]:
        out, pos, size = [], 0, self.first
        while pos < limit:
            pos = min(pos + size, limit)
            out.append(pos)
            size = min(2 * size, self.max_codes)
        return out

    def stream_at(self, limit: int) -> list[int]:
        """Code counts at which the decoder should send what it has: each chunk's end plus the look-ahead."""
        return [min(b + self.right, limit) for b in self.boundaries(limit)]


@dataclass(frozen=True)
class Chunk:
    pcm: np.ndarray  # int16
    index: int  # segment index (-1: a whole non-streamed utterance)
    count: int  # segments
    last: bool  # the utterance's last chunk
    info: dict
    chunk: int = 0  # chunk index within the segment
    segment_done: bool = True  # the segment's last chunk
    sample_offset: int = 0  # where pcm starts in the utterance


@dataclass(frozen=True)
class Summary:
    audio_seconds: float
    first_audio_s: float | None
    total_s: float


class Stages(Protocol):
    """The calls a synthesis makes into other models (each a coroutine; errors raise TTSError)."""

    async def decode(self, seq_id: str, speaker: Speaker, segment: Segment, params: GenerationParams,
                     seed: int) -> DecodeResult: ...

    async def cancel(self, seq_id: str) -> None: ...

    def decode_parts(self, seq_id: str, speaker: Speaker, segment: Segment, params: GenerationParams, seed: int,
                     stream_at: list[int]) -> AsyncIterator[DecodeResult]:
        """Chunked streaming: partial results (partial=True) as the decoder reaches each count, then the rest."""
        ...

    async def vocode(self, latents: np.ndarray, speaker: Speaker) -> np.ndarray: ...

    # Optional (IndexTTS-2): a segment's int16 audio from its whole decoder result; used instead of vocode when
    # defined. `seed` is the request's seed; seq_id names the segment in cancellable downstream calls.
    # async def segment_audio(self, seq_id: str, speaker: Speaker, segment: Segment, result: DecodeResult,
    #                         seed: int) -> np.ndarray: ...


@dataclass(frozen=True)
class OrchestratorOptions:
    segments_in_flight: int = 4
    request_timeout_s: float = 600.0
    poll_s: float = 0.02  # how often cancellation and the deadline are checked while waiting
    sample_rate: int = 24000
    interval_silence: int = 0  # zero samples between segments (IndexTTS2: 200 ms)


class _Run:
    """The state of one request's synthesis (one instance per request; never shared)."""

    def __init__(self, job: SynthesisJob, stages: Stages, opts: OrchestratorOptions,
                 is_cancelled: Callable[[], bool], clock: Callable[[], float], plan: ChunkPlan | None = None):
        self.job, self.stages, self.opts, self.plan = job, stages, opts, plan
        self.is_cancelled, self.clock = is_cancelled, clock
        self.start = clock()
        self.deadline = self.start + opts.request_timeout_s
        self.tasks: dict[int, asyncio.Task] = {}
        self.parts: dict[int, asyncio.Queue] = {}
        self.next_submit = 0
        self.samples = 0  # utterance samples emitted so far
        self.aborting = False

    def seq_id(self, index: int) -> str:
        return f"{self.job.request_id}-{index}"

    @property
    def gap(self) -> int:
        g = self.job.interval_silence
        return self.opts.interval_silence if g is None else g

    def _with_gap(self, pcm: np.ndarray, index: int) -> np.ndarray:
        """Segment audio plus the interval silence, except after the utterance's last segment."""
        if self.gap <= 0 or index == len(self.job.segments) - 1:
            return pcm
        return np.concatenate([np.asarray(pcm, np.int16), np.zeros(self.gap, np.int16)])

    def _segment_audio(self, index: int, result: DecodeResult) -> Awaitable[np.ndarray]:
        audio = getattr(self.stages, "segment_audio", None)
        if audio is None:
            return self.stages.vocode(result.latents, self.job.speaker)
        return audio(self.seq_id(index), self.job.speaker, self.job.segments[index], result, self.job.seed)

    def _submit_up_to(self, window: int) -> None:
        segs = self.job.segments
        while self.next_submit < len(segs) and len(self.tasks) < window:
            i = self.next_submit
            args = (self.seq_id(i), self.job.speaker, segs[i], self.job.params, segment_seed(self.job.seed, i))
            if self.plan is None:
                self.tasks[i] = asyncio.ensure_future(self.stages.decode(*args))
            else:
                self.parts[i] = asyncio.Queue()
                self.tasks[i] = asyncio.ensure_future(self._pump(
                    self.stages.decode_parts(*args, self.plan.stream_at(self.job.params.max_mel_tokens)), self.parts[i]))
                self.tasks[i].add_done_callback(self._decoded)
            self.next_submit += 1

    @staticmethod
    async def _pump(parts: AsyncIterator[DecodeResult], queue: asyncio.Queue) -> None:
        """Move a segment's decoder parts into its queue (the consumer may still be on an earlier segment)."""
        async for part in parts:
            await queue.put(part)

    def _decoded(self, task: asyncio.Task) -> None:
        """A segment left the decoder: the next ones start decoding now, not when its audio has been sent."""
        if not task.cancelled() and task.exception() is None and not self.aborting:
            self._submit_up_to(self.opts.segments_in_flight)

    def _check(self) -> None:
        if self.is_cancelled():
            raise Cancelled()
        if self.clock() > self.deadline:
            raise DeadlineExceeded(f"the request took longer than {self.opts.request_timeout_s:g} s",
                                   "send shorter text or raise request_timeout_s")

    async def _await(self, aw: Awaitable):
        """Await a call while watching cancellation and the deadline."""
        fut = asyncio.ensure_future(aw)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=self.opts.poll_s)
                if done:
                    return fut.result()
                self._check()
        except BaseException:
            if not fut.done():
                fut.cancel()
            raise

    async def abort(self) -> None:
        """Cancel every in-flight sequence in the decoder and wait for their calls to end."""
        self.aborting = True
        pending = {i: t for i, t in self.tasks.items() if not t.done()}
        if pending:
            await asyncio.gather(*(self.stages.cancel(self.seq_id(i)) for i in pending), return_exceptions=True)
            # The decoder answers a cancelled sequence within one step; do not wait forever for a broken one.
            _, late = await asyncio.wait(set(pending.values()), timeout=10.0)
            for t in late:
                t.cancel()
        for t in self.tasks.values():
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: no "exception was never retrieved" noise
        self.tasks.clear()

    async def run(self, emit: Callable[[Chunk], Awaitable[None]]) -> Summary:
        if self.plan is not None:
            return await self.run_chunked(emit)
        job, opts = self.job, self.opts
        n = len(job.segments)
        warnings = list(job.warnings)
        audio_samples = 0
        first_audio: float | None = None
        for index in range(n):
            window = 1 if (index == 0 and job.stream) else opts.segments_in_flight
            self._submit_up_to(window)
            self._check()
            result: DecodeResult = await self._await(self.tasks[index])
            del self.tasks[index]
            if result.cancelled:
                raise Cancelled()
            self._submit_up_to(opts.segments_in_flight)  # keep decoding while this segment is vocoded
            seg_warnings = segment_warnings(index, len(result.codes), result.stopped, job.params.max_mel_tokens)
            if len(result.codes):
                pcm = await self._await(self._segment_audio(index, result))
            else:
                pcm = np.zeros(0, np.int16)
            if first_audio is None and pcm.size:
                first_audio = self.clock() - self.start
            pcm = self._with_gap(pcm, index)
            audio_samples += int(pcm.size)
            warnings.extend(seg_warnings)
            info = {"segment": index, "text": job.segments[index].text, "codes": int(len(result.codes)),
                    "stopped": bool(result.stopped), "warnings": seg_warnings, "seed": job.seed}
            last = index == n - 1
            if last:
                total = self.clock() - self.start
                audio_s = audio_samples / opts.sample_rate
                info["timings"] = {"ttfa_s": first_audio, "total_s": total, "audio_s": audio_s,
                                   "rtf": total / audio_s if audio_s else None}
                info["all_warnings"] = warnings
            await emit(Chunk(pcm, index, n, last, info, sample_offset=audio_samples - int(pcm.size)))
        return Summary(audio_samples / opts.sample_rate, first_audio, self.clock() - self.start)

    async def run_chunked(self, emit: Callable[[Chunk], Awaitable[None]]) -> Summary:
        """Chunked streaming: each segment's audio goes out in chunks as its codes arrive (see ChunkPlan)."""
        job, opts, plan = self.job, self.opts, self.plan
        assert plan is not None
        n = len(job.segments)
        self.warnings = list(job.warnings)
        self.first_audio: float | None = None
        for index in range(n):
            self._submit_up_to(1 if index == 0 else opts.segments_in_flight)
            queue = self.parts[index]
            seg = _SegmentChunks(index, plan.boundaries(job.params.max_mel_tokens))
            while not seg.done:
                part: DecodeResult = await self._await(queue.get())
                if part.cancelled:
                    raise Cancelled()
                seg.add(part)
                if seg.done:
                    self._submit_up_to(opts.segments_in_flight)  # the next segments decode while this one ends
                while not seg.done and seg.bounds and seg.bounds[0] + plan.right <= seg.available:
                    end = seg.bounds.pop(0)
                    if end > seg.start:
                        await self._emit_chunk(seg, end, emit)
            await self._emit_chunk(seg, seg.available, emit)  # the rest, flagged as the segment's last chunk
            del self.tasks[index]
            del self.parts[index]
        return Summary(self.samples / opts.sample_rate, self.first_audio, self.clock() - self.start)

    async def _emit_chunk(self, seg: "_SegmentChunks", end: int, emit: Callable[[Chunk], Awaitable[None]]) -> None:
        job, opts, plan = self.job, self.opts, self.plan
        assert plan is not None
        spl, start = plan.samples_per_latent, seg.start
        if end > start:
            lat = np.concatenate(seg.latents)
            lo, hi = max(0, start - plan.left), min(seg.available, end + plan.right)
            wave = await self._await(self.stages.vocode(lat[lo:hi], job.speaker))
            pcm = wave[(start - lo) * spl:(end - lo) * spl]
        else:
            pcm = np.zeros(0, np.int16)
        final = seg.done and end == seg.available
        if self.first_audio is None and pcm.size:
            self.first_audio = self.clock() - self.start
        if final:
            pcm = self._with_gap(pcm, seg.index)
        seg_warnings = []
        if final:
            seg_warnings = segment_warnings(seg.index, seg.available, seg.stopped, job.params.max_mel_tokens)
            self.warnings.extend(seg_warnings)
        n = len(job.segments)
        info = {"segment": seg.index, "chunk": seg.chunk, "text": job.segments[seg.index].text, "codes": end - start,
                "code_range": [start, end], "codes_available": seg.available, "warnings": seg_warnings,
                "seed": job.seed}
        if final:
            info.update(stopped=seg.stopped, segment_codes=seg.available)
        last = final and seg.index == n - 1
        if last:
            total = self.clock() - self.start
            audio_s = (self.samples + pcm.size) / opts.sample_rate
            info["timings"] = {"ttfa_s": self.first_audio, "total_s": total, "audio_s": audio_s,
                               "rtf": total / audio_s if audio_s else None}
            info["all_warnings"] = self.warnings
        await emit(Chunk(pcm, seg.index, n, last, info, chunk=seg.chunk, segment_done=final,
                         sample_offset=self.samples))
        self.samples += int(pcm.size)
        seg.chunk += 1
        seg.start = end


class _SegmentChunks:
    """What one segment has received from the decoder and sent out so far (chunked streaming)."""

    def __init__(self, index: int, bounds: list[int]):
        self.index, self.bounds = index, bounds
        self.latents: list[np.ndarray] = []
        self.available = 0  # codes (and latents) received
        self.start = 0  # first code not yet sent as audio
        self.chunk = 0
        self.done = False
        self.stopped = True

    def add(self, part: DecodeResult) -> None:
        if part.offset != self.available:
            raise StageError(f"gpt_decoder sent codes from {part.offset}, expected {self.available}",
                             "check the server log")
        if len(part.codes):
            self.latents.append(np.asarray(part.latents, np.float32))
        self.available += len(part.codes)
        if not part.partial:
            self.done, self.stopped = True, bool(part.stopped)


async def synthesize(job: SynthesisJob, stages: Stages, emit: Callable[[Chunk], Awaitable[None]],
                     is_cancelled: Callable[[], bool] = lambda: False,
                     opts: OrchestratorOptions = OrchestratorOptions(),
                     clock: Callable[[], float] = time.perf_counter, plan: ChunkPlan | None = None) -> Summary:
    """Decode and vocode every segment of `job`, emitting chunks in order; raises Cancelled / TTSError.

    `plan` set: chunked streaming (several chunks per segment as codes arrive), else one chunk per segment.
    Whatever ends the request early (cancellation, deadline, an error in any stage, an error while emitting),
    every sequence it still has in the decoder is cancelled before this returns.
    """
    if not job.segments:
        raise TTSError("the text produced no segments", "send text with at least one word")
    run = _Run(job, stages, opts, is_cancelled, clock, plan)
    try:
        return await run.run(emit)
    except BaseException:
        await asyncio.shield(run.abort())
        raise


def merge_chunks(chunks: list[Chunk]) -> Chunk:
    """The single response of a non-streaming request: all audio, the last chunk's info plus every segment's."""
    last = chunks[-1]
    info = dict(last.info)
    info["segments"] = [ch.info for ch in chunks]
    return Chunk(np.concatenate([ch.pcm for ch in chunks]), -1, last.count, True, info, sample_offset=0)
