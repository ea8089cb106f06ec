"""Jobs and the answers built from them: :func:`make_job` turns a sampling call into a
:class:`~unclip.server.jobs.Job` whose results are image files (:class:`Output` says in which
format and how they are answered); :func:`dispatch` queues it and answers at once (202,
``Prefer: respond-async``) or with the images; :func:`images_response` and :func:`job_view`
are the JSON bodies (OpenAI's images response, the job object); :func:`job_error` maps a
failed job to its error.

Every item of an images response carries, besides OpenAI's ``url`` or ``b64_json``, the
image's ``seed``, its ``id`` where stored, and ``unclip``: its whole metadata
(:meth:`~unclip.pipeline.events.ImageInfo.to_dict`: seed, steps, guidance, sampler, negative
prompt, strength, pipeline name and weights hash…), all a client needs to make it again.
The response's ``usage`` is described in :mod:`.usage`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.requests import Request

import unclip
from unclip.server.errors import SERVER, APIError, bad_request
from unclip.server.gallery import StoredImage
from unclip.server.jobs import SUCCEEDED, Job, JobCancelled, QueueFull
from unclip.server.state import Result, ServerState, state
from unclip.server.uploads import encode_image
from unclip.server.usage import InputTokens, output_tokens, usage

__all__ = [
    "Output",
    "dispatch",
    "images_response",
    "item_fields",
    "job_error",
    "job_view",
    "make_job",
    "submit",
]

#: the ``quality`` values echoed in streamed events (others, and none, are sent as "auto")
QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto")


@dataclass(frozen=True)
class Output:
    """How a request's images are made into files and answered: ``size`` pixels square,
    ``response_format`` (``url`` or ``b64_json``), file format ``fmt`` with
    ``compression`` (jpeg/webp quality), the ``background`` and ``quality`` the request
    gave (echoed in streamed events), and ``stream`` (the files are kept for the events)."""

    size: int
    response_format: str = "url"
    fmt: str = "png"
    compression: int | None = None
    background: str = "auto"
    quality: str = "auto"
    stream: bool = False

    @classmethod
    def of(cls, req: Any, size: int) -> Output:
        """The output options of a request (an :class:`~.schemas.ImageRequest`)."""
        return cls(
            size=size,
            response_format=req.response_format or "url",
            fmt=req.output_format or "png",
            compression=req.output_compression,
            background=req.background or "auto",
            quality=req.quality if req.quality in QUALITIES else "auto",
            stream=bool(getattr(req, "stream", False)),
        )

    @property
    def size_text(self) -> str:
        return f"{self.size}x{self.size}"

    def encode(self, image: Image.Image) -> bytes:
        return encode_image(image, self.fmt, self.compression, f"unclip {unclip.__version__}")


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
    output: Output,
    inputs: InputTokens,
) -> Job:
    """A job that runs ``work(progress)`` and turns its images into files (``output``):
    ``url`` results are stored (in the gallery, or in memory without one); ``b64_json`` and
    streamed results are sent back, and stored in the gallery only when the server keeps
    them (``gallery_keep_b64``). ``inputs``: the request's input tokens (for ``usage``)."""
    store_all = server.gallery is not None and server.gallery_keep_b64
    keep = output.response_format == "b64_json" or output.stream

    def run(progress: Callable[[str, Any], None]) -> list[Result]:
        from unclip.pipeline.events import image_info  # here: the server imports no torch

        results = []
        for img in work(progress):
            img = _resize(img, output.size)
            data = output.encode(img)
            info = image_info(img)  # typed: the answers read it as is
            image_id = None
            if store_all or output.response_format == "url":
                text = info.to_png_text()
                image_id = server.store.put(StoredImage(data, text, img.size, job.id, output.fmt))
            results.append(Result(image_id, data if keep else None, info, output.size, output.fmt))
        return results

    job = Job(
        run,
        kind=kind,
        images=images,
        stages=stages,
        timeout=server.limits.request_timeout,
        meta={"output": output, "inputs": inputs, "base_url": str(request.base_url)},
    )
    return job


def item_fields(job: Job, r: Result, b64: bool) -> dict[str, Any]:
    """One image's answer: ``b64_json`` or ``url``, and the extensions ``id`` (where stored),
    ``seed`` and ``unclip`` (the image's metadata)."""
    item: dict[str, Any] = {}
    if b64:
        item["b64_json"] = base64.b64encode(r.data or b"").decode("ascii")
    if r.id is not None:
        if not b64:
            item["url"] = f"{job.meta['base_url']}files/{r.id}.{r.fmt}"
        item["id"] = r.id
    item["seed"] = r.info.seed
    item["unclip"] = r.info.to_dict()
    return item


def images_response(job: Job) -> dict[str, Any]:
    """OpenAI's images response for a finished job, with ``usage`` (:mod:`.usage`)."""
    output: Output = job.meta["output"]
    results = job.result or []
    b64 = output.response_format == "b64_json"
    return {
        "created": int(job.created),
        "data": [item_fields(job, r, b64) for r in results],
        "background": "opaque",
        "output_format": output.fmt,
        "size": output.size_text,
        "usage": usage(job.meta["inputs"], output_tokens(r.info for r in results)),
    }


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


def submit(server: ServerState, job: Job) -> None:
    """Queue ``job``, or answer 429 (with Retry-After) when the queue is full."""
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


async def dispatch(request: Request, job: Job) -> Response:
    """Queue ``job``; answer 202 at once (``Prefer: respond-async``) or wait for it."""
    server = state(request)
    submit(server, job)
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
