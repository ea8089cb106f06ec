"""Gaussian diffusion: the forward process, the model's reverse process, and training losses.

The maths of Ho et al. 2020 ("DDPM") and Nichol & Dhariwal 2021 ("Improved DDPM"), written in
the style of guided-diffusion's ``gaussian_diffusion.py``: no model is imported; a model is a
function passed in.

**Model function contract.** ``model_fn(x, t, **model_kwargs) -> Tensor`` where ``x`` is
[N, ...] (vectors [N, D] for the prior, images [N, C, H, W] for the decoder) and ``t`` is a
LongTensor [N] of *original* timesteps (``0 … T-1`` of the training schedule, also when sampling
with a respaced schedule). The output has x's shape, or, with ``learn_sigma``, twice as many
channels along dim 1: the first half is the prediction (ε, x₀ or v), the second half the
learned-range variance value v ∈ [-1, 1] (IDDPM Eq. 15):
``log σ² = frac · log β_t + (1 - frac) · log β̃_t`` with ``frac = (v + 1) / 2``.

Indices ``t`` passed to the methods below index *this* diffusion's schedule; a respaced
diffusion (:meth:`GaussianDiffusion.respace`) maps them to original timesteps before calling
the model (``timestep_map``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from .schedules import NoiseSchedule, extract, make_betas, on_device

if TYPE_CHECKING:  # only for the type hint: this package never imports the rest of unclip
    from unclip.config import DiffusionConfig

ModelFn = Callable[..., Tensor]
Prediction = Literal["eps", "x0", "v"]
#: one generator, or one per sample of a batch (see :func:`randn`); None: torch's global RNG
Generators = torch.Generator | Sequence[torch.Generator] | None
#: the :class:`~unclip.config.DiffusionConfig` fields that are constructor arguments
_CONFIG_KEYS = (
    "prediction", "learn_sigma", "loss", "vlb_weight", "clip_denoised", "dynamic_threshold",
    "clip_range",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Closed forms that need no schedule


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all dimensions but the first. [N, ...] -> [N]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats, elementwise (broadcasting)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x), the standard normal CDF (exact, via erf)."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of 8-bit data under a Gaussian discretised into 256 bins (Ho et al. Eq. 13).

    x: data rescaled to [-1, 1] (bin centres ``-1 + 2k/255``); means, log_scales (log σ):
    broadcastable to x. The first and last bins extend to -∞ and +∞, so the bins sum to one.
    Returns: log-probabilities in nats, x's shape.
    """
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def dynamic_threshold(x0: Tensor, percentile: float) -> Tensor:
    """Dynamic thresholding of a predicted x₀, Imagen (Saharia et al. 2022, §2.3).

    Per sample, s = max(1, the ``percentile`` quantile of |x₀|); x₀ ← clip(x₀, -s, s) / s.
    x0: [N, ...]. Returns x0's shape and dtype.
    """
    flat = x0.reshape(x0.shape[0], -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), percentile, dim=1).clamp(min=1.0)[:, None]
    return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype).reshape(x0.shape)


def process_x0(x0: Tensor, clip: bool, threshold: float = 0.0, clip_range: float = 1.0) -> Tensor:
    """Apply dynamic thresholding (``threshold`` > 0, a percentile) or else clipping to
    [-clip_range, clip_range]."""
    if threshold > 0:
        return dynamic_threshold(x0, threshold)
    if clip:
        return x0.clamp(-clip_range, clip_range)
    return x0


# ---------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A Gaussian diffusion process and its parameterised reverse process.

    Args:
        betas: β_t [T], or a :class:`NoiseSchedule` (possibly respaced).
        prediction: what the model outputs: ``"eps"`` (noise), ``"x0"`` (the clean sample) or
            ``"v"`` (v = √ᾱ ε - √(1-ᾱ) x₀, Salimans & Ho 2022).
        learn_sigma: the model also outputs the learned-range variance (IDDPM §3.1).
        loss: ``"mse"`` (L_simple) or ``"hybrid"`` (L_simple + λ L_vlb, IDDPM §3.1).
        vlb_weight: λ of the hybrid loss (0.001 in IDDPM).
        clip_denoised: default for clipping predicted x₀ to [-clip_range, clip_range] when
            sampling (``clip_range`` 1 by default; Karlo's prior clips at 5).
        dynamic_threshold: default Imagen dynamic-thresholding percentile (0 = off); when on it
            replaces clipping.
        fixed_variance: without ``learn_sigma``, the reverse variance: ``"small"`` β̃_t
            (posterior variance) or ``"large"`` β_t (Ho et al. §3.2).

    Build from a config with :meth:`from_config`.
    """

    def __init__(
        self,
        betas: Tensor | Sequence[float] | NoiseSchedule,
        *,
        prediction: Prediction = "eps",
        learn_sigma: bool = False,
        loss: Literal["mse", "hybrid"] = "mse",
        vlb_weight: float = 0.001,
        clip_denoised: bool = True,
        dynamic_threshold: float = 0.0,
        fixed_variance: Literal["small", "large"] = "small",
        clip_range: float = 1.0,
    ):
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")
        if loss not in ("mse", "hybrid"):
            raise ValueError(f"loss must be 'mse' or 'hybrid', got {loss!r}")
        if loss == "hybrid" and not learn_sigma:
            raise ValueError("loss 'hybrid' needs learn_sigma=True (it trains the variance)")
        if fixed_variance not in ("small", "large"):
            raise ValueError(f"fixed_variance must be 'small' or 'large', got {fixed_variance!r}")
        if not 0.0 <= dynamic_threshold < 1.0:
            raise ValueError(f"dynamic_threshold must be in [0, 1), got {dynamic_threshold}")
        self.schedule = betas if isinstance(betas, NoiseSchedule) else NoiseSchedule(betas)
        self.prediction: Prediction = prediction
        self.learn_sigma = learn_sigma
        self.loss_type = loss
        self.vlb_weight = vlb_weight
        self.clip_denoised = clip_denoised
        self.dynamic_threshold = dynamic_threshold
        self.fixed_variance = fixed_variance
        self.clip_range = float(clip_range)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, **overrides: Any) -> GaussianDiffusion:
        """Build from a :class:`unclip.config.DiffusionConfig` (``overrides`` win over it)."""
        kwargs: dict[str, Any] = {key: getattr(cfg, key) for key in _CONFIG_KEYS}
        kwargs.update(overrides)
        return cls(make_betas(cfg.schedule, cfg.timesteps), **kwargs)

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        """Number of steps T of this (possibly respaced) schedule."""
        return self.schedule.num_timesteps

    @property
    def is_respaced(self) -> bool:
        """Whether indices differ from original timesteps."""
        tm = self.schedule.timestep_map
        return not torch.equal(tm, torch.arange(tm.numel()))

    def respace(self, timesteps: Sequence[int] | Tensor) -> GaussianDiffusion:
        """A diffusion over a subset of this one's timesteps (see :meth:`NoiseSchedule.respace`).

        Same prediction/variance settings; its indices ``0 … len(timesteps)-1`` map to the kept
        timesteps in ascending order, and the model is called with the original ones.
        """
        new = object.__new__(GaussianDiffusion)
        new.__dict__.update(self.__dict__)
        new.schedule = self.schedule.respace(timesteps)
        return new

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original timesteps (what the model sees) of indices t. LongTensor [N] -> [N]
        (on t's device, without a round trip through the host)."""
        if t.device.type != "cpu":
            return on_device(self.schedule.timestep_map, t.device, torch.long)[t.detach()]
        return self.schedule.timestep_map[t.detach().long()]

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Training timesteps drawn uniformly from ``0 … T-1``. Returns LongTensor [batch_size]."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device
        )
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, prediction={self.prediction!r}, "
            f"learn_sigma={self.learn_sigma}, loss={self.loss_type!r})"
        )

    # -- forward process q ---------------------------------------------------------------------

    def _at(self, t: Tensor, like: Tensor, *names: str) -> list[Tensor]:
        """The schedule buffers ``names`` taken at t: [N], each broadcastable to ``like``
        ([N, 1…]): the coefficients every closed form below multiplies its tensors by."""
        return [extract(getattr(self.schedule, name), t, like) for name in names]

    def _signal_noise(self, t: Tensor, like: Tensor) -> list[Tensor]:
        """(√ᾱ_t, √(1-ᾱ_t)) at t: [N], broadcastable to ``like``."""
        return self._at(t, like, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")

    def _recip(self, t: Tensor, like: Tensor) -> list[Tensor]:
        """(1/√ᾱ_t, √(1/ᾱ_t - 1)) at t: [N], broadcastable to ``like``."""
        return self._at(t, like, "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x₀, (1-ᾱ_t) I), Ho Eq. 4.

        x0: [N, ...]; t: [N]. Returns three tensors broadcastable to x0 ([N, ...], [N, 1…]).
        """
        s = self.schedule
        mean = extract(s.sqrt_alphas_cumprod, t, x0) * x0
        var = extract(1.0 - s.alphas_cumprod, t, x0)
        return mean, var, extract(s.log_one_minus_alphas_cumprod, t, x0)

    def q_sample(
        self,
        x0: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = √ᾱ_t x₀ + √(1-ᾱ_t) ε (Ho Eq. 4). x0: [N, ...]; t: [N]."""
        if noise is None:
            noise = randn_like(x0, generator)
        signal, sigma = self._signal_noise(t, x0)
        return signal * x0 + sigma * noise

    def q_posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance, clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. Eqs. 6–7).

        x0, x_t: [N, ...]; t: [N]. Returns [N, ...], [N, 1…], [N, 1…].
        """
        coef1, coef2, var, log_var = self._at(
            t, x_t, "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
            "posterior_log_variance_clipped",
        )  # fmt: skip
        return coef1 * x0 + coef2 * x_t, var, log_var

    # -- conversions between parameterisations -------------------------------------------------

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x₀ = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t (Ho et al. Eq. 15)."""
        recip, recipm1 = self._recip(t, x_t)
        return recip * x_t - recipm1 * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """ε = (x_t - √ᾱ_t x₀) / √(1-ᾱ_t)."""
        recip, recipm1 = self._recip(t, x_t)
        return (recip * x_t - x0) / recipm1

    def predict_v(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = √ᾱ_t ε - √(1-ᾱ_t) x₀ (Salimans & Ho 2022, §4)."""
        signal, sigma = self._signal_noise(t, x0)
        return signal * eps - sigma * x0

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x₀ = √ᾱ_t x_t - √(1-ᾱ_t) v."""
        signal, sigma = self._signal_noise(t, x_t)
        return signal * x_t - sigma * v

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """ε = √ᾱ_t v + √(1-ᾱ_t) x_t."""
        signal, sigma = self._signal_noise(t, x_t)
        return signal * v + sigma * x_t

    # -- reverse process p ---------------------------------------------------------------------

    def split_output(self, output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split a model output into (prediction [N, ...], variance values [N, ...] or None)."""
        if not self.learn_sigma:
            if output.shape != x.shape:
                raise ValueError(f"model output {tuple(output.shape)} != x {tuple(x.shape)}")
            return output, None
        if output.shape[0] != x.shape[0] or output.shape[1] != 2 * x.shape[1]:
            raise ValueError(
                f"with learn_sigma the model output needs 2×{x.shape[1]} channels on dim 1, "
                f"got shape {tuple(output.shape)}"
            )
        pred, var_values = torch.split(output, x.shape[1], dim=1)
        return pred, var_values

    def model_variance(
        self, var_values: Tensor | None, x: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Variance and log-variance of p(x_{t-1} | x_t).

        Learned range (IDDPM Eq. 15): log σ² = frac·log β_t + (1-frac)·log β̃_t,
        frac = (v+1)/2; otherwise fixed β̃_t (``"small"``) or β_t (``"large"``).
        Returns two tensors broadcastable to x.
        """
        s = self.schedule
        if var_values is not None:
            min_log = extract(s.posterior_log_variance_clipped, t, x)
            max_log = extract(torch.log(s.betas), t, x)
            frac = (var_values + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
            return torch.exp(log_var), log_var
        if self.fixed_variance == "large":
            # β_t, with β_0 replaced by β̃_1 so that the t = 0 likelihood term stays sensible.
            first = s.posterior_variance[1:2] if s.num_timesteps > 1 else s.betas[:1]
            var = torch.cat([first, s.betas[1:]])
            return extract(var, t, x), extract(torch.log(var), t, x)
        return extract(s.posterior_variance, t, x), extract(s.posterior_log_variance_clipped, t, x)

    def x0_and_eps(
        self,
        pred: Tensor,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool | None = None,
        dynamic_threshold: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(x₀, ε) from a prediction of type ``self.prediction``, with x₀ clipped/thresholded.

        When x₀ is clipped or thresholded, ε is recomputed from it so the pair stays consistent
        (as guided-diffusion's DDIM does). pred, x: [N, ...]; t: [N].
        """
        if self.prediction == "eps":
            eps, x0 = pred, self.predict_x0_from_eps(x, t, pred)
        elif self.prediction == "x0":
            x0 = pred
            eps = self.predict_eps_from_x0(x, t, pred)
        else:
            x0, eps = self.predict_x0_from_v(x, t, pred), self.predict_eps_from_v(x, t, pred)
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        threshold = self.dynamic_threshold if dynamic_threshold is None else dynamic_threshold
        if clip or threshold > 0:
            x0 = process_x0(x0, clip, threshold, self.clip_range)
            eps = self.predict_eps_from_x0(x, t, x0)
        return x0, eps

    def p_mean_variance(
        self,
        model_fn: ModelFn,
        x: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool | None = None,
        dynamic_threshold: float | None = None,
    ) -> dict[str, Tensor]:
        """Call the model and return p(x_{t-1} | x_t) and its predictions.

        x: [N, ...]; t: [N] indices of this schedule. ``clip_denoised``/``dynamic_threshold``
        default to the diffusion's settings. Returns a dict with ``mean`` [N, ...],
        ``variance`` and ``log_variance`` (broadcastable), ``pred_x0``, ``eps``, ``output``
        (the raw model output).
        """
        output = model_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(output, x, t, clip_denoised, dynamic_threshold)

    def p_mean_variance_from_output(
        self,
        output: Tensor,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool | None = None,
        dynamic_threshold: float | None = None,
    ) -> dict[str, Tensor]:
        """:meth:`p_mean_variance` for a model output already computed."""
        pred, var_values = self.split_output(output, x)
        variance, log_variance = self.model_variance(var_values, x, t)
        x0, eps = self.x0_and_eps(pred, x, t, clip_denoised, dynamic_threshold)
        mean, _, _ = self.q_posterior_mean_variance(x0, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_x0": x0,
            "eps": eps,
            "output": output,
        }

    # -- losses --------------------------------------------------------------------------------

    def vlb_terms(self, output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """One term L_t of the variational bound, in bits per dimension (IDDPM Eqs. 4–6).

        KL(q(x_{t-1} | x_t, x₀) ‖ p(x_{t-1} | x_t)) for t > 0, and for t = 0 the discretised
        decoder NLL -log p(x₀ | x₁) (data in [-1, 1], 256 levels). ``output`` is the model's
        output at (x_t, t), x0 and x_t: [N, ...], t: [N]. Returns [N].
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance_from_output(output, x_t, t, False, 0.0)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample training losses at timesteps t.

        x0: [N, ...] data; t: [N] indices (see :meth:`sample_timesteps`); noise: [N, ...]
        (drawn with ``generator`` when None). Returns a dict of [N] tensors:

        - ``mse``: L_simple, the mean squared error of the prediction (ε, x₀ or v) (Ho Eq. 14);
        - ``vlb`` (only with ``learn_sigma``): :meth:`vlb_terms` with the mean's prediction
          detached, so it trains the variance only (IDDPM §3.1);
        - ``loss``: ``mse``, plus for ``"hybrid"`` ``vlb_weight · T · vlb``: with t uniform,
          T·L_t estimates L_vlb = Σ_t L_t, so this is IDDPM's L_simple + λ L_vlb.
        """
        if noise is None:
            noise = randn_like(x0, generator)
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        pred, var_values = self.split_output(output, x_t)
        if self.prediction == "eps":
            target = noise
        elif self.prediction == "x0":
            target = x0
        else:
            target = self.predict_v(x0, t, noise)
        terms = {"mse": mean_flat((target - pred) ** 2)}
        loss = terms["mse"]
        if var_values is not None:
            frozen = torch.cat([pred.detach(), var_values], dim=1)
            terms["vlb"] = self.vlb_terms(frozen, x0, x_t, t)
            if self.loss_type == "hybrid":
                loss = loss + self.vlb_weight * self.num_timesteps * terms["vlb"]
        terms["loss"] = loss
        return terms


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise of x's shape/dtype/device, drawn with ``generator`` (one, or one
    per block of rows: see :func:`randn`) on its device."""
    return randn(x.shape, generator, x.device, x.dtype)


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise; drawn on the generator's device, then moved to ``device``.

    Drawing on the generator's device makes a CPU generator give the same numbers whatever
    device the sample lives on (the convention of diffusers' ``randn_tensor``).

    ``generator`` may be a sequence of K generators for a batch of K samples: dim 0 of
    ``shape`` (a multiple of K) is split into K equal blocks and block k is drawn with
    generator k alone, so sample k of a batch gets exactly the noise it would get on its own.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        out = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
        return out if device is None else out.to(device)
    gens = list(generator)
    if not gens or shape[0] % len(gens):
        raise ValueError(f"{len(gens)} generators cannot split a batch of {shape[0]} rows")
    block = (shape[0] // len(gens), *shape[1:])
    return torch.cat([randn(block, g, device, dtype) for g in gens])
