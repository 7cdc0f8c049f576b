"""A restart on the same data dir keeps finished videos downloadable and finishes what was queued or running."""

import io
import time

import av
import httpx

from aptserve.server.store import JobStore, VideoJob


def frames_of(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def wait_completed(url: str, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/videos/{job_id}").json()
        if job["status"] in ("completed", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} did not finish")


def test_restart_keeps_completed_and_finishes_queued(live_server_factory, tmp_path):
    first = live_server_factory()
    job = httpx.post(first.url + "/v1/videos", json={"prompt": "a red circle", "seconds": 1}).json()
    assert wait_completed(first.url, job["id"])["status"] == "completed"
    before = httpx.get(f"{first.url}/v1/videos/{job['id']}/content").content
    first.stop()

    # What a crash leaves behind: one job accepted but never started, one interrupted mid-generation.
    with JobStore(tmp_path / "data") as store:
        fields = {"model": "tiny", "size": "64x64", "seconds": "1", "seed": 4, "steps": 1, "fps": 24}
        queued = store.create(VideoJob(prompt="queued before the restart", **fields))
        running = store.create(VideoJob(prompt="running during the crash", **fields))
        store.mark_started(running.id)
        store.partial_path(running.id).write_bytes(b"half an mp4")

    second = live_server_factory()
    assert httpx.get(f"{second.url}/v1/videos/{job['id']}/content").content == before
    for pending in (queued, running):
        finished = wait_completed(second.url, pending.id)
        assert finished["status"] == "completed", finished
        assert frames_of(httpx.get(f"{second.url}/v1/videos/{pending.id}/content").content) == 25
    with JobStore(tmp_path / "data") as store:
        assert store.get(running.id).attempts == 2
