"""How close the prior's samples come to the true CLIP image embedding (DALL·E 2 §2.2, §5.1).

Three predictors of z_i from a caption, compared by mean cosine similarity to the true z_i:
the caption embedding z_t itself (the paper's "no prior" baseline), a linear regression from
z_t to z_i fitted on the training embeddings, and samples of the prior (diffusion or
autoregressive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "fit_linear_map",
    "linear_map_predict",
    "sample_ar_prior_embeddings",
    "sample_prior_embeddings",
]


def fit_linear_map(z_t: torch.Tensor, z_i: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Least-squares (ridge) map with bias from z_t [N, D] to z_i [N, D] -> W [D + 1, D]."""
    x = torch.cat([z_t.double(), torch.ones(len(z_t), 1, dtype=torch.float64)], dim=1)
    a = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(a, x.T @ z_i.double()).float()


def linear_map_predict(w: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Apply :func:`fit_linear_map`'s W and L2-normalise: [N, D] -> [N, D]."""
    x = torch.cat([z_t.float(), torch.ones(len(z_t), 1)], dim=1)
    return F.normalize(x @ w, dim=-1)


TextEncoder = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _sample_embeddings(
    prior: torch.nn.Module,
    diffusion: Any,
    text_encoder: TextEncoder,
    captions: Sequence[str],
    z_t: torch.Tensor,
    settings: Any,
    batch_size: int,
    seed: int,
) -> torch.Tensor:
    """:func:`unclip.pipeline.runners.sample_prior` (the pipeline's best-of-N sampler) on
    batches of captions, all drawn from one generator seeded with ``seed``. Returns [N, D]."""
    from unclip.pipeline.loading import Stage
    from unclip.pipeline.runners import sample_prior

    prior.eval()
    stage = Stage(prior, diffusion)
    g = torch.Generator().manual_seed(seed)
    out = []
    for lo in range(0, len(captions), batch_size):
        zt = z_t[lo : lo + batch_size]
        feats = mask = None
        if prior.config.text_dim:
            _, feats, mask = text_encoder(list(captions[lo : lo + batch_size]))
        out.append(sample_prior(stage, zt, feats, mask, settings, g, device=zt.device))
    return torch.cat(out)


@torch.no_grad()
def sample_prior_embeddings(
    prior: torch.nn.Module,
    diffusion: Any,
    text_encoder: TextEncoder,
    captions: Sequence[str],
    z_t: torch.Tensor,
    *,
    steps: int = 25,
    guidance: float = 1.0,
    candidates: int = 1,
    batch_size: int = 128,
    seed: int = 0,
) -> torch.Tensor:
    """Sample z_i for each caption with DDIM (η = 0); keep the candidate with the highest
    z_i·z_t.

    text_encoder: captions -> (z_t, token features [N, L, W], mask [N, L]); z_t: [N, D] the
    caption embeddings. Returns [N, D] unit-norm embeddings.
    """
    from unclip.pipeline.config import PriorSampling

    settings = PriorSampling(
        sampler="ddim", steps=steps, guidance=guidance, candidates=candidates, eta=0.0
    )
    return _sample_embeddings(
        prior, diffusion, text_encoder, captions, z_t, settings, batch_size, seed
    )


@torch.no_grad()
def sample_ar_prior_embeddings(
    prior: torch.nn.Module,
    text_encoder: TextEncoder,
    captions: Sequence[str],
    z_t: torch.Tensor,
    *,
    guidance: float = 1.0,
    candidates: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
) -> torch.Tensor:
    """Sample z_i for each caption with an autoregressive prior (:class:`unclip.prior.ARPrior`,
    conditioned on a high z_i·z_t bucket); keep the candidate with the highest z_i·z_t.

    Arguments as in :func:`sample_prior_embeddings`; ``guidance`` acts on the code logits.
    Returns [N, D] unit-norm embeddings.
    """
    from unclip.pipeline.config import PriorSampling

    settings = PriorSampling(
        candidates=candidates, ar_guidance=guidance, temperature=temperature, top_k=top_k,
        top_p=top_p,
    )  # fmt: skip
    return _sample_embeddings(prior, None, text_encoder, captions, z_t, settings, batch_size, seed)
