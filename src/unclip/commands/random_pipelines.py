"""Pipelines with random weights at the sizes of a folder of run configs (or of tiny configs):
what ``unclip bench`` and the scripts in ``benchmarks/`` measure when the trained weights are
not at hand (speed does not depend on the weights' values), and the tests' tiny pipeline
(``tests/tiny_pipeline.py`` gives its configs).

One builder: :func:`random_models` makes every stage's network from a :class:`StageConfigs`
with seeded random weights; :func:`random_pipeline` assembles them in memory and
:func:`write_random_pipeline` writes them as training exports them and assembles a pipeline
folder (:func:`write_random_stages` writes only the stage folders).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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
    the training batch size of each stage and the upsampler's training crop; optionally an
    inpainting decoder (with the decoder's diffusion) and the pipeline's default sampling
    (None: :class:`~unclip.pipeline.SamplingConfig`'s defaults). A random pipeline's
    tokenizer is learnt from ``captions`` and its zero-initialised layers get N(0, std²)."""

    name: str
    clip: Any
    decoder: Any
    decoder_diffusion: Any
    prior: Any = None
    prior_diffusion: Any = None
    upsamplers: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    train_batch: dict[str, int] = dataclasses.field(default_factory=dict)
    crop_size: int = 0
    inpaint_decoder: Any = None
    sampling: Any = None
    captions: Sequence[str] = tuple(CAPTIONS)
    std: float = 0.02


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
    """Give the zero-initialised parameters (output layers) random values N(0, std²), so an
    untrained network's output depends on its inputs, as a trained one's does."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@dataclasses.dataclass
class RandomModels:
    """The networks of a random pipeline: CLIP, its tokenizer, and each sampling stage's
    network with its diffusion config, by the stage's folder name (``prior``, ``decoder``,
    ``inpaint_decoder``, ``upsampler``, ``upsampler2``, …), in pipeline order."""

    clip: Any
    tokenizer: Any
    stages: dict[str, tuple[Any, Any]]


def random_models(sc: StageConfigs, seed: int = 0) -> RandomModels:
    """Every network of ``sc`` with random weights: torch's global generator seeded with
    ``seed`` draws the initial weights, stage by stage in pipeline order, and stage k's
    zero-initialised layers get N(0, ``sc.std``²) from seed + k (prior 1, decoder 2, then the
    inpainting decoder and the upsamplers). The tokenizer is learnt from ``sc.captions``."""
    import torch

    from unclip.clip.model import CLIP
    from unclip.decoder.unet import UNet
    from unclip.decoder.upsampler import Upsampler
    from unclip.pipeline.config import upsampler_name
    from unclip.prior.model import DiffusionPriorTransformer
    from unclip.tokenizer import train_tokenizer

    std = sc.std
    torch.manual_seed(seed)
    clip = CLIP(sc.clip)
    vocab = max(600, min(sc.clip.vocab_size, 1024))
    tokenizer = train_tokenizer(list(sc.captions) * 4, vocab, context_length=sc.clip.context_length)
    stages: dict[str, tuple[Any, Any]] = {}
    if sc.prior is not None:
        prior = randomize_zeros(DiffusionPriorTransformer(sc.prior), seed + 1, std)
        stages["prior"] = (prior, sc.prior_diffusion)
    stages["decoder"] = (randomize_zeros(UNet(sc.decoder), seed + 2, std), sc.decoder_diffusion)
    k = 3
    if sc.inpaint_decoder is not None:
        inpaint = randomize_zeros(UNet(sc.inpaint_decoder), seed + k, std)
        stages["inpaint_decoder"] = (inpaint, sc.decoder_diffusion)
        k += 1
    for i, (model, diffusion) in enumerate(sc.upsamplers):
        stages[upsampler_name(i)] = (
            randomize_zeros(Upsampler(model), seed + k + i, std),
            diffusion,
        )
    return RandomModels(clip, tokenizer, stages)


def random_pipeline(
    sc: StageConfigs,
    *,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
) -> UnclipPipeline:
    """An :class:`~unclip.pipeline.UnclipPipeline` with the networks of
    :func:`random_models`, built in memory."""
    from unclip.diffusion import GaussianDiffusion
    from unclip.pipeline import PipelineConfig, SamplingConfig, StagesConfig, UnclipPipeline
    from unclip.pipeline.stages import Stage, parse_device

    dev = parse_device(device)
    models = random_models(sc, seed)
    stages = {
        name: Stage(model.eval().to(dev), GaussianDiffusion.from_config(diffusion))
        for name, (model, diffusion) in models.stages.items()
    }
    names = [name for name in stages if name.startswith("upsampler")]
    config = PipelineConfig(
        name=sc.name,
        stages=StagesConfig(
            prior="prior" if "prior" in stages else None,
            inpaint_decoder="inpaint_decoder" if "inpaint_decoder" in stages else None,
            upsamplers=names,
        ),
        sampling=sc.sampling or SamplingConfig(),
    )
    return UnclipPipeline(
        tokenizer=models.tokenizer,
        clip=models.clip.eval().to(dev),
        prior=stages.get("prior"),
        decoder=stages["decoder"],
        inpaint_decoder=stages.get("inpaint_decoder"),
        upsamplers=[stages[name] for name in names],
        config=config,
        device=dev,
        dtype=dtype,
    )


def write_random_stages(sc: StageConfigs, root: str | Path, seed: int = 0) -> dict[str, Path]:
    """The networks of :func:`random_models` written under ``root`` as training exports them
    (RUN/final of each stage: weights, the same EMA weights, ``diffusion.json``; CLIP with its
    tokenizer in ``clip/tokenizer``). Returns the folders by stage name (and ``clip``)."""
    from unclip.config import DIFFUSION_FILE
    from unclip.hub import save_pretrained

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    models = random_models(sc, seed)
    folders = {"clip": root / "clip"}
    save_pretrained(models.clip, folders["clip"])
    models.tokenizer.save(folders["clip"] / "tokenizer")
    for name, (model, diffusion) in models.stages.items():
        folders[name] = root / name
        ema = {k: v.clone() for k, v in model.state_dict().items()}
        save_pretrained(model, folders[name], ema=ema)
        diffusion.save(folders[name] / DIFFUSION_FILE)
    return folders


def write_random_pipeline(
    sc: StageConfigs,
    out: str | Path,
    seed: int = 0,
    *,
    prior: bool = True,
    inpaint_decoder: bool = True,
) -> Path:
    """A pipeline folder at ``out`` assembled from :func:`write_random_stages` (written to
    ``OUT-stages`` beside it), with or without its ``prior`` and ``inpaint_decoder``, and
    ``sc.sampling`` as its default sampling. Returns ``out``."""
    from unclip.pipeline import assemble_pipeline

    out = Path(out)
    folders = write_random_stages(sc, out.parent / f"{out.name}-stages", seed)
    return assemble_pipeline(
        out,
        clip=folders["clip"],
        prior=folders.get("prior") if prior else None,
        decoder=folders["decoder"],
        inpaint_decoder=folders.get("inpaint_decoder") if inpaint_decoder else None,
        upsamplers=[path for name, path in folders.items() if name.startswith("upsampler")],
        sampling=sc.sampling,
        name=sc.name,
    )
