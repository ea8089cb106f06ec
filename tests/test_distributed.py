"""Multi-process training under torchrun (gloo on CPU): equivalence, data split, kill + relaunch."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unclip.train.checkpoint import latest_checkpoint

SCRIPT = Path(__file__).parent / "train_toy.py"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, nproc: int, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(SCRIPT)]  # fmt: skip
    return subprocess.Popen(
        [*cmd, str(run_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # so a kill reaches torchrun and all its workers
    )


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and all its descendants; returns their pids. torchrun starts its workers
    in sessions of their own, so killing torchrun's process group would miss them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return tree


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # fp32, and an AdamW epsilon that keeps near-zero gradients from turning rounding noise
    # into full-size sign flips of Adam's first updates
    common = ["--steps", "6", "--batch-size", "16", "--deterministic", "--fp32", "--eps", "1e-4"]
    one = launch(tmp_path / "one", 1, *common, "--grad-accum", "1")
    finish(one)
    two = launch(tmp_path / "two", 2, *common, "--grad-accum", "1")
    finish(two)
    accum = launch(tmp_path / "accum", 2, *common, "--grad-accum", "2")
    finish(accum)
    a = weights(tmp_path / "one" / "checkpoints" / "step-6")
    for other in ("two", "accum"):
        b = weights(tmp_path / other / "checkpoints" / "step-6")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{other}:{key}")
    metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 6  # rank 0 alone writes the log


def test_two_ranks_see_every_sample_exactly_once_per_epoch(tmp_path):
    # ToyData has 96 samples; global batch 16 -> 6 steps is exactly one epoch
    log = tmp_path / "samples"
    finish(launch(tmp_path / "run", 2, "--steps", "6", "--batch-size", "16", "--grad-accum",
                  "2", "--log-samples", str(log)))  # fmt: skip
    seen = {}
    for rank in (0, 1):
        lines = Path(f"{log}.rank{rank}").read_text().split()
        seen[rank] = [int(x) for x in lines]
    assert len(seen[0]) == len(seen[1]) == 48
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(96))


def test_killed_two_process_run_relaunches_to_the_same_weights(tmp_path):
    common = ["--steps", "20", "--batch-size", "16", "--grad-accum", "2"]
    finish(launch(tmp_path / "straight", 2, *common))
    run = tmp_path / "killed"
    proc = launch(run, 2, *common, "--step-sleep", "0.3")
    end = time.monotonic() + 240
    while latest_checkpoint(run) is None:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)
    tree = kill_tree(proc.pid)
    proc.wait()
    assert len(tree) >= 3  # torchrun and its two workers
    end = time.monotonic() + 30
    while any(alive(p) for p in tree[1:]):
        assert time.monotonic() < end, "the workers survived SIGKILL"
        time.sleep(0.05)
    time.sleep(1.0)  # a surviving worker would write step-20 (0.3 s a step)
    assert latest_checkpoint(run).name == "step-10"
    finish(launch(run, 2, *common, "--resume"))
    a, b = tmp_path / "straight" / "checkpoints" / "step-20", run / "checkpoints" / "step-20"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        wa, wb = weights(a, name), weights(b, name)
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key}"
