"""The generation path the routes share: validate a request against the limits, submit it, cancel it, and turn its
engine events into the fMP4 pieces of one stream (with the metrics they imply)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aptserve.engines.config import ModelConfig, frames_for_seconds, parse_size
from aptserve.engines.pipeline import request_cost
from aptserve.media.encoder import EncoderError, FragmentedMP4Encoder
from aptserve.server.errors import APIError
from aptserve.server.metrics import Metrics
from aptserve.server.protocol import VideoCreateParams
from aptserve.server.scheduler import ChunkReady, EngineRequest, Failed, Finished, QueueFull, Scheduler, Started, Ticket
from aptserve.server.settings import Settings
from aptserve.server.worker import EngineWorker

log = logging.getLogger("aptserve.generation")


class GenerationStopped(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Piece:
    """One unit of a generation's output stream."""

    kind: str  # started | init | fragment | done
    data: bytes = b""
    index: int = -1
    info: dict = field(default_factory=dict)


@dataclass
class Generation:
    settings: Settings
    metrics: Metrics
    scheduler: Scheduler
    worker: EngineWorker
    model_name: str
    model_config: ModelConfig

    # ----- requests: the one place an EngineRequest is built --------------------------------------------------

    def engine_request(self, params: VideoCreateParams, request_id: str) -> EngineRequest:
        """Resolve defaults and check limits; every problem is a 400 naming the parameter."""
        config, s = self.model_config, self.settings
        if params.model is not None and params.model != self.model_name:
            raise APIError(
                400, f"Model '{params.model}' is not served here; use '{self.model_name}'.", "model_not_found", "model"
            )
        try:
            width, height = parse_size(params.size or config.default_size)
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_size", "size") from exc
        if config.sizes and (width, height) not in config.sizes:
            listed = ", ".join(f"{w}x{h}" for w, h in config.sizes)
            raise APIError(
                400,
                f"size {width}x{height} is not served by this model; choose one of {listed}.",
                "invalid_size",
                "size",
            )
        if width * height > s.max_pixels:
            raise APIError(
                400,
                f"size {width}x{height} exceeds the limit of {s.max_pixels} pixels per frame.",
                "invalid_size",
                "size",
            )
        if height // config.vae.spatial_factor < s.sp:
            raise APIError(
                400,
                f"size {width}x{height}: the decode is split by rows across {s.sp} ranks here, so the height must be "
                f"at least {s.sp * config.vae.spatial_factor}.",
                "invalid_size",
                "size",
            )
        seconds = s.default_seconds if params.seconds is None else params.seconds
        if not 0 < seconds <= s.max_seconds:
            raise APIError(
                400, f"seconds must be in (0, {s.max_seconds}]; got {seconds}.", "invalid_seconds", "seconds"
            )
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        steps = params.steps or config.default_steps
        if steps > s.max_steps:
            raise APIError(400, f"steps must be at most {s.max_steps}; got {steps}.", "invalid_steps", "steps")
        fps = params.fps or config.fps
        self._check_cost(width, height, frames_for_seconds(seconds, fps), steps)
        return self.build_request(request_id, params.prompt, seed, width, height, seconds, steps, fps)

    def _check_cost(self, width: int, height: int, frames: int, steps: int) -> None:
        """Admission by work: the fields each within their limits can still add up to hours of engine time."""
        cost, limit = request_cost(self.model_config, width, height, frames, steps), self.settings.max_request_cost
        if cost > limit:
            raise APIError(
                400,
                f"This request would cost an estimated {cost:,} token-passes ({width}x{height}, {frames} frames, "
                f"{steps} steps), over this server's limit of {limit:,}; ask for fewer seconds, a lower fps, "
                "fewer steps or a smaller size.",
                "request_too_costly",
            )

    def build_request(
        self, request_id: str, prompt: str, seed: int, width: int, height: int, seconds: float, steps: int, fps: int
    ) -> EngineRequest:
        """Validated values -> the engine's request, its deadline counted from now."""
        return EngineRequest(
            id=request_id,
            prompt=prompt,
            seed=seed,
            width=width,
            height=height,
            frames=frames_for_seconds(seconds, fps),
            steps=steps,
            fps=fps,
            deadline=time.monotonic() + self.settings.request_timeout_s,
        )

    def submit(self, request: EngineRequest, force: bool = False) -> Ticket:
        if self.worker.load_error is not None:
            self.metrics.error("engine")
            raise APIError(503, "The model failed to load; the server log says why.", "model_unavailable")
        ticket = Ticket(request, asyncio.get_running_loop())
        try:
            self.scheduler.submit(ticket, force=force)
        except QueueFull as exc:
            self.metrics.error("queue_full")
            retry = str(self.settings.retry_after_s)
            raise APIError(
                429, f"Server is at capacity: {exc}. Retry later.", "queue_full", headers={"Retry-After": retry}
            ) from exc
        self.metrics.queue_depth.set(self.scheduler.depth())
        return ticket

    def cancel(self, ticket: Ticket, reason: str) -> None:
        if ticket.done or ticket.cancel_reason is not None:
            return
        self.metrics.cancel(reason)
        self.scheduler.cancel(ticket, reason)

    # ----- one ticket as a stream of fMP4 pieces ---------------------------------------------------------------

    async def stream(self, ticket: Ticket) -> AsyncIterator[Piece]:
        """Engine events -> init segment and fragments. Encoding chunk k runs in a thread while the engine decodes
        chunk k+1. Leaving early (client gone) cancels the ticket."""
        request, m = ticket.request, self.metrics
        encoder: FragmentedMP4Encoder | None = None
        started_at, encode_s = 0.0, 0.0
        chunks: list[ChunkReady] = []  # fragment k holds chunk k: the layout is the one the pipeline emitted
        fragments = 0
        m.inflight.inc()
        try:
            while True:
                event = await ticket.events.get()
                m.queue_depth.set(self.scheduler.depth())
                if isinstance(event, Started):
                    started_at = time.monotonic()
                    m.queue_wait.observe(event.queue_wait)
                    m.batch_size.observe(event.batch_size)
                    encoder = await asyncio.to_thread(FragmentedMP4Encoder, request.width, request.height, request.fps)
                    yield Piece("started", info=_started_info(event, request))
                    continue
                if isinstance(event, Failed):
                    if event.reason == "deadline":
                        m.cancel("deadline")
                    elif event.reason in ("error", "rank_failed"):
                        m.error("engine")
                    raise GenerationStopped(event.reason, event.message)
                t0 = time.perf_counter()
                if isinstance(event, ChunkReady):
                    chunks.append(event)
                    pieces = await asyncio.to_thread(encoder.write, event.frames)
                else:
                    pieces = await asyncio.to_thread(encoder.close)
                encode_s += time.perf_counter() - t0
                for data in pieces:
                    if data[4:8] == b"ftyp":
                        yield Piece("init", data, info={"mime": encoder.mime_type})
                        continue
                    if fragments == 0:
                        m.time_to_first_chunk.observe(time.monotonic() - ticket.accepted_at)
                    chunk = chunks[fragments]
                    info = {"start_frame": chunk.start_frame, "frames": len(chunk.frames), "chunks": chunk.num_chunks}
                    yield Piece("fragment", data, fragments, info)
                    fragments += 1
                if isinstance(event, Finished):
                    m.observe_stages({**event.timings, "encode": encode_s})
                    m.frames_generated.inc(event.frames)
                    m.realtime_factor.observe(event.frames / request.fps / max(time.monotonic() - started_at, 1e-9))
                    yield Piece("done", info={"timings": {**event.timings, "encode": encode_s}, "frames": event.frames})
                    return
        except EncoderError:
            m.error("encoder")
            raise
        finally:
            m.inflight.dec()
            if encoder is not None:
                encoder.abort()
            if not ticket.done:
                self.cancel(ticket, "client_disconnected")

    async def collect(self, ticket: Ticket) -> bytes:
        return b"".join([piece.data async for piece in self.stream(ticket)])


def _started_info(event: Started, request: EngineRequest) -> dict:
    """What a client learns when its generation starts; `revised_prompt` only where the model completed the prompt."""
    info = {"batch_size": event.batch_size, "queue_wait": event.queue_wait, "chunks": event.num_chunks}
    if event.encoded_prompt != request.prompt:
        info["revised_prompt"] = event.encoded_prompt
    return info
