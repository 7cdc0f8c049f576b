"""`create_app(settings)`: the FastAPI application, its lifespan (load, warm up, recover jobs), and wiring."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from fastapi import FastAPI

from aptserve.engines.backends.options import RunOptions
from aptserve.engines.config import MODEL_PRESETS, ModelConfig, parse_size
from aptserve.engines.loading import read_config, resolve_model
from aptserve.engines.wan_loading import is_wan_source
from aptserve.server.auth import KeyRing, owner_secret
from aptserve.server.context import Services
from aptserve.server.edge import EdgeMiddleware
from aptserve.server.errors import install_error_handlers
from aptserve.server.generation import Generation
from aptserve.server.jobs import JobManager
from aptserve.server.metrics import Metrics, MetricsMiddleware
from aptserve.server.openapi import install_openapi
from aptserve.server.routes import streaming, system, videos
from aptserve.server.scheduler import Scheduler
from aptserve.server.settings import Settings
from aptserve.server.store import DatabaseUnavailable, JobStore, StorageError
from aptserve.server.worker import EngineWorker, WarmupShape

if TYPE_CHECKING:
    from aptserve.engines.group import ParallelGroup

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
    config = read_config(resolved)
    return (config.name if is_wan_source(resolved) else resolved.name), config  # a Wan spec names its model


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
    """Wire the parts together; a setting that cannot work here raises ValueError before any weights load."""
    from aptserve.engines.pipeline import resolve_device

    name, config = model_name_and_config(settings.model)
    device, dtype = resolve_device(settings.device, settings.dtype)
    options = settings.run_options()
    options.check(device, config.dit.depth)
    group = parallel_group(settings, options, config, device, dtype)
    if options.decoder == "light" and config.light_decoder is None:
        raise ValueError(f"decoder=light: model {name} ships no light decoder (its config names none)")
    metrics = Metrics()
    metrics.set_build(package_version(), name, device, options.describe())
    metrics.track_device_memory(device_memory_reader(device))
    scheduler = Scheduler(settings.max_queue, settings.max_batch_size, settings.batch_wait_ms / 1000)
    worker = EngineWorker(
        lambda: load_pipeline(settings, options, device, dtype, group),
        scheduler,
        warmup_plan(settings, config),
        settings.prompt_completion,
        on_group_restart=metrics.sp_restarts.inc,
    )
    try:
        store = open_store(settings)
        secret = owner_secret(settings.data_dir)
    except (StorageError, OSError) as exc:
        raise ValueError(f"data_dir {settings.data_dir} is not writable: {exc}") from exc
    except DatabaseUnavailable as exc:
        raise ValueError(f"database_url: {exc}") from exc
    if store.shared_queue:  # every replica hashes owners alike: the first secret stored is everyone's
        secret = store.shared_secret(secret)
    keys = KeyRing(settings.api_keys, settings.admin_api_keys, secret, settings.rate_limit_per_minute)
    generation = Generation(settings, metrics, scheduler, worker, name, config)
    jobs = JobManager(generation, store)
    return Services(settings, metrics, worker, store, generation, jobs, options, device, keys)


def open_store(settings: Settings) -> JobStore:
    """SQLite in the data dir; with a database URL, the PostgreSQL store that several replicas share."""
    if settings.database_url is None:
        return JobStore(settings.data_dir, ttl_seconds=settings.job_ttl_s)
    try:
        from aptserve.server.pgstore import PgJobStore
    except ImportError as exc:
        raise ValueError(f"database_url needs psycopg (pip install 'aptserve[postgres]'): {exc}") from exc
    return PgJobStore(settings.database_url, settings.data_dir, settings.job_ttl_s, settings.lease_s)


def load_pipeline(settings: Settings, options: RunOptions, device: str, dtype, group: ParallelGroup | None = None):
    """The served pipeline: weights loaded, then the run options (checked at startup) applied in one `prepare` call;
    with a sequence-parallel group, its ranks started and given the generator and decode."""
    from aptserve.engines.pipeline import Pipeline

    pipeline = Pipeline.from_name(settings.model, device, dtype, settings.text_cache_size, decoder=options.decoder)
    log.info("running %s", ", ".join(f"{k}={v}" for k, v in options.describe().items()))
    pipeline = options.apply(pipeline)
    if group is not None:
        log.info("sequence parallel over %d ranks (ulysses %s)", group.size, settings.sp_ulysses or "auto")
        group.attach(pipeline)
    return pipeline


def parallel_group(
    settings: Settings, options: RunOptions, config: ModelConfig, device: str, dtype
) -> ParallelGroup | None:
    """The sequence-parallel group `sp` asks for, checked but not started (ValueError, one line, when it cannot run)."""
    if settings.sp == 1:
        if settings.sp_ulysses not in (None, 1):
            raise ValueError("sp_ulysses splits heads across sequence-parallel ranks; it needs sp > 1")
        return None
    from aptserve.engines.group import ParallelGroup, RankSpec

    sp, heads = settings.sp, config.dit.num_heads
    if options.backend == "tensorrt":
        raise ValueError("sp runs the eager or compiled backend; the TensorRT engines are built for one GPU")
    if options.cuda_graphs:
        raise ValueError("cuda_graphs capture a whole generator pass; with sp the ranks agree between blocks")
    if settings.sp_ulysses is not None and (sp % settings.sp_ulysses or heads % settings.sp_ulysses):
        raise ValueError(f"sp_ulysses {settings.sp_ulysses} must divide sp ({sp}) and the model's {heads} heads")
    rows = parse_size(config.default_size)[1] // config.vae.spatial_factor
    if rows < sp:
        raise ValueError(f"sp {sp} splits the decode by latent rows; the default size has only {rows}")
    threads = max(1, (os.cpu_count() or 1) // sp)
    spec = RankSpec(settings.model, device, dtype, options.decoder, options, settings.sp_ulysses, threads)
    return ParallelGroup(spec, sp, timeout_s=settings.sp_timeout_s)


def warmup_plan(settings: Settings, config: ModelConfig) -> list[WarmupShape]:
    """What runs before ready. Eager: one short clip (first-call paths, allocator). Compiled: every configured shape
    bucket at every batch size the scheduler can form, since each is its own graph (dynamic=False)."""
    if not settings.warmup:
        return []
    if settings.backend != "compiled" and not settings.warmup_shapes:
        return [WarmupShape(config.default_size, 0.5)]
    shapes = settings.warmup_shapes or [f"{config.default_size}:{settings.default_seconds:g}"]
    batches = range(1, settings.max_batch_size + 1) if settings.backend == "compiled" else [1]
    return [WarmupShape(*parse_warmup_shape(shape), batch) for shape in shapes for batch in batches]


def parse_warmup_shape(text: str) -> tuple[str, float]:
    size, _, seconds = text.partition(":")
    try:
        parse_size(size)
        return size, float(seconds)
    except ValueError as exc:
        raise ValueError(f"warmup_shapes entries are WIDTHxHEIGHT:SECONDS (e.g. 64x64:2); got {text!r}") from exc


@asynccontextmanager
async def lifespan(app: FastAPI):
    services: Services = app.state.services
    settings = services.settings
    if services.keys.open:
        log.warning("no API keys configured: the server is open to anyone who can reach it")
    services.jobs.recover()  # before the engine starts: jobs from before the restart are first in line
    services.worker.start()
    loops = [
        asyncio.create_task(services.jobs.cleanup_loop(settings.cleanup_interval_s)),
        asyncio.create_task(services.jobs.storage_loop(settings.storage_probe_interval_s)),
    ]
    if services.store.shared_queue:
        lease_loop = services.jobs.lease_loop(settings.claim_interval_s, settings.lease_s / 3)
        loops.append(asyncio.create_task(lease_loop))
    try:
        yield
    finally:
        for loop in loops:
            loop.cancel()
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
        openapi_url=None,  # served by the system router, behind a key where docs_require_key says so
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = services
    count_error = functools.partial(_count_error, services.metrics)
    install_error_handlers(app, on_error=count_error, retry_after_s=settings.retry_after_s)
    install_openapi(app, settings, services.generation)
    app.include_router(videos.router)
    app.include_router(streaming.router)
    app.include_router(system.router)
    app.add_middleware(EdgeMiddleware, settings=settings, on_error=count_error)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)  # outermost: counts what the edge refuses too
    return app


def _count_error(metrics: Metrics, status: int, code: str | None) -> None:
    if code in ("queue_full", "invalid_api_key"):
        return  # counted where they happen
    if code == "rate_limit_exceeded":
        metrics.error("rate_limited")
    elif code in ("storage_full", "storage_unavailable", "database_unavailable"):
        metrics.error("storage")
    elif status == 404:
        metrics.error("not_found")
    elif status < 500:
        metrics.error("validation")
    else:
        metrics.error("internal")
