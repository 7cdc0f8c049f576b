"""Server fixtures: an app on TestClient, and a real uvicorn on 127.0.0.1 in a background thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from aptserve.server.app import create_app
from aptserve.server.edge import uvicorn_config
from aptserve.server.settings import Settings


def make_settings(tmp_path, **overrides) -> Settings:
    values = {"model": "tiny", "data_dir": tmp_path / "data", "port": 0, "batch_wait_ms": 20.0, "log_level": "warning"}
    return Settings(**(values | overrides))


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 at a free port until `stop()`, configured as `aptserve serve` runs it."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, ready: bool = True) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.server.servers):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        if ready:
            self.wait_ready()
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("server never became ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture
def live_server_factory(tmp_path) -> Iterator:
    """Start real servers with `factory(**settings_overrides)`; all are stopped at the end of the test."""
    servers: list[LiveServer] = []

    def start(ready: bool = True, **overrides) -> LiveServer:
        server = LiveServer(create_app(make_settings(tmp_path, **overrides))).start(ready)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(live_server_factory) -> LiveServer:
    return live_server_factory()


class GenerationGate:
    """Instruments the engine's pipeline: records each chunk it produces, and can hold it before chunk `hold_at`
    until the test calls `release()`; this makes event-order assertions deterministic without timing."""

    def __init__(self, services, hold_at: int | None = None, timeout: float = 60.0):
        self.pipeline = services.worker.pipeline
        self.original = self.pipeline.generate
        self.hold_at, self.timeout = hold_at, timeout
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        self.holding = threading.Event()

    def record(self, event: str) -> None:
        with self.lock:
            self.events.append(event)

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> GenerationGate:
        def generate(request, cancelled=lambda: False):
            for chunk in self.original(request, cancelled):
                if self.hold_at is not None and chunk.index == self.hold_at and not self.released.is_set():
                    self.holding.set()
                    released = self.released.wait(self.timeout)
                    self.record("released" if released else "hold timed out")
                self.record(f"generated {chunk.index}/{chunk.num_chunks} batch {chunk.frames.shape[0]}")
                yield chunk

        self.pipeline.generate = generate
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.pipeline.generate = self.original


def services_of(server: LiveServer):
    return server.app.state.services
