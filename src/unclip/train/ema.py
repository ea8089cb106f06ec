"""Exponential moving average of a model's weights (the weights diffusion models sample with)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class EMA:
    """A float32 shadow copy of ``model``'s parameters and buffers.

    ``update`` moves the shadow towards the model: ``ema = decay_t * ema + (1 - decay_t) * w``
    with ``decay_t = min(decay, (1 + n) / (10 + n))`` when ``warmup`` is on (n = updates so
    far), so early weights are forgotten quickly. Buffers (e.g. norm statistics) are copied.
    Over an FSDP-sharded model the shadow holds the same shards (DTensors) as the weights; the
    trainer gathers them to save (see :mod:`unclip.train.fsdp`).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }
        self._param_names = {name for name, _ in model.named_parameters()}
        self._cache: tuple[nn.Module, list, list, list] | None = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step towards ``model``'s weights: a few multi-tensor kernels for all of them (a
        loop of per-tensor kernels costs the host more than a GPU's whole update)."""
        decay = self.current_decay()
        shadows, weights, buffers = self._pairs(model)
        if shadows:
            if any(_is_dtensor(s) for s in shadows):  # FSDP shards: one tensor at a time
                for s, w in zip(shadows, weights, strict=True):
                    s.lerp_(w.float(), 1.0 - decay)
            else:
                torch._foreach_lerp_(shadows, [w.float() for w in weights], 1.0 - decay)
        for s, b in buffers:
            s.copy_(b)
        self.num_updates += 1

    def _pairs(self, model: nn.Module) -> tuple[list, list, list]:
        """(shadow parameters, model parameters, [(shadow, buffer)]) of ``model``, as views
        that follow in-place updates; built once per model."""
        if self._cache is None or self._cache[0] is not model:
            shadows, weights, buffers = [], [], []
            for k, v in model.state_dict(keep_vars=True).items():
                s, v = self.shadow[k], v.detach()
                if k in self._param_names and s.is_floating_point():
                    shadows.append(s)
                    weights.append(v)
                else:
                    buffers.append((s, v))
            self._cache = (model, shadows, weights, buffers)
        return self._cache[1], self._cache[2], self._cache[3]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Mapping[str, torch.Tensor], num_updates: int) -> None:
        for k, s in self.shadow.items():
            s.copy_(state[k])
        self.num_updates = num_updates

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        for k, v in model.state_dict().items():
            v.copy_(self.shadow[k].to(v.dtype))


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"
