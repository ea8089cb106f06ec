"""``UnclipPipeline``: tokenizer, CLIP, prior, decoder and upsamplers composed into the
capabilities of DALL·E 2 (Ramesh et al. 2022) and GLIDE (Nichol et al. 2021).

No diffusion maths lives here: every sample is drawn by :mod:`unclip.diffusion` (samplers,
classifier-free guidance, DDIM inversion, RePaint); this module only wires conditions,
seeds and image formats.

**Seeds.** Image ``i`` of a call with ``seed=s`` is drawn with seed ``s + i`` (prompts of a
list are numbered prompt-major: prompt ``p``, image ``j`` of ``n`` is image ``p·n + j``);
``seed=None`` draws a random seed; the seed used is in every image's ``info``. The images of
a call are sampled in batches of up to ``pipe.max_batch`` (default 8) and each gets the same
noise in any batch (see :mod:`unclip.pipeline.runners` for what batching may still change);
``pipe.max_batch = 1`` samples every image exactly as its single call does.

**Sampling overrides** (keyword arguments of every generating method, such as
``decoder_steps=10``; None = the pipeline's default from ``pipeline.json``): see
:mod:`unclip.pipeline.settings`.

**Negative prompts** (``negative_prompt=``): classifier-free guidance steers away from the
negative caption instead of from nothing: the prior's guidance uses its condition in place of
the null one, the decoder's its z_i (sampled from the prior with the caption, from each image's
seed) and caption tokens in place of the null ones. Without one, nothing changes.

**Outputs** are RGB PIL images at the pipeline's output resolution, each carrying an
:class:`~unclip.pipeline.events.ImageInfo` (:func:`~unclip.pipeline.events.image_info`:
``method``, ``seed``, ``model``, ``weights_hash``, the sampling settings, and where it applies
``prompt``, ``negative_prompt``, ``strength``, ``clip_score``, ``frame``…: what
:func:`~unclip.pipeline.provenance.redo_call` needs to redo the call); ``image.info`` holds the
same as PNG text (strings; the stage settings as JSON).

**Progress:** ``progress(stage, event)`` after every model call, with a
:class:`~unclip.pipeline.events.ProgressEvent` (see :mod:`unclip.pipeline.events`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from unclip.clip.text import TextEncoder
from unclip.pipeline import img2img, mixing
from unclip.pipeline.base import PipelineBase
from unclip.pipeline.config import (
    DEFAULT_REPAINT_JUMP,
    DEFAULT_REPAINT_RESAMPLE,
    MAX_OUTPAINT_MARGIN,
    MAX_REPAINT_RESAMPLE,
    MAX_STEPS,
    PipelineConfig,
)
from unclip.pipeline.events import attach_info, image_info
from unclip.pipeline.images import (
    ImageInput,
    as_image,
    downscale_keep,
    inpaint_inputs,
    outpaint_canvas,
    prepare_image,
    slerp,
    source_name,
    to_pil,
)
from unclip.pipeline.runners import (
    ProgressCallback,
    TextCondition,
    decode,
    stage_generator,
    stage_generators,
    upsample,
)
from unclip.pipeline.settings import (
    DEFAULT_MAX_BATCH,
    check_count,
    check_draw,
    check_prompt,
    check_seed,
)
from unclip.pipeline.stages import Stage, check_stages, is_compiled, resolve_dtype

#: captions whose token ids a pipeline keeps (a server sees many distinct prompts)
TOKEN_CACHE_SIZE = 4096


class UnclipPipeline(PipelineBase):
    """DALL·E 2: caption → z_t → prior → z_i → decoder → upsamplers → image.

    Build with :func:`load_pipeline`. Attributes: ``tokenizer``, ``clip`` (a
    :class:`~unclip.clip.CLIP`), ``prior``/``decoder``/``inpaint_decoder`` (a :class:`Stage`
    or None), ``upsamplers`` (list of :class:`Stage`), ``config`` (the
    :class:`~unclip.pipeline.config.PipelineConfig`), ``device``, ``dtype``.
    See the module docstring for seeds, sampling overrides, outputs and progress; the
    stage glue the capabilities share is :class:`~unclip.pipeline.base.PipelineBase`'s.
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        clip: nn.Module,
        prior: Stage | None,
        decoder: Stage,
        inpaint_decoder: Stage | None = None,
        upsamplers: Sequence[Stage] = (),
        config: PipelineConfig | None = None,
        path: Path | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        offload: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.clip = clip
        #: captions -> CLIP text condition (float32 always; token ids cached per caption)
        self.text_encoder = TextEncoder(clip, tokenizer=tokenizer, cache_size=TOKEN_CACHE_SIZE)
        self.prior = prior
        self.decoder = decoder
        # a decoder trained with the inpainting inputs part of the time (GLIDE §4) paints
        # plain images (nothing known) and edits: it is its own inpainting decoder
        if inpaint_decoder is None and decoder is not None and decoder.model.config.inpaint:
            inpaint_decoder = decoder
        self.inpaint_decoder = inpaint_decoder
        self.upsamplers = list(upsamplers)
        self.config = config or PipelineConfig()
        self.path = path
        self.device = device or torch.device("cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.text_encoder.normalize = not self.raw_embeddings  # z_t as the stages take it
        #: the stages wait on the CPU and each runs on ``device`` only while it samples
        self.offload = offload
        for stage in (prior, decoder, inpaint_decoder, *self.upsamplers):
            for net in stage.networks() if stage is not None else []:
                if offload:
                    net.to("cpu")
                if stage is not prior:  # faster convolutions
                    net.to(memory_format=torch.channels_last)
        #: images sampled together in one batch (see the module docstring on seeds)
        self.max_batch = DEFAULT_MAX_BATCH
        self.name = self.config.name or (path.name if path else "unclip")
        check_stages(self)

    def __repr__(self) -> str:
        ups = " -> ".join(str(u.model.config.image_size) for u in self.upsamplers)
        return (
            f"UnclipPipeline({self.name!r}, {self.base_size}px"
            + (f" -> {ups}px" if ups else "")
            + f", prior={'yes' if self.prior else 'no'}, "
            f"inpaint_decoder={'yes' if self.inpaint_decoder else 'no'}, device={self.device})"
        )

    # -- structure ---------------------------------------------------------------------------

    def compile(self, **options: Any) -> UnclipPipeline:
        """Compile the sampling networks (prior, decoders, upsamplers) with ``torch.compile``
        (``options`` are passed on; on a CPU it needs a C++ compiler). The first call at each
        new batch shape then takes a while (a minute or more per stage on a small CPU); later
        calls run faster (fused GroupNorm/SiLU/residual kernels). Worth it for a server or a
        long batch job, not for one image. Returns the pipeline."""
        for stage in (self.prior, self.decoder, self.inpaint_decoder, *self.upsamplers):
            for net in stage.networks() if stage is not None else []:
                if not is_compiled(net):
                    net.compile(**options)  # in place: same module, same state dict
        return self

    # -- capabilities ------------------------------------------------------------------------

    @torch.no_grad()
    def text_to_image(
        self,
        prompt: str | Sequence[str],
        n: int = 1,
        *,
        seed: int | None = None,
        candidates: int | None = None,
        keep: int | None = None,
        use_prior: bool = True,
        negative_prompt: str | None = None,
        progress: ProgressCallback | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Text to image (DALL·E 2 §2): ``n`` images per prompt, prompt-major order, guided
        away from ``negative_prompt`` if given (see the module docstring).

        ``candidates=N``: draw N images per prompt and return the ``keep`` (default ``n``)
        with the highest CLIP similarity to the prompt, best first (CLIP re-ranking; the
        ``clip_score`` is in each image's info). ``use_prior=False`` feeds the decoder the
        text embedding z_t instead of a prior sample (the paper's §5.1 baseline; also what
        happens when the pipeline has no prior). Image ``p·draw + i`` uses seed ``seed + p·draw
        + i`` where draw = ``candidates`` or ``n``.

        ``generator``: one CPU ``torch.Generator`` every stage of a batch draws from in turn, as
        diffusers' ``UnCLIPPipeline`` draws: a converted Karlo pipeline with the ``karlo`` sampler
        and one batch then draws what diffusers does (the images no longer follow ``seed``).
        """
        prompts, draw, keep = check_draw(prompt, n, candidates, keep)
        settings = self.sampling_settings(**overrides)
        base = check_seed(seed, draw * len(prompts))
        used_prior = use_prior and self.prior is not None
        stages = self._stages_used(*(["prior"] if used_prior else []), "decoder")
        prior = None if used_prior else "none (text embedding)"  # noted in each image's info
        texts = [self._text(t) for t in prompts]
        neg = self._text(negative_prompt, "negative prompt") if negative_prompt else None
        extra = {"prior": prior, "negative_prompt": negative_prompt}
        images: list[Image.Image] = []  # image k: prompt k // draw, seed base + k
        ctx = self._ctx(progress, generator)
        for rows in self._batches(draw * len(prompts)):
            text = TextCondition.cat([texts[k // draw] for k in rows])
            seeds = [base + k for k in rows]
            z = self._sample_prior(text, seeds, settings, progress, use_prior, neg, generator)
            negative = self._negative(neg, seeds, settings, progress, use_prior)
            gens = ctx.generators(seeds, "decoder")
            x = decode(self.decoder, z, text, settings.decoder, gens, ctx, negative=negative)
            x = upsample(self.upsamplers, x, settings.upsampler, seeds, ctx)
            for j, k in enumerate(rows):
                p = prompts[k // draw]
                info = self._info("text_to_image", base + k, settings, stages, prompt=p, **extra)
                images.append(to_pil(x[j : j + 1], info))
        if candidates is None:
            return images
        out: list[Image.Image] = []
        for p, text in enumerate(texts):
            group = images[p * draw : (p + 1) * draw]
            scores = self.encode_image(group) @ self._unit(text.z_t[0])  # as delivered, as `rank`
            for img, score in zip(group, scores.tolist(), strict=True):
                attach_info(img, image_info(img).replace(clip_score=score))
            order = sorted(range(draw), key=lambda j: -scores[j])[:keep]
            out.extend(group[j] for j in order)
        return out

    @torch.no_grad()
    def variations(
        self,
        image: ImageInput,
        n: int = 1,
        *,
        invert: bool = False,
        eta: float | None = None,
        seed: int | None = None,
        negative_prompt: str | None = None,
        progress: ProgressCallback | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Variations of an image (DALL·E 2 §3.1): its CLIP embedding z_i decoded with new
        noise. ``invert=True`` starts every sample from the image's DDIM-inverted x_T and
        samples with DDIM at ``eta`` (default 0.5; η = 0 reconstructs the image), giving
        variations close to the original; otherwise each seed draws fresh noise (``eta``
        default: the pipeline's decoder η). ``negative_prompt`` guides the decoder only;
        ``generator``: as in :meth:`text_to_image` (as diffusers'
        ``UnCLIPImageVariationPipeline`` draws)."""
        img = as_image(image)
        n = check_count(n, "n")
        if eta is not None and not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        neg = self._text(negative_prompt, "negative prompt") if negative_prompt else None
        settings = self.sampling_settings(**overrides)
        base = check_seed(seed, n)
        x_full = prepare_image(img, self.image_size).to(self.device)
        z = self._clip_image(x_full)
        noise = None
        if invert:
            noise = self._invert(x_full, z, settings, progress)
            eta = 0.5 if eta is None else eta
        stages = self._stages_used(*(["prior"] if neg and self.prior else []), "decoder")
        if invert:
            settings = settings.replace(decoder=settings.decoder.replace(sampler="ddim"))
        extra = {"inverted": "true" if invert else None, "eta": None if eta is None else float(eta)}
        extra.update(negative_prompt=negative_prompt, image=source_name(image))
        seeds = [base + i for i in range(n)]
        infos = [self._info("variations", s, settings, stages, **extra) for s in seeds]
        z = z.expand(n, -1)
        return self._frames(z, noise, seeds, settings, progress, infos, eta, neg, generator)

    @torch.no_grad()
    def interpolate(
        self,
        a: ImageInput,
        b: ImageInput,
        frames: int = 5,
        *,
        invert_noise: bool = False,
        seed: int | None = None,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Interpolation between two images (DALL·E 2 §3.2): frame k decodes
        slerp(z_a, z_b, k / (frames - 1)). The decoder noise is the same for every frame
        (drawn from ``seed``), or with ``invert_noise=True`` the slerp of the two images'
        DDIM-inverted x_T, so the end frames reconstruct the inputs."""
        frames = check_count(frames, "frames", 2)
        img_a, img_b = as_image(a, "first image"), as_image(b, "second image")
        settings = self.sampling_settings(**overrides)
        base = check_seed(seed, 1)
        xa = prepare_image(img_a, self.image_size).to(self.device)
        xb = prepare_image(img_b, self.image_size).to(self.device)
        za, zb = self._clip_image(xa), self._clip_image(xb)
        if invert_noise:
            na = self._invert(xa, za, settings, progress)
            nb = self._invert(xb, zb, settings, progress)
        else:
            s = self.base_size
            g = stage_generator(base, "decoder")
            na = nb = torch.randn((1, 3, s, s), generator=g).to(self.device)
        ts = [k / (frames - 1) for k in range(frames)]
        z = torch.cat([slerp(za, zb, t) for t in ts])
        noise = torch.cat([slerp(na, nb, t) for t in ts]) if invert_noise else na
        stages, inv = self._stages_used("decoder"), "true" if invert_noise else None
        extra = [{"frame": k, "t": t, "inverted": inv} for k, t in enumerate(ts)]
        infos = [self._info("interpolate", base, settings, stages, **e) for e in extra]
        return self._frames(z, noise, [base] * frames, settings, progress, infos)

    @torch.no_grad()
    def text_diff(
        self,
        image: ImageInput,
        source: str,
        target: str,
        frames: int = 5,
        *,
        max_theta: float = 0.5,
        invert: bool = True,
        seed: int | None = None,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Text diffs (DALL·E 2 §3.3): move the image's z_i towards the text diff
        z_d = normalize(z_t(target) - z_t(source)): frame k decodes slerp(z_i, z_d, θ_k) with
        θ_k = max_theta · k / (frames - 1) (the paper goes to 0.25–0.5). The decoder noise is
        the image's DDIM-inverted x_T (``invert=True``, as in the paper) or drawn from ``seed``."""
        check_prompt(source, "source caption")
        check_prompt(target, "target caption")
        frames = check_count(frames, "frames", 2)
        if not 0.0 < max_theta <= 1.0:
            raise ValueError(f"max_theta must be in (0, 1], got {max_theta}")
        img = as_image(image)
        settings = self.sampling_settings(**overrides)
        base = check_seed(seed, 1)
        x_full = prepare_image(img, self.image_size).to(self.device)
        z = self._clip_image(x_full)
        diff = self._text(target).z_t - self._text(source).z_t
        if float(diff.norm()) < 1e-6:
            raise ValueError("the source and target captions have the same CLIP embedding")
        z_d = diff / diff.norm(dim=-1, keepdim=True)
        if self.raw_embeddings:  # slerp keeps the image embedding's own norm
            z_d = z_d * z.norm(dim=-1, keepdim=True)
        if invert:
            noise = self._invert(x_full, z, settings, progress)
        else:
            s = self.base_size
            noise = torch.randn((1, 3, s, s), generator=stage_generator(base, "decoder"))
        noise = noise.to(self.device)
        thetas = [max_theta * k / (frames - 1) for k in range(frames)]
        stages, inv = self._stages_used("decoder"), "true" if invert else None
        extra = [
            {"source": source, "target": target, "frame": k, "theta": theta}
            for k, theta in enumerate(thetas)
        ]
        infos = [self._info("text_diff", base, settings, stages, **e, inverted=inv) for e in extra]
        zs = torch.cat([slerp(z, z_d, theta) for theta in thetas])
        return self._frames(zs, noise, [base] * frames, settings, progress, infos)

    @torch.no_grad()
    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput | None,
        prompt: str,
        n: int = 1,
        *,
        seed: int | None = None,
        use_prior: bool = True,
        repaint: bool = False,
        repaint_resample: int = DEFAULT_REPAINT_RESAMPLE,
        repaint_jump: int = DEFAULT_REPAINT_JUMP,
        negative_prompt: str | None = None,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Edit the masked region of an image to fit ``prompt`` (GLIDE §4 / DALL·E 2 edits),
        guided away from ``negative_prompt`` if given.

        ``mask``: same size as ``image``; white or transparent = repaint (see
        ``pipeline.images``). None: the image's own transparent pixels are repainted. The
        inpainting decoder is used when the pipeline has one (unless ``repaint=True``);
        otherwise RePaint (Lugmayr et al. 2022) with the plain decoder, going back up
        ``repaint_jump`` steps ``repaint_resample - 1`` times per jump point. z_i comes
        from the prior given the prompt. The kept pixels of the output equal the input's.
        """
        known_full, keep_full = inpaint_inputs(as_image(image), mask, self.image_size)
        check_prompt(prompt)
        n = check_count(n, "n")
        repaint_resample = check_count(
            repaint_resample, "repaint_resample", 1, MAX_REPAINT_RESAMPLE
        )
        repaint_jump = check_count(repaint_jump, "repaint_jump", 1, MAX_STEPS)
        settings = self.sampling_settings(**overrides)
        base = check_seed(seed, n)
        text = self._text(prompt)
        neg = self._text(negative_prompt, "negative prompt") if negative_prompt else None
        known_full, keep_full = known_full.to(self.device), keep_full.to(self.device)
        known = (self._resize_to_base(known_full), downscale_keep(keep_full, self.base_size))
        with_model = self.inpaint_decoder is not None and not repaint
        decoder = self.inpaint_decoder if with_model else self.decoder
        jump = max(1, min(repaint_jump, settings.decoder.steps // 2))
        options = None if with_model else {"jump_length": jump, "resample": repaint_resample}
        used_prior = use_prior and self.prior is not None
        stages = self._stages_used(*(["prior"] if used_prior else []), "inpaint")
        how = "inpaint_decoder" if with_model else "repaint"
        out: list[Image.Image] = []
        ctx = self._ctx(progress)
        for rows in self._batches(n):
            seeds = [base + i for i in rows]
            texts = TextCondition.cat([text] * len(seeds))
            z = self._sample_prior(texts, seeds, settings, progress, use_prior, neg)
            negative = self._negative(neg, seeds, settings, progress, use_prior)
            gens = stage_generators(seeds, "decoder")
            st, paint = settings.decoder, {"known": known, "repaint": options, "negative": negative}
            x = decode(decoder, z, texts, st, gens, ctx, **paint)
            x = upsample(self.upsamplers, x, settings.upsampler, seeds, ctx)
            x = keep_full * known_full + (1 - keep_full) * x  # known pixels exactly as given
            for j, s in enumerate(seeds):
                extra = {"prompt": prompt, "negative_prompt": negative_prompt, "inpainting": how}
                out.append(
                    to_pil(x[j : j + 1], self._info("inpaint", s, settings, stages, **extra))
                )
        return out

    @torch.no_grad()
    def outpaint(
        self,
        image: ImageInput,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        prompt: str = "",
        n: int = 1,
        **options: Any,
    ) -> list[Image.Image]:
        """Grow the canvas by the margins (pixels of the input image) and paint the new area
        to fit ``prompt``. The grown canvas is centred on a white square (any extra area is
        painted too), the square is resized to the output resolution and inpainted, and the
        result is cropped back to the grown canvas: its longer side is the output size.
        ``options``: the keyword arguments of :meth:`inpaint` (``seed``, ``use_prior``,
        ``repaint``, ``repaint_resample``, ``repaint_jump``, ``negative_prompt``,
        ``progress``, overrides)."""
        img = as_image(image)
        margins = {"left": left, "right": right, "top": top, "bottom": bottom}
        for key, value in margins.items():
            check_count(value, key, 0, MAX_OUTPAINT_MARGIN * max(img.size))
        if not any(margins.values()):
            raise ValueError("outpaint needs a margin: give left, right, top or bottom > 0")
        canvas, mask, crop = outpaint_canvas(img, left, right, top, bottom, self.image_size)
        images = self.inpaint(canvas, mask, prompt, n, **options)
        out = []
        for im in images:
            cropped = im.crop(crop)
            attach_info(cropped, image_info(im).replace(method="outpaint", margins=margins))
            out.append(cropped)
        return out

    # Two capabilities whose bodies live in their own modules (the method is the function).
    mix = torch.no_grad()(mixing.mix)
    image_to_image = torch.no_grad()(img2img.image_to_image)

    @torch.no_grad()
    def scores(self, prompt: str, images: Sequence[ImageInput]) -> Tensor:
        """CLIP cosine similarity of each image with ``prompt``: [N] float32."""
        check_prompt(prompt)
        if not images:
            return torch.zeros(0)
        z_t = self._unit(self._text(prompt).z_t[0])
        return (self.encode_image(list(images)) @ z_t).cpu()

    @torch.no_grad()
    def rank(
        self, prompt: str, images: Sequence[ImageInput], k: int | None = None
    ) -> list[Image.Image]:
        """The ``k`` (default all) images most similar to ``prompt`` under CLIP, best first;
        each copy carries ``clip_score`` and ``rank_index`` (its position in ``images``)."""
        if not images:
            raise ValueError("rank needs at least one image")
        k = len(images) if k is None else check_count(k, "k", 1, len(images))
        pil = [as_image(img) for img in images]
        sims = self.scores(prompt, pil)
        order = torch.argsort(sims, descending=True, stable=True)[:k].tolist()
        out = []
        for j in order:
            info = image_info(pil[j]).replace(
                prompt=prompt, clip_score=float(sims[j]), rank_index=j
            )
            out.append(attach_info(pil[j].copy(), info))
        return out
