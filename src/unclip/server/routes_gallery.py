"""The gallery routes (under ``/v1``: list, get, delete), and the routes outside ``/v1``
that need no API key: result images (``/files/{id}.{format}``, capability URLs: the id is
128 random bits) and the web page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from unclip.server.errors import APIError
from unclip.server.gallery import Gallery
from unclip.server.openapi import NOT_FOUND, ImageFileResponse
from unclip.server.state import state
from unclip.server.uploads import OUTPUT_FORMATS

__all__ = ["STATIC_DIR", "pages", "router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

router = APIRouter(tags=["gallery"], responses=NOT_FOUND)
#: outside /v1: result images and the web page
pages = APIRouter()


def _gallery(request: Request) -> Gallery:
    gallery = state(request).gallery
    if gallery is None:
        raise APIError(404, "this server runs without a gallery", code="no_gallery")
    return gallery


def _entry(request: Request, item: Any) -> dict[str, Any]:
    return {**item.to_dict(), "url": f"{request.base_url}files/{item.id}.{item.format}"}


@router.get("/gallery", summary="Gallery images, newest first")
async def gallery_list(
    request: Request,
    limit: int = Query(50, ge=1, le=200),
    before: str | None = Query(None, description="the last id of the previous page"),
) -> dict[str, Any]:
    items = await run_in_threadpool(_gallery(request).list, limit + 1, before)
    return {
        "object": "list",
        "data": [_entry(request, it) for it in items[:limit]],
        "has_more": len(items) > limit,
    }


@router.get("/gallery/{image_id}", summary="One gallery image")
async def gallery_get(request: Request, image_id: str) -> dict[str, Any]:
    item = await run_in_threadpool(_gallery(request).get, image_id)
    if item is None:
        raise APIError(404, f"no gallery image {image_id!r}", param="image_id")
    return _entry(request, item)


@router.delete("/gallery/{image_id}", summary="Delete a gallery image")
async def gallery_delete(request: Request, image_id: str) -> dict[str, Any]:
    if not await run_in_threadpool(_gallery(request).delete, image_id):
        raise APIError(404, f"no gallery image {image_id!r}", param="image_id")
    return {"id": image_id, "object": "gallery.image", "deleted": True}


@pages.get(
    "/files/{name}",
    tags=["files"],
    summary="A result image (capability URL)",
    response_class=ImageFileResponse,
    responses={
        200: {
            "description": "the image (``{id}.png``, ``.jpeg`` or ``.webp``: the format it was "
            "made in), with its metadata (PNG text, or EXIF)",
            "content": {media: {} for media in OUTPUT_FORMATS.values()},
        },
        **NOT_FOUND,
    },
)
async def file(request: Request, name: str) -> Response:
    image_id, _, ext = name.partition(".")
    found = await run_in_threadpool(state(request).file, image_id)
    if found is None or ext not in ("", found[1]):
        raise APIError(404, "no such image (deleted, evicted from the gallery, or expired)")
    data, fmt = found
    return Response(
        data,
        media_type=OUTPUT_FORMATS[fmt],
        headers={
            "Cache-Control": "private, max-age=31536000, immutable",
            "Content-Disposition": f'inline; filename="unclip-{image_id}.{fmt}"',
        },
    )


@pages.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
