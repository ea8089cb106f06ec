"""The FastAPI app: OpenAI Images API routes, jobs with server-sent progress, the gallery.

Routes (see ``docs/server.md``):

- ``POST /v1/images/generations`` (JSON), ``/v1/images/edits`` and ``/v1/images/variations``
  (multipart): the OpenAI Images API, with extensions (``seed``, ``steps``, ``guidance``…);
  ``POST /v1/images/interpolations`` (multipart ``image_a``, ``image_b``): an extension.
  With the header ``Prefer: respond-async`` each answers 202 at once with a job object;
  otherwise it waits for the images (up to the request timeout).
- ``GET /v1/jobs/{id}`` (state and result), ``GET /v1/jobs/{id}/events`` (SSE),
  ``DELETE /v1/jobs/{id}`` (cancel); ``GET /v1/gallery``, ``GET|DELETE /v1/gallery/{id}``;
  ``GET /v1/models``, ``GET /v1/status``.
- ``GET /files/{id}.png``: a result image (capability URL: the id is 128 random bits).
- ``GET /``: the web page; ``GET /openapi.json``, ``/docs``.

Every ``/v1`` route checks the API key when one is set. Before any route, :class:`_Guard`
refuses a ``Host`` the server does not answer to, a POST/DELETE from another site (``Origin``
not the server's own nor allowed, ``Origin: null`` included) and bodies over the limit; the
JSON route reads only ``application/json``, parsed with limits (:mod:`.jsonbody`). Errors are
OpenAI error objects (:mod:`.errors`). Generation runs on the
:class:`~unclip.server.jobs.JobQueue`'s worker threads; a full queue answers 429 with
Retry-After.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import unclip
from unclip.server.errors import SERVER, APIError, bad_request, error_body
from unclip.server.gallery import Gallery, MemoryStore, valid_id
from unclip.server.jobs import (
    SUCCEEDED,
    Job,
    JobCancelled,
    JobQueue,
    QueueFull,
)
from unclip.server.jsonbody import parse_json_object
from unclip.server.limits import ANY_IP_HOST, DEFAULT_QUEUE_SIZE, LOOPBACK_HOSTS, Limits
from unclip.server.uploads import decode_image, png_bytes

__all__ = ["ANY_IP_HOST", "LOOPBACK_HOSTS", "Limits", "create_app", "normalize_origin"]

log = logging.getLogger("unclip.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: output sizes besides the pipeline's own: the OpenAI API's DALL·E 2 sizes, reached by a
#: plain Lanczos resize of the pipeline's output (no model runs at these resolutions)
OPENAI_SIZES = (256, 512, 1024)
#: finished async jobs (and their results) are kept this long (seconds), at most this many,
#: and results of at most this many bytes of PNG in all (oldest dropped first)
JOB_TTL = 600.0
MAX_KEPT_JOBS = 256
MAX_KEPT_BYTES = 256 * 2**20
MULTIPART_OVERHEAD = 256 * 1024
#: methods that change nothing; every other method is checked against the Origin policy
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


# ---------------------------------------------------------------------------------------------
# Request bodies. Unknown fields are refused (a typo should not be silently ignored); the
# OpenAI fields that make no sense here (quality, style…) are accepted and ignored.


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    sampler: Literal["ddim", "ddpm", "dpmpp_2m"] | None = Field(
        None, description="sampler of every stage"
    )


class _WithPrior(_Base):
    prior_steps: int | None = None
    prior_guidance: float | None = None
    use_prior: bool = Field(True, description="false: decode the caption's text embedding")


class GenerationRequest(_WithPrior):
    """``POST /v1/images/generations`` (JSON)."""

    prompt: str
    n: int = 1


class EditRequest(_WithPrior):
    """``POST /v1/images/edits`` (multipart; files ``image`` and optional ``mask``)."""

    prompt: str
    n: int = 1
    repaint: bool = Field(False, description="RePaint with the plain decoder")


class VariationRequest(_Base):
    """``POST /v1/images/variations`` (multipart; file ``image``)."""

    n: int = 1
    invert: bool = Field(False, description="start from the image's DDIM-inverted noise")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM η")


class InterpolationRequest(_Base):
    """``POST /v1/images/interpolations`` (multipart; files ``image_a`` and ``image_b``)."""

    frames: int = 5
    invert_noise: bool = False


def _validate(model: type[BaseModel], data: dict[str, Any], *, strict: bool = False) -> Any:
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
# Server state


@dataclass
class _Result:
    """One output image: its id in the store (None when not stored), its PNG bytes (kept
    for b64_json only), its metadata and size."""

    id: str | None
    png: bytes | None
    info: dict[str, str]
    size: int


class _Server:
    def __init__(
        self,
        pipe: Any,
        *,
        workers: int,
        queue_size: int,
        limits: Limits,
        api_key: str | None,
        gallery: Gallery | None,
        gallery_keep_b64: bool = False,
    ) -> None:
        self.pipe = pipe
        self.limits = limits
        self.api_key = api_key
        self.gallery = gallery
        self.gallery_keep_b64 = gallery_keep_b64
        self.memory = MemoryStore()
        self.queue = JobQueue(workers, queue_size)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.started = time.time()

    @property
    def store(self) -> Gallery | MemoryStore:
        return self.gallery if self.gallery is not None else self.memory

    def png(self, image_id: str) -> bytes | None:
        if not valid_id(image_id):
            return None
        if self.gallery is not None:
            data = self.gallery.get_png(image_id)
            if data is not None:
                return data
        return self.memory.get_png(image_id)

    def remember(self, job: Job) -> None:
        """Register an async job; forget finished ones past :data:`JOB_TTL`, beyond
        :data:`MAX_KEPT_JOBS` or :data:`MAX_KEPT_BYTES` of results, oldest first."""
        now = time.time()
        finished = [j for j in self.jobs.values() if j.done]
        total = sum(_result_bytes(j) for j in finished)
        for old in finished:
            expired = old.finished is not None and now - old.finished > JOB_TTL
            if expired or len(self.jobs) >= MAX_KEPT_JOBS or total > MAX_KEPT_BYTES:
                total -= _result_bytes(old)
                del self.jobs[old.id]
        self.jobs[job.id] = job

    def upsampler_stages(self) -> list[str]:
        n = len(getattr(self.pipe, "upsamplers", []) or [])
        return ["upsampler" if k == 0 else f"upsampler{k + 1}" for k in range(n)]


def _result_bytes(job: Job) -> int:
    return sum(len(r.png or b"") for r in job.result or [])


def _state(request: Request) -> _Server:
    return request.app.state.unclip


# ---------------------------------------------------------------------------------------------
# Middleware: host and origin checks, body size limits, security headers


def normalize_origin(origin: str) -> str:
    """``origin`` as browsers send it (``scheme://host[:port]``, lower case, no default
    port), or ``"null"``; ValueError for anything else (a path, another scheme, ``*``)."""
    if origin == "null":
        return origin
    u = urlsplit(origin.strip().lower())
    try:
        port = u.port
    except ValueError:  # not a number, or out of range
        port = -1
    if (
        port == -1 or u.scheme not in ("http", "https") or not u.hostname
        or u.path not in ("", "/") or u.query or u.fragment or u.username or u.password
    ):  # fmt: skip
        raise ValueError(
            f"not an origin: {origin!r} (expected scheme://host[:port], e.g. "
            "https://example.com, or null)"
        )
    default = 443 if u.scheme == "https" else 80
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def _same_origin(origin: str, host: str) -> bool:
    """Whether the ``Origin`` header names the server the request was sent to (its
    ``Host`` header): same host name and port, the port defaulting to the origin's
    scheme's."""
    try:
        o = urlsplit(origin.lower())
        h = urlsplit(f"//{host.lower()}")
        if o.scheme not in ("http", "https") or not o.hostname or not h.hostname:
            return False
        default = 443 if o.scheme == "https" else 80
        return o.hostname == h.hostname and (o.port or default) == (h.port or default)
    except ValueError:
        return False


def _host_allowed(hostname: str, allowed: tuple[str, ...]) -> bool:
    if hostname in allowed or "*" in allowed:
        return True
    if ANY_IP_HOST in allowed:
        try:
            ipaddress.ip_address(hostname)
            return True
        except ValueError:
            return False
    return False


class _Guard:
    """Pure ASGI middleware, in front of every route:

    - a ``Host`` not in ``allowed_hosts`` is refused (400; a DNS-rebinding defence:
      ``"*"`` accepts any, :data:`ANY_IP_HOST` any IP address literal);
    - a request with any method but GET, HEAD and OPTIONS is refused (403) when its
      ``Origin`` is not the server's own (the ``Host`` it was sent to) and not one of
      ``allowed_origins``; ``Origin: null`` (a sandboxed iframe, a ``data:`` or
      ``file:`` page) counts as another site. Without an ``Origin``, a
      ``Sec-Fetch-Site: cross-site`` or ``same-site`` is refused the same way;
    - bodies above ``limit_for(path)`` bytes are refused (413, on Content-Length and while
      the body streams in);
    - an exception no route handled becomes a JSON 500 (logged once), so the client gets
      an error object and its keep-alive connection stays open.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit_for: Callable[[str], int],
        allowed_hosts: tuple[str, ...] | None,
        allowed_origins: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.allowed_hosts = allowed_hosts
        self.allowed_origins = frozenset(allowed_origins)

    def cross_site(self, method: str, headers: dict[str, str]) -> str | None:
        """Why a request is refused as cross-site, or None."""
        if method in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is None:
            site = headers.get("sec-fetch-site", "").lower()
            if site in ("cross-site", "same-site"):
                return f"a {site} request (Sec-Fetch-Site) without an Origin"
            return None
        if _same_origin(origin, headers.get("host", "")):
            return None
        try:
            if normalize_origin(origin) in self.allowed_origins:
                return None
        except ValueError:
            pass
        return f"a {method} request from origin {origin[:100]!r}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.allowed_hosts is not None:
            hostname = ""
            with contextlib.suppress(ValueError):
                hostname = urlsplit(f"//{host}").hostname or ""
            if not _host_allowed(hostname, self.allowed_hosts):
                await _send_error(
                    send,
                    APIError(
                        400,
                        f"invalid Host header {host[:100]!r} (a name this server does not "
                        "answer to; list it with unclip serve --allow-host)",
                        code="invalid_host",
                    ),
                )
                return
        why = self.cross_site(scope["method"], headers)
        if why is not None:
            await _send_error(
                send,
                APIError(
                    403,
                    f"{why} refused: only the server's own page may send it (list another "
                    "site with unclip serve --allow-origin)",
                    code="cross_origin",
                ),
            )
            return
        limit = self.limit_for(scope["path"])
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, _too_large(int(length), limit))
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(received, limit)
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"x-content-type-options", b"nosniff")]
                if scope["path"] == "/":
                    extra += [
                        (b"content-security-policy", _CSP.encode()),
                        (b"x-frame-options", b"DENY"),
                        (b"referrer-policy", b"no-referrer"),
                    ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_headers)
        except APIError as e:  # raised by counting_receive outside a route's handlers
            if started:
                raise
            await _send_error(send, e)
        except Exception as e:
            if started:
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            await _send_error(
                send,
                APIError(500, f"internal error ({type(e).__name__}); see the server's log"),
            )


_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is {size:,} bytes or more; the limit for this route is {limit:,}",
        code="request_too_large",
    )


async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in err.headers.items()),
    ]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# Request parsing


JSON_TYPE = "application/json"


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def _json_body(request: Request, limits: Limits) -> dict[str, Any]:
    """The request's JSON object, parsed with ``limits`` (:mod:`.jsonbody`). Only
    ``Content-Type: application/json`` is read: a ``text/plain`` body is what a cross-site
    form or ``fetch`` can send without asking the server first (a CORS "simple request")."""
    ctype = _media_type(request)
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


async def _form_body(
    request: Request, files: tuple[str, ...], limits: Limits
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Fields and uploaded files of a multipart body (``image[]`` is read as ``image``)."""
    ctype = _media_type(request)
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


async def _image(
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


def _check_prompt(prompt: str, limits: Limits, param: str = "prompt") -> str:
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


def _check_range(value: int, param: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise bad_request(f"{param} must be between {low} and {high}, got {value}", param=param)
    return value


def _output_size(size: str | None, native: int) -> int:
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


def _overrides(req: _Base, server: _Server, stages: tuple[str, ...]) -> dict[str, Any]:
    """The pipeline's sampling overrides from a request, checked against the limits and by
    the pipeline itself (unknown sampler, steps above a stage's timesteps…)."""
    limits = server.limits
    out: dict[str, Any] = {}
    steps = req.steps
    if steps is not None:
        _check_range(steps, "steps", 1, limits.max_steps)
    for stage in stages:
        value = getattr(req, f"{stage}_steps", None)
        if value is not None:
            _check_range(value, f"{stage}_steps", 1, limits.max_steps)
        elif stage != "upsampler":
            value = steps
        out[f"{stage}_steps"] = value
    decoder_guidance = req.decoder_guidance
    out["decoder_guidance"] = req.guidance if decoder_guidance is None else decoder_guidance
    if "prior" in stages:
        out["prior_guidance"] = getattr(req, "prior_guidance", None)
    out["sampler"] = req.sampler
    for key in ("decoder_guidance", "prior_guidance"):
        value = out.get(key)
        if value is not None and not 0.0 <= value <= 100.0:
            raise bad_request(f"{key} must be between 0 and 100, got {value}", param=key)
    try:
        server.pipe.sampling_settings(**out)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e)) from None
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Jobs and responses


def _resize(img: Image.Image, size: int) -> Image.Image:
    if img.size == (size, size):
        return img
    out = img.resize((size, size), Image.Resampling.LANCZOS)
    out.info = dict(img.info)
    out.info["resized_from"] = f"{img.size[0]}x{img.size[1]}"
    return out


def _make_job(
    server: _Server,
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

    def run(progress: Callable[[str, Any], None]) -> list[_Result]:
        results = []
        for img in work(progress):
            img = _resize(img, size)
            png = png_bytes(img, software)
            info = {k: v for k, v in img.info.items() if isinstance(v, str)}
            image_id = None
            if store_all or response_format == "url":
                image_id = server.store.put(png, info, img.size, job.id)
            results.append(
                _Result(image_id, png if response_format == "b64_json" else None, info, size)
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


def _images_response(job: Job) -> dict[str, Any]:
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
        seed = r.info.get("seed")
        item["seed"] = int(seed) if seed and seed.isdigit() else None
        data.append(item)
        size = f"{r.size}x{r.size}"
    return {"created": int(job.created), "data": data, "output_format": "png", "size": size}


def _job_error(job: Job) -> APIError | None:
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


def _job_view(job: Job) -> dict[str, Any]:
    err = _job_error(job)
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
        "result": _images_response(job) if job.status == SUCCEEDED else None,
        "error": None if err is None else err.body()["error"],
    }


def _wants_async(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().lower() == "respond-async" for p in prefer.split(","))


async def _dispatch(request: Request, job: Job) -> Response:
    """Queue ``job``; answer 202 at once (``Prefer: respond-async``) or wait for it."""
    server = _state(request)
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
            _job_view(job),
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
    err = _job_error(job)
    if err is not None:
        raise err
    return JSONResponse(_images_response(job))


# ---------------------------------------------------------------------------------------------
# OpenAPI descriptions of the hand-parsed bodies

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for status, text in (
        (400, "invalid request (bad JSON, bad image, mask mismatch, limits)"),
        (401, "missing or wrong API key"),
        (413, "upload too large"),
        (415, "wrong Content-Type (JSON routes: application/json; uploads: multipart)"),
        (429, "job queue full; see Retry-After"),
        (504, "request timeout"),
    )
}
_ERRORS[202] = {"description": "with `Prefer: respond-async`: the queued job"}


class _PNGResponse(Response):
    """A PNG answer (so that the OpenAPI document says ``image/png``)."""

    media_type = "image/png"


def _error_docs(*codes: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
        for status, text in codes
    }


#: what any /v1 route may answer besides its own results (the API key, the Host/Origin
#: checks and the body limit apply to every route), and what a lookup by id may answer
_V1_ERRORS = _error_docs(
    (400, "invalid request (bad parameter, bad Host header)"),
    (401, "missing or wrong API key"),
    (403, "a POST or DELETE from another site (Origin: null or not the server's own)"),
    (413, "request body too large"),
)
_NOT_FOUND = _error_docs((404, "no such job, gallery image or file (or no gallery)"))


def _json_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _form_doc(model: type[BaseModel], files: dict[str, bool]) -> dict[str, Any]:
    schema = model.model_json_schema()
    for name in files:
        schema["properties"] = {
            name: {"type": "string", "format": "binary"},
            **schema.get("properties", {}),
        }
    schema["required"] = [*schema.get("required", []), *(n for n, req in files.items() if req)]
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


# ---------------------------------------------------------------------------------------------


def create_app(
    pipeline_or_path: Any,
    *,
    workers: int = 1,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    limits: Limits | None = None,
    api_key: str | None = None,
    gallery_db: str | os.PathLike | Gallery | None = None,
    gallery_keep_b64: bool = False,
    allowed_hosts: tuple[str, ...] | None = None,
    allowed_origins: tuple[str, ...] | list[str] = (),
    device: str | None = None,
    dtype: Any = None,
    compile: bool = False,
) -> FastAPI:
    """The server app for a pipeline (an :class:`~unclip.pipeline.UnclipPipeline`, or a
    pipeline folder / shipped name loaded onto ``device`` in ``dtype``; ``compile``: see
    :meth:`~unclip.pipeline.UnclipPipeline.compile`).

    ``workers`` threads sample; at most ``queue_size`` jobs wait (more: 429). ``api_key``:
    required as ``Authorization: Bearer KEY`` on every ``/v1`` route. ``gallery_db``: a
    :class:`~unclip.server.gallery.Gallery` (with its size and age limits) or an SQLite file
    for one with the default limits (PNGs in ``images/`` next to it); None: no gallery, and
    ``url`` results live in memory (the most recent 64 MiB). ``gallery_keep_b64``: store
    ``b64_json`` results in the gallery too (by default only ``url`` results are stored).
    ``allowed_hosts``: Host header names accepted (None: any; :data:`ANY_IP_HOST` in it: any
    IP address; ``unclip serve`` on loopback passes the loopback names, elsewhere those, any
    IP address and its ``--allow-host`` names). ``allowed_origins``: other sites (``https://host[:port]``)
    whose pages may send POST/DELETE requests (and read the answers: CORS); by default only
    the server's own page may.
    """
    limits = limits or Limits()
    origins = tuple(normalize_origin(o) for o in allowed_origins)
    if isinstance(pipeline_or_path, (str, os.PathLike)):
        from unclip.pipeline import load_pipeline

        pipe = load_pipeline(pipeline_or_path, device=device, dtype=dtype)
    else:
        pipe = pipeline_or_path
    if compile:
        pipe.compile()
    if gallery_db is None or isinstance(gallery_db, Gallery):
        gallery = gallery_db
    else:
        gallery = Gallery(gallery_db)
    server = _Server(
        pipe,
        workers=workers,
        queue_size=queue_size,
        limits=limits,
        api_key=api_key or None,
        gallery=gallery,
        gallery_keep_b64=gallery_keep_b64,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(server.queue.close)

    app = FastAPI(
        title="unclip",
        version=unclip.__version__,
        summary="DALL·E 2 (unCLIP), locally: an OpenAI-compatible Images API",
        lifespan=lifespan,
    )
    app.state.unclip = server

    multipart_limit = 2 * limits.max_upload_bytes + MULTIPART_OVERHEAD

    def limit_for(path: str) -> int:
        if path in ("/v1/images/edits", "/v1/images/variations", "/v1/images/interpolations"):
            return multipart_limit
        return limits.max_json_bytes

    app.add_middleware(
        _Guard, limit_for=limit_for, allowed_hosts=allowed_hosts, allowed_origins=origins
    )
    if origins:  # added last, so outermost: it answers the listed sites' preflights
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Prefer", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After", "Preference-Applied"],
        )

    # -- errors ------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return JSONResponse(
            error_body(f"Invalid value for '{param}': {err.get('msg')}.", param=param),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        kind = SERVER if exc.status_code >= 500 else "invalid_request_error"
        return JSONResponse(
            error_body(message, kind),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    # -- auth --------------------------------------------------------------------------------

    bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")

    async def check_key(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        key = server.api_key
        if key is None:
            return
        headers = {"WWW-Authenticate": "Bearer"}
        if credentials is None or not credentials.credentials:
            raise APIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                code="missing_api_key",
                headers=headers,
            )
        if not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
            raise APIError(
                401, "Incorrect API key provided.", code="invalid_api_key", headers=headers
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)], responses=_V1_ERRORS)

    # -- Images API --------------------------------------------------------------------------

    @v1.post(
        "/images/generations",
        tags=["images"],
        summary="Create images from a prompt (OpenAI Images API)",
        responses=_ERRORS,
        openapi_extra=_json_doc(GenerationRequest),
    )
    async def generations(request: Request) -> Response:
        req: GenerationRequest = _validate(
            GenerationRequest, await _json_body(request, limits), strict=True
        )
        _check_prompt(req.prompt, limits)
        _check_range(req.n, "n", 1, limits.max_n)
        size = _output_size(req.size, pipe.image_size)
        prior = req.use_prior and getattr(pipe, "prior", None) is not None
        overrides = _overrides(req, server, ("prior", "decoder", "upsampler"))
        stages = (["prior"] if prior else []) + ["decoder", *server.upsampler_stages()]

        def work(progress: Callable[[str, Any], None]) -> list[Image.Image]:
            return pipe.text_to_image(
                req.prompt, n=req.n, seed=req.seed, use_prior=req.use_prior,
                progress=progress, **overrides,
            )  # fmt: skip

        job = _make_job(
            server, request, "generations", work, images=req.n, stages=stages, size=size,
            response_format=req.response_format or "url",
        )  # fmt: skip
        return await _dispatch(request, job)

    @v1.post(
        "/images/edits",
        tags=["images"],
        summary="Edit an image with a mask and a prompt (white or transparent = repaint)",
        responses=_ERRORS,
        openapi_extra=_form_doc(EditRequest, {"image": True, "mask": False}),
    )
    async def edits(request: Request) -> Response:
        from unclip.pipeline.images import has_transparency, keep_mask, repaint_mask

        fields, uploads = await _form_body(request, ("image", "mask"), limits)
        req: EditRequest = _validate(EditRequest, fields)
        _check_prompt(req.prompt, limits)
        _check_range(req.n, "n", 1, limits.max_n)
        size = _output_size(req.size, pipe.image_size)
        image = await _image(uploads, "image", limits)
        mask = await _image(uploads, "mask", limits, required=False)
        assert image is not None
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
        if bool(keep_mask(marked, pipe.image_size).all()):
            raise bad_request(
                "the mask marks nothing to repaint (white or transparent = repaint)",
                param="mask",
            )
        prior = req.use_prior and getattr(pipe, "prior", None) is not None
        overrides = _overrides(req, server, ("prior", "decoder", "upsampler"))
        stages = (["prior"] if prior else []) + ["inpaint", *server.upsampler_stages()]

        def work(progress: Callable[[str, Any], None]) -> list[Image.Image]:
            return pipe.inpaint(
                image, mask, req.prompt, n=req.n, seed=req.seed, use_prior=req.use_prior,
                repaint=req.repaint, progress=progress, **overrides,
            )  # fmt: skip

        job = _make_job(
            server, request, "edits", work, images=req.n, stages=stages, size=size,
            response_format=req.response_format or "url",
        )  # fmt: skip
        return await _dispatch(request, job)

    @v1.post(
        "/images/variations",
        tags=["images"],
        summary="Variations of an image (same CLIP image embedding, new noise)",
        responses=_ERRORS,
        openapi_extra=_form_doc(VariationRequest, {"image": True}),
    )
    async def variations(request: Request) -> Response:
        fields, uploads = await _form_body(request, ("image",), limits)
        req: VariationRequest = _validate(VariationRequest, fields)
        _check_range(req.n, "n", 1, limits.max_n)
        size = _output_size(req.size, pipe.image_size)
        image = await _image(uploads, "image", limits)
        overrides = _overrides(req, server, ("decoder", "upsampler"))
        stages = ["decoder", *server.upsampler_stages()]

        def work(progress: Callable[[str, Any], None]) -> list[Image.Image]:
            return pipe.variations(
                image, n=req.n, invert=req.invert, eta=req.eta, seed=req.seed,
                progress=progress, **overrides,
            )  # fmt: skip

        job = _make_job(
            server, request, "variations", work, images=req.n, stages=stages, size=size,
            response_format=req.response_format or "url",
        )  # fmt: skip
        return await _dispatch(request, job)

    @v1.post(
        "/images/interpolations",
        tags=["images"],
        summary="Frames between two images (slerp of CLIP image embeddings; extension)",
        responses=_ERRORS,
        openapi_extra=_form_doc(InterpolationRequest, {"image_a": True, "image_b": True}),
    )
    async def interpolations(request: Request) -> Response:
        fields, uploads = await _form_body(request, ("image_a", "image_b"), limits)
        req: InterpolationRequest = _validate(InterpolationRequest, fields)
        _check_range(req.frames, "frames", 2, limits.max_frames)
        size = _output_size(req.size, pipe.image_size)
        a = await _image(uploads, "image_a", limits)
        b = await _image(uploads, "image_b", limits)
        overrides = _overrides(req, server, ("decoder", "upsampler"))
        stages = ["decoder", *server.upsampler_stages()]

        def work(progress: Callable[[str, Any], None]) -> list[Image.Image]:
            return pipe.interpolate(
                a, b, frames=req.frames, invert_noise=req.invert_noise, seed=req.seed,
                progress=progress, **overrides,
            )  # fmt: skip

        job = _make_job(
            server, request, "interpolations", work, images=req.frames, stages=stages,
            size=size, response_format=req.response_format or "url",
        )  # fmt: skip
        return await _dispatch(request, job)

    # -- jobs --------------------------------------------------------------------------------

    def get_job(job_id: str) -> Job:
        job = server.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r} (finished jobs are kept {JOB_TTL:.0f} s)")
        return job

    @v1.get(
        "/jobs/{job_id}",
        tags=["jobs"],
        summary="A job's state, progress and result",
        responses=_NOT_FOUND,
    )
    async def job_state(job_id: str) -> dict[str, Any]:
        return _job_view(get_job(job_id))

    @v1.delete("/jobs/{job_id}", tags=["jobs"], summary="Cancel a job", responses=_NOT_FOUND)
    async def job_cancel(job_id: str) -> dict[str, Any]:
        job = get_job(job_id)
        job.cancel()
        return _job_view(job)

    @v1.get(
        "/jobs/{job_id}/events",
        tags=["jobs"],
        summary="Server-sent events: queued, started, progress (per sampling step), done",
        response_class=StreamingResponse,
        responses=_NOT_FOUND,
    )
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        job = get_job(job_id)
        last = request.headers.get("last-event-id", "")
        last_id = int(last) if last.isdigit() else -1

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            async for event in job.follow(last_id, heartbeat=15.0):
                if event is None:
                    yield ": keep-alive\n\n"
                    continue
                data = _job_view(job) if event.name == "done" else event.data
                yield f"id: {event.id}\nevent: {event.name}\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- gallery -----------------------------------------------------------------------------

    def need_gallery() -> Gallery:
        if server.gallery is None:
            raise APIError(404, "this server runs without a gallery", code="no_gallery")
        return server.gallery

    def gallery_entry(request: Request, item: Any) -> dict[str, Any]:
        return {**item.to_dict(), "url": f"{request.base_url}files/{item.id}.png"}

    @v1.get(
        "/gallery", tags=["gallery"], summary="Gallery images, newest first", responses=_NOT_FOUND
    )
    async def gallery_list(
        request: Request,
        limit: int = Query(50, ge=1, le=200),
        before: str | None = Query(None, description="the last id of the previous page"),
    ) -> dict[str, Any]:
        g = need_gallery()
        items = await run_in_threadpool(g.list, limit + 1, before)
        return {
            "object": "list",
            "data": [gallery_entry(request, it) for it in items[:limit]],
            "has_more": len(items) > limit,
        }

    @v1.get(
        "/gallery/{image_id}", tags=["gallery"], summary="One gallery image", responses=_NOT_FOUND
    )
    async def gallery_get(request: Request, image_id: str) -> dict[str, Any]:
        item = await run_in_threadpool(need_gallery().get, image_id)
        if item is None:
            raise APIError(404, f"no gallery image {image_id!r}", param="image_id")
        return gallery_entry(request, item)

    @v1.delete(
        "/gallery/{image_id}",
        tags=["gallery"],
        summary="Delete a gallery image",
        responses=_NOT_FOUND,
    )
    async def gallery_delete(image_id: str) -> dict[str, Any]:
        if not await run_in_threadpool(need_gallery().delete, image_id):
            raise APIError(404, f"no gallery image {image_id!r}", param="image_id")
        return {"id": image_id, "object": "gallery.image", "deleted": True}

    # -- about -------------------------------------------------------------------------------

    @v1.get("/models", tags=["about"], summary="The pipeline, as an OpenAI model list")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": pipe.name, "object": "model", "created": int(server.started),
                 "owned_by": "unclip"}
            ],
        }  # fmt: skip

    @v1.get("/status", tags=["about"], summary="Pipeline, defaults, limits and queue state")
    async def status() -> dict[str, Any]:
        sampling = getattr(getattr(pipe, "config", None), "sampling", None)
        return {
            "pipeline": pipe.name,
            "image_size": pipe.image_size,
            "sizes": [f"{s}x{s}" for s in sorted({pipe.image_size, *OPENAI_SIZES})],
            "has_prior": getattr(pipe, "prior", None) is not None,
            "defaults": sampling.to_dict() if sampling is not None else None,
            "limits": asdict(limits),
            "queue": {
                "workers": server.queue.workers,
                "size": server.queue.queue_size,
                "queued": server.queue.queued,
                "running": server.queue.running,
            },
            "gallery": server.gallery is not None,
            "version": unclip.__version__,
        }

    app.include_router(v1)

    # -- files and the page --------------------------------------------------------------------

    @app.get(
        "/files/{name}",
        tags=["files"],
        summary="A result image (capability URL)",
        response_class=_PNGResponse,
        responses={200: {"description": "the PNG, with its text metadata"}, **_NOT_FOUND},
    )
    async def file(name: str) -> Response:
        image_id = name.removesuffix(".png")
        data = await run_in_threadpool(server.png, image_id)
        if data is None:
            raise APIError(404, "no such image (deleted, evicted from the gallery, or expired)")
        return Response(
            data,
            media_type="image/png",
            headers={
                "Cache-Control": "private, max-age=31536000, immutable",
                "Content-Disposition": f'inline; filename="unclip-{image_id}.png"',
            },
        )

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
