"""The thread that drives a batching scheduler (the decoder's and s2mel's): sleep until there is work, run one
iteration, survive any failure no single request owns, and, if the thread itself dies, answer everyone and report it.

Both schedulers share this so that a change to the lifecycle (wake-up, stop, the fatal path the stubs turn into an
exit) is made once. A subclass provides `_queue` and `_live` (deque / list), `iterate()`, `_fail_all(message)` and
`_stopped(req)` (the result a queued request gets when the thread ends), and sets `_on_fatal` and `_loop_name`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)


class SchedulerLoop:
    _loop_name = "scheduler"
    _on_fatal: Callable[[BaseException], None] | None = None

    def _init_loop(self) -> None:
        self.alive = True
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False

    def start(self):
        self._thread = threading.Thread(target=self._run, name=f"{self._loop_name}-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout)

    # subclass hooks
    def iterate(self) -> None:
        raise NotImplementedError

    def _fail_all(self, message: str) -> None:
        raise NotImplementedError

    def _stopped(self, req: Any) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        fatal: BaseException | None = None
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._queue and not self._live:
                        self._wake.wait()
                    if self._stop:
                        break
                try:
                    self.iterate()
                except Exception as exc:  # a failure no single request owns: fail the live batch, keep serving
                    log.exception("%s iteration failed", self._loop_name)
                    self._fail_all(f"{self._loop_name} failure: {exc}")
        except BaseException as exc:  # the thread itself is dying: nobody would answer again
            fatal = exc
            raise
        finally:
            with self._lock:
                self.alive = False
                stopping = self._stop
                queued, self._queue = list(self._queue), deque()
            for req in queued:
                self._stopped(req)
            self._fail_all(f"{self._loop_name} scheduler stopped")
            if not stopping and self._on_fatal is not None:
                self._on_fatal(fatal or RuntimeError(f"{self._loop_name} scheduler exited"))
