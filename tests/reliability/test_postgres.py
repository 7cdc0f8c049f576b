"""Several replicas on one PostgreSQL job store, started by the test on loopback: two `aptserve serve` processes share
the database and the data dir; a job created on one is listed, retrieved, downloaded and deleted on the other; kill -9
of the replica running a job -> the other completes it; no job is claimed or completed twice. The lease rules are
tested first on two stores in this process."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from glob import glob
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import free_port
from tests.reliability.test_crash import wait_for
from tests.server.test_streaming import decode

psycopg = pytest.importorskip("psycopg")
from aptserve.server.pgstore import PgJobStore  # noqa: E402  (needs psycopg)
from aptserve.server.store import DatabaseUnavailable, VideoJob  # noqa: E402


def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl") or next(iter(sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)), None)
    return Path(found).parent if found else None


PG_BIN = postgres_bin()
pytestmark = pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed")
KEYS = {"a": {"Authorization": "Bearer key-a"}, "b": {"Authorization": "Bearer key-b"}}
CLIP = {"prompt": "a red circle moving left", "size": "64x64", "seconds": 1}
LONG_CLIP = CLIP | {"size": "128x128", "seconds": 3}  # several seconds of CPU: long enough to be caught running


def as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: there, run it as the system user that owns its folder.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A PostgreSQL server of its own on 127.0.0.1 (trust auth), with an `aptserve` database."""
    folder = Path(tempfile.mkdtemp(prefix="aptserve-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    run = lambda *cmd: subprocess.run(as_postgres([str(PG_BIN / cmd[0]), *cmd[1:]]), check=True, capture_output=True)  # noqa: E731
    run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off"
    run("pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start")
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE aptserve")
        yield f"postgresql://postgres@127.0.0.1:{port}/aptserve"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def job(**fields) -> VideoJob:
    return VideoJob(model="tiny", prompt="p", size="64x64", seconds="1", seed=1, steps=1, fps=24, **fields)


def test_lease_rules_on_two_stores(database_url, tmp_path):
    first, second = (PgJobStore(database_url, tmp_path, lease_s=0.5) for _ in range(2))
    with first, second:
        created = first.create(job())
        assert first.backlog() == second.backlog() == 1  # waiting, held by nobody
        assert [j.id for j in first.claim(10, max_attempts=2)[0]] == [created.id]
        assert second.backlog() == 0
        assert second.claim(10, max_attempts=2) == ([], [])  # held
        assert first.mark_started(created.id).attempts == 1
        assert second.set_progress(created.id, 50) is None  # only the holder moves it
        time.sleep(0.6)  # the first replica "died": its lease ran out
        assert second.backlog() == 0  # started, not waiting: taken over, not added to the backlog
        assert [j.id for j in second.claim(10, max_attempts=2)[0]] == [created.id]
        assert first.renew([created.id]) == set()  # the first sees it lost the job at its next heartbeat
        assert first.mark_completed(created.id, 1) is None  # and can never complete it
        assert second.mark_started(created.id).attempts == 2
        second.partial_path(created.id).write_bytes(b"mp4")
        assert second.mark_completed(created.id, second.finalize_file(created.id)).status == "completed"
        assert second.mark_completed(created.id, 3) is None  # completed once
        assert first.get(created.id).bytes == 3
        other = first.create(job())  # two interrupted starts with max_attempts 2: failed, not run a third time
        for store in (first, second):
            store.claim(10, max_attempts=2)
            store.mark_started(other.id)
            time.sleep(0.6)
        assert first.claim(10, max_attempts=2)[1][0].error_code == "interrupted"
        assert first.shared_secret(b"x" * 32) == second.shared_secret(b"y" * 32) == b"x" * 32


def drop_connections(database_url: str, application_name: str | None = None) -> int:
    """What a database restart or failover does to its clients: their connections closed under them."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        return admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND (%s::text IS NULL OR application_name = %s)",
            (application_name, application_name),
        ).fetchone()[0]


def own_database(database_url: str, name: str) -> str:
    """A database of its own on the same server: jobs left in the shared one would be run by the replicas below."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return database_url.rsplit("/", 1)[0] + "/" + name


def test_a_lost_connection_fails_one_operation_and_the_next_reconnects(database_url, tmp_path):
    name, url = "aptserve-lost-connection", own_database(database_url, "aptserve_lost")
    with PgJobStore(f"{url}?application_name={name}", tmp_path) as store:
        made = store.create(job())
        for operation in (lambda: store.get(made.id), lambda: store.claim(1, max_attempts=3)):  # a read, a write
            assert drop_connections(url, name) == 1
            with pytest.raises(DatabaseUnavailable):
                operation()
            operation()
        assert store.get(made.id).status == "queued" and store.backlog() == 0  # claimed once, by the second try


def test_a_full_shared_queue_is_a_429_and_stores_nothing(database_url, tmp_path):
    from fastapi.testclient import TestClient

    from aptserve.server.app import create_app
    from tests.server.conftest import make_settings

    url = own_database(database_url, "aptserve_bound")
    app = create_app(make_settings(tmp_path, database_url=url, max_shared_queue=2))  # no lifespan: nobody claims
    client = TestClient(app)
    assert [client.post("/v1/videos", json=CLIP).status_code for _ in range(2)] == [200, 200]
    refused = client.post("/v1/videos", json=CLIP)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    assert refused.headers["Retry-After"] == "1" and "2 jobs wait" in refused.json()["error"]["message"]
    assert len(client.get("/v1/videos").json()["data"]) == 2
    app.state.services.store.close()


@pytest.fixture(scope="module")
def replicas(serve, database_url, tmp_path_factory):
    """Two replicas on one database and one data dir, with short leases."""
    shared = tmp_path_factory.mktemp("shared")
    settings = {"database_url": database_url, "lease_s": 2, "claim_interval_s": 0.1, "api_keys": "key-a,key-b"}
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: serve(shared, **settings), range(2))), shared


def rows(database_url: str, *ids: str) -> dict[str, tuple]:
    with psycopg.connect(database_url) as conn:
        found = conn.execute(
            "SELECT id, status, attempts, lease_owner FROM jobs WHERE id = ANY(%s)", (list(ids),)
        ).fetchall()
    return {row[0]: row[1:] for row in found}


def completed(url: str, job_id: str) -> dict:
    body = wait_for(
        lambda: (
            (b := httpx.get(f"{url}/v1/videos/{job_id}", headers=KEYS["a"]).json())["status"] in ("completed", "failed")
            and b
        ),
        what=f"{job_id} finished",
    )
    assert body["status"] == "completed", body
    return body


def test_a_job_made_on_one_replica_is_served_by_the_other(replicas, database_url):
    (first, second), _ = replicas
    made = httpx.post(first.url + "/v1/videos", json=CLIP, headers=KEYS["a"]).json()
    completed(second.url, made["id"])
    listed = httpx.get(second.url + "/v1/videos", headers=KEYS["a"]).json()["data"]
    assert made["id"] in [v["id"] for v in listed]
    assert httpx.get(f"{second.url}/v1/videos/{made['id']}", headers=KEYS["b"]).status_code == 404  # not b's job
    content = httpx.get(f"{second.url}/v1/videos/{made['id']}/content", headers=KEYS["a"])
    assert content.status_code == 200
    assert decode(content.content) == (25, 64, 64, 24)
    assert httpx.delete(f"{second.url}/v1/videos/{made['id']}", headers=KEYS["a"]).status_code == 200
    assert httpx.get(f"{first.url}/v1/videos/{made['id']}", headers=KEYS["a"]).status_code == 404


def test_many_jobs_each_run_once(replicas, database_url):
    (first, second), shared = replicas
    ids = [httpx.post(s.url + "/v1/videos", json=CLIP, headers=KEYS["a"]).json()["id"] for s in (first, second) * 3]
    for job_id in ids:
        completed(first.url, job_id)
    found = rows(database_url, *ids)
    assert {status for status, _, _ in found.values()} == {"completed"}
    assert {attempts for _, attempts, _ in found.values()} == {1}  # claimed and started once each
    assert sorted(p.name for p in (shared / "videos").iterdir()) == sorted(f"{i}.mp4" for i in ids)
    for replica in (first, second):  # the backlog autoscaling reads: nothing left waiting
        wait_for(lambda r=replica: "aptserve_shared_queue_depth 0.0" in httpx.get(r.url + "/metrics").text)


def test_replicas_reconnect_after_the_database_drops_them(replicas, database_url):
    (first, second), _ = replicas
    assert drop_connections(database_url) >= 2
    answers = []

    def listed() -> bool:  # a replica's first use of its dropped connection may fail (503); none may be a 500
        response = httpx.get(first.url + "/v1/videos", headers=KEYS["a"])
        answers.append((response.status_code, response.json().get("error", {}).get("code")))
        return response.status_code == 200

    wait_for(listed, timeout=10, what="a list after the drop")
    assert set(answers) <= {(200, None), (503, "database_unavailable")}, answers
    made = wait_for(
        lambda: (r := httpx.post(second.url + "/v1/videos", json=CLIP, headers=KEYS["a"])).status_code == 200 and r,
        timeout=10,
    )
    completed(first.url, made.json()["id"])


def test_delete_on_one_replica_cancels_the_run_on_the_other(replicas, database_url):
    (first, second), shared = replicas
    made = httpx.post(first.url + "/v1/videos", json=LONG_CLIP, headers=KEYS["a"]).json()["id"]
    wait_for(lambda: rows(database_url, made)[made][0] == "in_progress", what="a start")
    holder = rows(database_url, made)[made][2]
    other = second if holder.split(":")[1] == str(first.pid) else first
    assert httpx.delete(f"{other.url}/v1/videos/{made}", headers=KEYS["a"]).status_code == 200
    wait_for(lambda: not list((shared / "videos").glob(made + "*")), timeout=10, what="its files removed")
    assert rows(database_url, made) == {}


def test_kill_9_of_the_running_replica_hands_the_job_to_the_other(replicas, database_url):
    (first, second), shared = replicas
    made = httpx.post(first.url + "/v1/videos", json=LONG_CLIP, headers=KEYS["a"]).json()["id"]
    wait_for(lambda: rows(database_url, made)[made][0] == "in_progress", what="a start")
    holder = rows(database_url, made)[made][2]
    victim, survivor = (first, second) if holder.split(":")[1] == str(first.pid) else (second, first)
    victim.kill()
    started = time.monotonic()
    completed(survivor.url, made)
    status, attempts, lease_owner = rows(database_url, made)[made]
    print(f"\nreliability postgres kill_9: completed by the survivor {time.monotonic() - started:.1f} s after the kill")
    assert (status, attempts) == ("completed", 2)
    assert lease_owner.split(":")[1] == str(survivor.pid)  # completed by the survivor, once
    content = httpx.get(f"{survivor.url}/v1/videos/{made}/content", headers=KEYS["a"])
    assert decode(content.content) == (73, 128, 128, 24)
    assert [p.name for p in (shared / "videos").glob(made + "*")] == [f"{made}.mp4"]  # the victim's .part removed
