"""Image-to-image with a strength (SDEdit, Meng et al. 2022): :meth:`UnclipPipeline.image_to_image
<unclip.pipeline.core.UnclipPipeline.image_to_image>`.

The input (resize policy of :mod:`unclip.pipeline.images`, then resized to the decoder's
resolution) is noised to t0 = round(strength · (T - 1)) of the decoder's schedule and denoised
from there, in the decoder's steps spread over [t0, 0] (:func:`~.runners.sdedit_start`, as the
upsamplers' ``strength`` does), conditioned on the prompt's z_i from the prior and its caption,
or without a prompt on the image's own CLIP embedding and no caption. The upsamplers then run
as in text-to-image.

The two ends are exact: strength 1 starts from pure noise, the very draw text-to-image makes
(so with a prompt it is ``text_to_image(prompt, seed=…)``, without one ``variations(image,
seed=…)``); strength 0 changes nothing: the input itself, at the output resolution.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from PIL import Image

from unclip.pipeline.config import DEFAULT_STRENGTH
from unclip.pipeline.images import ImageInput, as_image, prepare_image, source_name, to_pil
from unclip.pipeline.runners import (
    ProgressCallback,
    TextCondition,
    decode,
    sdedit_start,
    stage_generators,
    upsample,
)
from unclip.pipeline.settings import check_count, check_prompt, check_seed

if TYPE_CHECKING:
    from unclip.pipeline.base import PipelineBase


def check_strength(strength: Any, what: str = "strength") -> float:
    """A number in [0, 1], or TypeError/ValueError naming ``what``."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"{what} must be a number, got {strength!r}")
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ValueError(f"{what} must be between 0 and 1, got {strength}")
    return float(strength)


def image_to_image(
    pipe: PipelineBase,
    image: ImageInput,
    prompt: str | None = None,
    *,
    strength: float = DEFAULT_STRENGTH,
    num_images: int = 1,
    seed: int | None = None,
    negative_prompt: str | None = None,
    progress: ProgressCallback | None = None,
    **overrides: Any,
) -> list[Image.Image]:
    """Image to image (SDEdit): noise the image to ``strength`` (in [0, 1]) of the
    decoder's schedule and denoise it under the prompt's z_i from the prior, or without a
    prompt the image's own CLIP embedding. Strength 1 is ``text_to_image(prompt)`` with the
    same seed; strength 0 returns the input."""
    img = as_image(image)
    strength = check_strength(strength)
    if prompt is not None:
        check_prompt(prompt)
    n = check_count(num_images, "num_images")
    negative = pipe._text(negative_prompt, "negative prompt") if negative_prompt else None
    settings = pipe.sampling_settings(**overrides)
    base = check_seed(seed, n)
    x_full = prepare_image(img, pipe.image_size).to(pipe.device)
    with_prior = pipe.prior is not None and (prompt is not None or negative is not None)
    stages = pipe._stages_used(*(["prior"] if with_prior else []), "decoder")
    extra = {"prompt": prompt, "negative_prompt": negative_prompt, "strength": strength}
    extra["image"] = source_name(image)
    if strength == 0.0:  # nothing noised, nothing denoised: the input as the pipeline reads it
        info = pipe._info("image_to_image", base, settings, [], **extra)
        return [to_pil(x_full, info.replace(seed=base + k)) for k in range(n)]
    text = pipe._text(prompt) if prompt is not None else None
    z_image = pipe._clip_image(x_full) if text is None else None
    x0 = pipe._resize_to_base(x_full)
    out: list[Image.Image] = []
    ctx = pipe._ctx(progress)
    for rows in pipe._batches(n):
        seeds = [base + k for k in rows]
        texts = None if text is None else TextCondition.cat([text] * len(seeds))
        if texts is not None:
            z = pipe._sample_prior(texts, seeds, settings, progress, negative=negative)
        else:
            z = z_image.expand(len(seeds), -1)  # type: ignore[union-attr]
        neg = pipe._negative(negative, seeds, settings, progress)
        gens = stage_generators(seeds, "decoder")
        noise, timesteps = None, None
        if strength < 1.0:  # else pure noise, drawn by the sampler as text_to_image's is
            start = x0.expand(len(seeds), -1, -1, -1)
            steps = settings.decoder.steps
            noise, timesteps = sdedit_start(pipe.decoder, start, strength, steps, gens, pipe.device)
        st = settings.decoder
        x = decode(pipe.decoder, z, texts, st, gens, ctx, noise=noise, negative=neg,
                   timesteps=timesteps)  # fmt: skip
        x = upsample(pipe.upsamplers, x, settings.upsampler, seeds, ctx)
        for j, s in enumerate(seeds):
            out.append(
                to_pil(x[j : j + 1], pipe._info("image_to_image", s, settings, stages, **extra))
            )
    return out
