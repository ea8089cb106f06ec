"""The Images API routes (under ``/v1``): generations (JSON), edits, variations (or
image-to-image), mix and interpolations (multipart). Each reads and checks its request
(:mod:`.bodies`), then hands a sampling call to :func:`_submit`, which makes the job and
answers (:mod:`.responses`), or streams it (:mod:`.streaming`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from PIL import Image

from unclip.server.bodies import (
    check_mask,
    check_request,
    form_body,
    json_body,
    mix_inputs,
    read_image,
    sampling_overrides,
)
from unclip.server.openapi import ERRORS, form_doc, json_doc
from unclip.server.responses import Output, dispatch, make_job, submit
from unclip.server.schemas import (
    EditRequest,
    GenerationRequest,
    ImageRequest,
    InterpolationRequest,
    MixRequest,
    PromptRequest,
    VariationRequest,
    validate,
)
from unclip.server.state import state
from unclip.server.streaming import EVENT_PREFIX, PartialImages, stream_response
from unclip.server.usage import count_inputs

__all__ = ["router"]

router = APIRouter(tags=["images"], responses=ERRORS)


def _images_route(kind: str, model: type[ImageRequest], summary: str) -> Callable[[Any], Any]:
    """Register ``POST /v1/images/{kind}``, documented as reading ``model``: a JSON body, or a
    multipart one where ``model.files`` names files; routes that stream also answer
    ``text/event-stream``."""
    doc = form_doc(model) if model.files else json_doc(model)
    content: dict[str, Any] = {"application/json": {}}
    if issubclass(model, PromptRequest):
        content["text/event-stream"] = {}
    doc["responses"] = {"200": {"description": "the images", "content": content}}
    return router.post(f"/images/{kind}", summary=summary, openapi_extra=doc)


async def _read_form(
    request: Request, model: type[ImageRequest]
) -> tuple[Any, int, list[Image.Image | None]]:
    """A multipart request: its checked fields as ``model``, its output size and its files
    (``model.files``) decoded, None for an optional file not sent."""
    server = state(request)
    fields, uploads = await form_body(
        request, tuple(model.files), server.limits, model.text_or_file
    )
    req = validate(model, fields)
    size = check_request(req, server.limits, server.pipe.image_size)
    images = [
        await read_image(uploads, name, server.limits, required=required)
        for name, required in model.files.items()
    ]
    return req, size, images


def _negative(req: Any) -> dict[str, Any]:
    """The ``negative_prompt`` keyword of a pipeline call, when the request gives one (so a
    request without it calls the pipeline exactly as before)."""
    negative = getattr(req, "negative_prompt", None)
    return {} if negative is None else {"negative_prompt": negative}


async def _submit(
    request: Request,
    req: ImageRequest,
    kind: str,
    sample: Callable[..., list[Image.Image]],
    size: int,
    *,
    first: str = "decoder",
    input_images: int = 0,
) -> Response:
    """Check the sampling settings of ``req``, then run ``sample(progress=…, **settings)``
    as a job of ``kind`` (images of ``size`` pixels) whose first stage after the prior is
    ``first``; ``input_images``: how many images the request gave (for ``usage``)."""
    server = state(request)
    images = req.frames if isinstance(req, InterpolationRequest) else req.n
    overrides = sampling_overrides(req, server.pipe, server.limits)
    prior = (
        req.prior_used()
        and getattr(req, "use_prior", True)
        and getattr(server.pipe, "prior", None) is not None
    )
    stages = (["prior"] if prior else []) + [first, *server.upsampler_stages()]
    output = Output.of(req, size)
    partials = None
    if output.stream and isinstance(req, PromptRequest):
        prefix = EVENT_PREFIX[kind]
        partials = PartialImages(req.partial_images or 0, first, output, f"{prefix}.partial_image")

    def work(progress: Callable[[str, Any], None]) -> list[Image.Image]:
        if partials is not None:
            progress = partials.tap(progress, job)
        return sample(progress=progress, **overrides)

    inputs = count_inputs(server.pipe, req.texts(), input_images)
    job = make_job(
        server, request, kind, work, images=images, stages=stages, output=output, inputs=inputs
    )
    if partials is None:
        return await dispatch(request, job)
    submit(server, job)
    return stream_response(job, partials, EVENT_PREFIX[kind], server.limits.request_timeout)


@_images_route("generations", GenerationRequest, "Create images from a prompt (OpenAI Images API)")
async def generations(request: Request) -> Response:
    server = state(request)
    body = await json_body(request, server.limits)
    req: GenerationRequest = validate(GenerationRequest, body, strict=True)
    size = check_request(req, server.limits, server.pipe.image_size)
    sample = partial(
        server.pipe.text_to_image,
        req.prompt,
        n=req.n,
        seed=req.seed,
        use_prior=req.use_prior,
        **_negative(req),
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
        **_negative(req),
    )
    return await _submit(request, req, "edits", sample, size, first="inpaint", input_images=1)


@_images_route(
    "variations",
    VariationRequest,
    "Variations of an image (same CLIP image embedding, new noise), or with a prompt or a "
    "strength, image-to-image",
)
async def variations(request: Request) -> Response:
    req, size, (image,) = await _read_form(request, VariationRequest)
    pipe = state(request).pipe
    if req.image_to_image:
        strength = {} if req.strength is None else {"strength": req.strength}
        sample = partial(
            pipe.image_to_image, image, req.prompt, num_images=req.n, seed=req.seed,
            **strength, **_negative(req),
        )  # fmt: skip
    else:
        sample = partial(
            pipe.variations, image, n=req.n, invert=req.invert, eta=req.eta, seed=req.seed,
            **_negative(req),
        )  # fmt: skip
    return await _submit(request, req, "variations", sample, size, input_images=1)


@_images_route(
    "mix",
    MixRequest,
    "Mix prompts and images by weight (their CLIP image embeddings combined; extension)",
)
async def mix(request: Request) -> Response:
    req, size, files = await _read_form(request, MixRequest)
    images = {k + 1: img for k, img in enumerate(files) if img is not None}
    inputs, weights = mix_inputs(req, images, state(request).limits)
    pipe = state(request).pipe
    # files=False: a client's text is a caption, never a path on the server's disk
    sample = partial(
        pipe.mix, inputs, weights, num_images=req.n, seed=req.seed, files=False, **_negative(req)
    )
    return await _submit(request, req, "mix", sample, size, input_images=len(images))


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
    return await _submit(request, req, "interpolations", sample, size, input_images=2)
