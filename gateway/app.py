"""`create_app(settings)`: the gateway's FastAPI application (run by `triton-tts gateway`, or any ASGI server).

What a route module can rely on (gateway/jobs/routes.py among them):
- ``request.app.state``: ``settings`` (GatewaySettings), ``triton`` (TritonTTS, created in the lifespan, bound to
  the serving event loop), ``voices`` (VoiceStore), ``access`` (AccessControl), ``metrics`` (GatewayMetrics; jobs
  update it with ``gateway.metrics.set_jobs(app, counts)``), ``started_at`` (unix time).
- Auth: ``Depends(gateway.auth.require_key)`` on every /v1 route.
- Errors: raise ``gateway.errors.APIError`` (or let a TTSError escape); handlers render OpenAI's error JSON.
- Jobs: when ``gateway.jobs.routes`` exists, its ``router`` is included and its ``startup(app)`` /
  ``shutdown(app)`` (plain or async functions, both optional) run in the lifespan, after ``app.state.triton``
  exists and before it is closed.
- The web page: gateway/web/index.html is served at ``/`` and the folder at ``/web/`` (index.html refers to
  ``web/app.js`` and ``web/style.css``).

Unauthenticated on purpose: ``/healthz`` (the process runs), ``/readyz`` (Triton's `tts` model is ready),
``/metrics`` (Prometheus) and the static page; every API call needs a key when keys are configured.
Request bodies larger than ``settings.max_upload_bytes`` are refused with 413 before they are read.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from gateway import errors
from gateway.auth import AccessControl
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.settings import GatewaySettings
from gateway.triton import TritonTTS
from gateway.voices import VoiceStore

__all__ = ["create_app", "BodyLimitMiddleware"]

log = logging.getLogger("gateway")
_JOBS_MODULE = "gateway.jobs.routes"
_WEB_DIR = Path(__file__).with_name("web")


class BodyLimitMiddleware:
    """413 for request bodies over `limit` bytes: at once from Content-Length, else while the body arrives."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse(self._error().body(), status_code=413)
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._error()
            return message

        await self.app(scope, limited_receive, send)

    def _error(self) -> errors.APIError:
        return errors.APIError.too_large(f"the request body is larger than this gateway's limit of {self.limit} "
                                         "bytes. Fix: send a smaller file (or raise max_upload_bytes)")


def _jobs_module() -> Any:
    """gateway.jobs.routes when it exists (import errors inside it are real errors and propagate)."""
    try:
        found = importlib.util.find_spec(_JOBS_MODULE)
    except ModuleNotFoundError:
        found = None
    return importlib.import_module(_JOBS_MODULE) if found is not None else None


async def _call(hook: Any, app: FastAPI) -> None:
    if hook is None:
        return
    result = hook(app)
    if inspect.isawaitable(result):
        await result


def create_app(settings: GatewaySettings) -> FastAPI:
    jobs = _jobs_module()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = TritonTTS(settings.triton_url, timeout_s=settings.request_timeout_s)
        try:
            await _call(getattr(jobs, "startup", None), app)
            try:
                yield
            finally:
                await _call(getattr(jobs, "shutdown", None), app)
        finally:
            await app.state.triton.close()

    app = FastAPI(title="triton-tts gateway", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.started_at = time.time()
    app.state.access = AccessControl.from_settings(settings)
    app.state.metrics = GatewayMetrics()
    app.state.voices = VoiceStore(settings.voices_dir, settings.max_voice_seconds)
    if app.state.access.open:
        log.warning("no API keys are configured: every request is accepted (bind stays on loopback)")
    errors.install(app)

    from gateway import speech, voices

    app.include_router(speech.router)
    app.include_router(voices.router)
    if jobs is not None:
        app.include_router(jobs.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        ready = await request.app.state.triton.ready()
        return JSONResponse({"status": "ready" if ready else "triton not ready", "triton": settings.triton_url},
                            status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        body, content_type = request.app.state.metrics.render()
        return Response(body, media_type=content_type)

    if (_WEB_DIR / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/web", StaticFiles(directory=_WEB_DIR), name="web")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(_WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "X-Sample-Rate", "X-Audio-Channels",
                                           "X-Audio-Sample-Format", "Retry-After", "Content-Disposition"])
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
