"""The server's edge: the limits and browser rules applied before a request reaches a route, uvicorn's HTTP protocol
with a deadline and a size limit for request heads, the log filter that keeps query keys out of uvicorn's log, and
the uvicorn config `aptserve serve` runs."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import h11
import uvicorn
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from aptserve.server.errors import APIError, envelope
from aptserve.server.settings import Settings

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
QUERY_KEY = re.compile(r"([?&]api_key=)[^&\s]*", re.IGNORECASE)
HEAD_END = re.compile(rb"\r?\n\r?\n")
PLAIN_ERROR_CODES = {400: "invalid_range", 416: "range_not_satisfiable"}  # Starlette's own answers to a bad Range


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """A request without Origin is not from a browser; a browser may always talk to the server that served its page."""
    if origin is None or "*" in allowed or origin in {entry.rstrip("/") for entry in allowed}:
        return True
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is over the limit of {limit} bytes.", "body_too_large")


class EdgeMiddleware:
    """Pure ASGI, in front of the routes: refuses writes from other origins (403) and bodies over the limit (413: by
    Content-Length before any byte is read, else as they arrive), gives a body `body_timeout_s` to arrive (408), and
    turns plain-text error responses (Starlette's Range errors) into the envelope."""

    def __init__(self, app, settings: Settings, on_error: Callable[[int, str | None], None] | None = None):
        self.app, self.settings, self.on_error = app, settings, on_error

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s, headers = self.settings, Headers(scope=scope)
        length, refusal = headers.get("content-length", ""), None
        if scope["method"] in UNSAFE_METHODS and not origin_allowed(
            headers.get("origin"), headers.get("host"), s.allowed_origins
        ):
            refusal = APIError(403, "Requests from this origin are not allowed.", "origin_not_allowed")
        elif length.isdigit() and int(length) > s.max_body_bytes:
            refusal = body_too_large(s.max_body_bytes)
        if refusal is not None:
            self.count(refusal.status, refusal.code)
            response = JSONResponse(refusal.body(), refusal.status, headers={"connection": "close"})
            return await response(scope, receive, send)
        has_body = length not in ("", "0") or "transfer-encoding" in headers
        exchange = Exchange(receive, send, has_body, s, self.count)
        await self.app(scope, exchange.receive, exchange.send)

    def count(self, status: int, code: str | None) -> None:
        if self.on_error is not None:
            self.on_error(status, code)


class Exchange:
    """One request's body on the way in (counted, with a deadline) and its response on the way out."""

    def __init__(self, receive, send, has_body: bool, settings: Settings, count: Callable[[int, str | None], None]):
        self._receive, self._send, self.count = receive, send, count
        self.limit, self.timeout = settings.max_body_bytes, settings.body_timeout_s
        self.received, self.complete, self.deadline = 0, not has_body, None
        self.error_start: dict[str, Any] | None = None  # a plain-text error response, held until its body is in
        self.error_body = b""

    async def receive(self) -> dict[str, Any]:
        if self.complete:
            return await self._receive()
        loop = asyncio.get_running_loop()
        self.deadline = self.deadline or loop.time() + self.timeout
        try:
            message = await asyncio.wait_for(self._receive(), self.deadline - loop.time())
        except asyncio.TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.timeout:g} s.", "body_timeout") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.received > self.limit:
                raise body_too_large(self.limit)
        return message

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = Headers(raw=message.get("headers", []))
            if not self.complete and "connection" not in headers:  # an unread body would hold the connection
                message = {**message, "headers": [*headers.raw, (b"connection", b"close")]}
            if message["status"] >= 400 and not headers.get("content-type", "").startswith("application/json"):
                self.error_start = message
                return
        elif self.error_start is not None:
            self.error_body += message.get("body", b"")
            if not message.get("more_body", False):
                await self.send_envelope()
            return
        await self._send(message)

    async def send_envelope(self) -> None:
        start, status = self.error_start, self.error_start["status"]
        message = self.error_body.decode("utf-8", "replace").strip() or f"{HTTPStatus(status).phrase}."
        code = PLAIN_ERROR_CODES.get(status, "http_error")
        self.count(status, code)
        data = json.dumps(envelope(status, message, code)).encode()
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await self._send({**start, "headers": headers})
        await self._send({"type": "http.response.body", "body": data})


class EdgeH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a size limit and a deadline for each request head, the deadline counted from the
    connection's start or from the previous response (a client trickling its headers would otherwise hold the
    connection forever), and its refusals of a malformed or oversized head in the error envelope."""

    def __init__(self, *args, max_head_bytes: int, head_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_head_bytes, self.head_timeout_s = max_head_bytes, head_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.expect_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.head_timer is not None:
            self.head_timer.cancel()

    def expect_head(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        cycle = self.cycle

        def expire() -> None:  # no new request since, none in progress, not handed over to a WebSocket
            idle = cycle is None or cycle.response_complete
            if self.cycle is cycle and idle and self.transport.get_protocol() is self:
                self.transport.close()

        self.head_timer = self.loop.call_later(self.head_timeout_s, expire)

    def data_received(self, data: bytes) -> None:
        # h11 applies its own limit only to a head still incomplete, so a long one arriving in one read would pass.
        if self.conn.their_state is h11.IDLE:
            pending = self.conn.trailing_data[0] + data
            end = HEAD_END.search(pending)
            if (end.start() if end else len(pending)) > self.max_head_bytes:
                message = f"The request head is over the limit of {self.max_head_bytes} bytes."
                return self.refuse(431, message, "headers_too_large")
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        self.refuse(400, "The request is not valid HTTP/1.1.", "invalid_http")

    def refuse(self, status: int, message: str, code: str) -> None:
        data = json.dumps(envelope(status, message, code)).encode()
        head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        head += f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
        self.transport.write(head.encode() + data)
        self.transport.close()


class RedactQueryKeys(logging.Filter):
    """Keeps `?api_key=` values (old WebSocket clients and demo-page links send them) out of uvicorn's log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(QUERY_KEY.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args)
        return True


REDACT_QUERY_KEYS = RedactQueryKeys()  # one instance: adding it again to a logger is a no-op


def uvicorn_config(app) -> uvicorn.Config:
    """How `aptserve serve` (and the live-server tests) run `app`: h11 with the head limits, the keep-alive timeout,
    the WebSocket message limit, and query keys redacted from uvicorn's access and connection log."""
    s: Settings = app.state.services.settings
    config = uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        log_level=s.log_level,
        http=functools.partial(EdgeH11Protocol, max_head_bytes=s.max_header_bytes, head_timeout_s=s.header_timeout_s),
        h11_max_incomplete_event_size=s.max_header_bytes,
        timeout_keep_alive=s.keep_alive_timeout_s,
        ws_max_size=s.ws_max_message_bytes,
    )
    for name in ("uvicorn.access", "uvicorn.error"):  # the loggers the access and WebSocket lines go to
        logging.getLogger(name).addFilter(REDACT_QUERY_KEYS)
    return config
