"""The OpenAPI document as the server behaves: each route's real error responses in the envelope (FastAPI's 422 is
never sent: validation errors are 400s), the limits from the settings, and only the `variant` values that work."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from aptserve.engines.config import SIZE_MULTIPLE
from aptserve.server.generation import Generation
from aptserve.server.protocol import ErrorResponse
from aptserve.server.settings import Settings

ERROR_DESCRIPTIONS = {
    400: "Invalid request: `param` names the field",
    401: "Missing or incorrect API key",
    403: "Sent by a browser page from an origin not allowed (`allowed_origins`), or a key short of an admin key",
    404: "No such video (or, for `after`, no such cursor)",
    409: "The video is not ready yet: poll it until its status is `completed`",
    408: "The body did not arrive within `body_timeout_s`",
    413: "The body is over `max_body_bytes`",
    415: "The body is neither application/json nor multipart/form-data",
    416: "The Range is beyond the end of the file",
    429: "At capacity, or over the key's `rate_limit_per_minute`: retry after `Retry-After` seconds",
    500: "Server error",
    503: "The model or the server's storage is not available, or a sequence-parallel rank failed (rank_failed)",
    504: "The generation did not finish before its deadline",
    507: "The server is out of storage space",
}
BODY_ERRORS = (400, 403, 408, 413, 415)
# What each route can answer besides success and the errors every /v1 route shares (401, 429, 500).
ROUTE_ERRORS = {
    ("post", "/v1/videos"): (*BODY_ERRORS, 503, 507),
    ("post", "/v1/videos/sync"): (*BODY_ERRORS, 503, 504),
    ("get", "/v1/videos"): (400, 404),
    ("get", "/v1/videos/{video_id}"): (404,),
    ("get", "/v1/videos/{video_id}/content"): (400, 404, 409, 416),
    ("delete", "/v1/videos/{video_id}"): (403, 404),
    ("get", "/metrics"): (401, 403, 429),  # with metrics_require_key
}


def install_openapi(app: FastAPI, settings: Settings, generation: Generation) -> None:
    """Make `app.openapi()` return FastAPI's document corrected as above (built once, on first use)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            describe(generate(), settings, generation)  # FastAPI keeps the document it makes in app.openapi_schema
        return app.openapi_schema

    app.openapi = openapi


def describe(schema: dict[str, Any], settings: Settings, generation: Generation) -> None:
    schema["info"]["description"] = limits_text(settings)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schemas["ErrorResponse"].pop("$defs"))
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            document_errors(operation, method, path)
            if "requestBody" in operation:
                state_body_limits(operation["requestBody"], settings, generation)
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "variant":
                    parameter["schema"]["enum"] = ["video"]  # thumbnail and spritesheet are not made here


def document_errors(operation: dict[str, Any], method: str, path: str) -> None:
    responses = operation["responses"]
    responses.pop("422", None)
    shared = (401, 429, 500) if path.startswith("/v1/") else ()
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for status in sorted({*shared, *ROUTE_ERRORS.get((method, path), ())}):
        responses[str(status)] = {"description": ERROR_DESCRIPTIONS[status], "content": content}


def state_body_limits(body: dict[str, Any], settings: Settings, generation: Generation) -> None:
    body["description"] = (
        f"JSON, or a multipart form as the OpenAI SDK sends it; at most {settings.max_body_bytes} bytes."
    )
    schema = copy.deepcopy(body["content"]["application/json"]["schema"])
    fields, model = schema["properties"], generation.model_config
    _value_branch(fields["model"])["enum"] = [generation.model_name]  # the one model served here
    _value_branch(fields["seconds"]).update(exclusiveMinimum=0, maximum=settings.max_seconds)
    _value_branch(fields["steps"])["maximum"] = settings.max_steps
    listed = [f"{w}x{h}" for w, h in model.sizes if w * h <= settings.max_pixels]
    fields["size"]["description"] = (
        f"WIDTHxHEIGHT, multiples of {SIZE_MULTIPLE}, at most {settings.max_pixels} pixels"
        + (f"; one of {', '.join(listed)}" if listed else "")
        + " (default {}x{})".format(*model.default_size)
    )
    if sizes := listed or sizes_within(settings.max_pixels):
        _value_branch(fields["size"])["enum"] = sizes
    else:
        _value_branch(fields["size"])["pattern"] = "^[0-9]+x[0-9]+$"
    body["content"] = {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form_schema(schema)}}


def sizes_within(max_pixels: int, most: int = 256) -> list[str]:
    """Every size of multiples of 16 within `max_pixels`, where there are at most `most` (else none: a pattern)."""
    units = max_pixels // SIZE_MULTIPLE**2  # a size is (a x 16) x (b x 16) with a * b <= units
    if units > most or sum(units // a for a in range(1, units + 1)) > most:  # (a = 1 alone gives `units` sizes)
        return []
    return [f"{a * SIZE_MULTIPLE}x{b * SIZE_MULTIPLE}" for a in range(1, units + 1) for b in range(1, units // a + 1)]


def form_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A form cannot send null: a field is given or left out."""
    form = copy.deepcopy(schema)
    for name, field in form["properties"].items():
        if "anyOf" in field:
            (kept,) = [branch for branch in field.pop("anyOf") if branch.get("type") != "null"]
            field.pop("default", None)
            form["properties"][name] = {**field, **kept}
    return form


def _value_branch(field: dict[str, Any]) -> dict[str, Any]:
    return next(branch for branch in field["anyOf"] if branch.get("type") != "null")


def limits_text(settings: Settings) -> str:
    s = settings
    return "\n".join(
        [
            "Limits (each a server setting):",
            f"- request body: at most {s.max_body_bytes} bytes (`max_body_bytes`), arriving within "
            f"{s.body_timeout_s:g} s (`body_timeout_s`)",
            f"- request head: at most {s.max_header_bytes} bytes (`max_header_bytes`), arriving within "
            f"{s.header_timeout_s:g} s of connecting or of the previous response (`header_timeout_s`)",
            f"- idle keep-alive connections close after {s.keep_alive_timeout_s} s (`keep_alive_timeout_s`)",
            f"- clips: at most {s.max_seconds:g} s (`max_seconds`), {s.max_pixels} pixels a frame (`max_pixels`), "
            f"{s.max_steps} steps (`max_steps`); at most {s.max_queue} requests waiting (`max_queue`), then 429",
            f"- WebSocket /v1/videos/stream: messages of at most {s.ws_max_message_bytes} bytes "
            f"(`ws_max_message_bytes`, larger closes with 1009), {s.ws_messages_per_second:g} a second "
            f"(`ws_messages_per_second`, more get a 429 error event), {s.ws_max_inflight} generations queued or "
            "running per connection (`ws_max_inflight`); the key as `Authorization: Bearer`, the subprotocol "
            '`aptserve.bearer.<key>` next to `aptserve`, or a first message `{"type": "auth", "api_key": ...}`',
        ]
    )
