"""Samplers: DDPM ancestral, DDIM (η), DDIM inversion and DPM-Solver++(2M).

Every sampler has one signature::

    sampler(diffusion, model_fn, shape_or_noise, steps=None, *, timesteps=None,
            spacing="trailing", generator=None, model_kwargs=None, clip_denoised=None,
            dynamic_threshold=None, progress=None, device=None, dtype=None, **options)
        -> Iterator[SampleStep]

and is a generator that yields a :class:`SampleStep` after each model call, so the CLI's
progress bar, the server's progress events and the tests consume the same stream;
:func:`final` drains one and returns the last ``x``, and :func:`sample` does both by name.

- ``shape_or_noise``: the starting noise x_T (a Tensor [N, ...]) or a shape to draw it from
  with ``generator`` (on ``device``, in ``dtype``, default float32).
- ``steps``: how many model calls; the timesteps are chosen with
  :func:`~unclip.diffusion.schedules.space_timesteps` and ``spacing`` ("trailing" by default:
  the first step is at T-1, where pure noise belongs). Or give ``timesteps`` explicitly (original
  timesteps, strictly descending). Neither: all T timesteps. Every run ends at ᾱ = 1 (x₀).
- ``generator``: every random draw uses it, so a seed gives the same samples; a list of K
  generators gives each of K samples of a batch its own (see :func:`~.gaussian.randn`).
- ``clip_denoised``/``dynamic_threshold``: x₀ clipping / Imagen thresholding; None → the
  diffusion's defaults.
- ``progress``: called with each :class:`SampleStep` just before it is yielded.

Step counts are arguments, never state: one diffusion object serves any number of concurrent
requests. Each step runs under ``torch.no_grad()`` (not held across ``yield``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, Generators, ModelFn, randn, randn_like
from .schedules import Spacing, space_timesteps

ProgressFn = Callable[["SampleStep"], None]


@dataclasses.dataclass
class SampleStep:
    """One step of a sampler.

    index: 0-based number of this step; total: steps in this run; timestep: the original
    timestep the model was called with; x: the sample after the step [N, ...];
    pred_x0: the model's (clipped) x₀ prediction at this step [N, ...].
    """

    index: int
    total: int
    timestep: int
    x: Tensor
    pred_x0: Tensor


def final(steps: Iterable[SampleStep]) -> Tensor:
    """Drain a sampler and return its last ``x``."""
    last = None
    for last in steps:  # noqa: B007
        pass
    if last is None:
        raise ValueError("the sampler yielded no steps")
    return last.x


def sampling_timesteps(
    diffusion: GaussianDiffusion,
    steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    spacing: Spacing = "trailing",
) -> list[int]:
    """The timesteps (indices of ``diffusion``) a sampler visits, descending.

    ``timesteps`` wins if given (checked: strictly descending, in range); else ``steps``
    spaced with ``spacing``; else all of them.
    """
    n = diffusion.num_timesteps
    if timesteps is not None:
        if steps is not None and steps != len(timesteps):
            raise ValueError(f"steps={steps} but {len(timesteps)} timesteps were given")
        ts = [int(t) for t in timesteps]
        if not ts:
            raise ValueError("timesteps must not be empty")
        if any(a <= b for a, b in itertools.pairwise(ts)):
            raise ValueError(f"timesteps must be strictly descending, got {ts}")
        if ts[0] >= n or ts[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {n - 1}], got {ts}")
        return ts
    if steps is None:
        return list(range(n - 1, -1, -1))
    return space_timesteps(n, steps, spacing)


def initial_noise(
    shape_or_noise: Sequence[int] | Tensor,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The starting x_T: the tensor itself, or standard normal noise of that shape."""
    if isinstance(shape_or_noise, Tensor):
        x = shape_or_noise
        return x if device is None and dtype is None else x.to(device=device, dtype=dtype)
    return randn(tuple(shape_or_noise), generator, device, dtype or torch.float32)


def respaced_start(
    diffusion: GaussianDiffusion,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None,
    timesteps: Sequence[int] | None,
    spacing: Spacing,
    generator: Generators,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> tuple[GaussianDiffusion, Tensor]:
    """The prologue every sampler shares: the diffusion respaced to the sampling timesteps
    (:func:`sampling_timesteps`) and the starting x [N, ...] (:func:`initial_noise`)."""
    d = diffusion.respace(sampling_timesteps(diffusion, steps, timesteps, spacing))
    return d, initial_noise(shape_or_noise, generator, device, dtype)


def _full(i: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)


def _predict(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x: Tensor,
    i: int,
    model_kwargs: dict[str, Any] | None,
    clip_denoised: bool | None,
    dynamic_threshold: float | None,
) -> tuple[Tensor, Tensor]:
    """(x₀, ε) of the model at respaced index i."""
    t = _full(i, x)
    output = model_fn(x, d.model_timesteps(t), **(model_kwargs or {}))
    pred, _ = d.split_output(output, x)
    return d.x0_and_eps(pred, x, t, clip_denoised, dynamic_threshold)


def _emit(step: SampleStep, progress: ProgressFn | None) -> SampleStep:
    if progress is not None:
        progress(step)
    return step


# ---------------------------------------------------------------------------------------------


def ddpm_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    spacing: Spacing = "trailing",
    generator: Generators = None,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool | None = None,
    dynamic_threshold: float | None = None,
    progress: ProgressFn | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[SampleStep]:
    """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2).

    The variance is the learned range (IDDPM Eq. 15) with ``learn_sigma``, else the
    diffusion's fixed one. With fewer steps the process is respaced (IDDPM §4). Noise is drawn
    at every step except the last.
    """
    d, x = respaced_start(
        diffusion, shape_or_noise, steps, timesteps, spacing, generator, device, dtype
    )
    return _ddpm_loop(
        d, model_fn, x, generator, model_kwargs, clip_denoised, dynamic_threshold, progress
    )


def _ddpm_loop(d, model_fn, x, generator, model_kwargs, clip, threshold, progress):
    total = d.num_timesteps
    for n, i in enumerate(range(total - 1, -1, -1)):
        with torch.no_grad():
            t = _full(i, x)
            out = d.p_mean_variance(model_fn, x, t, model_kwargs, clip, threshold)
            x = out["mean"]
            if i > 0:
                x = x + torch.exp(0.5 * out["log_variance"]) * randn_like(x, generator)
        timestep = int(d.schedule.timestep_map[i])
        yield _emit(SampleStep(n, total, timestep, x, out["pred_x0"]), progress)


def ddim_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    spacing: Spacing = "trailing",
    eta: float = 0.0,
    generator: Generators = None,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool | None = None,
    dynamic_threshold: float | None = None,
    progress: ProgressFn | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[SampleStep]:
    """DDIM (Song et al. 2021, Eq. 12): deterministic for η = 0, DDPM-like for η = 1.

    x_{t-1} = √ᾱ_{t-1} x̂₀ + √(1 - ᾱ_{t-1} - σ²) ε̂ + σ z, with
    σ = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t-1}) (Eq. 16). When x̂₀ is clipped, ε̂ is
    recomputed from it. With η > 0 noise is drawn at every step (also the last, where σ = 0).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    d, x = respaced_start(
        diffusion, shape_or_noise, steps, timesteps, spacing, generator, device, dtype
    )
    return _ddim_loop(
        d, model_fn, x, eta, generator, model_kwargs, clip_denoised, dynamic_threshold, progress
    )


def _ddim_loop(d, model_fn, x, eta, generator, model_kwargs, clip, threshold, progress):
    s = d.schedule
    total = d.num_timesteps
    for n, i in enumerate(range(total - 1, -1, -1)):
        with torch.no_grad():
            x0, eps = _predict(d, model_fn, x, i, model_kwargs, clip, threshold)
            abar, abar_prev = float(s.alphas_cumprod[i]), float(s.alphas_cumprod_prev[i])
            sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
            if eta > 0:
                x = x + sigma * randn_like(x, generator)
        timestep = int(s.timestep_map[i])
        yield _emit(SampleStep(n, total, timestep, x, x0), progress)


def ddim_invert(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x0: Tensor,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    spacing: Spacing = "trailing",
    generator: Generators = None,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool = False,
    dynamic_threshold: float = 0.0,
    progress: ProgressFn | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    fixed_point_iters: int = 1,
) -> Iterator[SampleStep]:
    """Deterministic DDIM inversion: run the η = 0 ODE from a clean x₀ up to x_T (image → noise).

    Visits the same timesteps as :func:`ddim_sample` with the same arguments, in reverse, so
    ``final(ddim_sample(d, f, final(ddim_invert(d, f, x0, k)), k))`` ≈ x0 (Song et al. 2021
    §4.3; Dhariwal & Nichol 2021 App. F). Step k goes from the level t_{k-1} (ᾱ = 1 for the
    clean input) to t_k. Plain inversion evaluates the model at the current level
    (x_{t_{k-1}}, t_{k-1}; x₀ with t_0 on the first step) where the sampler will use
    (x_{t_k}, t_k); ``fixed_point_iters`` > 0 then refines x_{t_k} by fixed-point iteration
    of the DDIM step's inverse, x_{t_k} ← √ᾱ_k x̂₀ + √(1-ᾱ_k) ε(x_{t_k}, t_k) with
    x̂₀ = (x_{t_{k-1}} - √(1-ᾱ_{k-1}) ε) / √ᾱ_{k-1} (Pan et al. 2023, "AIDI"), making the
    inversion (nearly) the exact inverse of :func:`ddim_sample`. Each iteration costs one more
    model call per step; 0 gives the classic explicit inversion.

    x0: [N, ...]. The yielded ``x`` is the latent after each step; the last one is x_T.
    Clipping is off by default (it would make the map non-invertible): for an exact round trip
    sample back with ``clip_denoised=False`` too. ``generator`` is unused.
    """
    del generator  # deterministic; kept for the common signature
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
    d, x = respaced_start(diffusion, x0, steps, timesteps, spacing, None, device, dtype)
    return _invert_loop(
        d, model_fn, x, model_kwargs, clip_denoised, dynamic_threshold, progress, fixed_point_iters
    )


def _invert_loop(d, model_fn, x, model_kwargs, clip, threshold, progress, iters):
    s = d.schedule
    total = d.num_timesteps
    for k in range(total):
        with torch.no_grad():
            x_cur = x
            abar_cur = float(s.alphas_cumprod[k - 1]) if k > 0 else 1.0
            abar = float(s.alphas_cumprod[k])
            x0, eps = _predict(d, model_fn, x_cur, max(k - 1, 0), model_kwargs, clip, threshold)
            if k == 0:
                x0 = x_cur  # the input is clean: ᾱ = 1
            x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
            for _ in range(iters):
                _, eps = _predict(d, model_fn, x, k, model_kwargs, clip, threshold)
                x0 = (x_cur - math.sqrt(1 - abar_cur) * eps) / math.sqrt(abar_cur)
                x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
        timestep = int(s.timestep_map[k if iters else max(k - 1, 0)])
        yield _emit(SampleStep(k, total, timestep, x, x0), progress)


def dpmpp_2m_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    spacing: Spacing = "trailing",
    generator: Generators = None,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool | None = None,
    dynamic_threshold: float | None = None,
    progress: ProgressFn | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[SampleStep]:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022b,
    Algorithm 2) for few-step sampling (10–25 steps).

    With α = √ᾱ, σ = √(1-ᾱ), λ = log(α/σ), h = λ_next - λ_cur:
    x_next = (σ_next/σ_cur) x - α_next (e^{-h} - 1) D, where D = x̂₀ on the first step and
    D = x̂₀ + (x̂₀ - x̂₀_prev) / (2r), r = h_prev/h, afterwards. The last step goes to σ = 0 and
    returns x̂₀ (first order, as diffusers' ``lower_order_final``/``final_sigmas_type="zero"``).
    Deterministic; ``generator`` only draws the starting noise when a shape is given.
    """
    d, x = respaced_start(
        diffusion, shape_or_noise, steps, timesteps, spacing, generator, device, dtype
    )
    return _dpmpp_2m_loop(d, model_fn, x, model_kwargs, clip_denoised, dynamic_threshold, progress)


def _dpmpp_2m_loop(d, model_fn, x, model_kwargs, clip, threshold, progress):
    s = d.schedule
    total = d.num_timesteps

    def alpha_sigma_lambda(abar: float) -> tuple[float, float, float]:
        alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
        return alpha, sigma, 0.5 * (math.log(abar) - math.log1p(-abar))

    x0_prev: Tensor | None = None
    h_prev = 0.0
    for n, i in enumerate(range(total - 1, -1, -1)):
        with torch.no_grad():
            x0, _ = _predict(d, model_fn, x, i, model_kwargs, clip, threshold)
            if i == 0:  # to σ = 0: the solution is the data prediction itself
                x = x0
            else:
                _, sigma_s, lam_s = alpha_sigma_lambda(float(s.alphas_cumprod[i]))
                alpha_t, sigma_t, lam_t = alpha_sigma_lambda(float(s.alphas_cumprod[i - 1]))
                h = lam_t - lam_s
                if x0_prev is None:
                    D = x0
                else:
                    r = h_prev / h
                    D = x0 + (x0 - x0_prev) / (2.0 * r)
                x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * D
                h_prev = h
            x0_prev = x0
        timestep = int(s.timestep_map[i])
        yield _emit(SampleStep(n, total, timestep, x, x0), progress)


SAMPLERS: dict[str, Callable[..., Iterator[SampleStep]]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpmpp_2m": dpmpp_2m_sample,
}
"""Samplers by name (``sample(..., sampler=name)``): ``ddpm``, ``ddim``, ``dpmpp_2m``."""


def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None = None,
    *,
    sampler: str = "ddim",
    **kwargs: Any,
) -> Tensor:
    """Run a sampler from :data:`SAMPLERS` to the end and return the final x [N, ...]."""
    try:
        fn = SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}") from None
    return final(fn(diffusion, model_fn, shape_or_noise, steps, **kwargs))
