"""Shared by the catalog, schemathesis, load and crash tests: `aptserve serve` in a subprocess, as a user runs it
(the CLI's uvicorn, its own PID for memory, files and ffmpeg children), its log kept in a file the tests read."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# What a response must never carry: a traceback or a path on the server's disk.
LEAK_MARKERS = ("Traceback", 'File "', "/tmp/", "/work/", "/root/", "/home/", "site-packages", '.py"', sys.prefix)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leaks(text: str, *extra: str) -> list[str]:
    """The markers of a traceback or a server path found in `text`."""
    return [marker for marker in (*LEAK_MARKERS, *extra) if marker and marker in text]


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (ffmpeg encoders, for the server)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def cli_flags(settings: dict) -> list[str]:
    """Settings as `aptserve serve` flags: `max_queue=4` -> `--max-queue 4`, booleans `--x` or `--no-x`."""
    flags = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


class ServerProcess:
    """`python -m aptserve serve` on 127.0.0.1 at a free port with `settings` as flags; model tiny, no warm-up and
    log level warning unless overridden."""

    def __init__(self, data_dir: Path, log_path: Path, **settings):
        self.log_path, self.port = log_path, free_port()
        values = {"model": "tiny", "warmup": False, "log_level": "warning"} | settings
        values |= {"port": self.port, "data_dir": data_dir}
        self.command = [sys.executable, "-m", "aptserve", "serve", *cli_flags(values)]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout: float = 180.0) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the server never became ready:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def resident_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_BYTES

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def children(self) -> list[int]:
        return children_of(self.pid)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (uvicorn drains open requests, then the lifespan shuts down); SIGKILL if it hangs."""
        if not self.alive():
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(30)


@pytest.fixture(scope="module")
def serve(tmp_path_factory) -> Iterator:
    """`serve(data_dir=None, **settings)` starts a `ServerProcess`; every one is stopped at the end of the module."""
    servers: list[ServerProcess] = []

    def start(data_dir: Path | None = None, **settings) -> ServerProcess:
        folder = tmp_path_factory.mktemp("serve")
        server = ServerProcess(data_dir or folder / "data", folder / "server.log", **settings)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
