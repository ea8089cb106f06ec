"""Uploaded images in, result files out, with the server's limits.

**In.** An upload is refused before it is decoded when it is empty, larger than the byte
limit, not one of the raster formats below, or declares more pixels than the pixel limit (a
decompression bomb: a few kilobytes of PNG can declare gigapixels). Only the header is read
before that check. SVG is not accepted over HTTP (its rendered size is up to the file).

**Out.** A result is a PNG, JPEG or WebP file (:data:`OUTPUT_FORMATS`, the Images API's
``output_format``; :func:`encode_image`). A PNG carries the image's metadata as text chunks,
a JPEG or WebP as EXIF: ``ImageDescription`` holds the same entries as one JSON object
(ASCII), ``Software`` the server's version. :func:`image_text` reads either back.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from unclip.server.errors import APIError, bad_request

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: result formats (``output_format``) and their media types; a file's extension is its format
OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: ``output_compression`` when none is given: the best quality (as the OpenAI API's 100)
DEFAULT_COMPRESSION = 100
#: EXIF tags of a JPEG's or WebP's metadata
_DESCRIPTION, _SOFTWARE = 0x010E, 0x0131


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


def encode_image(
    image: Image.Image,
    fmt: str = "png",
    compression: int | None = None,
    software: str | None = None,
) -> bytes:
    """``image`` as a file of ``fmt`` (a key of :data:`OUTPUT_FORMATS`) with its string
    ``info`` entries as metadata. ``compression`` (0–100, default 100) is the Images API's
    ``output_compression``, the quality: a JPEG's (colour kept at full resolution, 4:4:4),
    a lossy WebP's below 100 and a lossless WebP at 100; a PNG is lossless and ignores it."""
    if fmt == "png":
        return png_bytes(image, software)
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(
            f"unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}"
        )
    text = {k: v for k, v in image.info.items() if isinstance(v, str)}
    exif = Image.Exif()
    exif[_DESCRIPTION] = json.dumps(text)  # ASCII: EXIF strings are
    if software:
        exif[_SOFTWARE] = software
    quality = DEFAULT_COMPRESSION if compression is None else int(compression)
    if fmt == "jpeg":
        options: dict[str, Any] = {"quality": quality, "subsampling": 0}
    else:
        options = {"lossless": True} if quality == 100 else {"quality": quality}
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt.upper(), exif=exif, **options)
    return buf.getvalue()


def file_format(data: bytes) -> str | None:
    """The :data:`OUTPUT_FORMATS` key of a file's bytes (by its signature), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_text(data: bytes) -> dict[str, Any]:
    """The metadata of a result file: a PNG's text chunks, or the JSON object in a JPEG's or
    WebP's EXIF ``ImageDescription`` (with ``software`` from the EXIF ``Software``)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "PNG":
            return dict(getattr(img, "text", {}))
        exif = img.getexif()
    out: dict[str, Any] = {}
    try:
        value = json.loads(exif.get(_DESCRIPTION, "{}"))
        out.update(value if isinstance(value, dict) else {})
    except ValueError:
        pass
    if _SOFTWARE in exif:
        out["software"] = exif[_SOFTWARE]
    return out


def png_text(data: bytes) -> dict[str, Any]:
    """The text metadata of PNG bytes (for tests and the gallery)."""
    with Image.open(io.BytesIO(data)) as img:
        return dict(getattr(img, "text", {}))
