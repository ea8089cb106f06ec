"""The FastAPI app: OpenAI Images API routes, jobs with server-sent progress, the gallery.

Routes (see ``docs/server.md``):

- ``POST /v1/images/generations`` (JSON), ``/v1/images/edits`` and ``/v1/images/variations``
  (multipart): the OpenAI Images API (``output_format``, ``output_compression``,
  ``background``, ``usage``), with extensions (``seed``, ``steps``, ``guidance``,
  ``negative_prompt``; variations with a ``prompt`` or ``strength``: image-to-image…);
  ``POST /v1/images/mix`` (multipart inputs, prompts or images, and weights) and
  ``POST /v1/images/interpolations`` (multipart ``image_a``, ``image_b``): extensions.
  With the header ``Prefer: respond-async`` each answers 202 at once with a job object;
  otherwise it waits for the images (up to the request timeout). Generations and edits
  with ``stream: true`` answer OpenAI's image stream events instead (:mod:`.streaming`).
- ``GET /v1/jobs/{id}`` (state and result), ``GET /v1/jobs/{id}/events`` (SSE),
  ``DELETE /v1/jobs/{id}`` (cancel); ``GET /v1/gallery``, ``GET|DELETE /v1/gallery/{id}``;
  ``GET /v1/models``, ``GET /v1/status``.
- ``GET /files/{id}.{format}``: a result image (capability URL: the id is 128 random bits).
- ``GET /``: the web page; ``GET /openapi.json``, ``/docs``.

Every ``/v1`` route checks the API key when one is set (:mod:`.auth`). Before any route,
:class:`~unclip.server.guard.Guard` refuses a ``Host`` the server does not answer to, a POST/DELETE from another site (``Origin``
not the server's own nor allowed, ``Origin: null`` included) and bodies over the limit; the
JSON route reads only ``application/json``, parsed with limits (:mod:`.jsonbody`). Errors are
OpenAI error objects (:mod:`.errors`). Generation runs on the
:class:`~unclip.server.jobs.JobQueue`'s worker threads; a full queue answers 429 with
Retry-After.

This module only wires: :func:`create_app` makes the app, its state (:mod:`.state`), the
middleware and the error handlers, and includes the routers of :mod:`.routes_images`,
:mod:`.routes_jobs` and :mod:`.routes_gallery`, whose handlers read the state from
``request.app.state``. Request bodies are read and checked in :mod:`.bodies` (their models:
:mod:`.schemas`), answers built in :mod:`.responses` and :mod:`.streaming`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import unclip
from unclip.server import routes_gallery, routes_images, routes_jobs
from unclip.server.auth import check_key
from unclip.server.bodies import MULTIPART_OVERHEAD, body_limit
from unclip.server.errors import SERVER, APIError, error_body
from unclip.server.gallery import Gallery
from unclip.server.guard import Guard, normalize_origin
from unclip.server.limits import ANY_IP_HOST, DEFAULT_QUEUE_SIZE, LOOPBACK_HOSTS, Limits
from unclip.server.openapi import V1_ERRORS
from unclip.server.routes_gallery import STATIC_DIR
from unclip.server.state import ServerState

__all__ = [
    "ANY_IP_HOST",
    "LOOPBACK_HOSTS",
    "MULTIPART_OVERHEAD",
    "Limits",
    "create_app",
    "normalize_origin",
]


# ---------------------------------------------------------------------------------------------
# Error handlers: every error is an OpenAI error object


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    return JSONResponse(
        error_body(f"Invalid value for '{param}': {err.get('msg')}.", param=param),
        status_code=400,
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
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


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await run_in_threadpool(app.state.unclip.queue.close)


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
    for one with the default limits (files in ``images/`` next to it); None: no gallery, and
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

    app = FastAPI(
        title="unclip",
        version=unclip.__version__,
        summary="DALL·E 2 (unCLIP), locally: an OpenAI-compatible Images API",
        lifespan=_lifespan,
    )
    app.state.unclip = ServerState(
        pipe,
        workers=workers,
        queue_size=queue_size,
        limits=limits,
        api_key=api_key or None,
        gallery=gallery,
        gallery_keep_b64=gallery_keep_b64,
    )
    app.add_middleware(
        Guard,
        limit_for=partial(body_limit, limits),
        allowed_hosts=allowed_hosts,
        allowed_origins=origins,
    )
    if origins:  # added last, so outermost: it answers the listed sites' preflights
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Prefer", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After", "Preference-Applied"],
        )
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)], responses=V1_ERRORS)
    v1.include_router(routes_images.router)
    v1.include_router(routes_jobs.router)
    v1.include_router(routes_gallery.router)
    v1.include_router(routes_jobs.about)
    app.include_router(v1)
    app.include_router(routes_gallery.pages)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
