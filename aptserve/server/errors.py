"""Errors in the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`, with their exception handlers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aptserve.server.store import DatabaseUnavailable

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """Raised by handlers and services; becomes a JSON error response with the right status."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def body(self) -> dict[str, Any]:
        return envelope(self.status, self.message, self.code, self.param)


def envelope(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def not_found(what: str, ident: str) -> APIError:
    return APIError(404, f"No {what} found with id '{ident}'.", code="not_found", param="video_id")


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "form")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return (f"Invalid '{param}': {message}." if param else f"Invalid request: {message}."), param


def allowed_methods(request: Request) -> list[str]:
    """The methods served at this path by its most specific routes (`/v1/videos/sync` itself, not
    `/v1/videos/{video_id}`); Starlette's own 405 names only those of the first route that matched the path."""
    path = request.url.path
    routes = [r for r in _http_routes(request.app.router.routes) if r.path_regex.match(path)]
    literal = [route for route in routes if route.path == path]
    return sorted({method for route in literal or routes for method in route.methods})


def _http_routes(routes: list) -> list:
    """Every HTTP route, seen through the wrappers FastAPI puts around an included router."""
    flat = [
        c for r in routes for c in (r.effective_route_contexts() if hasattr(r, "effective_route_contexts") else [r])
    ]
    return [route for route in flat if getattr(route, "methods", None) and getattr(route, "path_regex", None)]


def install_error_handlers(app: FastAPI, on_error=None, retry_after_s: int = 1) -> None:
    """`on_error(status, code)` lets the app count client and server errors without this module knowing metrics."""

    def respond(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
        if on_error is not None:
            on_error(status, body["error"].get("code"))
        if status >= 500:  # uvicorn drops the connection after an unexpected error: say so, or the next request on
            headers = {**(headers or {}), "Connection": "close"}  # it would meet a reset
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return respond(400, envelope(400, message, "invalid_value", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return respond(exc.status_code, envelope(exc.status_code, str(exc.detail)), headers)

    @app.exception_handler(DatabaseUnavailable)
    async def _database_unavailable(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        body = envelope(503, "The job database is not reachable right now; retry later.", "database_unavailable")
        return respond(503, body, {"Retry-After": str(retry_after_s)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return respond(500, envelope(500, "The server had an error while processing your request.", "internal_error"))
