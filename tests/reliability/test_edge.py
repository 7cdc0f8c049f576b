"""Limits at the edge against a real uvicorn, spoken to in raw HTTP: body and header size, read timeouts, what a 5xx
does to its connection, browser-only bodies and origins, the demo page's headers, and keys kept out of the log."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import socket
import time

import httpx
import pytest
import websockets
from fastapi.testclient import TestClient

from aptserve.server.app import create_app
from tests.server.conftest import LiveServer, make_settings

LIMIT = 1024  # max_body_bytes in these tests


@pytest.fixture
def live(tmp_path):
    """Start real servers with `live(**settings_overrides)`; all are stopped at the end of the test."""
    servers: list[LiveServer] = []

    def start(**overrides) -> LiveServer:
        values = {"warmup": False, "max_body_bytes": LIMIT} | overrides
        servers.append(LiveServer(create_app(make_settings(tmp_path, **values))).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(make_settings(tmp_path_factory.mktemp("edge"), warmup=False, allowed_origins="http://app.example"))
    with TestClient(app) as client:
        yield client


def exchange(server: LiveServer, data: bytes, wait: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes, read until the server closes or `wait` passes: (what came back, whether it closed)."""
    reply = bytearray()
    deadline = time.monotonic() + wait
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before it has read everything
            sock.sendall(data)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                return bytes(reply), True
            if not piece:
                return bytes(reply), True
            reply += piece
    return bytes(reply), False


def parse(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def request_head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


def assert_envelope(body: bytes, code: str) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert "Traceback" not in error["message"] and not re.search(r"/\w+/", error["message"]), error  # no paths
    return error


def test_a_body_over_the_limit_is_refused_before_it_is_read(live):
    server = live()
    json_head = request_head("POST", "/v1/videos", "Content-Type: application/json", "Content-Length: 200000000")
    reply, closed = exchange(server, json_head + b'{"prompt": "')
    status, headers, body = parse(reply)
    assert closed and status == 413 and headers["connection"] == "close"
    assert str(LIMIT) in assert_envelope(body, "body_too_large")["message"]

    form_head = request_head(
        "POST", "/v1/videos", "Content-Type: multipart/form-data; boundary=x", "Content-Length: 50000000"
    )
    reply, closed = exchange(server, form_head + b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n')
    assert closed and parse(reply)[0] == 413

    chunk = b"a" * 600  # no Content-Length: counted as it arrives
    chunked = request_head("POST", "/v1/videos", "Content-Type: application/json", "Transfer-Encoding: chunked")
    reply, closed = exchange(server, chunked + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 3)
    status, headers, body = parse(reply)
    assert closed and status == 413
    assert_envelope(body, "body_too_large")


def test_headers_over_the_limit_are_refused(live):
    server = live(max_header_bytes=4096)
    reply, closed = exchange(server, request_head("GET", "/healthz", "X-Padding: " + "a" * 65536))
    status, _, body = parse(reply)
    assert closed and status == 431
    assert_envelope(body, "headers_too_large")
    assert httpx.get(server.url + "/healthz", headers={"X-Padding": "a" * 1024}).status_code == 200


def test_a_body_shorter_than_its_content_length_times_out(live):
    server = live(body_timeout_s=0.5)
    head = request_head("POST", "/v1/videos", "Content-Type: application/json", "Content-Length: 100")
    reply, closed = exchange(server, head + b'{"prompt": ')
    status, headers, body = parse(reply)
    assert closed and status == 408 and headers["connection"] == "close"
    assert_envelope(body, "body_timeout")


def test_an_unfinished_request_head_is_closed(live):
    server = live(header_timeout_s=0.5)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"X-Slow: 1\r\n"):
            sock.sendall(piece)  # trickled: each byte would reset a keep-alive timer
            time.sleep(0.2)
        assert sock.recv(1024) == b""  # closed by the server, not by the 5 s socket timeout
    assert time.monotonic() - started < 4
    # a kept-alive connection gets the same deadline for its next request head
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request_head("GET", "/healthz"))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert sock.recv(1024) == b""


def test_a_server_error_closes_its_connection(live):
    server = live()

    def broken() -> None:
        raise RuntimeError("/secret/path/db.sqlite is broken")

    server.app.add_api_route("/broken", broken)  # an unexpected error, as a bug anywhere would raise
    keep_alive = request_head("GET", "/broken", "Connection: keep-alive")
    reply, closed = exchange(server, keep_alive)
    status, headers, body = parse(reply)
    assert status == 500 and headers["connection"] == "close" and closed  # a client never reuses it
    assert_envelope(body, "internal_error")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None]
)
def test_bodies_a_browser_sends_without_preflight_get_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/videos", content=b'{"prompt": "a red circle"}', headers=headers)
    assert response.status_code == 415, response.text
    error = assert_envelope(response.content, "unsupported_media_type")
    assert "application/json" in error["message"] and "multipart/form-data" in error["message"]
    response = client.post("/v1/videos/sync", content=b"prompt=x", headers=headers)
    assert response.status_code == 415


def test_cross_origin_writes_are_refused(client):
    form = {"prompt": (None, "a red circle"), "seconds": (None, "0.5")}  # multipart, as a cross-site <form> can
    response = client.post("/v1/videos", files=form, headers={"Origin": "http://evil.example"})
    assert response.status_code == 403
    assert_envelope(response.content, "origin_not_allowed")
    assert client.delete("/v1/videos/video_1", headers={"Origin": "http://evil.example"}).status_code == 403
    for origin in ("http://testserver", "http://app.example"):  # same origin, and the allow-list
        assert client.post("/v1/videos", files=form, headers={"Origin": origin}).status_code == 200
    assert client.get("/healthz", headers={"Origin": "http://evil.example"}).status_code == 200  # reads are safe


def inline_hash(html: str, tag: str) -> str:
    text = re.search(f"<{tag}>(.*?)</{tag}>", html, re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_demo_page_sends_security_headers(client):
    response = client.get("/")
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert csp["script-src"] == inline_hash(response.text, "script")  # only the page's own script runs
    assert csp["style-src"] == inline_hash(response.text, "style")
    assert csp["connect-src"] == "'self'" and "blob:" in csp["media-src"]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_query_keys_are_redacted_from_the_log(live):
    server = live(api_keys="sekrit", log_level="info")
    records = Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        assert httpx.get(server.url + "/v1/models?api_key=sekrit&x=1").status_code == 401

        async def connect():
            async with websockets.connect(server.url.replace("http", "ws") + "/v1/videos/stream?api_key=sekrit"):
                pass

        asyncio.run(connect())
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    logged = "\n".join(records.lines)
    assert "/v1/models?api_key=[redacted]&x=1" in logged and "/v1/videos/stream?api_key=[redacted]" in logged
    assert "sekrit" not in logged
