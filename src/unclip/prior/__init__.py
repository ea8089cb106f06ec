"""The two priors of DALL·E 2 (§2.2): text (CLIP z_t and caption tokens) -> CLIP image
embedding z_i. :mod:`.model` is the diffusion prior, :mod:`.ar` the autoregressive one."""

from __future__ import annotations

from unclip.prior.ar import ARPrior, ARPriorConfig
from unclip.prior.codebook import Codebook, fit_codebook
from unclip.prior.model import (
    DiffusionPriorTransformer,
    PriorConfig,
    scale_embedding,
    unscale_embedding,
)

__all__ = [
    "ARPrior",
    "ARPriorConfig",
    "Codebook",
    "DiffusionPriorTransformer",
    "PriorConfig",
    "fit_codebook",
    "scale_embedding",
    "unscale_embedding",
]
