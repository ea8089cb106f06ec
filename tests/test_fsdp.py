"""FSDP training (``--fsdp``) under torchrun, 2 gloo processes on CPU: the same optimisation
as one unsharded process, whole checkpoints, bit-identical resume, a loadable ``final/``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from test_distributed import finish, launch
from toy import ToyBlocksConfig, ToyBlocksModel, ToyData, toy_loss
from unclip.cli import build_parser
from unclip.config import TrainConfig
from unclip.hub import from_pretrained
from unclip.train import Trainer
from unclip.train.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow


def assert_sharded(out: str, nproc: int = 2) -> None:
    """Every rank printed ``SHARDED rank R: LOCAL of TOTAL`` with LOCAL < TOTAL. The ranks
    share one stdout, so their lines may run together: they are found anywhere in it."""
    found = re.findall(r"SHARDED rank (\d+): (\d+) of (\d+)", out)
    assert sorted(int(rank) for rank, _, _ in found) == list(range(nproc)), out
    for _, local, total in found:
        assert 0 < int(local) < int(total), out  # the 0-d gain stays whole; the rest is split


def assert_same_checkpoint(a: Path, b: Path, exact: bool) -> None:
    """Model, EMA and optimizer state (by parameter number) of two checkpoints agree."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)

    def same(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
        if exact:
            assert torch.equal(x, y), what
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=what)

    for name, sa, sb in (("model", ca.model, cb.model), ("ema", ca.ema, cb.ema)):
        assert sa.keys() == sb.keys(), name
        for key in sa:
            same(sa[key], sb[key], f"{name}:{key}")
    oa, ob = ca.optimizer, cb.optimizer
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i, slots in oa["state"].items():
        for slot, value in slots.items():
            same(value, ob["state"][i][slot], f"optimizer:{i}:{slot}")
    assert ca.state["ema_updates"] == cb.state["ema_updates"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_two_processes_match_one_unsharded_process(tmp_path):
    # fp32 and a large AdamW epsilon, as in test_distributed: the comparison is of float sums
    common = ["--steps", "6", "--batch-size", "16", "--deterministic", "--fp32", "--eps", "1e-4",
              "--blocks"]  # fmt: skip
    finish(launch(tmp_path / "one", 1, *common, "--grad-accum", "1"))
    out = finish(launch(tmp_path / "fsdp", 2, *common, "--grad-accum", "1", "--fsdp", "--export"))
    assert_sharded(out)
    out = finish(launch(tmp_path / "accum", 2, *common, "--grad-accum", "2", "--fsdp"))
    assert_sharded(out)
    one = tmp_path / "one" / "checkpoints" / "step-6"
    for other in ("fsdp", "accum"):
        assert_same_checkpoint(one, tmp_path / other / "checkpoints" / "step-6", exact=False)
        # the logged loss and global gradient norm (summed over shards) are the same too
        for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / other), strict=True):
            assert a["step"] == b["step"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    torch.manual_seed(0)  # train_toy's initial weights: training moved them
    start = ToyBlocksModel(ToyBlocksConfig()).state_dict()
    trained = load_checkpoint(one).model
    assert not torch.allclose(start["out.weight"], trained["out.weight"], atol=1e-3)
    assert float(trained["gain"]) != 1.0  # the replicated 0-d parameter trained too

    # final/ of the FSDP run: a whole model folder, raw and EMA weights as in the checkpoint
    ckpt = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "step-6")
    for weights, expected in (("model", ckpt.model), ("ema", ckpt.ema)):
        model = from_pretrained(tmp_path / "fsdp" / "final", weights=weights)
        assert isinstance(model, ToyBlocksModel)
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), f"{weights}:{key}"


def test_fsdp_run_killed_and_resumed_matches_an_uninterrupted_one(tmp_path):
    # bf16 autocast and a noisy loss: the resumed run must restore every rank's RNG and shard.
    # The workers die on their own (a kill of torchrun would not reach them: it starts each
    # in a session of its own), at the same step, after step 10's checkpoint.
    common = ["--steps", "20", "--batch-size", "16", "--grad-accum", "2", "--blocks", "--fsdp"]
    finish(launch(tmp_path / "straight", 2, *common))
    run = tmp_path / "killed"
    finish(launch(run, 2, *common, "--die-after", "10"))
    assert latest_checkpoint(run).name == "step-10"
    assert len(metrics(run)) == 10
    assert_sharded(finish(launch(run, 2, *common, "--resume")))
    straight = tmp_path / "straight" / "checkpoints"
    assert_same_checkpoint(straight / "step-20", run / "checkpoints" / "step-20", exact=True)
    assert [m["step"] for m in metrics(run)] == list(range(1, 21))


def test_fsdp_in_one_process_warns_and_trains_unsharded(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.manual_seed(0)
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=0, ema_decay=0.9,
                      checkpoint_every=2, log_every=1)  # fmt: skip
    with pytest.warns(UserWarning, match="one process shards nothing"):
        trainer = Trainer(ToyBlocksModel(ToyBlocksConfig()), toy_loss, ToyData(), cfg, tmp_path,
                          device="cpu", progress=False, fsdp=True)  # fmt: skip
    assert not trainer.fsdp and trainer.ddp is None
    assert trainer.fit().step == 2
    assert (
        load_checkpoint(latest_checkpoint(tmp_path)).model.keys()
        == trainer.model_state_dict().keys()
    )


@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_every_train_stage_takes_fsdp(stage):
    parser = build_parser()
    assert parser.parse_args(["train", stage, "--run-dir", "r", "--fsdp"]).fsdp is True
    assert parser.parse_args(["train", stage, "--run-dir", "r"]).fsdp is False
