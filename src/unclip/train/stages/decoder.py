"""``unclip train decoder``: the GLIDE-style decoder, from CLIP image embedding (+ caption) to
pixels (DALL·E 2 §2.1), optionally with the inpainting inputs (GLIDE §4).

Images come from the data set (``data.path``/``split`` at ``data.image_size``), their CLIP image
embeddings from ``unclip embed`` shards of the same samples (joined by key), the caption's
token features from the frozen CLIP text encoder (``clip``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ImagesWithEmbeddings:
    """``(image [3, S, S], image_emb [D], caption)``: images joined with their embeddings by key."""

    def __init__(self, images, shards) -> None:
        self.images = images
        self.shards = shards
        missing = 0
        for i in range(min(len(images), 64)):
            if images.load(i)[0] not in shards:
                missing += 1
        if missing:
            raise ValueError(
                f"{shards.folder}: {missing} of the first 64 images have no embedding; run "
                "`unclip embed` on the same data set and split"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        item = self.images[i]
        row = self.shards[self.shards.index_of(item["key"])]
        return item["image"], row["image_emb"], item["caption"]


class DecoderLoss:
    """Hybrid (or MSE) diffusion loss of the decoder on images [N, 3, S, S] in [-1, 1].

    With ``inpaint``, a share ``inpaint_prob`` of the images get a random box or stroke mask
    (:func:`~unclip.data.masks.training_inpaint_mask`, drawn on the images' device); the rest
    an all-zero one (plain generation)."""

    def __init__(self, diffusion, text=None, inpaint: bool = False, inpaint_prob: float = 0.5):
        self.diffusion = diffusion
        self.text = text
        self.inpaint = inpaint
        self.inpaint_prob = inpaint_prob

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict[str, Any]]:
        from unclip.data.masks import training_inpaint_mask
        from unclip.train.stages.common import diffusion_metrics

        images, image_emb, captions = batch
        n, device = images.shape[0], images.device
        kwargs: dict[str, Any] = {"image_emb": image_emb}
        if self.text is not None:
            _z, feats, mask = self.text(captions, device)
            kwargs.update(text_tokens=feats, text_mask=mask)
        if self.inpaint:  # masks drawn on the device, only for the images inpainted
            keep = training_inpaint_mask(n, images.shape[-1], self.inpaint_prob, device=device)
            kwargs.update(inpaint_image=images, inpaint_mask=keep)
        t = self.diffusion.sample_timesteps(n, device=device)
        return diffusion_metrics(self.diffusion.training_losses(model, images, t, kwargs))


def run(args: argparse.Namespace) -> int:
    from unclip.decoder.unet import UNet
    from unclip.diffusion import GaussianDiffusion
    from unclip.run_configs import DecoderRunConfig
    from unclip.train.checkpoint import latest_checkpoint
    from unclip.train.loop import Trainer
    from unclip.train.stages.common import (
        check_pixel_stage,
        count_parameters,
        embedding_shards,
        fit_and_export,
        load_run_config,
        open_images,
        sample_weights,
        start_from,
        text_encoder_for,
    )

    cfg = load_run_config(DecoderRunConfig, args)
    where = args.config or args.run_dir
    check_pixel_stage(cfg, where)
    shards = embedding_shards(cfg, where)
    text = text_encoder_for(cfg, where, captions=shards.captions)
    images = open_images(cfg)
    data = ImagesWithEmbeddings(images, shards)
    weights = sample_weights(cfg, images, where)
    model = UNet(cfg.model)
    print(
        f"unclip: decoder with {count_parameters(model) / 1e6:.1f}M parameters, {len(data)} images"
    )
    if cfg.init and not (args.resume and latest_checkpoint(args.run_dir)):
        start_from(model, cfg.init, where, "decoder")  # a resumed run's checkpoint replaces it
    trainer = Trainer(
        model,
        DecoderLoss(
            GaussianDiffusion.from_config(cfg.diffusion), text, cfg.model.inpaint, cfg.inpaint_prob
        ),
        data,
        cfg.train,
        args.run_dir,
        device=args.device,
        progress=not args.no_progress,
        weights=weights,
        fsdp=args.fsdp,
    )
    fit_and_export(trainer, args, cfg.diffusion)
    if images.skips.total:
        print(images.skips.summary())
    return 0
