"""Streaming generation: POST /v1/videos/sync (whole MP4 or progressive fMP4 body) and WS /v1/videos/stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from aptserve.server.auth import Caller, KeyRing, TokenBucket, bearer, require_api_key
from aptserve.server.context import Services
from aptserve.server.edge import origin_allowed
from aptserve.server.errors import APIError, envelope
from aptserve.server.generation import Generation, GenerationStopped
from aptserve.server.protocol import SyncVideoParams, WsCancel, WsGenerate, ws_event
from aptserve.server.routes.common import ServicesDep, body_schema, read_body
from aptserve.server.scheduler import Ticket
from aptserve.server.store import new_job_id

log = logging.getLogger("aptserve.streaming")
router = APIRouter(prefix="/v1/videos", tags=["streaming"])
STREAM_ROUTE = "/v1/videos/stream"
SUBPROTOCOL = "aptserve"  # the one protocol name echoed back; a key offered as `aptserve.bearer.<key>` never is
BEARER_SUBPROTOCOL = "aptserve.bearer."


def video_headers(ticket: Ticket) -> dict[str, str]:
    r = ticket.request
    return {"x-video-id": r.id, "x-video-seed": str(r.seed), "x-video-frames": str(r.frames), "x-video-fps": str(r.fps)}


@router.post(
    "/sync",
    dependencies=[Depends(require_api_key)],
    openapi_extra=body_schema(SyncVideoParams),
    responses={200: {"content": {"video/mp4": {}}}},
)
async def generate_sync(request: Request, services: ServicesDep) -> Response:
    """Generate and return the MP4 in the response; with stream=true, a progressive fMP4 body."""
    params = await read_body(request, SyncVideoParams)
    generation = services.generation
    ticket = generation.submit(generation.engine_request(params, new_job_id()))
    if params.stream:
        return StreamingResponse(_body(services, ticket), media_type="video/mp4", headers=video_headers(ticket))
    try:
        data = await collect_while_connected(request, generation, ticket)
    except GenerationStopped as exc:
        raise _stopped_error(exc) from exc
    if data is None:  # nobody to answer; 499 (nginx's "client closed request") is what the metrics record
        return JSONResponse(envelope(499, "The client left before the video was ready.", "client_disconnected"), 499)
    return Response(data, media_type="video/mp4", headers=video_headers(ticket))


async def collect_while_connected(request: Request, generation: Generation, ticket: Ticket) -> bytes | None:
    """The whole MP4, or None when the client leaves first: then its generation is cancelled, not run to the end."""
    collect = asyncio.ensure_future(generation.collect(ticket))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():
            generation.cancel(ticket, "client_disconnected")
            return None
        return collect.result()
    finally:
        gone.cancel()
        collect.cancel()


async def _client_gone(request: Request) -> None:
    # The body is read, so the next message the server has for this request is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _body(services: Services, ticket: Ticket):
    # The status line is already sent, so a failure mid-stream can only end the body early.
    try:
        async for piece in services.generation.stream(ticket):
            if piece.data:
                services.metrics.stream_bytes.inc(len(piece.data))
                yield piece.data
    except GenerationStopped as exc:
        log.warning("stream %s ended early: %s", ticket.request.id, exc)


def _stopped_error(exc: GenerationStopped) -> APIError:
    if exc.reason == "deadline":
        return APIError(504, "The generation did not finish before its deadline.", "deadline_exceeded")
    if exc.reason == "rank_failed":  # which rank and how is in the log
        log.error("generation failed: %s", exc)
        return APIError(
            503,
            "A rank of the server's sequence-parallel group failed during this generation; the server restarts the "
            "group. Retry the request.",
            "rank_failed",
        )
    log.error("generation %s failed: %s", exc.reason, exc)  # the detail stays in the log
    return APIError(500, "The generation failed.", "generation_failed")


@router.websocket("/stream")
async def stream_socket(websocket: WebSocket) -> None:
    """Several generations per connection: JSON events, each fMP4 piece as a binary message after its event."""
    services: Services = websocket.app.state.services
    settings = services.settings
    if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), settings.allowed_origins):
        services.metrics.error("auth")
        await websocket.close(code=1008)  # before accept: the handshake gets 403, another site's page learns nothing
        return
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    # closing only after accept: before it, browsers would see a bare 1006 without our code
    if await _authenticate(websocket, services.keys, settings.header_timeout_s) is None:
        services.metrics.error("auth")
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await websocket.close(code=4401, reason="invalid api key")
        return
    services.metrics.requests.labels(STREAM_ROUTE, "101").inc()
    session = StreamSession(websocket, services)
    try:
        await session.receive_loop()
    finally:
        await session.close()


def _handshake_key(websocket: WebSocket) -> str | None:
    """A key sent with the handshake: `Authorization: Bearer`, the `aptserve.bearer.<key>` subprotocol (browsers
    cannot set headers), or `?api_key=` (old clients; redacted from the log)."""
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(BEARER_SUBPROTOCOL):
            return protocol[len(BEARER_SUBPROTOCOL) :]
    return bearer(websocket.headers.get("authorization")) or websocket.query_params.get("api_key")


async def _authenticate(websocket: WebSocket, keys: KeyRing, timeout_s: float) -> Caller | None:
    """Who is calling, by the handshake's key or else, on a keyed server, by a first message
    `{"type": "auth", "api_key": <key>}` sent within `timeout_s`; None: nobody allowed."""
    presented = _handshake_key(websocket)
    if presented is not None or keys.open:
        return keys.identify(presented)
    try:
        first = parse_message(await asyncio.wait_for(websocket.receive(), timeout_s))
    except (asyncio.TimeoutError, MessageError):
        return None
    return _caller_in(first, keys) if first.get("type") == "auth" else None


def _caller_in(message: dict, keys: KeyRing) -> Caller | None:
    key = message.get("api_key")
    return keys.identify(key) if isinstance(key, str) else None


class MessageError(Exception):
    """A client message that is not a JSON object; `code` is the error event's code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def parse_message(message: dict[str, Any]) -> dict[str, Any]:
    """One ASGI WebSocket message as the JSON object a client must send."""
    if message["type"] == "websocket.disconnect":
        raise MessageError("disconnected", "The client left.")
    if message.get("text") is None:
        raise MessageError("invalid_message", "Binary messages are not accepted; send JSON text.")
    try:
        value = json.loads(message["text"])
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        value = None
    if not isinstance(value, dict):
        raise MessageError("invalid_json", "Messages must be JSON objects.")
    return value


class StreamSession:
    """One WebSocket: a receive loop plus one task per generation; sends of an event and its bytes stay adjacent."""

    def __init__(self, websocket: WebSocket, services: Services):
        self.ws, self.services, self.settings = websocket, services, services.settings
        self.send_lock = asyncio.Lock()
        self.running: dict[str, tuple[Ticket, asyncio.Task]] = {}
        rate = self.settings.ws_messages_per_second  # in bursts of up to one second's worth
        self.messages = TokenBucket(rate, max(rate, 1.0), max(rate, 1.0), time.monotonic())

    async def send(self, event: dict, data: bytes | None = None) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event))
            if data is not None:
                await self.ws.send_bytes(data)
                self.services.metrics.stream_bytes.inc(len(data))

    async def error(self, status: int, message: str, code: str, param: str | None = None, id: str | None = None):
        if code != "queue_full":  # counted where it happens (Generation.submit), as for HTTP
            kinds = {401: "auth", 404: "not_found"}
            self.services.metrics.error(kinds.get(status, "validation" if status < 500 else "internal"))
        await self.send(ws_event("error", id=id, status=status, **envelope(status, message, code, param)))

    async def receive_loop(self) -> None:
        """Until the client leaves: a disconnect, or a send that finds it gone."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while (raw := await self.ws.receive())["type"] != "websocket.disconnect":
                await self.handle(raw)

    async def handle(self, raw: dict[str, Any]) -> None:
        if wait := self.messages.take(time.monotonic()):
            limit = self.settings.ws_messages_per_second
            text = f"Over {limit:g} messages a second: this one was dropped; the next is taken in {wait:.2f} s."
            return await self.error(429, text, "rate_limited")
        try:
            message = parse_message(raw)
        except MessageError as exc:
            return await self.error(400, exc.message, exc.code)
        kind = message.get("type")
        if kind == "generate":
            await self.start(message)
        elif kind == "cancel":
            await self.cancel(message)
        elif kind == "auth":  # a client that always authenticates by message, on a connection already allowed
            if _caller_in(message, self.services.keys) is None:
                await self.error(401, "Incorrect API key.", "invalid_api_key")
        else:
            await self.error(400, f"Unknown message type {kind!r}; use 'generate' or 'cancel'.", "invalid_type", "type")

    async def start(self, message: dict) -> None:
        limit = self.settings.ws_max_inflight
        if len(self.running) >= limit:
            text = f"This connection has {limit} generations queued or running; wait for one to end."
            await self.error(429, text, "too_many_generations")
            return
        try:
            params = WsGenerate.model_validate(message, strict=True)  # JSON: true is not 1, "5" is not 5
            request = self.services.generation.engine_request(params, new_job_id())
            ticket = self.services.generation.submit(request)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            await self.error(400, f"Invalid '{param}': {first['msg']}.", "invalid_value", param)
            return
        except APIError as exc:
            await self.error(exc.status, exc.message, exc.code, exc.param)
            return
        await self.send(
            ws_event("queued", id=request.id, position=self.services.generation.scheduler.depth(), seed=request.seed)
        )
        task = asyncio.create_task(self.run(ticket))
        self.running[request.id] = (ticket, task)
        task.add_done_callback(lambda _: self.running.pop(request.id, None))

    async def cancel(self, message: dict) -> None:
        try:
            target = WsCancel.model_validate(message).id
        except ValidationError:
            await self.error(400, "A cancel message is {'type': 'cancel', 'id': <video id>}.", "invalid_value")
            return
        matched = [ticket for video_id, (ticket, _) in self.running.items() if target in (None, video_id)]
        if not matched:
            what = f"with id '{target}'" if target else "at all"
            await self.error(404, f"No generation is running {what} on this connection.", "not_found", "id", target)
        for ticket in matched:
            self.services.generation.cancel(ticket, "client_cancel")

    async def run(self, ticket: Ticket) -> None:
        r = ticket.request
        try:
            async for piece in self.services.generation.stream(ticket):
                if piece.kind == "started":
                    await self.send(
                        ws_event(
                            "started",
                            id=r.id,
                            width=r.width,
                            height=r.height,
                            fps=r.fps,
                            frames=r.frames,
                            **piece.info,
                        )
                    )
                elif piece.kind == "init":
                    await self.send(ws_event("init", id=r.id, bytes=len(piece.data), **piece.info), piece.data)
                elif piece.kind == "fragment":
                    await self.send(
                        ws_event("chunk", id=r.id, index=piece.index, bytes=len(piece.data), **piece.info), piece.data
                    )
                else:
                    await self.send(ws_event("done", id=r.id, **piece.info))
        except GenerationStopped as exc:
            with contextlib.suppress(Exception):
                if exc.reason in ("error", "deadline", "rank_failed"):
                    error = _stopped_error(exc)
                    await self.send(ws_event("error", id=r.id, status=error.status, **error.body()))
                else:
                    await self.send(ws_event("cancelled", id=r.id, reason=exc.reason))
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client left; Generation.stream's cleanup cancels the ticket

    async def close(self) -> None:
        for ticket, task in list(self.running.values()):
            self.services.generation.cancel(ticket, "client_disconnected")
            task.cancel()
        for _, task in list(self.running.values()):
            with contextlib.suppress(BaseException):
                await task
