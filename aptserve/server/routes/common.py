"""Helpers shared by the routers: the services handle and JSON-or-form request bodies."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from aptserve.server.context import Services
from aptserve.server.errors import APIError

M = TypeVar("M", bound=BaseModel)
BODY_TYPES = ("application/json", "multipart/form-data")


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def read_body(request: Request, model: type[M]) -> M:
    """Parse a JSON or multipart form (as the OpenAI SDK sends) body into `model`. Any other body gets 415: a browser
    sends text/plain and urlencoded bodies to any origin without asking it first."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in BODY_TYPES:
        raise APIError(
            415,
            "The body must be application/json (or multipart/form-data, as the OpenAI SDK sends it).",
            "unsupported_media_type",
        )
    data: Any
    try:
        if media_type == "multipart/form-data":
            form = await request.form()
            data = {key: value for key, value in form.multi_items() if isinstance(value, str)}
            files = [key for key, value in form.multi_items() if not isinstance(value, str)]
            if files:
                raise APIError(
                    400, f"File uploads are not supported ('{files[0]}').", "unsupported_parameter", files[0]
                )
        else:
            data = await request.json()
    except APIError:
        raise
    except Exception as exc:
        raise APIError(400, f"Could not parse the request body as JSON or form data: {exc}", "invalid_body") from exc
    try:  # JSON says its types (true is not 1, "5" is not 5); a form's fields are all text
        return model.model_validate(data, strict=media_type == "application/json")
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI requestBody for a handler that reads its body itself (JSON or form)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    content = {kind: {"schema": schema} for kind in BODY_TYPES}
    return {"requestBody": {"required": True, "content": content}}
