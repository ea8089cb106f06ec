"""Request bodies: how they are read and what is checked before a job runs (the request
models are in :mod:`.schemas`).

- :func:`json_body` (``application/json`` only, parsed with limits by :mod:`.jsonbody`),
  :func:`form_body` (multipart fields and files) and :func:`read_image` (a checked decode);
- the checks of prompts, counts, sizes, output options, masks, mix inputs and sampling
  settings against :class:`~unclip.server.limits.Limits` and the pipeline;
- :func:`body_limit`, the byte limit of a route's body (used by the
  :class:`~unclip.server.guard.Guard`).
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from unclip.server.errors import APIError, bad_request
from unclip.server.jsonbody import parse_json_object
from unclip.server.limits import Limits
from unclip.server.schemas import (
    MIX_SLOTS,
    ImageRequest,
    InterpolationRequest,
    MixRequest,
    PriorOptions,
    VariationRequest,
)
from unclip.server.uploads import decode_image

#: output sizes besides the pipeline's own: the OpenAI API's DALL·E 2 sizes, reached by a
#: plain Lanczos resize of the pipeline's output (no model runs at these resolutions)
OPENAI_SIZES = (256, 512, 1024)
#: a multipart body may hold its uploads of ``max_upload_bytes`` each and this many bytes more
MULTIPART_OVERHEAD = 256 * 1024
#: the routes that take multipart bodies, with the most files each takes (every other route:
#: at most ``max_json_bytes``)
MULTIPART_PATHS = {
    "/v1/images/edits": 2,
    "/v1/images/variations": 1,
    "/v1/images/interpolations": 2,
    "/v1/images/mix": MIX_SLOTS,
}
JSON_TYPE = "application/json"


def body_limit(limits: Limits, path: str) -> int:
    """The most bytes a request body to ``path`` may have."""
    if path in MULTIPART_PATHS:
        return max(2, MULTIPART_PATHS[path]) * limits.max_upload_bytes + MULTIPART_OVERHEAD
    return limits.max_json_bytes


# ---------------------------------------------------------------------------------------------
# Reading bodies


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def json_body(request: Request, limits: Limits) -> dict[str, Any]:
    """The request's JSON object, parsed with ``limits`` (:mod:`.jsonbody`). Only
    ``Content-Type: application/json`` is read: a ``text/plain`` body is what a cross-site
    form or ``fetch`` can send without asking the server first (a CORS "simple request")."""
    ctype = media_type(request)
    if ctype != JSON_TYPE:
        raise APIError(
            415,
            f"this endpoint takes a JSON body with Content-Type: {JSON_TYPE} (got: "
            f"{ctype or 'none'}; curl: --json or -H 'Content-Type: {JSON_TYPE}')",
            code="invalid_content_type",
        )
    raw = await request.body()
    if len(raw) > 64 * 1024:  # parsing a large body takes milliseconds: off the event loop
        return await run_in_threadpool(parse_json_object, raw, limits)
    return parse_json_object(raw, limits)


async def form_body(
    request: Request, files: tuple[str, ...], limits: Limits, text_or_file: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Fields and uploaded files of a multipart body (``image[]`` is read as ``image``).
    ``files`` may only be uploads; those also in ``text_or_file`` may be text fields too."""
    ctype = media_type(request)
    if ctype != "multipart/form-data":
        raise APIError(
            415,
            f"this endpoint takes multipart/form-data with the file field(s) "
            f"{', '.join(files)} (got: {ctype or 'none'})",
            code="invalid_content_type",
        )
    try:
        form = await request.form(max_files=len(files) + 1, max_fields=64, max_part_size=64 * 1024)
    except StarletteHTTPException as e:
        raise bad_request(f"malformed multipart body: {e.detail}") from None
    fields: dict[str, Any] = {}
    uploads: dict[str, bytes] = {}
    try:
        for key, value in form.multi_items():
            name = key[:-2] if key.endswith("[]") else key
            if isinstance(value, UploadFile):
                if name not in files:
                    raise bad_request(f"unexpected file field {key!r}", param=key)
                if name in uploads or name in fields:
                    raise bad_request(f"send one {name} (one image per request)", param=name)
                uploads[name] = await value.read(limits.max_upload_bytes + 1)
            else:
                if name in files and name not in text_or_file:
                    raise bad_request(f"{name} must be a file upload", param=name)
                if name in fields or name in uploads:
                    raise bad_request(f"{name} is given more than once", param=name)
                fields[name] = value
    finally:
        await form.close()
    return fields, uploads


async def read_image(
    uploads: dict[str, bytes], name: str, limits: Limits, required: bool = True
) -> Image.Image | None:
    data = uploads.get(name)
    if data is None:
        if required:
            raise bad_request(f"Missing required parameter: '{name}'.", param=name)
        return None
    return await run_in_threadpool(
        decode_image,
        data,
        name,
        max_bytes=limits.max_upload_bytes,
        max_pixels=limits.max_image_pixels,
    )


def check_prompt(prompt: str, limits: Limits, param: str = "prompt") -> str:
    if not prompt.strip():
        raise bad_request(f"the {param} is empty; describe the image in a few words", param=param)
    if len(prompt) > limits.max_prompt_chars:
        raise bad_request(
            f"the {param} is {len(prompt):,} characters long; the limit is "
            f"{limits.max_prompt_chars:,}",
            param=param,
            code="prompt_too_long",
        )
    return prompt


def check_range(value: int, param: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise bad_request(f"{param} must be between {low} and {high}, got {value}", param=param)
    return value


def output_size(size: str | None, native: int) -> int:
    if size is None or size == "auto":
        return native
    allowed = sorted({native, *OPENAI_SIZES})
    w, _, h = size.lower().partition("x")
    if w.isdigit() and w == h and int(w) in allowed:
        return int(w)
    choices = ", ".join(f"{s}x{s}" for s in allowed)
    raise bad_request(
        f"size {size!r} is not supported; choose one of {choices} or auto "
        f"({native}x{native} is the pipeline's own resolution)",
        param="size",
    )


def check_request(req: ImageRequest, limits: Limits, native: int) -> int:
    """Check a request's prompts (when it has some), its image count, its output options and
    its route's own fields against ``limits``; the output size in pixels (``native``: the
    pipeline's resolution)."""
    for param in ("prompt", "negative_prompt"):
        text = getattr(req, param, None)
        if text is not None:
            check_prompt(text, limits, param)
    if isinstance(req, InterpolationRequest):
        check_range(req.frames, "frames", 2, limits.max_frames)
    else:
        check_range(req.n, "n", 1, limits.max_n)
    if req.background == "transparent":
        raise bad_request(
            "background 'transparent' is not supported: unclip's pipelines draw opaque RGB "
            "images; send 'auto' or 'opaque'",
            param="background",
            code="unsupported_background",
        )
    if isinstance(req, PriorOptions) and not req.prior_used():
        for param in ("prior_steps", "prior_guidance"):
            if getattr(req, param) is not None:
                variation = isinstance(req, VariationRequest)
                why = "a variation with a prompt" if variation else "a mix with a text input"
                raise bad_request(f"{param} applies to {why} only", param=param)
    if isinstance(req, VariationRequest) and req.image_to_image:
        for param in ("invert", "eta"):
            if getattr(req, param) not in (None, False):
                raise bad_request(
                    f"{param} applies to variations, not to image-to-image (a prompt or a "
                    "strength)",
                    param=param,
                )
    if isinstance(req, MixRequest):
        check_mix_weights(req)
    return output_size(req.size, native)


def check_mix_weights(req: MixRequest) -> None:
    """A mix's weights: none (equal weights), or one per input slot given; not all zero.
    (Which slots hold inputs is checked once the files are read: :func:`mix_inputs`.)"""
    weights = {k: req.weight(k) for k in range(1, MIX_SLOTS + 1) if req.weight(k) is not None}
    if weights and not any(weights.values()):
        raise bad_request("the mix weights are all 0; give at least one a weight above 0",
                          param="weight_1")  # fmt: skip


def mix_inputs(
    req: MixRequest, images: dict[int, Image.Image], limits: Limits
) -> tuple[list[str | Image.Image], list[float] | None]:
    """A mix's inputs in slot order (a prompt or an image each) and their weights (None:
    equal), checked: at least one input, each slot a prompt or an image, not both, and a
    weight for every input or for none."""
    prompts = req.prompts()
    inputs: list[str | Image.Image] = []
    slots: list[int] = []
    for k in range(1, MIX_SLOTS + 1):
        text, image = prompts.get(k), images.get(k)
        if text is not None:
            inputs.append(check_prompt(text, limits, f"input_{k}"))
        elif image is not None:
            inputs.append(image)
        elif req.weight(k) is not None:
            raise bad_request(f"weight_{k} is given but input_{k} is not", param=f"weight_{k}")
        else:
            continue
        slots.append(k)
    if not inputs:
        raise bad_request(
            "a mix needs inputs: input_1, input_2, … each a prompt or an image file",
            param="input_1",
        )
    weights = [req.weight(k) for k in slots]
    if all(w is None for w in weights):
        return inputs, None
    missing = [k for k, w in zip(slots, weights, strict=True) if w is None]
    if missing:
        raise bad_request(
            "give a weight for every mix input, or for none (equal weights)",
            param=f"weight_{missing[0]}",
        )
    return inputs, [float(w) for w in weights if w is not None]


def check_mask(image: Image.Image, mask: Image.Image | None, native: int) -> None:
    """Refuse an edit whose ``mask`` (or, without one, the image's transparency) marks
    nothing to repaint at the pipeline's resolution ``native``, or whose mask's size is
    not the image's."""
    from unclip.pipeline.images import has_transparency, keep_mask, repaint_mask

    if mask is not None and mask.size != image.size:
        raise bad_request(
            f"the mask is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{image.size[0]}x{image.size[1]}; they must be the same size",
            param="mask",
            code="mask_size_mismatch",
        )
    if mask is None and not has_transparency(image):
        raise bad_request(
            "no mask given and the image has no transparent pixels: send a mask "
            "(white or transparent = repaint) or an image with transparent areas",
            param="mask",
        )
    marked = repaint_mask(mask if mask is not None else image)
    if bool(keep_mask(marked, native).all()):
        raise bad_request(
            "the mask marks nothing to repaint (white or transparent = repaint)",
            param="mask",
        )


def sampling_overrides(req: ImageRequest, pipe: Any, limits: Limits) -> dict[str, Any]:
    """The pipeline's sampling overrides from a request (the prior's too for a
    request that runs the prior), checked against the limits and by the pipeline itself
    (unknown sampler, steps above a stage's timesteps…)."""
    with_prior = isinstance(req, PriorOptions) and req.prior_used()
    stages = ("prior", "decoder", "upsampler") if with_prior else ("decoder", "upsampler")
    out: dict[str, Any] = {}
    steps = req.steps
    if steps is not None:
        check_range(steps, "steps", 1, limits.max_steps)
    for stage in stages:
        value = getattr(req, f"{stage}_steps", None)
        if value is not None:
            check_range(value, f"{stage}_steps", 1, limits.max_steps)
        elif stage != "upsampler":
            value = steps
        out[f"{stage}_steps"] = value
    decoder_guidance = req.decoder_guidance
    out["decoder_guidance"] = req.guidance if decoder_guidance is None else decoder_guidance
    if with_prior:
        out["prior_guidance"] = req.prior_guidance
    out["sampler"] = req.sampler
    out["preset"] = req.preset
    from unclip.pipeline.config import MAX_GUIDANCE

    for key in ("decoder_guidance", "prior_guidance"):
        value = out.get(key)
        if value is not None and not 0.0 <= value <= MAX_GUIDANCE:
            raise bad_request(
                f"{key} must be between 0 and {MAX_GUIDANCE:g}, got {value}", param=key
            )
    try:
        pipe.sampling_settings(**out)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e)) from None
    return {k: v for k, v in out.items() if v is not None}
