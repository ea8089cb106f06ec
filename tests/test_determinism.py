"""Training is a function of the config and the seed, on one machine at one thread count:
two runs give the same weights bit for bit, and so does a run killed mid-step and resumed."""

# ruff: noqa: F401, F811 (the tiny data set, tokenizer and CLIP are test_stages' fixtures)

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_stages import (
    _clip_config,
    _decoder_config,
    shapes,
    tiny_clip_and_embeddings,
    tokenizer_dir,
)
from unclip.cli import main

# Imported into the killed process (PYTHONPATH): once a checkpoint is written, the next
# step's loss is computed (its noise, timesteps and masks drawn), then the process announces
# itself and waits to be killed, so the kill lands mid-step on every machine, loaded or not.
PAUSE_HOOK = """
import os, time
from unclip.train import loop

_save, _loss = loop.Trainer.save, loop.Trainer._loss

def save(self):
    out = _save(self)
    self._saved_once = True
    return out

def _paused_loss(self, batch):
    out = _loss(self, batch)
    if getattr(self, "_saved_once", False):
        open(os.environ["UNCLIP_TEST_PAUSED"], "w").close()
        time.sleep(600)
    return out

loop.Trainer.save, loop.Trainer._loss = save, _paused_loss
"""


def _weights(final: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's final model and EMA weights, by file and name."""
    out = {}
    for name in ("model.safetensors", "ema.safetensors"):
        for key, value in load_file(final / name).items():
            out[f"{name}:{key}"] = value
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in ("time", "samples_per_s")}
            for x in lines]  # fmt: skip


def _command(config: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unclip", "train", "decoder", "--config", str(config),
            "--run-dir", str(run), "--no-progress", "--threads", "1", *extra]  # fmt: skip


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _killed_and_resumed(config: Path, run: Path, tmp_path: Path, *extra: str) -> None:
    """Start the run, SIGKILL it in the step after its first checkpoint, then --resume it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    paused = tmp_path / "paused"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), *sys.path]),
               UNCLIP_TEST_PAUSED=str(paused))  # fmt: skip
    proc = subprocess.Popen(_command(config, run, *extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not paused.exists():
            assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the run never reached its first checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-2"
    _run(_command(config, run, "--resume", *extra))
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_decoder_runs_and_a_killed_resumed_run_give_the_same_weights(
    shapes, tiny_clip_and_embeddings, tmp_path, precision
):
    """The decoder stage (inpainting, text conditioning, EMA) in two separate processes with
    one seed, and in a third killed with SIGKILL mid-step after its step-2 checkpoint and
    resumed: every tensor of the model and the EMA is equal, and so is every logged metric.

    float32 (--no-bf16) and bf16 autocast alike, one thread each."""
    clip_dir, emb = tiny_clip_and_embeddings
    cfg = _decoder_config(shapes, clip_dir, emb)
    cfg["train"].update(steps=5, checkpoint_every=2, log_every=1, lr=1e-3, warmup_steps=0)
    config = tmp_path / "decoder.json"
    config.write_text(json.dumps(cfg))
    extra = ["--no-bf16"] if precision == "float32" else []
    runs = {name: tmp_path / name for name in ("first", "second", "killed")}
    _run(_command(config, runs["first"], *extra))
    _run(_command(config, runs["second"], *extra))
    _killed_and_resumed(config, runs["killed"], tmp_path, *extra)
    for name in ("second", "killed"):
        _assert_same_weights(runs["first"] / "final", runs[name] / "final")
        assert _metrics(runs[name]) == _metrics(runs["first"])
    assert [m["step"] for m in _metrics(runs["killed"])] == [1, 2, 3, 4, 5]
    # the weights moved in the last step: equal runs are not equal because nothing trained
    before = load_file(runs["first"] / "checkpoints" / "step-4" / "model.safetensors")
    after = load_file(runs["first"] / "final" / "model.safetensors")
    assert sum(not torch.equal(before[k], after[k]) for k in after) > len(after) // 2


def _stage_config(stage: str, data: Path, tokenizer: Path, clip_dir: Path, emb: Path):
    """(train args, run config) of a tiny run of ``stage`` with every random draw it makes:
    CLIP with caption variants, the priors with caption dropout, the upsampler with crops."""
    train = {"steps": 3, "batch_size": 8, "checkpoint_every": 3, "lr": 1e-3, "warmup_steps": 0}
    if stage == "clip":
        cfg = json.loads(_clip_config(data.parent, data, tokenizer, 3).read_text())
        return ["clip"], {**cfg, "caption_variants": 0.5, "train": {**cfg["train"], **train}}
    if stage in ("prior", "ar-prior"):
        model = {"clip_dim": 16, "text_dim": 32, "text_len": 12, "width": 32, "layers": 1,
                 "heads": 2}  # fmt: skip
        if stage == "ar-prior":
            model.update(buckets=16, dot_buckets=4, variance=0.95)
            return ["prior", "--type", "ar"], {"model": model, "train": train,
                                               "data": {"embeddings": str(emb)},
                                               "clip": str(clip_dir)}  # fmt: skip
        return ["prior"], {"model": model, "diffusion": {"timesteps": 50, "prediction": "x0"},
                           "train": train, "data": {"embeddings": str(emb)},
                           "clip": str(clip_dir)}  # fmt: skip
    return ["upsampler"], {
        "model": {"image_size": 16, "low_res_size": 8, "model_channels": 16,
                  "channel_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 8,
                  "learn_sigma": True},
        "diffusion": {"timesteps": 50, "learn_sigma": True, "loss": "hybrid"},
        "train": train,
        "data": {"path": str(data), "split": "train", "image_size": 16},
        "crop_size": 8,
    }  # fmt: skip


@pytest.mark.parametrize("stage", ["clip", "prior", "ar-prior", "upsampler"])
def test_every_stage_trains_to_the_same_weights_twice(
    shapes, tokenizer_dir, tiny_clip_and_embeddings, tmp_path, stage
):
    """Two runs of one config give equal weights (model and EMA) in every stage, here in one
    process, whose global RNG the first run has moved on: the run seeds it itself."""
    clip_dir, emb = tiny_clip_and_embeddings
    command, cfg = _stage_config(stage, shapes, tokenizer_dir, clip_dir, emb)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(cfg))
    for name in ("first", "second"):
        args = ["train", *command, "--config", str(config), "--run-dir", str(tmp_path / name),
                "--no-progress", "--threads", "1"]  # fmt: skip
        assert main(args) == 0
    _assert_same_weights(tmp_path / "first" / "final", tmp_path / "second" / "final")
