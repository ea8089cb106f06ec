"""The stage runners: prior sampling with best-of-N candidates, decoding, upsampling and DDIM
inversion, as plain functions of a :class:`~unclip.pipeline.stages.Stage`, the conditions,
the sampling settings of that stage, the noise generators, and a :class:`RunContext` (device,
precision, progress).

No diffusion maths lives here: the samplers, guidance, inversion and RePaint are
:mod:`unclip.diffusion`'s; a runner builds the model function and the conditions, runs the
sampler inside the stage's precision context and returns the final sample. Each runner
drains its sampler itself (``deque(steps, maxlen=1)``), so a network's ``forward`` sits three
frames below the runner: the sampler's loop, the guide (or the model function), the network.

**Generators.** Noise is drawn from CPU generators: one per image of a batch (row block k
from generator k alone, so an image gets the same noise in any batch; see
:func:`unclip.diffusion.randn`), made from an image's seed and the stage by
:func:`stage_generator`, so the stages draw independent noise. An image sampled in a batch
equals the single call with its seed up to float rounding (the networks run at another batch
size, which may sum in another order: a grey level or so at a few pixels in float32, a few in
bfloat16, whose roundings are coarser). The same call with the same seed gives the same bytes
on the same machine.

**Progress:** ``progress(stage, event)`` is called after every model call with the stage
name and a :class:`~unclip.pipeline.events.ProgressEvent` (made here by :func:`step_event`,
the one place that knows how many images a step draws).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.allocator import keep_freed_memory
from unclip.diffusion import (
    SAMPLERS,
    SampleStep,
    classifier_free_guidance,
    ddim_invert,
    randn,
    repaint_sample,
)
from unclip.pipeline.config import DecoderSampling, PriorSampling, UpsamplerSampling, upsampler_name
from unclip.pipeline.events import ProgressCallback, ProgressEvent
from unclip.pipeline.stages import Stage

Generators = torch.Generator | Sequence[torch.Generator]

_STAGE_IDS = {"prior": 1, "decoder": 2, "upsampler": 3, "negative_prior": 4}


@dataclass(frozen=True)
class RunContext:
    """Where a pipeline call runs its stages: ``device``, ``dtype`` (the networks' autocast
    precision; float32 = none) and ``progress`` (the call's callback, or None).
    ``generator``: one CPU generator that every stage of a batch draws from in turn, in place
    of the seeds' (:meth:`generators`), as diffusers' unCLIP pipelines draw; None: the seeds'.
    ``offload``: the stages' networks wait on the CPU and only the running one is on
    ``device`` (:func:`running`).
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    progress: ProgressCallback | None = None
    generator: torch.Generator | None = None
    offload: bool = False

    def generators(self, seeds: int | Sequence[int], stage: str) -> Generators:
        """The noise generators of ``stage`` for a batch of ``seeds``: the context's one
        generator, or one :func:`stage_generator` per seed."""
        return self.generator or stage_generators(seeds, stage)


@dataclass
class TextCondition:
    """Captions encoded by CLIP, one row each (N = 1 for one caption): z_t [N, D] (unit norm),
    per-token features tokens [N, L, W] and mask [N, L] (True up to and including the end
    token; both None where a prior is conditioned on z_t alone). ``text`` is the caption (the
    first one's for N > 1)."""

    text: str
    z_t: Tensor
    tokens: Tensor | None
    mask: Tensor | None

    @staticmethod
    def cat(rows: Sequence[TextCondition]) -> TextCondition:
        """The conditions stacked along dim 0 (each still encoded on its own)."""
        return TextCondition(
            rows[0].text,
            torch.cat([r.z_t for r in rows]),
            torch.cat([r.tokens for r in rows]),
            torch.cat([r.mask for r in rows]),
        )


@dataclass
class NegativeCondition:
    """A negative prompt for N images: its caption ``text`` [N] and its image embedding z_i
    [N, D] (sampled from the prior with the negative caption). Classifier-free guidance then
    steers away from it: the prior's guidance uses the negative caption in place of the null
    one, the decoder's the negative's z_i and caption tokens in place of the null ones."""

    text: TextCondition
    z_i: Tensor


# ---------------------------------------------------------------------------------------------
# Generators, precision, model functions


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """A CPU generator for one stage of one image, seeded from (seed, stage) by NumPy's
    ``SeedSequence``, so the stages draw independent noise and no stage's step count shifts
    another stage's noise."""
    stage_id = _STAGE_IDS.get(stage) or 100 + int(stage.removeprefix("upsampler") or 1)
    state = np.random.SeedSequence([seed, stage_id]).generate_state(2, np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def stage_generators(seeds: int | Sequence[int], stage: str) -> list[torch.Generator]:
    """One :func:`stage_generator` per image of a batch (a sampler draws row k's noise with
    generator k alone, so an image gets the same noise in any batch)."""
    return [stage_generator(s, stage) for s in ([seeds] if isinstance(seeds, int) else seeds)]


def _step_images(stage: str, step: Any) -> int:
    """How many images a progress call's step is drawing: the batch size for the image stages
    (decoder, inpaint, upsamplers), 1 for the others (the prior's rows are candidates)."""
    x = getattr(step, "x", None)
    image_stage = stage in ("decoder", "inpaint") or stage.startswith("upsampler")
    return int(x.shape[0]) if image_stage and isinstance(x, Tensor) and x.dim() == 4 else 1


def step_event(stage: str, step: SampleStep) -> ProgressEvent:
    """The :class:`~unclip.pipeline.events.ProgressEvent` of a sampler step of ``stage``."""
    return ProgressEvent(stage, int(step.index), int(step.total), _step_images(stage, step), step)


def stage_callback(
    progress: ProgressCallback | None, stage: str
) -> Callable[[SampleStep], None] | None:
    """A sampler's ``progress(step)`` callback that reports ``stage``'s steps to ``progress``
    as events (None when there is no ``progress``)."""
    if progress is None:
        return None
    return lambda step: progress(stage, step_event(stage, step))


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Mixed precision for ``dtype`` float16/bfloat16; a no-op context for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _on(net: nn.Module, device: torch.device) -> bool:
    """Whether ``net``'s weights are on ``device`` (``cuda`` matches any ``cuda:N``)."""
    where = next(net.parameters()).device
    return where.type == device.type and device.index in (None, where.index)


@contextmanager
def _on_device(nets: Sequence[nn.Module], ctx: RunContext) -> Iterator[None]:
    """With ``ctx.offload``, ``nets`` on ``ctx.device`` for the block and back on the CPU
    after it (a network already there stays: the contexts nest); without, nothing."""
    moved = [net for net in nets if ctx.offload and not _on(net, ctx.device)]
    for net in moved:
        net.to(ctx.device)
    try:
        yield
    finally:
        for net in moved:
            net.to("cpu")


@contextmanager
def running(stage: Stage, ctx: RunContext) -> Iterator[None]:
    """The context a whole sampler run of ``stage`` goes in: with ``ctx.offload`` its networks
    on ``ctx.device`` (and back on the CPU after); one autocast context in ``ctx.dtype``, so
    each weight is cast to the low precision once per run rather than at every model call
    (autocast caches casts until its outermost context exits); and each network's
    ``frozen_weights`` context where it has one (a UNet's tensors derived from its weights,
    built once per run). The first run of the process keeps freed host memory for reuse
    (:mod:`unclip.allocator`)."""
    keep_freed_memory()
    nets = stage.networks()
    with ExitStack() as stack:
        stack.enter_context(_on_device(nets, ctx))
        stack.enter_context(autocast(ctx.device, ctx.dtype))
        for net in nets:
            frozen = getattr(net, "frozen_weights", None)
            if frozen is not None:
                stack.enter_context(frozen())
        yield


def model_fn(model: Callable[..., Tensor], **fixed: Any) -> Callable[..., Tensor]:
    """The network as a diffusion model function with float32 output and the keyword
    arguments ``fixed`` bound; it runs in the precision of the context around the sampler
    (:func:`running`)."""

    def fn(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return model(x, t, **fixed, **kwargs).float()

    return fn


def guided(
    model: Callable[..., Tensor],
    guidance: float,
    cond: dict[str, Any],
    uncond: dict[str, Any],
    learn_sigma: bool,
) -> Callable[..., Tensor]:
    """Classifier-free guidance of ``model`` (a network or model function), which the guide
    calls itself (its output in the sampler's float32); at scale 1 the plain conditional model
    function (one pass)."""
    if guidance == 1.0:
        return model_fn(model, **cond)
    return classifier_free_guidance(model, guidance, cond, uncond, learn_sigma=learn_sigma)


def sampler_steps(
    name: str,
    stage: Stage,
    fn: Callable[..., Tensor],
    start: tuple[int, ...] | Tensor,
    sampler: str,
    steps: int | None,
    eta: float,
    generator: Generators,
    ctx: RunContext,
    **options: Any,
) -> Iterator[SampleStep]:
    """The sampler ``sampler`` of stage ``name`` over ``fn`` from ``start`` (a shape: noise
    drawn from ``generator``; or x_T) on ``ctx.device``, reporting to ``ctx.progress``, as the
    generator of its steps (not yet run)."""
    if sampler == "ddim":
        options["eta"] = eta
    callback = stage_callback(ctx.progress, name)
    return SAMPLERS[sampler](
        stage.diffusion, fn, start, steps, generator=generator, progress=callback,
        device=ctx.device, **options,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The stages


def sample_prior(
    prior: Stage,
    text: TextCondition,
    settings: PriorSampling,
    generator: Generators,
    ctx: RunContext,
    *,
    negative: TextCondition | None = None,
    name: str = "prior",
) -> Tensor:
    """z_i [N, D] (unit norm) for N captions: ``settings.candidates`` samples per caption, and
    the one with the highest z_i·z_t kept (DALL·E 2 §2.2). The one prior sampler of the
    pipeline and of ``unclip eval prior``.

    ``negative`` [N]: a diffusion prior's guidance uses these captions' condition in place of
    the null one (a negative prompt; an autoregressive prior ignores it). ``name``: the stage
    name its progress events carry.

    ``text`` [N] conditions the prior (z_t, and the token features where the prior reads
    them). A diffusion prior draws the N·C rows as one batch; an autoregressive one
    (``prior.diffusion`` None) samples codes, guided on the logits by ``settings.ar_guidance``.
    ``generator``: one per caption (caption j's candidates from generator j alone, so a
    caption gets the same sample in any batch) or one for the whole batch.
    """
    from unclip.prior import unscale_embedding

    model, st, z_t = prior.model, settings, text.z_t
    n, c = z_t.shape[0], st.candidates
    with running(prior, ctx):  # the caption caches too, in the steps' dtype
        if prior.diffusion is None:
            z = _sample_ar(prior, text, st, generator, ctx).view(n, c, -1)
        else:
            cond, uncond = model.sampling_conditions(*_candidate_rows(text, c))  # [n·c] rows
            if negative is not None:  # the negative caption's condition replaces the null one
                uncond = model.sampling_conditions(*_candidate_rows(negative, c))[0]
            fn = guided(model, st.guidance, cond, uncond, False)
            shape = (n * c, model.config.clip_dim)
            steps = sampler_steps(
                name, prior, fn, shape, st.sampler, st.steps, st.eta, generator, ctx
            )
            x = deque(steps, maxlen=1).pop().x
            if model.config.embeddings == "raw":  # a raw CLIP image embedding, as Karlo's
                z = model.from_latent(x).view(n, c, -1)
                cos = (F.normalize(z, dim=-1) * F.normalize(z_t, dim=-1)[:, None]).sum(-1)
                best = cos.argmax(1)
                return z[torch.arange(n, device=z.device), best]  # [n, D]
            z = unscale_embedding(x, model.embed_scale).view(n, c, -1)  # unit norm
        best = (z * z_t[:, None]).sum(-1).argmax(1)  # DALL·E 2: keep the higher z_i · z_t
        return z[torch.arange(n, device=z.device), best]  # [n, D]


def _candidate_rows(text: TextCondition, c: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(z_t, tokens, mask) of ``text`` [N] with every row repeated ``c`` times: [N·c, ...]."""
    tokens, mask = text.tokens, text.mask
    return (
        text.z_t.repeat_interleave(c, 0),
        None if tokens is None else tokens.repeat_interleave(c, 0),
        None if mask is None else mask.repeat_interleave(c, 0),
    )


def _sample_ar(
    prior: Stage, text: TextCondition, st: PriorSampling, generator: Generators, ctx: RunContext
) -> Tensor:
    """Codes of an autoregressive prior, ``st.candidates`` rows per caption, as unit-norm z_i
    [N·C, D]; caption groups drawn with their own generator when there is one per caption."""
    model, z_t, c = prior.model, text.z_t, st.candidates
    n, k_total = z_t.shape[0], model.config.components
    tokens, mask = (text.tokens, text.mask) if model.config.text_dim else (None, None)

    def callback(k: int, codes: Tensor) -> None:
        if ctx.progress is not None:
            x = codes.float()
            ctx.progress(
                "prior", step_event("prior", SampleStep(k, k_total, k_total - 1 - k, x, x))
            )

    one = isinstance(generator, torch.Generator)
    groups = [range(n)] if one else [range(j, j + 1) for j in range(n)]
    gens = [generator] if one else list(generator)
    rows = []
    for part, g in zip(groups, gens, strict=True):
        sel = slice(part.start, part.stop)
        rows.append(model.sample(  # in the autocast of running(), around sample_prior's run
            z_t[sel].repeat_interleave(c, 0),
            None if tokens is None else tokens[sel].repeat_interleave(c, 0),
            None if mask is None else mask[sel].repeat_interleave(c, 0),
            guidance=st.ar_guidance, temperature=st.temperature, top_k=st.top_k,
            top_p=st.top_p, generator=g, callback=callback,
        ))  # fmt: skip
    return F.normalize(torch.cat(rows).float(), dim=-1)


def decoder_conditions(
    model: nn.Module,
    z_i: Tensor,
    text: TextCondition | None,
    negative: NegativeCondition | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cond, uncond) model kwargs of a decoder for z_i [N, D] and ``text`` [N] (or None);
    uncond drops z_i and the caption, or with a ``negative`` [N] is the negative's z_i and
    caption (a caption-free cond then reads the negative's tokens dropped: the null caption,
    so both sides have the same keys). A decoder that also takes z_t (``text_emb_dim``, as
    Karlo's) gets ``text.z_t`` (the negative's in the negative's uncond)."""
    reads_text = bool(model.config.text_dim)
    reads_emb = bool(getattr(model.config, "text_emb_dim", 0))
    cond: dict[str, Any] = {"image_emb": z_i}
    if text is not None and reads_text:
        cond["text_tokens"] = text.tokens
        cond["text_mask"] = text.mask
    if text is not None and reads_emb:
        cond["text_emb"] = text.z_t
    uncond = dict(cond)
    yes = torch.ones(z_i.shape[0], dtype=torch.bool, device=z_i.device)
    cond["drop_image_emb"] = cond["drop_text"] = ~yes
    uncond["drop_image_emb"] = uncond["drop_text"] = yes
    if negative is None:
        return cond, uncond
    uncond = {"image_emb": negative.z_i, "drop_image_emb": ~yes, "drop_text": ~yes}
    if reads_text:
        uncond["text_tokens"], uncond["text_mask"] = negative.text.tokens, negative.text.mask
    if reads_emb:
        uncond["text_emb"] = negative.text.z_t
    if text is None and (reads_text or reads_emb):
        cond.update({k: v for k, v in uncond.items() if k.startswith("text_")}, drop_text=yes)
    return cond, uncond


def decode(
    decoder: Stage,
    z_i: Tensor,
    text: TextCondition | None,
    settings: DecoderSampling,
    generator: Generators,
    ctx: RunContext,
    *,
    noise: Tensor | None = None,
    known: tuple[Tensor, Tensor] | None = None,
    repaint: dict[str, int] | None = None,
    eta: float | None = None,
    negative: NegativeCondition | None = None,
    timesteps: Sequence[int] | None = None,
) -> Tensor:
    """Decode z_i [N, D] (``text`` [N] or None) to images [N, 3, s, s] at the decoder's
    resolution, as one batch.

    ``noise``: x_T [N or 1, 3, s, s] (None: drawn from ``generator``); ``eta``: DDIM η in place
    of the settings' (None: keep); ``negative`` [N]: guide away from it
    (:func:`decoder_conditions`); ``timesteps``: the timesteps to visit in place of the
    settings' steps (SDEdit: ``noise`` is then the input noised to the first, see
    :func:`sdedit_start`). ``known``: (image [1, 3, s, s], keep mask [1, 1, s, s]) to
    inpaint, and the known pixels are kept exactly: given to ``decoder`` as its inpainting
    inputs (GLIDE §4), or with ``repaint`` (the options of
    :func:`~unclip.diffusion.repaint_sample`) by RePaint with a plain decoder.
    """
    st, model = settings, decoder.model
    n = z_i.shape[0]
    cond, uncond = decoder_conditions(model, z_i, text, negative)
    if known is not None:
        known = (known[0].expand(n, -1, -1, -1), known[1].expand(n, -1, -1, -1))
        if repaint is None:
            for kw in (cond, uncond):
                kw["inpaint_image"], kw["inpaint_mask"] = known[0], known[1]
    fn = guided(model, st.guidance, cond, uncond, decoder.diffusion.learn_sigma)
    s = model.config.image_size
    start = noise.expand(n, -1, -1, -1) if noise is not None else (n, 3, s, s)
    if known is not None and repaint is not None:
        steps = repaint_sample(
            decoder.diffusion, fn, start, st.steps, x_known=known[0], keep_mask=known[1],
            generator=generator, device=ctx.device, **repaint,
            progress=stage_callback(ctx.progress, "inpaint"),
        )  # fmt: skip
    else:
        name = "decoder" if known is None else "inpaint"
        eta = st.eta if eta is None else eta
        count, extra = (st.steps, {}) if timesteps is None else (None, {"timesteps": timesteps})
        steps = sampler_steps(
            name, decoder, fn, start, st.sampler, count, eta, generator, ctx, **extra
        )
    with running(decoder, ctx):
        x = deque(steps, maxlen=1).pop().x
    if known is not None and repaint is None:  # keep the known pixels exactly
        x = known[1] * known[0] + (1 - known[1]) * x
    return x


def invert(
    decoder: Stage,
    image: Tensor,
    z_i: Tensor,
    steps: int,
    ctx: RunContext,
) -> Tensor:
    """x_T [1, 3, s, s] of an image [1, 3, s, s] by DDIM inversion of the decoder in
    ``steps`` steps, conditioned on its own z_i (no guidance: inverting a guided model is
    unstable)."""
    cond, _ = decoder_conditions(decoder.model, z_i, None)
    callback = stage_callback(ctx.progress, "invert")
    fn = model_fn(decoder.model, **cond)
    run = ddim_invert(
        decoder.diffusion, fn, image.to(ctx.device), steps, progress=callback, device=ctx.device
    )
    with running(decoder, ctx):
        return deque(run, maxlen=1).pop().x


def sdedit_start(
    stage: Stage,
    x0: Tensor,
    strength: float,
    steps: int,
    generator: Generators,
    device: torch.device,
) -> tuple[Tensor, list[int]]:
    """SDEdit (Meng et al. 2022): (the start x_t0 [N, ...] on ``device``, the timesteps to
    visit) for images x0 [N, ...] in [-1, 1] noised to t0 = round(strength · (T - 1)) of the
    stage's schedule, with noise drawn from ``generator`` on the CPU (row k from generator k:
    the draw a sampler makes for its own x_T), and ``steps`` timesteps from t0 down to 0
    (evenly spaced, repeats merged). Strength 0 is the single step at t = 0."""
    t0 = round(strength * (stage.diffusion.num_timesteps - 1))
    ts = torch.linspace(t0, 0, steps).round().long().tolist()
    noise = randn(x0.shape, generator)  # on the CPU, row k from generator k
    t = torch.full((x0.shape[0],), t0, dtype=torch.long)
    start = stage.diffusion.q_sample(x0.cpu(), t, noise.cpu()).to(device)
    return start, sorted(set(ts), reverse=True)


def upsample(
    upsamplers: Sequence[Stage],
    x: Tensor,
    settings: UpsamplerSampling,
    seeds: Sequence[int],
    ctx: RunContext,
) -> Tensor:
    """Run the upsamplers in turn on a batch, image k with ``seeds[k]``: [N, 3, s, s] ->
    [N, 3, S, S]. A stage trained with the (deterministic) blur augmentation gets the same
    blur on its input, as in training; random (BSR) degradation is a training-only
    corruption and is not applied. ``settings.strength`` < 1 starts from the noised bicubic
    enlargement (SDEdit, Meng et al. 2022). A stage with a ``last_step`` network runs it for
    the step at t = 0 (Karlo's ``super_res_last``)."""
    from unclip.decoder.upsampler import gaussian_blur

    st = settings
    for k, up in enumerate(upsamplers):
        cfg = up.model.config
        low = x.clamp(-1.0, 1.0)
        if cfg.augment == "blur":
            low = gaussian_blur(low, cfg.blur_kernel, cfg.blur_sigma)
        side = low.shape[-1] * cfg.image_size // cfg.low_res_size
        name = upsampler_name(k)
        gens = ctx.generators(seeds, name)
        start: tuple[int, ...] | Tensor = (x.shape[0], 3, side, side)
        steps: int | None = st.steps
        extra: dict[str, Any] = {}
        if st.strength < 1.0:  # SDEdit: start from the noised bicubic enlargement
            big = F.interpolate(x.clamp(-1, 1), size=(side, side), mode="bicubic")
            start, extra["timesteps"] = sdedit_start(
                up, big.clamp(-1, 1), st.strength, st.steps, gens, ctx.device
            )
            steps = None
        fn = model_fn(up.model, low_res=low)
        if up.last_step is not None:
            fn = last_step_switch(fn, model_fn(up.last_step, low_res=low))
        run = sampler_steps(name, up, fn, start, st.sampler, steps, st.eta, gens, ctx, **extra)
        with running(up, ctx):
            x = deque(run, maxlen=1).pop().x
    return x


def last_step_switch(
    fn: Callable[..., Tensor], last: Callable[..., Tensor]
) -> Callable[..., Tensor]:
    """A model function that calls ``last`` where every row is at t = 0 (the last sampling
    step) and ``fn`` elsewhere."""

    def switched(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return (last if bool((t == 0).all()) else fn)(x, t, **kwargs)

    return switched
