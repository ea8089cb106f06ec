"""The training loop: bit-exact resume after a kill, atomic checkpoints, schedule, divergence."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toy import ToyConfig, ToyData, ToyModel, toy_loss
from unclip.config import TrainConfig
from unclip.hub import from_pretrained
from unclip.train import Trainer, TrainingDiverged
from unclip.train.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from unclip.train.schedule import lr_at

SCRIPT = Path(__file__).parent / "train_toy.py"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


def start(run_dir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(run_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def run(run_dir: Path, *args: str) -> str:
    proc = start(run_dir, *args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stdout.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.02)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in CHECKPOINT_FILES:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}:{key} differs"
    sa = json.loads((a / "trainer_state.json").read_text())
    sb = json.loads((b / "trainer_state.json").read_text())
    for key in ("step", "data", "ema_updates", "optimizer"):
        assert sa[key] == sb[key], key
    ra, rb = load_file(a / "rng.safetensors"), load_file(b / "rng.safetensors")
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    run(run_dir, "--steps", "20")
    return run_dir


def test_kill_and_resume_is_bit_identical(straight_run, tmp_path):
    run_dir = tmp_path / "killed"
    proc = start(run_dir, "--steps", "20", "--step-sleep", "0.2")
    wait_for(lambda: latest_checkpoint(run_dir) is not None, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-10"]
    run(run_dir, "--steps", "20", "--resume")
    assert_same_checkpoint(
        straight_run / "checkpoints" / "step-20", run_dir / "checkpoints" / "step-20"
    )
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 21)), "metrics of the killed steps must be dropped on resume"


def test_half_written_checkpoint_is_never_used(straight_run, tmp_path):
    run_dir = tmp_path / "half"
    proc = start(run_dir, "--steps", "20", "--slow-checkpoint-at", "20")
    root = checkpoint_dir(run_dir)
    wait_for(lambda: any(p.name.startswith(".tmp-step-20") for p in root.glob(".tmp-*")), proc)
    # the slow writer sleeps after its first file: the folder is now half-written
    wait_for(lambda: any(root.glob(".tmp-step-20-*/model.safetensors")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(run_dir) == root / "step-10"
    assert (root / "latest").read_text().strip() == "step-10"
    # a step folder without its trainer state (as a copy cut short would leave) is not whole
    fake = root / "step-30"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(run_dir) == root / "step-10"
    out = run(run_dir, "--steps", "20", "--resume")
    assert "DONE" in out
    assert not list(root.glob(".tmp-*")), "the partial folder is cleaned on resume"
    assert_same_checkpoint(straight_run / "checkpoints" / "step-20", root / "step-20")


def test_resume_without_checkpoint_starts_fresh_and_finished_run_is_noop(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, seed=3, ema_decay=0.5)
    trainer = Trainer(ToyModel(ToyConfig()), toy_loss, ToyData(), cfg, tmp_path, progress=False)
    result = trainer.fit(resume=True)
    assert result.step == 4 and result.checkpoint == checkpoint_dir(tmp_path) / "step-4"
    again = Trainer(ToyModel(ToyConfig()), toy_loss, ToyData(), cfg, tmp_path, progress=False)
    assert again.fit(resume=True).step == 4
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.state["train_config"]["steps"] == 4


def test_time_limit_stops_with_a_checkpoint_and_resume_finishes_the_same_run(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, checkpoint_every=4, seed=5, ema_decay=0.5)

    def trainer(run_dir: Path) -> Trainer:
        torch.manual_seed(0)  # the same initial weights
        return Trainer(ToyModel(ToyConfig()), toy_loss, ToyData(), cfg, run_dir, progress=False)

    straight = trainer(tmp_path / "straight").fit()
    assert straight.finished
    cut = trainer(tmp_path / "cut").fit(max_seconds=0.0)  # out of time after the first step
    assert (cut.step, cut.finished) == (1, False)
    assert cut.checkpoint == checkpoint_dir(tmp_path / "cut") / "step-1"
    done = trainer(tmp_path / "cut").fit(resume=True, max_seconds=3600.0)
    assert (done.step, done.finished) == (6, True)
    assert_same_checkpoint(straight.checkpoint, done.checkpoint)


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=8, checkpoint_every=2)
    Trainer(ToyModel(ToyConfig()), toy_loss, ToyData(), cfg, tmp_path, progress=False).fit()
    with pytest.raises(Exception, match="resume"):
        Trainer(ToyModel(ToyConfig()), toy_loss, ToyData(), cfg, tmp_path, progress=False).fit()


def test_checkpoint_folder_rebuilds_the_model(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=8, checkpoint_every=3, ema_decay=0.9)
    model = ToyModel(ToyConfig(hidden=16))
    Trainer(model, toy_loss, ToyData(), cfg, tmp_path, progress=False).fit()
    folder = checkpoint_dir(tmp_path) / "step-3"
    rebuilt = from_pretrained(folder, weights="model")
    assert rebuilt.config.hidden == 16
    model.eval()
    x = torch.randn(4, 8)
    assert torch.equal(rebuilt(x), model(x))


def test_keep_prunes_old_checkpoints(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, checkpoint_every=1, keep_checkpoints=2)
    Trainer(ToyModel(ToyConfig()), toy_loss, ToyData(), cfg, tmp_path, progress=False).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-5", "step-6"]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    cfg = TrainConfig(steps=10, batch_size=8, checkpoint_every=2)

    def loss_fn(model, batch):
        loss, metrics = toy_loss(model, batch)
        return (loss * math.nan if trainer.step >= 3 else loss), metrics

    trainer = Trainer(ToyModel(ToyConfig()), loss_fn, ToyData(), cfg, tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match="step 4.*step-2"):
        trainer.fit()
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path) / "step-2"
    load_checkpoint(latest_checkpoint(tmp_path))


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches of 8 give the same update as one batch of 16 (dropout off)."""
    results = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = ToyModel(ToyConfig(dropout=0.0))
        cfg = TrainConfig(
            steps=1, batch_size=16, grad_accum=accum, ema_decay=0.0, warmup_steps=0, seed=1
        )

        def loss_fn(model, batch):
            x, y = batch
            return ((model(x) - y) ** 2).mean()

        Trainer(model, loss_fn, ToyData(), cfg, tmp_path / str(accum), progress=False).fit()
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)


def test_metrics_are_logged(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, log_every=2, checkpoint_every=4)
    Trainer(ToyModel(ToyConfig()), toy_loss, ToyData(), cfg, tmp_path, progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"loss", "lr", "grad_norm", "mse", "samples_per_s"} <= r.keys()
        assert math.isfinite(r["loss"])


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] >= 0.1 and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_bf16_autocast_trains_and_keeps_fp32_weights(tmp_path, monkeypatch):
    from unclip.train import loop

    monkeypatch.setattr(loop, "native_bf16", lambda device: True)  # also where it is emulated
    seen = []

    def loss_fn(model, batch):
        x, y = batch
        out = model(x)
        seen.append(out.dtype)
        return ((out.float() - y) ** 2).mean()

    cfg = TrainConfig(steps=2, batch_size=8, bf16=True, checkpoint_every=2)
    model = ToyModel(ToyConfig())
    result = Trainer(model, loss_fn, ToyData(), cfg, tmp_path, progress=False).fit()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(result.last_metrics["loss"])


def test_compile_trains_the_same_model_with_the_same_checkpoint_keys(tmp_path, monkeypatch):
    """``compile: true`` compiles the model in place (here with dynamo's "eager" backend, so
    no code generation): the run trains, and its checkpoint loads into a plain model."""
    from unclip.pipeline.stages import is_compiled

    plain_compile = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: plain_compile(self, backend="eager")
    )
    cfg = TrainConfig(steps=3, batch_size=8, checkpoint_every=3, ema_decay=0.9, compile=True)
    model = ToyModel(ToyConfig(hidden=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, toy_loss, ToyData(), cfg, tmp_path, progress=False)
    assert is_compiled(trainer.model)
    trainer.fit()
    rebuilt = from_pretrained(checkpoint_dir(tmp_path) / "step-3", weights="model")
    assert rebuilt.state_dict().keys() == before.keys()
    assert not all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in before.items())
    model.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_channels_last_only_where_it_pays(tmp_path):
    """Convolution models train channels-last, except GroupNorm models on the CPU in bf16
    (oneDNN's channels-last bf16 group-norm backward costs more than the convolutions gain);
    in float32 those go channels-last where their 3×3 convolutions train as Winograd."""
    from torch import nn

    from unclip.train.loop import channels_last_pays

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    batch_norm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    group_norm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
    assert channels_last_pays(batch_norm, cpu) and channels_last_pays(batch_norm, cuda)
    assert not channels_last_pays(group_norm, cpu) and channels_last_pays(group_norm, cuda)
    from unclip.decoder import winograd
    from unclip.decoder.blocks import Conv3x3

    adm = nn.Sequential(Conv3x3(8, 8), nn.GroupNorm(2, 8))
    assert not channels_last_pays(group_norm, cpu, bf16=False)  # no Conv3x3: nothing gained
    assert channels_last_pays(adm, cpu, bf16=False) == winograd.available()
    assert not channels_last_pays(adm, cpu, bf16=True)

    def weight_format(model: nn.Module) -> bool:
        trainer = Trainer(model, lambda m, b: m(b).mean(), torch.randn(8, 3, 6, 6),
                          TrainConfig(steps=1, batch_size=4), tmp_path / str(id(model)),
                          progress=False)  # fmt: skip
        return trainer.model[0].weight.is_contiguous(memory_format=torch.channels_last)

    assert weight_format(batch_norm)
    assert not weight_format(group_norm.to(memory_format=torch.channels_last))
    float32 = Trainer(nn.Sequential(Conv3x3(3, 8), nn.GroupNorm(2, 8)),
                      lambda m, b: m(b).mean(), torch.randn(8, 3, 6, 6),
                      TrainConfig(steps=1, batch_size=4, bf16=False), tmp_path / "float32",
                      progress=False)  # fmt: skip
    cl = float32.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert cl == winograd.available()


def _cpuinfo(cores: list[tuple[int, int]]) -> str:
    """/proc/cpuinfo text with one block per logical CPU: (physical id, core id)."""
    return "\n\n".join(
        f"processor\t: {cpu}\nvendor_id\t: x\nphysical id\t: {socket}\ncore id\t\t: {core}"
        for cpu, (socket, core) in enumerate(cores)
    )


def test_physical_cores_count_hyperthread_siblings_once(monkeypatch):
    from unclip.train import distributed

    # two sockets of two cores with two hyperthreads each: CPUs 0-3, then their siblings 4-7
    text = _cpuinfo([(0, 0), (0, 1), (1, 0), (1, 1)] * 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert distributed.physical_cores(text) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 4, 1}, raising=False)
    assert distributed.physical_cores(text) == 2  # CPU 4 is CPU 0's sibling
    arm = "processor\t: 0\nBogoMIPS\t: 50\n\nprocessor\t: 1\nBogoMIPS\t: 50"  # no core ids
    assert distributed.physical_cores(arm) == 3  # the CPUs the process may use
    monkeypatch.setattr(distributed, "physical_cores", lambda: 8)
    monkeypatch.delenv(distributed.THREADS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed.default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's processes share the cores
    assert distributed.default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert distributed.default_threads() == 1
    monkeypatch.setenv(distributed.THREADS_ENV, "5")  # a job's choice wins
    assert distributed.default_threads() == 5
    monkeypatch.setenv(distributed.THREADS_ENV, "0")
    with pytest.raises(ValueError, match="UNCLIP_THREADS='0'"):
        distributed.default_threads()


class _RandomDraws(torch.utils.data.Dataset):
    """Sample i: (i, a draw from torch's, numpy's and Python's global RNG)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        import random

        import numpy as np

        return torch.tensor([i, float(torch.rand(())), np.random.rand(), random.random()])


def test_loader_workers_draw_per_sample_seeds_that_resume_exactly():
    """With loader workers, a data set's random draws depend on the seed, the epoch and the
    sample's place in it, not on which worker loads it: a resumed source and one with another
    worker count yield the same batches as an uninterrupted one."""
    from unclip.train.batches import EpochBatches

    def take(source, n):
        return list(itertools.islice(iter(source), n))

    straight = take(EpochBatches(_RandomDraws(), 4, seed=3, num_workers=2), 7)  # 2+ epochs
    draws = torch.cat(straight)[:, 1:]
    assert len(set(draws.flatten().tolist())) == draws.numel()  # no two draws alike
    first = EpochBatches(_RandomDraws(), 4, seed=3, num_workers=1)
    head = take(first, 4)
    resumed = EpochBatches(_RandomDraws(), 4, seed=3, num_workers=1)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(straight, head + take(resumed, 3), strict=True):
        assert torch.equal(a, b)
    other_seed = take(EpochBatches(_RandomDraws(), 4, seed=4, num_workers=2), 1)[0]
    assert not torch.equal(other_seed[:, 1:], straight[0][:, 1:])


def test_resumed_moments_take_their_parameters_layout():
    """A channels-last model's AdamW moments come back from a checkpoint contiguous; the fused
    step pairs elements in memory order, so they are given the parameters' strides again and
    the resumed step equals the uninterrupted one."""
    from torch import nn

    from unclip.train.loop import match_state_layouts

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)

    def step(m: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
        x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    a = model()
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1, fused=True)
    step(a, opt_a, 0)
    saved = {k: v for k, v in opt_a.state_dict().items()}
    saved["state"] = {
        i: {k: v.contiguous().clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in saved["state"].items()
    }  # as a checkpoint stores them; fmt: skip
    b = model()
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1, fused=True)
    opt_b.load_state_dict(saved)
    match_state_layouts(opt_b)
    assert opt_b.state[b.weight]["exp_avg"].stride() == b.weight.stride()
    step(a, opt_a, 1)
    step(b, opt_b, 1)
    assert torch.equal(a.weight, b.weight)


def test_bf16_where_it_is_not_native_trains_in_float32(tmp_path, monkeypatch):
    """config.bf16 on a CPU without native bf16 (an AVX2-only CPU, where bf16 is emulated and
    25× slower): a warning, and the steps run in float32."""
    from unclip.train import loop

    monkeypatch.setattr(loop, "native_bf16", lambda device: False)
    cfg = TrainConfig(steps=2, batch_size=8, checkpoint_every=2, bf16=True)
    with pytest.warns(UserWarning, match="no native bf16; training in float32"):
        trainer = Trainer(ToyModel(ToyConfig()), toy_loss, ToyData(), cfg, tmp_path,
                          progress=False)  # fmt: skip
    assert not trainer.bf16
    with loop.autocast_context(trainer.device, True):
        assert not torch.is_autocast_enabled("cpu")
    trainer.fit()
    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    with loop.autocast_context(torch.device("cpu"), True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled(
            "cpu"
        )
