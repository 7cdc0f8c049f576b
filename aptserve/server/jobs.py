"""The background job lifecycle behind /v1/videos: create, run into the store, delete, resubmit after a restart,
recover, and clean up expired videos. Generation itself goes through `Generation`; rows and files through the store."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aptserve.engines.config import parse_size
from aptserve.server.generation import Generation, GenerationStopped
from aptserve.server.protocol import Video, VideoCreateParams, VideoError
from aptserve.server.scheduler import Ticket
from aptserve.server.store import JobStore, VideoJob, new_job_id

log = logging.getLogger("aptserve.jobs")


@dataclass
class JobManager:
    generation: Generation
    store: JobStore
    running: dict[str, tuple[Ticket, asyncio.Task]] = field(default_factory=dict)

    def create(self, params: VideoCreateParams) -> VideoJob:
        job_id = new_job_id()
        request = self.generation.engine_request(params, job_id)
        seconds = params.seconds if params.seconds is not None else self.generation.settings.default_seconds
        job = VideoJob(
            id=job_id,
            status="queued",
            progress=0,
            created_at=int(time.time()),
            completed_at=None,
            expires_at=None,
            model=self.generation.model_name,
            prompt=request.prompt,
            size=f"{request.width}x{request.height}",
            seconds=f"{seconds:g}",
            seed=request.seed,
            steps=request.steps,
            fps=request.fps,
            error_code=None,
            error_message=None,
            attempts=0,
            bytes=0,
        )
        ticket = self.generation.submit(request)  # 429 before anything is stored
        self.store.create(job)
        self._start(job, ticket)
        return job

    def resubmit(self, job: VideoJob) -> None:
        """A job recovered after a restart goes back into the queue with its original parameters."""
        width, height = parse_size(job.size)
        request = self.generation.build_request(
            job.id, job.prompt, job.seed, width, height, float(job.seconds), job.steps, job.fps
        )
        self._start(job, self.generation.submit(request, force=True))

    def _start(self, job: VideoJob, ticket: Ticket) -> None:
        task = asyncio.create_task(self._run(job, ticket), name=f"job-{job.id}")
        self.running[job.id] = (ticket, task)
        task.add_done_callback(lambda _: self.running.pop(job.id, None))

    async def _run(self, job: VideoJob, ticket: Ticket) -> None:
        store = self.store
        completed = False
        try:
            with open(store.partial_path(job.id), "wb") as out:
                async for piece in self.generation.stream(ticket):
                    if piece.kind == "started":
                        store.mark_started(job.id, piece.info.get("revised_prompt"))
                    elif piece.kind == "fragment":
                        progress = int(100 * (piece.index + 1) / piece.info["chunks"])
                        store.set_progress(job.id, min(99, progress))
                    out.write(piece.data)
            store.mark_completed(job.id, store.finalize_file(job.id))
            completed = True
        except GenerationStopped as exc:
            if exc.reason == "shutdown":
                store.requeue(job.id)
            elif exc.reason != "deleted":
                code = "deadline_exceeded" if exc.reason == "deadline" else "generation_failed"
                store.mark_failed(job.id, code, str(exc))
        except asyncio.CancelledError:
            store.requeue(job.id)  # shutdown: recovered at the next start
            raise
        except Exception as exc:
            log.exception("job %s failed", job.id)
            store.mark_failed(job.id, "internal_error", f"internal error: {exc}")
        finally:
            if not completed:
                store.partial_path(job.id).unlink(missing_ok=True)

    def delete(self, job_id: str) -> VideoJob | None:
        running = self.running.get(job_id)
        if running is not None:
            self.generation.cancel(running[0], "deleted")
        return self.store.delete(job_id)

    def recover(self) -> None:
        queued, failed = self.store.recover(self.generation.settings.max_attempts)
        for job in failed:
            log.warning("job %s failed after %d interrupted attempts", job.id, job.attempts)
        for job in queued:
            self.resubmit(job)
        if queued:
            log.info("re-queued %d jobs from before the restart", len(queued))

    async def shutdown(self) -> None:
        """Stop every running job; each goes back to the queue for the next start."""
        for ticket, task in list(self.running.values()):
            ticket.cancel("shutdown")
            task.cancel()
        await asyncio.gather(*(task for _, task in list(self.running.values())), return_exceptions=True)

    async def cleanup_loop(self, interval_s: float) -> None:
        while True:
            removed = await asyncio.to_thread(self.store.cleanup_expired)
            if removed:
                log.info("deleted %d expired videos", removed)
            await asyncio.sleep(interval_s)


def job_to_video(job: VideoJob) -> Video:
    error = VideoError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    shared = {name: getattr(job, name) for name in Video.model_fields if name != "error" and hasattr(job, name)}
    return Video(**shared, error=error)
