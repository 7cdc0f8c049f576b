"""Wire schemas: the OpenAI-Videos-shaped REST objects, WebSocket messages, and the error envelope."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class VideoCreateParams(BaseModel):
    """Body of POST /v1/videos (JSON or multipart form) and of the sync and WebSocket requests."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    seconds: float | None = Field(None, description="clip length; sent as a string by the OpenAI SDK")
    size: str | None = Field(
        None, description="WIDTHxHEIGHT, multiples of 16, one of the model's sizes if it lists them"
    )
    seed: int | None = Field(
        None, ge=0, le=2**53 - 1, description="at most 2^53 - 1, the largest integer every JSON client keeps exact"
    )
    steps: int | None = Field(None, ge=1, description="denoising steps; default: the model's (1 for APT)")
    fps: int | None = Field(None, ge=1, le=60)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("seed", "steps", "fps", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """JSON Schema counts 1.0 as an integer, so it is one here too (JSON bodies are validated strictly)."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds_as_text(cls, value: Any) -> Any:
        """The OpenAI API sends seconds as a string ("4"); JSON bodies are validated strictly, so read it here."""
        if not isinstance(value, str):
            return value
        try:
            return float(value)
        except ValueError:
            raise ValueError("seconds must be a number") from None


class SyncVideoParams(VideoCreateParams):
    stream: bool = False

    @field_validator("stream", mode="before")
    @classmethod
    def _boolean_text(cls, value: Any) -> Any:
        """A form sends a boolean as text: only `true` or `false`, not every word pydantic would take (0, no, off)."""
        if not isinstance(value, str):
            return value
        if value not in ("true", "false"):
            raise ValueError("stream must be true or false")
        return value == "true"


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    model: str
    prompt: str | None = None
    # ours: the prompt the model was given, where the server completed it by the model's caption grammar
    revised_prompt: str | None = None
    seconds: str
    size: str
    seed: int
    steps: int
    fps: int
    error: VideoError | None = None
    remixed_from_video_id: str | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aptserve"
    device: str | None = None  # ours: where it runs and how (backend, attention, FP8, decoder, ...)
    run_options: dict[str, Any] | None = None
    # ours: what a request may ask of it
    architecture: str | None = None
    fps: int | None = None
    default_size: str | None = None
    sizes: list[str] | None = None  # None: any multiple of 16 within the server's pixel limit
    default_steps: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class WsGenerate(VideoCreateParams):
    type: Literal["generate"]


class WsCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["cancel"]
    id: str | None = None


def ws_event(kind: str, **fields: Any) -> dict[str, Any]:
    """A server -> client WebSocket JSON event; binary fMP4 messages always follow an `init` or `chunk` event."""
    return {"type": kind, **fields}
