"""What the routes call: request validation, submission, the fMP4 stream of one ticket, and background jobs.

Everything that turns engine events into bytes and metrics lives here, so the route handlers stay thin.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aptserve.engines.config import ModelConfig, frames_for_seconds, parse_size
from aptserve.engines.prompts import CaptionGrammar
from aptserve.media.encoder import EncoderError, FragmentedMP4Encoder
from aptserve.server.errors import APIError
from aptserve.server.jobs import COMPLETED, FAILED, JobStore, VideoJob, new_job_id
from aptserve.server.metrics import Metrics
from aptserve.server.protocol import Video, VideoCreateParams, VideoError
from aptserve.server.scheduler import ChunkReady, EngineRequest, Failed, Finished, QueueFull, Scheduler, Started, Ticket
from aptserve.server.settings import Settings
from aptserve.server.worker import EngineWorker

log = logging.getLogger("aptserve.services")


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
class Services:
    settings: Settings
    metrics: Metrics
    scheduler: Scheduler
    worker: EngineWorker
    store: JobStore
    model_name: str
    model_config: ModelConfig | None = None
    started_at: int = field(default_factory=lambda: int(time.time()))
    jobs: dict[str, tuple[Ticket, asyncio.Task]] = field(default_factory=dict)

    # ----- validation and submission --------------------------------------------------------------------------

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
        if width * height > s.max_pixels:
            raise APIError(
                400,
                f"size {width}x{height} exceeds the limit of {s.max_pixels} pixels per frame.",
                "invalid_size",
                "size",
            )
        seconds = s.default_seconds if params.seconds is None else params.seconds
        if not 0 < seconds <= s.max_seconds:
            raise APIError(
                400, f"seconds must be in (0, {s.max_seconds}]; got {seconds}.", "invalid_seconds", "seconds"
            )
        fps = params.fps or config.fps
        deadline = time.monotonic() + s.request_timeout_s
        return EngineRequest(
            id=request_id,
            prompt=params.prompt,
            seed=params.seed if params.seed is not None else random.randrange(2**31),
            width=width,
            height=height,
            frames=frames_for_seconds(seconds, fps),
            steps=params.steps or config.default_steps,
            fps=fps,
            deadline=deadline,
        )

    def submit(self, request: EngineRequest, force: bool = False) -> Ticket:
        if self.worker.load_error is not None:
            self.metrics.error("engine")
            raise APIError(503, f"The model failed to load: {self.worker.load_error}", "model_unavailable")
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
        started_at, encode_s, fragments = 0.0, 0.0, 0
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
                    yield Piece("started", info={"batch_size": event.batch_size, "queue_wait": event.queue_wait})
                    continue
                if isinstance(event, Failed):
                    if event.reason == "deadline":
                        m.cancel("deadline")
                    elif event.reason == "error":
                        m.error("engine")
                    raise GenerationStopped(event.reason, event.message)
                t0 = time.perf_counter()
                if isinstance(event, ChunkReady):
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
                    yield Piece(
                        "fragment",
                        data,
                        fragments,
                        {
                            "start_frame": 0 if fragments == 0 else 4 * fragments - 3,
                            "frames": 1 if fragments == 0 else 4,
                        },
                    )
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

    # ----- background jobs --------------------------------------------------------------------------------------

    def create_job(self, params: VideoCreateParams) -> VideoJob:
        job_id = new_job_id()
        request = self.engine_request(params, job_id)
        job = VideoJob(
            id=job_id,
            status="queued",
            progress=0,
            created_at=int(time.time()),
            completed_at=None,
            expires_at=None,
            model=self.model_name,
            prompt=request.prompt,
            size=f"{request.width}x{request.height}",
            seconds=_seconds_str(params.seconds if params.seconds is not None else self.settings.default_seconds),
            seed=request.seed,
            steps=request.steps,
            fps=request.fps,
            error_code=None,
            error_message=None,
            attempts=0,
            bytes=0,
            revised_prompt=self.revised_prompt(request.prompt, request.seed),
        )
        ticket = self.submit(request)  # 429 before anything is stored
        self.store.create(job)
        self.start_job(job, ticket)
        return job

    def revised_prompt(self, prompt: str, seed: int) -> str | None:
        """The prompt as the worker will encode it, where completion changes it (engines.prompts); else None."""
        if not self.settings.prompt_completion or self.model_config.prompt_grammar is None:
            return None
        completed = CaptionGrammar.from_dict(self.model_config.prompt_grammar).complete(prompt, seed)
        return completed if completed != prompt else None

    def start_job(self, job: VideoJob, ticket: Ticket) -> None:
        task = asyncio.create_task(self._run_job(job, ticket), name=f"job-{job.id}")
        self.jobs[job.id] = (ticket, task)
        task.add_done_callback(lambda _: self.jobs.pop(job.id, None))

    def resubmit(self, job: VideoJob) -> None:
        """A job recovered after a restart goes back into the queue with its original parameters."""
        width, height = parse_size(job.size)
        fps = job.fps
        request = EngineRequest(
            id=job.id,
            prompt=job.prompt,
            seed=job.seed,
            width=width,
            height=height,
            frames=frames_for_seconds(float(job.seconds), fps),
            steps=job.steps,
            fps=fps,
            deadline=time.monotonic() + self.settings.request_timeout_s,
        )
        self.start_job(job, self.submit(request, force=True))

    async def _run_job(self, job: VideoJob, ticket: Ticket) -> None:
        store = self.store
        completed = False
        try:
            with open(store.partial_path(job.id), "wb") as out:
                async for piece in self.stream(ticket):
                    if piece.kind == "started":
                        store.mark_started(job.id)
                    elif piece.kind == "fragment":
                        store.set_progress(job.id, min(99, int(100 * (piece.index + 1) / self._chunks(ticket))))
                    out.write(piece.data)
            store.mark_completed(job.id, store.finalize_file(job.id))
            completed = True
        except GenerationStopped as exc:
            if exc.reason == "shutdown":
                store.requeue(job.id)
            elif exc.reason != "deleted":
                store.mark_failed(
                    job.id, "deadline_exceeded" if exc.reason == "deadline" else "generation_failed", str(exc)
                )
        except asyncio.CancelledError:
            store.requeue(job.id)  # shutdown: recovered at the next start
            raise
        except Exception as exc:
            log.exception("job %s failed", job.id)
            store.mark_failed(job.id, "internal_error", f"internal error: {exc}")
        finally:
            if not completed:
                store.partial_path(job.id).unlink(missing_ok=True)

    @staticmethod
    def _chunks(ticket: Ticket) -> int:
        return (ticket.request.frames - 1) // 4 + 1

    def delete_job(self, job_id: str) -> VideoJob | None:
        running = self.jobs.get(job_id)
        if running is not None:
            self.cancel(running[0], "deleted")
        return self.store.delete(job_id)

    def recover_jobs(self) -> None:
        queued, failed = self.store.recover(self.settings.max_attempts)
        for job in failed:
            log.warning("job %s failed after %d interrupted attempts", job.id, job.attempts)
        for job in queued:
            self.resubmit(job)
        if queued:
            log.info("re-queued %d jobs from before the restart", len(queued))

    async def cleanup_loop(self) -> None:
        while True:
            removed = await asyncio.to_thread(self.store.cleanup_expired)
            if removed:
                log.info("deleted %d expired videos", removed)
            await asyncio.sleep(self.settings.cleanup_interval_s)


def _seconds_str(seconds: float) -> str:
    return f"{seconds:g}"


def job_to_video(job: VideoJob) -> Video:
    error = VideoError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    shared = {name: getattr(job, name) for name in Video.model_fields if name != "error" and hasattr(job, name)}
    return Video(**shared, error=error)


__all__ = ["COMPLETED", "FAILED", "GenerationStopped", "Piece", "Services", "job_to_video"]
