"""Jobs and the answers built from them: :func:`make_job` turns a sampling call into a
:class:`~unclip.server.jobs.Job` whose results are stored PNGs; :func:`dispatch` queues it
and answers at once (202, ``Prefer: respond-async``) or with the images;
:func:`images_response` and :func:`job_view` are the JSON bodies (OpenAI's images
response, the job object); :func:`job_error` maps a failed job to its error."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.requests import Request

import unclip
from unclip.server.errors import SERVER, APIError, bad_request
from unclip.server.jobs import SUCCEEDED, Job, JobCancelled, QueueFull
from unclip.server.state import Result, ServerState, state
from unclip.server.uploads import png_bytes

__all__ = ["dispatch", "images_response", "job_error", "job_view", "make_job"]


def _resize(img: Image.Image, size: int) -> Image.Image:
    from unclip.pipeline.events import attach_info, image_info  # here: no torch at import

    if img.size == (size, size):
        return img
    out = img.resize((size, size), Image.Resampling.LANCZOS)
    out.info = dict(img.info)
    return attach_info(out, image_info(img).replace(resized_from=f"{img.size[0]}x{img.size[1]}"))


def make_job(
    server: ServerState,
    request: Request,
    kind: str,
    work: Callable[[Callable[[str, Any], None]], list[Image.Image]],
    *,
    images: int,
    stages: list[str],
    size: int,
    response_format: str,
) -> Job:
    """A job that runs ``work(progress)`` and turns its images into PNGs: ``url`` results
    are stored (in the gallery, or in memory without one); ``b64_json`` results are sent
    back and stored in the gallery only when the server keeps them (``gallery_keep_b64``)."""
    software = f"unclip {unclip.__version__}"
    store_all = server.gallery is not None and server.gallery_keep_b64

    def run(progress: Callable[[str, Any], None]) -> list[Result]:
        from unclip.pipeline.events import image_info  # here: the server imports no torch

        results = []
        for img in work(progress):
            img = _resize(img, size)
            png = png_bytes(img, software)
            info = image_info(img)  # typed: the answers read it as is
            image_id = None
            if store_all or response_format == "url":
                image_id = server.store.put(png, info.to_png_text(), img.size, job.id)
            results.append(
                Result(image_id, png if response_format == "b64_json" else None, info, size)
            )
        return results

    job = Job(
        run,
        kind=kind,
        images=images,
        stages=stages,
        timeout=server.limits.request_timeout,
        meta={"response_format": response_format, "base_url": str(request.base_url)},
    )
    return job


def images_response(job: Job) -> dict[str, Any]:
    base = job.meta["base_url"]
    data = []
    size = None
    for r in job.result or []:
        item: dict[str, Any] = {}
        if job.meta["response_format"] == "b64_json":
            item["b64_json"] = base64.b64encode(r.png or b"").decode("ascii")
        else:
            item["url"] = f"{base}files/{r.id}.png"
        if r.id is not None:
            item["id"] = r.id
        item["seed"] = r.info.seed
        data.append(item)
        size = f"{r.size}x{r.size}"
    return {"created": int(job.created), "data": data, "output_format": "png", "size": size}


def job_error(job: Job) -> APIError | None:
    err = job.error
    if job.status == SUCCEEDED or err is None:
        return None
    if isinstance(err, JobCancelled):
        if err.reason == "timeout":
            return APIError(
                504, "the request timed out before the images were ready", code="timeout"
            )
        if err.reason == "shutdown":
            return APIError(503, "the server is shutting down", code="shutdown")
        return APIError(409, "the job was cancelled", code="cancelled")
    if isinstance(err, (ValueError, TypeError)):
        return bad_request(str(err))
    return APIError(500, f"the images could not be made ({type(err).__name__}: {err})", type=SERVER)


def job_view(job: Job) -> dict[str, Any]:
    err = job_error(job)
    return {
        "id": job.id,
        "object": "image.job",
        "kind": job.kind,
        "status": job.status,
        "created": int(job.created),
        "started": job.started,
        "finished": job.finished,
        "progress": job.progress_info,
        "events_url": f"/v1/jobs/{job.id}/events",
        "result": images_response(job) if job.status == SUCCEEDED else None,
        "error": None if err is None else err.body()["error"],
    }


def _wants_async(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().lower() == "respond-async" for p in prefer.split(","))


async def dispatch(request: Request, job: Job) -> Response:
    """Queue ``job``; answer 202 at once (``Prefer: respond-async``) or wait for it."""
    server = state(request)
    try:
        server.queue.submit(job)
    except QueueFull as e:
        raise APIError(
            429,
            f"the server is busy: {server.queue.queue_size} job(s) are already waiting; "
            f"retry in {e.retry_after} s",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        ) from None
    if _wants_async(request):
        server.remember(job)
        return JSONResponse(
            job_view(job),
            status_code=202,
            headers={"Location": f"/v1/jobs/{job.id}", "Preference-Applied": "respond-async"},
        )
    end = time.monotonic() + server.limits.request_timeout
    while not job.done:
        left = end - time.monotonic()
        if left <= 0:
            job.cancel("timeout")
            break
        await job.wait_async(timeout=min(0.5, left))
        if not job.done and await request.is_disconnected():
            job.cancel("client disconnected")
            return Response(status_code=499)
    if not job.done:
        raise APIError(504, "the request timed out before the images were ready", code="timeout")
    err = job_error(job)
    if err is not None:
        raise err
    return JSONResponse(images_response(job))
