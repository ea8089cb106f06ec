"""Data safety when training fails: a full disk while a checkpoint is written, a NaN or
infinite loss. The run stops, its last whole checkpoint stays intact and is the one
``--resume`` continues from (never a half-written one), and the CLI says so in one line.

The disk fills up by monkeypatching the checkpoint writers to raise
``OSError(errno.ENOSPC)`` part-way through the checkpoint of step 4 (after leaving a
partial file behind, as a real full disk does).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from toy import ToyConfig, ToyData, ToyModel, toy_loss
from unclip import cli
from unclip.config import TrainConfig
from unclip.data.shards import ShardWriter
from unclip.train import Trainer, TrainingDiverged
from unclip.train import checkpoint as ckpt_module
from unclip.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)

FAIL_STEP = 4
CONFIG = TrainConfig(
    steps=6, batch_size=8, checkpoint_every=2, keep_checkpoints=5, seed=3, ema_decay=0.9
)
WRITES = ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors",
          "trainer_state.json", "rename", "latest"]  # fmt: skip


def no_space(path: Any) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def in_failing_checkpoint(path: Path) -> bool:
    return path.parent.name.startswith(f".tmp-step-{FAIL_STEP}-")


def fill_disk_at(monkeypatch: pytest.MonkeyPatch, write: str) -> None:
    """Make the ``write`` of step FAIL_STEP's checkpoint fail with ENOSPC."""
    real_tensors = ckpt_module.save_state_dict
    real_text = ckpt_module.write_text_atomic
    real_replace = os.replace

    def save_state_dict(state: Any, path: Any, **kw: Any) -> None:
        path = Path(path)
        if in_failing_checkpoint(path) and path.name == write:
            path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(b"\0" * 100)  # cut short
            raise no_space(path)
        real_tensors(state, path, **kw)

    def write_text_atomic(path: Path, text: str) -> None:
        failing_state = in_failing_checkpoint(path) and path.name == write
        failing_latest = write == "latest" and path.name == "latest" and f"-{FAIL_STEP}" in text
        if failing_state or failing_latest:
            path.with_name(f".{path.name}.tmp-{os.getpid()}").write_text(text[:5])
            raise no_space(path)
        real_text(path, text)

    def replace(src: Any, dst: Any) -> None:
        if write == "rename" and Path(src).name.startswith(f".tmp-step-{FAIL_STEP}-"):
            raise no_space(dst)
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_module, "save_state_dict", save_state_dict)
    monkeypatch.setattr(ckpt_module, "write_text_atomic", write_text_atomic)
    monkeypatch.setattr(os, "replace", replace)


def trainer(run_dir: Path, loss_fn: Callable[..., Any] = toy_loss) -> Trainer:
    torch.manual_seed(0)  # the same initial weights for every run
    return Trainer(ToyModel(ToyConfig()), loss_fn, ToyData(), CONFIG, run_dir, progress=False)


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    assert trainer(run_dir).fit().step == CONFIG.steps
    return run_dir


@pytest.mark.parametrize("write", WRITES)
def test_disk_full_while_checkpointing_keeps_the_last_whole_one(
    straight_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    root = checkpoint_dir(tmp_path)
    with monkeypatch.context() as m:
        fill_disk_at(m, write)
        with pytest.raises(CheckpointError) as info:
            trainer(tmp_path).fit()
    message = str(info.value)
    assert "\n" not in message
    for needle in (f"step {FAIL_STEP}", "No space left on device", "training stopped",
                   str(root / "step-2")):  # fmt: skip
        assert needle in message, (needle, message)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC

    # the last whole checkpoint is intact, named by `latest`, and readable
    assert latest_checkpoint(tmp_path) == root / "step-2"
    assert (root / "latest").read_text().strip() == "step-2"
    assert load_checkpoint(root / "step-2").step == 2
    assert_same_weights(root / "step-2", straight_run / "checkpoints" / "step-2")
    # the failed write left nothing that looks like a checkpoint (its folder is gone)
    assert not list(root.glob(".tmp-step-*"))
    if write != "latest":  # a failed pointer update leaves a whole step-4 that is not used
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2"]

    # --resume continues from step 2 and ends exactly where an uninterrupted run ends
    result = trainer(tmp_path).fit(resume=True)
    assert result.step == CONFIG.steps
    assert latest_checkpoint(tmp_path) == root / f"step-{CONFIG.steps}"
    assert_same_weights(root / f"step-{CONFIG.steps}", straight_run / "checkpoints" / "step-6")


def test_disk_full_before_any_checkpoint_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_full(state: Any, path: Any, **kw: Any) -> None:
        raise no_space(path)

    monkeypatch.setattr(ckpt_module, "save_state_dict", always_full)
    with pytest.raises(CheckpointError, match="No whole checkpoint was written yet"):
        trainer(tmp_path).fit()
    assert latest_checkpoint(tmp_path) is None
    assert not list(checkpoint_dir(tmp_path).iterdir())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_loss_stops_with_the_last_checkpoint_intact(
    straight_run: Path, tmp_path: Path, bad: float
) -> None:
    run: Trainer

    def loss_fn(model: torch.nn.Module, batch: Any) -> Any:
        loss, metrics = toy_loss(model, batch)
        return (loss * 0 + bad if run.step >= 3 else loss), metrics

    run = trainer(tmp_path, loss_fn)
    with pytest.raises(TrainingDiverged) as info:
        run.fit()
    message = str(info.value)
    assert "\n" not in message and "step 4" in message and "step-2" in message
    assert str(bad) in message  # nan, inf or -inf
    root = checkpoint_dir(tmp_path)
    assert latest_checkpoint(tmp_path) == root / "step-2"
    assert_same_weights(root / "step-2", straight_run / "checkpoints" / "step-2")
    # the diverged steps were never checkpointed: a resume (with a sane loss) is exact
    assert trainer(tmp_path).fit(resume=True).step == CONFIG.steps
    assert_same_weights(root / "step-6", straight_run / "checkpoints" / "step-6")


# ---------------------------------------------------------------------------------------------
# Through the CLI: `unclip train upsampler` (the one stage that needs no CLIP)


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("squares")
    with ShardWriter(root, "sq", max_count=100) as w:
        for i in range(16):
            img = Image.new("RGB", (16, 16), "white")
            ImageDraw.Draw(img).rectangle((2 + i % 4, 3, 12, 12), fill=(20 * i, 90, 200 - 9 * i))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            w.write(f"{i:04d}", {"png": buf.getvalue(), "txt": b"a square"})
    records = [{"key": f"{i:04d}", "caption": "a square", "split": "train"} for i in range(16)]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture
def train_args(squares: Path, tmp_path: Path) -> Iterator[list[str]]:
    cfg = {
        "model": {"image_size": 16, "low_res_size": 8, "model_channels": 16,
                  "channel_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 8,
                  "learn_sigma": True},
        "diffusion": {"timesteps": 50, "learn_sigma": True, "loss": "hybrid"},
        "train": {"steps": 6, "batch_size": 4, "checkpoint_every": 2, "log_every": 1,
                  "bf16": False},
        "data": {"path": str(squares), "image_size": 16},
        "crop_size": 8,
    }  # fmt: skip
    (tmp_path / "upsampler.json").write_text(json.dumps(cfg))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ["train", "upsampler", "--config", str(tmp_path / "upsampler.json"),
           "--run-dir", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    torch.set_num_threads(before)


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def resume_finishes(args: list[str], run: Path) -> None:
    resume = [a for a in args if a not in ("--config", args[args.index("--config") + 1])]
    assert cli.main([*resume, "--resume"]) == 0
    assert latest_checkpoint(run) == checkpoint_dir(run) / "step-6"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], "steps after the last checkpoint are dropped and redone"
    assert (run / "final" / "model.safetensors").is_file()


def test_cli_disk_full_stops_in_one_line_and_resumes(
    train_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        fill_disk_at(m, "optimizer.safetensors")
        capsys.readouterr()
        assert cli.main(train_args) == 2
    line = error_line(capsys)
    assert line.startswith("unclip train: error: ")
    for needle in ("step 4", "No space left on device", str(checkpoint_dir(run) / "step-2"),
                   "--resume"):  # fmt: skip
        assert needle in line, (needle, line)
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]
    assert not (run / "final").exists(), "a failed run exports no final model"
    resume_finishes(train_args, run)


def test_cli_nan_loss_stops_in_one_line_and_resumes(
    train_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from unclip.train.stages import upsampler

    run = tmp_path / "run"
    real_call = upsampler.UpsamplerLoss.__call__
    calls = {"n": 0}

    def diverging(self: Any, model: Any, images: torch.Tensor) -> Any:
        calls["n"] += 1
        loss, metrics = real_call(self, model, images)
        return (loss * math.nan if calls["n"] == 3 else loss), metrics

    with monkeypatch.context() as m:
        m.setattr(upsampler.UpsamplerLoss, "__call__", diverging)
        capsys.readouterr()
        assert cli.main(train_args) == 2
    line = error_line(capsys)
    assert line.startswith("unclip train: error: loss is nan at step 3")
    assert str(checkpoint_dir(run) / "step-2") in line
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]
    assert not (run / "final").exists()
    resume_finishes(train_args, run)
