"""scripts/gpu/kit.py: pack, measure, train two stages, export, join, continue (on the CPU)."""

# ruff: noqa: F401, F811 (the tiny data set, tokenizer and CLIP are test_stages' fixtures)

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from test_stages import (
    _decoder_config,
    shapes,
    tiny_clip_and_embeddings,
    tokenizer_dir,
)
from unclip.data.datasets import open_dataset
from unclip.data.embeddings import EmbeddingShards, write_info, write_shard
from unclip.data.shards import ShardWriter
from unclip.decoder.unet import UNet
from unclip.hub import from_pretrained
from unclip.train.checkpoint import seed_everything


def _kit():
    spec = importlib.util.spec_from_file_location(
        "gpu_kit", Path(__file__).parents[1] / "scripts" / "gpu" / "kit.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kit = _kit()


def _configs(tmp_path: Path, shapes: Path, clip_dir: Path, emb: Path) -> dict[str, Path]:
    """A decoder at 8 px (its images derived from the 16 px ones) and an 8 -> 16 upsampler."""
    decoder = _decoder_config(shapes, clip_dir, emb)
    decoder["model"].update(image_size=8, attention_resolutions=[4])
    decoder["data"].update(image_size=8, balance=["concept", "style"])
    decoder["train"].update(steps=4, lr=1e-2, log_every=2, checkpoint_every=2)
    upsampler = {
        "model": {"image_size": 16, "low_res_size": 8, "model_channels": 8,
                  "channel_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 4,
                  "learn_sigma": True},
        "diffusion": {"timesteps": 50, "learn_sigma": True, "loss": "hybrid"},
        "train": {"steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 2},
        "data": {"path": str(shapes), "split": "train", "image_size": 16},
        "crop_size": 8,
    }  # fmt: skip
    paths = {}
    for stage, cfg in (("decoder", decoder), ("upsampler", upsampler)):
        paths[stage] = tmp_path / f"{stage}.json"
        paths[stage].write_text(json.dumps(cfg))
    return paths


def _pack_args(configs: dict[str, Path], clip_dir: Path, out: Path, *extra: str) -> list[str]:
    args = ["pack", "--clip", str(clip_dir), "--out", str(out), *extra]
    for stage, path in configs.items():
        args += ["--config", f"{stage}={path}"]
    return args


def _train_args(pack: Path, work: Path, out: Path, *extra: str) -> list[str]:
    # Budgets far above what the tiny stages need (their configs cap the steps), so that a
    # loaded or slow machine still measures both layouts and trains every planned step.
    return ["train", "--pack", str(pack), "--work", str(work), "--out", str(out), "--device",
            "cpu", "--minutes", "15", "--measure-seconds", "240", "--reserve", "5",
            "--min-steps", "2", *extra]  # fmt: skip


def test_kit_measures_trains_two_stages_joins_and_continues(
    shapes, tiny_clip_and_embeddings, tmp_path, capsys, monkeypatch
):
    """The pack derives the decoder's 8 px images from the 16 px ones exactly and carries the
        CLIP text side only; train measures each stage by parts, chooses its options, trains both
        stages and sends back their EMA weights in float16; join rebuilds both model folders and
        refuses a damaged part; a second visit continues the decoder from the returned weights (and
    trains it, unmeasured, when measuring fails)."""
    clip_dir, emb = tiny_clip_and_embeddings
    configs = _configs(tmp_path, shapes, clip_dir, emb)
    pack = tmp_path / "shapes.pack"
    capsys.readouterr()
    assert kit.main(_pack_args(configs, clip_dir, pack)) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["count"] == 56 and meta["sizes"] == {"decoder": 8, "upsampler": 16}
    assert meta["derived"] == {"8": True} and "images-8.u8.xz" not in meta["members"]
    assert meta["bytes"] == pack.stat().st_size and meta["travels"].endswith(" MB")
    _, files = kit.read_pack(pack)
    text = kit.load_text_side(files)
    assert text and not any(k.startswith("visual.") for k in text)

    work, out = tmp_path / "work", tmp_path / "out"
    assert kit.main(_train_args(pack, work, out, "--try", "layout")) == 0, (
        out / "train.log"
    ).read_text()
    for size in (8, 16):  # the decoder and the upsampler read what they would have read
        before, after = (
            open_dataset(shapes, size, split="train"),
            open_dataset(work / "data-16", size, split="train"),
        )
        old = {before[i]["key"]: before[i]["image"] for i in range(len(before))}
        assert len(after) == len(old) == 56
        assert all(torch.equal(after[i]["image"], old[after[i]["key"]]) for i in range(56))
    old_emb, new_emb = EmbeddingShards(emb), EmbeddingShards(work / "embeddings")
    for key in old:
        a, b = old_emb[old_emb.index_of(key)], new_emb[new_emb.index_of(key)]
        assert torch.equal(a["image_emb"], b["image_emb"])
        assert torch.allclose(a["text_emb"], b["text_emb"], atol=2e-3)

    summary = json.loads((out / "kit.json").read_text())
    assert next(iter(summary)) == "verdict" and "samples/s" in summary["verdict"]
    log = (out / "train.log").read_text()
    for stage in ("decoder", "upsampler"):
        assert f"## `unclip bench train {stage}`" in log and f"$ unclip train {stage}" in log
        m = summary["measure"][stage]
        assert set(m["profile"]["parts_ms"]) >= {"data", "forward", "backward", "optimizer"}
        timed = [t for t in m["trials"] if "step_s" in t]
        best = min(timed, key=lambda t: t["step_s"])
        assert m["choice"] == {k: best[k] for k in ("channels_last", "compile") if k in best}
        assert {t["channels_last"] for t in timed} == {True, False}  # the faster one kept
        r = summary["stages"][stage]
        assert r["step"] == r["planned_steps"] == 4 and r["source"] == "final"
    assert len(summary["parts"]) + 2 <= kit.MAX_FILES

    joined = kit.join(out, tmp_path / "joined")
    assert set(joined) == {"decoder", "upsampler"}
    for stage, folder in joined.items():
        model = from_pretrained(folder)
        ema = from_pretrained(work / f"run-{stage}" / "final")  # what the run samples with
        for key, value in ema.state_dict().items():
            assert torch.equal(model.state_dict()[key], value.half().float()), key
        assert (folder / "diffusion.json").exists() and (folder / "metrics.jsonl").exists()

    part = out / summary["parts"][0]
    good = part.read_bytes()
    part.write_bytes(b"x" + good[1:])
    assert kit.main(["join", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "do not add up" in capsys.readouterr().err and not (tmp_path / "again").exists()
    part.write_bytes(good)

    # a second visit: the decoder continues from what came back (a tiny learning rate keeps
    # its weights where they started, up to one step of 1e-9)
    cfg = json.loads(configs["decoder"].read_text())
    cfg["train"].update(lr=1e-9, warmup_steps=0)
    configs["decoder"].write_text(json.dumps(cfg))
    again = tmp_path / "again.pack"
    args = _pack_args({"decoder": configs["decoder"]}, clip_dir, again, "--stages", "decoder",
                      "--init", f"decoder={joined['decoder']}")  # fmt: skip
    assert kit.main(args) == 0
    assert json.loads(capsys.readouterr().out)["init"] == ["decoder"]
    out2 = tmp_path / "out2"

    def broken(*args, **kwargs):  # measuring that fails: the stage still trains, unmeasured
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(kit, "measure", broken)
    assert kit.main(_train_args(again, tmp_path / "work2", out2, "--try", "")) == 0, (
        out2 / "train.log"
    ).read_text()
    summary = json.loads((out2 / "kit.json").read_text())
    assert "decoder not measured (RuntimeError: CUDA out of memory)" in summary["verdict"]
    assert summary["stages"]["decoder"]["step"] == 4
    assert (
        f"decoder starts from {tmp_path / 'work2' / 'init' / 'decoder'}"
        in (out2 / "train.log").read_text()
    )
    second = from_pretrained(kit.join(out2, tmp_path / "joined2")["decoder"]).state_dict()
    first = from_pretrained(joined["decoder"]).state_dict()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, atol=1e-4, rtol=0)
    seed_everything(0)  # where a run from scratch starts: far from the returned weights
    fresh = UNet(from_pretrained(joined["decoder"]).config).state_dict()
    assert any(not torch.allclose(second[k], fresh[k], atol=1e-2) for k in first)


def test_pack_refuses_what_would_not_travel(shapes, tiny_clip_and_embeddings, tmp_path,
                                            capsys, monkeypatch):  # fmt: skip
    """Past the travel limit the pack is refused, naming what to leave out with its size;
    leaving the shipped weights out counts them no more."""
    clip_dir, emb = tiny_clip_and_embeddings
    configs = _configs(tmp_path, shapes, clip_dir, emb)
    tree = kit.travelling_bytes()
    assert tree["weights"] > 0 and tree["left out"] == 0
    monkeypatch.setattr(kit, "TRAVEL_LIMIT", tree["weights"] + tree["rest"])
    pack = tmp_path / "p.pack"
    capsys.readouterr()
    assert kit.main(_pack_args(configs, clip_dir, pack)) == 2
    err = capsys.readouterr().err
    assert "leave out src/unclip/weights" in err and "--max-images" in err and "MB" in err
    assert len(err.strip().splitlines()) == 1 and not pack.exists()
    assert kit.main(_pack_args(configs, clip_dir, pack, "--leave-out", "src/unclip/weights")) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["left_out"] == kit._mb(tree["weights"])


def _rgba(i: int) -> bytes:
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((2 + i % 3, 3, 13, 12 + i % 2), fill=(200, 40 * i % 255, 60, 255))
    buf = io.BytesIO()
    img.rotate(20 * i, resample=Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def test_pack_keeps_both_sizes_when_derived_images_would_differ(
    shapes, tiny_clip_and_embeddings, tmp_path, capsys
):
    """Transparent icons ("pad" mode: resized, then put on white) put on white at 16 px and
    then resized to 8 px are not what the decoder reads from the originals: the pack says so and carries the 8 px images too, and the
    unpacked decoder data set gives the original tensors."""
    clip_dir, _ = tiny_clip_and_embeddings
    data, emb = tmp_path / "rgba", tmp_path / "emb"
    records = []
    with ShardWriter(data, "rgba", max_count=10) as w:
        for i in range(6):
            w.write(f"{i:03d}", {"png": _rgba(i), "txt": b"a red circle"})
            records.append({"key": f"{i:03d}", "caption": "a red circle", "split": "train",
                            "mode": "pad", "shard": w.paths[-1].name})  # fmt: skip
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    write_shard(emb, 0, rows, rows, [{"key": r["key"], "caption": r["caption"]} for r in records])
    write_info(emb, 6, 1, 16)
    configs = _configs(tmp_path, data, clip_dir, emb)
    cfg = json.loads(configs["decoder"].read_text())
    cfg["data"].pop("balance")
    configs["decoder"].write_text(json.dumps(cfg))
    pack = tmp_path / "rgba.pack"
    capsys.readouterr()
    assert kit.main(_pack_args(configs, clip_dir, pack)) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["derived"] == {"8": False} and "images-8.u8.xz" in meta["members"]
    paths = kit.unpack(pack, tmp_path / "work", "cpu")
    assert paths["data"] == {"decoder": tmp_path / "work" / "data-8",
                             "upsampler": tmp_path / "work" / "data-16"}  # fmt: skip
    for stage, size in (("decoder", 8), ("upsampler", 16)):
        before = open_dataset(data, size, split="train")
        after = open_dataset(paths["data"][stage], size, split="train")
        assert all(torch.equal(before[i]["image"], after[i]["image"]) for i in range(6))
    derived = open_dataset(paths["data"]["upsampler"], 8, split="train")
    assert any(not torch.equal(derived[i]["image"], before[i]["image"]) for i in range(6))


def test_split_seconds_and_compile_trial_timeout(shapes, tiny_clip_and_embeddings, tmp_path):
    """Time shares: a stage that needs less than its share gives the rest away; a compile
    trial that outruns its time is killed and reported, not waited for."""
    assert kit.split_seconds(100, [500, 500], [0.7, 0.3]) == pytest.approx([70, 30])
    assert kit.split_seconds(100, [20, 500], [0.7, 0.3]) == pytest.approx([20, 80])
    assert kit.split_seconds(100, [10, 5], [0.7, 0.3]) == pytest.approx([10, 5])
    clip_dir, emb = tiny_clip_and_embeddings
    config = _configs(tmp_path, shapes, clip_dir, emb)["upsampler"]
    trial = kit.compile_trial("upsampler", config, "cpu", timeout=1.0)
    assert trial["finished"] is False and "1 s" in trial["why"]
