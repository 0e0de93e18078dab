"""Errors as OpenAI's error JSON with the right HTTP status: one home for every route (speech, voices, jobs).

A route raises `APIError` (or lets a `TTSError` escape); the handlers `install(app)` registers turn both into
``{"error": {"message", "type", "param", "code"}}`` — the body the `openai` SDK parses into its exception
classes (BadRequestError 400, AuthenticationError 401, NotFoundError 404, RateLimitError 429, ...). Messages are
the project's one-line "problem. Fix: fix." so a user of the SDK reads the fix too.

How a `TTSError` maps: bad input (InputError, the server refusing a request) 400; not found 404 (raise
`APIError.not_found`); the Triton server or model unreachable/not ready 503 (with Retry-After); Triton silent past
the timeout 504; a server bug 502; anything else 500.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from engine_ref.errors import CapacityError, InputError, TTSError

__all__ = ["APIError", "error_body", "from_tts_error", "install"]

log = logging.getLogger("gateway")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 416: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, *, type: str | None = None, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for `status` (the type defaults by status: 4xx request errors, 5xx server_error)."""
    kind = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class APIError(Exception):
    """An HTTP error with OpenAI's body; raise it from any route."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, type=self.type, code=self.code, param=self.param)

    # Common cases, so every route words them the same way.
    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> "APIError":
        return cls(400, message, param=param, code=code)

    @classmethod
    def not_found(cls, message: str, param: str | None = None, code: str = "not_found") -> "APIError":
        return cls(404, message, param=param, code=code)

    @classmethod
    def too_large(cls, message: str, param: str | None = None) -> "APIError":
        return cls(413, message, param=param, code="request_too_large")

    @classmethod
    def rate_limited(cls, message: str, retry_after_s: int, code: str = "rate_limit_exceeded") -> "APIError":
        return cls(429, message, code=code, headers={"Retry-After": str(max(1, int(retry_after_s)))})

    @classmethod
    def unavailable(cls, message: str, retry_after_s: int = 5, code: str = "service_unavailable") -> "APIError":
        return cls(503, message, code=code, headers={"Retry-After": str(max(1, int(retry_after_s)))})


def from_tts_error(exc: TTSError, param: str | None = None) -> APIError:
    """The status a project error deserves (see the module docstring)."""
    from client.errors import (ModelUnavailable, ProtocolError, ServerInternalError, ServerTimeout,
                               ServerUnavailable)

    message = exc.one_line()
    if isinstance(exc, (ServerUnavailable, ModelUnavailable)):
        return APIError.unavailable(message)
    if isinstance(exc, CapacityError) or "at capacity" in message:
        return APIError.unavailable(message, retry_after_s=2, code="server_at_capacity")
    if isinstance(exc, ServerTimeout):
        return APIError(504, message, code="upstream_timeout")
    if isinstance(exc, (ServerInternalError, ProtocolError)):
        return APIError(502, message, code="upstream_error")
    if isinstance(exc, InputError):
        return APIError.bad_request(message, param=param)
    return APIError(500, message, code="internal_error")


def install(app: Any) -> None:
    """Register the handlers that render APIError, TTSError, FastAPI's validation and HTTP errors as OpenAI JSON."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def render(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def on_api_error(request: Any, exc: APIError) -> JSONResponse:
        return render(exc)

    async def on_tts_error(request: Any, exc: TTSError) -> JSONResponse:
        return render(from_tts_error(exc))

    async def on_validation(request: Any, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
        param = ".".join(loc) or None
        what = f"{param}: " if param else ""
        return render(APIError.bad_request(f"{what}{first.get('msg', 'invalid request')}. Fix: see the API "
                                           "reference in docs/deploy.md", param=param, code="invalid_value"))

    async def on_http(request: Any, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return render(APIError(exc.status_code, detail, headers=getattr(exc, "headers", None)))

    async def on_unexpected(request: Any, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return render(APIError(500, f"internal error: {type(exc).__name__}. Fix: report it with the gateway log",
                               code="internal_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(TTSError, on_tts_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
