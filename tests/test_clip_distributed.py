"""CLIP's global-batch loss under DistributedDataParallel: 2 gloo processes, each with half of
a batch, get the gradient one process gets from the whole batch (not 1/N of it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unclip.clip.loss import clip_training_loss
from unclip.clip.model import CLIP, CLIPConfig

pytestmark = pytest.mark.slow

CONFIG = dict(embed_dim=16, context_length=8, vocab_size=40, text_width=32, text_layers=1,
              text_heads=2, image_size=16, patch_size=8, vision_width=32, vision_layers=1,
              vision_heads=2)  # fmt: skip
BATCH = 8


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(BATCH, 3, 16, 16, generator=g)
    tokens = torch.randint(1, 38, (BATCH, 8), generator=g)
    tokens[:, 5] = 39  # the end token (the highest id)
    tokens[:, 6:] = 0
    return pixels, tokens


def _model() -> CLIP:
    torch.manual_seed(0)
    return CLIP(CLIPConfig(**CONFIG))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(_model())
        pixels, tokens = _batch()
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss, metrics = clip_training_loss(model, (pixels[half], tokens[half]))
        loss.backward()
        if rank == 0:
            save_file(_grads(model.module), out, metadata={"loss": repr(float(metrics["loss"]))})
        # Leave together: a rank tearing gloo down while the other still talks to it aborts.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_get_the_one_process_gradient(tmp_path: Path):
    model = _model()
    loss, metrics = clip_training_loss(model, _batch())
    loss.backward()
    expected = _grads(model)
    out = tmp_path / "rank0.safetensors"
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_rank, args=(2, init, str(out)), nprocs=2, join=True)
    with safe_open(str(out), "pt") as f:
        logged = float(f.metadata()["loss"])
    got = load_file(out)
    assert logged == pytest.approx(float(metrics["loss"]), rel=1e-5)  # the global loss is logged
    assert expected.keys() == got.keys()
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
