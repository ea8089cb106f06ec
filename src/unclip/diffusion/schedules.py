"""Noise schedules: β_t, ᾱ_t and the derived constants, and respacing to fewer steps.

Everything here is float64 on the CPU; :func:`extract` gathers per-sample values and casts them
to the dtype and device of the tensor they multiply.

Timesteps are integer indices ``0 … T-1`` (``t = 0`` is the least noisy). A *respaced* schedule
keeps a subset of an original schedule's timesteps (Nichol & Dhariwal 2021, §4): its β are
recomputed as ``1 - ᾱ_k / ᾱ_{k-1}`` over the kept timesteps so that ᾱ is unchanged there, and
``timestep_map[i]`` is the original timestep of respaced index ``i`` (what a model is called with).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

ScheduleName = Literal["linear", "cosine"]
Spacing = Literal["trailing", "leading", "linspace"]


def linear_betas(
    timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999
) -> Tensor:
    """Linear β schedule of Ho et al. 2020 (§4), scaled by ``1000 / timesteps``.

    The scaling (Nichol & Dhariwal 2021, as in guided-diffusion) keeps the process' total noise
    about the same for any ``timesteps``; at ``timesteps=1000`` it is exactly 1e-4 … 0.02. Below
    about 21 steps the scaled β would pass 1, so they are clipped at ``max_beta``.

    Returns: float64 [timesteps].
    """
    scale = 1000.0 / timesteps
    betas = torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64)
    return betas.clamp(max=max_beta)


def betas_for_alpha_bar(timesteps: int, alpha_bar, max_beta: float = 0.999) -> Tensor:
    """β_t = min(1 - ᾱ((t+1)/T) / ᾱ(t/T), max_beta) for a continuous ``alpha_bar(s)``, s ∈ [0, 1].

    Returns: float64 [timesteps].
    """
    betas = [
        min(1.0 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta)
        for i in range(timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule, Eq. 17 of Nichol & Dhariwal 2021: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2).

    Returns: float64 [timesteps], clipped at ``max_beta`` (0.999) near t = T.
    """
    return betas_for_alpha_bar(
        timesteps, lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2, max_beta
    )


def make_betas(schedule: ScheduleName, timesteps: int) -> Tensor:
    """β for a named schedule (``"linear"`` or ``"cosine"``). Returns float64 [timesteps]."""
    if schedule == "linear":
        return linear_betas(timesteps)
    if schedule == "cosine":
        return cosine_betas(timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r} (expected 'linear' or 'cosine')")


def space_timesteps(num_timesteps: int, steps: int, spacing: Spacing = "trailing") -> list[int]:
    """Pick ``steps`` of ``num_timesteps`` timesteps for sampling, in sampling order (descending).

    The three spacings are those of Table 2 of Lin et al. 2023 ("Common diffusion noise schedules
    and sample steps are flawed"), and give the same lists as diffusers' ``timestep_spacing``:

    - ``"trailing"`` (the default everywhere in :mod:`unclip.diffusion`): starts at ``T-1``, the
      step that pure noise really corresponds to, e.g. T=1000, 4 steps → [999, 749, 499, 249];
    - ``"leading"`` (diffusers' DDPM/DDIM default): ``[k·(T//steps)]``, e.g. [750, 500, 250, 0];
    - ``"linspace"`` (guided-diffusion's respacing): rounded ``linspace(0, T-1, steps)``,
      e.g. [999, 666, 333, 0].

    Every sampler then ends with one more step to ᾱ = 1 (the clean sample).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "trailing":
        ratio = num_timesteps / steps
        ts = [round(num_timesteps - k * ratio) - 1 for k in range(steps)]
    elif spacing == "leading":
        ratio = num_timesteps // steps
        ts = [k * ratio for k in reversed(range(steps))]
    elif spacing == "linspace":
        if steps == 1:
            ts = [num_timesteps - 1]
        else:
            ts = [round(k * (num_timesteps - 1) / (steps - 1)) for k in reversed(range(steps))]
    else:
        raise ValueError(f"unknown spacing {spacing!r} (expected trailing, leading or linspace)")
    return ts


_COPIES: OrderedDict[tuple[int, str, torch.dtype], tuple[Tensor, Tensor]] = OrderedDict()
_COPIES_MAX = 256  # schedule tables of a few KiB each: a respaced sampling run adds a dozen
_COPIES_LOCK = threading.Lock()


def on_device(values: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``values`` (a schedule table, never changed in place) as ``dtype`` on ``device``, copied
    once and kept (the most recent ``_COPIES_MAX`` tables), so indexing it with timesteps on an
    accelerator needs no copy between host and device."""
    key = (id(values), str(device), dtype)
    with _COPIES_LOCK:
        hit = _COPIES.get(key)
        if hit is not None and hit[0] is values:
            _COPIES.move_to_end(key)
            return hit[1]
    copy = values.to(dtype=dtype).to(device)  # cast on the host: MPS has no float64
    with _COPIES_LOCK:
        _COPIES[key] = (values, copy)  # holding values keeps its id from being reused
        while len(_COPIES) > _COPIES_MAX:
            _COPIES.popitem(last=False)
    return copy


def extract(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Gather ``values[t]`` and shape it to broadcast against ``x``.

    values: [T] (float64, CPU); t: LongTensor [N]; x: [N, ...].
    Returns: [N, 1, ..., 1] with x's dtype and device. Timesteps on an accelerator index a
    device copy of ``values`` (:func:`on_device`): no synchronisation with the host.
    """
    shape = (-1, *([1] * (x.dim() - 1)))
    if t.device.type != "cpu":
        return on_device(values, x.device, x.dtype)[t.detach().to(x.device)].reshape(shape)
    out = values[t.detach().to("cpu", torch.long)]
    return out.to(device=x.device, dtype=x.dtype).reshape(shape)


class NoiseSchedule:
    """A discrete variance-preserving noise schedule and its derived constants (all float64 [T]).

    Attributes (q = forward process, Ho et al. 2020 Eqs. 4, 6–7):

    - ``betas`` β_t, ``alphas`` α_t = 1 - β_t, ``alphas_cumprod`` ᾱ_t = ∏ α_s;
    - ``alphas_cumprod_prev`` ᾱ_{t-1} (1 at t = 0), ``alphas_cumprod_next`` ᾱ_{t+1} (0 at T-1);
    - ``posterior_variance`` β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) of q(x_{t-1} | x_t, x_0);
    - ``posterior_log_variance_clipped`` log β̃_t with β̃_0 (= 0) replaced by β̃_1;
    - ``posterior_mean_coef1`` / ``coef2``: μ̃_t = coef1 · x_0 + coef2 · x_t;
    - ``timestep_map`` LongTensor [T]: the original timestep of each index (identity unless
      respaced).
    """

    def __init__(self, betas: Tensor | Sequence[float], timestep_map: Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().reshape(-1)
        if betas.numel() < 1:
            raise ValueError("a noise schedule needs at least one timestep")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        n = betas.numel()
        self.betas = betas
        self.num_timesteps = n
        if timestep_map is None:
            timestep_map = torch.arange(n)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).cpu()
        if self.timestep_map.shape != (n,):
            raise ValueError(f"timestep_map must have shape [{n}], got {tuple(timestep_map.shape)}")

        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], zero])

        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log1p(-self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # β̃_0 = 0: clip its log to β̃_1 (as guided-diffusion); only used by the t = 0 NLL term.
        first = self.posterior_variance[1:2] if n > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([first, self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = (
            betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

    @classmethod
    def from_name(cls, schedule: ScheduleName, timesteps: int) -> NoiseSchedule:
        """A ``"linear"`` or ``"cosine"`` schedule with ``timesteps`` steps."""
        return cls(make_betas(schedule, timesteps))

    def respace(self, timesteps: Sequence[int] | Tensor) -> NoiseSchedule:
        """Keep only ``timesteps`` (indices into this schedule, any order, no repeats).

        The result has ``len(timesteps)`` steps in ascending order, the same ᾱ at those
        timesteps, β_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}}, and ``timestep_map`` composed with this
        schedule's (so it always names timesteps of the original, unrespaced schedule).
        """
        keep = sorted(int(k) for k in torch.as_tensor(timesteps).reshape(-1).tolist())
        if len(set(keep)) != len(keep):
            raise ValueError("respaced timesteps must not repeat")
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in [0, {self.num_timesteps - 1}]")
        idx = torch.tensor(keep, dtype=torch.long)
        abar = self.alphas_cumprod[idx]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return NoiseSchedule(1.0 - abar / abar_prev, timestep_map=self.timestep_map[idx])

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_timesteps={self.num_timesteps}, "
            f"timesteps {int(self.timestep_map[0])}…{int(self.timestep_map[-1])})"
        )
