"""``unclip train prior``: the diffusion prior, from caption (z_t + token features) to z_i.

Trains from ``unclip embed`` shards (image and caption embeddings); the frozen CLIP text
encoder (``clip`` in the run config) gives the per-token caption features in the loop.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils.data import Dataset

HELP = "train the diffusion prior (caption embedding -> CLIP image embedding)"


class PriorItems(Dataset):
    """Embedding rows as ``(image_emb [D], text_emb [D], caption)``."""

    def __init__(self, shards) -> None:
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        row = self.shards[i]
        return row["image_emb"], row["text_emb"], row["caption"]


class PriorLoss:
    """x₀-prediction diffusion loss on the scaled image embedding (DALL·E 2 §2.2)."""

    def __init__(self, diffusion, embed_scale: float, text=None) -> None:
        self.diffusion = diffusion
        self.embed_scale = embed_scale
        self.text = text

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict[str, Any]]:
        from unclip.prior.model import scale_embedding

        image_emb, text_emb, captions = batch
        kwargs: dict[str, Any] = {"text_emb": text_emb}
        if self.text is not None:
            _z, feats, mask = self.text(captions, image_emb.device)
            kwargs.update(text_tokens=feats, text_mask=mask)
        x0 = scale_embedding(image_emb, self.embed_scale)
        t = self.diffusion.sample_timesteps(len(x0), device=x0.device)
        terms = self.diffusion.training_losses(model, x0, t, kwargs)
        loss = terms["loss"].mean()
        return loss, {"mse": terms["mse"].mean().item()}


def run(args: argparse.Namespace) -> int:
    from unclip.diffusion import GaussianDiffusion
    from unclip.prior.model import DiffusionPriorTransformer
    from unclip.train.loop import Trainer
    from unclip.train.stages.common import (
        count_parameters,
        embedding_shards,
        fit_and_export,
        load_run_config,
        text_encoder_for,
    )
    from unclip.train.stages.run_configs import PriorRunConfig

    cfg = load_run_config(PriorRunConfig, args)
    where = args.config or args.run_dir
    shards = embedding_shards(cfg, where)
    text = text_encoder_for(cfg, where, max_len=cfg.model.text_len)
    model = DiffusionPriorTransformer(cfg.model)
    print(f"unclip: prior with {count_parameters(model) / 1e6:.1f}M parameters, {len(shards)} rows")
    trainer = Trainer(
        model,
        PriorLoss(GaussianDiffusion.from_config(cfg.diffusion), cfg.model.embed_scale, text),
        PriorItems(shards),
        cfg.train,
        args.run_dir,
        device=args.device,
        progress=not args.no_progress,
    )
    fit_and_export(trainer, args.resume, cfg.diffusion)
    return 0
