"""Prometheus metrics of one gateway app (its own registry: two apps in one process never share counters).

- ``tts_gateway_requests_total{route,method,status}`` and ``tts_gateway_request_seconds{route,method}``: every
  HTTP request, timed until its last body byte (a streamed speech response counts its whole duration). Routes
  are the path templates (``/v1/audio/voices/{voice}``), never raw paths, so labels stay few.
- ``tts_gateway_ttfa_seconds{format,stream_format}``: request received -> first audio byte handed to the server.
- ``tts_gateway_in_flight``: requests in progress; ``tts_gateway_audio_seconds_total``: audio produced.
- ``tts_gateway_jobs{state}``: long-form jobs by state. The job code sets it with `set_jobs(app, counts)`.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

__all__ = ["GatewayMetrics", "MetricsMiddleware", "set_jobs", "JOB_STATES"]

JOB_STATES = ("queued", "running", "encoding", "succeeded", "failed", "cancelled")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFA_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)


class GatewayMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tts_gateway_requests_total", "HTTP requests by route and status",
                                ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram("tts_gateway_request_seconds", "HTTP request duration until the last body byte",
                                 ("route", "method"), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttfa = Histogram("tts_gateway_ttfa_seconds", "speech: request received -> first audio bytes sent",
                              ("format", "stream_format"), buckets=_TTFA_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("tts_gateway_in_flight", "HTTP requests in progress", registry=self.registry)
        self.audio_seconds = Counter("tts_gateway_audio_seconds_total", "seconds of audio synthesized",
                                     registry=self.registry)
        self.jobs = Gauge("tts_gateway_jobs", "long-form jobs by state", ("state",), registry=self.registry)
        for state in JOB_STATES:
            self.jobs.labels(state=state).set(0)

    def set_jobs(self, counts: Mapping[str, int]) -> None:
        """Jobs by state (states not in `counts` become 0)."""
        for state in {*JOB_STATES, *counts}:
            self.jobs.labels(state=state).set(int(counts.get(state, 0)))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def set_jobs(app: Any, counts: Mapping[str, int]) -> None:
    """Update the jobs-by-state gauge of `app` (a FastAPI app made by gateway.app.create_app)."""
    app.state.metrics.set_jobs(counts)


def _route_of(scope: dict) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path or "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times requests until the response's last body chunk."""

    def __init__(self, app: Any, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        self.metrics.in_flight.inc()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route, method = _route_of(scope), scope.get("method", "")
            self.metrics.requests.labels(route=route, method=method, status=str(status["code"])).inc()
            self.metrics.latency.labels(route=route, method=method).observe(time.perf_counter() - start)
