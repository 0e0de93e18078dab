"""`TritonTTS`: the gateway's only way to Triton — one gRPC bidirectional stream per request on a shared channel.

tritonclient's asyncio client multiplexes every request over one HTTP/2 channel, so concurrent speech requests
and job parts run side by side without a thread or a connection each. A request is the contract's tensors
(client/request.py builds them, so the gateway and the Python client can never disagree), sent with
``triton_enable_empty_final_response``: the server sends one response per segment and then an empty response
flagged final, which is how the end is known without guessing.

Cancellation is the consumer's: closing the async iterator (``aclose()``), or cancelling the task that iterates
it (a client disconnecting from a streaming response), cancels the gRPC call, and the server stops the request's
sequences in the decoder within one step. Errors arrive as the project's `ServerError` subclasses
(client/errors.py) carrying the model's own one-line message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

import numpy as np

from client.errors import ProtocolError, ServerTimeout, ServerUnavailable, from_server_error
from client.request import Controls, TTSRequest
from client.session import is_final_response, parse_chunk
from model_repository import contract as c

__all__ = ["AudioChunk", "TritonTTS", "UNKNOWN_SPEAKER_MARK"]

#: Part of the server's message when a SPEAKER_ID is not (or no longer) in its cache (models/tts.py).
UNKNOWN_SPEAKER_MARK = "is not in this server's cache"
_FINAL_FLAG = {"triton_enable_empty_final_response": True}


@dataclass(frozen=True)
class AudioChunk:
    """One segment's audio as the server sent it."""

    pcm: np.ndarray  #: int16 mono samples
    sample_rate: int
    segment_index: int
    segment_count: int  #: segments of this request (known from the first chunk on)
    is_last: bool
    info: dict[str, Any] = field(default_factory=dict)  #: the server's INFO JSON (segment text, warnings, timings)
    speaker_id: str = ""  #: send it back as speaker_id to reuse the voice while the server caches it
    arrived_at: float = 0.0  #: time.perf_counter() when the response arrived

    @property
    def seconds(self) -> float:
        return self.pcm.shape[0] / self.sample_rate if self.sample_rate else 0.0


class TritonTTS:
    """Async synthesis against a triton-tts server; create and use it inside one event loop."""

    def __init__(self, url: str, model: str = c.STREAM_MODEL, timeout_s: float = 120.0,
                 connect_timeout_s: float = 10.0):
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._client: Any = None
        self._text_limit: int | None = None
        self._entry_params: dict[str, str] | None = None

    def _grpc(self) -> Any:
        if self._client is None:
            import tritonclient.grpc.aio as aio

            self._client = aio.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> "TritonTTS":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- health and discovery ---------------------------------------------------------------------------------------
    async def ready(self) -> bool:
        """The server is up and the streaming model is ready."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self._grpc().is_model_ready(self.model, client_timeout=self.connect_timeout_s))
        except (InferenceServerException, OSError, asyncio.TimeoutError):
            return False

    async def models(self) -> list[str]:
        """The entry models (`tts`, `tts_offline`) that are ready; [] when the server cannot be reached."""
        from tritonclient.utils import InferenceServerException

        out = []
        for name in c.ENTRY_MODELS:
            try:
                if await self._grpc().is_model_ready(name, client_timeout=self.connect_timeout_s):
                    out.append(name)
            except (InferenceServerException, OSError, asyncio.TimeoutError):
                continue
        return out

    async def max_text_chars(self) -> int:
        """The server's text limit per request (`preprocess`'s max_text_chars), asked once; the contract's default
        when it cannot be read."""
        if self._text_limit is None:
            from tritonclient.utils import InferenceServerException

            try:
                cfg = (await self._grpc().get_model_config(c.PREPROCESS,
                                                           client_timeout=self.connect_timeout_s)).config
                raw = cfg.parameters["max_text_chars"].string_value if "max_text_chars" in cfg.parameters else ""
                self._text_limit = int(raw) if int(raw or 0) > 0 else c.DEFAULT_MAX_TEXT_CHARS
            except (InferenceServerException, OSError, ValueError, asyncio.TimeoutError):
                return c.DEFAULT_MAX_TEXT_CHARS
        return self._text_limit

    async def _entry_parameters(self) -> dict[str, str] | None:
        """The entry model's config parameters (what the served family accepts), asked once; None while the config
        cannot be read (asked again next time)."""
        if self._entry_params is None:
            from tritonclient.utils import InferenceServerException

            try:
                cfg = (await self._grpc().get_model_config(self.model, client_timeout=self.connect_timeout_s)).config
            except (InferenceServerException, OSError, asyncio.TimeoutError):
                return None
            self._entry_params = {k: v.string_value for k, v in cfg.parameters.items()}
        return self._entry_params

    async def text_emotion(self) -> bool | None:
        """Whether the served family takes an emotion described in words (EMO_TEXT; IndexTTS-2). A repository
        older than the parameter is IndexTTS 1.x: False. None when the config cannot be read now (the request then
        carries EMO_TEXT and a 1.x server refuses it by name)."""
        params = await self._entry_parameters()
        if params is None:
            return None
        return params.get("text_emotion", "0").strip() not in ("", "0", "false", "False")

    async def languages(self) -> tuple[str, ...] | None:
        """The LANGUAGE values the served family takes (IndexTTS-2.5 requires one; () where the family has no such
        input); None when the config cannot be read now (the request then goes as given and the server judges)."""
        params = await self._entry_parameters()
        if params is None:
            return None
        return tuple(x for x in params.get("languages", "").split(",") if x)

    # --- synthesis --------------------------------------------------------------------------------------------------
    async def stream(self, text: str, voice_audio: bytes | None = None, speaker_id: str | None = None,
                     params: Mapping[str, Any] | None = None, request_id: str = "",
                     max_text_tokens_per_segment: int | None = None,
                     controls: Controls | None = None) -> AsyncIterator[AudioChunk]:
        """Chunks of one request as they arrive (one per segment). `params`: GenerationOverrides fields
        (temperature, top_p, top_k, repetition_penalty, num_beams, max_mel_tokens, seed, do_sample).

        Input errors the client can see without the server (empty text, no voice, a wrong type) raise InputError
        before anything is sent; the server's refusals raise RequestRejected with its message.
        """
        import grpc
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        request = TTSRequest.build(text, voice_audio, speaker_id, dict(params or {}), max_text_tokens_per_segment,
                                   controls=controls)
        inputs = request.infer_inputs(grpcclient.InferInput)
        request_id = request_id or uuid.uuid4().hex
        answered = asyncio.Event()

        async def requests() -> AsyncIterator[dict]:
            yield {"model_name": self.model, "inputs": inputs, "request_id": request_id, "parameters": _FINAL_FLAG}
            await answered.wait()  # keep our side open until the server has said everything

        call = self._grpc().stream_infer(requests())
        finished = False
        sent = time.perf_counter()
        try:
            while True:
                try:
                    result, error = await asyncio.wait_for(call.__anext__(), self.timeout_s)
                except StopAsyncIteration:
                    raise ProtocolError(f"model {self.model!r} at {self.url} ended the stream without its final "
                                        "response", "use a gateway and a server from the same triton-tts version")
                except asyncio.TimeoutError:
                    raise ServerTimeout(f"model {self.model!r} at {self.url} sent nothing for {self.timeout_s:g} s",
                                        "raise the gateway's request_timeout_s if segments take that long, "
                                        "otherwise check the server's health and logs") from None
                except grpc.RpcError as exc:
                    raise _rpc_error(exc, self.model, self.url) from None
                except InferenceServerException as exc:
                    raise from_server_error(exc, model=self.model, url=self.url) from None
                if error is not None:
                    raise from_server_error(error, model=self.model, url=self.url)
                arrived = time.perf_counter()
                response = result.get_response()
                final = is_final_response(response)
                if response.outputs:
                    chunk = parse_chunk(result.as_numpy, arrived, arrived - sent)
                    yield AudioChunk(pcm=chunk.pcm16, sample_rate=chunk.sample_rate,
                                     segment_index=chunk.segment_index, segment_count=chunk.segment_count,
                                     is_last=chunk.is_last, info=chunk.info, speaker_id=chunk.speaker_id,
                                     arrived_at=arrived)
                if final:
                    finished = True
                    return
        finally:
            answered.set()
            if not finished:
                call.cancel()  # the consumer left, an error, a timeout: stop the server's work for this request


def _rpc_error(exc: Any, model: str, url: str) -> Exception:
    """A grpc.aio error raised while reading the stream, as the client's ServerError subclass."""
    from tritonclient.grpc._utils import get_error_grpc

    try:
        wrapped = get_error_grpc(exc)
    except Exception:  # noqa: BLE001 - a transport error without the usual accessors
        return ServerUnavailable(f"cannot reach a Triton server at {url} ({type(exc).__name__})",
                                 "start the server (triton-tts serve) or pass the right host:port")
    return from_server_error(wrapped, model=model, url=url)
