"""The ancestral sampler of Karlo (Kakao Brain's unCLIP), as diffusers' ``UnCLIPScheduler``.

Karlo samples every stage with a DDPM step between two sampling timesteps (Ho et al. 2020,
Eq. 7, with β recomputed from ᾱ for the skipped steps, IDDPM §4), but differs in details
that change the numbers, so it is its own sampler here (``sampler="karlo"``) rather than a
setting of :func:`~unclip.diffusion.samplers.ddpm_sample`:

- timesteps ``round(k · (T-1)/(n-1))`` for k = n-1 … 0 (both ends included);
- the variance is computed in float32 from ᾱ of the two timesteps; learned-range
  interpolates between log β̃ and log β without clipping the first posterior variance;
- x₀ is clipped to ``[-clip_range, clip_range]`` (Karlo's prior clips at 5) and the mean is
  taken from the clipped x₀ (ε is never recomputed);
- noise ``randn(x.shape)`` is drawn from ``generator`` at every step but the last (t = 0),
  after the starting noise, so one ``torch.Generator`` shared by every stage, as diffusers'
  ``UnCLIPPipeline`` shares it, gives the same draws in the same order.

Same signature and :class:`~unclip.diffusion.samplers.SampleStep` stream as the other
samplers. Only torch; the model is a function.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, ModelFn, process_x0, randn
from .samplers import Run, SamplerOptions, SampleStep

if TYPE_CHECKING:
    from typing_extensions import Unpack


def karlo_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Karlo's sampling timesteps, descending: ``round(k · (T-1)/(steps-1))`` for k =
    steps-1 … 0 (rounding half to even, as NumPy), e.g. T=1000, 4 steps → [999, 666, 333, 0].
    One step is [T-1]."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    ratio = (num_timesteps - 1) / (steps - 1)
    ts = (torch.arange(steps, dtype=torch.float64) * ratio).round().long()  # half to even
    return ts.flip(0).tolist()


def karlo_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None = None,
    **options: Unpack[SamplerOptions],
) -> Iterator[SampleStep]:
    """Karlo's ancestral sampling (``UnCLIPScheduler.step``; see the module docstring).

    ``steps`` picks :func:`karlo_timesteps`; ``timesteps`` (descending original timesteps)
    overrides it; neither: all T. ``spacing`` is ignored (Karlo has its own). The last step
    goes to ᾱ = 1 (x₀), which is Karlo's ``t - 1`` whenever the last timestep is 0 (always,
    with its spacing and two steps or more). The variance is the learned range with
    ``diffusion.learn_sigma`` (Karlo's decoder), else the fixed small one (its prior and
    super-resolution stages); ``diffusion.prediction`` ``eps`` or ``x0`` (its prior).
    """
    if diffusion.is_respaced:
        raise ValueError("the karlo sampler takes the diffusion over all its timesteps")
    if diffusion.prediction not in ("eps", "x0"):
        raise ValueError(
            f"the karlo sampler needs eps or x0 predictions, not {diffusion.prediction!r}"
        )
    if not diffusion.learn_sigma and diffusion.fixed_variance != "small":
        raise ValueError("the karlo sampler has the fixed small variance only")
    if options.get("timesteps") is None and steps is not None:
        options["timesteps"] = karlo_timesteps(diffusion.num_timesteps, steps)
    options.pop("spacing", None)  # Karlo's own spacing
    run = Run.start(diffusion, model_fn, shape_or_noise, None, **options)
    return _karlo_loop(diffusion, run)


def _step_coefficients(
    diffusion: GaussianDiffusion, ts: list[int]
) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Karlo's float32 coefficients of each step n of the descending timesteps ``ts``, computed
    on the CPU one step at a time, as diffusers computes them: ``scales[n]`` = (√(1 - ᾱ_t),
    √ᾱ_t), which turn ε into x₀ and stay CPU scalars (diffusers divides by a CPU scalar,
    which CUDA does as a multiplication by its reciprocal), and ``coefs`` [steps, 5]: x₀'s
    and x_t's coefficients of the mean (Ho et al. Eq. 7), the fixed small standard deviation,
    log β̃ and log β between the two timesteps."""
    # float32 as diffusers keeps them: β rounded from float64, ᾱ its float32 cumulative product
    betas = diffusion.schedule.betas.to(torch.float32)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    one = torch.tensor(1.0)
    scales, rows = [], []
    for n, t in enumerate(ts):
        prev = ts[n + 1] if n + 1 < len(ts) else -1
        abar_t = abar[t]
        abar_prev = abar[prev] if prev >= 0 else one
        beta_prod_t, beta_prod_prev = 1 - abar_t, 1 - abar_prev
        if prev == t - 1:
            beta, alpha = betas[t], alphas[t]
        else:
            beta = 1 - abar_t / abar_prev
            alpha = 1 - beta
        variance = beta_prod_prev / beta_prod_t * beta  # β̃ between the two timesteps
        scales.append((beta_prod_t**0.5, abar_t**0.5))
        rows.append(torch.stack([
            (abar_prev**0.5 * beta) / beta_prod_t,
            alpha**0.5 * beta_prod_prev / beta_prod_t,
            torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20))),  # "fixed_small_log"
            variance.log(),  # -inf at the last step, which draws no noise
            beta.log(),
        ]))  # fmt: skip
    return scales, torch.stack(rows)


def _karlo_loop(diffusion: GaussianDiffusion, r: Run) -> Iterator[SampleStep]:
    """The steps of a run :meth:`~Run.start` set up; ``diffusion`` the full (unrespaced) one,
    whose β and ᾱ Karlo's step reads."""
    clip = diffusion.clip_denoised if r.clip_denoised is None else r.clip_denoised
    threshold = diffusion.dynamic_threshold
    threshold = threshold if r.dynamic_threshold is None else r.dynamic_threshold
    ts = [int(t) for t in r.d.schedule.timestep_map.tolist()][::-1]  # descending
    x = r.x
    scales, coefs = _step_coefficients(diffusion, ts)
    coefs = coefs.to(x.device)  # [steps, 5]: one copy for the whole run
    for n, t in enumerate(ts):
        with torch.no_grad():
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            output = r.model_fn(x, t_batch, **r.model_kwargs)
            var_values = None
            if diffusion.learn_sigma:
                output, var_values = torch.split(output, x.shape[1], dim=1)
            if diffusion.prediction == "eps":
                sqrt_beta_prod_t, sqrt_abar_t = scales[n]
                x0 = (x - sqrt_beta_prod_t * output) / sqrt_abar_t
            else:
                x0 = output
            x0 = process_x0(x0, clip, threshold, diffusion.clip_range)  # Karlo's prior: at 5
            x0_coef, xt_coef, std, min_log, max_log = coefs[n]
            mean = x0_coef * x0 + xt_coef * x  # Ho et al. Eq. 7
            if t > 0:
                noise = randn(output.shape, r.generator, output.device, output.dtype)
                if var_values is None:  # Karlo's "fixed_small_log"
                    x = mean + std * noise
                else:  # "learned_range" (IDDPM Eq. 15, with the unclipped log β̃)
                    frac = (var_values + 1) / 2
                    log_var = frac * max_log + (1 - frac) * min_log
                    x = mean + (0.5 * log_var).exp() * noise
            else:
                x = mean
        yield r.emit(SampleStep(n, len(ts), t, x, x0))
