"""Our own load generator: closed-loop concurrent gRPC streams on `tritonclient.grpc.aio`.

Requests are built by client/request.py (`TTSRequest`) and responses parsed by client/session.py
(`parse_chunk`), so the benchmark speaks exactly the protocol users do. Each request gets its own bidirectional
stream; the request ends at the chunk flagged IS_LAST (the aio client cannot ask for Triton's empty final
response), and a response carrying an error ends it as a failure. `concurrency` workers each keep one request in
flight and take the next one from a shared, fixed list, so every run sends the same requests in the same order.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from client.errors import clean_server_message
from client.request import TTSRequest
from client.session import parse_chunk
from model_repository import contract as c
from perf.stats import RequestRecord

__all__ = ["LoadRequest", "LoadTarget", "Outcome", "run_level", "run_requests", "server_statistics",
           "process_tree_rss_mb", "RssSampler"]


@dataclass(frozen=True)
class LoadRequest:
    """One request of a scenario; `request` is what goes on the wire."""

    scenario: str
    request: TTSRequest
    voice: str = ""  #: which reference audio (for the report)


@dataclass(frozen=True)
class LoadTarget:
    grpc_url: str
    model: str = c.BLS_STREAM
    timeout_s: float = 600.0  #: longest wait for the next response of one request


@dataclass(frozen=True)
class Outcome:
    record: RequestRecord
    first_segment_text: str = ""  #: the server's text of segment 0 (INFO), for the first-segment-alone check
    codes: tuple[int, ...] = ()  #: codes per segment (INFO), to check that two runs did the same work


#: After the last chunk, how long to wait for Triton to close the call before cancelling it. Cancelling a
#: decoupled request between its last response and its final flag crashed tritonserver 2.51's Python backend
#: (SIGSEGV in libtriton_python.so) in our runs, so a finished request is never cancelled.
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
    samples, rate, segments, first_text, codes = 0, 0, 0, "", []
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
            segments += 1
            codes.append(int(chunk.info.get("codes", 0) or 0))
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
    return Outcome(record, first_text, tuple(codes))


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


# ----------------------------------------------------------------------------------------- server resident memory


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (tritonserver + its Python-backend stubs), MiB."""
    total_kb, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
        todo.extend(_children(p))
    return total_kb / 1024.0


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
        if not os.path.isdir(f"/proc/{self.pid}"):
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
