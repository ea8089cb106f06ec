"""The tests' tiny pipeline (8 px decoder -> 16 px upsampler, fast default sampling): its
configs, built and written by the one random-pipeline builder the benchmarks use
(:mod:`unclip.commands.random_pipelines`) in under a second.

Every stage is saved as ``unclip train`` would export it (model folder + ``diffusion.json``);
the tokenizer is learnt from a handful of captions. The zero-initialised output layers get
random weights (std 0.1), so every output depends on every input (an untrained UNet otherwise
predicts zeros whatever its conditions).
"""

from __future__ import annotations

from pathlib import Path

from unclip.clip.model import CLIPConfig
from unclip.commands.random_pipelines import (
    StageConfigs,
    write_random_pipeline,
    write_random_stages,
)
from unclip.config import DiffusionConfig
from unclip.decoder.unet import UNetConfig
from unclip.decoder.upsampler import UpsamplerConfig
from unclip.pipeline.config import (
    DecoderSampling,
    PriorSampling,
    SamplingConfig,
    UpsamplerSampling,
)
from unclip.prior.model import PriorConfig

EMBED, CONTEXT, TEXT_WIDTH, BASE, OUT = 16, 12, 32, 8, 16
CAPTIONS = [
    "a red square", "a green circle", "a blue square", "a black circle", "a red apple",
    "cherry blossom, noto style", "a yellow star", "a smiling face",
]  # fmt: skip
#: few steps and few timesteps: sampling a whole image takes milliseconds
FAST_SAMPLING = SamplingConfig(
    prior=PriorSampling(steps=2, guidance=4.0, candidates=2),
    decoder=DecoderSampling(steps=2, guidance=8.0),
    upsampler=UpsamplerSampling(steps=2),
)


def _clip() -> CLIPConfig:
    return CLIPConfig(
        embed_dim=EMBED, context_length=CONTEXT, vocab_size=600, text_width=TEXT_WIDTH,
        text_layers=1, text_heads=2, image_size=16, patch_size=8, vision_width=32,
        vision_layers=1, vision_heads=2,
    )  # fmt: skip


def _unet(inpaint: bool = False) -> UNetConfig:
    return UNetConfig(
        image_size=BASE, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(4,), num_head_channels=8, clip_dim=EMBED, clip_tokens=2,
        text_dim=TEXT_WIDTH, learn_sigma=True, inpaint=inpaint,
    )  # fmt: skip


def _upsampler() -> UpsamplerConfig:
    return UpsamplerConfig(
        image_size=OUT, low_res_size=BASE, model_channels=16, channel_mult=(1, 2),
        num_res_blocks=1,
    )  # fmt: skip


TINY = StageConfigs(
    name="tiny",
    clip=_clip(),
    prior=PriorConfig(
        clip_dim=EMBED, text_dim=TEXT_WIDTH, text_len=CONTEXT, width=32, layers=1, heads=2
    ),
    prior_diffusion=DiffusionConfig(timesteps=50, prediction="x0"),
    decoder=_unet(),
    decoder_diffusion=DiffusionConfig(timesteps=50, learn_sigma=True, loss="hybrid"),
    inpaint_decoder=_unet(inpaint=True),
    upsamplers=[(_upsampler(), DiffusionConfig(timesteps=50))],
    sampling=FAST_SAMPLING,
    captions=CAPTIONS,
    std=0.1,  # larger than the benchmarks': visible differences between inputs
)
"""The tiny pipeline's stages."""


def write_stages(root: Path, seed: int = 0) -> dict[str, Path]:
    """Stage folders (like RUN/final of each training stage) under ``root``: ``clip``,
    ``prior``, ``decoder``, ``inpaint_decoder``, ``upsampler``."""
    return write_random_stages(TINY, root, seed)


def write_tiny_pipeline(
    out: Path, seed: int = 0, inpaint_decoder: bool = True, prior: bool = True
) -> Path:
    """A whole pipeline folder with fast default sampling (stages in ``OUT-stages``)."""
    return write_random_pipeline(TINY, out, seed, prior=prior, inpaint_decoder=inpaint_decoder)
