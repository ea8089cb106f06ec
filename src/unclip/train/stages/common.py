"""What every training stage shares: the run config file, overrides, the final export."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from unclip.clip.text import TextEncoder
from unclip.clip.text import clip_tokenizer_dir as clip_tokenizer_dir
from unclip.config import DIFFUSION_FILE, Config, TrainConfig
from unclip.hub import save_pretrained
from unclip.train import distributed
from unclip.train.checkpoint import seed_everything
from unclip.train.loop import Trainer, TrainResult

C = TypeVar("C", bound=Config)

RUN_CONFIG_NAME = "run_config.json"
FINAL_NAME = "final"


def load_run_config(cls: type[C], args: argparse.Namespace) -> C:
    """Read ``--config`` (or, on ``--resume`` without it, the run folder's copy), apply the
    command-line overrides (``--steps``, ``--no-bf16``) and seed every RNG with
    ``train.seed``.

    Seeding here, before the stage builds its model, makes the initial weights a function of
    the seed: torch seeds its default generator from the OS at start-up, so a model built
    before :meth:`Trainer.fit` seeds would start from different weights in every process."""
    if not args.config and not args.resume:
        raise FileNotFoundError("--config is required (except with --resume)")
    path = Path(args.config) if args.config else Path(args.run_dir) / RUN_CONFIG_NAME
    cfg = cls.load(path)
    train: TrainConfig = cfg.train  # type: ignore[attr-defined]
    changes = {}
    if getattr(args, "steps", None):
        changes["steps"] = args.steps
    if getattr(args, "no_bf16", False):
        changes["bf16"] = False
    if changes:
        cfg = cfg.replace(train=train.replace(**changes))
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    cfg.save(Path(args.run_dir) / RUN_CONFIG_NAME)
    seed_everything(cfg.train.seed)  # type: ignore[attr-defined]
    return cfg


def export_final(trainer: Trainer, result: TrainResult, dtype: torch.dtype | None = None) -> Path:
    """Write ``RUN_DIR/final``: a model folder with the trained (and EMA) weights.

    Call on every rank: under FSDP the weights are gathered from all of them."""
    out = trainer.run_dir / FINAL_NAME
    state, ema = trainer.model_state_dict(), trainer.ema_state_dict()
    if not trainer.dist.is_main:  # under torchrun, rank 0 writes
        return out
    save_pretrained(trainer.model, out, ema=ema, dtype=dtype, state=state)
    loss = result.last_metrics.get("loss")
    tail = f", last loss {loss:.4f}" if loss is not None else ""
    print(f"unclip: trained to step {result.step}{tail}; model folder: {out}", file=sys.stderr)
    if not result.finished:
        print(
            f"unclip: stopped by the time limit at step {result.step} of "
            f"{trainer.config.steps}; {out} holds the weights so far, and --resume goes on "
            f"from {result.checkpoint}",
            file=sys.stderr,
        )
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: the frozen CLIP text side of the prior's and decoder's losses: captions -> (z_t, token
#: features, mask); built from a CLIP folder (``FrozenTextEncoder(clip_dir, device=device)``)
FrozenTextEncoder = TextEncoder


def save_diffusion_config(folder: Path, diffusion_config: Config) -> None:
    """A diffusion stage's folder keeps the schedule it was trained with (``diffusion.json``)."""
    diffusion_config.save(folder / DIFFUSION_FILE)


def diffusion_metrics(
    terms: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, metrics)`` of :meth:`GaussianDiffusion.training_losses`' per-sample terms; the
    metrics stay detached device tensors (the trainer reads them when it logs)."""
    metrics = {k: terms[k].detach().mean() for k in ("mse", "vlb") if k in terms}
    return terms["loss"].mean(), metrics


def embedding_shards(cfg: Config, where: str):
    """The run's ``data.embeddings`` shards, checked against ``model.clip_dim``."""
    from unclip.config import ConfigError
    from unclip.data.embeddings import EmbeddingShards

    if not cfg.data.embeddings:  # type: ignore[attr-defined]
        raise ConfigError(f"{where}: data.embeddings must name an `unclip embed` output folder")
    shards = EmbeddingShards(cfg.data.embeddings)  # type: ignore[attr-defined]
    clip_dim = cfg.model.clip_dim  # type: ignore[attr-defined]
    if shards.dim != clip_dim:
        raise ConfigError(
            f"{where}: model.clip_dim is {clip_dim} but the embeddings have {shards.dim}"
        )
    return shards


def text_encoder_for(
    cfg: Config, where: str, max_len: int | None = None, captions: Sequence[str] = ()
):
    """The frozen CLIP text encoder named by ``cfg.clip`` when ``model.text_dim`` > 0, with the
    run's ``captions`` to encode once (:meth:`FrozenTextEncoder.precompute`)."""
    from unclip.config import ConfigError

    text_dim = cfg.model.text_dim  # type: ignore[attr-defined]
    if not text_dim:
        return None
    if not cfg.clip:  # type: ignore[attr-defined]
        raise ConfigError(f"{where}: model.text_dim > 0 needs `clip` (a CLIP model folder)")
    text = FrozenTextEncoder(cfg.clip)  # type: ignore[attr-defined]
    if text.width != text_dim or (max_len is not None and text.context_length > max_len):
        raise ConfigError(
            f"{where}: model.text_dim {text_dim} (and text length {max_len}) must match the CLIP "
            f"text encoder (width {text.width}, context {text.context_length})"
        )
    text.precompute(captions)
    return text


def check_pixel_stage(cfg: Config, where: str) -> None:
    """A decoder/upsampler run: the model and its diffusion and data settings must agree."""
    from unclip.config import ConfigError

    if cfg.model.learn_sigma != cfg.diffusion.learn_sigma:  # type: ignore[attr-defined]
        raise ConfigError(f"{where}: model.learn_sigma and diffusion.learn_sigma must agree")
    if cfg.model.image_size != cfg.data.image_size:  # type: ignore[attr-defined]
        raise ConfigError(f"{where}: model.image_size and data.image_size must agree")


def sample_weights(cfg: Config, data, where: str) -> list[float] | None:
    """Draw weights for the samples of ``data`` (anything with ``len`` and ``key(i)``) from
    ``data.balance`` (None when it is empty: a uniform draw)."""
    from unclip.data.balance import group_weights

    fields = cfg.data.balance  # type: ignore[attr-defined]
    if not fields:
        return None
    keys = [data.key(i) for i in range(len(data))]
    weights = group_weights(cfg.data.path, keys, fields, where)  # type: ignore[attr-defined]
    groups = round(sum(weights))  # each group's weights add up to 1
    print(f"unclip: {len(keys)} samples drawn as {groups} equal groups by {', '.join(fields)}")
    return weights


def open_images(cfg: Config):
    """The image data set of ``cfg.data``."""
    from unclip.data.datasets import open_dataset

    data = cfg.data  # type: ignore[attr-defined]
    return open_dataset(
        data.path, size=data.image_size, mode=data.mode or None, split=data.split or None
    )


def fit(trainer: Trainer, args: argparse.Namespace) -> TrainResult:
    """``trainer.fit`` under the command line's ``--resume`` and ``--max-minutes``."""
    minutes = getattr(args, "max_minutes", None)
    return trainer.fit(resume=args.resume, max_seconds=minutes * 60 if minutes else None)


def fit_and_export(
    trainer: Trainer, args: argparse.Namespace, diffusion_config: Config | None = None
) -> Path:
    """Train (as :func:`fit`), then write ``final/`` (+ its ``diffusion.json``)."""
    result = fit(trainer, args)
    out = export_final(trainer, result)
    if diffusion_config is not None and trainer.dist.is_main:
        save_diffusion_config(out, diffusion_config)
    distributed.teardown()  # every rank is done: leave the process group together
    return out


def start_from(model: torch.nn.Module, folder: str, where: str, stage: str) -> None:
    """Load the weights of the ``stage`` model folder ``folder`` (``init`` of the run config
    ``where``) into ``model``, which may have more layers (they keep their initialisation).
    A resumed run does not call this: its checkpoint replaces every weight."""
    from unclip.config import ConfigError
    from unclip.hub import HubError, from_pretrained, load_weights_into

    try:
        old = from_pretrained(folder)
        if type(old) is not type(model) or type(old.config) is not type(model.config):
            raise HubError(f"{folder}: not a {stage} model folder")
        new = load_weights_into(model, old.state_dict(), folder, grow=True)
    except HubError as e:
        raise ConfigError(f"{where}: init: {e}") from None
    added = sum(model.state_dict()[k].numel() for k in new)
    print(f"unclip: {stage} starts from {folder} (+{added / 1e6:.2f}M new parameters)")
