"""The gateway's settings: one frozen dataclass, filled from the environment, then from command-line flags.

Every setting has an environment variable (``TTS_GATEWAY_<NAME>``, for containers and Kubernetes) and most have a
flag of `triton-tts gateway` (flags win). Values are checked once, here, so a bad setting is a one-line
`ConfigError` at start-up naming the variable or flag, never a failure on the first request.

Access is closed by default: with no API keys configured the gateway refuses to listen on anything but the
loopback interface (`GatewaySettings.effective_host` says so and why), so an unprotected gateway is never
reachable from the network by accident.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from engine_ref.errors import ConfigError

__all__ = ["GatewaySettings", "ENV_PREFIX", "LOOPBACK", "is_loopback"]

ENV_PREFIX = "TTS_GATEWAY_"
LOOPBACK = "127.0.0.1"
_MIB = 1 << 20


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts local connections (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway process needs; see docs/deploy.md for the operator's view."""

    #: gRPC host:port of the Triton server (its `tts` model streams one response per segment).
    triton_url: str = "127.0.0.1:8001"
    host: str = LOOPBACK
    port: int = 8080
    #: Voices live in data_dir/voices, jobs in data_dir/jobs (and the SQLite job store beside them).
    data_dir: Path = Path("gateway-data")
    #: None: SQLite in data_dir/jobs.sqlite3; "postgresql://..." when several replicas share the jobs.
    db_url: str | None = None
    #: Long-form jobs running at once per gateway process; the rest wait queued.
    max_jobs: int = 2
    #: File with one API key per line (plain or "sha256:<hex>", optional name and per-key limits).
    api_keys_file: Path | None = None
    #: Keys given directly (comma-separated in TTS_GATEWAY_API_KEYS); hashed at load, never kept in clear.
    api_keys: tuple[str, ...] = ()
    #: Default per-key limits (a key's line in the keys file may override them).
    max_concurrent_per_key: int = 8
    max_requests_per_minute: int = 120
    #: Largest request body (voice uploads, job uploads, JSON); more is refused with 413.
    max_upload_bytes: int = 20 * _MIB
    #: Longest `input` of one speech request (OpenAI's limit is 4096); longer texts belong in a job.
    max_text_chars: int = 4096
    #: Longest text of one long-form job (characters after extraction from txt/epub).
    max_job_chars: int = 2_000_000
    #: Origins allowed by CORS; empty: no CORS headers at all (browsers refuse cross-origin calls).
    cors_origins: tuple[str, ...] = ()
    #: Longest wait for the next response from Triton (one segment must be generated within it).
    request_timeout_s: float = 120.0
    #: The served model as `GET /v1/models` lists it and `model` of a speech request names it.
    model_id: str = "indextts-1.5"
    #: Voice references longer than this are refused at upload (the server uses only the first seconds).
    max_voice_seconds: float = 60.0
    #: The text language sent when a request names none, for a served family that requires one (IndexTTS-2.5 has
    #: no language detection; OpenAI's API has no language field). None: such a request is a 400 saying so.
    default_language: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ConfigError:
            return ConfigError(f"gateway setting {name}={getattr(self, name)!r} is invalid", fix)

        url = self.triton_url
        if not isinstance(url, str) or not url or "://" in url or url.startswith("/") or ":" not in url:
            raise bad("triton_url", "pass the Triton gRPC endpoint as host:port, e.g. 127.0.0.1:8001")
        if not 0 < self.port < 65536:
            raise bad("port", "use a TCP port between 1 and 65535")
        for name in ("max_jobs", "max_concurrent_per_key", "max_requests_per_minute", "max_upload_bytes",
                     "max_text_chars", "max_job_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "use a positive whole number")
        for name in ("request_timeout_s", "max_voice_seconds"):
            if not getattr(self, name) > 0:
                raise bad(name, "use a positive number of seconds")
        if self.db_url is not None and not self.db_url.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise bad("db_url", "use postgresql://user:pass@host/db, sqlite:///path, or leave it unset for SQLite")
        if not self.model_id or any(ch.isspace() for ch in self.model_id):
            raise bad("model_id", "use a name without spaces, e.g. indextts-1.5")
        if self.default_language is not None and (not self.default_language.strip() or
                                                  any(ch.isspace() for ch in self.default_language.strip())):
            raise bad("default_language", "use a language code such as en (IndexTTS-2.5: zh, en, ja, es, ar, zhen)")
        for origin in self.cors_origins:
            if origin != "*" and "://" not in origin:
                raise ConfigError(f"CORS origin {origin!r} is not an origin",
                                  "list origins as scheme://host[:port], e.g. https://app.example.com")

    # --- derived paths ----------------------------------------------------------------------------------------------
    @property
    def voices_dir(self) -> Path:
        return Path(self.data_dir) / "voices"

    @property
    def jobs_dir(self) -> Path:
        return Path(self.data_dir) / "jobs"

    @property
    def database_url(self) -> str:
        """The job store's URL: db_url, else an SQLite file in data_dir."""
        return self.db_url or f"sqlite:///{(Path(self.data_dir) / 'jobs.sqlite3').resolve()}"

    @property
    def keys_configured(self) -> bool:
        return bool(self.api_keys) or self.api_keys_file is not None

    def effective_host(self) -> tuple[str, str | None]:
        """(host to bind, warning or None): without API keys only loopback is allowed, whatever was asked."""
        if self.keys_configured or is_loopback(self.host):
            return self.host, None
        return LOOPBACK, (f"no API keys are configured, so the gateway listens on {LOOPBACK} only (asked for "
                          f"{self.host}); set TTS_GATEWAY_API_KEYS_FILE or --api-keys-file to serve the network")

    # --- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def from_env_and_args(cls, args: Any = None, env: Mapping[str, str] | None = None,
                          **overrides: Any) -> "GatewaySettings":
        """Settings from ``TTS_GATEWAY_*`` variables, then `args` (an argparse Namespace; None values are "not
        given"), then keyword overrides (tests)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, ENV_PREFIX + f.name.upper())
        if args is not None:
            for f in fields(cls):
                value = getattr(args, f.name, None)
                if value is not None:
                    values[f.name] = _parse(f.name, value, "--" + f.name.replace("_", "-")) \
                        if isinstance(value, str) else _normalize(f.name, value)
        values.update({k: _normalize(k, v) for k, v in overrides.items()})
        return cls(**values)

    def with_(self, **changes: Any) -> "GatewaySettings":
        return replace(self, **changes)


_INTS = {"port", "max_jobs", "max_concurrent_per_key", "max_requests_per_minute", "max_upload_bytes",
         "max_text_chars", "max_job_chars"}
_FLOATS = {"request_timeout_s", "max_voice_seconds"}
_PATHS = {"data_dir", "api_keys_file"}
_LISTS = {"api_keys", "cors_origins"}


def _normalize(name: str, value: Any) -> Any:
    if name in _PATHS and value is not None:
        return Path(value)
    if name in _LISTS and isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    if name in _LISTS and isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


def _parse(name: str, raw: Any, where: str) -> Any:
    """A string from the environment or a flag, as the field's type; errors name the variable or flag."""
    text = str(raw).strip()
    try:
        if name in _INTS:
            return int(text)
        if name in _FLOATS:
            return float(text)
    except ValueError:
        raise ConfigError(f"{where}={text!r} is not a number", f"set {where} to a number") from None
    return _normalize(name, text)
