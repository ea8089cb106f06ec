"""User images and masks in, model tensors out; and the spherical interpolation of latents.

**Resize policy.** An input image is composited onto white (transparency becomes white),
its centre square is cropped (the shorter side is kept whole) and resized to the pipeline's
output resolution with Lanczos filtering. CLIP sees the same square, resized by
``CLIP.preprocess``. A mask gets the same crop and a nearest-neighbour resize.

**Mask convention** (as diffusers ≥ 0.19 and the OpenAI edits API): white or transparent =
repaint, black (opaque) = keep. A mask with any transparent pixel is read by its alpha
channel only (alpha < 128 = repaint); otherwise by its grey level (≥ 128 = repaint). The
models use the opposite, ``keep`` masks (1 = known pixel); :func:`keep_mask` converts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip.data.transforms import center_crop_resize, load_image, onto_white, to_tensor
from unclip.pipeline.events import ImageInfo, attach_info

ImageInput = Image.Image | str | os.PathLike

__all__ = [
    "ImageInput",
    "as_image",
    "crop_box",
    "has_transparency",
    "inpaint_inputs",
    "keep_mask",
    "outpaint_canvas",
    "prepare_image",
    "repaint_mask",
    "slerp",
    "source_name",
    "to_pil",
]


def as_image(image: ImageInput, what: str = "image") -> Image.Image:
    """A PIL image, or a file decoded with :func:`unclip.data.transforms.load_image`."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{os.fspath(image)}: no such {what} file")
        return load_image(image)
    raise TypeError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")


def source_name(image: ImageInput) -> str | None:
    """The file an input image was given as (the path as given), for its outputs' metadata;
    None for an image given in memory."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centre square (left, top, right, bottom) of a width × height image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def prepare_image(image: Image.Image, size: int) -> torch.Tensor:
    """Onto white, centre square, Lanczos to ``size``: -> [1, 3, size, size] in [-1, 1]."""
    rgb = onto_white(image)
    return to_tensor(center_crop_resize(rgb.crop(crop_box(*rgb.size)), size))[None]


def has_transparency(image: Image.Image) -> bool:
    """Whether any pixel of ``image`` is not fully opaque."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "RGBa", "La", "PA"):
        return False
    return image.getchannel("A").getextrema()[0] < 255


def repaint_mask(mask: Image.Image) -> np.ndarray:
    """User mask -> bool array [H, W], True where the image is repainted (see module docs)."""
    if has_transparency(mask):
        alpha = np.asarray(mask.convert("RGBA").getchannel("A"))
        return alpha < 128
    return np.asarray(mask.convert("L")) >= 128


def keep_mask(repaint: np.ndarray, size: int) -> torch.Tensor:
    """Repaint mask [H, W] bool (the image's own size) -> keep mask [1, 1, size, size] float
    (1 = keep), with the image's centre-square crop and a nearest-neighbour resize."""
    h, w = repaint.shape
    img = Image.fromarray(np.where(repaint, 0, 255).astype(np.uint8), "L").crop(crop_box(w, h))
    img = img.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(img) >= 128).float()[None, None]


def downscale_keep(keep: torch.Tensor, size: int) -> torch.Tensor:
    """A keep mask [N, 1, S, S] at a lower resolution: a low-res pixel counts as known only if
    every pixel it covers is known (so the repainted region never shrinks). -> [N, 1, s, s]."""
    if keep.shape[-1] == size:
        return keep
    return (F.interpolate(keep, size=(size, size), mode="area") > 0.999).float()


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between rows of a and b ([N, ...] each) by angle: t = 0 gives
    a, t = 1 gives b (Shoemake 1985). Norms are interpolated linearly, so unit vectors stay
    unit vectors and Gaussian noise keeps its scale; nearly parallel rows fall back to lerp."""
    flat_a, flat_b = a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float()
    na, nb = flat_a.norm(dim=1, keepdim=True), flat_b.norm(dim=1, keepdim=True)
    ua, ub = flat_a / na.clamp_min(1e-12), flat_b / nb.clamp_min(1e-12)
    cos = (ua * ub).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    wa = torch.where(parallel, 1.0 - t, torch.sin((1.0 - t) * omega) / sin.clamp_min(1e-12))
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / sin.clamp_min(1e-12))
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = direction * ((1.0 - t) * na + t * nb)
    return out.reshape(a.shape).to(a.dtype)


def paste_canvas(
    image: Image.Image, left: int, right: int, top: int, bottom: int
) -> tuple[Image.Image, np.ndarray, tuple[int, int, int, int]]:
    """Grow ``image`` by the margins onto a white square canvas (the grown canvas centred).

    Returns (square RGB canvas, repaint mask [side, side] bool, the grown canvas's box in the
    square as (left, top, right, bottom)).
    """
    rgb = onto_white(image)
    w, h = rgb.size
    width, height = w + left + right, h + top + bottom
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(rgb, (ox + left, oy + top))
    repaint = np.ones((side, side), dtype=bool)
    repaint[oy + top : oy + top + h, ox + left : ox + left + w] = False
    return canvas, repaint, (ox, oy, ox + width, oy + height)


def scale_box(box: Sequence[int], factor: float, limit: int) -> tuple[int, int, int, int]:
    """A box scaled by ``factor`` and rounded, kept inside [0, limit] with at least 1 px."""
    left, top, right, bottom = (round(v * factor) for v in box)
    left, top = min(max(0, left), limit - 1), min(max(0, top), limit - 1)
    right, bottom = max(left + 1, min(limit, right)), max(top + 1, min(limit, bottom))
    return left, top, right, bottom


def inpaint_inputs(
    image: Image.Image, mask: ImageInput | None, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(known image [1, 3, size, size], keep mask [1, 1, size, size]) of an edit of ``image``:
    ``mask`` (same size; white or transparent = repaint) or, None, the image's own transparent
    pixels are repainted. ValueError for no mask on an opaque image, a mask of another size,
    or a mask that marks nothing to repaint."""
    if mask is None:
        if not has_transparency(image):
            raise ValueError(
                "no mask given and the image has no transparent pixels; pass a mask "
                "(white or transparent = repaint)"
            )
        repaint_px = repaint_mask(image)
    else:
        mask_img = as_image(mask, "mask")
        if mask_img.size != image.size:
            raise ValueError(
                f"the mask is {mask_img.size[0]}×{mask_img.size[1]} but the image is "
                f"{image.size[0]}×{image.size[1]}; they must be the same size"
            )
        repaint_px = repaint_mask(mask_img)
    keep = keep_mask(repaint_px, size)
    if bool(keep.all()):
        raise ValueError("the mask marks nothing to repaint (white or transparent = repaint)")
    return prepare_image(image, size), keep


def to_pil(x: torch.Tensor, info: ImageInfo) -> Image.Image:
    """[1, 3, H, W] in [-1, 1] -> RGB image carrying ``info`` (typed, and as its PNG text in
    ``image.info``: :func:`~unclip.pipeline.events.attach_info`)."""
    from unclip.data.transforms import from_tensor

    return attach_info(from_tensor(x[0]), info)


def outpaint_canvas(
    image: Image.Image, left: int, right: int, top: int, bottom: int, size: int
) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """(canvas, mask, crop box) to grow ``image`` by the margins (pixels of the image): the
    grown canvas centred on a white square (:func:`paste_canvas`), a mask of the same size
    (white = repaint: the new area), and the box that cuts the grown canvas out of the square
    once it is resized to ``size``."""
    canvas, repaint, box = paste_canvas(image, left, right, top, bottom)
    mask = Image.fromarray(repaint.astype(np.uint8) * 255, "L")
    return canvas, mask, scale_box(box, size / canvas.size[0], size)
