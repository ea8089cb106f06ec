"""Uploaded images in, PNG bytes out, with the server's limits.

An upload is refused before it is decoded when it is empty, larger than the byte limit, not
one of the raster formats below, or declares more pixels than the pixel limit (a
decompression bomb: a few kilobytes of PNG can declare gigapixels). Only the header is read
before that check. SVG is not accepted over HTTP (its rendered size is up to the file).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from unclip.server.errors import APIError, bad_request

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image(data: bytes, what: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode an uploaded image (field ``what``) or raise :class:`APIError` naming it."""
    if not data:
        raise bad_request(f"the {what} file is empty", param=what, code="invalid_image")
    if len(data) > max_bytes:
        raise APIError(
            413,
            f"the {what} file is {len(data):,} bytes; the limit is {max_bytes:,}",
            param=what,
            code="file_too_large",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise _too_many_pixels(what, max_pixels, str(e)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise _not_an_image(what) from None
    w, h = img.size
    if w < 1 or h < 1:
        raise _not_an_image(what)
    if w * h > max_pixels:
        raise _too_many_pixels(what, max_pixels, f"{w}×{h} = {w * h:,} pixels")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _not_an_image(what, "it is truncated or corrupt") from None
    return img


def _too_many_pixels(what: str, max_pixels: int, detail: str) -> APIError:
    return bad_request(
        f"the {what} is too large ({detail}); the limit is {max_pixels:,} pixels",
        param=what,
        code="image_too_large",
    )


def _not_an_image(what: str, why: str | None = None) -> APIError:
    formats = ", ".join(f.lower() for f in FORMATS)
    reason = why or f"not an image in a supported format ({formats})"
    return bad_request(
        f"the {what} file could not be read: {reason}", param=what, code="invalid_image"
    )


def png_bytes(image: Image.Image, software: str | None = None) -> bytes:
    """``image`` as PNG, with its string ``info`` entries as text metadata."""
    meta = PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            meta.add_itxt(key, value)
    if software:
        meta.add_itxt("software", software)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def png_text(data: bytes) -> dict[str, Any]:
    """The text metadata of PNG bytes (for tests and the gallery)."""
    with Image.open(io.BytesIO(data)) as img:
        return dict(getattr(img, "text", {}))
