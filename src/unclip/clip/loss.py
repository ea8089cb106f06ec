"""CLIP's symmetric contrastive loss (InfoNCE; Radford et al. 2021, Fig. 3), global over ranks.

Under ``torch.distributed`` every rank gathers the features of all ranks, so each image is
contrasted with every caption of the global batch. The gathered copies carry no gradient
except the rank's own shard, which is the local tensor itself: each rank's backward gives the
part of the global loss's gradient that flows through its own samples, and the parts *sum* to
the whole. DistributedDataParallel (and FSDP) *average* gradients over ranks, so
:func:`clip_training_loss` multiplies the loss it returns for the backward pass by the world
size (and scales the temperature's gradient back, as every rank computes its part in
full): N processes then take exactly the steps one process takes with the same global batch
(gradient clipping included). Without an initialised process group the features are used as
they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' features concatenated in rank order, and where this rank's shard starts.

    features: [n_local, D] (the same n_local on every rank) -> ([world · n_local, D], offset).
    The local shard keeps its gradient; the other shards are constants.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([features.shape[0]], device=features.device))
    if any(int(s) != features.shape[0] for s in sizes):
        raise ValueError(
            "the contrastive loss needs the same batch size on every rank "
            f"(got {[int(s) for s in sizes]}); drop the last incomplete batch"
        )
    shards = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(shards, features.detach().contiguous())
    shards[rank] = features
    return torch.cat(shards, dim=0), rank * features.shape[0]


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """Mean of the image→text and text→image cross-entropies over the (global) batch.

    image_features, text_features: [N, D], L2-normalised, row i of each a matching pair;
    logit_scale: the inverse temperature (already exponentiated and clamped, e.g.
    ``CLIP.logit_scale_value()``). Logits are ``logit_scale · image @ text.T`` ([N, N]).
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features differ in shape: {tuple(image_features.shape)} vs "
            f"{tuple(text_features.shape)}"
        )
    if gather:
        image_features, _ = gather_features(image_features)
        text_features, _ = gather_features(text_features)
    logits = logit_scale * image_features.float() @ text_features.float().T  # [N, N]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_training_loss(
    model: nn.Module, batch: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_fn(model, batch)`` for the training loop; batch = (pixels, tokens) or a dict with
    ``"pixels"`` and ``"tokens"``. Reports the loss, the temperature's scale and the in-batch
    image→text accuracy, as detached tensors (read by the host only when it logs)."""
    if isinstance(batch, dict):
        pixels, tokens = batch["pixels"], batch["tokens"]
    else:
        pixels, tokens = batch[0], batch[1]
    image, text, scale = model(pixels, tokens)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        # The temperature enters every rank's loss whole (not through gathered features), so
        # its gradient must not be multiplied: same value, 1/world of the gradient.
        scale = scale / world + (scale - scale / world).detach()
    loss = clip_loss(image, text, scale)
    with torch.no_grad():
        acc = (image.float() @ text.float().T).argmax(dim=1) == torch.arange(
            image.shape[0], device=image.device
        )
    # The backward pass needs the loss times the world size (module docstring); the log shows
    # the global loss itself.
    return loss * world, {
        "loss": loss.detach(),
        "logit_scale": scale.detach(),
        "acc": acc.float().mean(),
    }


__all__ = ["clip_loss", "clip_training_loss", "gather_features"]
