"""Train the toy model in its own process (used by the kill-and-resume tests).

usage: python tests/train_toy.py RUN_DIR --steps N [--resume] [--step-sleep S]
                                 [--slow-checkpoint-at STEP]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import unclip.train.checkpoint as ckpt_mod
from toy import ToyConfig, ToyData, ToyModel, toy_loss
from unclip.config import TrainConfig
from unclip.train import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--slow-checkpoint-at", type=int, default=-1)
    p.add_argument("--lr", type=float, default=3e-3)
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
        batch_size=16,
        grad_accum=2,
        lr=args.lr,
        warmup_steps=3,
        ema_decay=0.9,
        checkpoint_every=10,
        keep_checkpoints=5,
        log_every=1,
        seed=7,
    )
    torch.manual_seed(0)
    model = ToyModel(ToyConfig())

    def loss_fn(model, batch):
        if args.step_sleep:
            time.sleep(args.step_sleep / cfg.grad_accum)
        return toy_loss(model, batch)

    Trainer(model, loss_fn, ToyData(), cfg, args.run_dir, device="cpu", progress=False).fit(
        resume=args.resume
    )
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
