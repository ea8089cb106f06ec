"""Diffusion maths shared by the prior, the decoder and the upsamplers.

Imports only torch: a model is passed in as a function ``model_fn(x, t, **model_kwargs)``
(see :mod:`unclip.diffusion.gaussian` for the contract).

- :mod:`.schedules`: β schedules (linear, cosine), :class:`NoiseSchedule`, respacing;
- :mod:`.gaussian`: :class:`GaussianDiffusion` (q_sample, posteriors, p_mean_variance,
  ε/x₀/v conversions, training losses) and the closed forms (normal_kl, discretised likelihood);
- :mod:`.samplers`: DDPM, DDIM, DDIM inversion, DPM-Solver++(2M), all generators of
  :class:`SampleStep`; :func:`final` / :func:`sample` run one to the end; :mod:`.karlo`:
  Karlo's ancestral sampler (diffusers' ``UnCLIPScheduler``), for converted Karlo weights;
- :mod:`.guidance`: classifier-free guidance as a model-function wrapper;
- :mod:`.inpaint`: RePaint inpainting for any model.

Typical use::

    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    losses = diffusion.training_losses(model, x0, diffusion.sample_timesteps(len(x0)))
    guided = classifier_free_guidance(model, 3.0, {"emb": z}, {"emb": null})
    for step in ddim_sample(diffusion, guided, (4, 3, 32, 32), steps=25, generator=g):
        ...  # step.index, step.total, step.x, step.pred_x0
"""

from .gaussian import (
    GaussianDiffusion,
    Generators,
    ModelFn,
    discretized_gaussian_log_likelihood,
    dynamic_threshold,
    mean_flat,
    normal_kl,
    process_x0,
    randn,
    randn_like,
    standard_normal_cdf,
)
from .guidance import classifier_free_guidance
from .inpaint import repaint_levels, repaint_sample
from .karlo import karlo_sample, karlo_timesteps
from .samplers import (
    SAMPLERS,
    SampleStep,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    final,
    initial_noise,
    sample,
    sampling_timesteps,
)
from .schedules import (
    NoiseSchedule,
    betas_for_alpha_bar,
    cosine_betas,
    extract,
    linear_betas,
    make_betas,
    space_timesteps,
)

SAMPLERS.setdefault("karlo", karlo_sample)  # registered here: samplers.py does not import it

__all__ = [
    "SAMPLERS",
    "GaussianDiffusion",
    "Generators",
    "ModelFn",
    "NoiseSchedule",
    "SampleStep",
    "betas_for_alpha_bar",
    "classifier_free_guidance",
    "cosine_betas",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "dpmpp_2m_sample",
    "dynamic_threshold",
    "extract",
    "final",
    "initial_noise",
    "karlo_sample",
    "karlo_timesteps",
    "linear_betas",
    "make_betas",
    "mean_flat",
    "normal_kl",
    "process_x0",
    "randn",
    "randn_like",
    "repaint_levels",
    "repaint_sample",
    "sample",
    "sampling_timesteps",
    "space_timesteps",
    "standard_normal_cdf",
]
