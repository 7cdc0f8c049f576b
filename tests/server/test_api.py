"""REST behaviour through TestClient: validation, the error envelope, auth, Range, listing, metrics, docs."""

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from aptserve.server.app import create_app
from tests.server.conftest import GenerationGate, make_settings

DESIGN_METRICS = {
    "aptserve_requests": "counter",
    "aptserve_request_duration_seconds": "histogram",
    "aptserve_queue_wait_seconds": "histogram",
    "aptserve_stage_duration_seconds": "histogram",
    "aptserve_time_to_first_chunk_seconds": "histogram",
    "aptserve_realtime_factor": "histogram",
    "aptserve_frames_generated": "counter",
    "aptserve_stream_bytes": "counter",
    "aptserve_queue_depth": "gauge",
    "aptserve_inflight_requests": "gauge",
    "aptserve_batch_size": "histogram",
    "aptserve_cancelled": "counter",
    "aptserve_errors": "counter",
    "aptserve_device_memory_bytes": "gauge",
    "aptserve_build_info": "gauge",
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(make_settings(tmp_path_factory.mktemp("api"), api_keys="k1,k2"))
    with TestClient(app, headers={"Authorization": "Bearer k2"}) as client:
        yield client


def completed_job(client, **body):
    job = client.post("/v1/videos", json={"prompt": "a green triangle", "seconds": 1} | body).json()
    for _ in range(600):
        job = client.get(f"/v1/videos/{job['id']}").json()
        if job["status"] == "completed":
            return job
        __import__("time").sleep(0.05)
    raise AssertionError(job)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": "   "}, "prompt", "invalid_value"),
        ({}, "prompt", "invalid_value"),
        ({"prompt": "x", "size": "100x64"}, "size", "invalid_size"),
        ({"prompt": "x", "size": "big"}, "size", "invalid_size"),
        ({"prompt": "x", "size": "4096x4096"}, "size", "invalid_size"),
        ({"prompt": "x", "seconds": 60}, "seconds", "invalid_seconds"),
        ({"prompt": "x", "seconds": "soon"}, "seconds", "invalid_value"),
        ({"prompt": "x", "steps": 0}, "steps", "invalid_value"),
        ({"prompt": "x", "steps": 51}, "steps", "invalid_steps"),
        ({"prompt": "x", "model": "other"}, "model", "model_not_found"),
        ({"prompt": "x", "colour": "red"}, "colour", "invalid_value"),
    ],
)
def test_bad_input_gets_400_in_the_openai_envelope(client, body, param, code):
    response = client.post("/v1/videos", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == code and error["type"] == "invalid_request_error"
    assert error["message"]


def test_malformed_bodies(client):
    response = client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_body"
    response = client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", b"...")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input_reference"


def test_auth(client):
    assert client.get("/v1/videos", headers={"Authorization": "Bearer nope"}).status_code == 401
    response = client.get("/v1/models", headers={"Authorization": ""})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200


def test_multipart_form_as_the_sdk_sends_it(client):
    form = {"prompt": "a form", "seconds": "1", "size": "64x64", "seed": "9"}
    response = client.post("/v1/videos", files={name: (None, value) for name, value in form.items()})
    assert response.status_code == 200, response.text
    assert response.json()["seed"] == 9 and response.json()["seconds"] == "1"


def test_content_range_not_ready_and_missing(client):
    job = completed_job(client)
    whole = client.get(f"/v1/videos/{job['id']}/content")
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes" and len(whole.content) == int(whole.headers["content-length"])
    part = client.get(f"/v1/videos/{job['id']}/content", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == whole.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(whole.content)}"
    beyond = client.get(f"/v1/videos/{job['id']}/content", headers={"Range": f"bytes={len(whole.content)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(whole.content)}"
    assert beyond.json()["error"]["code"] == "range_not_satisfiable"
    malformed = client.get(f"/v1/videos/{job['id']}/content", headers={"Range": "bytes=x-y"})
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    assert client.get(f"/v1/videos/{job['id']}/content?variant=thumbnail").status_code == 400
    assert client.get("/v1/videos/video_0000/content").status_code == 404
    assert client.get("/v1/videos/nope").json()["error"]["type"] == "not_found_error"


def test_list_and_delete(client):
    ids = [completed_job(client)["id"] for _ in range(3)]
    page = client.get("/v1/videos", params={"limit": 2}).json()
    assert [v["id"] for v in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert rest["data"][0]["id"] == ids[0]
    asc = client.get("/v1/videos", params={"order": "asc", "limit": 100}).json()["data"]
    assert [v["created_at"] for v in asc] == sorted(v["created_at"] for v in asc)
    assert client.get("/v1/videos", params={"after": "video_" + "0" * 32}).status_code == 404
    assert client.get("/v1/videos", params={"limit": 0}).status_code == 400
    assert client.delete(f"/v1/videos/{ids[0]}").json() == {"id": ids[0], "object": "video.deleted", "deleted": True}
    assert client.get(f"/v1/videos/{ids[0]}").status_code == 404
    assert client.delete(f"/v1/videos/{ids[0]}").status_code == 404


def test_models_health_ready_docs(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/v1/videos" in schema["paths"] and "/v1/videos/sync" in schema["paths"]


def test_metrics_carry_every_design_metric_and_parse(client):
    completed_job(client)
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in DESIGN_METRICS.items():
        assert name in families and families[name].type == kind, name
    stages = {s.labels["stage"] for s in families["aptserve_stage_duration_seconds"].samples if "stage" in s.labels}
    assert stages == {"text_encode", "dit", "vae_decode", "encode"}
    build = families["aptserve_build_info"].samples[0].labels
    assert build["model"] == "tiny" and build["device"] == "cpu" and build["backend"] == "eager"
    routes = {s.labels.get("route") for s in families["aptserve_requests"].samples}
    assert "/v1/videos/{video_id}" in routes and all(r is None or r.startswith("/") or r == "other" for r in routes)
    assert families["aptserve_frames_generated"].samples[0].value >= 25
    assert families["aptserve_device_memory_bytes"].samples[0].value > 0


def test_a_model_that_fails_to_load_is_reported_not_queued(tmp_path):
    from aptserve.engines.config import MODEL_PRESETS
    from aptserve.engines.loading import random_model, save_checkpoint

    tiny = random_model(MODEL_PRESETS["tiny"])
    folder = save_checkpoint(tmp_path / "broken", tiny.config, {"dit": tiny.dit, "vae": tiny.vae})
    (folder / "model.safetensors").write_bytes(b"truncated")
    app = create_app(make_settings(tmp_path, model=str(folder)))
    with TestClient(app) as client:
        for _ in range(200):
            if app.state.services.worker.load_error is not None:
                break
            __import__("time").sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert str(tmp_path) not in ready.text and "safetensors" not in ready.text  # the reason is in the log only
        response = client.post("/v1/videos", json={"prompt": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"
        assert str(tmp_path) not in response.text


def test_a_completed_prompt_is_reported_as_revised_prompt(tmp_path):
    """The default model carries its caption grammar: once the worker has started a job, the video object says
    what the model was given (the worker completes the prompt, and reports it)."""
    settings = make_settings(tmp_path, model="models/shapes-apt-tiny", warmup=False)
    with TestClient(create_app(settings)) as client:
        queued = client.post("/v1/videos", json={"prompt": "a red circle moving left", "seed": 0, "seconds": 0.5})
        assert queued.json()["revised_prompt"] is None  # not started: nothing encoded yet
        short = completed_job(client, prompt="a red circle moving left", seed=0, seconds=0.5)
        assert short["revised_prompt"] == "a small red circle moving left slowly on a gray background"
        full = "a large red circle moving left slowly on a black background"
        assert completed_job(client, prompt=full, seconds=0.5)["revised_prompt"] is None
        assert completed_job(client, prompt="a cat on a mat", seconds=0.5)["revised_prompt"] is None
    as_written = make_settings(tmp_path / "off", model="models/shapes-apt-tiny", warmup=False, prompt_completion=False)
    with TestClient(create_app(as_written)) as client:
        job = completed_job(client, prompt="a red circle moving left", seed=0, seconds=0.5)
        assert job["revised_prompt"] is None


def test_a_websocket_429_is_counted_once(tmp_path):
    app = create_app(make_settings(tmp_path, warmup=False, max_queue=1))
    services = app.state.services
    with TestClient(app) as client:
        assert services.worker.ready.wait(60)
        with GenerationGate(services, hold_at=0) as gate, client.websocket_connect("/v1/videos/stream") as ws:
            ws.send_json({"type": "generate", "prompt": "running", "seconds": 0.5})
            assert [ws.receive_json()["type"] for _ in range(2)] == ["queued", "started"]
            assert gate.holding.wait(30)  # the engine is busy: the next one queues, the one after is refused
            ws.send_json({"type": "generate", "prompt": "waiting", "seconds": 0.5})
            assert ws.receive_json()["type"] == "queued"
            ws.send_json({"type": "generate", "prompt": "refused", "seconds": 0.5})
            refused = ws.receive_json()
            assert refused["type"] == "error" and refused["status"] == 429
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        counted = {s.labels["kind"]: s.value for s in families["aptserve_errors"].samples if s.name.endswith("_total")}
        assert counted["queue_full"] == 1
