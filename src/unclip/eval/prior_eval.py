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


def _best_of_candidates(
    sample_batch: Callable[[torch.Tensor, Any, Any], torch.Tensor],
    text_encoder: TextEncoder,
    captions: Sequence[str],
    z_t: torch.Tensor,
    *,
    text_dim: int,
    candidates: int,
    batch_size: int,
) -> torch.Tensor:
    """Run ``sample_batch(z_t [M, D], token features [M, L, W] | None, mask | None) -> z [M, D]``
    on batches of captions, each repeated ``candidates`` times, and keep per caption the
    candidate with the highest z_i·z_t (DALL·E 2 §2.2). Returns [N, D]."""
    out = []
    for lo in range(0, len(captions), batch_size):
        caps = list(captions[lo : lo + batch_size])
        zt = z_t[lo : lo + batch_size]
        n = len(caps)
        feats = mask = None
        if text_dim:
            _, feats, mask = text_encoder(caps)
            feats = feats.repeat_interleave(candidates, 0)
            mask = mask.repeat_interleave(candidates, 0)
        z = sample_batch(zt.repeat_interleave(candidates, 0), feats, mask).view(n, candidates, -1)
        best = (z @ zt[:, :, None]).squeeze(-1).argmax(dim=1)  # [n]
        out.append(z[torch.arange(n), best])
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
    """Sample z_i for each caption with DDIM; keep the candidate with the highest z_i·z_t.

    text_encoder: captions -> (z_t, token features [N, L, W], mask [N, L]); z_t: [N, D] the
    caption embeddings. Returns [N, D] unit-norm embeddings.
    """
    from unclip.diffusion import classifier_free_guidance, ddim_sample, final
    from unclip.prior.model import unscale_embedding

    prior.eval()
    g = torch.Generator().manual_seed(seed)

    def sample_batch(zt: torch.Tensor, feats: Any, mask: Any) -> torch.Tensor:
        m = len(zt)
        cond, uncond = prior.sampling_conditions(zt, feats, mask)  # caption caches
        fn: Any = prior
        if guidance != 1.0:
            fn = classifier_free_guidance(prior, guidance, cond, uncond)
            cond = {}
        x = final(ddim_sample(diffusion, fn, (m, prior.config.clip_dim), steps, generator=g,
                              model_kwargs=cond or None))  # fmt: skip
        return unscale_embedding(x, prior.config.embed_scale)

    return _best_of_candidates(
        sample_batch, text_encoder, captions, z_t,
        text_dim=prior.config.text_dim, candidates=candidates, batch_size=batch_size,
    )  # fmt: skip


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
    prior.eval()
    g = torch.Generator().manual_seed(seed)

    def sample_batch(zt: torch.Tensor, feats: Any, mask: Any) -> torch.Tensor:
        return prior.sample(
            zt, feats, mask, guidance=guidance, temperature=temperature, top_k=top_k,
            top_p=top_p, generator=g,
        )  # fmt: skip

    return _best_of_candidates(
        sample_batch, text_encoder, captions, z_t,
        text_dim=prior.config.text_dim, candidates=candidates, batch_size=batch_size,
    )  # fmt: skip
