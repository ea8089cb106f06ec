"""Request bodies: their models, how they are read and what is checked before a job runs.

- the Images API's request models (unknown fields are refused: a typo should not be
  silently ignored; the OpenAI fields that make no sense here, quality, style…, are
  accepted and ignored) and :func:`validate`, which turns a validation error into an
  OpenAI error object naming the field;
- :func:`json_body` (``application/json`` only, parsed with limits by :mod:`.jsonbody`),
  :func:`form_body` (multipart fields and files) and :func:`read_image` (a checked decode);
- the checks of prompts, counts, sizes, masks and sampling settings against
  :class:`~unclip.server.limits.Limits` and the pipeline;
- :func:`body_limit`, the byte limit of a route's body (used by the
  :class:`~unclip.server.guard.Guard`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from unclip.server.errors import APIError, bad_request
from unclip.server.jsonbody import parse_json_object
from unclip.server.limits import Limits
from unclip.server.uploads import decode_image

#: output sizes besides the pipeline's own: the OpenAI API's DALL·E 2 sizes, reached by a
#: plain Lanczos resize of the pipeline's output (no model runs at these resolutions)
OPENAI_SIZES = (256, 512, 1024)
#: a multipart body may hold two uploads of ``max_upload_bytes`` and this many bytes more
MULTIPART_OVERHEAD = 256 * 1024
#: the routes that take multipart bodies (every other route: at most ``max_json_bytes``)
MULTIPART_PATHS = ("/v1/images/edits", "/v1/images/variations", "/v1/images/interpolations")
JSON_TYPE = "application/json"


def body_limit(limits: Limits, path: str) -> int:
    """The most bytes a request body to ``path`` may have."""
    if path in MULTIPART_PATHS:
        return 2 * limits.max_upload_bytes + MULTIPART_OVERHEAD
    return limits.max_json_bytes


# ---------------------------------------------------------------------------------------------
# Models


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: a multipart request's file fields (name: required), in the order they are read
    files: ClassVar[dict[str, bool]] = {}

    model: str | None = Field(None, description="ignored: the server runs one pipeline")
    user: str | None = Field(None, description="ignored")
    size: str | None = Field(
        None,
        description="'auto' or 'SxS' with S the pipeline's resolution (default) or 256, 512, "
        "1024 (a plain resize of the pipeline's output)",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="default 'url' (as the OpenAI API for DALL·E 2)"
    )
    quality: str | None = Field(None, description="ignored")
    style: str | None = Field(None, description="ignored")
    output_format: Literal["png"] | None = Field(None, description="only png")
    # extensions
    seed: int | None = Field(
        None, ge=0, le=2**62, description="seed of the first image; image i uses seed+i"
    )
    steps: int | None = Field(None, description="sampling steps of the prior and the decoder")
    decoder_steps: int | None = None
    upsampler_steps: int | None = None
    guidance: float | None = Field(None, description="decoder guidance scale (1 = off)")
    decoder_guidance: float | None = None
    sampler: Literal["ddim", "ddpm", "dpmpp_2m", "karlo"] | None = Field(
        None, description="sampler of every stage"
    )


class WithPrior(ImageRequest):
    prior_steps: int | None = None
    prior_guidance: float | None = None
    use_prior: bool = Field(True, description="false: decode the caption's text embedding")


class GenerationRequest(WithPrior):
    """``POST /v1/images/generations`` (JSON)."""

    prompt: str
    n: int = 1


class EditRequest(WithPrior):
    """``POST /v1/images/edits`` (multipart; files ``image`` and optional ``mask``)."""

    files: ClassVar[dict[str, bool]] = {"image": True, "mask": False}

    prompt: str
    n: int = 1
    repaint: bool = Field(False, description="RePaint with the plain decoder")


class VariationRequest(ImageRequest):
    """``POST /v1/images/variations`` (multipart; file ``image``)."""

    files: ClassVar[dict[str, bool]] = {"image": True}

    n: int = 1
    invert: bool = Field(False, description="start from the image's DDIM-inverted noise")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM η")


class InterpolationRequest(ImageRequest):
    """``POST /v1/images/interpolations`` (multipart; files ``image_a`` and ``image_b``)."""

    files: ClassVar[dict[str, bool]] = {"image_a": True, "image_b": True}

    frames: int = 5
    invert_noise: bool = False


def validate(model: type[BaseModel], data: dict[str, Any], *, strict: bool = False) -> Any:
    """``data`` as ``model``. JSON bodies are read strictly (``true`` is not a step count,
    ``"2"`` is not a number: the types the OpenAPI document gives); multipart fields are
    text, so they are converted (``"2"`` -> 2)."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise bad_request(
                f"Unrecognized request argument supplied: {param}", param=param
            ) from None
        if err["type"] == "missing":
            raise bad_request(f"Missing required parameter: '{param}'.", param=param) from None
        raise bad_request(f"Invalid value for '{param}': {err['msg']}.", param=param) from None


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
    request: Request, files: tuple[str, ...], limits: Limits
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Fields and uploaded files of a multipart body (``image[]`` is read as ``image``)."""
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
                if name in uploads:
                    raise bad_request(f"send one {name} (one image per request)", param=name)
                uploads[name] = await value.read(limits.max_upload_bytes + 1)
            else:
                if name in files:
                    raise bad_request(f"{name} must be a file upload", param=name)
                if name in fields:
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
    """Check a request's prompt (when it has one) and its image count against ``limits``;
    the output size in pixels (``native``: the pipeline's resolution)."""
    prompt = getattr(req, "prompt", None)
    if prompt is not None:
        check_prompt(prompt, limits)
    if isinstance(req, InterpolationRequest):
        check_range(req.frames, "frames", 2, limits.max_frames)
    else:
        check_range(req.n, "n", 1, limits.max_n)
    return output_size(req.size, native)


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
    :class:`WithPrior` request), checked against the limits and by the pipeline itself
    (unknown sampler, steps above a stage's timesteps…)."""
    with_prior = isinstance(req, WithPrior)
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
