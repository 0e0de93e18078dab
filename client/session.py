"""`TTSClient`: synthesis over Triton's gRPC stream (chunk per segment) or HTTP (whole utterance per request).

Streaming uses one bidirectional gRPC stream per request with ``enable_empty_final_response``: the server sends
one response per segment and then an empty response flagged ``triton_final_response``, which is how the client
knows the request is over without guessing. Closing the iterator early (or Ctrl-C) cancels the request on the
server (``stop_stream(cancel_requests=True)``), which stops its sequences in the decoder within one step.

Texts longer than one request allows (the server's max_text_chars, read once from the `preprocess` model's
config, or `ClientConfig.max_request_chars`) are split at paragraph and sentence ends (client/longform.py) and
sent as consecutive requests; the chunks come back in text order either way.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from client.errors import ProtocolError, ServerError, ServerTimeout, from_server_error
from client.longform import split_text
from client.request import Controls, ParamsLike, TTSRequest, VoiceSource
from engine_ref.errors import InputError
from model_repository import contract as c

__all__ = ["ClientConfig", "Chunk", "Timings", "SynthesisResult", "SynthesisStream", "TTSClient", "parse_chunk",
           "is_final_response"]

_VERSION_FIX = "use a client and a server from the same triton-tts version"
_FINAL_PARAM = "triton_final_response"


@dataclass(frozen=True)
class ClientConfig:
    """Where the server is and how long to wait for it."""

    grpc_url: str = "localhost:8001"
    http_url: str = "localhost:8000"
    #: Longest wait for the next response (gRPC) or for the whole response of one request (HTTP). A segment
    #: must be generated within it, so it bounds a hung server without cutting off long syntheses.
    timeout_s: float = 120.0
    connect_timeout_s: float = 10.0
    #: Texts longer than this are sent as several requests. None: the server's max_text_chars (the
    #: `preprocess` model's config parameter, asked once per client; contract default if it cannot be read).
    max_request_chars: int | None = None

    def __post_init__(self) -> None:
        for name in ("grpc_url", "http_url"):
            url = getattr(self, name)
            if not isinstance(url, str) or not url or "://" in url or url.startswith("/"):
                raise InputError(f"{name}={url!r} is not a host:port address",
                                 "pass host:port without a scheme, e.g. localhost:8001")
        for name in ("timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name}={getattr(self, name)!r} must be positive", "pass a number of seconds > 0")
        if self.max_request_chars is not None and (not isinstance(self.max_request_chars, int)
                                                   or self.max_request_chars < 1):
            raise InputError(f"max_request_chars={self.max_request_chars!r} must be a positive integer",
                             f"use the server's max_text_chars (default {c.DEFAULT_MAX_TEXT_CHARS})")


@dataclass(frozen=True)
class Chunk:
    """One response's audio: a segment (streaming) or a whole request part (HTTP, segment_index -1)."""

    pcm16: np.ndarray  #: int16 mono samples
    sample_rate: int
    segment_index: int
    segment_count: int  #: segments of this request part (known from the first chunk on)
    is_last: bool  #: the last chunk of this request part
    speaker_id: str  #: send it as speaker_id to reuse this voice without re-sending the audio
    info: dict[str, Any]  #: the server's INFO JSON (segment text, codes, warnings, timings)
    arrived_at: float  #: time.perf_counter() when the response arrived
    elapsed_s: float  #: since this request part was sent
    part_index: int = 0  #: which request of a text split by `ClientConfig.max_request_chars`
    part_count: int = 1
    chunk_index: int = 0  #: chunked streaming: the chunk's number within its segment
    segment_done: bool = True  #: the last chunk of its segment
    sample_offset: int = 0  #: where pcm16 starts in this request part's audio

    @property
    def seconds(self) -> float:
        return self.pcm16.shape[0] / self.sample_rate if self.sample_rate else 0.0


@dataclass(frozen=True)
class Timings:
    first_audio_s: float | None  #: request sent -> first non-empty audio chunk (None: no audio yet)
    total_s: float  #: request sent -> last response (or now, while running)
    audio_s: float

    @property
    def rtf(self) -> float | None:
        """Real-time factor: wall time / audio duration (below 1 is faster than real time)."""
        return self.total_s / self.audio_s if self.audio_s > 0 else None


@dataclass(frozen=True)
class SynthesisResult:
    pcm16: np.ndarray
    sample_rate: int
    speaker_id: str
    segment_count: int
    infos: tuple[dict[str, Any], ...]
    timings: Timings

    @property
    def seconds(self) -> float:
        return self.pcm16.shape[0] / self.sample_rate if self.sample_rate else 0.0


@dataclass
class _Clock:
    """Wall-clock bookkeeping of one job (all its request parts), fed by the response threads' timestamps."""

    sent_at: float | None = None
    first_audio_at: float | None = None
    finished_at: float | None = None
    samples: int = 0
    sample_rate: int = 0

    def mark_sent(self) -> float:
        now = time.perf_counter()
        if self.sent_at is None:
            self.sent_at = now
        self.finished_at = None  # a further request part is running
        return now

    def add(self, chunk: Chunk) -> None:
        if chunk.pcm16.size and self.first_audio_at is None:
            self.first_audio_at = chunk.arrived_at
        self.samples += int(chunk.pcm16.size)
        self.sample_rate = chunk.sample_rate or self.sample_rate

    def timings(self) -> Timings:
        if self.sent_at is None:
            return Timings(None, 0.0, 0.0)
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        first = None if self.first_audio_at is None else self.first_audio_at - self.sent_at
        audio = self.samples / self.sample_rate if self.sample_rate else 0.0
        return Timings(first, end - self.sent_at, audio)


class SynthesisStream(Iterator[Chunk]):
    """Chunks in text order; the request is sent on the first `next()`. `timings` is live while iterating.

    Closing it (``close()``, leaving a ``with`` block, or dropping it mid-way) cancels what the server has not
    sent yet.
    """

    def __init__(self, chunks: Callable[[_Clock], Iterator[Chunk]]):
        self._clock = _Clock()
        self._chunks = chunks(self._clock)

    def __iter__(self) -> "SynthesisStream":
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def __enter__(self) -> "SynthesisStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]  # a generator: runs its cancel/cleanup

    @property
    def timings(self) -> Timings:
        return self._clock.timings()

    def collect(self) -> SynthesisResult:
        """Consume the rest and return the whole utterance (memory grows with the audio)."""
        pieces, infos, speaker, rate = [], [], "", 0
        segments: dict[int, int] = {}  # request part -> its segment count
        with self:
            for chunk in self:
                pieces.append(chunk.pcm16)
                infos.append(chunk.info)
                speaker, rate = chunk.speaker_id or speaker, chunk.sample_rate or rate
                segments[chunk.part_index] = chunk.segment_count
        pcm = np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
        return SynthesisResult(pcm, rate, speaker, sum(segments.values()), tuple(infos), self.timings)


# ------------------------------------------------------------------------------------------- response parsing


def _scalar(arr: np.ndarray) -> Any:
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise ProtocolError(f"a response output holds {flat.size} values where the contract has one", _VERSION_FIX)
    return flat[0]


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, np.bytes_)) else str(value)


def parse_chunk(as_numpy: Callable[[str], np.ndarray | None], arrived_at: float, elapsed_s: float,
                part_index: int = 0, part_count: int = 1) -> Chunk:
    """A `Chunk` from one response (`as_numpy` of a grpc or http InferResult); contract violations ->
    `ProtocolError` naming the output."""

    def need(f: c.Field) -> np.ndarray:
        arr = as_numpy(f.name)
        if arr is None:
            raise ProtocolError(f"a response of the server lacks the {f.name} output", _VERSION_FIX)
        return arr

    audio = np.asarray(need(c.AUDIO)).reshape(-1)
    if audio.dtype != np.int16:
        raise ProtocolError(f"AUDIO arrived as {audio.dtype}, the contract says int16", _VERSION_FIX)
    raw_info = _text(_scalar(need(c.INFO))).strip()
    try:
        info = json.loads(raw_info) if raw_info else {}
    except json.JSONDecodeError:
        raise ProtocolError(f"INFO is not JSON: {raw_info[:80]!r}", _VERSION_FIX) from None
    if not isinstance(info, dict):
        raise ProtocolError(f"INFO is JSON {type(info).__name__}, the contract says an object", _VERSION_FIX)
    def optional(f: c.Field, default: Any) -> Any:  # outputs newer than some servers
        arr = as_numpy(f.name)
        return default if arr is None else _scalar(arr)

    return Chunk(
        pcm16=audio, sample_rate=int(_scalar(need(c.SAMPLE_RATE))),
        segment_index=int(_scalar(need(c.SEGMENT_INDEX))), segment_count=int(_scalar(need(c.SEGMENT_COUNT))),
        is_last=bool(_scalar(need(c.IS_LAST))), speaker_id=_text(_scalar(need(c.SPEAKER_ID_OUT))), info=info,
        arrived_at=arrived_at, elapsed_s=elapsed_s, part_index=part_index, part_count=part_count,
        chunk_index=int(optional(c.CHUNK_INDEX, 0)), segment_done=bool(optional(c.SEGMENT_DONE, True)),
        sample_offset=int(optional(c.SAMPLE_OFFSET, 0)),
    )


def is_final_response(response: Any) -> bool:
    """Whether a ModelInferResponse carries Triton's final flag (sent when enable_empty_final_response is on)."""
    params = response.parameters
    return _FINAL_PARAM in params and bool(params[_FINAL_PARAM].bool_param)


# ---------------------------------------------------------------------------------------------------- client

_TEXT_LIMIT_PARAM = "max_text_chars"  # a config parameter of the `preprocess` model (model_repository/builder.py)


def _read_text_limit(config: ClientConfig, http: bool, pool: "_GrpcPool") -> int | None:
    """`preprocess`'s max_text_chars from the server's model config; None when it cannot be read."""
    from tritonclient.utils import InferenceServerException

    try:
        if http:
            import tritonclient.http as httpclient

            with httpclient.InferenceServerClient(config.http_url, connection_timeout=config.connect_timeout_s,
                                                  network_timeout=config.connect_timeout_s) as client:
                params = client.get_model_config(c.PREPROCESS).get("parameters", {})
            raw = params.get(_TEXT_LIMIT_PARAM, {}).get("string_value", "")
        else:
            client = pool.acquire()
            try:
                cfg = client.get_model_config(c.PREPROCESS, client_timeout=config.connect_timeout_s).config
            finally:
                pool.release(client, reusable=True)
            raw = cfg.parameters[_TEXT_LIMIT_PARAM].string_value if _TEXT_LIMIT_PARAM in cfg.parameters else ""
        limit = int(raw)
    except (InferenceServerException, OSError, ValueError, KeyError, AttributeError):
        return None  # an older server, no access to the config, unreachable: use the default
    return limit if limit > 0 else None


@dataclass
class _GrpcPool:
    """Idle gRPC clients (a tritonclient client runs one stream at a time; keeping them keeps channels warm)."""

    url: str
    idle: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self) -> Any:
        import tritonclient.grpc as grpcclient

        with self.lock:
            if self.idle:
                return self.idle.pop()
        return grpcclient.InferenceServerClient(self.url)

    def release(self, client: Any, reusable: bool) -> None:
        if reusable:
            with self.lock:
                self.idle.append(client)
        else:
            client.close()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for client in idle:
            client.close()


class TTSClient:
    """Synthesis against a triton-tts server. Thread-safe: concurrent streams use separate gRPC clients."""

    def __init__(self, config: ClientConfig | None = None):
        self.config = config or ClientConfig()
        self._grpc = _GrpcPool(self.config.grpc_url)
        self._text_limit: int | None = self.config.max_request_chars

    def __enter__(self) -> "TTSClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._grpc.close()

    # --- public API -----------------------------------------------------------------------------------------------
    def synthesize_stream(self, text: str, reference_audio: VoiceSource | None = None, speaker_id: str | None = None,
                          params: ParamsLike = None, max_text_tokens_per_segment: int | None = None,
                          model: str = c.STREAM_MODEL, request_id: str | None = None,
                          controls: Controls | None = None) -> SynthesisStream:
        """Stream the speech of `text` over gRPC, one `Chunk` per segment, in text order.

        `params`: only the fields set are sent (`GenerationOverrides`, a dict, or a full `GenerationParams`).
        `model`: the streaming entry model (`tts`). `controls`: chunk sizes and IndexTTS-2's emotion inputs.
        Errors arrive as `TTSError` subclasses (client/errors.py) carrying the server model's own one-line message.
        """
        requests = self._requests(text, reference_audio, speaker_id, params, max_text_tokens_per_segment,
                                  controls=controls)
        rid = request_id or uuid.uuid4().hex

        def chunks(clock: _Clock) -> Iterator[Chunk]:
            for i, request in enumerate(requests):
                yield from self._grpc_part(request, model, f"{rid}-{i}" if len(requests) > 1 else rid, clock,
                                           i, len(requests))

        return SynthesisStream(chunks)

    def synthesize_parts(self, text: str, reference_audio: VoiceSource | None = None, speaker_id: str | None = None,
                         params: ParamsLike = None, max_text_tokens_per_segment: int | None = None,
                         model: str = c.OFFLINE_MODEL, request_id: str | None = None,
                         controls: Controls | None = None) -> SynthesisStream:
        """Over HTTP (non-streaming): one `Chunk` per request, so a long text is written part by part."""
        requests = self._requests(text, reference_audio, speaker_id, params, max_text_tokens_per_segment, http=True,
                                  controls=controls)
        rid = request_id or uuid.uuid4().hex

        def chunks(clock: _Clock) -> Iterator[Chunk]:
            for i, request in enumerate(requests):
                chunk = self._http_part(request, model, f"{rid}-{i}" if len(requests) > 1 else rid, clock,
                                        i, len(requests))
                clock.add(chunk)
                clock.finished_at = chunk.arrived_at
                yield chunk

        return SynthesisStream(chunks)

    def synthesize(self, text: str, reference_audio: VoiceSource | None = None, speaker_id: str | None = None,
                   params: ParamsLike = None, max_text_tokens_per_segment: int | None = None,
                   model: str = c.OFFLINE_MODEL, request_id: str | None = None,
                   controls: Controls | None = None) -> SynthesisResult:
        """The whole utterance over HTTP (model `tts_offline`), with timings."""
        return self.synthesize_parts(text, reference_audio, speaker_id, params, max_text_tokens_per_segment,
                                     model, request_id, controls).collect()

    def server_ready(self, model: str | None = None) -> bool:
        """Whether the server (and `model`, when given) is ready; False when unreachable."""
        from tritonclient.utils import InferenceServerException

        client = self._grpc.acquire()
        try:
            ok = client.is_server_ready(client_timeout=self.config.connect_timeout_s)
            ok = ok and (model is None or client.is_model_ready(model, client_timeout=self.config.connect_timeout_s))
        except InferenceServerException:
            self._grpc.release(client, reusable=False)
            return False
        self._grpc.release(client, reusable=True)
        return bool(ok)

    # --- internals ------------------------------------------------------------------------------------------------
    def _requests(self, text: str, reference_audio: VoiceSource | None, speaker_id: str | None, params: ParamsLike,
                  max_text_tokens_per_segment: int | None, http: bool = False,
                  controls: Controls | None = None) -> list[TTSRequest]:
        """Validate once, read the voice once, and split a long text into request-sized parts."""
        first = TTSRequest.build(text, reference_audio, speaker_id, params, max_text_tokens_per_segment,
                                 controls=controls)
        limit = self._max_request_chars(http)
        if len(text) <= limit:
            return [first]
        parts = split_text(text, limit)
        if not parts:
            raise InputError("the text has nothing speakable (no letters or digits)", "pass words to speak")
        return [dataclasses.replace(first, text=part) for part in parts]

    def _max_request_chars(self, http: bool) -> int:
        """The server's text limit per request: asked once and kept; the contract's default when unreadable."""
        if self._text_limit is None:
            limit = _read_text_limit(self.config, http, self._grpc)
            if limit is None:
                return c.DEFAULT_MAX_TEXT_CHARS
            self._text_limit = limit
        return self._text_limit

    def _grpc_part(self, request: TTSRequest, model: str, request_id: str, clock: _Clock, part: int,
                   parts: int) -> Iterator[Chunk]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        url, timeout = self.config.grpc_url, self.config.timeout_s
        responses: queue.SimpleQueue = queue.SimpleQueue()

        def on_response(result: Any, error: Any) -> None:
            responses.put((result, error, time.perf_counter()))

        inputs = request.infer_inputs(grpcclient.InferInput)
        client = self._grpc.acquire()
        finished = False
        try:
            try:
                client.start_stream(callback=on_response)
                sent = clock.mark_sent()
                client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
            except InferenceServerException as exc:
                # A stream that died at once (server unreachable) reports why through the callback; the enqueue
                # error only says "no longer in valid state". Prefer the reason.
                try:
                    _, reported, _ = responses.get(timeout=0.5)
                except queue.Empty:
                    reported = None
                raise from_server_error(reported or exc, model=model, url=url) from None
            received = 0
            while True:
                try:
                    result, error, arrived = responses.get(timeout=timeout)
                except queue.Empty:
                    raise ServerTimeout(
                        f"model {model!r} at {url} sent nothing for {timeout:g} s ({received} response(s) so far)",
                        "raise --timeout if segments take that long, otherwise check the server's health and logs",
                    ) from None
                if error is not None:
                    raise from_server_error(error, model=model, url=url)
                received += 1
                response = result.get_response()
                final = is_final_response(response)
                if response.outputs:
                    chunk = parse_chunk(result.as_numpy, arrived, arrived - sent, part, parts)
                    clock.add(chunk)
                    if final:
                        clock.finished_at = arrived
                        finished = True
                    yield chunk
                if final:
                    clock.finished_at = arrived
                    finished = True
                    return
        finally:
            # A finished request closes gracefully (the client stays reusable); anything else — an error, a
            # timeout, the consumer closing the iterator, Ctrl-C — cancels what is still running on the server.
            try:
                client.stop_stream(cancel_requests=not finished)
            finally:
                self._grpc.release(client, reusable=finished)

    def _http_part(self, request: TTSRequest, model: str, request_id: str, clock: _Clock, part: int,
                   parts: int) -> Chunk:
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        url = self.config.http_url
        inputs = request.infer_inputs(httpclient.InferInput)
        outputs = [httpclient.InferRequestedOutput(f.name, binary_data=True) for f in c.RESPONSE_OUTPUTS]
        try:
            client = httpclient.InferenceServerClient(url, connection_timeout=self.config.connect_timeout_s,
                                                      network_timeout=self.config.timeout_s)
        except InferenceServerException as exc:
            raise from_server_error(exc, model=model, url=url) from None
        try:
            sent = clock.mark_sent()
            result = client.infer(model, inputs, outputs=outputs, request_id=request_id)
            arrived = time.perf_counter()
            return parse_chunk(result.as_numpy, arrived, arrived - sent, part, parts)
        except ServerError:
            raise
        except (InferenceServerException, OSError) as exc:
            raise from_server_error(exc, model=model, url=url) from None
        finally:
            client.close()
