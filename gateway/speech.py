"""`POST /v1/audio/speech` (OpenAI-compatible) and `GET /v1/models`.

A request becomes one Triton stream (several, in text order, when the input is longer than the server's
max_text_chars). The route waits for the first segment before answering, so everything that goes wrong before
any audio exists — bad parameters, an unreachable server, an unknown voice — is an error JSON with its status
instead of a 200 with a truncated body. From then on each segment is encoded as it arrives (PyAV, in a worker
thread so the event loop keeps serving other streams) and sent at once:

- ``stream_format=audio``: the encoded bytes (a streamable container; see gateway/audio.py).
- ``stream_format=sse``: ``data: {"type": "speech.audio.delta", "audio": <base64>}`` events, then
  ``data: {"type": "speech.audio.done", "usage": {...}}``. A failure after the first audio is an
  ``{"type": "error", "error": {...}}`` event (the status line has been sent by then).

``speed``: the served IndexTTS 1.x has no duration control, so speed != 1 is a pitch-preserving time stretch of
the output (libavfilter atempo). ``instructions`` (emotion from text) goes to the server as EMO_TEXT when the
served family takes it (IndexTTS-2; the repository's `text_emotion` parameter says so); for IndexTTS 1.x a
non-empty value is a 400 that says so. Voices: a stored voice's name or id (or {"id": ...});
the route sends the server's speaker id when one is remembered for the voice and falls back to the audio when
the server no longer knows it.

Generation parameters beyond OpenAI's (temperature, top_p, top_k, repetition_penalty, num_beams,
max_mel_tokens, seed, do_sample, max_text_tokens_per_segment) are accepted as extra body fields
(``extra_body=`` in the openai SDK); only those given are sent, the server owns the defaults. So are IndexTTS-2.5's
``language`` (required by it: a request without one gets the gateway's default_language, else a 400; see
gateway/controls.py) and ``duration_factor`` (0.5-2.0, its native length control).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from client.request import Controls
from client.errors import RequestRejected
from client.longform import split_text
from engine_ref.errors import InputError, TTSError
from model_repository import contract as c

from gateway.audio import FORMATS, StreamEncoder, TimeStretch, output_rate
from gateway.auth import Principal, require_key
from gateway.controls import family_controls
from gateway.errors import APIError, from_tts_error
from gateway.triton import UNKNOWN_SPEAKER_MARK, AudioChunk, TritonTTS
from gateway.voices import Voice, VoiceNotFound, VoiceStore

__all__ = ["router", "SpeechRequest", "parse_speech_request", "OPENAI_MODEL_ALIASES", "synthesize_chunks"]

log = logging.getLogger("gateway.speech")
router = APIRouter()

#: OpenAI's model names, accepted for the served model so code written for OpenAI only changes base_url.
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")
_OPENAI_FIELDS = ("model", "input", "voice", "instructions", "response_format", "speed", "stream_format")
_EXTRA_FIELDS = (*c.PARAMS, "max_text_tokens_per_segment", "language", "duration_factor")
_STREAM_FORMATS = ("audio", "sse")


@dataclass(frozen=True)
class SpeechRequest:
    model: str
    input: str
    voice: str
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    instructions: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    max_text_tokens_per_segment: int | None = None
    language: str | None = None  # IndexTTS-2.5's LANGUAGE
    duration_factor: float | None = None  # IndexTTS-2.5's DURATION_FACTOR


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError.bad_request(message, param=param, code=code)


def parse_speech_request(body: Any, served_model: str, max_text_chars: int) -> SpeechRequest:
    """Check a request body field by field; every problem is an APIError naming the field (param) and the fix."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object. Fix: send {\"model\": ..., \"input\": ..., "
                   "\"voice\": ...}", "body")
    unknown = sorted(set(body) - set(_OPENAI_FIELDS) - set(_EXTRA_FIELDS))
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(unknown)}. Fix: use only {', '.join(_OPENAI_FIELDS)} and the "
                   f"generation parameters {', '.join(_EXTRA_FIELDS)}", unknown[0], "unknown_parameter")
    for name in ("model", "input", "voice"):
        if name not in body or body[name] in (None, ""):
            raise _bad(f"{name} is required. Fix: pass {name}", name, "missing_required_parameter")
    model = body["model"]
    if not isinstance(model, str):
        raise _bad("model must be a string. Fix: pass the id from GET /v1/models", "model")
    if model != served_model and model not in OPENAI_MODEL_ALIASES:
        raise APIError(404, f"the model {model!r} does not exist here. Fix: use {served_model!r} (GET /v1/models) "
                            f"or one of OpenAI's names {', '.join(OPENAI_MODEL_ALIASES)}",
                       param="model", code="model_not_found")
    text = body["input"]
    if not isinstance(text, str):
        raise _bad("input must be a string. Fix: pass the text to speak", "input")
    if not text.strip():
        raise _bad("input is empty. Fix: pass at least one word to speak", "input")
    if len(text) > max_text_chars:
        raise APIError.too_large(f"input has {len(text)} characters, more than this gateway's limit of "
                                 f"{max_text_chars}. Fix: split the text, or submit it as a job "
                                 "(POST /v1/audio/jobs)", param="input")
    voice = body["voice"]
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice:
        raise _bad("voice must be a stored voice's name or id, or {\"id\": ...}. Fix: list them with "
                   "GET /v1/audio/voices", "voice")
    fmt = body.get("response_format") or "mp3"
    if fmt not in FORMATS:
        raise _bad(f"response_format {fmt!r} is not supported. Fix: use one of {', '.join(FORMATS)}",
                   "response_format")
    stream_format = body.get("stream_format") or "audio"
    if stream_format not in _STREAM_FORMATS:
        raise _bad(f"stream_format {stream_format!r} is not supported. Fix: use audio or sse", "stream_format")
    speed = body.get("speed", 1.0)
    if speed is None:
        speed = 1.0
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) \
            or not 0.25 <= speed <= 4.0:
        raise _bad(f"speed={speed!r} is out of range. Fix: pass a number from 0.25 to 4.0", "speed")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions must be a string", "instructions")
    language, duration_factor = parse_family_fields(body)
    params = {name: body[name] for name in c.PARAMS if body.get(name) is not None}
    mtt = body.get("max_text_tokens_per_segment")
    try:
        from client.request import GenerationOverrides

        GenerationOverrides.of(params)  # types and representability; the server checks ranges
    except InputError as exc:
        name = next((n for n in params if n in exc.problem), next(iter(params), "params"))
        raise _bad(exc.one_line(), name) from None
    if mtt is not None and (isinstance(mtt, bool) or not isinstance(mtt, int) or mtt < 1):
        raise _bad(f"max_text_tokens_per_segment={mtt!r} must be a positive integer. Fix: use e.g. "
                   f"{c.DEFAULT_MAX_TEXT_TOKENS_PER_SEGMENT}", "max_text_tokens_per_segment")
    return SpeechRequest(model=model, input=text, voice=voice, response_format=fmt, speed=float(speed),
                         stream_format=stream_format, instructions=(instructions or "").strip() or None,
                         params=params, max_text_tokens_per_segment=mtt, language=language,
                         duration_factor=duration_factor)


def parse_family_fields(body: dict[str, Any]) -> tuple[str | None, float | None]:
    """(language, duration_factor) of a request or job body, type-checked (form fields arrive as strings);
    whether the served family takes them is gateway/controls.py's question."""
    language = body.get("language")
    if language in (None, ""):
        language = None
    elif not isinstance(language, str) or not language.strip() or len(language) > 16:
        raise _bad(f"language={language!r} must be a language code. Fix: pass e.g. en", "language")
    factor = body.get("duration_factor")
    if factor in (None, ""):
        return language, None
    if isinstance(factor, str):
        try:
            factor = float(factor)
        except ValueError:
            raise _bad(f"duration_factor={factor[:40]!r} is not a number. Fix: pass e.g. 1.2",
                       "duration_factor") from None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
            or not 0.5 <= factor <= 2.0:
        raise _bad(f"duration_factor={factor!r} is out of range. Fix: pass a number from 0.5 to 2.0 (IndexTTS-2.5)",
                   "duration_factor")
    return language, float(factor)


# ------------------------------------------------------------------------------------------------ synthesis


async def synthesize_chunks(triton: TritonTTS, voices: VoiceStore, voice: Voice, text: str,
                            params: dict[str, Any] | None = None, max_text_tokens_per_segment: int | None = None,
                            request_id: str = "", controls: Controls | None = None) -> AsyncIterator[AudioChunk]:
    """Every chunk of `text` in `voice`, in order (texts over the server's limit go as consecutive requests).

    Sends the remembered speaker id when there is one; when the server does not know it any more, resends the
    voice's audio (before any audio of that part was produced, so nothing is duplicated) and remembers the new id.
    Closing the iterator cancels the request in flight.
    """
    limit = await triton.max_text_chars()
    parts = [text] if len(text) <= limit else split_text(text, limit)
    if not parts:
        raise InputError("the text has nothing speakable (no letters or digits)", "pass words to speak")
    for number, part in enumerate(parts):
        rid = f"{request_id or uuid.uuid4().hex}-{number}" if len(parts) > 1 else (request_id or uuid.uuid4().hex)
        speaker_id = voices.speaker_id(voice)
        attempts = [speaker_id, None] if speaker_id else [None]
        for attempt, sid in enumerate(attempts):
            audio = None if sid else voice.audio_bytes()
            stream = triton.stream(part, audio, sid, params, rid, max_text_tokens_per_segment, controls)
            try:
                async for chunk in stream:
                    if chunk.speaker_id and chunk.speaker_id != sid:
                        voices.remember_speaker_id(voice, chunk.speaker_id)
                    yield chunk
                break
            except RequestRejected as exc:
                if sid and UNKNOWN_SPEAKER_MARK in exc.problem and attempt + 1 < len(attempts):
                    voices.remember_speaker_id(voice, None)
                    log.info("server forgot speaker id of voice %s; resending its audio", voice.id)
                    continue
                raise
            finally:
                await stream.aclose()


@dataclass
class _Usage:
    characters: int
    codes: int = 0
    segments: int = 0
    audio_s: float = 0.0

    def body(self) -> dict[str, int]:
        # The server reports the GPT's speech codes per segment (output tokens) but not the text token count:
        # input_tokens counts the input's characters.
        return {"input_tokens": self.characters, "output_tokens": self.codes,
                "total_tokens": self.characters + self.codes}


class _Pipeline:
    """Chunk PCM -> (time stretch) -> encoder bytes, in worker threads one call at a time. The lock makes
    `close()` (the event loop, when a response is cancelled) wait for an encode still running in a worker: libav
    state must never be freed under a running encoder."""

    def __init__(self, fmt: str, sample_rate: int, speed: float):
        self._lock = threading.Lock()
        self.encoder = StreamEncoder(fmt, sample_rate)
        self.stretch = TimeStretch(sample_rate, speed) if abs(speed - 1.0) > 1e-9 else None

    def feed(self, pcm) -> bytes:
        with self._lock:
            if self.stretch is not None:
                pcm = self.stretch.process(pcm)
            return self.encoder.encode(pcm)

    def finish(self) -> bytes:
        with self._lock:
            tail = b""
            if self.stretch is not None:
                tail = self.encoder.encode(self.stretch.flush())
            return tail + self.encoder.finish()

    def close(self) -> None:
        with self._lock:
            self.encoder.close()


@router.post("/v1/audio/speech")
async def create_speech(request: Request, principal: Principal = Depends(require_key)):
    state = request.app.state
    received = time.perf_counter()
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad("the request body is not valid JSON. Fix: send a JSON object", "body") from None
    req = parse_speech_request(body, state.settings.model_id, state.settings.max_text_chars)
    try:
        voice = state.voices.get(req.voice)
    except VoiceNotFound as exc:
        raise APIError.not_found(exc.one_line(), param="voice", code="voice_not_found") from None
    except InputError as exc:
        raise _bad(exc.one_line(), "voice") from None

    controls = await family_controls(state.triton, state.settings, instructions=req.instructions,
                                     language=req.language, duration_factor=req.duration_factor)
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    chunks = synthesize_chunks(state.triton, state.voices, voice, req.input, req.params,
                               req.max_text_tokens_per_segment, request_id, controls)
    try:
        first = await chunks.__anext__()  # errors before any audio keep their status
    except StopAsyncIteration:
        raise APIError(502, "the server finished without sending audio. Fix: check the server log",
                       code="upstream_error") from None
    except TTSError as exc:
        await chunks.aclose()
        raise from_tts_error(exc) from None
    except BaseException:
        await chunks.aclose()
        raise

    release = principal.detach()  # the slot is held until the last byte
    fmt = req.response_format
    usage = _Usage(characters=len(req.input))
    metrics = state.metrics
    pipelines: list[_Pipeline] = []  # made when the body starts: a body never started leaves no encoder behind
    cleanup = _Cleanup(chunks, pipelines, release, metrics, usage)

    async def encoded() -> AsyncIterator[bytes]:
        """Encoded audio per chunk (the first one already received)."""
        pipeline = _Pipeline(fmt, first.sample_rate, req.speed)
        pipelines.append(pipeline)
        chunk: AudioChunk | None = first
        while chunk is not None:
            usage.codes += int(chunk.info.get("codes", 0) or 0)
            usage.segments += 1
            usage.audio_s += chunk.seconds
            data = await asyncio.to_thread(pipeline.feed, chunk.pcm)
            if data:
                yield data
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                chunk = None
        tail = await asyncio.to_thread(pipeline.finish)
        if tail:
            yield tail

    async def body_audio() -> AsyncIterator[bytes]:
        sent_first = False
        try:
            async for data in encoded():
                if not sent_first:
                    sent_first = True
                    metrics.ttfa.labels(format=fmt, stream_format="audio").observe(time.perf_counter() - received)
                yield data
        except TTSError as exc:
            log.warning("speech %s failed after the first audio: %s", request_id, exc.one_line())
        finally:
            await cleanup()

    async def body_sse() -> AsyncIterator[bytes]:
        sent_first = False
        try:
            async for data in encoded():
                if not sent_first:
                    sent_first = True
                    metrics.ttfa.labels(format=fmt, stream_format="sse").observe(time.perf_counter() - received)
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
            yield _sse({"type": "speech.audio.done", "usage": usage.body()})
        except TTSError as exc:
            log.warning("speech %s failed after the first audio: %s", request_id, exc.one_line())
            yield _sse({"type": "error", "error": from_tts_error(exc).body()["error"]})
        finally:
            await cleanup()

    headers = {"X-Request-Id": request_id, "X-Sample-Rate": str(output_rate(fmt, first.sample_rate)),
               "X-Audio-Channels": "1", "Cache-Control": "no-store"}
    if fmt == "pcm":
        headers["X-Audio-Sample-Format"] = "s16le"
    if req.stream_format == "sse":
        return _Streamed(body_sse(), cleanup, media_type="text/event-stream", headers=headers)
    return _Streamed(body_audio(), cleanup, media_type=FORMATS[fmt].content_type, headers=headers)


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


class _Cleanup:
    """The end of a response, finished or not, run once: cancel what still runs on the server, free the encoder
    and the key's slot. Called by the body's own finally and by `_Streamed` (a body cancelled before it started,
    or suspended between two chunks, never reaches its finally in time)."""

    def __init__(self, chunks: Any, pipelines: list[_Pipeline], release: Any, metrics: Any, usage: _Usage):
        self._args = (chunks, pipelines, release, metrics, usage)
        self._done = False

    async def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        chunks, pipelines, release, metrics, usage = self._args
        try:
            await chunks.aclose()
        finally:
            for pipeline in pipelines:
                pipeline.close()
            release()
            metrics.audio_seconds.inc(usage.audio_s)


class _Streamed(StreamingResponse):
    """A StreamingResponse that always runs its cleanup when the ASGI call ends (sent, failed or cancelled)."""

    def __init__(self, content: Any, cleanup: _Cleanup, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


@router.get("/v1/models")
async def list_models(request: Request, principal: Principal = Depends(require_key)):
    state = request.app.state
    served = await state.triton.models()
    if c.STREAM_MODEL not in served:
        raise APIError.unavailable(f"the Triton server at {state.settings.triton_url} does not serve the "
                                   f"{c.STREAM_MODEL!r} model right now. Fix: start it (triton-tts serve) or wait "
                                   "until it is ready")
    created = int(state.started_at)
    data = [{"id": state.settings.model_id, "object": "model", "created": created, "owned_by": "triton-tts"}]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model}")
async def get_model(model: str, request: Request, principal: Principal = Depends(require_key)):
    state = request.app.state
    if model != state.settings.model_id:
        raise APIError.not_found(f"the model {model!r} does not exist here. Fix: use {state.settings.model_id!r}",
                                 param="model", code="model_not_found")
    return JSONResponse({"id": model, "object": "model", "created": int(state.started_at), "owned_by": "triton-tts"})

