"""Health, readiness, metrics, the model list, and the demo page."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Depends, Response
from fastapi.responses import HTMLResponse, JSONResponse

from aptserve.server.auth import require_api_key
from aptserve.server.protocol import ModelCard, ModelList
from aptserve.server.routes.common import ServicesDep

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready: the model is loaded and warmed up."""
    worker = services.worker
    if worker.load_error is not None:
        return JSONResponse({"status": "failed", "error": str(worker.load_error)}, status_code=503)
    if not worker.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "model": services.model_name})


@router.get("/metrics", response_class=Response)
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


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def demo_page() -> HTMLResponse:
    """Type a prompt, watch the clip stream in."""
    return HTMLResponse(files("aptserve.server").joinpath("static/index.html").read_text(encoding="utf-8"))
