"""Storage faults on real file systems: a small tmpfs filled up or mounted read-only (root only, skipped otherwise),
a damaged, missing or empty job database, and the start-up order. Nothing accepted is lost or left in progress, and
no client-visible message carries a server path."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aptserve.server.app import create_app
from aptserve.server.store import COMPLETED, IN_PROGRESS, QUEUED, JobStore, StorageError, VideoJob
from tests.reliability.conftest import leaks
from tests.server.conftest import GenerationGate, make_settings

JOB = {"prompt": "a red circle moving left", "seconds": 0.5}  # about 27 KB of MP4


@pytest.fixture
def mount():
    """`mount(folder, options)` puts a fresh tmpfs there (e.g. "size=2m" or "ro,size=1m"); all go at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def tmpfs(folder: Path, options: str = "size=2m") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield tmpfs
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; returns it (unlink it to free the space)."""
    path = folder / "filler"
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return path


def truncate_wal(data_dir: Path) -> None:
    """Checkpoint the database and empty its write-ahead log, so that any later write must grow a file."""
    with contextlib.closing(sqlite3.connect(data_dir / "jobs.sqlite3")) as conn:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def stored_status(data_dir: Path, job_id: str) -> str:
    with contextlib.closing(sqlite3.connect(data_dir / "jobs.sqlite3")) as conn:
        return conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def status(client: TestClient, job_id: str) -> str:
    return client.get(f"/v1/videos/{job_id}").json()["status"]


def spy_tickets(services) -> list:
    """Every ticket the generation path hands out, in order (the real `submit`, recorded)."""
    tickets, submit = [], services.generation.submit

    def recording(*args, **kwargs):
        tickets.append(submit(*args, **kwargs))
        return tickets[-1]

    services.generation.submit = recording
    return tickets


def make_job(**overrides) -> VideoJob:
    return VideoJob(
        **(
            {"model": "tiny", "prompt": "p", "size": "64x64", "seconds": "1", "seed": 1, "steps": 1, "fps": 24}
            | overrides
        )
    )


# -- the store on a full or read-only file system --


def test_the_store_reports_a_full_disk_and_recovers_when_space_returns(tmp_path, mount):
    data = mount(tmp_path / "disk", "size=1m") / "data"
    with JobStore(data) as store:
        kept = store.create(make_job())
        truncate_wal(data)
        filler = fill(data)
        with pytest.raises(StorageError) as refused:
            store.create(make_job())
        assert refused.value.full and refused.value.code == "storage_full" and not store.writable
        with pytest.raises(StorageError):
            store.delete(kept.id)
        assert store.probe() is not None and not store.writable
        assert store.get(kept.id) == kept  # reads go on
        filler.unlink()
        assert store.probe() is None and store.writable
        store.create(make_job())


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_a_read_only_data_dir_stops_start_up_with_one_line(tmp_path, mount, existing):
    disk = mount(tmp_path / "disk", "size=1m")
    if existing:
        JobStore(disk / "data").close()
    remount_read_only(disk)
    command = [sys.executable, "-m", "aptserve", "serve", "--model", "tiny", "--data-dir", str(disk / "data")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "data_dir" in lines[0] and "not writable" in lines[0] and "Traceback" not in done.stderr


# -- the server: a job meets a full or unwritable disk --


def test_disk_full_mid_job_fails_only_that_job_and_never_strands_it(tmp_path, mount):
    data = mount(tmp_path / "disk", "size=2m") / "data"
    app = create_app(make_settings(tmp_path, data_dir=data, warmup=False, storage_probe_interval_s=0.1))
    services = app.state.services
    with TestClient(app) as client:
        wait_for(services.worker.ready.is_set)  # the gate instruments the loaded pipeline
        with GenerationGate(services, hold_at=0) as gate:
            job = client.post("/v1/videos", json=JOB).json()
            wait_for(gate.holding.is_set)
            wait_for(lambda: status(client, job["id"]) == IN_PROGRESS)
            truncate_wal(data)  # so that recording the failure needs space too: the job must not be stranded
            filler = fill(data)
        wait_for(lambda: status(client, job["id"]) == "failed")
        error = client.get(f"/v1/videos/{job['id']}").json()["error"]
        assert error["code"] == "storage_full" and error["message"] and not leaks(error["message"])
        assert not services.store.writable
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "storage", "error": "storage_full"}
        refused = client.post("/v1/videos", json=JOB)
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "storage_full" and not leaks(refused.text)

        filler.unlink()
        wait_for(lambda: services.store.writable)
        assert client.get("/readyz").status_code == 200
        wait_for(lambda: stored_status(data, job["id"]) == "failed")  # recorded once the disk took writes again
        again = client.post("/v1/videos", json=JOB).json()
        wait_for(lambda: status(client, again["id"]) == COMPLETED)
        assert services.store.counts()[QUEUED] == services.store.counts()[IN_PROGRESS] == 0


def test_a_refused_insert_cancels_the_work_it_queued(tmp_path, mount):
    data = mount(tmp_path / "disk", "size=2m") / "data"
    app = create_app(make_settings(tmp_path, data_dir=data, warmup=False, storage_probe_interval_s=600))
    services = app.state.services
    tickets = spy_tickets(services)
    with TestClient(app) as client:
        truncate_wal(data)
        filler = fill(data)
        refused = client.post("/v1/videos", json=JOB)
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "storage_full" and not leaks(refused.text)
        assert len(tickets) == 1 and tickets[0].cancel_reason == "storage"  # the engine does not generate it
        assert client.post("/v1/videos", json=JOB).status_code == 507
        assert len(tickets) == 1  # known unwritable: refused before anything is queued
        assert client.get("/v1/videos").json()["data"] == []
        filler.unlink()
        accepted = client.post("/v1/videos", json=JOB).json()  # the refusal re-checks the disk: space is back
        wait_for(lambda: status(client, accepted["id"]) == COMPLETED)


def test_an_unwritable_videos_dir_fails_the_job_and_cancels_its_work(tmp_path, mount):
    app = create_app(make_settings(tmp_path, warmup=False, storage_probe_interval_s=600))
    services = app.state.services
    tickets = spy_tickets(services)
    with TestClient(app) as client:
        mount(services.store.videos_dir, "ro,size=1m")  # opening the job's .part file fails
        job = client.post("/v1/videos", json=JOB).json()
        wait_for(lambda: status(client, job["id"]) == "failed")
        error = client.get(f"/v1/videos/{job['id']}").json()["error"]
        assert error["code"] == "storage_unavailable" and not leaks(error["message"], str(tmp_path))
        assert tickets[0].cancel_reason == "storage"
        assert not services.store.writable
        refused = client.post("/v1/videos", json=JOB)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "storage_unavailable"


def test_a_failed_generation_reports_no_server_detail(tmp_path):
    app = create_app(make_settings(tmp_path, warmup=False))
    services = app.state.services
    with TestClient(app) as client:
        wait_for(services.worker.ready.is_set)

        def broken(request, cancelled=lambda: False):
            raise OSError(f"[Errno 2] No such file or directory: '{tmp_path}/weights/block.7'")
            yield

        services.worker.pipeline.generate = broken
        job = client.post("/v1/videos", json=JOB).json()
        wait_for(lambda: status(client, job["id"]) == "failed")
        error = client.get(f"/v1/videos/{job['id']}").json()["error"]
        assert error["code"] == "generation_failed" and not leaks(error["message"], str(tmp_path))


# -- start-up: the database, the videos, the order --


DAMAGE = {  # where -> (offset, bytes) overwritten with 0xff in a database of 36 pages
    "header": (0, 300),  # "file is not a database"
    "page": (4096 * 3, 300),  # a b-tree page header: "database disk image is malformed"
    "cells": (4096 * 7 + 12, 20),  # a leaf's cell pointers: only the integrity check finds it
}


def corrupt(path: Path, where: str) -> None:
    start, length = DAMAGE[where]
    data = bytearray(path.read_bytes())
    data[start : start + length] = b"\xff" * length
    path.write_bytes(bytes(data))


def with_finished_jobs(data: Path, count: int = 300) -> list[Path]:
    """A database with many rows (several pages) and one finished MP4; returns the videos."""
    with JobStore(data) as store:
        for seed in range(count):
            store.create(make_job(seed=seed, prompt="p" * 200))
        done = store.create(make_job())
        store.mark_started(done.id)
        store.partial_path(done.id).write_bytes(b"a finished video")
        store.mark_completed(done.id, store.finalize_file(done.id))
        return [store.video_path(done.id)]


@pytest.mark.parametrize("where", list(DAMAGE))
def test_a_damaged_database_is_moved_aside_and_the_server_starts_fresh(tmp_path, caplog, where):
    data = tmp_path / "data"
    videos = with_finished_jobs(data)
    corrupt(data / "jobs.sqlite3", where)
    damaged = (data / "jobs.sqlite3").read_bytes()
    with caplog.at_level(logging.ERROR, logger="aptserve"):
        app = create_app(make_settings(tmp_path, warmup=False))
    moved = list(data.glob("jobs.sqlite3.damaged-*"))
    assert [path.read_bytes() for path in moved if not path.name.endswith(("-wal", "-shm"))] == [damaged]
    assert any("damaged" in r.getMessage() and moved[0].name in r.getMessage() for r in caplog.records)
    with TestClient(app) as client:
        assert client.get("/v1/videos").json()["data"] == []
        assert client.post("/v1/videos", json=JOB).status_code == 200
        app.state.services.store.cleanup_expired()
    assert all(video.read_bytes() == b"a finished video" for video in videos)  # content goes only by its TTL


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_a_lost_database_does_not_sweep_the_videos(tmp_path, caplog, how):
    data = tmp_path / "data"
    videos = with_finished_jobs(data, count=1)
    for path in data.glob("jobs.sqlite3*"):
        path.unlink()
    if how == "empty":
        (data / "jobs.sqlite3").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="aptserve"), JobStore(data, ttl_seconds=100) as store:
        assert store.cleanup_expired() == 0
        assert all(video.read_bytes() == b"a finished video" for video in videos)
        assert any("TTL" in r.getMessage() for r in caplog.records)
        for video in videos:
            os.utime(video, (time.time() - 101, time.time() - 101))
        store.cleanup_expired()
        assert not any(video.exists() for video in videos)


def test_jobs_are_recovered_before_the_engine_starts(tmp_path):
    with JobStore(tmp_path / "data") as store:
        queued = store.create(make_job(prompt="queued before the restart", seconds="0.5"))
    app = create_app(make_settings(tmp_path, warmup=False))
    services = app.state.services
    order: list[str] = []
    recover, start = services.jobs.recover, services.worker.start
    services.jobs.recover = lambda: (order.append("recover"), recover())[1]
    services.worker.start = lambda: (order.append("engine"), start())[1]
    with TestClient(app) as client:
        assert order == ["recover", "engine"]
        wait_for(lambda: status(client, queued.id) == COMPLETED)
