"""Fully sharded data parallel training (``--fsdp``) on PyTorch's FSDP2 (``fully_shard``).

For models whose weights, gradients and AdamW state do not fit one device. Under ``torchrun``
:func:`shard_model` makes every *block* of the model — each item of an ``nn.ModuleList``
(transformer layers, UNet stages), outermost first — and then the rest of the model a shard
group: each rank keeps 1/N of every parameter (dim 0, as a ``DTensor``), of its gradient and
of its optimizer state, and a group's full parameters exist only while that group runs its
forward or backward pass. Gradients are reduce-scattered (averaged over ranks) after every
backward pass. 0-d parameters (CLIP's ``logit_scale``), which FSDP cannot shard, stay whole on
every rank; :func:`sync_replicated_grads` averages their gradients as DDP would.

Checkpoints stay whole and in the unsharded format: :func:`full_model_state`,
:func:`full_optimizer_state` and :func:`gather_full` (for the EMA, whose shadow copy holds
the same shards as the model) gather full tensors to rank 0's CPU one tensor at a time, and
the ``load_*``/:func:`shard_like` functions cut a whole checkpoint back into this rank's
shards. A run saved under FSDP resumes under FSDP, and its ``final/`` folder loads with
``from_pretrained`` like any other.

Every function here that touches sharded tensors is a collective: call it on all ranks, in
the same order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "block_modules",
    "clip_grad_norm",
    "full_model_state",
    "full_optimizer_state",
    "gather_full",
    "is_sharded",
    "load_model_state",
    "load_optimizer_state",
    "shard_like",
    "shard_model",
    "sync_replicated_grads",
]


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter, gradient or EMA entry split across ranks)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The items of ``model``'s ``nn.ModuleList``\\ s, outermost first: each becomes a shard group.

    A block's own lists are not searched (its layers belong to the block's group); a list that
    is itself an item (a UNet stage) is a block. Blocks without parameters are left out.
    """
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(module, nn.ModuleList):
                if any(True for _ in child.parameters()):
                    found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place across the process group (one group per block, then the root).

    Parameters move to ``device`` shard by shard (the whole model never sits on one device);
    buffers and 0-d parameters are kept whole on every rank. Returns ``model`` (its class is
    now also an ``FSDPModule``; attribute access and ``state_dict`` names are unchanged).
    Call before building the optimizer and the EMA.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs an initialised process group (launch with torchrun)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for block in block_modules(model):
        fully_shard(block, mesh=mesh, ignored_params=scalars & set(block.parameters()) or None)
    fully_shard(model, mesh=mesh, ignored_params=scalars or None)
    with torch.no_grad():
        for p in scalars:  # FSDP leaves the parameters it ignores where they are
            p.data = p.data.to(device)
    return model


def sync_replicated_grads(params: Iterable[nn.Parameter], device: torch.device) -> None:
    """Average the gradients of the parameters FSDP does not shard (0-d ones) over ranks.

    FSDP reduces only its own (sharded) gradients; call this once per optimizer step, after the
    last backward pass. A missing gradient counts as zeros (every rank must take part).
    """
    replicated = [p for p in params if p.requires_grad and not is_sharded(p)]
    if not replicated:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in replicated]
    flat = torch.cat([g.reshape(-1).to(device, torch.float32) for g in grads])  # [sum numel]
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(replicated, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


@torch.no_grad()
def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, device: torch.device) -> float:
    """Scale the gradients so their global L2 norm is at most ``max_norm``; return that norm.

    The same as ``torch.nn.utils.clip_grad_norm_`` over the unsharded model: the squares of the
    local shards are summed over ranks, those of replicated gradients are counted once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if is_sharded(g):
            sharded += g.to_local().double().pow(2).sum()
        else:
            replicated += g.double().pow(2).sum()
    dist.all_reduce(sharded)
    total = float((sharded + replicated).sqrt())
    coef = min(1.0, max_norm / (total + 1e-6)) if math.isfinite(total) else math.nan
    if coef != 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def _options(**kw: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``state_dict`` of a sharded ``model`` on rank 0's CPU (``{}`` on other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state on rank 0's CPU, keyed like ``optimizer.state_dict()``.

    PyTorch's distributed state dict names parameters by their path; they are renumbered in
    ``param_groups`` order, as ``Optimizer.state_dict`` numbers them, so the checkpoint has the
    unsharded format. ``{}`` on ranks other than 0.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not state:
        return {}
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        numbered = [ids.setdefault(name, len(ids)) for name in group["params"]]
        groups.append({**group, "params": numbered})
    by_id = {ids[name]: value for name, value in state["state"].items()}
    return {"state": dict(sorted(by_id.items())), "param_groups": groups}


def load_model_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike
) -> None:
    """Load a whole ``state`` (every rank holds it) into sharded ``model``; errors name ``source``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from unclip.hub import check_weights

    check_weights(model.state_dict(), state, source)
    set_model_state_dict(model, dict(state), options=_options())


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load a whole ``optimizer.state_dict()``-format ``state`` (on every rank) into ``optimizer``
    over sharded ``model``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(order):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved)} parameters, this model {len(order)}"
        )
    name_of = dict(zip(saved, order, strict=True))
    by_name = {
        "state": {name_of[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [name_of[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"], strict=True):
        # as Optimizer.load_state_dict: the saved hyperparameters as they were (betas a tuple)
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def gather_full(state: Mapping[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU copies of ``state``'s tensors (shards gathered one at a time) where ``keep``
    (rank 0), ``{}`` elsewhere. For the EMA's shadow copy, which is sharded like the model."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        full = v.full_tensor() if is_sharded(v) else v
        if keep:
            out[k] = full.detach().cpu()
    return out


def shard_like(
    own: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``full``'s whole tensors (held by every rank) cut into this rank's shards wherever the
    matching tensor of ``own`` is sharded; other entries are returned as they are."""
    from torch.distributed.tensor import distribute_tensor

    out: dict[str, torch.Tensor] = {}
    for k, v in full.items():
        mine = own.get(k)
        if mine is not None and is_sharded(mine):
            out[k] = distribute_tensor(
                v.to(mine.device_mesh.device_type),
                mine.device_mesh,
                mine.placements,
                src_data_rank=None,  # every rank has the whole tensor: no communication
            )
        else:
            out[k] = v
    return out
