"""The OpenAPI document tells the truth: the error responses the server really sends (never 422), the limits it
enforces, only the values that work; and the ops routes can be closed to anyone without a key."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from aptserve.server.app import create_app
from tests.server.conftest import make_settings

LIMITS = {"max_seconds": 3.0, "max_steps": 7, "max_pixels": 4096, "max_body_bytes": 4096, "max_header_bytes": 8192}


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    app = create_app(make_settings(tmp_path_factory.mktemp("openapi"), warmup=False, **LIMITS))
    with TestClient(app) as client:
        return client.get("/openapi.json").json()


def operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_error_responses_are_the_real_ones_in_the_envelope(schema):
    assert "422" not in str({p: o["responses"] for p, _, o in operations(schema)})
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, method, operation in operations(schema):
        for status, response in operation["responses"].items():
            if int(status) >= 400 and path != "/readyz":  # its 503 is a readiness report, not an error
                assert response["content"]["application/json"]["schema"] == error, (path, method, status)
        if path.startswith("/v1/"):
            assert {"401", "500"} <= set(operation["responses"]), (path, method)
    create = schema["paths"]["/v1/videos"]["post"]["responses"]
    assert {"400", "403", "408", "413", "415", "429", "503"} <= set(create)
    assert {"504"} <= set(schema["paths"]["/v1/videos/sync"]["post"]["responses"])
    content = schema["paths"]["/v1/videos/{video_id}/content"]["get"]
    assert {"400", "404", "416"} <= set(content["responses"])
    assert set(schema["paths"]["/healthz"]["get"]["responses"]) == {"200"}


def test_limits_come_from_the_settings(schema):
    for path in ("/v1/videos", "/v1/videos/sync"):
        body = schema["paths"][path]["post"]["requestBody"]
        assert "4096 bytes" in body["description"]
        fields = body["content"]["application/json"]["schema"]["properties"]
        assert {"type": "number", "exclusiveMinimum": 0, "maximum": 3.0} in fields["seconds"]["anyOf"]
        assert {"type": "integer", "minimum": 1, "maximum": 7} in fields["steps"]["anyOf"]
        assert "4096 pixels" in fields["size"]["description"]
        assert {"type": "string", "enum": ["tiny"]} in fields["model"]["anyOf"]  # the one model served
        form = body["content"]["multipart/form-data"]["schema"]["properties"]  # a form has no null: omitted fields
        assert form["seconds"]["type"] == "number" and form["seconds"]["maximum"] == 3.0 and "null" not in str(form)
    info = schema["info"]["description"]
    for words in ("4096 bytes", "8192 bytes", "WebSocket"):
        assert words in info
    (variant,) = [
        p for p in schema["paths"]["/v1/videos/{video_id}/content"]["get"]["parameters"] if p["name"] == "variant"
    ]
    assert variant["schema"]["enum"] == ["video"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("bodies"), warmup=False))) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "allowed"), [("/v1/videos", "GET, POST"), ("/v1/videos/sync", "POST"), ("/v1/videos/v1", "DELETE, GET")]
)
def test_405_names_every_method_of_the_path(client, path, allowed):
    response = client.options(path)
    assert response.status_code == 405 and response.headers["allow"] == allowed
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "form"),
    [
        ("/v1/videos", {"seed": False}, None),  # pydantic alone reads false as 0,
        ("/v1/videos", {"seed": "5"}, None),  # and "5" as 5
        ("/v1/videos/sync", {"stream": 0}, None),
        ("/v1/videos/sync", None, {"stream": "0"}),  # a form's boolean is true or false
        ("/v1/videos", {"seed": 2**53}, None),  # past what a browser keeps exact
    ],
)
def test_bodies_are_read_as_the_schema_types_them(client, path, body, form):
    if form is None:
        response = client.post(path, json={"prompt": "x"} | body)
    else:
        response = client.post(path, files={k: (None, v) for k, v in ({"prompt": "x"} | form).items()})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == next(iter(body or form))


def test_json_schema_integers_and_sdk_seconds_are_taken(client):
    response = client.post("/v1/videos", json={"prompt": "x", "seconds": "0.1", "steps": 1.0, "seed": 3.0})
    assert response.status_code == 200, response.text  # JSON Schema counts 1.0 as an integer; the SDK sends "4"


@pytest.mark.parametrize("locked", [False, True])
def test_ops_routes_can_require_a_key(tmp_path, locked):
    settings = make_settings(tmp_path, warmup=False, api_keys="k1", metrics_require_key=locked, docs_require_key=locked)
    with TestClient(create_app(settings)) as client:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            response = client.get(path)
            assert response.status_code == (401 if locked else 200), path
            if locked:
                assert response.json()["error"]["code"] == "invalid_api_key"
            assert client.get(path, headers={"Authorization": "Bearer k1"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code in (200, 503)


def test_ops_routes_take_only_an_admin_key_where_admin_keys_are_set(tmp_path):
    settings = make_settings(tmp_path, warmup=False, api_keys="k1", admin_api_keys="root", metrics_require_key=True)
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics", headers={"Authorization": "Bearer k1"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "admin_key_required"
        assert client.get("/metrics", headers={"Authorization": "Bearer root"}).status_code == 200
        assert client.get("/openapi.json", headers={"Authorization": "Bearer k1"}).status_code == 200  # docs open
