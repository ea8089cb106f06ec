"""``unclip train clip``: contrastive training of CLIP on image–caption pairs.

Run config (JSON, see ``configs/emoji-small/clip.json``)::

    {"model": {CLIPConfig}, "train": {TrainConfig}, "data": {DataConfig, "tokenizer" required},
     "caption_tags": 0.0}

``caption_tags``: probability of training on a sample's tags (from an emoji manifest) in place
of its caption, for caption variety.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def caption_variants(record: dict[str, Any]) -> list[str]:
    """Other true descriptions of a manifest record: with its group, its tags, group + style."""
    style = f"{record['style']} style" if record.get("style") else ""
    out = []
    if record.get("group"):
        out.append(f"{record['caption']}, {record['group']}")
    if record.get("tags"):
        out.append(", ".join([*record["tags"][:4], style]).strip(", "))
    if record.get("group") and style:
        out.append(f"{record['group']}, {style}")
    return out


class CaptionedImages:
    """Wrap an image data set: items become ``(image [3, S, S] in [-1, 1], caption)``.

    With ``variants`` (key -> other captions) and ``p`` > 0, a variant replaces the caption
    with probability ``p`` (drawn from torch's global RNG, so a resumed run draws the same).
    """

    def __init__(self, dataset, variants: dict[str, list[str]] | None = None, p: float = 0.0):
        self.dataset = dataset
        self.variants = variants or {}
        self.p = p

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        import torch

        item = self.dataset[i]
        caption = item["caption"]
        options = self.variants.get(item["key"])
        if self.p > 0 and options and float(torch.rand(())) < self.p:
            caption = options[int(torch.randint(len(options), ()))]
        return item["image"], caption


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
    from unclip.data.balance import manifest_labels
    from unclip.data.datasets import open_dataset
    from unclip.data.shards import read_manifest
    from unclip.run_configs import ClipRunConfig
    from unclip.tokenizer import Tokenizer
    from unclip.train import distributed
    from unclip.train.loop import Trainer
    from unclip.train.stages.common import (
        count_parameters,
        export_final,
        fit,
        load_run_config,
        sample_weights,
    )

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
    variants = groups = None
    records = []  # read once for caption variants and concept runs alike
    if cfg.caption_variants > 0 or cfg.concept_run > 1:
        manifest = Path(cfg.data.path) / "manifest.jsonl"
        if not manifest.exists():
            raise ConfigError(
                f"{args.config}: caption_variants and concept_run need a manifest.jsonl in "
                "data.path"
            )
        records = read_manifest(manifest)
    if cfg.caption_variants > 0:
        variants = {r["key"]: caption_variants(r) for r in records}
    if cfg.concept_run > 1:
        if cfg.data.balance:
            raise ConfigError(f"{args.config}: data.balance and concept_run > 1 do not combine")
        keys = (data.key(i) for i in range(len(data)))
        groups = manifest_labels(keys, records, ["concept"], f"{args.config}: concept_run")
    model = CLIP(cfg.model)
    print(f"unclip: CLIP with {count_parameters(model) / 1e6:.1f}M parameters, {len(data)} samples")
    trainer = Trainer(
        model,
        clip_stage_loss,
        CaptionedImages(data, variants, cfg.caption_variants),
        cfg.train,
        args.run_dir,
        collate_fn=Collate(tokenizer, cfg.model.context_length),
        device=args.device,
        progress=not args.no_progress,
        groups=groups,
        group_run=cfg.concept_run,
        weights=sample_weights(cfg, data, args.config or args.run_dir),
        fsdp=args.fsdp,
    )
    result = fit(trainer, args)
    export_final(trainer, result)
    if trainer.dist.is_main:
        tokenizer.save(trainer.run_dir / "final" / "tokenizer")
    distributed.teardown()  # every rank is done: leave the process group together
    if data.skips.total:
        print(data.skips.summary())
    return 0
