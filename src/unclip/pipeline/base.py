"""The stage glue every capability of :class:`~unclip.pipeline.core.UnclipPipeline` uses, as
its base class :class:`PipelineBase`: the resolutions, the sampling settings of a call, the
CLIP encoders, prior sampling (with a negative prompt), decoding fixed latents in batches,
inversion and the images' metadata. The capabilities themselves are in :mod:`.core` (and the
bodies of the newer ones in :mod:`.mixing` and :mod:`.img2img`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from unclip.clip.text import TextEncoder
from unclip.pipeline.config import PipelineConfig, SamplingConfig
from unclip.pipeline.events import ImageInfo
from unclip.pipeline.images import ImageInput, as_image, prepare_image, to_pil
from unclip.pipeline.runners import (
    NegativeCondition,
    ProgressCallback,
    RunContext,
    TextCondition,
    decode,
    invert,
    sample_prior,
    stage_generators,
    upsample,
)
from unclip.pipeline.settings import apply_overrides, check_prompt, sampling_info
from unclip.pipeline.stages import Stage


class PipelineBase:
    """What the capabilities share (see the module docstring). The attributes are set by
    :class:`~unclip.pipeline.core.UnclipPipeline`'s constructor."""

    tokenizer: Any
    clip: nn.Module
    text_encoder: TextEncoder
    prior: Stage | None
    decoder: Stage
    inpaint_decoder: Stage | None
    upsamplers: list[Stage]
    config: PipelineConfig
    path: Path | None
    device: torch.device
    dtype: torch.dtype
    max_batch: int
    name: str
    offload: bool

    @property
    def base_size(self) -> int:
        """The decoder's resolution."""
        return int(self.decoder.model.config.image_size)

    @property
    def image_size(self) -> int:
        """The output resolution (the last upsampler's, or the decoder's)."""
        if self.upsamplers:
            return int(self.upsamplers[-1].model.config.image_size)
        return self.base_size

    # -- settings ----------------------------------------------------------------------------

    def sampling_settings(self, **overrides: Any) -> SamplingConfig:
        """The pipeline's default sampling with ``overrides`` applied (None = keep), checked:
        a known sampler, 1 ≤ steps ≤ the stage's diffusion timesteps, guidance in [0, MAX_GUIDANCE]."""
        stages = [("prior", self.prior), ("decoder", self.decoder)]
        stages += [("upsampler", u) for u in self.upsamplers]
        timesteps = [(k, st.diffusion.num_timesteps) for k, st in stages if st and st.diffusion]
        return apply_overrides(self.config.sampling, overrides, timesteps)

    # -- encoders ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> Tensor:
        """CLIP text embeddings z_t, L2-normalised: N captions -> [N, D] float32."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self._unit(self._text(t).z_t) for t in texts]
        return torch.cat(rows) if rows else torch.zeros(0)

    @torch.no_grad()
    def encode_image(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """CLIP image embeddings z_i, L2-normalised: N images (PIL or paths) -> [N, D] float32.
        Each image is composited onto white and centre-cropped (see ``pipeline.images``)."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        size = self.image_size
        rows = [self._unit(self._clip_image(prepare_image(as_image(img), size))) for img in images]
        return torch.cat(rows) if rows else torch.zeros(0)

    @cached_property
    def weights_hash(self) -> str:
        """A short content hash of the stage weights, computed on first use
        (:func:`~unclip.pipeline.provenance.weights_hash`); in every image's metadata."""
        from unclip.pipeline.provenance import weights_hash

        return weights_hash(self)

    @property
    def raw_embeddings(self) -> bool:
        """The stages take CLIP's embeddings unnormalised (a converted Karlo pipeline:
        ``pipeline.json`` ``embeddings`` "raw"); the encoders' and scores' are unit-norm."""
        return self.config.embeddings == "raw"

    def _clip_image(self, x: Tensor) -> Tensor:
        """[1, 3, H, W] in [-1, 1] -> z_i [1, D] float32 as the stages take it: unit norm, or
        unnormalised with :attr:`raw_embeddings`."""
        pixels = self.clip.preprocess(x.to(self.device))
        z = self.clip.encode_image(pixels, normalize=False).float()  # float32 (load_pipeline)
        return z if self.raw_embeddings else F.normalize(z, dim=-1)

    def _unit(self, z: Tensor) -> Tensor:
        """A stage embedding [..., D] L2-normalised (it already is without raw embeddings)."""
        return F.normalize(z, dim=-1) if self.raw_embeddings else z

    def _text(self, text: str, what: str = "prompt") -> TextCondition:
        """Encode one caption (on its own, so results do not depend on batch composition);
        z_t as the stages take it (unit norm, or raw with :attr:`raw_embeddings`)."""
        check_prompt(text, what)
        z_t, feats, mask = self.text_encoder([text], self.device)  # [1, D], [1, L, W], [1, L]
        z_t = z_t.float() if self.raw_embeddings else F.normalize(z_t.float(), dim=-1)
        return TextCondition(text, z_t, feats, mask)

    # -- stage glue -------------------------------------------------------------------------

    def _sample_prior(
        self,
        text: TextCondition,
        seeds: int | Sequence[int],
        settings: SamplingConfig,
        progress: ProgressCallback | None,
        use_prior: bool = True,
        negative: TextCondition | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """z_i [N, D] for N captions (``text`` [N], one seed each): ``candidates`` samples per
        caption, and the one closest to its z_t kept (:func:`~.runners.sample_prior`), guided
        away from the ``negative`` caption if given; without a prior (or ``use_prior=False``)
        z_t itself, the paper's §5.1 baseline. ``generator``: see :meth:`_ctx`."""
        if not use_prior or self.prior is None:
            return text.z_t
        ctx = self._ctx(progress, generator)
        gens = ctx.generators(seeds, "prior")
        neg = None if negative is None else TextCondition.cat([negative] * len(seeds))
        return sample_prior(self.prior, text, settings.prior, gens, ctx, negative=neg)

    def _negative(
        self,
        negative: TextCondition | None,
        seeds: Sequence[int],
        settings: SamplingConfig,
        progress: ProgressCallback | None,
        use_prior: bool = True,
    ) -> NegativeCondition | None:
        """The decoder's negative condition for the images of ``seeds``: the negative caption
        and its z_i, sampled from the prior (stage "negative_prior", each image's own seed) or
        without one its z_t; None without a negative prompt."""
        if negative is None:
            return None
        rows = TextCondition.cat([negative] * len(seeds))
        if not use_prior or self.prior is None:
            return NegativeCondition(rows, rows.z_t)
        gens = stage_generators(seeds, "negative_prior")
        ctx = self._ctx(progress)
        z = sample_prior(self.prior, rows, settings.prior, gens, ctx, name="negative_prior")
        return NegativeCondition(rows, z)

    def _invert(
        self, x: Tensor, z_i: Tensor, settings: SamplingConfig, progress: ProgressCallback | None
    ) -> Tensor:
        """x_T [1, 3, s, s] of an image [1, 3, S, S] at the output resolution (resized to the
        decoder's, antialiased), by DDIM inversion of the decoder given its z_i."""
        x = self._resize_to_base(x)
        return invert(self.decoder, x, z_i, settings.decoder.steps, self._ctx(progress))

    def _resize_to_base(self, x: Tensor) -> Tensor:
        """[N, 3, S, S] at the output resolution -> the decoder's [N, 3, s, s] (antialiased)."""
        s = self.base_size
        if x.shape[-1] == s:
            return x
        return F.interpolate(x, size=(s, s), mode="bicubic", antialias=True).clamp(-1, 1)

    def _ctx(
        self, progress: ProgressCallback | None, generator: torch.Generator | None = None
    ) -> RunContext:
        """What every stage runner takes: the device, the precision, ``progress`` and the one
        ``generator`` of a call given one (see ``UnclipPipeline.text_to_image``)."""
        return RunContext(self.device, self.dtype, progress, generator, self.offload)

    def _info(
        self, method: str, seed: int, settings: SamplingConfig, stages: Sequence[str], **extra: Any
    ) -> ImageInfo:
        """An image's metadata: method, seed, model, how each of ``stages`` was sampled, and
        the ``extra`` fields of :class:`ImageInfo` (None: not set; an empty negative prompt is
        none)."""
        if "negative_prompt" in extra:
            extra["negative_prompt"] = extra["negative_prompt"] or None
        ar = self.prior is not None and self.prior.diffusion is None
        codes = self.prior.model.config.components if ar else None  # type: ignore[union-attr]
        how = sampling_info(settings, stages, codes)
        model, weights = self.name, self.weights_hash
        return ImageInfo(
            method=method, seed=seed, model=model, weights_hash=weights, **how, **extra
        )

    def _frames(
        self,
        z: Tensor,
        noise: Tensor | None,
        seeds: Sequence[int],
        settings: SamplingConfig,
        progress: ProgressCallback | None,
        infos: Sequence[ImageInfo],
        eta: float | None = None,
        negative: TextCondition | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Image.Image]:
        """Decode and upsample images from z [F, D] without a caption, image k with
        ``seeds[k]`` from x_T ``noise`` [F or 1, 3, s, s] (None: drawn from the seeds), in
        batches; image k gets ``infos[k]``. ``eta``: as in :func:`~.runners.decode`;
        ``negative``: the negative caption (:meth:`_negative`); ``generator``: see :meth:`_ctx`."""
        out, ctx = [], self._ctx(progress, generator)
        for rows in self._batches(len(infos)):
            part = slice(rows.start, rows.stop)
            batch_seeds = list(seeds[part])
            x_t = noise[part] if noise is not None and noise.shape[0] > 1 else noise
            gens = ctx.generators(batch_seeds, "decoder")
            neg = self._negative(negative, batch_seeds, settings, progress)
            st = settings.decoder
            x = decode(self.decoder, z[part], None, st, gens, ctx, noise=x_t, eta=eta, negative=neg)
            x = upsample(self.upsamplers, x, settings.upsampler, batch_seeds, ctx)
            out += [to_pil(x[j : j + 1], infos[k]) for j, k in enumerate(rows)]
        return out

    def _batches(self, count: int) -> list[range]:
        """Indices 0..count-1 in runs of at most ``max_batch`` (the images of one batch)."""
        size = max(1, int(self.max_batch))
        return [range(i, min(i + size, count)) for i in range(0, count, size)]

    def _stages_used(self, *first: str) -> list[str]:
        return [*first, *(["upsampler"] if self.upsamplers else [])]
