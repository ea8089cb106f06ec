"""Pipelines with random weights at the sizes of a folder of run configs (or of tiny built-in
configs): what ``unclip bench`` and the scripts in ``benchmarks/`` measure when the trained
weights are not at hand (speed does not depend on the weights' values)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from unclip.pipeline import UnclipPipeline

#: the caption every benchmark encodes (its content does not change the cost)
CAPTION = "cherry blossom, noto style"
CAPTIONS = [
    "a red square", "a green circle", "a blue square", "a black circle", "a red apple",
    "cherry blossom, noto style", "a yellow star", "a smiling face, twemoji style",
    "grinning face, fluent flat style", "red heart, openmoji style",
]  # fmt: skip


@dataclasses.dataclass
class StageConfigs:
    """Model and diffusion configs of every stage (what ``configs/<name>/*.json`` hold),
    the training batch size of each stage and the upsampler's training crop."""

    name: str
    clip: Any
    decoder: Any
    decoder_diffusion: Any
    prior: Any = None
    prior_diffusion: Any = None
    upsamplers: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    train_batch: dict[str, int] = dataclasses.field(default_factory=dict)
    crop_size: int = 0


def stage_configs_from_dir(folder: str | Path) -> StageConfigs:
    """The stage configs in a folder of run configs (``clip.json``, ``decoder.json`` and
    optionally ``prior.json``, ``upsampler.json``). The pipeline's decoder is the plain one
    (``inpaint`` off), as a pipeline folder's ``decoder/`` must be."""
    from unclip.run_configs import (
        ClipRunConfig,
        DecoderRunConfig,
        PriorRunConfig,
        UpsamplerRunConfig,
    )

    folder = Path(folder)
    for need in ("clip.json", "decoder.json"):
        if not (folder / need).is_file():
            raise FileNotFoundError(f"{folder}: no {need}; --configs needs a folder of run configs")
    clip = ClipRunConfig.load(folder / "clip.json")
    dec = DecoderRunConfig.load(folder / "decoder.json")
    sc = StageConfigs(
        name=folder.name,
        clip=clip.model,
        decoder=dec.model.replace(inpaint=False),
        decoder_diffusion=dec.diffusion,
        train_batch={"clip": clip.train.batch_size, "decoder": dec.train.batch_size},
    )
    if (folder / "prior.json").is_file():
        prior = PriorRunConfig.load(folder / "prior.json")
        sc.prior, sc.prior_diffusion = prior.model, prior.diffusion
        sc.train_batch["prior"] = prior.train.batch_size
    if (folder / "upsampler.json").is_file():
        up = UpsamplerRunConfig.load(folder / "upsampler.json")
        sc.upsamplers = [(up.model, up.diffusion)]
        sc.train_batch["upsampler"] = up.train.batch_size
        sc.crop_size = up.crop_size
    return sc


def tiny_stage_configs() -> StageConfigs:
    """Tiny stages (16 px decoder -> 32 px upsampler) for quick checks of the benchmarks."""
    from unclip.clip.model import CLIPConfig
    from unclip.config import DiffusionConfig
    from unclip.decoder.unet import UNetConfig
    from unclip.decoder.upsampler import UpsamplerConfig
    from unclip.prior.model import PriorConfig

    clip = CLIPConfig(
        embed_dim=32, context_length=16, vocab_size=1024, text_width=32, text_layers=1,
        text_heads=2, image_size=32, patch_size=8, vision_width=32, vision_layers=1,
        vision_heads=2,
    )  # fmt: skip
    decoder = UNetConfig(
        image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), num_head_channels=32, clip_dim=32, clip_tokens=4,
        text_dim=32, learn_sigma=True,
    )  # fmt: skip
    prior = PriorConfig(clip_dim=32, text_dim=32, text_len=16, width=64, layers=1, heads=2)
    up = UpsamplerConfig(
        image_size=32, low_res_size=16, model_channels=32, channel_mult=(1, 2),
        num_res_blocks=1, learn_sigma=True,
    )  # fmt: skip
    sigma = DiffusionConfig(timesteps=100, prediction="v", learn_sigma=True, loss="hybrid")
    return StageConfigs(
        name="tiny",
        clip=clip,
        decoder=decoder,
        decoder_diffusion=sigma,
        prior=prior,
        prior_diffusion=DiffusionConfig(timesteps=100, prediction="x0", clip_denoised=False),
        upsamplers=[(up, DiffusionConfig(timesteps=100, learn_sigma=True, loss="hybrid"))],
        train_batch={"clip": 4, "prior": 4, "decoder": 2, "upsampler": 2},
        crop_size=0,
    )


def randomize_zeros(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Give the zero-initialised parameters (output layers) random values, so an untrained
    network's output depends on its inputs, as a trained one's does."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def random_pipeline(
    sc: StageConfigs,
    *,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
) -> UnclipPipeline:
    """An :class:`~unclip.pipeline.UnclipPipeline` with random weights at the sizes of
    ``sc`` (built in memory; the tokenizer is learnt from a few captions)."""
    import torch

    from unclip.clip.model import CLIP
    from unclip.decoder.unet import UNet
    from unclip.decoder.upsampler import Upsampler
    from unclip.diffusion import GaussianDiffusion
    from unclip.pipeline import PipelineConfig, SamplingConfig, StagesConfig, UnclipPipeline
    from unclip.pipeline.config import upsampler_name
    from unclip.pipeline.loading import Stage, parse_device
    from unclip.prior.model import DiffusionPriorTransformer
    from unclip.tokenizer import train_tokenizer

    dev = parse_device(device)
    torch.manual_seed(seed)
    clip = CLIP(sc.clip).eval().to(dev)
    vocab = max(600, min(sc.clip.vocab_size, 1024))
    tokenizer = train_tokenizer(CAPTIONS * 4, vocab, context_length=sc.clip.context_length)

    def stage(model: torch.nn.Module, diffusion: Any, k: int) -> Stage:
        randomize_zeros(model, seed + k)
        return Stage(model.eval().to(dev), GaussianDiffusion.from_config(diffusion))

    prior = None
    if sc.prior is not None:
        prior = stage(DiffusionPriorTransformer(sc.prior), sc.prior_diffusion, 1)
    decoder = stage(UNet(sc.decoder), sc.decoder_diffusion, 2)
    ups = [stage(Upsampler(m), d, 3 + i) for i, (m, d) in enumerate(sc.upsamplers)]
    names = [upsampler_name(i) for i in range(len(ups))]
    config = PipelineConfig(
        name=sc.name,
        stages=StagesConfig(prior="prior" if prior else None, upsamplers=names),
        sampling=SamplingConfig(),
    )
    return UnclipPipeline(
        tokenizer=tokenizer, clip=clip, prior=prior, decoder=decoder, upsamplers=ups,
        config=config, device=dev, dtype=dtype,
    )  # fmt: skip
