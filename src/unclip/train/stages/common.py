"""What every training stage shares: the run config file, overrides, the final export."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from unclip.config import Config, TrainConfig
from unclip.hub import save_pretrained
from unclip.train import distributed
from unclip.train.checkpoint import seed_everything
from unclip.train.loop import Trainer, TrainResult

C = TypeVar("C", bound=Config)

RUN_CONFIG_NAME = "run_config.json"
FINAL_NAME = "final"
TOKENIZER_FOLDER = "tokenizer"  # a CLIP run's final/ and a pipeline folder keep it under this


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


def clip_tokenizer_dir(clip_dir: str | Path) -> Path:
    """The tokenizer folder of the CLIP model at ``clip_dir``: its own ``tokenizer/`` (a CLIP
    run's ``final/``, or a pipeline folder given whole), else, for a pipeline's ``clip/``, the
    pipeline's ``tokenizer/`` beside it. Raises FileNotFoundError naming the paths tried."""
    from unclip.pipeline.config import PIPELINE_FILE
    from unclip.tokenizer import TOKENIZER_FILE

    clip_dir = Path(clip_dir)
    tried = [clip_dir / TOKENIZER_FOLDER]
    if (clip_dir.parent / PIPELINE_FILE).is_file():
        tried.append(clip_dir.parent / TOKENIZER_FOLDER)
    for folder in tried:
        if (folder / TOKENIZER_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"{clip_dir}: no tokenizer for this CLIP model; tried "
        + ", ".join(str(f) for f in tried)
        + " (give a CLIP run's final/, a pipeline folder or a pipeline's clip/)"
    )


class FrozenTextEncoder:
    """A trained CLIP's text side, frozen: captions -> (z_t [N, D], token features [N, L, W],
    mask [N, L] bool with True for real tokens). Used inside the prior's and decoder's loss.

    A training run meets the same captions every epoch. Given the run's captions
    (:meth:`precompute`), the encoder encodes each distinct one once, in float32, in sorted
    order and fixed chunks, on the first call (so on the training device), and then only looks
    rows up: a text-encoder forward per step (13 GFLOP for 256 captions) would otherwise cost
    as much as a small network's whole step. The table is the same whenever it is built, so a
    resumed run reads the same features as an uninterrupted one. It is kept while it fits in
    ``table_bytes``; captions outside it are encoded per batch, their token ids cached (up to
    ``cache_size`` captions)."""

    cache_size = 1_000_000
    table_bytes = 4 * 2**30
    chunk = 256

    def __init__(self, clip_dir: str | Path, device: torch.device | str | None = None) -> None:
        from unclip.clip.convert import load_clip
        from unclip.tokenizer import Tokenizer

        self.model = load_clip(clip_dir).requires_grad_(False).eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = Tokenizer.load(clip_tokenizer_dir(clip_dir))
        self.context_length = self.model.config.context_length
        self._ids: dict[str, torch.Tensor] = {}
        self._pending: list[str] = []
        self._rows: dict[str, int] = {}
        self._table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def precompute(self, captions: Sequence[str]) -> None:
        """Encode these captions once, at the first call (see the class docstring); a table
        larger than ``table_bytes`` is not built."""
        unique = sorted(set(captions))
        cfg = self.model.config
        row_bytes = 4 * (cfg.embed_dim + self.context_length * cfg.text_width) + self.context_length
        self._pending = unique if len(unique) * row_bytes <= self.table_bytes else []
        self._rows, self._table = {}, None

    def _build_table(self, device: torch.device) -> None:
        captions, self._pending = self._pending, []
        parts = []
        with torch.autocast(device.type, enabled=False):
            for i in range(0, len(captions), self.chunk):
                tokens = self.tokens(captions[i : i + self.chunk]).to(device)
                z_t, feats, mask = self.model.encode_text_condition(tokens)
                parts.append((z_t.float(), feats.float(), mask))
        self._table = tuple(torch.cat(x) for x in zip(*parts, strict=True))  # type: ignore[assignment]
        self._rows = {c: i for i, c in enumerate(captions)}

    def tokens(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, L]`` of ``captions`` (cached per distinct caption)."""
        new = [c for c in dict.fromkeys(captions) if c not in self._ids]
        fresh = dict(zip(new, self.tokenizer(new, self.context_length), strict=True)) if new else {}
        for caption, row in fresh.items():
            if len(self._ids) >= self.cache_size:
                break
            self._ids[caption] = row
        return torch.stack([self._ids[c] if c in self._ids else fresh[c] for c in captions])

    @property
    def width(self) -> int:
        return self.model.config.text_width

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @torch.no_grad()
    def __call__(self, captions, device: torch.device | str | None = None):
        captions = list(captions)
        param = next(self.model.parameters())
        device = torch.device(device) if device is not None else param.device
        if param.device != device:
            self.model.to(device)
            self._table = None if self._table is None else tuple(t.to(device) for t in self._table)  # type: ignore[assignment]
        if self._pending:
            self._build_table(device)
        if self._table is not None and all(c in self._rows for c in captions):
            rows = torch.tensor([self._rows[c] for c in captions])
            if device.type == "cuda":  # no wait for the device: a pinned, asynchronous copy
                rows = rows.pin_memory()
            rows = rows.to(device, non_blocking=True)
            return tuple(t.index_select(0, rows) for t in self._table)
        tokens = self.tokens(captions).to(device)
        z_t, feats, mask = self.model.encode_text_condition(tokens)  # [N, D], [N, L, W], [N, L]
        return z_t, feats.float(), mask


def save_diffusion_config(folder: Path, diffusion_config: Config) -> None:
    """A diffusion stage's folder keeps the schedule it was trained with (``diffusion.json``)."""
    diffusion_config.save(folder / DIFFUSION_NAME)


DIFFUSION_NAME = "diffusion.json"


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
