"""Train the toy model in its own process (used by the kill-and-resume tests).

usage: python tests/train_toy.py RUN_DIR --steps N [--resume] [--step-sleep S]
                                 [--slow-checkpoint-at STEP] [--fsdp] [--blocks] [--export]
                                 [--die-after STEP]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import unclip.train.checkpoint as ckpt_mod
from toy import ToyBlocksConfig, ToyBlocksModel, ToyConfig, ToyData, ToyModel, toy_loss
from unclip.config import TrainConfig
from unclip.train import Trainer, distributed


class IndexedToyData(ToyData):
    """ToyData items with their index: (x, y, i)."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x, y, i


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--slow-checkpoint-at", type=int, default=-1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--deterministic", action="store_true", help="no dropout, no input noise")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    p.add_argument("--log-samples", help="append the sample indices each rank trains on here")
    p.add_argument("--fsdp", action="store_true", help="shard the model (Trainer(fsdp=True))")
    p.add_argument("--blocks", action="store_true", help="train ToyBlocksModel (no dropout)")
    p.add_argument("--export", action="store_true", help="write RUN_DIR/final at the end")
    p.add_argument(
        "--die-after",
        type=int,
        default=0,
        help="every rank exits abruptly (os._exit, no clean-up) as step STEP + 1 starts",
    )
    args = p.parse_args()
    torch.set_num_threads(1)

    if args.slow_checkpoint_at > 0:
        # Make one checkpoint write take long, so the test can kill the process mid-write.
        real_save = ckpt_mod.save_state_dict

        def slow_save(state, path, **kw):
            real_save(state, path, **kw)
            if f"step-{args.slow_checkpoint_at}-" in str(path):
                print(f"WRITING {path}", flush=True)
                time.sleep(30)

        ckpt_mod.save_state_dict = slow_save

    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        bf16=not args.fp32,
        eps=args.eps,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=3,
        ema_decay=0.9,
        checkpoint_every=10,
        keep_checkpoints=5,
        log_every=1,
        seed=7,
    )
    torch.manual_seed(0)
    if args.blocks:
        model = ToyBlocksModel(ToyBlocksConfig())
    else:
        model = ToyModel(ToyConfig(dropout=0.0 if args.deterministic else 0.1))
    rank = int(os.environ.get("RANK", "0"))

    def loss_fn(model, batch):
        x, y, index = batch
        if args.die_after and trainer.step >= args.die_after:
            os._exit(0)  # a kill at the same point on every rank, after step N's checkpoint
        if args.step_sleep:
            time.sleep(args.step_sleep / cfg.grad_accum)
        if args.log_samples:
            with open(f"{args.log_samples}.rank{rank}", "a") as f:
                f.write(" ".join(str(int(i)) for i in index) + "\n")
        if args.deterministic:
            return ((model(x) - y) ** 2).mean()
        return toy_loss(model, (x, y))

    data = IndexedToyData()
    trainer = Trainer(
        model, loss_fn, data, cfg, args.run_dir, device="cpu", progress=False, fsdp=args.fsdp
    )
    if trainer.fsdp:  # what this rank holds: a share of the parameters, not all of them
        params = list(trainer.model.parameters())
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        total = sum(p.numel() for p in params)
        print(f"SHARDED rank {rank}: {local} of {total}", flush=True)
    result = trainer.fit(resume=args.resume)
    if args.export:
        from unclip.train.stages.common import export_final

        export_final(trainer, result)
    distributed.teardown()
    print("DONE", flush=True)
    distributed.exit_after_group(0)


if __name__ == "__main__":
    main()
