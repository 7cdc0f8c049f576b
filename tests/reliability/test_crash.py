"""A crash and a shutdown as an operator sees them, on `aptserve serve` processes: SIGKILL while jobs run and wait,
then a restart on the same data dir finishes every accepted job and serves earlier videos byte-identical; SIGTERM
lets an in-flight progressive HTTP stream finish before the process exits. The recovery rules themselves (a queued
row, a started row with its `.part` file, attempts counted) are tested in-process in tests/server/test_restart.py."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.server.test_streaming import decode

CLIP = {"prompt": "a red circle moving left", "size": "64x64", "seconds": 1}
FRAMES = 25  # 1 s at 24 fps


def statuses(url: str, ids: list[str]) -> dict[str, str]:
    return {i: httpx.get(f"{url}/v1/videos/{i}").json()["status"] for i in ids}


def wait_for(probe, timeout: float = 120.0, what: str = "condition"):
    """Poll `probe` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"{what} not reached in {timeout:g} s"
        time.sleep(0.05)
    return value


def when(url: str, ids: list[str], predicate):
    """A probe for `wait_for`: the statuses of `ids` once `predicate(set of statuses)` holds."""

    def probe():
        now = statuses(url, ids)
        return now if predicate(set(now.values())) else None

    return probe


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_with_jobs_running_and_queued(serve, tmp_path):
    data = tmp_path / "data"
    first = serve(data_dir=data, batch_wait_ms=300)  # the six below arrive together: four run as a batch, two wait
    earlier = httpx.post(first.url + "/v1/videos", json=CLIP | {"seconds": 0.25}).json()["id"]
    wait_for(when(first.url, [earlier], lambda s: s == {"completed"}), what="the earlier video")
    before = httpx.get(f"{first.url}/v1/videos/{earlier}/content").content

    with ThreadPoolExecutor(6) as pool:
        posts = pool.map(lambda seed: httpx.post(first.url + "/v1/videos", json=CLIP | {"seed": seed}), range(6))
        ids = [response.json()["id"] for response in posts]
    at_kill = Counter(wait_for(when(first.url, ids, lambda s: "in_progress" in s), what="a start").values())
    encoders = first.children()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(30)
    wait_for(lambda: not any(map(running, encoders)), timeout=15, what="the killed server's ffmpeg exiting")

    second = serve(data_dir=data)
    after = httpx.get(f"{second.url}/v1/videos/{earlier}/content").content
    final = wait_for(when(second.url, ids, lambda s: not s & {"queued", "in_progress"}), what="the jobs settling")
    done = [i for i in ids if final[i] == "completed"]
    frames = [decode(httpx.get(f"{second.url}/v1/videos/{i}/content").content)[0] for i in done]
    result = {"at_kill": at_kill, "after_restart": Counter(final.values()), "frames": Counter(frames)}
    print("\nreliability", json.dumps({"kill_9": result | {"earlier_identical": after == before}}))

    assert at_kill["in_progress"] and at_kill["queued"], f"the kill found no jobs both running and queued: {at_kill}"
    assert after == before, "a video finished before the crash changed"
    assert final == dict.fromkeys(ids, "completed"), f"accepted jobs lost: {final}"
    assert frames == [FRAMES] * len(ids), frames


def test_sigterm_drains_a_progressive_stream(serve):
    server = serve()
    with httpx.stream("POST", server.url + "/v1/videos/sync", json=CLIP | {"stream": True}, timeout=120) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes()
        data = next(chunks)  # the stream is in flight
        server.process.send_signal(signal.SIGTERM)
        data += b"".join(chunks)
    code = server.process.wait(60)
    frames = decode(data)[0]
    print("\nreliability", json.dumps({"sigterm": {"frames": frames, "exit": code}}))

    assert frames == FRAMES, "the stream did not finish"
    assert code in (0, -signal.SIGTERM), server.log()[-3000:]  # uvicorn re-raises the signal once it has drained
