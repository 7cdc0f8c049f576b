"""Health, readiness, metrics, the model list, the API docs, and the demo page."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Depends, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from aptserve.server.auth import require_api_key
from aptserve.server.errors import APIError
from aptserve.server.protocol import ModelCard, ModelList
from aptserve.server.routes.common import ServicesDep
from aptserve.server.settings import Settings

router = APIRouter(tags=["system"])


def key_required_if(locked: Callable[[Settings], bool]):
    """A dependency for an ops route: where the setting `locked` reads says so, it needs a key, and an admin key
    where admin keys are set."""

    async def check(request: Request) -> None:
        settings = request.app.state.services.settings
        if not locked(settings):
            return
        caller = await require_api_key(request)
        if settings.admin_api_keys and not caller.admin:
            raise APIError(403, "This route needs an admin API key.", "admin_key_required")

    return check


MetricsKey = Depends(key_required_if(lambda s: s.metrics_require_key))
DocsKey = Depends(key_required_if(lambda s: s.docs_require_key))


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: the body's `status` says why"}})
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready: the model is loaded and warmed up."""
    worker, store = services.worker, services.store
    if worker.load_error is not None:  # the exception itself is in the server log, not in an answer
        return JSONResponse({"status": "failed", "error": "the model failed to load; see the server log"}, 503)
    if not worker.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    if not store.writable:  # the data dir refuses writes: new jobs would fail
        code = store.fault.code if store.fault is not None else "storage_unavailable"
        return JSONResponse({"status": "storage", "error": code}, status_code=503)
    return JSONResponse({"status": "ready", "model": services.model_name})


@router.get("/metrics", response_class=Response, dependencies=[MetricsKey])
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text exposition."""
    body, content_type = services.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
async def list_models(services: ServicesDep) -> ModelList:
    """The model this server runs."""
    config = services.generation.model_config
    card = ModelCard(
        id=services.model_name,
        created=services.started_at,
        device=services.device,
        run_options=services.run_options.describe(),
        architecture=config.arch,
        fps=config.fps,
        default_size="{}x{}".format(*config.default_size),
        sizes=["{}x{}".format(*size) for size in config.sizes] or None,
        default_steps=config.default_steps,
    )
    return ModelList(data=[card])


@router.get("/openapi.json", include_in_schema=False, dependencies=[DocsKey])
async def openapi_document(request: Request) -> JSONResponse:
    """The OpenAPI document (aptserve.server.openapi)."""
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=[DocsKey])
async def swagger_ui(request: Request) -> HTMLResponse:
    """Interactive API docs."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - Swagger UI")


@router.get("/redoc", include_in_schema=False, dependencies=[DocsKey])
async def redoc(request: Request) -> HTMLResponse:
    """Readable API docs."""
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def demo_page() -> HTMLResponse:
    """Type a prompt, watch the clip stream in."""
    html, headers = demo_page_and_headers()
    return HTMLResponse(html, headers=headers)


@cache
def demo_page_and_headers() -> tuple[str, dict[str, str]]:
    """The page and its headers: a policy that runs only the page's own inline script and style, talks only to this
    server, and lets no other site frame it."""
    html = files("aptserve.server").joinpath("static/index.html").read_text(encoding="utf-8")
    policy = {
        "default-src": "'none'",
        "script-src": _inline_hash(html, "script"),
        "style-src": _inline_hash(html, "style"),
        "connect-src": "'self'",  # fetch and the WebSocket (CSP 3: 'self' covers ws: and wss: of the same host)
        "media-src": "blob:",  # Media Source Extensions play from a blob: URL
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    headers = {
        "Content-Security-Policy": "; ".join(f"{name} {value}" for name, value in policy.items()),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",  # a key in an old /?api_key= link must not leave in a Referer
    }
    return html, headers


def _inline_hash(html: str, tag: str) -> str:
    (body,) = re.findall(f"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
