"""The OpenAI-Videos-shaped job API: create, retrieve, download, list, delete. A key sees only the jobs it created
(an admin key, and every caller of an open server, sees all); another's job is as unknown as a missing one."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse

from aptserve.server.auth import Caller, require_api_key
from aptserve.server.context import Services
from aptserve.server.errors import APIError, not_found
from aptserve.server.jobs import job_to_video
from aptserve.server.protocol import Video, VideoCreateParams, VideoDeleted, VideoList
from aptserve.server.routes.common import ServicesDep, body_schema, read_body
from aptserve.server.store import COMPLETED, VideoJob

router = APIRouter(prefix="/v1/videos", tags=["videos"], dependencies=[Depends(require_api_key)])
CallerDep = Annotated[Caller, Depends(require_api_key)]  # the router's own check, cached: charged once a request

POLL_AFTER_MS = "250"  # hint the OpenAI SDK's create_and_poll reads


def visible_job(services: Services, caller: Caller, video_id: str) -> VideoJob:
    job = services.jobs.get(video_id)
    if job is None or not caller.sees(job.owner):
        raise not_found("video", video_id)
    return job


@router.post("", response_model=Video, openapi_extra=body_schema(VideoCreateParams))
async def create_video(request: Request, services: ServicesDep, caller: CallerDep) -> Video:
    """Queue a video generation job (JSON or multipart form)."""
    params = await read_body(request, VideoCreateParams)
    return job_to_video(services.jobs.create(params, caller.owner))


@router.get("", response_model=VideoList)
async def list_videos(
    services: ServicesDep,
    caller: CallerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> VideoList:
    """List video jobs, newest first by default, with cursor pagination."""
    try:
        jobs, has_more = services.jobs.list(after, limit, order, caller.scope)
    except KeyError as exc:
        raise APIError(404, f"No video found with id '{after}' to list after.", "not_found", "after") from exc
    data = [job_to_video(job) for job in jobs]
    return VideoList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=has_more
    )


@router.get("/{video_id}", response_model=Video)
async def retrieve_video(video_id: str, services: ServicesDep, caller: CallerDep, response: Response) -> Video:
    """Status and metadata of one video job."""
    job = visible_job(services, caller, video_id)
    response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return job_to_video(job)


@router.get("/{video_id}/content", response_class=FileResponse, responses={200: {"content": {"video/mp4": {}}}})
async def download_video(
    video_id: str,
    services: ServicesDep,
    caller: CallerDep,
    variant: Literal["video", "thumbnail", "spritesheet"] = "video",
) -> FileResponse:
    """The finished MP4 (supports Range requests)."""
    job = visible_job(services, caller, video_id)
    if variant != "video":
        raise APIError(400, f"Variant '{variant}' is not available; only 'video'.", "unsupported_variant", "variant")
    if job.status != COMPLETED:
        raise APIError(409, f"Video {video_id} is not ready (status '{job.status}').", "video_not_ready")
    path = services.store.video_path(video_id)
    if not path.exists():
        raise not_found("video content", video_id)
    return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4", content_disposition_type="inline")


@router.delete("/{video_id}", response_model=VideoDeleted)
async def delete_video(video_id: str, services: ServicesDep, caller: CallerDep) -> VideoDeleted:
    """Delete a job and its file; a queued or running generation is cancelled."""
    visible_job(services, caller, video_id)
    if services.jobs.delete(video_id) is None:
        raise not_found("video", video_id)
    return VideoDeleted(id=video_id)
