"""Weighted mixing of captions and images (DALL·E 2 §3; Kandinsky 2.2's ``interpolate``):
:meth:`UnclipPipeline.mix <unclip.pipeline.core.UnclipPipeline.mix>`.

Each input becomes an image embedding z_i: an image through CLIP's image encoder, a caption
through the prior (one sample per output image, from that image's seed). The embeddings are
combined by their weights (normalised to sum 1): two by a slerp, more by the weighted mean
renormalised to unit length. An input of weight 0 is dropped before anything is computed, and
a single remaining input is used as it is, so weights (1, 0) give exactly the first input's
mix on its own. The result is decoded from the mixed z_i alone (no caption), as variations
are: ``mix([image])`` is ``variations(image)`` with the same seed.

**Inputs:** a PIL image or a path object is an image; a string is an image when it names an
existing file, an error when it ends in an image suffix but names no file (a mistyped path),
and a caption otherwise. With ``files=False`` every string is a caption: a server passing its
clients' text must, or a caption could name a file on the server.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from unclip.pipeline.images import ImageInput, as_image, prepare_image, slerp, source_name
from unclip.pipeline.runners import ProgressCallback, TextCondition
from unclip.pipeline.settings import check_count, check_seed

if TYPE_CHECKING:
    from unclip.pipeline.base import PipelineBase

#: the most inputs one mix may combine
MAX_MIX_INPUTS = 16
#: file name endings that make a string input an image (see the module docstring)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".svg", ".tif", ".tiff")


def is_image_input(item: Any, files: bool = True) -> bool:
    """Whether a mix input is an image (see the module docstring; ``files=False``: a string
    is always a caption); FileNotFoundError for a string that ends in an image suffix but
    names no file."""
    if isinstance(item, (Image.Image, os.PathLike)):
        return True
    if not isinstance(item, str):
        raise TypeError(f"a mix input must be a caption, an image or a path, got {item!r}")
    if not files:
        return False
    if os.path.isfile(item):
        return True
    if item.strip().lower().endswith(IMAGE_SUFFIXES):
        raise FileNotFoundError(f"{item}: no such image file")
    return False


def check_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """One finite weight ≥ 0 per input, not all 0 (None: equal weights), as floats."""
    if weights is None:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} inputs; give one weight per input")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float, np.number)):
            raise TypeError(f"a mix weight must be a number, got {w!r}")
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"mix weights must be finite and at least 0, got {w}")
    if not any(w > 0 for w in weights):
        raise ValueError("the mix weights are all 0; give at least one input a weight above 0")
    return [float(w) for w in weights]


def mix_embeddings(zs: Sequence[Tensor], weights: Sequence[float], raw: bool = False) -> Tensor:
    """Unit-norm embeddings z_k [N, D] with weights w_k > 0 -> their mix [N, D]: one input
    itself (exactly), two slerp(z_1, z_2, w_2 / (w_1 + w_2)), more the weighted mean
    Σ w_k z_k / Σ w_k renormalised to unit length (``raw``: embeddings of any norm, as a
    converted Karlo pipeline's stages take them, and the mean rescaled to Σ w_k |z_k| / Σ w_k,
    as slerp interpolates norms)."""
    if len(zs) == 1:
        return zs[0]
    total = sum(weights)
    if len(zs) == 2:
        return slerp(zs[0], zs[1], weights[1] / total)
    pairs = list(zip(zs, weights, strict=True))
    mean = sum(w / total * z.float() for z, w in pairs)
    if raw:
        norm = sum(w / total * z.float().norm(dim=-1, keepdim=True) for z, w in pairs)
        return F.normalize(mean, dim=-1) * norm
    return F.normalize(mean, dim=-1)


def mix(
    pipe: PipelineBase,
    inputs: Sequence[str | ImageInput],
    weights: Sequence[float] | None = None,
    *,
    num_images: int = 1,
    seed: int | None = None,
    negative_prompt: str | None = None,
    files: bool = True,
    progress: ProgressCallback | None = None,
    **overrides: Any,
) -> list[Image.Image]:
    """Weighted mix of captions and images (DALL·E 2 §3): images through CLIP, captions
    through the prior; their z_i combined by the normalised ``weights`` (default equal):
    a slerp of two, the renormalised weighted mean of more; decoded without a caption.
    A weight-0 input is dropped, so weights (1, 0) give the first input's image. Image k
    uses seed ``seed + k``. A string naming an existing file is an image; with
    ``files=False`` (a server's clients' text) every string is a caption."""
    items = [inputs] if isinstance(inputs, (str, Image.Image, os.PathLike)) else list(inputs)
    check_count(len(items), "the number of mix inputs", 1, MAX_MIX_INPUTS)
    w = check_weights(len(items), weights)
    kinds = [is_image_input(item, files) for item in items]
    n = check_count(num_images, "num_images")
    negative = pipe._text(negative_prompt, "negative prompt") if negative_prompt else None
    records: list[dict[str, Any]] = []
    used: list[tuple[Tensor | TextCondition, float]] = []  # z_i of an image, or a caption
    for k, (item, is_image, weight) in enumerate(zip(items, kinds, w, strict=True)):
        if is_image:
            img = as_image(item, f"image of mix input {k + 1}")
            records.append({"image": source_name(item)})
            if weight > 0:
                used.append((pipe._clip_image(prepare_image(img, pipe.image_size)), weight))
        else:
            records.append({"text": item})
            if weight > 0:
                used.append((pipe._text(item, f"caption of mix input {k + 1}"), weight))
    settings = pipe.sampling_settings(**overrides)
    base = check_seed(seed, n)
    seeds = [base + k for k in range(n)]
    rows = []
    for batch in pipe._batches(n):
        part = seeds[batch.start : batch.stop]
        zs = []
        for z, _ in used:  # an image's z_i, or a caption's prior sample for each image
            if isinstance(z, TextCondition):
                z = pipe._sample_prior(TextCondition.cat([z] * len(part)), part, settings,
                                       progress, negative=negative)  # fmt: skip
            zs.append(z.expand(len(part), -1))
        rows.append(mix_embeddings(zs, [weight for _, weight in used], pipe.raw_embeddings))
    texts = any(not isinstance(z, Tensor) for z, _ in used)
    with_prior = pipe.prior is not None and (texts or negative is not None)
    stages = pipe._stages_used(*(["prior"] if with_prior else []), "decoder")
    extra = {"inputs": records, "weights": w, "negative_prompt": negative_prompt}
    if texts and pipe.prior is None:
        extra["prior"] = "none (text embedding)"
    infos = [pipe._info("mix", s, settings, stages, **extra) for s in seeds]
    z = torch.cat(rows)
    return pipe._frames(z, None, seeds, settings, progress, infos, negative=negative)
