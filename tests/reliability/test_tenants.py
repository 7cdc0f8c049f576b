"""Tenant isolation through TestClient: a job belongs to the key that created it (stored as a keyed hash), other keys
never read, list, download or delete it, an admin key sees every job, keys are rate-limited, and a hostile key never
costs a 500."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from aptserve.server.app import create_app
from tests.server.conftest import make_settings

KEYS = {"k1": "tenant-one-key", "k2": "tenant-two-key", "admin": "ops-admin-key"}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """One keyed server: two tenant keys and an admin key."""
    data = tmp_path_factory.mktemp("tenants")
    settings = make_settings(data, warmup=False, api_keys=f"{KEYS['k1']},{KEYS['k2']}", admin_api_keys=KEYS["admin"])
    with TestClient(create_app(settings)) as client:
        yield client


def finished(client: TestClient, name: str, prompt: str) -> dict:
    job = client.post("/v1/videos", json={"prompt": prompt, "seconds": 0.5}, headers=auth(name)).json()
    deadline = time.monotonic() + 60
    while job["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
        job = client.get(f"/v1/videos/{job['id']}", headers=auth(name)).json()
    assert job["status"] == "completed", job
    return job


def listed(client: TestClient, name: str, **params) -> list[str]:
    response = client.get("/v1/videos", params={"limit": 100} | params, headers=auth(name))
    assert response.status_code == 200, response.text
    return [video["id"] for video in response.json()["data"]]


def is_not_found(response) -> bool:
    return response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_isolation_matrix(tenants):
    """Every cross-key operation: 0 reads, lists, downloads or deletes of another tenant's job."""
    own = {name: finished(tenants, name, f"the secret prompt of {name}")["id"] for name in ("k1", "k2")}
    crossings = 0
    for name, other in (("k1", "k2"), ("k2", "k1")):
        theirs = own[other]
        crossings += not is_not_found(tenants.get(f"/v1/videos/{theirs}", headers=auth(name)))
        crossings += not is_not_found(tenants.get(f"/v1/videos/{theirs}/content", headers=auth(name)))
        crossings += theirs in listed(tenants, name) or theirs in listed(tenants, name, order="asc")
        cursor = tenants.get("/v1/videos", params={"after": theirs}, headers=auth(name))
        crossings += cursor.status_code != 404  # another tenant's id is as unknown a cursor as a made-up one
        crossings += not is_not_found(tenants.delete(f"/v1/videos/{theirs}", headers=auth(name)))
        assert listed(tenants, name) == [own[name]]
        assert tenants.get(f"/v1/videos/{own[name]}/content", headers=auth(name)).status_code == 200
    assert crossings == 0
    assert set(listed(tenants, "admin")) == set(own.values())  # the admin key sees every job ...
    assert tenants.get(f"/v1/videos/{own['k1']}", headers=auth("admin")).status_code == 200
    assert tenants.delete(f"/v1/videos/{own['k1']}", headers=auth("admin")).status_code == 200  # ... and deletes it
    assert listed(tenants, "k1") == [] and listed(tenants, "k2") == [own["k2"]]


def test_the_database_holds_a_keyed_hash_never_the_key(tenants):
    job = tenants.post("/v1/videos", json={"prompt": "whose is this", "seconds": 0.5}, headers=auth("k1")).json()
    data_dir = tenants.app.state.services.settings.data_dir
    with sqlite3.connect(data_dir / "jobs.sqlite3") as conn:
        owner = conn.execute("SELECT owner FROM jobs WHERE id = ?", (job["id"],)).fetchone()[0]
    secret = (data_dir / "owner.key").read_bytes()
    assert owner == hmac.new(secret, KEYS["k1"].encode(), hashlib.sha256).hexdigest()
    assert owner != hashlib.sha256(KEYS["k1"].encode()).hexdigest()  # keyed: not guessable from the key alone
    assert (data_dir / "owner.key").stat().st_mode & 0o777 == 0o600
    for path in data_dir.glob("jobs.sqlite3*"):
        assert all(key.encode() not in path.read_bytes() for key in KEYS.values()), path


def test_ownership_survives_a_restart(tmp_path):
    settings = make_settings(tmp_path, warmup=False, api_keys=f"{KEYS['k1']},{KEYS['k2']}")
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/videos", json={"prompt": "kept", "seconds": 0.5}, headers=auth("k1")).json()
    with TestClient(create_app(settings)) as client:
        assert client.get(f"/v1/videos/{job['id']}", headers=auth("k1")).status_code == 200
        assert is_not_found(client.get(f"/v1/videos/{job['id']}", headers=auth("k2")))


def test_an_open_server_shows_every_job(tmp_path):
    with TestClient(create_app(make_settings(tmp_path, warmup=False))) as client:
        job = client.post("/v1/videos", json={"prompt": "anyone's", "seconds": 0.5}).json()
        for headers in ({}, {"Authorization": "Bearer whatever"}):
            assert client.get(f"/v1/videos/{job['id']}", headers=headers).status_code == 200
            assert job["id"] in [v["id"] for v in client.get("/v1/videos", headers=headers).json()["data"]]


@pytest.mark.parametrize(
    "header",
    ["Bearer ключ".encode(), "Bearer clé".encode("latin-1"), b"Bearer \xff\xfe", "Bearer 键".encode()],
    ids=["cyrillic-utf8", "latin-1", "invalid-utf8", "cjk-utf8"],
)
def test_a_non_ascii_key_gets_401_not_500(tenants, header):
    for path in ("/v1/videos", "/v1/models"):
        response = tenants.get(path, headers={"Authorization": header})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_a_non_ascii_websocket_key_is_refused_with_4401(tenants):
    with (
        tenants.websocket_connect("/v1/videos/stream?api_key=ключ") as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_text()
    assert closed.value.code == 4401


def test_each_key_has_its_own_rate_limit(tmp_path):
    settings = make_settings(tmp_path, warmup=False, api_keys=f"{KEYS['k1']},{KEYS['k2']}", rate_limit_per_minute=3)
    with TestClient(create_app(settings)) as client:
        assert [client.get("/v1/videos", headers=auth("k1")).status_code for _ in range(3)] == [200] * 3
        limited = client.get("/v1/videos", headers=auth("k1"))
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 20  # 3 a minute: one token every 20 s
        error = limited.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert "3 requests per minute" in error["message"] and limited.headers["retry-after"] in error["message"]
        assert client.get("/v1/videos", headers=auth("k2")).status_code == 200  # another key's bucket is untouched
        assert client.get("/healthz").status_code == 200  # outside /v1: not limited
