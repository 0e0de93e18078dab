"""API keys and per-key limits: bearer tokens checked against sha256 digests, concurrency and per-minute budgets.

Keys come from a file (``api_keys_file``) and/or the environment (``TTS_GATEWAY_API_KEYS``, comma-separated). Only
digests are kept in memory; the file may hold plain keys or, better, their digests. A line of the file::

    sha256:<64 hex digits>  name=alice  concurrent=4  per_minute=60     # a stored digest with its own limits
    tts-0123456789abcdef...                                              # a plain key, default limits

`triton-tts gateway-key` prints a fresh key and its line. Requests authenticate with ``Authorization: Bearer
<key>`` (what the `openai` SDK sends); a missing or unknown key is a 401. With no keys configured the gateway is
open, and `GatewaySettings.effective_host` keeps it on loopback.

Limits per key (the defaults from settings unless the key's line says otherwise): at most `concurrent` requests in
progress (a streaming response counts until its last byte) and at most `per_minute` requests in any 60 s window.
Past either, 429 with Retry-After (seconds until a slot frees up in the window; 1 for concurrency).

For routes (gateway/jobs/routes.py uses the same): ``principal: Principal = Depends(require_key)``. The
dependency holds a concurrency slot for the handler's duration; a handler that returns a streaming body calls
``principal.detach()`` and runs the returned release function when the stream ends.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

from engine_ref.errors import ConfigError
from starlette.requests import Request

from gateway.errors import APIError

__all__ = ["KeyRecord", "Principal", "AccessControl", "hash_key", "new_key", "key_line", "parse_keys_file",
           "require_key", "ANONYMOUS"]

ANONYMOUS = "anonymous"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_WINDOW_S = 60.0


def hash_key(key: str) -> str:
    """The stored form of a key: sha256 of its UTF-8 bytes, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "tts-" + secrets.token_urlsafe(32)


def key_line(key: str, name: str | None = None, concurrent: int | None = None, per_minute: int | None = None) -> str:
    """The keys-file line for `key` (its digest, never the key itself)."""
    parts = [f"sha256:{hash_key(key)}"]
    if name:
        parts.append(f"name={name}")
    if concurrent:
        parts.append(f"concurrent={concurrent}")
    if per_minute:
        parts.append(f"per_minute={per_minute}")
    return "  ".join(parts)


@dataclass(frozen=True)
class KeyRecord:
    digest: str
    name: str
    concurrent: int
    per_minute: int


def parse_keys_file(path: Path, default_concurrent: int, default_per_minute: int) -> list[KeyRecord]:
    """Records of a keys file; a malformed line is a ConfigError naming the file and line number."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the API keys file {str(path)!r} ({exc.strerror or exc})",
                          "create it (triton-tts gateway-key >> FILE) or fix --api-keys-file") from None
    records = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        token, *options = line.split()
        where = f"{path}:{number}"
        match = _DIGEST.fullmatch(token)
        digest = match.group(1) if match else hash_key(token)
        if token.startswith("sha256:") and not match:
            raise ConfigError(f"{where}: {token[:20]}... is not sha256: plus 64 lowercase hex digits",
                              "write the line that `triton-tts gateway-key` prints")
        values: dict[str, Any] = {"name": f"key-{digest[:8]}", "concurrent": default_concurrent,
                                  "per_minute": default_per_minute}
        for opt in options:
            key, sep, value = opt.partition("=")
            if not sep or key not in values:
                raise ConfigError(f"{where}: unknown option {opt!r}", "use name=..., concurrent=N, per_minute=N")
            if key == "name":
                values[key] = value
                continue
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"{where}: {key}={value!r} is not a whole number", f"set {key} to e.g. 4") from None
            if values[key] < 1:
                raise ConfigError(f"{where}: {key} must be at least 1", f"set {key} to e.g. 4")
        records.append(KeyRecord(digest, **values))
    return records


@dataclass
class _Usage:
    """One key's live counters."""

    active: int = 0
    recent: deque = field(default_factory=deque)  # monotonic times of requests in the last window


@dataclass
class Principal:
    """Who is calling (the key's record) and the concurrency slot this request holds."""

    key: KeyRecord
    _release: Callable[[], None] | None = None

    @property
    def name(self) -> str:
        return self.key.name

    def detach(self) -> Callable[[], None]:
        """Take over the slot (a streaming response): the dependency no longer frees it, the returned function
        does (idempotent)."""
        release, self._release = self._release, None
        done = threading.Event()

        def once() -> None:
            if not done.is_set():
                done.set()
                if release is not None:
                    release()

        return once

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class AccessControl:
    """Key lookup and limits; thread-safe (the event loop and worker threads may both ask)."""

    def __init__(self, keys: Iterable[KeyRecord], default_concurrent: int, default_per_minute: int,
                 clock: Callable[[], float] = time.monotonic):
        self._keys = {k.digest: k for k in keys}
        self.open = not self._keys
        self._anonymous = KeyRecord("", ANONYMOUS, default_concurrent, default_per_minute)
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.Lock()
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Any) -> "AccessControl":
        keys = [KeyRecord(hash_key(k), f"env-{hash_key(k)[:8]}", settings.max_concurrent_per_key,
                          settings.max_requests_per_minute) for k in settings.api_keys]
        if settings.api_keys_file is not None:
            keys += parse_keys_file(settings.api_keys_file, settings.max_concurrent_per_key,
                                    settings.max_requests_per_minute)
        return cls(keys, settings.max_concurrent_per_key, settings.max_requests_per_minute)

    def authenticate(self, authorization: str | None) -> KeyRecord:
        """The key of an Authorization header; APIError 401 when missing or unknown (open gateway: anonymous)."""
        if self.open:
            return self._anonymous
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "no API key was sent. Fix: send the header 'Authorization: Bearer <key>' (the "
                                "openai SDK does this with api_key=...)", code="missing_api_key")
        digest = hash_key(token)
        for known, record in self._keys.items():
            if hmac.compare_digest(known, digest):
                return record
        raise APIError(401, "the API key is not valid. Fix: use a key listed (as its sha256) in the gateway's "
                            "keys file", code="invalid_api_key")

    def admit(self, key: KeyRecord) -> Callable[[], None]:
        """Count a request against the key's limits; returns the function that frees its concurrency slot.
        APIError 429 (with Retry-After) when a limit is reached; a refused request uses no budget."""
        now = self._clock()
        with self._lock:
            usage = self._usage.setdefault(key.digest or ANONYMOUS, _Usage())
            while usage.recent and now - usage.recent[0] >= _WINDOW_S:
                usage.recent.popleft()
            if len(usage.recent) >= key.per_minute:
                wait = math.ceil(_WINDOW_S - (now - usage.recent[0]))
                raise APIError.rate_limited(
                    f"{key.name} made {key.per_minute} requests in the last minute, its limit. Fix: retry after "
                    f"{wait} s, or ask for a higher per_minute limit", wait)
            if usage.active >= key.concurrent:
                raise APIError.rate_limited(
                    f"{key.name} already has {key.concurrent} requests in progress, its limit. Fix: wait for one "
                    "to finish, or ask for a higher concurrent limit", 1, code="concurrency_limit_exceeded")
            usage.active += 1
            usage.recent.append(now)
        freed = threading.Event()

        def release() -> None:
            if freed.is_set():
                return
            freed.set()
            with self._lock:
                usage.active -= 1

        return release

    def active(self) -> int:
        """Requests in progress, all keys together."""
        with self._lock:
            return sum(u.active for u in self._usage.values())


async def require_key(request: Request) -> AsyncIterator[Principal]:
    """FastAPI dependency: authenticate, count the request, hold a concurrency slot until the handler returns
    (or until the stream ends, after `Principal.detach()`)."""
    access: AccessControl = request.app.state.access
    key = access.authenticate(request.headers.get("authorization"))
    principal = Principal(key, access.admit(key))
    try:
        yield principal
    finally:
        principal.release()

