"""``unclip train prior``: a prior from caption (z_t + token features) to z_i.

Two kinds (DALL·E 2 §2.2), chosen by ``--type`` or the run config's ``"type"``: the
diffusion prior (``diffusion``, the default; :class:`PriorRunConfig`) and the autoregressive
prior (``ar``; :class:`ARPriorRunConfig`), whose PCA + quantiser are fitted on the training
embeddings first. Both train from ``unclip embed`` shards (image and caption embeddings);
the frozen CLIP text encoder (``clip`` in the run config) gives the per-token caption
features in the loop.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PRIOR_TYPES = ("diffusion", "ar")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--type",
        choices=PRIOR_TYPES,
        default=None,
        help="diffusion (default) or ar (autoregressive over PCA codes); default: the run "
        'config\'s "type", else diffusion',
    )


class PriorItems:
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
        # metrics stay on the device: the trainer reads them when it logs
        return terms["loss"].mean(), {"mse": terms["mse"].detach().mean()}


class ARPriorLoss:
    """Cross-entropy of the PCA codes of z_i after the caption prefix (DALL·E 2 §2.2)."""

    def __init__(self, text=None) -> None:
        self.text = text

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict[str, Any]]:
        image_emb, text_emb, captions = batch
        feats = mask = None
        if self.text is not None:
            _z, feats, mask = self.text(captions, image_emb.device)
        module = getattr(model, "module", model)
        loss, acc = module.loss(image_emb, text_emb, feats, mask, model=model)
        return loss, {"code_acc": acc.detach()}


def prior_type(args: argparse.Namespace) -> str:
    """``--type``, else the run config's ``"type"`` (``--config`` or, on ``--resume``, the
    run folder's copy), else ``diffusion``; a flag that contradicts the file is an error."""
    from unclip.config import ConfigError
    from unclip.train.stages.common import RUN_CONFIG_NAME

    flag = getattr(args, "type", None)
    path = Path(args.config) if args.config else Path(args.run_dir) / RUN_CONFIG_NAME
    declared = None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        declared = doc.get("type") if isinstance(doc, dict) else None
    except (OSError, json.JSONDecodeError):
        pass  # load_run_config reports unreadable files
    if declared is not None and declared not in PRIOR_TYPES:
        raise ConfigError(f"{path}: type must be one of {', '.join(PRIOR_TYPES)}, got {declared!r}")
    if flag and declared and flag != declared:
        raise ConfigError(f"{path}: the config says type {declared!r} but --type is {flag!r}")
    return flag or declared or "diffusion"


def _run_inputs(config_cls: type, args: argparse.Namespace) -> tuple[Any, str, Any, Any]:
    """What both priors' training starts from: (run config, the folder its relative paths are
    resolved against, the embedding shards, the caption text encoder)."""
    from unclip.train.stages.common import embedding_shards, load_run_config, text_encoder_for

    cfg = load_run_config(config_cls, args)
    where = args.config or args.run_dir
    shards = embedding_shards(cfg, where)
    text = text_encoder_for(cfg, where, max_len=cfg.model.text_len, captions=shards.captions)
    return cfg, where, shards, text


def run_ar(args: argparse.Namespace) -> int:
    """Train the autoregressive prior: fit the code book on every training row, then train."""
    import numpy as np
    import torch

    from unclip.prior.ar import ARPrior
    from unclip.prior.codebook import fit_codebook
    from unclip.run_configs import ARPriorRunConfig
    from unclip.train.loop import Trainer
    from unclip.train.stages.common import count_parameters, fit_and_export, sample_weights

    cfg, where, shards, text = _run_inputs(ARPriorRunConfig, args)
    m = cfg.model
    z = torch.from_numpy(np.asarray(shards.image_emb, dtype=np.float32))
    codebook = fit_codebook(
        z,
        torch.from_numpy(np.asarray(shards.text_emb, dtype=np.float32)),
        components=m.components, variance=m.variance, buckets=m.buckets,
        dot_buckets=m.dot_buckets,
    )  # fmt: skip
    k = codebook.components.shape[0]
    model = ARPrior(m.replace(components=k))
    model.load_codebook(codebook)
    cos = (codebook.decode(codebook.encode(z)) * torch.nn.functional.normalize(z, dim=-1)).sum(-1)
    print(
        f"unclip: AR prior with {count_parameters(model) / 1e6:.1f}M parameters, {len(shards)} "
        f"rows; PCA keeps {k} components ({float(codebook.explained.sum()):.1%} of the "
        f"variance), {m.buckets} buckets each; code round trip cos mean {cos.mean():.4f}, "
        f"min {cos.min():.4f}"
    )
    trainer = Trainer(
        model, ARPriorLoss(text), PriorItems(shards), cfg.train, args.run_dir,
        device=args.device, progress=not args.no_progress, fsdp=args.fsdp,
        weights=sample_weights(cfg, shards, where),
    )  # fmt: skip
    fit_and_export(trainer, args)
    return 0


def run(args: argparse.Namespace) -> int:
    if prior_type(args) == "ar":
        return run_ar(args)
    from unclip.diffusion import GaussianDiffusion
    from unclip.prior.model import DiffusionPriorTransformer
    from unclip.run_configs import PriorRunConfig
    from unclip.train.loop import Trainer
    from unclip.train.stages.common import count_parameters, fit_and_export, sample_weights

    cfg, where, shards, text = _run_inputs(PriorRunConfig, args)
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
        weights=sample_weights(cfg, shards, where),
        fsdp=args.fsdp,
    )
    fit_and_export(trainer, args, cfg.diffusion)
    return 0
