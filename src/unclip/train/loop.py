"""The one training loop every stage uses (CLIP, prior, decoder, upsampler).

A stage supplies a model, a loss function ``loss_fn(model, batch) -> loss`` (or
``(loss, {"name": value, ...})``) and its data; the loop does the rest: AdamW with decoupled
weight decay on matrices only, linear warm-up + cosine LR, gradient accumulation, gradient
clipping, EMA, bf16 autocast, a tqdm bar, a JSONL metrics log, atomic checkpoints and
bit-identical ``resume``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from unclip.allocator import keep_freed_memory
from unclip.config import Config, TrainConfig, write_text_atomic
from unclip.precision import native_bf16
from unclip.train import distributed
from unclip.train import fsdp as sharding
from unclip.train.batches import BatchSource, EpochBatches
from unclip.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    clean_partial,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from unclip.train.ema import EMA
from unclip.train.schedule import lr_at

LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]
METRICS_NAME = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last checkpoint is intact."""


@dataclass
class TrainResult:
    """Where :meth:`Trainer.fit` stopped: ``step``, its checkpoint, the last logged metrics,
    and ``finished`` (False when a time limit stopped it before ``config.steps``)."""

    step: int
    checkpoint: Path | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    finished: bool = True


#: called with a part's name ("data", "forward", …) as each part of a training step ends
Lap = Callable[[str], None]


def _no_lap(part: str) -> None:
    pass


def _host_numbers(stats: dict[str, torch.Tensor], lr: float) -> dict[str, float]:
    """A step's device numbers (loss, metrics, grad norm) read on the host, with the rate."""
    return {"lr": lr, **{k: float(v) for k, v in stats.items()}}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on CPU or CUDA; a no-op when disabled or where the device has no native
    bf16 (:func:`unclip.precision.native_bf16`: emulated bf16 is far slower than float32)."""
    if not enabled or not native_bf16(device):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on weights with 2+ dimensions, none on biases, norms and embeddings' 1-D.

    The fused implementation (one kernel over all parameters, CPU and CUDA since torch 2.4): on
    one CPU core the emoji-small decoder's 3.5 M parameters update in 12 ms instead of 19 ms."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def channels_last_pays(model: nn.Module, device: torch.device, bf16: bool = True) -> bool:
    """Whether to train ``model`` with channels-last 4-d weights on ``device``: faster cuDNN and
    oneDNN convolutions (CLIP's ResNet encoder, batch 256, bf16 on 2 CPU cores: 0.87 -> 0.62 s
    forward+backward), except for GroupNorm models on the CPU in bf16, whose channels-last
    bf16 group-norm backward costs more than the convolutions gain (the emoji-small decoder,
    batch 16: 300 ms channels-last, 280 ms contiguous). In float32 such models go
    channels-last where their 3×3 convolutions then train as Winograd, which reads only
    channels-last input (:class:`~unclip.decoder.blocks.Conv3x3` layers, where the kernels of
    :mod:`unclip.decoder.winograd` are built). A no-op for models without convolutions."""
    gn = any(isinstance(m, nn.GroupNorm) for m in model.modules())
    if device.type != "cpu" or not gn:
        return True
    from unclip.decoder import winograd
    from unclip.decoder.blocks import Conv3x3

    has_3x3 = any(isinstance(m, Conv3x3) for m in model.modules())
    return not bf16 and has_3x3 and winograd.available()


def training_layout(
    model: nn.Module,
    device: torch.device,
    channels_last: bool | None = None,
    bf16: bool = True,
) -> torch.memory_format:
    """The memory format the trainer gives ``model``'s 4-d weights on ``device`` (training
    under bf16 autocast or not): channels-last when ``channels_last`` says so, or (None)
    where :func:`channels_last_pays`."""
    pays = channels_last_pays(model, device, bf16) if channels_last is None else channels_last
    return torch.channels_last if pays else torch.contiguous_format


def match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (AdamW's moments) its parameter's strides.

    A checkpoint stores tensors contiguous, so a channels-last model resumes with NCHW
    moments; the fused AdamW kernel walks parameter, gradient and moments in memory order,
    and would pair mismatched elements."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


class Trainer:
    """Train ``model`` on ``data`` with ``loss_fn`` under ``config``, writing into ``run_dir``.

    ``data`` is a map-style ``Dataset`` (wrapped in :class:`EpochBatches`) or any
    :class:`BatchSource` yielding micro-batches of ``batch_size // (grad_accum · world)``
    samples; ``groups``/``group_run`` ask it for batches of hard negatives, ``weights`` for a
    weighted draw (see :class:`EpochBatches`).

    Under ``torchrun`` the trainer joins the process group, wraps the model in
    DistributedDataParallel, gives each rank a disjoint slice of every global batch (so N ranks
    with global batch B take the same steps as one process with batch B), seeds each rank's
    RNG differently, and lets rank 0 write checkpoints (with every rank's RNG state) and logs.
    ``loss_fn`` receives the DDP-wrapped model; reach the module's own attributes with
    ``getattr(model, "module", model)``.

    On the CPU a run is bit-exact on one machine at one thread count: :meth:`fit` seeds every
    RNG with ``config.seed`` (plus the rank), data order comes from ``(seed, epoch)``, and a
    checkpoint holds every RNG state. Seed the RNGs before building ``model`` too
    (:func:`~unclip.train.checkpoint.seed_everything`; the stages do it when they read their
    run config), or its initial weights differ from process to process.

    ``fsdp=True`` shards the model instead of replicating it (see :mod:`unclip.train.fsdp`);
    ``loss_fn`` then receives the sharded module itself and must run its parameters through
    ``forward`` (outside it they are shards). Checkpoints keep the unsharded format. In one
    process there is nothing to shard: ``fsdp`` warns and trains as usual.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Dataset | BatchSource,
        config: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        collate_fn: Callable | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
        extra_state: dict[str, Any] | None = None,
        groups: Sequence[int] | None = None,
        group_run: int = 1,
        weights: Sequence[float] | None = None,
        fsdp: bool = False,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        keep_freed_memory()  # each step reuses the last one's activations (unclip.allocator)
        self.device = torch.device(device) if device is not None else default_device()
        #: training under bf16 autocast: config.bf16 where the device has native bf16
        self.bf16 = config.bf16 and native_bf16(self.device)
        if config.bf16 and not self.bf16:
            kinds = {"cuda": "GPU", "cpu": "CPU (no AVX-512 BF16 or AMX)"}
            what = kinds.get(self.device.type, f"{self.device.type} device")
            warnings.warn(f"this {what} has no native bf16; training in float32", stacklevel=2)
        self.dist = distributed.setup(self.device)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.fsdp = fsdp and self.dist.world_size > 1
        if fsdp and not self.fsdp:
            warnings.warn("fsdp with one process shards nothing; training unsharded", stacklevel=2)
        # FSDP shards need contiguous parameters; see channels_last_pays for the rest
        if self.fsdp:
            self.model = sharding.shard_model(model, self.device)
        else:
            self.model = model.to(
                self.device,
                memory_format=training_layout(model, self.device, config.channels_last, self.bf16),
            )
        self.loss_fn = loss_fn
        per_rank = config.batch_size // config.grad_accum
        if per_rank % self.dist.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} / grad_accum {config.grad_accum} is not "
                f"divisible by the {self.dist.world_size} processes"
            )
        self.micro_batch = per_rank // self.dist.world_size
        if not hasattr(data, "state_dict"):  # a map-style data set: shuffle it resumably
            data = EpochBatches(
                data,
                self.micro_batch,
                seed=config.seed,
                collate_fn=collate_fn,
                num_workers=config.num_workers,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                groups=groups,
                group_run=group_run,
                weights=weights,
                pin_memory=self.device.type == "cuda",
            )
        self.batches: BatchSource = data
        self._reset_watch()
        self.optimizer = build_optimizer(self.model, config)
        self.ddp: nn.Module | None = None
        if self.dist.world_size > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.ema = (
            EMA(self.model, config.ema_decay, config.ema_warmup) if config.ema_decay > 0 else None
        )
        if config.compile:  # in place, after the EMA copy: state dict keys stay the same
            if self.fsdp:
                warnings.warn("compile is not used with fsdp; training uncompiled", stacklevel=2)
            else:
                self.model.compile()
        self.progress = progress
        self.extra_state = extra_state or {}
        self.step = 0

    # --- FSDP: sharding and whole state dicts (collectives under FSDP) ---------------------

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state dict (under FSDP: gathered on rank 0, empty on the others;
        call it on every rank)."""
        return sharding.full_model_state(self.model) if self.fsdp else self.model.state_dict()

    def ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights, whole (under FSDP as :meth:`model_state_dict`); None without EMA."""
        if self.ema is None:
            return None
        if self.fsdp:
            return sharding.gather_full(self.ema.state_dict(), keep=self.dist.is_main)
        return self.ema.state_dict()

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The optimizer's whole state dict (under FSDP as :meth:`model_state_dict`)."""
        if self.fsdp:
            return sharding.full_optimizer_state(self.model, self.optimizer)
        return self.optimizer.state_dict()

    # --- state --------------------------------------------------------------------------

    def _model_config_doc(self) -> dict[str, Any] | None:
        config = getattr(self.model, "config", None)
        if isinstance(config, Config) and config.type_name:
            from unclip.hub import config_document

            return config_document(config)
        return None

    def save(self) -> Path:
        """Write a checkpoint (rank 0; every rank's RNG state goes into it). Collective."""
        rngs = distributed.all_gather_objects(rng_state())
        states = self.model_state_dict(), self.ema_state_dict(), self.optimizer_state_dict()
        folder = checkpoint_dir(self.run_dir) / f"step-{self.step}"
        if self.dist.is_main:
            try:
                folder = self._save_checkpoint(rngs, *states)
            except OSError as e:  # disk full, quota, permissions: stop, say what is left
                where = latest_checkpoint(self.run_dir)
                raise CheckpointError(
                    f"{self.run_dir}: could not write the checkpoint of step {self.step} "
                    f"({e.strerror or e}); training stopped. "
                    + (
                        f"The last whole checkpoint is {where}; --resume continues from it."
                        if where
                        else "No whole checkpoint was written yet."
                    )
                ) from e
        distributed.barrier()
        return folder

    def _save_checkpoint(
        self,
        rngs: list[dict[str, Any]],
        model_state: dict[str, torch.Tensor],
        ema_state: dict[str, torch.Tensor] | None,
        optimizer_state: dict[str, Any],
    ) -> Path:
        return save_checkpoint(
            self.run_dir,
            self.step,
            model_state=model_state,
            ema_state=ema_state,
            optimizer_state=optimizer_state,
            trainer_state={
                "data": self.batches.state_dict(),
                "rng": rngs[0],
                "rank_rng": rngs[1:],
                "ema_updates": self.ema.num_updates if self.ema else 0,
                "train_config": self.config.to_dict(),
                "world_size": self.dist.world_size,
                "extra": self.extra_state,
            },
            model_config=self._model_config_doc(),
            keep=self.config.keep_checkpoints,
        )

    def resume(self) -> Path | None:
        """Restore everything from the newest whole checkpoint; returns it (None: start fresh)."""
        if self.dist.is_main:
            clean_partial(self.run_dir)
        distributed.barrier()
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return None
        ckpt = load_checkpoint(folder)
        saved_world = int(ckpt.state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise CheckpointError(
                f"{folder}: written by {saved_world} processes, resumed with "
                f"{self.dist.world_size}; relaunch with the same number of processes"
            )
        from unclip.hub import load_weights_into

        if self.fsdp:  # every rank holds the whole checkpoint and keeps its shards
            sharding.load_model_state(self.model, ckpt.model, folder / "model.safetensors")
            sharding.load_optimizer_state(self.model, self.optimizer, ckpt.optimizer)
        else:
            load_weights_into(self.model, ckpt.model, folder / "model.safetensors")
            self.optimizer.load_state_dict(ckpt.optimizer)
            match_state_layouts(self.optimizer)
        if self.ema is not None:
            if ckpt.ema is None:
                raise RuntimeError(f"{folder}: the run uses EMA but the checkpoint has none")
            ema = sharding.shard_like(self.ema.state_dict(), ckpt.ema) if self.fsdp else ckpt.ema
            self.ema.load_state_dict(ema, ckpt.state["ema_updates"])
        self.batches.load_state_dict(ckpt.state["data"])
        rank_rngs = [ckpt.state["rng"], *ckpt.state.get("rank_rng", [])]
        set_rng_state(rank_rngs[self.dist.rank])
        self.extra_state = ckpt.state.get("extra", {})
        self.step = ckpt.step
        if self.dist.is_main:
            self._truncate_metrics(self.step)
        return folder

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines a killed run wrote after its last checkpoint."""
        path = self.run_dir / METRICS_NAME
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
        write_text_atomic(path, "".join(k + "\n" for k in kept))

    # --- loop ---------------------------------------------------------------------------

    def _loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        with autocast_context(self.device, self.bf16):
            out = self.loss_fn(self.ddp if self.ddp is not None else self.model, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        return loss.float(), metrics

    def set_lr(self) -> float:
        """Set the optimizer's learning rate for the coming step (warm-up + cosine); return it."""
        cfg = self.config
        lr = lr_at(self.step, lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                   min_lr_ratio=cfg.min_lr_ratio)  # fmt: skip
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(
        self, batches: Iterator[Any], params: list[torch.Tensor], lap: Lap = _no_lap
    ) -> dict[str, torch.Tensor]:
        """One optimizer step on ``grad_accum`` micro-batches from ``batches``, at the learning
        rate already set. Returns the step's loss, metrics and gradient norm as device tensors:
        nothing here waits for the device, so a GPU is never left idle by the host. A
        non-finite loss is recorded on the device (see :meth:`check_finite`). ``lap(part)`` is
        called after each part of the step (``unclip bench train`` times them)."""
        cfg = self.config
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = move_to(next(batches), self.device)
            lap("data")
            last_micro = micro == cfg.grad_accum - 1
            # DDP: synchronise gradients once per optimizer step, not per micro-batch
            sync = nullcontext() if self.ddp is None or last_micro else self.ddp.no_sync()
            with sync:
                loss, extra = self._loss(batch)
                lap("forward")
                (loss / cfg.grad_accum).backward()
                lap("backward")
            self._watch(loss.detach())
            for k, v in {"loss": loss, **extra}.items():
                v = torch.as_tensor(v).detach().float() / cfg.grad_accum
                sums[k] = sums[k] + v if k in sums else v
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        if self.fsdp:
            sharding.sync_replicated_grads(params, self.device)
            grad_norm = sharding.clip_grad_norm(params, max_norm, self.device)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lap("grad_clip")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lap("optimizer")
        if self.ema is not None:
            self.ema.update(self.model)
        lap("ema")
        self.step += 1
        return {**sums, "grad_norm": torch.as_tensor(grad_norm).detach()}

    def _reset_watch(self) -> None:
        self._bad_step = torch.zeros((), dtype=torch.long, device=self.device)
        self._bad_loss = torch.zeros((), device=self.device)

    def _watch(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is not finite, and that loss, on the device."""
        first = ~torch.isfinite(loss) & (self._bad_step == 0)
        self._bad_step = torch.where(first, self.step + 1, self._bad_step)
        self._bad_loss = torch.where(first, loss, self._bad_loss)

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a loss since the run began was NaN or infinite
        (on any process: a collective under torchrun). One read of the device."""
        step = int(self._bad_step)
        if distributed.all_true(step == 0, self.device):
            return
        where = latest_checkpoint(self.run_dir)
        said = f"loss is {float(self._bad_loss)} at step {step}" if step else "loss is not finite"
        raise TrainingDiverged(
            f"{said} (on some process); training stopped. "
            + (
                f"The last whole checkpoint is {where}."
                if where
                else "No checkpoint was written yet."
            )
        )

    def _save_finite(self) -> Path:
        """Checkpoint this step; never weights that a non-finite loss has reached."""
        self.check_finite()
        return self.save()

    def _out_of_time(self, deadline: float | None) -> bool:
        """Whether some rank passed ``deadline`` with steps left (collective when it is set)."""
        if deadline is None or self.step >= self.config.steps:
            return False
        return not distributed.all_true(time.monotonic() < deadline, self.device)

    def fit(self, resume: bool = False, max_seconds: float | None = None) -> TrainResult:
        """Train until ``config.steps``; with ``resume``, continue from the latest checkpoint.

        ``max_seconds``: stop after the first step that ends this many seconds after the call
        began, with a checkpoint of that step (``finished`` is then False; ``resume`` goes on
        from it, on the same LR schedule). Under torchrun every rank stops at the same step."""
        cfg = self.config
        deadline = time.monotonic() + max_seconds if max_seconds is not None else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            if self.dist.is_main:
                clean_partial(self.run_dir)
            distributed.barrier()
            if latest_checkpoint(self.run_dir) is not None:
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints; pass resume=True (--resume) to "
                    "continue, or choose another run folder"
                )
        if not resume or self.resume() is None:
            seed_everything(cfg.seed + self.dist.rank)
        last_ckpt: Path | None = None
        if self.step >= cfg.steps:
            return TrainResult(self.step, latest_checkpoint(self.run_dir))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._reset_watch()
        batches: Iterator[Any] = iter(self.batches)
        self.model.train()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not self.progress or not self.dist.is_main,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        metrics_file = (
            open(self.run_dir / METRICS_NAME, "a", encoding="utf-8") if self.dist.is_main else None
        )
        window_t, window_samples = time.perf_counter(), 0
        last: dict[str, float] = {}
        try:
            while self.step < cfg.steps:
                lr = self.set_lr()
                stats = self.train_step(batches, params)
                window_samples += cfg.batch_size
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.check_finite()  # the host reads the step's numbers only here
                    last = _host_numbers(stats, lr)
                    for k in stats:  # the mean over ranks (a collective); not the grad norm
                        if k != "grad_norm":
                            last[k] = distributed.mean_over_ranks(last[k], self.device)
                    now = time.perf_counter()
                    rate = window_samples / max(now - window_t, 1e-9)
                    window_t, window_samples = now, 0
                    record = {"step": self.step, **last, "samples_per_s": rate, "time": time.time()}
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    bar.set_postfix(loss=f"{last['loss']:.4f}", samples_s=f"{rate:.1f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    last_ckpt = self._save_finite()
                if self._out_of_time(deadline):
                    if self.step % cfg.checkpoint_every:  # not saved just above
                        last_ckpt = self._save_finite()
                    last = _host_numbers(stats, lr)
                    return TrainResult(self.step, last_ckpt, last, finished=False)
        finally:
            if metrics_file is not None:
                metrics_file.close()
            bar.close()
        return TrainResult(self.step, last_ckpt, last)
