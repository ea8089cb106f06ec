"""``unclip train upsampler``: a diffusion upsampler conditioned on the low-resolution image
(DALL·E 2 §2.1: no caption, conditioning augmentation by blur or BSR degradation)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Images:
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[i]["image"]


def random_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """One random ``size``² crop per image (the global RNG of the images' device), gathered as
    one tensor operation: [N, C, H, W] -> [N, C, s, s]."""
    import torch

    n, _, h, w = images.shape
    if size <= 0 or (size >= h and size >= w):
        return images
    sh, sw = min(size, h), min(size, w)
    top = torch.randint(0, h - sh + 1, (n, 1), device=images.device)  # [N, 1]
    left = torch.randint(0, w - sw + 1, (n, 1), device=images.device)
    rows = top + torch.arange(sh, device=images.device)  # [N, s]
    cols = left + torch.arange(sw, device=images.device)
    batch = torch.arange(n, device=images.device)[:, None, None]  # [N, 1, 1]
    # advanced indices around a slice: the indexed dims come first -> [N, s, s, C]
    return images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class UpsamplerLoss:
    """The diffusion loss of an upsampler on (optionally cropped) images and their degraded
    low-resolution versions."""

    def __init__(self, diffusion, config, crop_size: int = 0) -> None:
        self.diffusion = diffusion
        self.config = config
        self.crop_size = crop_size

    def __call__(self, model, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        from unclip.decoder.upsampler import make_low_res
        from unclip.train.stages.common import diffusion_metrics

        images = random_crop(images, self.crop_size)
        low = make_low_res(images, self.config)
        t = self.diffusion.sample_timesteps(images.shape[0], device=images.device)
        return diffusion_metrics(self.diffusion.training_losses(model, images, t, {"low_res": low}))


def run(args: argparse.Namespace) -> int:
    from unclip.decoder.upsampler import Upsampler
    from unclip.diffusion import GaussianDiffusion
    from unclip.run_configs import UpsamplerRunConfig
    from unclip.train.checkpoint import latest_checkpoint
    from unclip.train.loop import Trainer
    from unclip.train.stages.common import (
        check_pixel_stage,
        count_parameters,
        fit_and_export,
        load_run_config,
        open_images,
        sample_weights,
        start_from,
    )

    cfg = load_run_config(UpsamplerRunConfig, args)
    check_pixel_stage(cfg, args.config or args.run_dir)
    images = open_images(cfg)
    model = Upsampler(cfg.model)
    print(f"unclip: upsampler with {count_parameters(model) / 1e6:.1f}M parameters, "
          f"{len(images)} images")  # fmt: skip
    if cfg.init and not (args.resume and latest_checkpoint(args.run_dir)):
        start_from(model, cfg.init, args.config or args.run_dir, "upsampler")
    trainer = Trainer(
        model,
        UpsamplerLoss(GaussianDiffusion.from_config(cfg.diffusion), cfg.model, cfg.crop_size),
        Images(images),
        cfg.train,
        args.run_dir,
        device=args.device,
        progress=not args.no_progress,
        weights=sample_weights(cfg, images, args.config or args.run_dir),
        fsdp=args.fsdp,
    )
    fit_and_export(trainer, args, cfg.diffusion)
    return 0
