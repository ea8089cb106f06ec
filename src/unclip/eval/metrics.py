"""Sample-quality metrics in CLIP feature space: CLIP score, Fréchet distance, KID.

FD follows Heusel et al. 2017 (FID) and KID Bińkowski et al. 2018, computed on CLIP image
embeddings instead of Inception features (the features this project has offline).
"""

from __future__ import annotations

import torch

__all__ = ["clip_score", "frechet_distance", "kernel_distance", "matrix_sqrt_trace"]


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows: [N, D], [N, D] -> float."""
    a = torch.nn.functional.normalize(image_emb.double(), dim=-1)
    b = torch.nn.functional.normalize(text_emb.double(), dim=-1)
    return (a * b).sum(-1).mean().item()


def _sym_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def matrix_sqrt_trace(a: torch.Tensor, b: torch.Tensor) -> float:
    """tr((A B)^{1/2}) for symmetric PSD A, B, as tr((A^{1/2} B A^{1/2})^{1/2})."""
    ah = _sym_sqrt(a)
    vals = torch.linalg.eigvalsh(ah @ b @ ah)
    return vals.clamp(min=0).sqrt().sum().item()


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features x [N, D] and y [M, D]:
    |μx - μy|² + tr(Σx) + tr(Σy) - 2 tr((Σx Σy)^{1/2})."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    cx, cy = torch.cov(x.T), torch.cov(y.T)
    value = (mx - my).pow(2).sum() + cx.trace() + cy.trace() - 2 * matrix_sqrt_trace(cx, cy)
    return max(float(value), 0.0)


def kernel_distance(
    x: torch.Tensor, y: torch.Tensor, subsets: int = 10, subset_size: int = 100, seed: int = 0
) -> float:
    """KID: the unbiased MMD² with the kernel k(a, b) = (a·b / D + 1)³, averaged over random
    subsets of ``subset_size`` rows from each set (fewer if a set is smaller)."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=g)[:m]]
        b = y[torch.randperm(len(y), generator=g)[:m]]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        off = 1 - torch.eye(m, dtype=torch.float64)
        total += float(
            (kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean()
        )
    return total / subsets
