"""Client-side errors: every failure a user can meet becomes a one-line `TTSError` (problem + fix).

The server answers a bad request with the one line of the `TTSError` its model raised ("problem. Fix: fix."),
wrapped by Triton in status codes and prefixes (``[StatusCode.INVALID_ARGUMENT]``, ``in ensemble 'tts', ``).
`from_server_error` peels those off and rebuilds the original problem/fix, so the user reads the model's own
words; transport failures (unreachable server, unknown model, silence past the timeout) get their own fix.
"""

from __future__ import annotations

import re

from engine_ref.errors import InputError, TTSError

__all__ = [
    "ServerError", "RequestRejected", "ServerInternalError", "ServerUnavailable", "ModelUnavailable",
    "ServerTimeout", "ProtocolError", "EncodeError", "from_server_error", "clean_server_message",
]

_VERSION_FIX = "use a client and a server from the same triton-tts version"


class ServerError(TTSError):
    """The server failed, refused, or could not be reached for a request."""


class RequestRejected(ServerError, InputError):
    """The server's model refused the request's input (text, audio, parameters); its message is kept."""


class ServerInternalError(ServerError):
    """The server hit a bug or resource failure while serving a valid request."""


class ServerUnavailable(ServerError):
    """No Triton server answers at the given address."""


class ModelUnavailable(ServerError):
    """The server runs, but the requested model is not loaded or not ready."""


class ServerTimeout(ServerError):
    """The server sent nothing within the client's timeout."""


class ProtocolError(ServerError):
    """A response does not follow model_repository/contract.py (client and server versions differ)."""


class EncodeError(TTSError):
    """Writing or encoding the output audio failed (ffmpeg missing or failing, unwritable path)."""


# Triton decorations around a model's message, outermost first; removed repeatedly.
_PREFIXES = (
    re.compile(r"^\[StatusCode\.[A-Z_]+\]\s*"),
    re.compile(r"^\[\d{3}\]\s*"),
    re.compile(r"^\[request id: [^\]]*\]\s*"),
    re.compile(r"^in ensemble '[^']*',\s*"),
    re.compile(r"^Failed to process the request\(s\) for model(?: instance)? '[^']*', message:\s*"),
    re.compile(r"^[A-Za-z]*Error:\s+(?=.*\. Fix: )"),  # a Python exception name in front of our one line
)
_UNKNOWN_MODEL = re.compile(r"unknown model|is not found|has no available versions|is not ready|not loaded",
                            re.IGNORECASE)
_CONTRACT = re.compile(r"unexpected inference input|expected \d+ inputs|unexpected (?:shape|datatype)|"
                       r"inference input .* data-type|unexpected number of inputs", re.IGNORECASE)


def clean_server_message(message: str) -> str:
    """The model's own message without Triton's status and routing prefixes (first line only)."""
    text = (message or "").strip().splitlines()[0].strip() if (message or "").strip() else ""
    changed = True
    while changed:
        changed = False
        for pattern in _PREFIXES:
            stripped = pattern.sub("", text, count=1)
            if stripped != text:
                text, changed = stripped.strip(), True
    return text


def from_server_error(exc: BaseException, *, model: str, url: str) -> ServerError:
    """Map a tritonclient exception (or a transport OSError) to the `ServerError` subclass a user can act on."""
    status = ""
    raw = str(exc)
    if hasattr(exc, "status") and callable(exc.status):
        status = str(exc.status() or "")
        raw = str(exc.message() or "") if callable(getattr(exc, "message", None)) else raw
    if isinstance(exc, (ConnectionError, TimeoutError)) or "UNAVAILABLE" in status:
        if isinstance(exc, TimeoutError) or "DEADLINE_EXCEEDED" in status:
            return ServerTimeout(f"the server at {url} did not answer in time ({type(exc).__name__})",
                                 "raise --timeout, or check the server's load and logs")
        detail = clean_server_message(raw) or type(exc).__name__
        return ServerUnavailable(f"cannot reach a Triton server at {url} ({detail})",
                                 "start the server (triton-tts serve) or pass the right host:port")
    if "DEADLINE_EXCEEDED" in status:
        return ServerTimeout(f"the request to model {model!r} at {url} exceeded its deadline",
                             "raise --timeout, or check the server's load and logs")
    message = clean_server_message(raw)
    if "CANCELLED" in status:
        return ServerError(f"the request to model {model!r} was cancelled ({message or 'no detail'})",
                           "retry; if the server is shutting down, wait until it is ready again")
    problem, sep, fix = message.partition(". Fix: ")
    if sep:
        return RequestRejected(problem, fix)
    if message.startswith("internal error:"):
        return ServerInternalError(f"the server failed on model {model!r}: {message}",
                                   "report it with the server log; the request itself may be fine to retry")
    if _UNKNOWN_MODEL.search(message):
        return ModelUnavailable(f"model {model!r} is not available at {url} ({message})",
                                "check the model name, and that the server loaded it (GET /v2/models/NAME/ready)")
    if _CONTRACT.search(message):
        return ProtocolError(f"the server rejected the request's tensors ({message})", _VERSION_FIX)
    if not message:
        message = f"{type(exc).__name__} with no message" + (f" (status {status})" if status else "")
    return ServerError(f"model {model!r} at {url} failed: {message}",
                       "check the server log; retry if the failure was transient")
