"""``unclip train clip``: contrastive training of CLIP on image–caption pairs.

Run config (JSON, see ``configs/emoji-small/clip.json``)::

    {"model": {CLIPConfig}, "train": {TrainConfig}, "data": {DataConfig, "tokenizer" required},
     "caption_tags": 0.0}

``caption_tags``: probability of training on a sample's tags (from an emoji manifest) in place
of its caption, for caption variety.
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "train CLIP (text and image encoders) with the contrastive loss"


class CaptionedImages:
    """Wrap an image data set: items become ``(image [3, S, S] in [-1, 1], caption)``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        item = self.dataset[i]
        return item["image"], item["caption"]


class Collate:
    """Stack images and tokenise captions: -> ``{"images": [B,3,S,S], "tokens": [B, L]}``."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, batch: list[tuple[Any, str]]) -> dict[str, Any]:
        import torch

        images = torch.stack([b[0] for b in batch])
        tokens = self.tokenizer([b[1] for b in batch], self.context_length)
        return {"images": images, "tokens": tokens}


def clip_stage_loss(model, batch: dict[str, Any]):
    from unclip.clip.loss import clip_training_loss

    return clip_training_loss(
        model,
        {
            "pixels": getattr(model, "module", model).preprocess(batch["images"]),
            "tokens": batch["tokens"],
        },
    )


def run(args: argparse.Namespace) -> int:
    from unclip.clip.model import CLIP
    from unclip.config import ConfigError
    from unclip.data.datasets import open_dataset
    from unclip.tokenizer import Tokenizer
    from unclip.train.loop import Trainer
    from unclip.train.stages.common import count_parameters, export_final, load_run_config
    from unclip.train.stages.run_configs import ClipRunConfig

    cfg = load_run_config(ClipRunConfig, args)
    if not cfg.data.tokenizer:
        raise ConfigError(f"{args.config}: data.tokenizer must name a tokenizer folder")
    if not cfg.data.path:
        raise ConfigError(f"{args.config}: data.path must name a data set")
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"{args.config}: model.vocab_size {cfg.model.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size} tokens"
        )
    data = open_dataset(
        cfg.data.path,
        size=cfg.data.image_size,
        mode=cfg.data.mode or None,
        split=cfg.data.split or None,
    )
    model = CLIP(cfg.model)
    print(f"unclip: CLIP with {count_parameters(model) / 1e6:.1f}M parameters, {len(data)} samples")
    trainer = Trainer(
        model,
        clip_stage_loss,
        CaptionedImages(data),
        cfg.train,
        args.run_dir,
        collate_fn=Collate(tokenizer, cfg.model.context_length),
        device=args.device,
        progress=not args.no_progress,
    )
    result = trainer.fit(resume=args.resume)
    export_final(trainer, result)
    tokenizer.save(trainer.run_dir / "final" / "tokenizer")
    if data.skips.total:
        print(data.skips.summary())
    return 0
