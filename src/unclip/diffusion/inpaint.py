"""Training-free inpainting for any diffusion model: RePaint (Lugmayr et al. 2022).

At every reverse step the *known* region of the sample is replaced by the known image noised
to the same level, q(x_{t-1} | x₀_known), and the *unknown* region comes from the model's
ancestral step (Algorithm 1). To let the two regions harmonise, the sampler repeatedly jumps
back up by ``jump_length`` steps (re-noising with q(x_{t+j} | x_t)) and goes down again,
``resample`` times in all (§4.2, Fig. 9 "resampling" with jumps).

**Mask convention:** ``keep_mask`` is 1 where the known image is kept and 0 where new content
is generated (the opposite of the user-facing "white = repaint" masks: the pipeline converts).
It broadcasts against x ([N, 1, H, W] or [N, C, H, W] for images, [N, D] for vectors); values
between 0 and 1 blend.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, ModelFn, randn_like
from .samplers import Run, SamplerOptions, SampleStep

if TYPE_CHECKING:
    from typing_extensions import Unpack


def repaint_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape_or_noise: Sequence[int] | Tensor,
    steps: int | None = None,
    *,
    x_known: Tensor,
    keep_mask: Tensor,
    jump_length: int = 10,
    resample: int = 10,
    **options: Unpack[SamplerOptions],
) -> Iterator[SampleStep]:
    """RePaint inpainting with the common sampler signature (see :mod:`.samplers`).

    x_known: [N, ...] the image whose ``keep_mask == 1`` region is kept (in the model's data
    range); keep_mask: broadcastable to x_known, 1 = keep, 0 = generate.
    ``shape_or_noise`` is the starting noise or its shape (normally ``x_known.shape``).

    Down moves are ancestral DDPM steps of the (respaced) diffusion with the known region
    replaced; up moves draw x_{t+1} ~ N(√(1-β_{t+1}) x_t, β_{t+1} I) with the respaced β. One
    :class:`SampleStep` is yielded per move (``total`` = number of moves); for up moves
    ``timestep`` is the level reached and ``pred_x0`` the last prediction. The last move
    returns the known region exactly.
    """
    r = Run.start(diffusion, model_fn, shape_or_noise, steps, **options)
    levels = repaint_levels(r.d.num_timesteps, jump_length, resample)
    x = r.x
    if x_known.shape != x.shape:
        raise ValueError(f"x_known {tuple(x_known.shape)} must match the sample {tuple(x.shape)}")
    x_known = x_known.to(device=x.device, dtype=x.dtype)
    keep_mask = keep_mask.to(device=x.device, dtype=x.dtype)
    torch.broadcast_shapes(keep_mask.shape, x.shape)  # fail early on a wrong mask
    return _repaint(r, levels, x_known, keep_mask)


def repaint_levels(steps: int, jump_length: int = 10, resample: int = 10) -> list[int]:
    """The noise levels RePaint visits, from ``steps`` (pure noise) down to 0 (clean).

    Level ℓ ≥ 1 is the ℓ-th sampling timestep counted from the clean end, level 0 is x₀. Each
    consecutive pair is one move: down (ℓ → ℓ-1, a model call) or up (ℓ → ℓ+1, re-noising).
    On reaching a level 1 + k·``jump_length`` (below ``steps - jump_length + 1``), it goes
    back up ``jump_length`` levels, ``resample - 1`` times (the schedule of Lugmayr et al.,
    App. B, "jump_n_sample"). ``resample=1`` is plain sampling: [steps, …, 1, 0].
    """
    if steps < 1 or jump_length < 1 or resample < 1:
        raise ValueError("steps, jump_length and resample must all be at least 1")
    jumps_left = {lvl: resample - 1 for lvl in range(1, steps - jump_length + 1, jump_length)}
    level = steps
    levels = [level]
    while level > 0:
        level -= 1
        levels.append(level)
        if jumps_left.get(level, 0) > 0:
            jumps_left[level] -= 1
            for _ in range(jump_length):
                level += 1
                levels.append(level)
    return levels


def _repaint(r: Run, levels: list[int], x_known: Tensor, keep: Tensor) -> Iterator[SampleStep]:
    d, s, x = r.d, r.d.schedule, r.x
    total = len(levels) - 1
    pred_x0 = torch.zeros_like(x)
    for n, (cur, nxt) in enumerate(itertools.pairwise(levels)):
        with torch.no_grad():
            if nxt < cur:  # down: model step from index cur-1 to level cur-1
                i = cur - 1
                t = r.index(i)
                out = r.mean_variance(r.model_fn(x, d.model_timesteps(t), **r.model_kwargs), x, t)
                pred_x0 = out["pred_x0"]
                unknown = out["mean"]
                if i > 0:
                    noise = randn_like(x, r.generator)
                    unknown = unknown + torch.exp(0.5 * out["log_variance"]) * noise
                    known = d.q_sample(x_known, r.index(i - 1), randn_like(x, r.generator))
                else:
                    known = x_known
                x = keep * known + (1.0 - keep) * unknown
                timestep = int(s.timestep_map[i])
            else:  # up: forward transition from level cur to cur+1 (respaced index cur)
                beta = float(s.betas[cur])
                x = math.sqrt(1.0 - beta) * x + math.sqrt(beta) * randn_like(x, r.generator)
                timestep = int(s.timestep_map[cur])
        yield r.emit(SampleStep(n, total, timestep, x, pred_x0))
