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
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
) -> torch.Tensor:
    """z_i for each caption from the pipeline's prior sampler
    (:func:`unclip.pipeline.runners.sample_prior`): ``candidates`` samples per caption, the one
    with the highest z_i·z_t kept; batches of ``batch_size`` captions, all drawn from one
    generator seeded with ``seed``.

    A diffusion prior (``diffusion`` given) samples with DDIM (η = 0) in ``steps`` steps; an
    autoregressive one (:class:`unclip.prior.ARPrior`, ``diffusion`` None, conditioned on a
    high z_i·z_t bucket) samples codes with ``temperature``, ``top_k`` and ``top_p``.
    ``guidance`` guides the model (the code logits of an autoregressive prior).
    text_encoder: captions -> (z_t, token features [N, L, W], mask [N, L]), read only where
    the prior takes the caption's tokens; z_t: [N, D] the caption embeddings.
    Returns [N, D] unit-norm embeddings.
    """
    from unclip.pipeline.config import PriorSampling
    from unclip.pipeline.runners import RunContext, TextCondition, sample_prior
    from unclip.pipeline.stages import Stage

    ar = {"ar_guidance": guidance, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    settings = PriorSampling(steps=steps, guidance=guidance, candidates=candidates, **ar)
    prior.eval()
    stage = Stage(prior, diffusion)
    g = torch.Generator().manual_seed(seed)
    out = []
    for lo in range(0, len(captions), batch_size):
        zt = z_t[lo : lo + batch_size]
        feats = mask = None
        if prior.config.text_dim:
            _, feats, mask = text_encoder(list(captions[lo : lo + batch_size]))
        text = TextCondition("", zt, feats, mask)
        out.append(sample_prior(stage, text, settings, g, RunContext(zt.device)))
    return torch.cat(out)


def sample_ar_prior_embeddings(
    prior: torch.nn.Module,
    text_encoder: TextEncoder,
    captions: Sequence[str],
    z_t: torch.Tensor,
    **options: Any,
) -> torch.Tensor:
    """:func:`sample_prior_embeddings` with an autoregressive prior (no diffusion)."""
    return sample_prior_embeddings(prior, None, text_encoder, captions, z_t, **options)
