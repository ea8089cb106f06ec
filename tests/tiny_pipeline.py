"""A tiny pipeline with random weights, written to a folder in under a second.

Every stage is built from a tiny config and saved as ``unclip train`` would export it (model
folder + ``diffusion.json``); the tokenizer is learnt from a handful of captions. The
zero-initialised output layers get random weights, so every output depends on every input
(an untrained UNet otherwise predicts zeros whatever its conditions).
"""

from __future__ import annotations

from pathlib import Path

import torch

from unclip.clip.model import CLIP, CLIPConfig
from unclip.config import DiffusionConfig
from unclip.decoder.unet import UNet, UNetConfig
from unclip.decoder.upsampler import Upsampler, UpsamplerConfig
from unclip.hub import save_pretrained
from unclip.pipeline.config import (
    DecoderSampling,
    PriorSampling,
    SamplingConfig,
    UpsamplerSampling,
)
from unclip.prior.model import DiffusionPriorTransformer, PriorConfig
from unclip.tokenizer import train_tokenizer

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


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _unet(inpaint: bool = False) -> UNetConfig:
    return UNetConfig(
        image_size=BASE, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(4,), num_head_channels=8, clip_dim=EMBED, clip_tokens=2,
        text_dim=TEXT_WIDTH, learn_sigma=True, inpaint=inpaint,
    )  # fmt: skip


def write_stage(model: torch.nn.Module, folder: Path, diffusion: DiffusionConfig, seed: int):
    """A stage folder as training exports it (raw + EMA weights, diffusion.json)."""
    randomize(model, seed)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained(model, folder, ema=ema)
    diffusion.save(folder / "diffusion.json")


def write_stages(root: Path, seed: int = 0) -> dict[str, Path]:
    """Stage folders (like RUN/final of each training stage) under ``root``."""
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    clip_dir = root / "clip"
    clip = CLIP(CLIPConfig(
        embed_dim=EMBED, context_length=CONTEXT, vocab_size=600, text_width=TEXT_WIDTH,
        text_layers=1, text_heads=2, image_size=16, patch_size=8, vision_width=32,
        vision_layers=1, vision_heads=2,
    ))  # fmt: skip
    save_pretrained(clip, clip_dir)
    train_tokenizer(CAPTIONS * 4, 600, context_length=CONTEXT).save(clip_dir / "tokenizer")

    fast = DiffusionConfig(timesteps=50)
    sigma = DiffusionConfig(timesteps=50, learn_sigma=True, loss="hybrid")
    prior = DiffusionPriorTransformer(PriorConfig(
        clip_dim=EMBED, text_dim=TEXT_WIDTH, text_len=CONTEXT, width=32, layers=1, heads=2,
    ))  # fmt: skip
    write_stage(prior, root / "prior", DiffusionConfig(timesteps=50, prediction="x0"), seed + 1)
    write_stage(UNet(_unet()), root / "decoder", sigma, seed + 2)
    write_stage(UNet(_unet(inpaint=True)), root / "inpaint_decoder", sigma, seed + 3)
    up = Upsampler(UpsamplerConfig(
        image_size=OUT, low_res_size=BASE, model_channels=16, channel_mult=(1, 2),
        num_res_blocks=1,
    ))  # fmt: skip
    write_stage(up, root / "upsampler", fast, seed + 4)
    return {
        "clip": clip_dir,
        "prior": root / "prior",
        "decoder": root / "decoder",
        "inpaint_decoder": root / "inpaint_decoder",
        "upsampler": root / "upsampler",
    }


def write_tiny_pipeline(
    out: Path, seed: int = 0, inpaint_decoder: bool = True, prior: bool = True
) -> Path:
    """A whole pipeline folder (8 px decoder -> 16 px upsampler) with fast default sampling."""
    from unclip.pipeline import assemble_pipeline

    stages = write_stages(out.parent / f"{out.name}-stages", seed)
    return assemble_pipeline(
        out,
        clip=stages["clip"],
        prior=stages["prior"] if prior else None,
        decoder=stages["decoder"],
        inpaint_decoder=stages["inpaint_decoder"] if inpaint_decoder else None,
        upsamplers=[stages["upsampler"]],
        sampling=FAST_SAMPLING,
        name="tiny",
    )
