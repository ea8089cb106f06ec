"""The job routes (under ``/v1``): a job's state, its cancelling and its progress as
server-sent events; and what the server runs: ``/models`` and ``/status``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import unclip
from unclip.server.bodies import OPENAI_SIZES
from unclip.server.errors import APIError
from unclip.server.jobs import Job
from unclip.server.openapi import NOT_FOUND
from unclip.server.responses import job_view
from unclip.server.state import JOB_TTL, state
from unclip.server.uploads import OUTPUT_FORMATS

__all__ = ["about", "router"]

router = APIRouter()
#: what the server runs (included after the gallery routes, as the document lists them)
about = APIRouter(tags=["about"])


def _job(request: Request, job_id: str) -> Job:
    job = state(request).jobs.get(job_id)
    if job is None:
        raise APIError(404, f"no job {job_id!r} (finished jobs are kept {JOB_TTL:.0f} s)")
    return job


@router.get(
    "/jobs/{job_id}",
    tags=["jobs"],
    summary="A job's state, progress and result",
    responses=NOT_FOUND,
)
async def job_state(request: Request, job_id: str) -> dict[str, Any]:
    return job_view(_job(request, job_id))


@router.delete("/jobs/{job_id}", tags=["jobs"], summary="Cancel a job", responses=NOT_FOUND)
async def job_cancel(request: Request, job_id: str) -> dict[str, Any]:
    job = _job(request, job_id)
    job.cancel()
    return job_view(job)


@router.get(
    "/jobs/{job_id}/events",
    tags=["jobs"],
    summary="Server-sent events: queued, started, progress (per sampling step), done",
    response_class=StreamingResponse,
    responses=NOT_FOUND,
)
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    job = _job(request, job_id)
    last = request.headers.get("last-event-id", "")
    last_id = int(last) if last.isdigit() else -1
    return StreamingResponse(
        _events(job, last_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(job: Job, last_id: int) -> AsyncIterator[str]:
    """``job``'s events after ``last_id`` as server-sent events, a comment every 15 s
    while nothing happens; ``done`` carries the job object."""
    yield "retry: 2000\n\n"
    async for event in job.follow(last_id, heartbeat=15.0):
        if event is None:
            yield ": keep-alive\n\n"
            continue
        data = job_view(job) if event.name == "done" else event.data
        yield f"id: {event.id}\nevent: {event.name}\ndata: {json.dumps(data)}\n\n"


@about.get("/models", summary="The pipeline, as an OpenAI model list")
async def models(request: Request) -> dict[str, Any]:
    server = state(request)
    model = {
        "id": server.pipe.name,
        "object": "model",
        "created": int(server.started),
        "owned_by": "unclip",
    }
    return {"object": "list", "data": [model]}


@about.get("/status", summary="Pipeline, defaults, limits and queue state")
async def status(request: Request) -> dict[str, Any]:
    server = state(request)
    pipe = server.pipe
    sampling = getattr(getattr(pipe, "config", None), "sampling", None)
    return {
        "pipeline": pipe.name,
        "image_size": pipe.image_size,
        "sizes": [f"{s}x{s}" for s in sorted({pipe.image_size, *OPENAI_SIZES})],
        "has_prior": getattr(pipe, "prior", None) is not None,
        "defaults": sampling.to_dict() if sampling is not None else None,
        "limits": asdict(server.limits),
        "queue": {
            "workers": server.queue.workers,
            "size": server.queue.queue_size,
            "queued": server.queue.queued,
            "running": server.queue.running,
        },
        "gallery": server.gallery is not None,
        "output_formats": list(OUTPUT_FORMATS),
        "version": unclip.__version__,
    }
