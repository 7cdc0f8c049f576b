"""The SQLite job store: records, pagination, transitions, files, TTL cleanup, restart recovery, threads."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from aptserve.server import store as jobs_module
from aptserve.server.store import COMPLETED, FAILED, IN_PROGRESS, QUEUED, STATUSES, JobStore, VideoJob, new_job_id

TTL = 100


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock):
    with JobStore(tmp_path / "data", ttl_seconds=TTL, clock=clock) as s:
        yield s


def make_job(**overrides) -> VideoJob:
    fields = dict(model="tiny", prompt="a red ball", size="64x64", seconds="2", seed=7, steps=1, fps=24)
    return VideoJob(**(fields | overrides))


def write_partial(store: JobStore, job_id: str, data: bytes = b"mp4 bytes") -> None:
    store.partial_path(job_id).write_bytes(data)


def run_to_completion(store: JobStore, job_id: str, data: bytes = b"mp4 bytes") -> VideoJob:
    store.mark_started(job_id)
    write_partial(store, job_id, data)
    return store.mark_completed(job_id, store.finalize_file(job_id))


# -- records --


def test_new_job_id_shape():
    job_id = new_job_id()
    assert job_id.startswith("video_") and len(job_id) == 38 and int(job_id[6:], 16) >= 0
    assert new_job_id() != job_id


def test_create_get_round_trip(store, clock, tmp_path):
    job = make_job()
    stored = store.create(job)
    assert stored.created_at == int(clock.now) and job.created_at == 0  # the input is not mutated
    assert store.get(job.id) == stored
    assert (stored.status, stored.progress, stored.attempts, stored.bytes) == (QUEUED, 0, 0, 0)
    assert store.get(new_job_id()) is None
    assert store.create(make_job(created_at=5)).created_at == 5
    assert (tmp_path / "data" / "jobs.sqlite3").exists() and (tmp_path / "data" / "videos").is_dir()


def test_create_rejects_bad_records(store):
    job = store.create(make_job())
    with pytest.raises(ValueError, match="already exists"):
        store.create(make_job(id=job.id))
    with pytest.raises(ValueError, match="invalid job id"):
        store.create(make_job(id="../../etc/passwd"))
    with pytest.raises(ValueError, match="unknown status"):
        store.create(make_job(status="done"))


def test_database_settings(store, tmp_path):
    conn = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == jobs_module.SCHEMA_VERSION == 3
    conn.close()


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_schema_database_keeps_its_jobs_and_gains_the_new_columns(tmp_path, version):
    added = {"revised_prompt": 2, "owner": 3}  # column -> the schema version that added it
    old_schema = jobs_module._SCHEMA.replace(
        ",\n    revised_prompt TEXT,\n    owner TEXT", ",\n    revised_prompt TEXT"
    )
    if version == 1:
        old_schema = old_schema.replace(",\n    revised_prompt TEXT", "")
    old_schema = old_schema.split("CREATE INDEX IF NOT EXISTS jobs_owner")[0]
    assert "owner" not in old_schema and ("revised_prompt" in old_schema) == (version == 2)
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    conn.executescript(old_schema + f"PRAGMA user_version = {version};")
    old = make_job(created_at=5)
    columns = [name for name in jobs_module._COLUMNS if added.get(name, 0) <= version]
    conn.execute(
        f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        tuple(getattr(old, name) for name in columns),
    )
    conn.commit()
    conn.close()
    with JobStore(tmp_path) as store:
        assert store.get(old.id) == old and old.revised_prompt is None and old.owner is None
        new = store.create(make_job(revised_prompt="a large red ball", owner="f" * 64))
        assert store.get(new.id).revised_prompt == "a large red ball"
        assert store.list(owner="f" * 64) == ([store.get(new.id)], False)  # the old job belongs to no key
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3


def test_newer_schema_is_refused(tmp_path):
    JobStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        JobStore(tmp_path)


# -- list --


@pytest.fixture
def five_jobs(store, clock) -> list[str]:
    """Five jobs in creation order; the last two share a created_at second, so insertion breaks the tie."""
    ids = []
    for i in range(5):
        clock.now = 1_000_000 + min(i, 3)
        ids.append(store.create(make_job()).id)
    return ids


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_list_pages_with_cursor(store, five_jobs, order):
    expected = five_jobs if order == "asc" else five_jobs[::-1]
    page, has_more = store.list(limit=2, order=order)
    assert [j.id for j in page] == expected[:2] and has_more
    page, has_more = store.list(after=page[-1].id, limit=2, order=order)
    assert [j.id for j in page] == expected[2:4] and has_more
    page, has_more = store.list(after=page[-1].id, limit=2, order=order)
    assert [j.id for j in page] == expected[4:] and not has_more
    assert store.list(after=expected[-1], order=order) == ([], False)
    page, has_more = store.list(limit=5, order=order)
    assert [j.id for j in page] == expected and not has_more


def test_list_defaults_to_newest_first(store, five_jobs):
    page, has_more = store.list()
    assert [j.id for j in page] == five_jobs[::-1] and not has_more
    assert store.list(limit=100) == (page, False)


def test_list_by_owner(store, clock):
    mine, theirs = [], []
    for i in range(6):
        clock.now += 1
        (mine if i % 2 else theirs).append(store.create(make_job(owner="a" if i % 2 else "b")).id)
    page, has_more = store.list(limit=2, owner="a")
    assert [j.id for j in page] == mine[::-1][:2] and has_more
    assert [j.id for j in store.list(after=page[-1].id, owner="a")[0]] == mine[:1]
    assert [j.id for j in store.list(order="asc", owner="b")[0]] == theirs
    with pytest.raises(KeyError):  # another owner's job is no cursor
        store.list(after=theirs[0], owner="a")
    assert len(store.list()[0]) == 6


def test_list_empty(store):
    assert store.list() == ([], False)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"order": "newest"}, ValueError),
        ({"limit": 0}, ValueError),
        ({"limit": 101}, ValueError),
        ({"after": "video_" + "0" * 32}, KeyError),
    ],
)
def test_list_bad_arguments(store, five_jobs, kwargs, error):
    with pytest.raises(error):
        store.list(**kwargs)


# -- transitions --


def test_happy_path(store, clock):
    job = store.create(make_job())
    started = store.mark_started(job.id)
    assert (started.status, started.attempts, started.progress) == (IN_PROGRESS, 1, 0)
    assert store.set_progress(job.id, 40).progress == 40
    clock.now += 10
    done = store.mark_completed(job.id, 1234)
    assert (done.status, done.progress, done.bytes) == (COMPLETED, 100, 1234)
    assert done.completed_at == int(clock.now) and done.expires_at == int(clock.now) + TTL
    assert store.get(job.id) == done
    assert store.counts() == {QUEUED: 0, IN_PROGRESS: 0, COMPLETED: 1, FAILED: 0}


def test_fail_and_requeue(store, clock):
    queued = store.create(make_job())
    failed = store.mark_failed(queued.id, "deadline", "waited too long")
    assert (failed.status, failed.error_code, failed.error_message) == (FAILED, "deadline", "waited too long")
    assert failed.completed_at == int(clock.now) and failed.expires_at == int(clock.now) + TTL

    running = store.create(make_job())
    store.mark_started(running.id)
    store.set_progress(running.id, 50)
    requeued = store.requeue(running.id)
    assert (requeued.status, requeued.progress, requeued.attempts) == (QUEUED, 0, 1)
    assert store.mark_started(running.id).attempts == 2
    assert store.mark_failed(running.id, "oom", "out of memory").status == FAILED


def test_invalid_transitions_return_none_and_change_nothing(store):
    queued = store.create(make_job())
    assert store.mark_completed(queued.id, 10) is None  # completing requires in_progress
    assert store.set_progress(queued.id, 5) is None
    assert store.requeue(queued.id) is None
    assert store.get(queued.id) == queued

    running = store.create(make_job())
    store.mark_started(running.id)
    assert store.mark_started(running.id) is None  # no double start
    assert store.get(running.id).attempts == 1

    done = run_to_completion(store, store.create(make_job()).id)
    for attempt in (
        lambda: store.mark_started(done.id),
        lambda: store.set_progress(done.id, 5),
        lambda: store.mark_completed(done.id, 1),
        lambda: store.mark_failed(done.id, "x", "y"),
        lambda: store.requeue(done.id),
    ):
        assert attempt() is None
    assert store.get(done.id) == done
    assert store.video_path(done.id).exists()


def test_transitions_on_missing_job_return_none(store):
    missing = new_job_id()
    assert store.mark_started(missing) is None
    assert store.set_progress(missing, 1) is None
    assert store.mark_completed(missing, 1) is None
    assert store.mark_failed(missing, "x", "y") is None
    assert store.requeue(missing) is None
    assert store.delete(missing) is None


def test_progress_out_of_range(store):
    job = store.create(make_job())
    store.mark_started(job.id)
    for bad in (-1, 101):
        with pytest.raises(ValueError, match="progress"):
            store.set_progress(job.id, bad)


def test_failing_or_requeueing_removes_partial_files(store):
    for undo in (lambda i: store.mark_failed(i, "x", "y"), store.requeue):
        job = store.create(make_job())
        store.mark_started(job.id)
        write_partial(store, job.id)
        undo(job.id)
        assert not store.partial_path(job.id).exists()


# -- files --


def test_paths(store, tmp_path):
    job_id = new_job_id()
    assert store.video_path(job_id) == tmp_path / "data" / "videos" / f"{job_id}.mp4"
    assert store.partial_path(job_id) == tmp_path / "data" / "videos" / f"{job_id}.mp4.part"
    with pytest.raises(ValueError):
        store.video_path("../jobs.sqlite3")


def test_finalize_file_is_atomic(store):
    job = store.create(make_job())
    store.mark_started(job.id)
    data = bytes(range(256)) * 100
    with open(store.partial_path(job.id), "wb") as f:
        f.write(data[:1000])
        assert not store.video_path(job.id).exists()  # a half-written file is never at the final path
        f.write(data[1000:])
    assert not store.video_path(job.id).exists()
    assert store.finalize_file(job.id) == len(data)
    assert store.video_path(job.id).read_bytes() == data
    assert not store.partial_path(job.id).exists()


def test_finalize_without_partial_raises(store):
    with pytest.raises(FileNotFoundError):
        store.finalize_file(store.create(make_job()).id)


def test_worker_finishing_after_failure_finds_nothing_to_finalize(store):
    job = store.create(make_job())
    store.mark_started(job.id)
    write_partial(store, job.id)
    store.mark_failed(job.id, "deadline", "took too long")
    with pytest.raises(FileNotFoundError):
        store.finalize_file(job.id)
    assert store.mark_completed(job.id, 1) is None and not store.video_path(job.id).exists()


def test_delete_removes_row_and_files(store):
    done = run_to_completion(store, store.create(make_job()).id)
    running = store.create(make_job())
    store.mark_started(running.id)
    write_partial(store, running.id)
    assert store.delete(done.id) == done
    assert store.delete(running.id).status == IN_PROGRESS
    assert store.get(done.id) is None and store.get(running.id) is None
    assert list(store.videos_dir.iterdir()) == []
    assert store.delete(done.id) is None
    # A worker that finishes after the delete finds its job gone.
    assert store.mark_completed(running.id, 1) is None


# -- TTL cleanup --


def test_cleanup_expired(store, clock):
    old_done = run_to_completion(store, store.create(make_job()).id)
    old_failed = store.mark_failed(store.create(make_job()).id, "x", "y")
    clock.now += 50
    new_done = run_to_completion(store, store.create(make_job()).id)
    queued = store.create(make_job())
    orphan = store.video_path(new_job_id())
    orphan.write_bytes(b"left behind")
    orphan_partial = store.partial_path(new_job_id())
    orphan_partial.write_bytes(b"left behind")
    unrelated = store.videos_dir / "README"
    unrelated.write_text("not ours")

    assert store.cleanup_expired() == 0  # nothing expired yet; a partial file without a row goes
    assert orphan.exists() and not orphan_partial.exists() and unrelated.exists()
    os.utime(orphan, (clock.now - TTL, clock.now - TTL))  # a finished video without a row goes once its TTL passed
    store.cleanup_expired()
    assert not orphan.exists()

    clock.now = old_done.expires_at  # expires_at itself counts as expired
    assert store.cleanup_expired() == 2
    assert store.get(old_done.id) is None and store.get(old_failed.id) is None
    assert not store.video_path(old_done.id).exists()
    assert store.get(new_done.id) == new_done and store.video_path(new_done.id).exists()

    clock.now += 10 * TTL
    assert store.cleanup_expired() == 1
    assert store.get(queued.id) == queued  # unfinished jobs never expire
    assert store.counts()[QUEUED] == 1


# -- restart --


def test_restart_recovers_jobs(tmp_path, clock):
    data = tmp_path / "data"
    with JobStore(data, ttl_seconds=TTL, clock=clock) as store:
        done = run_to_completion(store, store.create(make_job()).id, b"finished video")
        clock.now += 1
        queued = store.create(make_job())
        clock.now += 1
        running = store.create(make_job())
        store.mark_started(running.id)
        store.set_progress(running.id, 60)
        write_partial(store, running.id)
        clock.now += 1
        exhausted = store.create(make_job())
        for _ in range(2):
            store.mark_started(exhausted.id)
            store.requeue(exhausted.id)
        assert store.mark_started(exhausted.id).attempts == 3  # the third start is interrupted too
        write_partial(store, exhausted.id)
        failed_before = store.mark_failed(store.create(make_job()).id, "oom", "out of memory")

    with JobStore(data, ttl_seconds=TTL, clock=clock) as store:
        to_queue, failed_now = store.recover(max_attempts=3)
        assert [j.id for j in to_queue] == [queued.id, running.id]  # created_at order
        assert to_queue[1].status == QUEUED and to_queue[1].attempts == 1 and to_queue[1].progress == 0
        assert [j.id for j in failed_now] == [exhausted.id]
        assert failed_now[0].status == FAILED and failed_now[0].error_code == "interrupted"
        assert "too many times" in failed_now[0].error_message and failed_now[0].expires_at == int(clock.now) + TTL
        assert store.get(exhausted.id) == failed_now[0]
        assert store.get(done.id) == done and store.video_path(done.id).read_bytes() == b"finished video"
        assert store.get(failed_before.id) == failed_before
        assert list(store.videos_dir.glob("*.part")) == []
        assert store.counts() == {QUEUED: 2, IN_PROGRESS: 0, COMPLETED: 1, FAILED: 2}
        assert store.recover() == (to_queue, [])  # idempotent


def test_recover_removes_final_file_of_unfinished_job(store):
    # A crash between finalize_file and mark_completed leaves a final file for a job that is still in progress.
    job = store.create(make_job())
    store.mark_started(job.id)
    write_partial(store, job.id)
    store.finalize_file(job.id)
    to_queue, _ = store.recover()
    assert [j.id for j in to_queue] == [job.id] and not store.video_path(job.id).exists()


# -- threads --


def test_concurrent_use_stays_consistent(store):
    threads, jobs_per_thread = 8, 50
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(jobs_per_thread):
                job = store.create(make_job(seed=worker * 1000 + i))
                assert store.mark_started(job.id).attempts == 1
                assert store.set_progress(job.id, 50).progress == 50
                if i % 2:
                    assert store.mark_failed(job.id, "x", "y").status == FAILED
                else:
                    write_partial(store, job.id, job.id.encode())
                    assert store.mark_completed(job.id, store.finalize_file(job.id)).status == COMPLETED
                store.list(limit=10)
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []
    total = threads * jobs_per_thread
    assert store.counts() == {QUEUED: 0, IN_PROGRESS: 0, COMPLETED: total // 2, FAILED: total // 2}
    page, has_more = store.list(limit=100, order="asc")
    seen = [j.id for j in page]
    while has_more:
        page, has_more = store.list(after=seen[-1], limit=100, order="asc")
        seen += [j.id for j in page]
    assert len(seen) == len(set(seen)) == total
    assert {j.seed for j in (store.get(i) for i in seen)} == {w * 1000 + i for w in range(8) for i in range(50)}
    assert len(list(store.videos_dir.glob("*.mp4"))) == total // 2


def test_statuses_constant():
    assert STATUSES == (QUEUED, IN_PROGRESS, COMPLETED, FAILED)
