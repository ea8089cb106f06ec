"""Classifier-free guidance (Ho & Salimans 2021) as a wrapper around a model function.

``guided = classifier_free_guidance(model_fn, scale, cond_kwargs, uncond_kwargs)`` is itself a
model function (``guided(x, t, **model_kwargs)``) that any sampler can use. Each call runs the
model once on a doubled batch — [x, x], [t, t] and the conditional then unconditional kwargs
concatenated along dim 0 — and returns ``uncond + scale · (cond - uncond)`` (GLIDE Eq. 4;
the combination is linear, so it works for ε, x₀ and v predictions alike). Each stage (prior,
decoder, upsampler) wraps its own model with its own scale.

The wrapped model may be the network itself: its output is taken in x's dtype (a network
under autocast answers in bfloat16; the combination and the sampler stay in x's precision),
so a sampler's loop calls ``guided``, which calls the network, and nothing lies in between.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .gaussian import ModelFn


def _merge_kwargs(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    if set(cond) != set(uncond):
        missing = sorted(set(cond) ^ set(uncond))
        raise ValueError(f"cond and uncond kwargs must have the same keys; differ in {missing}")
    merged: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Tensor) or isinstance(u, Tensor):
            if not (isinstance(c, Tensor) and isinstance(u, Tensor)):
                raise ValueError(f"kwarg {key!r}: a tensor on one side only")
            if c.shape[1:] != u.shape[1:]:
                raise ValueError(
                    f"kwarg {key!r}: cond {tuple(c.shape)} and uncond {tuple(u.shape)} differ"
                )
            merged[key] = torch.cat([c, u], dim=0)
        else:
            if c != u:
                raise ValueError(
                    f"kwarg {key!r}: non-tensor values must be equal (got {c!r} and {u!r})"
                )
            merged[key] = c
    return merged


def _double(value: Any, n: int) -> Any:
    """Duplicate a per-sample tensor [n, ...] -> [2n, ...]; anything else passes through."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return torch.cat([value, value], dim=0)
    return value


def classifier_free_guidance(
    model_fn: ModelFn,
    scale: float | Tensor,
    cond_kwargs: Mapping[str, Any],
    uncond_kwargs: Mapping[str, Any],
    *,
    learn_sigma: bool = False,
) -> ModelFn:
    """Wrap ``model_fn`` into a classifier-free-guided model function.

    Args:
        model_fn: ``model_fn(x, t, **kwargs) -> Tensor``.
        scale: guidance scale w (1 = the conditional model, 0 = the unconditional one, > 1
            stronger guidance), a float or a Tensor [N] of per-sample scales.
        cond_kwargs / uncond_kwargs: the model kwargs of the two passes, same keys. Tensors
            ([N, ...] each) are concatenated cond-first along dim 0; other values must be equal
            on both sides and are passed once.
        learn_sigma: the output has 2× channels on dim 1 (prediction, variance); only the first
            half is guided and the variance half is taken from the conditional pass (GLIDE).

    Returns: ``guided(x, t, **model_kwargs)`` with x [N, ...], t [N]; extra ``model_kwargs``
    given by the caller are shared by both passes (tensors [N, ...] are duplicated).
    The model is always called on the doubled batch, also for w = 0 or 1; its output is cast
    to x's dtype before the combination.
    """
    merged = _merge_kwargs(cond_kwargs, uncond_kwargs)

    def guided(x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        n = x.shape[0]
        extra = {k: _double(v, n) for k, v in model_kwargs.items()}
        overlap = set(extra) & set(merged)
        if overlap:
            raise ValueError(f"kwargs {sorted(overlap)} given both to the guide and the call")
        out = model_fn(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **merged, **extra)
        out = out.to(x.dtype)
        cond, uncond = out[:n], out[n:]  # [N, ...] each
        w = scale
        if isinstance(w, Tensor):
            w = w.to(device=out.device, dtype=out.dtype).reshape(-1, *([1] * (out.dim() - 1)))
        if learn_sigma:
            c = cond.shape[1] // 2
            guided_pred = uncond[:, :c] + w * (cond[:, :c] - uncond[:, :c])
            return torch.cat([guided_pred, cond[:, c:]], dim=1)
        return uncond + w * (cond - uncond)

    return guided
