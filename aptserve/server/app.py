"""`create_app(settings)`: the FastAPI application, its lifespan (load, warm up, recover jobs), and wiring."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from aptserve.engines.config import MODEL_PRESETS, ModelConfig
from aptserve.engines.loading import read_config, resolve_model
from aptserve.server.context import Services
from aptserve.server.errors import install_error_handlers
from aptserve.server.generation import Generation
from aptserve.server.jobs import JobManager
from aptserve.server.metrics import Metrics, MetricsMiddleware
from aptserve.server.routes import streaming, system, videos
from aptserve.server.scheduler import Scheduler
from aptserve.server.settings import Settings
from aptserve.server.store import JobStore
from aptserve.server.worker import EngineWorker

log = logging.getLogger("aptserve")


def package_version() -> str:
    try:
        return version("aptserve")
    except PackageNotFoundError:
        return "0+unknown"


def model_name_and_config(spec: str) -> tuple[str, ModelConfig]:
    """The served model's public name and config, known before its weights load."""
    resolved = resolve_model(spec)
    if isinstance(resolved, str):
        return resolved, MODEL_PRESETS[resolved]
    return resolved.name, read_config(resolved)


def device_memory_reader(device: str):
    import torch

    if device.startswith("cuda"):
        return lambda: float(torch.cuda.memory_allocated(device))
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> float:  # CPU: the process's resident memory holds the model
        try:
            with open("/proc/self/statm") as f:
                return float(int(f.read().split()[1]) * page)
        except OSError:
            return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    return resident


def build_services(settings: Settings) -> Services:
    from aptserve.engines.pipeline import Pipeline, resolve_device

    name, config = model_name_and_config(settings.model)
    device, dtype = resolve_device(settings.device, settings.dtype)
    metrics = Metrics()
    metrics.set_build(package_version(), name, "eager", device)
    metrics.track_device_memory(device_memory_reader(device))
    scheduler = Scheduler(settings.max_queue, settings.max_batch_size, settings.batch_wait_ms / 1000)
    worker = EngineWorker(
        lambda: Pipeline.from_name(settings.model, device, dtype, settings.text_cache_size),
        scheduler,
        settings.warmup,
        settings.prompt_completion,
    )
    store = JobStore(settings.data_dir, ttl_seconds=settings.job_ttl_s)
    generation = Generation(settings, metrics, scheduler, worker, name, config)
    return Services(settings, metrics, worker, store, generation, JobManager(generation, store))


@asynccontextmanager
async def lifespan(app: FastAPI):
    services: Services = app.state.services
    if not services.settings.api_keys:
        log.warning("no API keys configured: the server is open to anyone who can reach it")
    services.worker.start()
    services.jobs.recover()
    cleanup = asyncio.create_task(services.jobs.cleanup_loop(services.settings.cleanup_interval_s))
    try:
        yield
    finally:
        cleanup.cancel()
        await services.jobs.shutdown()
        await asyncio.to_thread(services.worker.stop)
        with contextlib.suppress(Exception):
            services.store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    services = build_services(settings)
    app = FastAPI(
        title="aptserve",
        version=package_version(),
        summary="One-step text-to-video: OpenAI-style video jobs, streaming fMP4 over HTTP and WebSocket.",
        lifespan=lifespan,
        docs_url="/docs",
    )
    app.state.services = services
    install_error_handlers(app, on_error=lambda status, code: _count_error(services.metrics, status, code))
    app.include_router(videos.router)
    app.include_router(streaming.router)
    app.include_router(system.router)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    return app


def _count_error(metrics: Metrics, status: int, code: str | None) -> None:
    if code in ("queue_full", "invalid_api_key"):
        return  # counted where they happen
    if status == 404:
        metrics.error("not_found")
    elif status < 500:
        metrics.error("validation")
    else:
        metrics.error("internal")
