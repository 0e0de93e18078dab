"""The durable job store: one table of jobs in SQLite (default, one file) or PostgreSQL (several gateway replicas).

A job row holds what was asked (the request JSON), where it is (state, progress JSON) and who works on it
(`claimed_by`, `heartbeat_at`, `attempts`). Workers take jobs with `claim`, a single atomic statement:
- PostgreSQL: ``UPDATE ... WHERE id = (SELECT id ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING``: concurrent
  claimers skip the row another transaction holds, and the outer WHERE re-checks the state, so two replicas can
  never both take a job;
- SQLite: ``UPDATE ... WHERE id = (SELECT ...) AND <still claimable> RETURNING``: SQLite runs one writer at a
  time, so the same statement is atomic across processes sharing the file.
A worker's heartbeat refreshes `heartbeat_at`; a running job whose heartbeat is older than `stale_after_s` belongs
to a dead replica (or a killed gateway) and is claimable again, so it resumes elsewhere from its finished parts.
Every write a worker makes is guarded by ``claimed_by = <worker>``: a worker that lost its claim cannot overwrite
the new owner's progress. Times come from the database's clock, so replicas' clocks need not agree.

Calls are synchronous (sqlite3, psycopg 3) and serialised per store by a lock; async code calls them through
`asyncio.to_thread`.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from engine_ref.errors import ConfigError, TTSError

__all__ = ["JobRecord", "JobStore", "SqliteJobStore", "PostgresJobStore", "open_store", "new_job_id",
           "is_job_id", "STATES", "ACTIVE_STATES", "TERMINAL_STATES", "StoreError"]

STATES = ("queued", "running", "encoding", "succeeded", "failed", "cancelled")
ACTIVE_STATES = ("running", "encoding")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
_JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")


class StoreError(TTSError):
    """The job database cannot be reached or used."""


def new_job_id() -> str:
    return "job_" + secrets.token_hex(16)


def is_job_id(value: str) -> bool:
    """Whether `value` can be a job id: the only form that ever becomes a path (no traversal possible)."""
    return isinstance(value, str) and bool(_JOB_ID.match(value))


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    state: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    request: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    claimed_by: str | None
    heartbeat_at: float | None
    attempts: int
    cancel_requested: bool

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


_COLUMNS = ("id", "owner", "state", "created_at", "updated_at", "started_at", "finished_at", "request", "progress",
            "result", "error", "claimed_by", "heartbeat_at", "attempts", "cancel_requested")
_SELECT = ", ".join(_COLUMNS)
_CLAIMABLE = ("((state = 'queued' AND cancel_requested = 0) OR "
              "(state IN ('running', 'encoding') AND cancel_requested = 0 AND heartbeat_at < {now} - ?))")


def _record(row: Iterable[Any]) -> JobRecord:
    d = dict(zip(_COLUMNS, row))
    for key in ("request", "progress", "result"):
        d[key] = json.loads(d[key]) if d[key] else ({} if key != "result" else None)
    d["attempts"] = int(d["attempts"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    for key in ("created_at", "updated_at", "started_at", "finished_at", "heartbeat_at"):
        d[key] = None if d[key] is None else float(d[key])
    return JobRecord(**d)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class JobStore:
    """Backend-neutral SQL; subclasses give the connection, the placeholder style and the clock expression."""

    NOW = ""  # SQL for the database's current time in epoch seconds
    SKIP_LOCKED = ""  # row-lock clause of the claim's inner SELECT
    ORDER = ""  # insertion order (the clock's resolution cannot tell apart jobs submitted in the same millisecond)
    SCHEMA = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # --- backend hooks ----------------------------------------------------------------------------------------------
    def _execute(self, sql: str, args: tuple = (), fetch: str = "none") -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql.replace("{now}", self.NOW).replace("{order}", self.ORDER)

    # --- jobs -------------------------------------------------------------------------------------------------------
    def create(self, owner: str, request: dict[str, Any], progress: dict[str, Any] | None = None,
               job_id: str | None = None) -> JobRecord:
        job_id = job_id or new_job_id()
        if not is_job_id(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        row = self._execute(self._sql(
            f"INSERT INTO jobs (id, owner, state, created_at, updated_at, request, progress, attempts, "
            f"cancel_requested) VALUES (?, ?, 'queued', {{now}}, {{now}}, ?, ?, 0, 0) RETURNING {_SELECT}"),
            (job_id, owner, _dump(request), _dump(progress or {})), fetch="one")
        return _record(row)

    def get(self, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        row = self._execute(f"SELECT {_SELECT} FROM jobs WHERE id = ?", (job_id,), fetch="one")
        return _record(row) if row else None

    def list(self, owner: str | None = None, limit: int = 100, states: Iterable[str] | None = None) -> list[JobRecord]:
        """Newest first; `owner` None lists everyone's."""
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if states:
            states = [s for s in states if s in STATES]
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(states)
        sql = f"SELECT {_SELECT} FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = self._execute(self._sql(sql + " ORDER BY {order} DESC LIMIT ?"), (*args, int(limit)), fetch="all")
        return [_record(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._execute("SELECT state, COUNT(*) FROM jobs GROUP BY state", fetch="all")
        out = {s: 0 for s in STATES}
        out.update({state: int(n) for state, n in rows})
        return out

    def claim(self, worker: str, stale_after_s: float) -> JobRecord | None:
        """Take the oldest claimable job (queued, or running with a stale heartbeat) for `worker`, atomically."""
        # A dead replica's job that was asked to cancel has nobody left to cancel it: do it here.
        self._execute(self._sql(
            "UPDATE jobs SET state = 'cancelled', finished_at = {now}, updated_at = {now}, claimed_by = NULL "
            "WHERE state IN ('running', 'encoding') AND cancel_requested = 1 AND heartbeat_at < {now} - ?"),
            (float(stale_after_s),))
        claimable = self._sql(_CLAIMABLE)
        row = self._execute(self._sql(
            f"UPDATE jobs SET state = 'running', claimed_by = ?, heartbeat_at = {{now}}, updated_at = {{now}}, "
            f"started_at = COALESCE(started_at, {{now}}), attempts = attempts + 1 "
            f"WHERE id = (SELECT id FROM jobs WHERE {claimable} ORDER BY {{order}} LIMIT 1{self.SKIP_LOCKED}) "
            f"AND {claimable} RETURNING {_SELECT}"),
            (worker, float(stale_after_s), float(stale_after_s)), fetch="one")
        return _record(row) if row else None

    def heartbeat(self, job_id: str, worker: str, progress: dict[str, Any] | None = None) -> JobRecord | None:
        """Refresh the claim (and progress); None when `worker` no longer holds the job."""
        sets = "heartbeat_at = {now}, updated_at = {now}" + (", progress = ?" if progress is not None else "")
        args = ((_dump(progress),) if progress is not None else ()) + (job_id, worker)
        row = self._execute(self._sql(
            f"UPDATE jobs SET {sets} WHERE id = ? AND claimed_by = ? AND state IN ('running', 'encoding') "
            f"RETURNING {_SELECT}"), args, fetch="one")
        return _record(row) if row else None

    def update(self, job_id: str, worker: str, *, state: str | None = None, progress: dict[str, Any] | None = None,
               result: dict[str, Any] | None = None, error: str | None = None) -> JobRecord | None:
        """Change a claimed job; a terminal `state` also releases the claim. None when the claim is not ours."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        sets, args = ["updated_at = {now}", "heartbeat_at = {now}"], []
        if state is not None:
            sets.append("state = ?")
            args.append(state)
            if state in TERMINAL_STATES:
                sets.append("finished_at = {now}")
                sets.append("claimed_by = NULL")
        for column, value in (("progress", progress), ("result", result)):
            if value is not None:
                sets.append(f"{column} = ?")
                args.append(_dump(value))
        if error is not None:
            sets.append("error = ?")
            args.append(error)
        row = self._execute(self._sql(
            f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND claimed_by = ? "
            f"AND state IN ('running', 'encoding') RETURNING {_SELECT}"), (*args, job_id, worker), fetch="one")
        return _record(row) if row else None

    def release(self, job_id: str, worker: str, progress: dict[str, Any] | None = None) -> bool:
        """Give a claimed job back to the queue (a gateway shutting down): the next claimer resumes it at once."""
        sets = "state = 'queued', claimed_by = NULL, heartbeat_at = NULL, updated_at = {now}"
        args: tuple = ()
        if progress is not None:
            sets += ", progress = ?"
            args = (_dump(progress),)
        row = self._execute(self._sql(
            f"UPDATE jobs SET {sets} WHERE id = ? AND claimed_by = ? AND state IN ('running', 'encoding') "
            f"RETURNING id"), (*args, job_id, worker), fetch="one")
        return row is not None

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel: a queued job at once; a running one is flagged for its worker (which stops its Triton requests).
        Terminal jobs are left as they are. None when there is no such job."""
        if not is_job_id(job_id):
            return None
        self._execute(self._sql(
            "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = {now}, updated_at = {now} "
            "WHERE id = ? AND state = 'queued'"), (job_id,))
        self._execute(self._sql(
            "UPDATE jobs SET cancel_requested = 1, updated_at = {now} "
            "WHERE id = ? AND state IN ('running', 'encoding')"), (job_id,))
        return self.get(job_id)

    def finish_cancel(self, job_id: str, worker: str) -> JobRecord | None:
        return self.update(job_id, worker, state="cancelled")

    def delete(self, job_id: str) -> bool:
        """Remove a terminal job's row (its files are the caller's); active jobs are never deleted."""
        if not is_job_id(job_id):
            return False
        row = self._execute("DELETE FROM jobs WHERE id = ? AND state IN ('succeeded', 'failed', 'cancelled') "
                            "RETURNING id", (job_id,), fetch="one")
        return row is not None


_SCHEMA_COLUMNS = """
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    request TEXT NOT NULL,
    progress TEXT NOT NULL,
    result TEXT,
    error TEXT,
    claimed_by TEXT,
    heartbeat_at {real},
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
"""


class SqliteJobStore(JobStore):
    """One SQLite file (WAL journal, so readers never wait for the writer); safe across processes on one host."""

    NOW = "((julianday('now') - 2440587.5) * 86400.0)"
    SKIP_LOCKED = ""
    ORDER = "rowid"

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS jobs ({_SCHEMA_COLUMNS.format(real='REAL')})")
            self._conn.execute("CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at)")
            self._conn.execute("CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs (owner, created_at)")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the job database {self.path} ({exc})",
                             "check that data_dir is writable and not on a network file system") from None

    def _execute(self, sql: str, args: tuple = (), fetch: str = "none") -> Any:
        with self._lock:
            try:
                cur = self._conn.execute(sql, args)
                rows = cur.fetchall()  # all rows: a RETURNING statement only completes when stepped to its end
                cur.close()
                return (rows[0] if rows else None) if fetch == "one" else rows if fetch == "all" else None
            except sqlite3.Error as exc:
                raise StoreError(f"job database error ({exc})", "check the disk under data_dir") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresJobStore(JobStore):
    """PostgreSQL through psycopg 3 (autocommit: every statement is its own transaction; `claim` is one statement)."""

    NOW = "extract(epoch from clock_timestamp())::double precision"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    ORDER = "seq"

    def __init__(self, url: str, connect_timeout_s: float = 10.0):
        super().__init__()
        try:
            import psycopg
        except ImportError:
            raise ConfigError("a PostgreSQL job store needs psycopg 3",
                              "pip install 'triton-tts[gateway]' (it brings psycopg[binary])") from None
        self._psycopg = psycopg
        self.url = url
        self._timeout = connect_timeout_s
        self._conn = self._connect()
        with self._lock, self._conn.transaction():
            # Replicas starting together: one creates the table, the others wait for it (an advisory lock).
            self._conn.execute("SELECT pg_advisory_xact_lock(7283915)")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS jobs "
                               f"({_SCHEMA_COLUMNS.format(real='DOUBLE PRECISION')}, seq BIGSERIAL)")
            self._conn.execute("CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq)")
            self._conn.execute("CREATE INDEX IF NOT EXISTS jobs_owner_seq ON jobs (owner, seq)")

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self._timeout)))
        except self._psycopg.Error as exc:
            raise StoreError(f"cannot connect to the job database ({str(exc).strip().splitlines()[0]})",
                             "check db_url (postgresql://user:pass@host:port/db) and that the server is up") from None

    def _execute(self, sql: str, args: tuple = (), fetch: str = "none") -> Any:
        sql = sql.replace("?", "%s")
        with self._lock:
            for attempt in (1, 2):
                try:
                    cur = self._conn.execute(sql, args)
                    if fetch == "one":
                        return cur.fetchone()
                    if fetch == "all":
                        return cur.fetchall()
                    return None
                except self._psycopg.OperationalError as exc:
                    if attempt == 2 or not self._conn.closed:
                        raise StoreError(f"job database error ({str(exc).strip().splitlines()[0]})",
                                         "check the PostgreSQL server") from None
                    self._conn = self._connect()  # the connection dropped (server restart): once more
                except self._psycopg.Error as exc:
                    raise StoreError(f"job database error ({str(exc).strip().splitlines()[0]})",
                                     "check the PostgreSQL server and the gateway version") from None
        return None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_store(url: str) -> JobStore:
    """The store for a URL: ``sqlite:///path`` or ``postgresql://...`` (GatewaySettings.database_url)."""
    if url.startswith("sqlite:///"):
        return SqliteJobStore(url[len("sqlite:///"):])  # sqlite:////abs/path or sqlite:///relative/path
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresJobStore(url)
    raise ConfigError(f"unsupported job database URL {url.split('://')[0]}://...",
                      "use sqlite:///path/to/jobs.sqlite3 or postgresql://user:pass@host/db")
