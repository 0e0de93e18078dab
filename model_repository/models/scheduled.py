"""What the two decoupled models in front of a batching scheduler thread share (`gpt_decoder`, `s2mel`): `execute`
only enqueues (or cancels), the scheduler answers from its own thread, and every message to the server goes under
one IPC lock because the Python backend's messaging is not safe from several threads at once.

A subclass sets `scheduler`, `metrics`, `_ipc_lock`, `_reported` in `setup`, `queue_full` to its scheduler's
queue-bound exception, and provides `_parse(request, sender)`.
"""

from __future__ import annotations

from engine_ref.errors import CapacityError
from model_repository import contract as c
from model_repository.models.base import PythonModel


class ScheduledModel(PythonModel):
    queue_full: type[Exception] = Exception

    def _parse(self, request, sender):  # overridden: the scheduler's request for one Triton request
        raise NotImplementedError

    def _count(self, name: str, total: int, description: str) -> None:
        """Raise a counter to the scheduler's running total."""
        self.metrics.inc(name, total - self._reported.get(name, 0), description)
        self._reported[name] = total

    def _cancelled(self, sender) -> bool:
        with self._ipc_lock:
            return bool(sender.is_cancelled())

    def _send(self, sender, response=None) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        with self._ipc_lock:
            if response is None:
                sender.send(flags=final)
            else:
                sender.send(response, flags=final)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.check_internal(request)
                if bool(self.scalar(self.tensor(request, c.CANCEL.name)) or False):
                    self.scheduler.cancel(self.text_of(self.tensor(request, c.SEQUENCE_ID.name)) or "")
                    self._send(sender)
                    continue
                self.scheduler.submit(self._parse(request, sender))
            except self.queue_full as exc:
                self._send(sender, self.error_response(CapacityError(f"the server is at capacity ({exc})",
                                                                     "retry later or scale out")))
            except Exception as exc:
                self._send(sender, self.error_response(exc))
        return None

    def finalize(self) -> None:
        self.scheduler.stop()
