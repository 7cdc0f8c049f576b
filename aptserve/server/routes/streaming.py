"""Streaming generation: POST /v1/videos/sync (whole MP4 or progressive fMP4 body) and WS /v1/videos/stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import APIRouter, Depends, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from aptserve.server.auth import require_api_key, websocket_key_is_valid
from aptserve.server.context import Services
from aptserve.server.errors import APIError, envelope
from aptserve.server.generation import GenerationStopped
from aptserve.server.protocol import SyncVideoParams, WsCancel, WsGenerate, ws_event
from aptserve.server.routes.common import ServicesDep, body_schema, read_body
from aptserve.server.scheduler import Ticket
from aptserve.server.store import new_job_id

log = logging.getLogger("aptserve.streaming")
router = APIRouter(prefix="/v1/videos", tags=["streaming"])
STREAM_ROUTE = "/v1/videos/stream"


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
        data = await generation.collect(ticket)
    except GenerationStopped as exc:
        raise _stopped_error(exc) from exc
    return Response(data, media_type="video/mp4", headers=video_headers(ticket))


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
    return APIError(500, str(exc), "generation_failed")


@router.websocket("/stream")
async def stream_socket(websocket: WebSocket) -> None:
    """Several generations per connection: JSON events, each fMP4 piece as a binary message after its event."""
    services: Services = websocket.app.state.services
    await websocket.accept()  # closing before accept would reach browsers as a bare 1006 without our code
    if not websocket_key_is_valid(websocket):
        services.metrics.error("auth")
        await websocket.close(code=4401, reason="invalid api key")
        return
    services.metrics.requests.labels(STREAM_ROUTE, "101").inc()
    session = StreamSession(websocket, services)
    try:
        await session.receive_loop()
    finally:
        await session.close()


class StreamSession:
    """One WebSocket: a receive loop plus one task per generation; sends of an event and its bytes stay adjacent."""

    def __init__(self, websocket: WebSocket, services: Services):
        self.ws, self.services = websocket, services
        self.send_lock = asyncio.Lock()
        self.running: dict[str, tuple[Ticket, asyncio.Task]] = {}

    async def send(self, event: dict, data: bytes | None = None) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event))
            if data is not None:
                await self.ws.send_bytes(data)
                self.services.metrics.stream_bytes.inc(len(data))

    async def error(self, status: int, message: str, code: str, param: str | None = None, id: str | None = None):
        self.services.metrics.error("validation" if status == 400 else "queue_full" if status == 429 else "internal")
        await self.send(ws_event("error", id=id, status=status, **envelope(status, message, code, param)))

    async def receive_loop(self) -> None:
        while True:
            try:
                text = await self.ws.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return
            try:
                message = json.loads(text)
                kind = message.get("type") if isinstance(message, dict) else None
            except json.JSONDecodeError:
                await self.error(400, "Messages must be JSON objects.", "invalid_json")
                continue
            if kind == "generate":
                await self.start(message)
            elif kind == "cancel":
                await self.cancel(message)
            else:
                await self.error(
                    400, f"Unknown message type {kind!r}; use 'generate' or 'cancel'.", "invalid_type", "type"
                )

    async def start(self, message: dict) -> None:
        try:
            params = WsGenerate.model_validate(message)
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
        for video_id, (ticket, _) in list(self.running.items()):
            if target in (None, video_id):
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
                if exc.reason in ("error", "deadline"):
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
