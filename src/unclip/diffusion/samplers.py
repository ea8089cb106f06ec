"""Samplers: DDPM ancestral, DDIM (η), DDIM inversion and DPM-Solver++(2M).

Every sampler has one signature::

    sampler(diffusion, model_fn, shape_or_noise, steps=None, *, <its own options>,
            **options: Unpack[SamplerOptions]) -> Iterator[SampleStep]

and is a generator that yields a :class:`SampleStep` after each model call, so the CLI's
progress bar, the server's progress events and the tests consume the same stream;
:func:`final` drains one and returns the last ``x``, and :func:`sample` does both by name.
Its arguments are checked and its start noise drawn when it is called, before the first step.

- ``shape_or_noise``: the starting noise x_T (a Tensor [N, ...]) or a shape to draw it from
  with ``generator`` (on ``device``, in ``dtype``, default float32).
- ``steps``: how many model calls; the timesteps are chosen with
  :func:`~unclip.diffusion.schedules.space_timesteps` and ``spacing`` ("trailing" by default:
  the first step is at T-1, where pure noise belongs). Or give ``timesteps`` explicitly (original
  timesteps, strictly descending). Neither: all T timesteps. Every run ends at ᾱ = 1 (x₀).
- ``options`` (:class:`SamplerOptions`, the same for every sampler): ``timesteps``,
  ``spacing``; ``generator``: every random draw uses it, so a seed gives the same samples; a
  list of K generators gives each of K samples of a batch its own (see
  :func:`~.gaussian.randn`); ``model_kwargs``: passed to every model call;
  ``clip_denoised``/``dynamic_threshold``: x₀ clipping / Imagen thresholding (None → the
  diffusion's defaults); ``progress``: called with each :class:`SampleStep` just before it
  is yielded; ``device``/``dtype`` of the drawn start noise.

A sampler's loop calls ``model_fn`` itself (no layer in between), so a network wrapped by
:func:`~unclip.diffusion.guidance.classifier_free_guidance` runs two frames below the loop.
Step counts are arguments, never state: one diffusion object serves any number of concurrent
requests. Each step runs under ``torch.no_grad()`` (not held across ``yield``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, Generators, ModelFn, randn, randn_like
from .schedules import Spacing, space_timesteps

if TYPE_CHECKING:
    from typing_extensions import Unpack

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


class SamplerOptions(TypedDict, total=False):
    """The keyword options every sampler takes besides its own (see the module docstring;
    defaults in :meth:`Run.start`)."""

    timesteps: Sequence[int] | None
    spacing: Spacing
    generator: Generators
    model_kwargs: dict[str, Any] | None
    clip_denoised: bool | None
    dynamic_threshold: float | None
    progress: ProgressFn | None
    device: torch.device | str | None
    dtype: torch.dtype | None


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


@dataclasses.dataclass
class Run:
    """A sampler run after the prologue every sampler shares (:meth:`start`): ``d`` the
    diffusion respaced to the sampling timesteps, ``x`` the start [N, ...], and the
    :class:`SamplerOptions` a loop reads. A loop calls ``model_fn`` itself and hands the
    output to :meth:`x0_and_eps` or :meth:`mean_variance`."""

    d: GaussianDiffusion
    x: Tensor
    model_fn: ModelFn
    model_kwargs: dict[str, Any]
    generator: Generators
    clip_denoised: bool | None
    dynamic_threshold: float | None
    progress: ProgressFn | None

    @classmethod
    def start(
        cls,
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
    ) -> Run:
        """The diffusion respaced to :func:`sampling_timesteps` and the start x
        (:func:`initial_noise`), with the options of the run."""
        d = diffusion.respace(sampling_timesteps(diffusion, steps, timesteps, spacing))
        x = initial_noise(shape_or_noise, generator, device, dtype)
        kwargs = model_kwargs or {}
        return cls(d, x, model_fn, kwargs, generator, clip_denoised, dynamic_threshold, progress)

    def index(self, i: int) -> Tensor:
        """The respaced timestep index ``i`` for every row: [N] long."""
        return torch.full((self.x.shape[0],), i, device=self.x.device, dtype=torch.long)

    def x0_and_eps(self, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x₀, ε) [N, ...] each from the model's output at x [N, ...], respaced t [N]."""
        pred, _ = self.d.split_output(output, x)
        return self.d.x0_and_eps(pred, x, t, self.clip_denoised, self.dynamic_threshold)

    def mean_variance(self, output: Tensor, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from the model's output (:meth:`~.GaussianDiffusion.p_mean_variance`)."""
        return self.d.p_mean_variance_from_output(
            output, x, t, self.clip_denoised, self.dynamic_threshold
        )

    def emit(self, step: SampleStep) -> SampleStep:
        """Report ``step`` to ``progress`` and return it (to be yielded)."""
        if self.progress is not None:
            self.progress(step)
        return step


# ---------------------------------------------------------------------------------------------


def ddpm_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None = None,
    **options: Unpack[SamplerOptions],
) -> Iterator[SampleStep]:
    """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2).

    The variance is the learned range (IDDPM Eq. 15) with ``learn_sigma``, else the
    diffusion's fixed one. With fewer steps the process is respaced (IDDPM §4). Noise is drawn
    at every step except the last.
    """
    return _ddpm(Run.start(diffusion, model_fn, shape_or_noise, steps, **options))


def _ddpm(r: Run) -> Iterator[SampleStep]:
    d, x = r.d, r.x
    total = d.num_timesteps
    for n, i in enumerate(range(total - 1, -1, -1)):
        with torch.no_grad():
            t = r.index(i)
            out = r.mean_variance(r.model_fn(x, d.model_timesteps(t), **r.model_kwargs), x, t)
            x = out["mean"]
            if i > 0:
                x = x + torch.exp(0.5 * out["log_variance"]) * randn_like(x, r.generator)
        timestep = int(d.schedule.timestep_map[i])
        yield r.emit(SampleStep(n, total, timestep, x, out["pred_x0"]))


def ddim_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None = None,
    *,
    eta: float = 0.0,
    **options: Unpack[SamplerOptions],
) -> Iterator[SampleStep]:
    """DDIM (Song et al. 2021, Eq. 12): deterministic for η = 0, DDPM-like for η = 1.

    x_{t-1} = √ᾱ_{t-1} x̂₀ + √(1 - ᾱ_{t-1} - σ²) ε̂ + σ z, with
    σ = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t-1}) (Eq. 16). When x̂₀ is clipped, ε̂ is
    recomputed from it. With η > 0 noise is drawn at every step (also the last, where σ = 0).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _ddim(Run.start(diffusion, model_fn, shape_or_noise, steps, **options), eta)


def _ddim(r: Run, eta: float) -> Iterator[SampleStep]:
    d, s, x = r.d, r.d.schedule, r.x
    total = d.num_timesteps
    for n, i in enumerate(range(total - 1, -1, -1)):
        with torch.no_grad():
            t = r.index(i)
            x0, eps = r.x0_and_eps(r.model_fn(x, d.model_timesteps(t), **r.model_kwargs), x, t)
            abar, abar_prev = float(s.alphas_cumprod[i]), float(s.alphas_cumprod_prev[i])
            sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
            if eta > 0:
                x = x + sigma * randn_like(x, r.generator)
        yield r.emit(SampleStep(n, total, int(s.timestep_map[i]), x, x0))


def ddim_invert(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x0: Tensor,
    steps: int | None = None,
    *,
    fixed_point_iters: int = 1,
    **options: Unpack[SamplerOptions],
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
    Clipping is off by default (``clip_denoised=False``, ``dynamic_threshold=0``: it would
    make the map non-invertible): for an exact round trip sample back with
    ``clip_denoised=False`` too. ``generator`` is unused (the map is deterministic).
    """
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
    options = {"clip_denoised": False, "dynamic_threshold": 0.0, **options, "generator": None}
    return _invert(Run.start(diffusion, model_fn, x0, steps, **options), fixed_point_iters)


def _invert(r: Run, iters: int) -> Iterator[SampleStep]:
    d, s, x = r.d, r.d.schedule, r.x
    total = d.num_timesteps
    for k in range(total):
        with torch.no_grad():
            x_cur = x
            abar_cur = float(s.alphas_cumprod[k - 1]) if k > 0 else 1.0
            abar = float(s.alphas_cumprod[k])
            t = r.index(max(k - 1, 0))
            out = r.model_fn(x_cur, d.model_timesteps(t), **r.model_kwargs)
            x0, eps = r.x0_and_eps(out, x_cur, t)
            if k == 0:
                x0 = x_cur  # the input is clean: ᾱ = 1
            x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
            for _ in range(iters):
                t = r.index(k)
                _, eps = r.x0_and_eps(r.model_fn(x, d.model_timesteps(t), **r.model_kwargs), x, t)
                x0 = (x_cur - math.sqrt(1 - abar_cur) * eps) / math.sqrt(abar_cur)
                x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
        timestep = int(s.timestep_map[k if iters else max(k - 1, 0)])
        yield r.emit(SampleStep(k, total, timestep, x, x0))


def dpmpp_2m_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None = None,
    **options: Unpack[SamplerOptions],
) -> Iterator[SampleStep]:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022b,
    Algorithm 2) for few-step sampling (10–25 steps).

    With α = √ᾱ, σ = √(1-ᾱ), λ = log(α/σ), h = λ_next - λ_cur:
    x_next = (σ_next/σ_cur) x - α_next (e^{-h} - 1) D, where D = x̂₀ on the first step and
    D = x̂₀ + (x̂₀ - x̂₀_prev) / (2r), r = h_prev/h, afterwards. The last step goes to σ = 0 and
    returns x̂₀ (first order, as diffusers' ``lower_order_final``/``final_sigmas_type="zero"``).
    Deterministic; ``generator`` only draws the starting noise when a shape is given.
    """
    return _dpmpp_2m(Run.start(diffusion, model_fn, shape_or_noise, steps, **options))


def _alpha_sigma_lambda(abar: float) -> tuple[float, float, float]:
    """α = √ᾱ, σ = √(1-ᾱ) and the half log-SNR λ = log(α/σ) of a level ᾱ."""
    alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
    return alpha, sigma, 0.5 * (math.log(abar) - math.log1p(-abar))


def _dpmpp_2m(r: Run) -> Iterator[SampleStep]:
    d, s, x = r.d, r.d.schedule, r.x
    total = d.num_timesteps
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for n, i in enumerate(range(total - 1, -1, -1)):
        with torch.no_grad():
            t = r.index(i)
            x0, _ = r.x0_and_eps(r.model_fn(x, d.model_timesteps(t), **r.model_kwargs), x, t)
            if i == 0:  # to σ = 0: the solution is the data prediction itself
                x = x0
            else:
                _, sigma_s, lam_s = _alpha_sigma_lambda(float(s.alphas_cumprod[i]))
                alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(float(s.alphas_cumprod[i - 1]))
                h = lam_t - lam_s
                if x0_prev is None:
                    D = x0
                else:
                    ratio = h_prev / h
                    D = x0 + (x0 - x0_prev) / (2.0 * ratio)
                x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * D
                h_prev = h
            x0_prev = x0
        yield r.emit(SampleStep(n, total, int(s.timestep_map[i]), x, x0))


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
