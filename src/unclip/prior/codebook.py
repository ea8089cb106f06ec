"""The code book of the autoregressive prior (:mod:`unclip.prior.ar`): PCA + quantisation.

PCA fitted on unit-normalised training CLIP image embeddings keeps the ``K`` leading
principal components, ordered by decreasing eigenvalue, and each component is quantised into
``B`` buckets with quantile edges (Ramesh et al. 2022, §2.2). :func:`fit_codebook` fits it;
:class:`unclip.prior.ar.ARPrior` keeps it in its buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Codebook:
    """A fitted PCA + quantiser (what :class:`unclip.prior.ar.ARPrior` keeps in its buffers).

    mean: [D]; components: [K, D] orthonormal rows, by decreasing eigenvalue;
    explained: [K] share of the total variance of each component; edges: [K, B - 1]
    interior bucket edges (quantiles); centres: [K, B] the mean training value of each
    bucket (midpoint of its edges when empty); dot_edges: [Bd - 1] edges of z_i·z_t.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained: torch.Tensor
    edges: torch.Tensor
    centres: torch.Tensor
    dot_edges: torch.Tensor

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, D] -> codes [N, K] long."""
        return pca_quantize(z, self.mean, self.components, self.edges)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [N, K] -> unit-norm z [N, D]."""
        return pca_dequantize(codes, self.mean, self.components, self.centres)


def _quantile_edges(x: torch.Tensor, buckets: int) -> torch.Tensor:
    """x: [N, K] -> interior edges [K, B - 1] at quantiles 1/B … (B-1)/B of each column."""
    q = torch.arange(1, buckets, dtype=x.dtype) / buckets  # [B - 1]
    return torch.quantile(x, q, dim=0).T.contiguous()  # [K, B - 1]


def _bucketize(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """x: [N, K], edges: [K, B - 1] sorted -> bucket indices [N, K] in 0..B-1."""
    return torch.searchsorted(edges.contiguous(), x.T.contiguous(), right=True).T  # [N, K]


def fit_codebook(
    z_i: torch.Tensor,
    z_t: torch.Tensor | None = None,
    *,
    components: int = 0,
    variance: float = 0.99,
    buckets: int = 256,
    dot_buckets: int = 16,
) -> Codebook:
    """Fit PCA (on unit-normalised z_i: [N, D]) and the quantile buckets, deterministically.

    ``components`` > 0 keeps that many principal components, 0 the fewest whose explained
    variance reaches ``variance``. Eigenvectors come from ``torch.linalg.eigh`` in float64,
    each signed so its largest-magnitude entry is positive. ``z_t`` ([N, D], or None: a
    single dot bucket) gives the z_i·z_t quantile edges.
    """
    x = F.normalize(z_i.detach().double().cpu(), dim=-1)  # [N, D]
    n, d = x.shape
    if n < 2:
        raise ValueError(f"fitting the PCA needs at least 2 embeddings, got {n}")
    mean = x.mean(0)  # [D]
    xc = x - mean
    cov = xc.T @ xc / (n - 1)  # [D, D]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)  # descending
    ratio = evals / evals.sum().clamp_min(1e-30)  # [D]
    if components <= 0:
        cum = ratio.cumsum(0)
        components = int((cum < variance - 1e-9).sum().item()) + 1
    components = max(1, min(components, d))
    comps = evecs[:, :components].T.contiguous()  # [K, D]
    idx = comps.abs().argmax(dim=1)
    comps = comps * comps.gather(1, idx[:, None]).sign()  # deterministic sign
    y = xc @ comps.T  # [N, K]
    edges = _quantile_edges(y, buckets)  # [K, B - 1]
    codes = _bucketize(y, edges)  # [N, K]
    sums = torch.zeros(components, buckets, dtype=torch.float64)
    counts = torch.zeros(components, buckets, dtype=torch.float64)
    sums.scatter_add_(1, codes.T, y.T)
    counts.scatter_add_(1, codes.T, torch.ones_like(y.T))
    lo = torch.cat([y.min(0).values[:, None], edges], dim=1)  # [K, B] left ends
    hi = torch.cat([edges, y.max(0).values[:, None]], dim=1)  # [K, B] right ends
    centres = torch.where(counts > 0, sums / counts.clamp_min(1), (lo + hi) / 2)
    if z_t is not None and dot_buckets > 1:
        dots = (x * F.normalize(z_t.detach().double().cpu(), dim=-1)).sum(-1, keepdim=True)
        dot_edges = _quantile_edges(dots, dot_buckets)[0]  # [Bd - 1]
    else:
        dot_edges = torch.zeros(dot_buckets - 1, dtype=torch.float64)
    return Codebook(
        mean=mean.float(),
        components=comps.float(),
        explained=ratio[:components].float(),
        edges=edges.float(),
        centres=centres.float(),
        dot_edges=dot_edges.float(),
    )


def pca_quantize(
    z: torch.Tensor, mean: torch.Tensor, components: torch.Tensor, edges: torch.Tensor
) -> torch.Tensor:
    """z: [N, D] (any norm) -> codes [N, K] long: bucket of each principal coordinate."""
    with torch.autocast(z.device.type, enabled=False):
        y = (F.normalize(z.float(), dim=-1) - mean.float()) @ components.float().T  # [N, K]
        return _bucketize(y, edges.float())


def pca_dequantize(
    codes: torch.Tensor, mean: torch.Tensor, components: torch.Tensor, centres: torch.Tensor
) -> torch.Tensor:
    """codes: [N, K] -> z [N, D]: bucket centres, inverse PCA, L2-normalised."""
    with torch.autocast(codes.device.type, enabled=False):
        y = centres.float().gather(1, codes.long().T).T  # [N, K]
        return F.normalize(y @ components.float() + mean.float(), dim=-1)
