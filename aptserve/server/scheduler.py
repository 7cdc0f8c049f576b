"""The narrow boundary between the HTTP side and the engine: typed messages, tickets, and the batching queue.

The API side submits an `EngineRequest` and gets a `Ticket`; the engine thread takes batches of same-shape tickets
and answers with `Started`, `ChunkReady`, `Finished` or `Failed` events, delivered onto the ticket's asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class EngineRequest:
    id: str
    prompt: str
    seed: int
    width: int
    height: int
    frames: int
    steps: int = 1
    fps: int = 24
    deadline: float | None = None  # time.monotonic() by which the last frame must be out

    @property
    def bucket(self) -> tuple[int, int, int, int]:
        """Requests with the same bucket can share one forward pass."""
        return self.width, self.height, self.frames, self.steps


@dataclass(frozen=True)
class Started:
    request_id: str
    batch_size: int
    queue_wait: float
    encoded_prompt: str  # what the text encoder reads: the prompt, or its completion by the model's caption grammar
    num_chunks: int  # decode chunks to come: the pipeline's layout (1 frame, then 4 per latent frame)


@dataclass(frozen=True)
class ChunkReady:
    request_id: str
    index: int
    num_chunks: int
    start_frame: int
    frames: np.ndarray  # (F, H, W, 3) uint8


@dataclass(frozen=True)
class Finished:
    request_id: str
    timings: dict[str, float]
    frames: int


@dataclass(frozen=True)
class Failed:
    request_id: str
    reason: str  # a cancel reason (client_disconnected, deleted, deadline, ...), "error" or "rank_failed"
    message: str


EngineEvent = Started | ChunkReady | Finished | Failed


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Ticket:
    """One accepted request: its events arrive on `events`; `cancel` may be called from any thread."""

    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    accepted_at: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel_reason: str | None = None
    done: bool = False  # set by the engine once a Finished or Failed was delivered
    refunded: float = 0.0  # seconds the engine spent on work nobody received while this ticket waited

    @property
    def deadline(self) -> float | None:
        """The request's deadline, moved back by the refunded time: a ticket is not charged for others' lost work."""
        return None if self.request.deadline is None else self.request.deadline + self.refunded

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def stop_reason(self) -> str | None:
        """Why the engine should stop work on this ticket now, or None to go on."""
        if self.cancel_reason is not None:
            return self.cancel_reason
        deadline = self.deadline
        return "deadline" if deadline is not None and time.monotonic() > deadline else None

    def deliver(self, event: EngineEvent) -> None:
        """Thread-safe: hand an event to the ticket's event loop."""
        if isinstance(event, Finished | Failed):
            self.done = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """Bounded FIFO of tickets that hands out batches of same-bucket tickets, oldest first."""

    def __init__(self, max_queue: int, max_batch_size: int, batch_wait_s: float = 0.0):
        self.max_queue, self.max_batch_size, self.batch_wait_s = max_queue, max_batch_size, batch_wait_s
        self._queue: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def depth(self) -> int:
        return len(self._queue)

    def submit(self, ticket: Ticket, force: bool = False) -> int:
        """Queue a ticket; returns its 1-based position. `force` (recovered jobs) ignores the bound."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if not force and len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._queue.append(ticket)
            self._cond.notify_all()
            return len(self._queue)

    def cancel(self, ticket: Ticket, reason: str) -> None:
        """Cancel from any thread: a queued ticket is answered at once, a running one stops at the next chunk."""
        ticket.cancel(reason)
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                ticket.deliver(Failed(ticket.request.id, ticket.cancel_reason, "cancelled while queued"))
            self._cond.notify_all()

    def refund(self, since: float) -> None:
        """A batch that began at `since` (time.monotonic) ended with nothing delivered (cancelled, failed): give each
        queued ticket back the part of that time it spent waiting, so it does not time out for another's work."""
        with self._cond:
            now = time.monotonic()
            for ticket in self._queue:
                ticket.refunded += max(0.0, now - max(since, ticket.accepted_at))

    def close(self) -> list[Ticket]:
        """Stop handing out work; returns what was still queued."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            return left

    def next_batch(self) -> list[Ticket] | None:
        """Block until work is available; None once closed. Dead tickets are answered and skipped here."""
        with self._cond:
            while True:
                self._drop_stopped()
                if self._closed:
                    return None
                if self._queue:
                    break
                self._cond.wait()
            batch = self._take(self._queue[0].request.bucket)
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
                batch += self._take(batch[0].request.bucket, self.max_batch_size - len(batch))
            return batch

    def _take(self, bucket: tuple, limit: int | None = None) -> list[Ticket]:
        limit = self.max_batch_size if limit is None else limit
        taken = [t for t in self._queue if t.request.bucket == bucket and t.stop_reason() is None][:limit]
        for ticket in taken:
            self._queue.remove(ticket)
        return taken

    def _drop_stopped(self) -> None:
        for ticket in [t for t in self._queue if t.stop_reason() is not None]:
            self._queue.remove(ticket)
            ticket.deliver(Failed(ticket.request.id, ticket.stop_reason(), "stopped while queued"))
