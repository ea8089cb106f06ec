"""Streamed image requests (``stream: true``): server-sent events in the OpenAI Images API's
shapes, as the official ``openai`` client reads them.

For a generation (``image_generation.*``) or an edit (``image_edit.*``)::

    event: image_generation.partial_image
    data: {"type": "image_generation.partial_image", "b64_json": "...", "partial_image_index": 0,
           "created_at": 1700000000, "size": "64x64", "quality": "auto", "background": "auto",
           "output_format": "png", "image_index": 0,
           "unclip": {"stage": "decoder", "step": 4, "steps": 10}}
    ...
    event: image_generation.completed
    data: {"type": "image_generation.completed", "b64_json": "...", "usage": {...},
           "created_at": ..., "size": ..., "quality": ..., "background": ..., "output_format": ...,
           "image_index": 0, "seed": 5, "unclip": {<the image's metadata>}}

**Partial images** (``partial_images`` = k, 0–3, per output image) are the sampler's x₀
predictions of the first image stage (the decoder, or the inpainting decoder for edits):
its steps are cut into k + 1 equal parts and partial j is the prediction at the end of part
j + 1 (step ⌊(j+1)·T/(k+1)⌋ of T, 0-based; several fall on one step when T < k + 1), resized
to the output size and encoded in the request's ``output_format``. The images of a batch are
sampled together, so their partials arrive together; ``image_index`` (an extension) says
which output image each event belongs to. **Completed** events follow, one per image in the
answer's order, once all are made; each carries ``usage`` with the request's input tokens
and that image's output tokens (:mod:`.usage`), and the extensions ``image_index``, ``seed``,
``unclip`` (the image's metadata) and, where the image was stored, ``id`` and ``url``.

A failure after the stream has begun is an ``error`` event (``{"error": {...}}``, which the
``openai`` client raises as an ``APIError``); a client that disconnects cancels its job.
Errors found before the job is queued (a bad field, a full queue) are plain HTTP errors.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from PIL import Image

from unclip.server.errors import APIError
from unclip.server.jobs import Job
from unclip.server.responses import Output, item_fields, job_error
from unclip.server.usage import output_tokens, usage

__all__ = ["PartialImages", "partial_steps", "stream_response"]

#: the event name prefix of each streamable route
EVENT_PREFIX = {"generations": "image_generation", "edits": "image_edit"}
#: seconds without news between two keep-alive comments
HEARTBEAT = 15.0


def partial_steps(count: int, total: int) -> list[int]:
    """The 0-based steps (of ``total``) at which partial images 0 … ``count``-1 are taken:
    the ends of the first ``count`` of ``count`` + 1 equal parts of the steps."""
    return [min(total - 1, max(0, (j + 1) * total // (count + 1))) for j in range(count)]


def to_images(x0: Any) -> list[Image.Image]:
    """x₀ predictions [N, 3, s, s] in [-1, 1] (a tensor) -> N RGB images."""
    pixels = ((x0.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [N, s, s, 3]
    return [Image.fromarray(a, "RGB") for a in array]


class PartialImages:
    """Collects a streamed job's partial images from its progress events.

    :meth:`tap` wraps the job's ``progress(stage, event)``: at the steps of
    :func:`partial_steps` of ``stage`` it turns the event's x₀ prediction into files and
    appends one event body per image to :attr:`items` (then wakes the stream); the batch
    offset is followed so each body names its output image (``image_index``)."""

    def __init__(self, count: int, stage: str, output: Output, event_type: str) -> None:
        self.count = count
        self.stage = stage
        self.output = output
        self.event_type = event_type
        self.items: list[dict[str, Any]] = []
        self._offset = 0  # output index of the running batch's first image
        self._batch = 0

    def tap(self, progress: Callable[[str, Any], None], job: Job) -> Callable[[str, Any], None]:
        def call(stage: str, event: Any) -> None:
            progress(stage, event)  # first: it raises when the job was cancelled
            if self.count and stage == self.stage:
                self._take(event, job)

        return call

    def _take(self, event: Any, job: Job) -> None:
        if event.index == 0:  # a new batch of this stage
            self._offset += self._batch
            self._batch = event.images
        hits = [j for j, s in enumerate(partial_steps(self.count, event.total)) if s == event.index]
        x0 = getattr(event.step, "pred_x0", None)
        if not hits or x0 is None:
            return
        size = self.output.size
        for b, img in enumerate(to_images(x0)):
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            b64 = _b64(self.output.encode(img))
            for j in hits:
                self.items.append({
                    "type": self.event_type,
                    "b64_json": b64,
                    "partial_image_index": j,
                    **_common(self.output),
                    "image_index": self._offset + b,
                    "unclip": {"stage": event.stage, "step": event.index + 1,
                               "steps": event.total},
                })  # fmt: skip
        job.emit("partial_image", {"partials": len(self.items)})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _common(output: Output) -> dict[str, Any]:
    """The fields every OpenAI image stream event has besides its type and image."""
    return {
        "created_at": int(time.time()),
        "size": output.size_text,
        "quality": output.quality,
        "background": output.background,
        "output_format": output.fmt,
    }


def _sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _error(err: APIError) -> str:
    return _sse("error", err.body())


def stream_response(job: Job, partials: PartialImages, prefix: str, timeout: float) -> Any:
    """The streamed answer of a queued ``job`` (see the module docstring); ``timeout``
    seconds at most (then the job is cancelled and an ``error`` event ends the stream)."""
    return StreamingResponse(
        _events(job, partials, prefix, timeout),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    job: Job, partials: PartialImages, prefix: str, timeout: float
) -> AsyncIterator[str]:
    sent = 0
    try:
        async for event in job.follow(-1, timeout=timeout, heartbeat=HEARTBEAT):
            while sent < len(partials.items):
                yield _sse(f"{prefix}.partial_image", partials.items[sent])
                sent += 1
            if event is None:
                yield ": keep-alive\n\n"
        while sent < len(partials.items):
            yield _sse(f"{prefix}.partial_image", partials.items[sent])
            sent += 1
        if not job.done:
            job.cancel("timeout")
            await job.wait_async(timeout=5.0)
        err = job_error(job) if job.done else None
        if not job.done or err is not None:
            yield _error(err or APIError(504, "the request timed out", code="timeout"))
            return
        inputs = job.meta["inputs"]
        output: Output = partials.output
        for index, result in enumerate(job.result or []):
            item = item_fields(job, result, b64=True)
            if result.id is not None:
                item["url"] = f"{job.meta['base_url']}files/{result.id}.{result.fmt}"
            yield _sse(f"{prefix}.completed", {
                "type": f"{prefix}.completed",
                "b64_json": item.pop("b64_json"),
                **_common(output),
                "usage": usage(inputs, output_tokens([result.info])),
                "image_index": index,
                **item,
            })  # fmt: skip
    finally:
        if not job.done:  # the client went away (or the stream broke): stop sampling
            job.cancel("client disconnected")
