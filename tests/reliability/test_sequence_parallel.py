"""`aptserve serve --sp 2` as an operator runs it: rank 0 serves HTTP in the server process, rank 1 is its child, both
on gloo. Clips come back through the OpenAI SDK and the sync route, decoded and checked, and match a one-process
server's; a rank killed while a job runs fails that job with `rank_failed`, the server restarts the group (not ready
meanwhile, counted in aptserve_sp_restarts_total) and serves again; a rank killed while idle costs the next request a
restart, not a failure. Settings that cannot run with sp stop the server before anything loads."""

from __future__ import annotations

import io
import os
import re
import signal
import time
import warnings

import av
import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from tests.reliability.test_crash import running, wait_for
from tests.server.conftest import make_settings
from tests.server.test_streaming import decode, metric

warnings.filterwarnings("ignore", category=DeprecationWarning, module="openai")

CLIP = {"prompt": "a red circle moving left", "size": "64x64", "seconds": 1, "seed": 7}


def pixels(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def rank_pids(server) -> list[int]:
    """Rank 1's pid at each (re)start of the group, from the server log."""
    return [int(pid) for pid in re.findall(r"rank 1 of 2 is pid (\d+)", server.log())]


def ready(server) -> bool:
    return httpx.get(server.url + "/readyz").status_code == 200


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_serve_sp_2_serves_fails_a_killed_ranks_job_and_restarts(serve):
    single = serve(log_level="info")
    server = serve(sp=2, log_level="info")
    assert server.log().count("sequence parallel over 2 ranks") == 1
    [first_rank] = rank_pids(server)
    assert first_rank in server.children()

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    job = client.videos.create_and_poll(prompt=CLIP["prompt"], seconds="1", size="64x64", extra_body={"seed": 7})
    assert job.status == "completed"
    content = client.videos.download_content(job.id).read()
    assert decode(content) == (25, 64, 64, 24)
    sync = httpx.post(server.url + "/v1/videos/sync", json=CLIP, timeout=60)
    alone = httpx.post(single.url + "/v1/videos/sync", json=CLIP, timeout=60)
    assert sync.status_code == alone.status_code == 200
    ours, theirs = pixels(sync.content), pixels(alone.content)
    assert ours.shape == theirs.shape == (25, 64, 64, 3)
    mse = np.mean((ours.astype(float) - theirs.astype(float)) ** 2)  # same frames up to fp32 rounding, then H.264
    assert mse == 0 or 10 * np.log10(255**2 / mse) > 40, mse
    assert np.array_equal(pixels(content), ours)  # the job and the sync route: the same seed, the same clip

    long = httpx.post(server.url + "/v1/videos", json=CLIP | {"size": "128x128", "seconds": 5}).json()
    wait_for(lambda: httpx.get(f"{server.url}/v1/videos/{long['id']}").json()["status"] == "in_progress")
    os.kill(first_rank, signal.SIGKILL)
    failed = wait_for(
        lambda: (v := httpx.get(f"{server.url}/v1/videos/{long['id']}").json())["status"] != "in_progress" and v
    )
    assert failed["status"] == "failed" and failed["error"]["code"] == "rank_failed", failed
    assert "sequence-parallel" in failed["error"]["message"]
    assert "rank 1 was killed (SIGKILL)" in server.log()
    wait_for(lambda: ready(server) and len(rank_pids(server)) == 2, timeout=120)
    second_rank = rank_pids(server)[-1]
    assert second_rank != first_rank and not running(first_rank)
    assert metric(server, "aptserve_sp_restarts_total") == 1
    again = httpx.post(server.url + "/v1/videos/sync", json=CLIP, timeout=60)
    assert again.status_code == 200 and np.array_equal(pixels(again.content), ours)

    os.kill(second_rank, signal.SIGKILL)  # while idle: the next request restarts the group first, then runs
    wait_for(lambda: not running(second_rank), timeout=10)
    after = httpx.post(server.url + "/v1/videos/sync", json=CLIP, timeout=120)
    assert after.status_code == 200 and np.array_equal(pixels(after.content), ours)
    assert len(rank_pids(server)) == 3 and metric(server, "aptserve_sp_restarts_total") == 2

    pid = rank_pids(server)[-1]
    server.stop()  # SIGTERM: uvicorn drains, the lifespan closes the group, then re-raises the signal
    assert "Application shutdown complete" in server.log()
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(pid), "a rank outlived its server"


def test_a_height_the_ranks_cannot_split_is_a_400(tmp_path):
    from aptserve.server.app import create_app

    app = create_app(make_settings(tmp_path, sp=3))  # no lifespan: the ranks never start, validation still runs
    response = TestClient(app).post("/v1/videos/sync", json=CLIP | {"size": "64x16"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "size" and "at least 24" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sp_ulysses": 2}, "it needs sp > 1"),
        ({"sp": 2, "sp_ulysses": 3}, "must divide sp"),
        ({"sp": 16}, "the default size has only 8"),
    ],
)
def test_settings_sp_cannot_run_stop_the_server_before_loading(tmp_path, overrides, message):
    from aptserve.server.app import build_services

    with pytest.raises(ValueError, match=message):
        build_services(make_settings(tmp_path, **overrides))


def test_a_group_that_cannot_restart_is_tried_again_until_it_does(tmp_path):
    """The ranks' checkpoint is unreadable when rank 1 dies (a volume remounting, say): the restart fails, the server
    stays not ready and tries again after 1 s, 2 s ...; once the files are back the group comes up."""
    import shutil
    import threading

    from aptserve.engines.group import ParallelGroup, RankSpec
    from aptserve.engines.pipeline import Pipeline
    from aptserve.server.scheduler import Scheduler
    from aptserve.server.worker import EngineWorker

    model = tmp_path / "model"
    shutil.copytree("models/shapes-apt-tiny", model)
    pipeline = Pipeline.from_name(str(model))
    group = ParallelGroup(RankSpec(str(model), threads=1), 2, timeout_s=60)
    group.attach(pipeline)
    restarted = []
    worker = EngineWorker(lambda: pipeline, Scheduler(4, 1, 0.0), (), on_group_restart=lambda: restarted.append(1))
    worker.pipeline = pipeline
    worker.ready.set()
    try:
        os.kill(group.pids()[0], signal.SIGKILL)
        wait_for(lambda: not group.healthy(), timeout=10)
        model.rename(tmp_path / "away")
        restarting = threading.Thread(target=worker._restart_group)
        restarting.start()
        wait_for(lambda: "failed while loading" in (group.failure or ""), timeout=60)  # the first try failed
        assert group.restarts == 1 and not worker.ready.is_set()
        (tmp_path / "away").rename(model)
        restarting.join(60)
        assert worker.ready.is_set() and group.healthy() and group.restarts == 2 and restarted == [1]
        request = pipeline.request("a red circle moving left", 0, "64x64", 0.5)
        assert pipeline.generate_video(request)[0].shape == (1, 13, 64, 64, 3)
    finally:
        worker._stopping.set()
        group.close()
