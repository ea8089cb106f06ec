"""The diffusion prior: text (CLIP z_t and caption tokens) -> CLIP image embedding z_i."""

from __future__ import annotations

from unclip.prior.model import (
    DiffusionPriorTransformer,
    PriorConfig,
    scale_embedding,
    unscale_embedding,
)

__all__ = ["DiffusionPriorTransformer", "PriorConfig", "scale_embedding", "unscale_embedding"]
