"""Prometheus metrics (DESIGN section 5): one registry per app, closed label sets, base units, sub-second buckets.

The engine worker never touches these; the API side records them from the timings the worker returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "aptserve"
STAGES = ("text_encode", "dit", "vae_decode", "encode")
# storage: the data dir refused a job's write; error: the server failed the job (both cancel its generation)
CANCEL_REASONS = ("client_disconnected", "client_cancel", "deleted", "deadline", "shutdown", "storage", "error")
ERROR_KINDS = (
    "validation", "auth", "not_found", "queue_full", "rate_limited", "engine", "encoder", "storage", "internal"
)  # fmt: skip
# build_info: what is installed and how the model really runs (the fields of engines.backends.options.RunOptions).
BUILD_LABELS = (
    "version", "model", "device", "backend", "compiler", "attention", "fp8_linears", "bf16_blocks", "fp8_emulation",
    "cuda_graphs", "channels_last", "decoder",
)  # fmt: skip
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
REALTIME_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, PREFIX
        self.requests = Counter(
            f"{p}_requests", "HTTP requests by route template and status", ("route", "status"), registry=r
        )
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds", "HTTP request latency", ("route",), buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds", "time from acceptance to start", buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage_duration = Histogram(
            f"{p}_stage_duration_seconds",
            "per-request time in each stage",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_chunk = Histogram(
            f"{p}_time_to_first_chunk_seconds",
            "acceptance to first fMP4 fragment out",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.realtime_factor = Histogram(
            f"{p}_realtime_factor", "video seconds per wall second of generation", buckets=REALTIME_BUCKETS, registry=r
        )
        self.frames_generated = Counter(f"{p}_frames_generated", "video frames produced", registry=r)
        self.stream_bytes = Counter(f"{p}_stream_bytes", "fMP4 bytes sent to streaming clients", registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "requests waiting for the engine", registry=r)
        self.shared_queue_depth = Gauge(
            f"{p}_shared_queue_depth",
            "jobs waiting in the shared (PostgreSQL) queue that no replica holds; 0 with the SQLite store",
            registry=r,
        )
        self.inflight = Gauge(f"{p}_inflight_requests", "requests accepted and not yet finished", registry=r)
        self.batch_size = Histogram(
            f"{p}_batch_size", "requests per engine forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.cancelled = Counter(f"{p}_cancelled", "generations stopped before the end", ("reason",), registry=r)
        self.errors = Counter(f"{p}_errors", "errors by kind", ("kind",), registry=r)
        self.sp_restarts = Counter(
            f"{p}_sp_restarts", "sequence-parallel group restarts after a rank died or failed", registry=r
        )
        self.device_memory = Gauge(f"{p}_device_memory_bytes", "memory held by the model's device", registry=r)
        self.build_info = Gauge(f"{p}_build_info", "build, model and how it runs", BUILD_LABELS, registry=r)
        for stage in STAGES:
            self.stage_duration.labels(stage)
        for reason in CANCEL_REASONS:
            self.cancelled.labels(reason)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)

    def set_build(self, version: str, model: str, device: str, options: dict) -> None:
        """`options`: the run options by name (`RunOptions.describe()`); lists are written comma-separated."""
        values = {"version": version, "model": model, "device": device}
        for name in BUILD_LABELS[3:]:
            value = options[name]
            values[name] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value).lower()
        self.build_info.labels(**values).set(1)

    def track_device_memory(self, read: Callable[[], float]) -> None:
        self.device_memory.set_function(read)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage in STAGES:
            if stage in timings:
                self.stage_duration.labels(stage).observe(timings[stage])

    def cancel(self, reason: str) -> None:
        self.cancelled.labels(reason if reason in CANCEL_REASONS else "client_cancel").inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind if kind in ERROR_KINDS else "internal").inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware (streaming-safe): counts HTTP requests by route template once the response ends."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "other"
            self.metrics.observe_request(template, status, time.perf_counter() - start)
