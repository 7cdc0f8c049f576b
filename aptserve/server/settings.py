"""Every server setting in one class: environment variables `APTSERVE_<NAME>`, each also a `--name` CLI flag."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from aptserve.engines.backends.options import RunOptions


def default_model() -> str:
    from aptserve.engines.loading import default_model as resolve  # torch only when a Settings is actually built

    return resolve()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APTSERVE_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 = any free port)")
    model: str = Field(default_factory=default_model, description="checkpoint folder, name under models/, or preset")
    device: str | None = Field(None, description="cpu or cuda (default: cuda when available)")
    dtype: str | None = Field(None, description="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    data_dir: Path = Field(Path("data"), description="folder for the job database and finished MP4s")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys; none = open server"
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated bearer keys that may also see and delete every job (other keys see only the "
        "jobs they created)",
    )
    rate_limit_per_minute: int = Field(
        1200,
        ge=0,
        description="requests a minute each API key may make to the /v1 HTTP routes, in bursts of up to as many "
        "(a token bucket); more get 429 with Retry-After; 0 = no limit",
    )
    max_queue: int = Field(16, ge=1, description="requests waiting beyond this get 429")
    max_batch_size: int = Field(4, ge=1, description="most same-shape requests run in one forward pass")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more same-shape requests")
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="deadline from acceptance to the last frame, checked between generator blocks and decode chunks; "
        "time the engine spent on a cancelled or failed request while this one waited is not counted",
    )
    job_ttl_s: float = Field(86400.0, gt=0, description="how long finished videos stay downloadable")
    cleanup_interval_s: float = Field(300.0, gt=0, description="how often expired videos are deleted")
    storage_probe_interval_s: float = Field(
        5.0, gt=0, description="how often the data dir is checked for writes (/readyz is not ready while it refuses)"
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user@host/db) of a job store shared by several replicas, which "
        "claim asynchronous jobs from it; they must share data_dir too (unset: SQLite in data_dir, one replica)",
    )
    lease_s: float = Field(
        30.0,
        gt=0,
        description="with database_url: a replica renews its leases on its jobs every lease_s / 3; a job whose lease "
        "expired (its replica died) is claimed by another replica",
    )
    claim_interval_s: float = Field(0.5, gt=0, description="with database_url: how often a replica claims queued jobs")
    max_shared_queue: int = Field(
        256,
        ge=1,
        description="with database_url: jobs waiting in the shared queue (claimed by no replica) beyond this get 429",
    )
    sp: int = Field(
        1,
        ge=1,
        description="sequence-parallel ranks that run every clip together: processes of one torch.distributed group "
        "(one GPU each over NCCL on CUDA, gloo on the CPU); rank 0 serves HTTP and sends the others their work",
    )
    sp_ulysses: int | None = Field(
        None,
        ge=1,
        description="with sp: ranks that split attention heads (Ulysses); it must divide sp and the model's head "
        "count (default: their gcd); a ring over key/value blocks takes the rest of the degree",
    )
    sp_timeout_s: float = Field(
        120.0,
        gt=0,
        description="with sp: longest a rank waits for its peers inside a collective before the request fails and "
        "the group restarts",
    )
    max_attempts: int = Field(3, ge=1, description="restarts a job may survive before it is failed")
    max_seconds: float = Field(10.0, gt=0, description="longest clip a client may ask for")
    max_pixels: int = Field(1280 * 720, ge=256, description="largest width x height a client may ask for")
    default_seconds: float = Field(2.0, gt=0, description="clip length when a request names none")
    max_steps: int = Field(50, ge=1, description="most denoising steps a request may ask for (a guided base model)")
    max_request_cost: int = Field(
        6_000_000,
        ge=1,
        description="most estimated work one request may cost, in token-passes (video tokens x generator passes, "
        "x2 per step with guidance, weighted for attention past 46,800 tokens, plus decoded pixels / 1024); "
        "the default admits a 720p 2 s clip (137,700), 50 guided steps at 832x480 for 5 s (5.6M), "
        "not 720p for 10 s at 60 fps (7.4M)",
    )
    text_cache_size: int = Field(1024, ge=1, description="prompt embeddings kept in the LRU cache")
    prompt_completion: bool = Field(
        True, description="complete short prompts by the model's caption grammar, where its checkpoint has one"
    )
    warmup: bool = Field(True, description="generate once per warm-up shape (and batch size) before reporting ready")
    warmup_shapes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated WIDTHxHEIGHT:SECONDS shape buckets compiled before ready "
        "(default: the model's size at default_seconds)",
    )
    backend: str = Field("eager", description="eager or compiled (torch.compile)")
    compiler: str = Field("inductor", description="torch.compile backend for --backend compiled: inductor, aot_eager")
    attention: str = Field("auto", description="generator attention: auto, sdpa, triton, triton_fp8, ...")
    fp8_linears: bool = Field(False, description="FP8 (e4m3) linears in the generator")
    bf16_blocks: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="comma-separated generator block indices kept in bf16 with --fp8-linears"
    )
    fp8_emulation: bool = Field(False, description="allow FP8 linears without FP8 hardware (slow emulation)")
    cuda_graphs: bool = Field(False, description="CUDA graphs per shape bucket (compiled backend, CUDA only)")
    channels_last: bool = Field(False, description="channels-last (NDHWC) VAE decoder")
    decoder: str = Field("full", description="VAE decoder: full, or light (the model's distilled light decoder)")
    tensorrt_dir: str | None = Field(
        None, description="backend=tensorrt (unverified): the folder `aptserve export onnx` wrote for this model"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429")
    max_body_bytes: int = Field(
        65536, ge=1024, description="largest request body (JSON or multipart); larger gets 413 before it is read"
    )
    max_header_bytes: int = Field(
        16384, ge=1024, description="largest request head (request line and headers); larger gets 431"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds a client has to send a request head after connecting or after the previous response, "
        "and a WebSocket its auth message; then the connection is closed",
    )
    body_timeout_s: float = Field(30.0, gt=0, description="seconds a request body may take to arrive; then 408")
    keep_alive_timeout_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated browser origins (scheme://host:port) besides the server's own that may open "
        "the WebSocket and send POST or DELETE requests; * = any",
    )
    ws_max_message_bytes: int = Field(
        65536, ge=1024, description="largest WebSocket message a client may send; larger closes the connection (1009)"
    )
    ws_messages_per_second: float = Field(
        20.0, gt=0, description="WebSocket messages a connection may send per second; more get a 429 error event"
    )
    ws_max_inflight: int = Field(
        4, ge=1, description="generations one WebSocket connection may have queued or running at once"
    )
    metrics_require_key: bool = Field(False, description="GET /metrics needs an API key (default: open to scrapers)")
    docs_require_key: bool = Field(False, description="/docs and /openapi.json need an API key (default: open)")
    log_level: str = Field("info", description="uvicorn and aptserve log level")

    @field_validator("api_keys", "admin_api_keys", "warmup_shapes", "bf16_blocks", "allowed_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def run_options(self) -> RunOptions:
        """How the model runs (raises ValueError naming a bad value)."""
        from aptserve.engines.backends.options import RunOptions

        return RunOptions(
            backend=self.backend,
            attention=self.attention,
            fp8_linears=self.fp8_linears,
            bf16_blocks=tuple(self.bf16_blocks),
            fp8_emulation=self.fp8_emulation,
            cuda_graphs=self.cuda_graphs,
            channels_last=self.channels_last,
            compiler=self.compiler,
            decoder=self.decoder,
            tensorrt_dir=self.tensorrt_dir,
        )


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting; flags left unset fall back to the environment, then to the defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            parser.add_argument(flag, default=None, help=field.description, metavar=name.upper())


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)
