"""Scheduler unit behaviour: bounds, same-bucket batching, FIFO across buckets, deadlines (and their refunds) and
cancellation."""

import asyncio
import threading
import time

import pytest

from aptserve.server.scheduler import EngineRequest, Failed, QueueFull, Scheduler, Ticket


def request(i, width=64, deadline=None):
    return EngineRequest(id=f"r{i}", prompt="p", seed=i, width=width, height=64, frames=49, deadline=deadline)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def drain(loop, ticket):
    loop.run_until_complete(asyncio.sleep(0))
    events = []
    while not ticket.events.empty():
        events.append(ticket.events.get_nowait())
    return events


def test_bound_and_force(loop):
    scheduler = Scheduler(max_queue=2, max_batch_size=4)
    assert scheduler.submit(Ticket(request(0), loop)) == 1
    assert scheduler.submit(Ticket(request(1), loop)) == 2
    with pytest.raises(QueueFull, match="2 requests waiting"):
        scheduler.submit(Ticket(request(2), loop))
    assert scheduler.submit(Ticket(request(3), loop), force=True) == 3


def test_batches_same_bucket_oldest_first(loop):
    scheduler = Scheduler(max_queue=10, max_batch_size=2)
    tickets = [Ticket(request(i, width=64 if i != 1 else 128), loop) for i in range(4)]
    for t in tickets:
        scheduler.submit(t)
    assert [t.request.id for t in scheduler.next_batch()] == ["r0", "r2"]  # r1 has another shape
    assert [t.request.id for t in scheduler.next_batch()] == ["r1"]
    assert [t.request.id for t in scheduler.next_batch()] == ["r3"]


def test_batch_waits_for_late_arrivals(loop):
    scheduler = Scheduler(max_queue=10, max_batch_size=3, batch_wait_s=5.0)
    scheduler.submit(Ticket(request(0), loop))
    late = [Ticket(request(i), loop) for i in (1, 2)]
    threading.Timer(0.05, lambda: [scheduler.submit(t) for t in late]).start()
    assert [t.request.id for t in scheduler.next_batch()] == ["r0", "r1", "r2"]  # full before the wait ran out


def test_expired_and_cancelled_tickets_are_answered_not_run(loop):
    scheduler = Scheduler(max_queue=10, max_batch_size=4)
    expired = Ticket(request(0, deadline=time.monotonic() - 1), loop)
    cancelled = Ticket(request(1), loop)
    live = Ticket(request(2), loop)
    for t in (expired, cancelled, live):
        scheduler.submit(t)
    scheduler.cancel(cancelled, "deleted")
    assert drain(loop, cancelled) == [Failed("r1", "deleted", "cancelled while queued")]
    assert scheduler.next_batch() == [live]
    [event] = drain(loop, expired)
    assert event.reason == "deadline" and expired.done


def test_queued_tickets_get_back_the_time_of_a_batch_nobody_received(loop):
    scheduler = Scheduler(max_queue=10, max_batch_size=4)
    now = time.monotonic()
    # a batch began 2 s ago and was just cancelled; `early` waited through all of it, `late` came 0.5 s ago
    early = Ticket(request(0, deadline=now - 0.5), loop, accepted_at=now - 3.0)
    late = Ticket(request(1, width=128, deadline=now + 1.0), loop, accepted_at=now - 0.5)
    for t in (early, late):
        scheduler.submit(t)
    assert early.stop_reason() == "deadline"
    scheduler.refund(since=now - 2.0)
    assert early.deadline == pytest.approx(now + 1.5, abs=0.2) and late.deadline == pytest.approx(now + 1.5, abs=0.2)
    assert early.stop_reason() is None
    assert scheduler.next_batch() == [early]


def test_close_wakes_the_worker_and_returns_the_rest(loop):
    scheduler = Scheduler(max_queue=10, max_batch_size=1)
    results = []
    worker = threading.Thread(target=lambda: results.append(scheduler.next_batch()))
    worker.start()
    time.sleep(0.05)
    assert scheduler.close() == []
    worker.join(5)
    assert results == [None]
    with pytest.raises(QueueFull):
        scheduler.submit(Ticket(request(0), loop))
