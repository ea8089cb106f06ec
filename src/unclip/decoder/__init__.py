"""The decoder (CLIP image embedding -> image) and the upsamplers: ADM/GLIDE UNets."""

from __future__ import annotations

from unclip.decoder.unet import UNet, UNetConfig, widen_to_inpainting
from unclip.decoder.upsampler import (
    Upsampler,
    UpsamplerConfig,
    augment_low_res,
    bsr_degrade,
    gaussian_blur,
    make_low_res,
)

__all__ = [
    "UNet",
    "UNetConfig",
    "Upsampler",
    "UpsamplerConfig",
    "augment_low_res",
    "bsr_degrade",
    "gaussian_blur",
    "make_low_res",
    "widen_to_inpainting",
]
