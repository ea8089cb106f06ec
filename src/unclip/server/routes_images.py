"""The Images API routes (under ``/v1``): generations (JSON), edits, variations and
interpolations (multipart). Each reads and checks its request (:mod:`.bodies`), then hands
a sampling call to :func:`_submit`, which makes the job and answers
(:mod:`.responses`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from PIL import Image

from unclip.server.bodies import (
    EditRequest,
    GenerationRequest,
    ImageRequest,
    InterpolationRequest,
    VariationRequest,
    WithPrior,
    check_mask,
    check_request,
    form_body,
    json_body,
    read_image,
    sampling_overrides,
    validate,
)
from unclip.server.openapi import ERRORS, form_doc, json_doc
from unclip.server.responses import dispatch, make_job
from unclip.server.state import state

__all__ = ["router"]

router = APIRouter(tags=["images"], responses=ERRORS)


def _images_route(kind: str, model: type[ImageRequest], summary: str) -> Callable[[Any], Any]:
    """Register ``POST /v1/images/{kind}``, documented as reading ``model``: a JSON body, or a
    multipart one where ``model.files`` names files."""
    doc = form_doc(model) if model.files else json_doc(model)
    return router.post(f"/images/{kind}", summary=summary, openapi_extra=doc)


async def _read_form(
    request: Request, model: type[ImageRequest]
) -> tuple[Any, int, list[Image.Image | None]]:
    """A multipart request: its checked fields as ``model``, its output size and its files
    (``model.files``) decoded, None for an optional file not sent."""
    server = state(request)
    fields, uploads = await form_body(request, tuple(model.files), server.limits)
    req = validate(model, fields)
    size = check_request(req, server.limits, server.pipe.image_size)
    images = [
        await read_image(uploads, name, server.limits, required=required)
        for name, required in model.files.items()
    ]
    return req, size, images


async def _submit(
    request: Request,
    req: ImageRequest,
    kind: str,
    sample: Callable[..., list[Image.Image]],
    size: int,
    first: str = "decoder",
) -> Response:
    """Check the sampling settings of ``req``, then run ``sample(progress=…, **settings)``
    as a job of ``kind`` (images of ``size`` pixels) whose first stage after the prior is
    ``first``."""
    server = state(request)
    images = req.frames if isinstance(req, InterpolationRequest) else req.n
    overrides = sampling_overrides(req, server.pipe, server.limits)
    prior = (
        isinstance(req, WithPrior)
        and req.use_prior
        and getattr(server.pipe, "prior", None) is not None
    )
    stages = (["prior"] if prior else []) + [first, *server.upsampler_stages()]

    def work(progress: Callable[[str, Any], None]) -> list[Image.Image]:
        return sample(progress=progress, **overrides)

    response_format = req.response_format or "url"
    job = make_job(
        server,
        request,
        kind,
        work,
        images=images,
        stages=stages,
        size=size,
        response_format=response_format,
    )
    return await dispatch(request, job)


@_images_route("generations", GenerationRequest, "Create images from a prompt (OpenAI Images API)")
async def generations(request: Request) -> Response:
    server = state(request)
    body = await json_body(request, server.limits)
    req: GenerationRequest = validate(GenerationRequest, body, strict=True)
    size = check_request(req, server.limits, server.pipe.image_size)
    sample = partial(
        server.pipe.text_to_image, req.prompt, n=req.n, seed=req.seed, use_prior=req.use_prior
    )
    return await _submit(request, req, "generations", sample, size)


@_images_route(
    "edits", EditRequest, "Edit an image with a mask and a prompt (white or transparent = repaint)"
)
async def edits(request: Request) -> Response:
    req, size, (image, mask) = await _read_form(request, EditRequest)
    assert image is not None
    pipe = state(request).pipe
    check_mask(image, mask, pipe.image_size)
    sample = partial(
        pipe.inpaint,
        image,
        mask,
        req.prompt,
        n=req.n,
        seed=req.seed,
        use_prior=req.use_prior,
        repaint=req.repaint,
    )
    return await _submit(request, req, "edits", sample, size, first="inpaint")


@_images_route(
    "variations", VariationRequest, "Variations of an image (same CLIP image embedding, new noise)"
)
async def variations(request: Request) -> Response:
    req, size, (image,) = await _read_form(request, VariationRequest)
    pipe = state(request).pipe
    sample = partial(pipe.variations, image, n=req.n, invert=req.invert, eta=req.eta, seed=req.seed)
    return await _submit(request, req, "variations", sample, size)


@_images_route(
    "interpolations",
    InterpolationRequest,
    "Frames between two images (slerp of CLIP image embeddings; extension)",
)
async def interpolations(request: Request) -> Response:
    req, size, (a, b) = await _read_form(request, InterpolationRequest)
    pipe = state(request).pipe
    sample = partial(
        pipe.interpolate, a, b, frames=req.frames, invert_noise=req.invert_noise, seed=req.seed
    )
    return await _submit(request, req, "interpolations", sample, size)
