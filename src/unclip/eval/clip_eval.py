"""How good a CLIP is: retrieval recall and zero-shot classification (Radford et al. 2021 §3).

All functions take L2-normalised embeddings; row ``i`` of the image and text embeddings is a
matching pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "class_embeddings",
    "recall_at_k",
    "retrieval_metrics",
    "zero_shot_accuracy",
]


def hits_at_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[Q] bool: whether each query's match (column ``i`` for row ``i`` of ``scores`` [Q, C])
    is among its ``k`` highest-scoring candidates."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # [Q, k]
    target = torch.arange(scores.shape[0], device=scores.device)[:, None]
    return (top == target).any(dim=1)


def recall_at_k(scores: torch.Tensor, k: int) -> float:
    """Fraction of queries (rows of ``scores`` [Q, C]) whose match (column ``i`` for row ``i``)
    is among the ``k`` highest-scoring candidates."""
    return hits_at_k(scores, k).float().mean().item()


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    """Text→image and image→text recall@1/@5/@10 among the given pairs.

    image_emb, text_emb: [N, D] L2-normalised, row i of each a pair.
    """
    sim = text_emb.float() @ image_emb.float().T  # [N texts, N images]
    out = {}
    for k in (1, 5, 10):
        out[f"text_to_image_r@{k}"] = recall_at_k(sim, k)
        out[f"image_to_text_r@{k}"] = recall_at_k(sim.T, k)
    return out


def zero_shot_accuracy(
    image_emb: torch.Tensor,
    truth: Sequence[str],
    class_emb: torch.Tensor,
    classes: Sequence[str],
) -> dict[str, float]:
    """Accuracy of picking, for each image, the class whose prompt embedding is closest.

    image_emb: [N, D]; truth: N class names; class_emb: [C, D] (one prompt per class, e.g.
    "{} style"); classes: C names. Returns overall accuracy and the mean per-class accuracy.
    """
    index = {c: i for i, c in enumerate(classes)}
    target = torch.tensor([index[t] for t in truth])
    pred = (image_emb.float() @ class_emb.float().T).argmax(dim=1).cpu()
    correct = (pred == target).float()
    per_class = [
        correct[target == i].mean().item() for i in range(len(classes)) if (target == i).any()
    ]
    return {"accuracy": correct.mean().item(), "mean_per_class": sum(per_class) / len(per_class)}


def class_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor],
    templates: Sequence[str],
    classes: Sequence[str],
) -> torch.Tensor:
    """One prompt embedding per class, ensembled over ``templates`` (CLIP §3.1.4): each
    template's ``{}`` is filled with the class name, the texts are encoded, and their mean is
    L2-normalised. ``encode_text``: list of T texts -> [T, D]. Returns [C, D]."""
    rows = [encode_text([t.format(c) for t in templates]).float().mean(0) for c in classes]
    return F.normalize(torch.stack(rows), dim=-1)
