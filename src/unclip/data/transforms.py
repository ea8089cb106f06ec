"""Image transforms shared by every data set: decode safely, RGBA onto white, resize, crop, scale.

Images enter the models as float tensors ``[3, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "center_crop_resize",
    "from_tensor",
    "load_image",
    "onto_white",
    "pad_square",
    "rasterize_svg",
    "to_tensor",
]

# Refuse decompression bombs: an image that declares more pixels than this is not decoded.
MAX_IMAGE_PIXELS = 64_000_000


class BadImageError(ValueError):
    """A file that is not a decodable image (empty, truncated, unknown format, or too large)."""


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode a PNG/JPEG/WebP/GIF/SVG file (or its bytes) fully; raise :class:`BadImageError`.

    SVG is rasterised at its own size (see :func:`rasterize_svg`). ``name`` is used in messages
    (default: the path, or "the uploaded image" for bytes).
    """
    if isinstance(source, (bytes, bytearray)):
        data, label = bytes(source), name or "the uploaded image"
    else:
        label = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise BadImageError(f"{label}: cannot read ({e.strerror})") from None
    if not data:
        raise BadImageError(f"{label}: empty file")
    head = data[:512].lstrip()
    if head.startswith(b"<?xml") or head.startswith(b"<svg") or label.lower().endswith(".svg"):
        return rasterize_svg(data.decode("utf-8", errors="replace"), name=label)
    buffer = io.BytesIO(data)
    try:
        img = Image.open(buffer)
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise BadImageError(
                f"{label}: {w}×{h} pixels is more than the limit of {MAX_IMAGE_PIXELS:,}"
            )
        img.load()
    except BadImageError:
        raise
    except UnidentifiedImageError:  # its message names our in-memory buffer, not the file
        raise BadImageError(
            f"{label}: not a readable image (not in a format Pillow reads, such as PNG, JPEG, "
            "WebP, GIF or BMP, nor SVG)"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).replace(repr(buffer), "the data")
        raise BadImageError(f"{label}: not a readable image ({reason})") from None
    return img


_SVG_UNITS = {"": 1.0, "px": 1.0, "pt": 96 / 72, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54,
              "in": 96.0, "em": 16.0, "ex": 8.0}  # fmt: skip


def _svg_length(value: str | None) -> float | None:
    import re

    if not value:
        return None
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-z]*)\s*", value)
    if not m or m.group(2) not in _SVG_UNITS:
        return None  # percentages and the like: the viewBox decides
    try:
        return float(m.group(1)) * _SVG_UNITS[m.group(2)]
    except ValueError:
        return None


def svg_declared_size(svg: str) -> tuple[float, float] | None:
    """The size in pixels (96 dpi) the root ``<svg>`` declares (width/height, else viewBox).

    Only the root element is read, so a hostile file cannot make this slow.
    """
    import io as _io
    import xml.etree.ElementTree as ET

    try:
        for _event, elem in ET.iterparse(_io.StringIO(svg), events=("start",)):
            w, h = _svg_length(elem.get("width")), _svg_length(elem.get("height"))
            box = (elem.get("viewBox") or "").replace(",", " ").split()
            if len(box) == 4:
                try:
                    bw, bh = float(box[2]), float(box[3])
                except ValueError:
                    bw = bh = 0.0
                if bw > 0 and bh > 0:
                    if w is None and h is None:
                        w, h = bw, bh
                    elif w is None:
                        w = h * bw / bh  # type: ignore[operator]
                    elif h is None:
                        h = w * bh / bw
            if w is None or h is None:
                w, h = w or 100.0, h or 100.0  # the SVG default when nothing is said
            return w, h
    except ET.ParseError:
        return None
    return None


def rasterize_svg(svg: str, size: int | None = None, name: str = "<svg>") -> Image.Image:
    """Render SVG markup to RGBA with resvg at 96 dpi (so mm/pt/in units mean what they say).

    With ``size``, the larger side is rendered at exactly ``size`` pixels (aspect kept).
    A file that declares more than :data:`MAX_IMAGE_PIXELS` is refused without rendering.
    """
    try:
        import resvg_py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "rendering SVG needs resvg-py: pip install 'unclip[data]' (or resvg-py)"
        ) from e
    import re

    for link in re.findall(r"""<image\b[^>]*?href\s*=\s*["']([^"']*)""", svg, flags=re.I):
        if not link.strip().lower().startswith("data:"):
            raise BadImageError(f"{name}: the SVG links an outside file ({link[:60]}); refused")
    declared = svg_declared_size(svg)
    if declared is None:
        raise BadImageError(f"{name}: not a readable SVG")
    w, h = declared
    if not (w > 0 and h > 0):
        raise BadImageError(f"{name}: the SVG declares an empty size")
    zoom = 1.0 if size is None else size / max(w, h)
    if w * h * zoom * zoom > MAX_IMAGE_PIXELS:
        raise BadImageError(
            f"{name}: {w:.0f}×{h:.0f} pixels is more than the limit of {MAX_IMAGE_PIXELS:,}"
        )
    try:
        png = bytes(resvg_py.svg_to_bytes(svg_string=svg, dpi=96, zoom=zoom))
        img = Image.open(io.BytesIO(png))
        img.load()
    except (ValueError, OSError) as e:
        raise BadImageError(f"{name}: not a renderable SVG ({e})") from None
    if size is not None and max(img.size) != size:  # rounding: fix the last pixel
        img = img.resize(
            (
                max(1, round(img.width * size / max(img.size))),
                max(1, round(img.height * size / max(img.size))),
            ),
            Image.Resampling.LANCZOS,
        )
    return img.convert("RGBA")


def pad_square(img: Image.Image) -> Image.Image:
    """Centre ``img`` on a transparent square canvas of its larger side."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(img.convert("RGBA"), ((side - w) // 2, (side - h) // 2))
    return canvas


def onto_white(img: Image.Image) -> Image.Image:
    """Composite any mode (RGBA, LA, P with transparency, L, CMYK…) onto white; returns RGB."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    if img.size == size:
        return img
    if img.mode == "RGBA":  # resize premultiplied, so transparent pixels do not bleed colour
        return img.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    return img.resize(size, Image.Resampling.LANCZOS)


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Scale so the larger side is ``size`` and pad to a transparent square (no crop): icons."""
    img = img.convert("RGBA")
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return pad_square(_resize(img, new))


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` with antialiasing, then take the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    img = _resize(img, new)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in ``[-1, 1]``."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def from_tensor(x: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in ``[-1, 1]`` -> RGB PIL image (values clamped, rounded)."""
    arr = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), "RGB")


def prepare_image(img: Image.Image, size: int, mode: str = "crop") -> Image.Image:
    """The standard path: onto white, then ``crop`` (photos) or ``pad`` (icons) to ``size``²."""
    if mode == "pad":
        return onto_white(fit_square(img, size))
    return center_crop_resize(onto_white(img), size)
