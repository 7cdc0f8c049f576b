"""The background job lifecycle behind /v1/videos: create, run into the store, delete, resubmit after a restart,
recover, and clean up expired videos. Generation itself goes through `Generation`; rows and files through the store.

A storage fault fails only the job it hits, with a reason; a failure the store cannot take yet is kept and shown, and
recorded once the data dir takes writes again, so no job is left queued or in progress. Clients see fixed messages;
the detail (paths, exception text) goes to the server log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from aptserve.engines.config import parse_size
from aptserve.server.errors import APIError
from aptserve.server.generation import Generation, GenerationStopped, Piece
from aptserve.server.protocol import Video, VideoCreateParams, VideoError
from aptserve.server.scheduler import Ticket
from aptserve.server.store import (
    COMPLETED,
    FAILED,
    DatabaseUnavailable,
    JobStore,
    StorageError,
    VideoJob,
    new_job_id,
    storage_fault,
)

log = logging.getLogger("aptserve.jobs")

FAILURE_MESSAGES = {  # error code -> what a client reads
    "deadline_exceeded": "The generation did not finish before its deadline.",
    "generation_failed": "The generation failed on the server.",
    "internal_error": "The server had an error while processing this job.",
    "rank_failed": "A rank of the server's sequence-parallel group failed during this generation; the server "
    "restarts the group, so the job can be created again.",
    "storage_full": "The server ran out of storage space while writing this video.",
    "storage_unavailable": "The server could not write this video: its storage is not writable.",
}


@dataclass
class JobManager:
    generation: Generation
    store: JobStore
    running: dict[str, tuple[Ticket, asyncio.Task]] = field(default_factory=dict)
    unrecorded: dict[str, str] = field(default_factory=dict)  # job id -> failure code the store could not take yet

    def create(self, params: VideoCreateParams, owner: str | None = None) -> VideoJob:
        """Store and queue a job; a 429, 507 or 503 leaves neither a row nor queued work behind."""
        job_id = new_job_id()
        request = self.generation.engine_request(params, job_id)
        seconds = params.seconds if params.seconds is not None else self.generation.settings.default_seconds
        job = VideoJob(
            id=job_id,
            created_at=int(time.time()),
            model=self.generation.model_name,
            prompt=request.prompt,
            size=f"{request.width}x{request.height}",
            seconds=f"{seconds:g}",
            seed=request.seed,
            steps=request.steps,
            fps=request.fps,
            owner=owner,
        )
        if self.store.fault is not None and self.store.probe() is not None:
            raise self._refusal(self.store.fault)  # known unwritable (checked again now): nothing is queued
        # 429 before anything is stored; a shared queue's row is all there is until a replica claims it.
        if self.store.shared_queue:
            self._check_shared_queue()
        ticket = None if self.store.shared_queue else self.generation.submit(request)
        try:
            self.store.create(job)
        except StorageError as exc:  # no row, so no work: the engine must not generate it
            self._cancel(ticket, "storage")
            log.error("job %s refused: %s", job_id, exc)
            raise self._refusal(exc) from exc
        except BaseException:
            self._cancel(ticket, "error")
            raise
        if ticket is not None:
            self._start(job, ticket)
        return job

    def _check_shared_queue(self) -> None:
        """429 when the shared queue already holds `max_shared_queue` jobs no replica has claimed. Replicas that
        create jobs at the same moment can each pass at the bound, so it may be passed by as many jobs as they make."""
        settings, waiting = self.generation.settings, self.store.backlog()
        if waiting >= settings.max_shared_queue:
            self.generation.metrics.error("queue_full")
            raise APIError(
                429,
                f"Server is at capacity: {waiting} jobs wait in the shared queue. Retry later.",
                "queue_full",
                headers={"Retry-After": str(settings.retry_after_s)},
            )

    def _cancel(self, ticket: Ticket | None, reason: str) -> None:
        if ticket is not None:
            self.generation.cancel(ticket, reason)

    def _refusal(self, fault: StorageError) -> APIError:
        retry = {"Retry-After": str(math.ceil(self.generation.settings.storage_probe_interval_s))}
        if fault.full:
            return APIError(507, "The server is out of storage space; retry later.", fault.code, headers=retry)
        return APIError(503, "The server's storage is not writable right now; retry later.", fault.code, headers=retry)

    def get(self, job_id: str) -> VideoJob | None:
        """The job as a client sees it: with a failure the store could not take yet."""
        job = self.store.get(job_id)
        return None if job is None else self._as_seen(job)

    def list(self, after: str | None, limit: int, order: str, owner: str | None) -> tuple[list[VideoJob], bool]:
        jobs, has_more = self.store.list(after=after, limit=limit, order=order, owner=owner)
        return [self._as_seen(job) for job in jobs], has_more

    def _as_seen(self, job: VideoJob) -> VideoJob:
        code = self.unrecorded.get(job.id)
        if code is None or job.status in (COMPLETED, FAILED):
            return job
        return replace(job, status=FAILED, error_code=code, error_message=FAILURE_MESSAGES[code])

    def resubmit(self, job: VideoJob) -> None:
        """A job recovered after a restart goes back into the queue with its original parameters."""
        width, height = parse_size(job.size)
        request = self.generation.build_request(
            job.id, job.prompt, job.seed, width, height, float(job.seconds), job.steps, job.fps
        )
        self._start(job, self.generation.submit(request, force=True))

    def _start(self, job: VideoJob, ticket: Ticket) -> None:
        task = asyncio.create_task(self._run(job.id, ticket), name=f"job-{job.id}")
        self.running[job.id] = (ticket, task)
        task.add_done_callback(lambda _: self.running.pop(job.id, None))

    async def _run(self, job_id: str, ticket: Ticket) -> None:
        """Generate into the store; however it ends, the job ends completed, failed with a reason, re-queued (shutdown)
        or deleted, and its work is cancelled and its partial file removed before the outcome is recorded."""
        pieces = self.generation.stream(ticket)
        outcome = "requeue"  # a cancelled task (shutdown) is recovered at the next start
        try:
            await self._write_video(job_id, pieces)
            outcome = COMPLETED
        except GenerationStopped as exc:
            outcome = {
                "shutdown": "requeue",
                "deleted": "deleted",
                "deadline": "deadline_exceeded",
                "rank_failed": "rank_failed",
            }.get(exc.reason, "generation_failed")
            log.info("job %s stopped (%s): %s", job_id, exc.reason, exc)
        except Exception as exc:
            if (fault := storage_fault(exc)) is None:
                log.exception("job %s failed", job_id)
                outcome = "internal_error"
            else:  # the disk refused a write: this job fails, and /readyz says not ready until a probe succeeds
                self.store.fault = fault
                self.generation.metrics.error("storage")
                log.error("job %s failed: %s", job_id, fault)
                outcome = fault.code
        finally:
            if outcome != COMPLETED:  # before the stream closes, so that this is the reason counted
                self.generation.cancel(ticket, "storage" if outcome.startswith("storage") else "error")
            await pieces.aclose()
            if outcome != COMPLETED:
                with contextlib.suppress(OSError):  # first, so that the space it held is free for the record
                    self.store.partial_path(job_id).unlink(missing_ok=True)
            self._record(job_id, outcome)

    async def _write_video(self, job_id: str, pieces: AsyncIterator[Piece]) -> None:
        store = self.store
        with open(store.partial_path(job_id), "wb") as out:
            async for piece in pieces:
                if piece.kind == "started":
                    store.mark_started(job_id, piece.info.get("revised_prompt"))
                elif piece.kind == "fragment":
                    store.set_progress(job_id, min(99, int(100 * (piece.index + 1) / piece.info["chunks"])))
                out.write(piece.data)
        store.mark_completed(job_id, store.finalize_file(job_id))

    def _record(self, job_id: str, outcome: str) -> None:
        """Store how a run ended; a failure the store refuses is kept (and shown) until `storage_loop` records it."""
        try:
            if outcome == "requeue":
                self.store.requeue(job_id)
            elif outcome in FAILURE_MESSAGES:
                self.store.mark_failed(job_id, outcome, FAILURE_MESSAGES[outcome])
                self.unrecorded.pop(job_id, None)
        except (StorageError, DatabaseUnavailable) as exc:
            if outcome == "requeue":  # still in progress in the store, so re-queued at the next start anyway
                log.warning("job %s could not be re-queued now (%s); the next start re-queues it", job_id, exc)
            else:
                log.error("job %s: its failure (%s) could not be recorded (%s); retrying", job_id, outcome, exc)
                self.unrecorded[job_id] = outcome

    def delete(self, job_id: str) -> VideoJob | None:
        running = self.running.get(job_id)
        if running is not None:
            self.generation.cancel(running[0], "deleted")
        try:
            deleted = self.store.delete(job_id)
        except StorageError as exc:
            raise self._refusal(exc) from exc
        self.unrecorded.pop(job_id, None)
        return deleted

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

    async def lease_loop(self, claim_interval_s: float, heartbeat_s: float) -> None:
        """Several replicas (a store with a shared queue): renew the leases on this replica's jobs, cancelling those
        deleted or taken over elsewhere, and claim queued work up to its free capacity (`max_batch_size` jobs) while it
        can run it: model loaded and warmed, data dir writable."""
        capacity, renewed_at, worker = self.generation.settings.max_batch_size, -math.inf, self.generation.worker
        while True:
            try:
                if time.monotonic() - renewed_at >= heartbeat_s:
                    renewed_at = time.monotonic()
                    await self._renew_leases()
                can_run = worker.ready.is_set() and worker.load_error is None and self.store.writable
                if can_run and (free := capacity - len(self.running)) > 0:
                    claimed, failed = await asyncio.to_thread(
                        self.store.claim, free, self.generation.settings.max_attempts
                    )
                    for job in failed:
                        log.warning("job %s failed after %d interrupted attempts", job.id, job.attempts)
                    for job in claimed:
                        self.resubmit(job)
                backlog = await asyncio.to_thread(self.store.backlog)
                self.generation.metrics.shared_queue_depth.set(backlog)
            except Exception:  # the database is unreachable: other replicas take over the jobs whose leases expire
                log.exception("job leases not renewed or claimed this time")
            await asyncio.sleep(claim_interval_s)

    async def _renew_leases(self) -> None:
        held = list(self.running)
        kept = await asyncio.to_thread(self.store.renew, held)
        for job_id in held:
            if job_id not in kept and (running := self.running.get(job_id)) is not None:
                log.warning("job %s was deleted or taken over by another replica: cancelled here", job_id)
                self.generation.cancel(running[0], "deleted")

    async def cleanup_loop(self, interval_s: float) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.store.cleanup_expired)
            except StorageError as exc:
                log.warning("expired videos not deleted this time: %s", exc)
            else:
                if removed:
                    log.info("deleted %d expired videos", removed)
            await asyncio.sleep(interval_s)

    async def storage_loop(self, interval_s: float) -> None:
        """Probe the data dir (the store probed it at start): readiness follows it, and failures the store refused are
        recorded once it takes writes again."""
        while True:
            await asyncio.sleep(interval_s)
            was_writable = self.store.writable
            fault = await asyncio.to_thread(self.store.probe)
            if fault is not None and was_writable:
                log.error("data dir %s refuses writes (%s): not ready until it takes them", self.store.data_dir, fault)
            elif fault is None and not was_writable:
                log.warning("data dir %s takes writes again: ready", self.store.data_dir)
            if fault is None:
                for job_id, code in list(self.unrecorded.items()):
                    self._record(job_id, code)


def job_to_video(job: VideoJob) -> Video:
    error = VideoError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    shared = {name: getattr(job, name) for name in Video.model_fields if name != "error" and hasattr(job, name)}
    return Video(**shared, error=error)
