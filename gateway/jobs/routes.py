"""The long-form job API, included by gateway.app.create_app; `startup`/`shutdown` run in its lifespan.

    POST   /v1/audio/jobs               a .txt/.epub upload (multipart field `file`) or text (`input`, JSON or form),
                                        `voice`, `format` mp3|m4b|wav|flac|opus, optional `title`, `author`,
                                        `bitrate` (bits/s) and generation parameters -> 202 + the job
    GET    /v1/audio/jobs               this key's jobs, newest first (`?limit=`, `?state=`)
    GET    /v1/audio/jobs/{id}          state, chapters, characters / segments / parts done of total, ETA
    GET    /v1/audio/jobs/{id}/events   Server-Sent Events: `progress` whenever it changes, `done` at the end
    GET    /v1/audio/jobs/{id}/result   the file (Range requests: 206 partial content)
    DELETE /v1/audio/jobs/{id}          cancel a queued or running job (its Triton requests stop); a finished job is
                                        deleted with its files

Jobs belong to the API key that submitted them (with no keys configured: everyone's are everyone's); another
key's job is a 404. A job id is only ever used as a path after matching its strict pattern, so `..` and friends
are 404s. The SSE stream frees the key's concurrency slot as soon as it starts (a page watching several jobs
must not lock itself out); it still counts once against the per-minute budget. Browsers' EventSource cannot
send an Authorization header: the web page reads the stream with fetch().
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from engine_ref.errors import InputError, TTSError
from gateway.auth import ANONYMOUS, Principal, require_key
from gateway.controls import family_controls
from gateway.errors import APIError
from gateway.jobs.epub import Book, is_epub, read_epub
from gateway.jobs.files import JobFiles
from gateway.jobs.m4b import JOB_FORMATS, job_format
from gateway.jobs.store import STATES, TERMINAL_STATES, JobRecord, is_job_id, new_job_id, open_store
from gateway.jobs.text import chapters_from_text, decode_text_upload, has_speech
from gateway.jobs.worker import JobConfig, JobRunner
from model_repository import contract as c

__all__ = ["router", "startup", "shutdown", "job_view", "parse_job_fields"]

log = logging.getLogger("gateway.jobs")
router = APIRouter(prefix="/v1/audio/jobs", tags=["jobs"])

_TEXT_FIELDS = ("input", "text")
_FIELDS = ("model", *_TEXT_FIELDS, "file", "voice", "format", "response_format", "title", "author", "bitrate",
           *c.PARAMS, "max_text_tokens_per_segment", "instructions", "language", "duration_factor")
_SSE_POLL_S = 0.5
_SSE_KEEPALIVE_S = 15.0


# --- lifespan -----------------------------------------------------------------------------------------------------

async def startup(app: Any) -> None:
    settings = app.state.settings
    store = await asyncio.to_thread(open_store, settings.database_url)
    config = JobConfig.from_env(settings.max_jobs)

    def on_change(counts: dict[str, int]) -> None:
        app.state.metrics.set_jobs(counts)

    runner = JobRunner(store, settings.jobs_dir, app.state.triton, config, on_change=on_change)
    app.state.job_store = store
    app.state.job_runner = runner
    on_change(await asyncio.to_thread(store.counts))
    await runner.start()
    log.info("job workers started (replica %s, at most %d jobs at once, store %s)", config.replica_id,
             config.max_jobs, settings.database_url.split("://")[0])


async def shutdown(app: Any) -> None:
    runner: JobRunner | None = getattr(app.state, "job_runner", None)
    if runner is not None:
        await runner.stop()
    store = getattr(app.state, "job_store", None)
    if store is not None:
        store.close()


# --- request parsing ----------------------------------------------------------------------------------------------

def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError.bad_request(message, param=param, code=code)


def _typed(name: str, value: Any) -> Any:
    """A generation parameter from JSON (typed) or a form (a string), as the contract's type."""
    kind = c.PARAMS[name].triton_type if name in c.PARAMS else "INT32"
    if isinstance(value, str):
        text = value.strip()
        try:
            if kind == "BOOL":
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            return int(text) if kind.startswith("INT") else float(text)
        except ValueError:
            raise _bad(f"{name}={text[:40]!r} is not a {'boolean' if kind == 'BOOL' else 'number'}. Fix: pass "
                       f"e.g. {'true' if kind == 'BOOL' else '1'}", name) from None
    if kind == "BOOL" and not isinstance(value, bool):
        raise _bad(f"{name} must be true or false. Fix: pass a JSON boolean", name)
    if kind.startswith("INT") and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(f"{name} must be a whole number. Fix: pass e.g. 1", name)
    if kind == "FP32" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _bad(f"{name} must be a number. Fix: pass e.g. 0.8", name)
    return value


def parse_job_fields(fields: dict[str, Any], served_model: str) -> dict[str, Any]:
    """The job's request (everything but the text) from JSON or form fields; APIError names a bad field."""
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(unknown)}. Fix: use only {', '.join(_FIELDS)}", unknown[0],
                   "unknown_parameter")
    model = fields.get("model")
    if model not in (None, "") and model != served_model:
        from gateway.speech import OPENAI_MODEL_ALIASES

        if model not in OPENAI_MODEL_ALIASES:
            raise APIError(404, f"the model {model!r} does not exist here. Fix: use {served_model!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
    voice = fields.get("voice")
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice.strip():
        raise _bad("voice is required. Fix: pass a stored voice's name or id (GET /v1/audio/voices)", "voice",
                   "missing_required_parameter")
    fmt = str(fields.get("format") or fields.get("response_format") or "mp3").lower()
    if fmt not in JOB_FORMATS:
        raise _bad(f"format {fmt!r} is not a job format. Fix: use one of {', '.join(JOB_FORMATS)}", "format")
    out: dict[str, Any] = {"voice": voice.strip(), "format": fmt, "params": {}}
    for name in ("title", "author"):
        value = fields.get(name)
        if value not in (None, ""):
            if not isinstance(value, str) or len(value) > 300:
                raise _bad(f"{name} must be a string of at most 300 characters. Fix: shorten it", name)
            out[name] = value.strip()
    bitrate = fields.get("bitrate")
    if bitrate not in (None, ""):
        text = str(bitrate).strip().lower()
        m = re.fullmatch(r"(\d+)(k?)", text)
        value = int(m.group(1)) * (1000 if m.group(2) else 1) if m else 0
        if not 8_000 <= value <= 512_000:
            raise _bad(f"bitrate={bitrate!r} is out of range. Fix: pass bits per second from 8000 to 512000 "
                       "(or e.g. 64k)", "bitrate")
        out["bitrate"] = value
    for name in c.PARAMS:
        if fields.get(name) not in (None, ""):
            out["params"][name] = _typed(name, fields[name])
    try:
        from client.request import GenerationOverrides

        GenerationOverrides.of(out["params"])
    except InputError as exc:
        name = next((n for n in out["params"] if n in exc.problem), "params")
        raise _bad(exc.one_line(), name) from None
    mtt = fields.get("max_text_tokens_per_segment")
    if mtt not in (None, ""):
        mtt = _typed("max_text_tokens_per_segment", mtt)
        if mtt < 1:
            raise _bad(f"max_text_tokens_per_segment must be at least 1. Fix: use e.g. "
                       f"{c.DEFAULT_MAX_TEXT_TOKENS_PER_SEGMENT}", "max_text_tokens_per_segment")
        out["max_text_tokens_per_segment"] = mtt
    from gateway.speech import parse_family_fields

    language, factor = parse_family_fields(fields)
    instructions = fields.get("instructions")
    if instructions not in (None, ""):
        if not isinstance(instructions, str) or not instructions.strip():
            raise _bad("instructions must be a string describing the emotion. Fix: e.g. 'calm and warm'",
                       "instructions")
        out["instructions"] = instructions.strip()
    for name, value in (("language", language), ("duration_factor", factor)):
        if value is not None:
            out[name] = value
    return out


async def _read_submission(request: Request) -> tuple[dict[str, Any], str | None, bytes | None, str | None]:
    """(fields, text, uploaded bytes, upload filename) from a JSON, urlencoded or multipart body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload: UploadFile | None = None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        limit = request.app.state.settings.max_upload_bytes
        form = await request.form(max_files=1, max_fields=64, max_part_size=limit)
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "file":
                    raise _bad(f"the upload is in the field {key!r}. Fix: send the book as the field 'file'", key)
                upload = value
            else:
                fields[key] = value
    elif ctype in ("application/json", ""):
        try:
            fields = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _bad("the body is not valid JSON. Fix: send a JSON object or a multipart form", "body") from None
        if not isinstance(fields, dict):
            raise _bad("the body must be a JSON object. Fix: send {\"input\": ..., \"voice\": ...}", "body")
    else:
        raise APIError(415, f"content type {ctype!r} is not accepted. Fix: send JSON, a urlencoded form or "
                            "multipart/form-data with the book in 'file'", code="unsupported_media_type")
    text = next((fields.pop(k) for k in _TEXT_FIELDS if k in fields and fields[k] not in (None, "")), None)
    for k in _TEXT_FIELDS:
        fields.pop(k, None)
    if text is not None and not isinstance(text, str):
        raise _bad("input must be a string. Fix: pass the text to read as a string", "input")
    data = filename = None
    if upload is not None:
        data, filename = await upload.read(), upload.filename or "upload"
        await upload.close()
    if (text is None) == (data is None):
        raise _bad("a job needs exactly one of a file or an input text. Fix: send a .txt/.epub as the multipart "
                   "field 'file', or the text as 'input'",
                   "file" if data is not None else "input", "missing_required_parameter")
    return fields, text, data, filename


def _book_from(text: str | None, data: bytes | None, filename: str | None) -> tuple[Book, str]:
    """The chapters and metadata of the submission, and its kind (text, txt, epub)."""
    stem = Path(filename).stem if filename else None
    if data is not None and (str(filename).lower().endswith(".epub") or is_epub(data)):
        return read_epub(data), "epub"
    if data is not None:
        text, kind = decode_text_upload(data), "txt"
    else:
        kind = "text"
    assert text is not None
    chapters = chapters_from_text(text, default_title=stem or "Text")
    return Book(stem, None, None, tuple(chapters), None), kind


# --- views --------------------------------------------------------------------------------------------------------

def job_view(record: JobRecord, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """The API's view of a job (no paths); `live` is the running worker's fresher progress."""
    p = live or record.progress or {}
    req = record.request
    result = record.result
    view: dict[str, Any] = {
        "id": record.id, "object": "audio.job", "state": record.state, "created_at": record.created_at,
        "started_at": record.started_at, "finished_at": record.finished_at,
        "title": req.get("title"), "author": req.get("author"), "voice": req.get("voice"),
        "format": req.get("format"), "source": req.get("source"), "filename": req.get("filename"),
        "phase": record.state if record.state in ("queued", *TERMINAL_STATES) else p.get("phase", record.state),
        "progress": 1.0 if record.state == "succeeded" else p.get("fraction", 0.0),
        "characters": {"done": p.get("characters_done", 0), "total": p.get("characters_total")},
        "segments": {"done": p.get("segments_done", 0), "total": p.get("segments_total"),
                     "estimated": p.get("segments_total_estimated", True)},
        "parts": {"done": p.get("parts_done", 0), "total": p.get("parts_total")},
        "audio_seconds": p.get("audio_seconds", 0.0),
        "characters_per_second": p.get("characters_per_second"),
        "eta_seconds": p.get("eta_seconds") if record.state in ("running", "encoding") else
        (0.0 if record.state == "succeeded" else None),
        "chapters": p.get("chapters", []), "attempts": record.attempts,
        "cancel_requested": record.cancel_requested,
        "error": {"message": record.error} if record.error else None,
        "result": None,
    }
    if record.state == "succeeded" and result:
        view["result"] = {"url": f"/v1/audio/jobs/{record.id}/result", "bytes": result.get("bytes"),
                          "media_type": result.get("media_type"), "format": result.get("format"),
                          "duration_s": result.get("duration_s"), "sample_rate": result.get("sample_rate")}
    return view


def _owner(principal: Principal) -> str:
    return principal.name


def _visible_to(record: JobRecord, principal: Principal) -> bool:
    return principal.name == ANONYMOUS or record.owner == principal.name


async def _job(request: Request, job_id: str, principal: Principal) -> JobRecord:
    if not is_job_id(job_id):
        raise APIError.not_found(f"no job {job_id[:80]!r}. Fix: use an id from POST /v1/audio/jobs or "
                                 "GET /v1/audio/jobs", param="job_id")
    record = await asyncio.to_thread(request.app.state.job_store.get, job_id)
    if record is None or not _visible_to(record, principal):
        raise APIError.not_found(f"no job {job_id!r}. Fix: use an id from GET /v1/audio/jobs (jobs belong to the "
                                 "key that submitted them)", param="job_id")
    return record


def _live(request: Request, job_id: str) -> dict[str, Any] | None:
    return request.app.state.job_runner.live(job_id)


# --- routes -------------------------------------------------------------------------------------------------------

@router.post("", status_code=202)
async def submit_job(request: Request, principal: Principal = Depends(require_key)) -> JSONResponse:
    state = request.app.state
    settings = state.settings
    fields, text, data, filename = await _read_submission(request)
    job_request = parse_job_fields(fields, settings.model_id)
    try:
        book, kind = await asyncio.to_thread(_book_from, text, data, filename)
    except InputError as exc:
        raise _bad(exc.one_line(), "file" if data is not None else "input", "invalid_book") from None
    chapters = [ch for ch in book.chapters if has_speech(ch.text)]
    total = sum(len(ch.text) for ch in chapters)
    if total > settings.max_job_chars:
        raise APIError.too_large(f"the book has {total} characters, more than this gateway's job limit of "
                                 f"{settings.max_job_chars}. Fix: split it into several jobs (or raise "
                                 "max_job_chars)", param="file" if data is not None else "input")
    try:
        voice = await asyncio.to_thread(state.voices.get, job_request["voice"])
    except InputError as exc:
        from gateway.voices import VoiceNotFound

        if isinstance(exc, VoiceNotFound):
            raise APIError.not_found(exc.one_line(), param="voice", code="voice_not_found") from None
        raise _bad(exc.one_line(), "voice") from None
    # the served family's controls, resolved now (a book's own language serves IndexTTS-2.5 when none is given)
    controls = await family_controls(state.triton, settings, instructions=job_request.pop("instructions", None),
                                     language=job_request.pop("language", None),
                                     duration_factor=job_request.pop("duration_factor", None),
                                     fallback_language=book.language)
    if controls is not None:
        job_request["controls"] = {k: v for k, v in (("emo_text", controls.emo_text), ("language", controls.language),
                                                     ("duration_factor", controls.duration_factor)) if v is not None}
    job_request.update({"voice": voice.name, "voice_id": voice.id, "source": kind, "filename": filename,
                        "title": job_request.get("title") or book.title or (Path(filename).stem if filename else None),
                        "author": job_request.get("author") or book.author})
    job_id = new_job_id()
    files = JobFiles(settings.jobs_dir, job_id)
    await asyncio.to_thread(files.create, chapters, job_request["title"], job_request["author"], book.language,
                            voice.audio_bytes(), book.cover)
    progress = {"phase": "queued", "characters_total": total, "characters_done": 0, "fraction": 0.0,
                "chapters": [{"title": ch.title, "characters": len(ch.text)} for ch in chapters]}
    try:
        record = await asyncio.to_thread(state.job_store.create, _owner(principal), job_request, progress, job_id)
    except BaseException:
        await asyncio.to_thread(files.remove_all)
        raise
    state.job_runner.wake()
    log.info("job %s queued: %s, %d chapters, %d characters, %s", job_id, kind, len(chapters), total,
             job_request["format"])
    return JSONResponse(job_view(record), status_code=202, headers={"Location": f"/v1/audio/jobs/{job_id}"})


@router.get("")
async def list_jobs(request: Request, limit: int = 100, state: str | None = None,
                    principal: Principal = Depends(require_key)) -> JSONResponse:
    if not 1 <= limit <= 1000:
        raise _bad("limit must be from 1 to 1000. Fix: pass e.g. limit=100", "limit")
    states = [s.strip() for s in state.split(",")] if state else None
    if states and any(s not in STATES for s in states):
        raise _bad(f"state {state!r} is not a job state. Fix: use one or more of {', '.join(STATES)}, "
                   "comma-separated", "state")
    owner = None if principal.name == ANONYMOUS else principal.name
    records = await asyncio.to_thread(request.app.state.job_store.list, owner, limit, states)
    return JSONResponse({"object": "list", "data": [job_view(r, _live(request, r.id)) for r in records]})


@router.get("/{job_id}")
async def get_job(job_id: str, request: Request, principal: Principal = Depends(require_key)) -> JSONResponse:
    record = await _job(request, job_id, principal)
    return JSONResponse(job_view(record, _live(request, job_id)))


@router.get("/{job_id}/events")
async def job_events(job_id: str, request: Request, principal: Principal = Depends(require_key)) -> StreamingResponse:
    record = await _job(request, job_id, principal)
    principal.release()  # a watch is long: it must not hold one of the key's concurrent-request slots
    store = request.app.state.job_store

    async def events() -> AsyncIterator[bytes]:
        current: JobRecord | None = record
        last, sent_at = "", time.monotonic()
        while current is not None:
            view = job_view(current, _live(request, job_id))
            payload = json.dumps(view, separators=(",", ":"))
            if current.terminal:
                yield f"event: done\ndata: {payload}\n\n".encode()
                return
            if payload != last:
                yield f"event: progress\ndata: {payload}\n\n".encode()
                last, sent_at = payload, time.monotonic()
            elif time.monotonic() - sent_at > _SSE_KEEPALIVE_S:
                yield b": keep-alive\n\n"
                sent_at = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(_SSE_POLL_S)
            try:
                current = await asyncio.to_thread(store.get, job_id)
            except TTSError as exc:
                yield f"event: error\ndata: {json.dumps({'message': exc.one_line()})}\n\n".encode()
                return
        yield f"event: error\ndata: {json.dumps({'message': 'the job was deleted'})}\n\n".encode()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/result")
async def job_result(job_id: str, request: Request, principal: Principal = Depends(require_key)) -> FileResponse:
    record = await _job(request, job_id, principal)
    if record.state != "succeeded" or not record.result:
        raise APIError(409, f"job {job_id} is {record.state}, it has no result yet. Fix: wait for state "
                            "'succeeded' (GET /v1/audio/jobs/{id} or its /events)", code="job_not_finished")
    fmt = job_format(record.result.get("format") or record.request.get("format"))
    path = JobFiles(request.app.state.settings.jobs_dir, job_id).result_path(fmt.extension)
    if not path.is_file():
        raise APIError(410, f"the result of job {job_id} is gone from the gateway's disk. Fix: submit the job "
                            "again", code="result_gone")
    title = re.sub(r"[^\w .()-]+", "", record.request.get("title") or "")[:80].strip() or job_id
    return FileResponse(path, media_type=fmt.media_type, filename=f"{title}.{fmt.extension}",
                        headers={"Cache-Control": "private, max-age=3600"})


@router.delete("/{job_id}")
async def delete_job(job_id: str, request: Request, principal: Principal = Depends(require_key)) -> JSONResponse:
    state = request.app.state
    record = await _job(request, job_id, principal)
    if record.terminal:
        if await asyncio.to_thread(state.job_store.delete, job_id):
            await asyncio.to_thread(JobFiles(state.settings.jobs_dir, job_id).remove_all)
        return JSONResponse({"id": job_id, "object": "audio.job.deleted", "deleted": True})
    record = await asyncio.to_thread(state.job_store.request_cancel, job_id)
    await state.job_runner.cancel(job_id)
    record = await asyncio.to_thread(state.job_store.get, job_id) or record
    log.info("job %s: cancel requested (now %s)", job_id, record.state)
    return JSONResponse(job_view(record), status_code=200 if record.terminal else 202)
