"""The per-request orchestration without Triton: overlap, order, cancellation, deadlines and errors."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from engine_ref.errors import InputError
from engine_ref.params import GenerationParams
from model_repository.orchestrator import (Cancelled, DeadlineExceeded, DecodeResult, OrchestratorOptions, Segment,
                                           Speaker, StageError, SynthesisJob, merge_chunks, synthesize)

SPEAKER = Speaker("spk", np.zeros((32, 8), np.float32), np.zeros((4, 1), np.float32), 1.0, False)


class FakeStages:
    """Decoding takes `decode_s` per segment (all concurrently, like the batching decoder), vocoding `vocode_s`."""

    def __init__(self, decode_s: float = 0.05, vocode_s: float = 0.01, fail_decode: set[int] = frozenset(),
                 fail_vocode: bool = False, codes: int = 3, stagger: bool = False):
        self.decode_s, self.vocode_s, self.stagger = decode_s, vocode_s, stagger
        self.fail_decode, self.fail_vocode, self.codes = fail_decode, fail_vocode, codes
        self.live: set[str] = set()
        self.peak = 0
        self.cancelled: list[str] = []
        self.decoded: list[str] = []
        self._stop: dict[str, asyncio.Event] = {}

    async def decode(self, seq_id, speaker, segment, params, seed):
        self.live.add(seq_id)
        self.peak = max(self.peak, len(self.live))
        stop = self._stop.setdefault(seq_id, asyncio.Event())
        try:
            try:
                await asyncio.wait_for(stop.wait(), self.decode_s * ((segment.index + 1) if self.stagger else 1))
                return DecodeResult(np.zeros(0, np.int64), np.zeros((0, 8), np.float32), False, cancelled=True)
            except asyncio.TimeoutError:
                pass
            if segment.index in self.fail_decode:
                raise StageError(f"decoder exploded on segment {segment.index}")
            self.decoded.append(seq_id)
            n = self.codes
            return DecodeResult(np.arange(n), np.full((n, 8), segment.index, np.float32), True, generated=n + 1)
        finally:
            self.live.discard(seq_id)

    async def cancel(self, seq_id):
        self.cancelled.append(seq_id)
        self._stop.setdefault(seq_id, asyncio.Event()).set()

    async def vocode(self, latents, speaker):
        await asyncio.sleep(self.vocode_s)
        if self.fail_vocode:
            raise StageError("vocoder exploded")
        return np.full(10 * len(latents), int(latents[0, 0]), np.int16)


def job(n: int, stream: bool = True, **kw) -> SynthesisJob:
    segs = tuple(Segment(i, (5, 6, 7), f"segment {i}") for i in range(n))
    return SynthesisJob(segs, SPEAKER, GenerationParams.greedy(), seed=7, stream=stream, **kw)


def run(coro):
    return asyncio.run(coro)


def collect(j: SynthesisJob, stages, **kw):
    chunks = []

    async def emit(ch):
        chunks.append(ch)

    summary = run(synthesize(j, stages, emit, **kw))
    return chunks, summary


def test_chunks_come_in_order_with_segment_metadata_and_timings():
    stages = FakeStages()
    chunks, summary = collect(job(5), stages, opts=OrchestratorOptions(segments_in_flight=3, sample_rate=10))
    assert [c.index for c in chunks] == list(range(5)) and [c.last for c in chunks] == [False] * 4 + [True]
    assert [int(c.pcm[0]) for c in chunks] == list(range(5))  # each chunk is its own segment's audio
    assert chunks[-1].info["timings"]["audio_s"] == pytest.approx(15.0) and summary.audio_seconds == 15.0
    merged = merge_chunks(chunks)
    assert merged.index == -1 and merged.pcm.size == 150 and len(merged.info["segments"]) == 5


def test_first_segment_alone_when_streaming_then_a_window():
    stages = FakeStages()
    collect(job(6), stages, opts=OrchestratorOptions(segments_in_flight=3))
    assert stages.peak == 3
    first = FakeStages()

    async def go():
        chunks = []

        async def emit(ch):
            chunks.append((ch.index, set(first.live)))

        await synthesize(job(4), first, emit, opts=OrchestratorOptions(segments_in_flight=3))
        return chunks

    seen = run(go())
    # While the first segment decoded nothing else did; after it the window fills.
    assert first.decoded[0].endswith("-0") and len(seen[0][1]) >= 1


def test_many_requests_run_side_by_side():
    """Eight requests of 4 segments with 50 ms decodes take about one request's time, not eight."""
    stages = FakeStages(decode_s=0.1)

    async def all_of_them():
        async def one(i):
            out = []

            async def emit(ch):
                out.append(ch)

            await synthesize(job(4, request_id=f"r{i}"), stages, emit, opts=OrchestratorOptions(segments_in_flight=4))
            return out

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(8)))
        return results, time.perf_counter() - t0

    results, wall = run(all_of_them())
    assert all(len(r) == 4 for r in results)
    assert stages.peak >= 8 and wall < 1.2  # serialized it would be 8 x (0.1 + 0.3) s


def test_cancellation_cancels_every_in_flight_sequence():
    stages = FakeStages(decode_s=5.0)
    flag = {"cancel": False}

    async def go():
        async def emit(ch):
            pass

        task = asyncio.ensure_future(synthesize(job(6, stream=False, request_id="rq"), stages, emit,
                                                is_cancelled=lambda: flag["cancel"],
                                                opts=OrchestratorOptions(segments_in_flight=4, poll_s=0.01)))
        await asyncio.sleep(0.1)
        flag["cancel"] = True
        t0 = time.perf_counter()
        with pytest.raises(Cancelled):
            await task
        return time.perf_counter() - t0

    took = run(go())
    assert took < 0.5
    assert sorted(stages.cancelled) == [f"rq-{i}" for i in range(4)] and not stages.live


def test_deadline_and_stage_errors_abort_and_name_the_problem():
    stages = FakeStages(decode_s=5.0)
    with pytest.raises(DeadlineExceeded, match="longer than 0.2 s"):
        collect(job(3), stages, opts=OrchestratorOptions(request_timeout_s=0.2, poll_s=0.01))
    assert stages.cancelled and not stages.live

    failing = FakeStages(fail_decode={2})
    with pytest.raises(StageError, match="segment 2"):
        collect(job(5, stream=False), failing, opts=OrchestratorOptions(segments_in_flight=5))
    assert not failing.live

    with pytest.raises(StageError, match="vocoder"):
        collect(job(3), FakeStages(fail_vocode=True))


def test_an_error_while_emitting_cancels_the_rest():
    stages = FakeStages(decode_s=0.3, stagger=True)

    async def go():
        async def emit(ch):
            raise ConnectionError("client went away")

        with pytest.raises(ConnectionError):
            await synthesize(job(4, stream=False, request_id="e"), stages, emit,
                             opts=OrchestratorOptions(segments_in_flight=4, poll_s=0.01))

    run(go())
    assert set(stages.cancelled) == {"e-1", "e-2", "e-3"} and not stages.live


def test_silent_segments_and_cut_segments_warn():
    stages = FakeStages(codes=0)
    chunks, _ = collect(job(2), stages)
    assert chunks[0].pcm.size == 0 and "no speech codes" in chunks[0].info["warnings"][0]
    assert any("no speech codes" in w for w in chunks[-1].info["all_warnings"])


def test_empty_job_is_refused():
    with pytest.raises(Exception, match="no segments"):
        collect(job(0), FakeStages())
    with pytest.raises(InputError):
        GenerationParams(temperature=0.0).validate(100)
