"""Our own load generator: closed-loop concurrent gRPC streams on `tritonclient.grpc.aio`.

Requests are built by client/request.py (`TTSRequest`) and responses parsed by client/session.py
(`parse_chunk`), so the benchmark speaks exactly the protocol users do. Each request gets its own bidirectional
stream; the request ends at the chunk flagged IS_LAST (the aio client cannot ask for Triton's empty final
response), and a response carrying an error ends it as a failure. `concurrency` workers each keep one request in
flight and take the next one from a shared, fixed list, so every run sends the same requests in the same order.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from client.errors import clean_server_message
from client.request import TTSRequest
from client.session import parse_chunk
from model_repository import contract as c
from perf.stats import RequestRecord

__all__ = ["LoadRequest", "LoadTarget", "Outcome", "run_level", "run_requests", "server_statistics",
           "process_tree_rss_mb", "RssSampler", "scrape_metrics", "MetricsSampler", "CancelRecord", "CancelRun",
           "run_cancel_level", "DECODER_GAUGES", "ChunkFacts"]


@dataclass(frozen=True)
class LoadRequest:
    """One request of a scenario; `request` is what goes on the wire."""

    scenario: str
    request: TTSRequest
    voice: str = ""  #: which reference audio (for the report)


@dataclass(frozen=True)
class LoadTarget:
    grpc_url: str
    model: str = c.STREAM_MODEL
    timeout_s: float = 600.0  #: longest wait for the next response of one request


@dataclass(frozen=True)
class ChunkFacts:
    """What one response says about the work behind it (INFO), for the sum-of-parts ceiling."""

    segment: int
    codes: int  #: codes this chunk's audio covers
    start: int = 0  #: chunked streaming: first code of the chunk within its segment (INFO code_range)
    available: int = 0  #: codes of the segment the server had when it vocoded the chunk (INFO codes_available)


@dataclass(frozen=True)
class Outcome:
    record: RequestRecord
    first_segment_text: str = ""  #: the server's text of segment 0 (INFO), for the first-segment-alone check
    codes: tuple[int, ...] = ()  #: codes per response (INFO)
    segment_codes: tuple[int, ...] = ()  #: codes per segment, all its chunks together: the work of two runs compares
    chunks: tuple[ChunkFacts, ...] = ()


def _chunk_facts(info: dict, segment: int) -> ChunkFacts:
    codes = int(info.get("codes", 0) or 0)
    rng = info.get("code_range")
    start = int(rng[0]) if isinstance(rng, (list, tuple)) and len(rng) == 2 else 0
    return ChunkFacts(segment, codes, start, int(info.get("codes_available", start + codes) or 0))


def _segment_codes(chunks: Sequence[ChunkFacts]) -> tuple[int, ...]:
    totals: dict[int, int] = {}
    for ch in chunks:
        totals[ch.segment] = totals.get(ch.segment, 0) + ch.codes
    return tuple(totals[k] for k in sorted(totals))


#: After the last chunk, how long to wait for Triton to close the call before cancelling it. A finished request is
#: never cancelled, so that the server's cancellation counters (which the cancellation level reads) count only
#: real cancellations. (The old BLS path crashed on a cancel between the last response and the final flag; the
#: concurrent path survived 100 such cancels at concurrency 4 on the tiny preset, so that is no longer the reason.)
_DRAIN_TIMEOUT_S = 30.0


async def _drain(iterator: Any, timeout_s: float) -> None:
    try:
        while True:
            await asyncio.wait_for(iterator.__anext__(), timeout=timeout_s)
    except (StopAsyncIteration, asyncio.TimeoutError):
        pass


def _cancel(stream: Any) -> None:
    try:
        stream.cancel()
    except Exception:
        pass


async def _one(client: Any, target: LoadTarget, item: LoadRequest, concurrency: int) -> Outcome:
    import tritonclient.grpc.aio as grpcaio

    inputs = item.request.infer_inputs(grpcaio.InferInput)
    done = asyncio.Event()

    async def requests():
        yield {"model_name": target.model, "inputs": inputs, "request_id": uuid.uuid4().hex}
        await done.wait()  # keep our side open until the last response: no half-closed stream surprises

    sent = time.perf_counter()
    first_audio: float | None = None
    samples, rate, segments, first_text, codes, chunks = 0, 0, 0, "", [], []
    error: str | None = None
    finished = sent
    stream = client.stream_infer(requests())
    try:
        iterator = stream.__aiter__()
        while True:
            try:
                result, err = await asyncio.wait_for(iterator.__anext__(), timeout=target.timeout_s)
            except asyncio.TimeoutError:
                error = f"no response for {target.timeout_s:g} s"
                break
            except StopAsyncIteration:
                error = error or "the stream ended before the last chunk"
                break
            now = time.perf_counter()
            if err is not None:
                error = clean_server_message(str(err)) or "server error"
                break
            chunk = parse_chunk(result.as_numpy, now, now - sent)
            samples += chunk.pcm16.size
            rate = chunk.sample_rate or rate
            segments = max(segments, chunk.segment_count)  # a segment may come in several chunks
            codes.append(int(chunk.info.get("codes", 0) or 0))
            chunks.append(_chunk_facts(chunk.info, chunk.segment_index))
            if chunk.segment_index == 0:
                first_text = str(chunk.info.get("text", ""))
            if first_audio is None and chunk.pcm16.size:
                first_audio = now - sent
            finished = now
            if chunk.is_last:
                break
        done.set()  # half-close: Triton ends the call once the request's final flag is through
        if error is None:
            await _drain(iterator, _DRAIN_TIMEOUT_S)
    except Exception as exc:  # a broken stream is a failed request, reported with the others
        error = clean_server_message(str(exc)) or type(exc).__name__
    finally:
        done.set()
        if error is not None:
            _cancel(stream)  # only a request that is still running on the server is cancelled
    record = RequestRecord(scenario=item.scenario, concurrency=concurrency, sent_at=sent, total_s=finished - sent,
                           first_audio_s=first_audio, audio_s=samples / rate if rate else 0.0, segments=segments,
                           error=error)
    return Outcome(record, first_text, tuple(codes), _segment_codes(chunks), tuple(chunks))


async def _level(target: LoadTarget, items: Sequence[LoadRequest], concurrency: int, count: int,
                 on_done: Callable[[int, Outcome], None] | None) -> list[Outcome]:
    import tritonclient.grpc.aio as grpcaio

    if concurrency < 1 or count < 1:
        raise ValueError("concurrency and count must be >= 1")
    outcomes: list[Outcome | None] = [None] * count
    next_index = 0
    client = grpcaio.InferenceServerClient(target.grpc_url)
    try:
        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                i = next_index
                next_index += 1
                outcome = await _one(client, target, items[i % len(items)], concurrency)
                outcomes[i] = outcome
                if on_done is not None:
                    on_done(i, outcome)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    finally:
        await client.close()
    return [o for o in outcomes if o is not None]


def run_level(target: LoadTarget, items: Sequence[LoadRequest], concurrency: int, count: int,
              on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """`count` requests (items cycled in order) with `concurrency` in flight; blocks until all are done."""
    if not items:
        raise ValueError("no requests to send")
    return asyncio.run(_level(target, items, concurrency, count, on_done))


def run_requests(target: LoadTarget, items: Sequence[LoadRequest]) -> list[Outcome]:
    """Each item once, one after another (warm-up, single-stream checks)."""
    return run_level(target, items, 1, len(items))


def server_statistics(grpc_url: str) -> dict:
    """Triton's cumulative per-model statistics (all models), as JSON."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(grpc_url) as client:
        return client.get_inference_statistics(as_json=True)


# ------------------------------------------------------------------------------------------- the metrics endpoint

_METRIC_LINE = re.compile(r"^(tts_[a-z0-9_]+)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN|[+-]Inf)$")


def scrape_metrics(metrics_url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Our tts_* metric families from Triton's Prometheus endpoint, summed over their labels (models); {} when the
    endpoint does not answer. (Not a restricted API: no admin header.)"""
    import urllib.request

    try:
        text = urllib.request.urlopen(metrics_url, timeout=timeout_s).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


#: What the decoder publishes per scheduler iteration (model_repository/models/decoder.py): the two gauges of
#: the batch (rows of the last step; live sequences) and the counters that say whether steps ran in between.
DECODER_GAUGES = ("tts_decoder_batch_rows", "tts_decoder_active_sequences", "tts_decoder_queued_sequences",
                  "tts_decoder_steps_total", "tts_generated_tokens_total")


@dataclass
class MetricsSampler:
    """Scrapes the metrics endpoint every `interval_s` in a thread: [(seconds since start, {metric: value})].

    The batch-rows gauge keeps the last step's value while the decoder idles; whether a step ran since the
    previous sample is read from tts_decoder_steps_total (perf.stats.batch_summary)."""

    metrics_url: str
    interval_s: float = 0.05
    names: tuple[str, ...] = DECODER_GAUGES
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    scrape_s: list[float] = field(default_factory=list)  #: how long each scrape took (the time resolution)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def sample(self) -> None:
        t = time.perf_counter()
        values = scrape_metrics(self.metrics_url)
        self.scrape_s.append(time.perf_counter() - t)
        if values:
            self.samples.append((t - self._t0, {k: values[k] for k in self.names if k in values}))

    def __enter__(self) -> "MetricsSampler":
        self._t0 = time.perf_counter()
        self.sample()

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()

        self._thread = threading.Thread(target=loop, daemon=True, name="metrics-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()


# ------------------------------------------------------------------------------------------ cancellation under load


@dataclass(frozen=True)
class CancelRecord:
    """One stream cancelled after its first chunk while the others kept the server busy. Times from the
    client's cancel; None: not seen within the timeout (or, for the decoder, no sequence of it was live)."""

    first_chunk_s: float | None  #: send -> first chunk
    to_decoder_s: float | None  #: cancel -> tts_decoder_sequences_cancelled_total increments (sequence freed)
    to_closed_s: float | None  #: cancel -> tts_requests_cancelled_total increments (the server closed the request)
    sequences_freed: int = 0  #: how many of its decoder sequences were cancelled
    error: str | None = None


@dataclass
class CancelRun:
    concurrency: int
    records: list[CancelRecord] = field(default_factory=list)
    load: list[Outcome] = field(default_factory=list)  #: the requests that kept the server busy meanwhile
    poll_s: list[float] = field(default_factory=list)  #: metrics scrape durations while watching


_DECODER_CANCELLED = "tts_decoder_sequences_cancelled_total"
_REQUESTS_CANCELLED = "tts_requests_cancelled_total"


async def _victim(client: Any, target: LoadTarget, item: LoadRequest, metrics_url: str, watch_s: float,
                  run: CancelRun) -> CancelRecord:
    """Send `item`, cancel it at its first chunk, watch the server's counters until both moved."""
    import tritonclient.grpc.aio as grpcaio

    loop = asyncio.get_running_loop()
    base = await loop.run_in_executor(None, scrape_metrics, metrics_url)
    inputs = item.request.infer_inputs(grpcaio.InferInput)
    done = asyncio.Event()

    async def requests():
        yield {"model_name": target.model, "inputs": inputs, "request_id": uuid.uuid4().hex}
        await done.wait()

    sent = time.perf_counter()
    stream = client.stream_infer(requests())
    first: float | None = None
    try:
        iterator = stream.__aiter__()
        result, err = await asyncio.wait_for(iterator.__anext__(), timeout=target.timeout_s)
        first = time.perf_counter() - sent
        if err is not None:
            return CancelRecord(first, None, None, error=clean_server_message(str(err)) or "server error")
        if parse_chunk(result.as_numpy, 0.0, first).is_last:
            done.set()
            await _drain(iterator, _DRAIN_TIMEOUT_S)
            return CancelRecord(first, None, None, error="the request ended at its first chunk: nothing to cancel")
    except Exception as exc:
        _cancel(stream)
        return CancelRecord(first, None, None, error=clean_server_message(str(exc)) or type(exc).__name__)
    cancelled_at = time.perf_counter()
    _cancel(stream)
    done.set()
    to_decoder = to_closed = None
    freed = 0
    while time.perf_counter() - cancelled_at < watch_s:
        t = time.perf_counter()
        now = await loop.run_in_executor(None, scrape_metrics, metrics_url)
        run.poll_s.append(time.perf_counter() - t)
        seen = time.perf_counter() - cancelled_at
        freed = int(now.get(_DECODER_CANCELLED, 0.0) - base.get(_DECODER_CANCELLED, 0.0))
        if to_decoder is None and freed > 0:
            to_decoder = seen
        if to_closed is None and now.get(_REQUESTS_CANCELLED, 0.0) > base.get(_REQUESTS_CANCELLED, 0.0):
            to_closed = seen
        if to_closed is not None and (to_decoder is not None or seen > 2.0):
            break  # closed with nothing freed in the decoder for a while: none of its sequences was live
        await asyncio.sleep(0.002)
    error = None if to_closed is not None else f"the server did not close the request within {watch_s:g} s"
    return CancelRecord(first, to_decoder, to_closed, freed, error)


async def _cancel_level(target: LoadTarget, load_items: Sequence[LoadRequest], victim: LoadRequest,
                        concurrency: int, victims: int, metrics_url: str, watch_s: float) -> CancelRun:
    import tritonclient.grpc.aio as grpcaio

    run = CancelRun(concurrency)
    stop = asyncio.Event()
    client = grpcaio.InferenceServerClient(target.grpc_url)
    next_index = 0
    try:
        async def load_worker() -> None:
            nonlocal next_index
            while not stop.is_set():
                i = next_index
                next_index += 1
                run.load.append(await _one(client, target, load_items[i % len(load_items)], concurrency))

        async def victim_worker() -> None:
            try:
                # Let the load streams get going first, so the first victim is cancelled under load too.
                await asyncio.sleep(0.5)
                for _ in range(victims):
                    run.records.append(await _victim(client, target, victim, metrics_url, watch_s, run))
            finally:
                stop.set()

        await asyncio.gather(victim_worker(), *(load_worker() for _ in range(max(0, concurrency - 1))))
    finally:
        await client.close()
    return run


def run_cancel_level(target: LoadTarget, load_items: Sequence[LoadRequest], victim: LoadRequest, concurrency: int,
                     victims: int, metrics_url: str, watch_s: float = 10.0) -> CancelRun:
    """`concurrency - 1` streams of `load_items` in a closed loop, and beside them `victims` requests of `victim`,
    one after another, each cancelled by the client at its first chunk; returns when the last victim is
    accounted for and the load requests then in flight have finished (none of them is cancelled)."""
    if concurrency < 1 or victims < 1 or not load_items:
        raise ValueError("concurrency and victims must be >= 1, with at least one load request")
    return asyncio.run(_cancel_level(target, load_items, victim, concurrency, victims, metrics_url, watch_s))


# ----------------------------------------------------------------------------------------- server resident memory


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (tritonserver + its Python-backend stubs), MiB."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / (1024.0 * 1024.0)


@dataclass
class RssSampler:
    """Samples a process tree's RSS every `interval_s` in a thread, with the time of each sample."""

    pid: int
    interval_s: float = 0.5
    samples: list[tuple[float, float]] = field(default_factory=list)  #: (perf_counter, MiB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> float:
        mb = process_tree_rss_mb(self.pid)
        self.samples.append((time.perf_counter(), mb))
        return mb

    def __enter__(self) -> "RssSampler":
        import psutil

        if not psutil.pid_exists(self.pid):
            raise ValueError(f"no process {self.pid}")

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()

        self.sample()
        self._thread = threading.Thread(target=loop, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()
