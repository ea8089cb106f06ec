"""``unclip train STAGE`` end to end on a tiny data set: tokenizer, CLIP (and resume)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from unclip.cli import main
from unclip.data.shards import ShardWriter
from unclip.hub import from_pretrained

COLORS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "black": (0, 0, 0)}
SHAPES = ("square", "circle")


def _image(color, shape: str) -> bytes:
    img = Image.new("RGB", (16, 16), "white")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    if shape == "square":
        draw.rectangle((3, 3, 12, 12), fill=color)
    else:
        draw.ellipse((3, 3, 12, 12), fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """64 captioned images of coloured shapes as shards with a manifest (train/val)."""
    root = tmp_path_factory.mktemp("shapes")
    records = []
    with ShardWriter(root, "shapes", max_count=40) as w:
        i = 0
        for rep in range(8):
            for name, color in COLORS.items():
                for shape in SHAPES:
                    key = f"{i:04d}"
                    caption = f"a {name} {shape}"
                    w.write(key, {"png": _image(color, shape), "txt": caption.encode()})
                    records.append({"key": key, "caption": caption, "tags": [name, shape],
                                    "style": name, "group": shape, "concept": shape,
                                    "split": "val" if rep == 0 else "train"})  # fmt: skip
                    i += 1
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    rc = main(["train", "tokenizer", str(shapes), "--out", str(out), "--vocab-size", "600",
               "--context-length", "12"])  # fmt: skip
    assert rc == 0
    return out


def test_tokenizer_stage_learns_the_captions(tokenizer_dir):
    from unclip.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    assert tok.context_length == 12
    assert 514 < tok.vocab_size <= 600
    ids = tok.encode("a green circle")
    assert len(ids) == 3  # each word became one token
    assert tok.decode(tok(["a green circle"])[0]).strip() == "a green circle"


def _clip_config(tmp_path: Path, shapes: Path, tokenizer_dir: Path, steps: int) -> Path:
    cfg = {
        "model": {"embed_dim": 16, "context_length": 12, "vocab_size": 600, "text_width": 32,
                  "text_layers": 1, "text_heads": 2, "image_size": 16, "patch_size": 8,
                  "vision_width": 32, "vision_layers": 1, "vision_heads": 2},
        "train": {"steps": steps, "batch_size": 16, "lr": 0.003, "warmup_steps": 2,
                  "checkpoint_every": 2, "log_every": 1, "ema_decay": 0.9},
        "data": {"path": str(shapes), "split": "train", "image_size": 16,
                 "tokenizer": str(tokenizer_dir)},
    }  # fmt: skip
    path = tmp_path / "clip.json"
    path.write_text(json.dumps(cfg))
    return path


def test_clip_stage_trains_resumes_and_exports(shapes, tokenizer_dir, tmp_path):
    config = _clip_config(tmp_path, shapes, tokenizer_dir, steps=4)
    run = tmp_path / "run"
    args = ["train", "clip", "--config", str(config), "--run-dir", str(run), "--no-progress"]
    assert main([*args, "--steps", "2"]) == 0
    resume = ["train", "clip", "--run-dir", str(run), "--resume", "--no-progress", "--steps", "4"]
    assert main(resume) == 0  # the run folder keeps its config: no --config needed
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    model = from_pretrained(run / "final")
    assert model.config.embed_dim == 16
    from unclip.tokenizer import Tokenizer

    tok = Tokenizer.load(run / "final" / "tokenizer")
    emb = model.encode_text(tok(["a red square"]))
    assert emb.shape == (1, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_clip_stage_trains_on_concept_runs(shapes, tokenizer_dir, tmp_path, monkeypatch):
    from unclip.train import loop

    batches = []
    original = loop.Trainer._loss

    def spy(self, batch):
        batches.append(batch["tokens"])
        return original(self, batch)

    monkeypatch.setattr(loop.Trainer, "_loss", spy)
    config = _clip_config(tmp_path, shapes, tokenizer_dir, steps=3)
    doc = json.loads(config.read_text())
    doc["concept_run"] = 4
    config.write_text(json.dumps(doc))
    run = tmp_path / "run"
    assert main(["train", "clip", "--config", str(config), "--run-dir", str(run),
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads((run / "run_config.json").read_text())["concept_run"] == 4
    from unclip.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    for tokens in batches:  # 16 = runs of 4 captions naming one shape in different colours
        shapes_named = [tok.decode(t).split()[-1] for t in tokens]
        assert all(len(set(shapes_named[i : i + 4])) == 1 for i in range(0, 16, 4))


def test_concept_runs_need_concepts_in_the_manifest(shapes, tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for f in shapes.iterdir():
        (data / f.name).symlink_to(f)
    (data / "manifest.jsonl").unlink()
    lines = (shapes / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    del records[10]["concept"]
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _clip_config(tmp_path, data, tokenizer_dir, steps=1)
    doc = json.loads(config.read_text())
    doc["concept_run"] = 2
    config.write_text(json.dumps(doc))
    rc = main(["train", "clip", "--config", str(config), "--run-dir", str(tmp_path / "r")])
    assert rc == 2
    assert f"sample '{records[10]['key']}' has no 'concept'" in capsys.readouterr().err


def test_clip_stage_reports_config_errors(shapes, tokenizer_dir, tmp_path, capsys):
    config = _clip_config(tmp_path, shapes, tokenizer_dir, steps=2)
    doc = json.loads(config.read_text())
    doc["model"]["vocab_size"] = 100
    config.write_text(json.dumps(doc))
    rc = main(["train", "clip", "--config", str(config), "--run-dir", str(tmp_path / "r")])
    assert rc == 2
    assert "vocab_size" in capsys.readouterr().err
    doc["model"]["bogus"] = 1
    config.write_text(json.dumps(doc))
    assert main(["train", "clip", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    del doc["model"]["bogus"], doc["model"]["vocab_size"]
    doc.update(concept_run=2, data={**doc["data"], "balance": ["concept"]})
    config.write_text(json.dumps(doc))
    assert main(["train", "clip", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert "data.balance and concept_run > 1 do not combine" in capsys.readouterr().err


def test_embed_command_writes_aligned_shards_with_a_tiny_clip(shapes, tokenizer_dir, tmp_path):
    from unclip.data.datasets import open_dataset
    from unclip.data.embeddings import EmbeddingShards

    config = _clip_config(tmp_path, shapes, tokenizer_dir, steps=2)
    run = tmp_path / "run"
    assert (
        main(["train", "clip", "--config", str(config), "--run-dir", str(run), "--no-progress"])
        == 0
    )
    out = tmp_path / "emb"
    args = ["embed", str(shapes), "--clip", str(run / "final"), "--out", str(out), "--split",
            "val", "--size", "16", "--batch-size", "5", "--shard-size", "6", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    emb = EmbeddingShards(out)
    assert len(emb) == 8 and emb.dim == 16
    model = from_pretrained(run / "final")
    ds = open_dataset(shapes, size=16, split="val")
    item = ds[3]
    row = emb[emb.index_of(item["key"])]
    expected = model.encode_image(model.preprocess(item["image"][None]))[0]
    torch.testing.assert_close(row["image_emb"], expected, atol=3e-3, rtol=0)
    assert row["caption"] == item["caption"]


@pytest.fixture(scope="module")
def tiny_clip_and_embeddings(shapes, tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clipemb")
    config = _clip_config(root, shapes, tokenizer_dir, steps=2)
    run = root / "clip"
    assert (
        main(["train", "clip", "--config", str(config), "--run-dir", str(run), "--no-progress"])
        == 0
    )
    emb = root / "emb"
    args = ["embed", str(shapes), "--clip", str(run / "final"), "--out", str(emb), "--split",
            "train", "--size", "16", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return run / "final", emb


def _run_stage(stage: str, cfg: dict, tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{stage}.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / stage
    assert (
        main(["train", stage, "--config", str(path), "--run-dir", str(run), "--no-progress"]) == 0
    )
    return run / "final"


def test_prior_stage_trains_from_embeddings(tiny_clip_and_embeddings, tmp_path, capsys):
    clip_dir, emb = tiny_clip_and_embeddings
    cfg = {
        "model": {"clip_dim": 16, "text_dim": 32, "text_len": 12, "width": 32, "layers": 2,
                  "heads": 2},
        "diffusion": {"timesteps": 50, "prediction": "x0"},
        "train": {"steps": 3, "batch_size": 8, "checkpoint_every": 3},
        "data": {"embeddings": str(emb)},
        "clip": str(clip_dir),
    }  # fmt: skip
    final = _run_stage("prior", cfg, tmp_path)
    model = from_pretrained(final)
    assert model.config.clip_dim == 16
    assert json.loads((final / "diffusion.json").read_text())["timesteps"] == 50
    args = ["eval", "prior", "--prior", str(final), "--clip", str(clip_dir), "--train-embeddings",
            str(emb), "--embeddings", str(emb), "--steps", "3", "--guidance", "2", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)["emb"]
    assert result["captions"] == 56
    for key in ("cos_text_embedding", "cos_linear_regression", "cos_prior"):
        assert -1.0 <= result[key] <= 1.0


def test_frozen_text_encoder_tokenizes_each_caption_once(tiny_clip_and_embeddings, monkeypatch):
    """Cached ids give the same features as fresh tokenization; past ``cache_size`` captions
    are tokenized each time and still come out right."""
    from unclip.train.stages.common import FrozenTextEncoder

    clip_dir, _ = tiny_clip_and_embeddings
    text = FrozenTextEncoder(clip_dir)
    calls: list[int] = []
    tokenize = text.tokenizer.__class__.__call__
    monkeypatch.setattr(
        text.tokenizer.__class__,
        "__call__",
        lambda self, texts, n=None: calls.append(len(texts)) or tokenize(self, texts, n),
    )
    captions = ["a red square", "a red square", "a blue circle"]
    first = text(captions)
    again = text(list(reversed(captions)))
    assert calls == [2]  # two distinct captions, tokenized once
    assert torch.equal(again[1], first[1].flip(0)) and torch.equal(again[2], first[2].flip(0))
    expected = text.tokenizer(captions, text.context_length)
    assert torch.equal(text.tokens(captions), expected)
    text.cache_size = 2
    assert torch.equal(text.tokens(["a green star", *captions])[0], tokenize(
        text.tokenizer, ["a green star"], text.context_length)[0])  # fmt: skip
    assert "a green star" not in text._ids


def test_frozen_text_encoder_encodes_the_run_captions_once(tiny_clip_and_embeddings, monkeypatch):
    """precompute: the run's captions are encoded at the first call, in one table; later calls
    only look rows up (no text-encoder forward) and match a direct encoding; a table built
    again (a resumed run) is bit for bit the same; a caption outside it is encoded per call;
    a table over ``table_bytes`` is not built."""
    from unclip.train.stages.common import FrozenTextEncoder

    clip_dir, _ = tiny_clip_and_embeddings
    captions = [f"shape {i}, style {i % 3}" for i in range(300)]  # more than one chunk
    text = FrozenTextEncoder(clip_dir)
    text.precompute(captions * 2)
    forward = text.model.encode_text_condition
    calls: list[int] = []
    monkeypatch.setattr(
        text.model, "encode_text_condition", lambda t: calls.append(len(t)) or forward(t)
    )
    batch = [captions[5], captions[299], captions[5]]
    z_t, feats, mask = text(batch)
    assert calls == [256, 44]  # the table: 300 distinct captions in chunks of 256
    direct = FrozenTextEncoder(clip_dir)(batch)
    torch.testing.assert_close(z_t, direct[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats, direct[1], rtol=1e-4, atol=1e-5)
    assert torch.equal(mask, direct[2]) and torch.equal(feats[0], feats[2])
    text(batch)
    assert calls == [256, 44]  # looked up
    text(["a caption of no sample"])
    assert calls == [256, 44, 1]
    again = FrozenTextEncoder(clip_dir)
    again.precompute(list(reversed(captions)))
    assert all(torch.equal(a, b) for a, b in zip(again(batch), (z_t, feats, mask), strict=True))
    small = FrozenTextEncoder(clip_dir)
    small.table_bytes = 1000
    small.precompute(captions)
    small(batch)
    assert small._table is None


def _decoder_config(shapes: Path, clip_dir: Path, emb: Path) -> dict:
    return {
        "model": {"image_size": 16, "model_channels": 16, "channel_mult": [1, 2],
                  "num_res_blocks": 1, "attention_resolutions": [8], "num_head_channels": 8,
                  "norm_groups": 8, "clip_dim": 16, "text_dim": 32, "learn_sigma": True,
                  "inpaint": True},
        "diffusion": {"timesteps": 50, "learn_sigma": True, "loss": "hybrid"},
        "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2},
        "data": {"path": str(shapes), "split": "train", "image_size": 16,
                 "embeddings": str(emb)},
        "clip": str(clip_dir),
    }  # fmt: skip


def test_decoder_stage_trains_with_inpainting_inputs(shapes, tiny_clip_and_embeddings, tmp_path):
    clip_dir, emb = tiny_clip_and_embeddings
    final = _run_stage("decoder", _decoder_config(shapes, clip_dir, emb), tmp_path)
    assert from_pretrained(final).config.inpaint
    metrics = [
        json.loads(x) for x in (tmp_path / "decoder" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"mse", "vlb"} <= metrics[-1].keys()


def test_decoder_stage_grows_a_trained_decoder(shapes, tiny_clip_and_embeddings, tmp_path, capsys):
    """``init`` starts a run from a trained decoder's weights, here with a deeper middle block
    (the added layers start as the identity); a folder that is not a decoder is refused."""
    clip_dir, emb = tiny_clip_and_embeddings
    cfg = _decoder_config(shapes, clip_dir, emb)
    first = _run_stage("decoder", cfg, tmp_path / "first")
    cfg["model"]["mid_depth"] = 3
    cfg["init"] = str(first)
    capsys.readouterr()
    grown = from_pretrained(_run_stage("decoder", cfg, tmp_path / "grown"))
    assert f"starts from {first}" in capsys.readouterr().out
    assert grown.config.mid_depth == 3
    old = from_pretrained(first).state_dict()
    new = grown.state_dict()
    assert old.keys() < new.keys()
    assert any(not torch.equal(new[k], old[k]) for k in old)  # it trained on
    first.rename(tmp_path / "gone")  # a resumed run needs its checkpoint, not init
    args = ["train", "decoder", "--config", str(tmp_path / "grown" / "decoder.json"),
            "--run-dir", str(tmp_path / "grown" / "decoder"), "--resume", "--no-progress"]  # fmt: skip
    assert main(args) == 0

    cfg["init"] = str(clip_dir)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    args = ["train", "decoder", "--config", str(path), "--run-dir", str(tmp_path / "bad")]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "init" in err and str(clip_dir) in err and "Traceback" not in err


def test_decoder_stage_stops_at_the_time_limit_and_resumes(
    shapes, tiny_clip_and_embeddings, tmp_path, capsys
):
    """``--max-minutes`` ends the run early with a checkpoint and a usable final/; --resume
    then finishes it."""
    clip_dir, emb = tiny_clip_and_embeddings
    cfg = _decoder_config(shapes, clip_dir, emb)
    cfg["train"].update(steps=4, checkpoint_every=4)
    path = tmp_path / "decoder.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    args = ["train", "decoder", "--config", str(path), "--run-dir", str(run), "--no-progress"]
    capsys.readouterr()
    assert main([*args, "--max-minutes", "1e-6"]) == 0  # out of time after the first step
    assert "stopped by the time limit at step 1 of 4" in capsys.readouterr().err
    assert from_pretrained(run / "final").config.inpaint
    assert (run / "checkpoints" / "step-1").is_dir()
    assert main([*args, "--resume"]) == 0
    assert "trained to step 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        main([*args, "--max-minutes", "0"])
    assert exit_.value.code == 2
    assert "--max-minutes: expected a number above 0" in capsys.readouterr().err


def test_decoder_stage_balances_manifest_groups(shapes, tiny_clip_and_embeddings, tmp_path, capsys):
    """``data.balance`` draws every (concept, style) group equally; a field the manifest
    lacks is a config error that names it."""
    clip_dir, emb = tiny_clip_and_embeddings
    cfg = _decoder_config(shapes, clip_dir, emb)
    cfg["data"]["balance"] = ["concept", "style"]
    capsys.readouterr()
    _run_stage("decoder", cfg, tmp_path / "balanced")
    assert "56 samples drawn as 8 equal groups by concept, style" in capsys.readouterr().out

    cfg["data"]["balance"] = ["concept", "mood"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    args = ["train", "decoder", "--config", str(path), "--run-dir", str(tmp_path / "bad")]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.balance" in err and "'mood'" in err and "Traceback" not in err


def test_upsampler_stage_trains(shapes, tmp_path):
    cfg = {
        "model": {"image_size": 16, "low_res_size": 8, "model_channels": 16,
                  "channel_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 8,
                  "learn_sigma": True},
        "diffusion": {"timesteps": 50, "learn_sigma": True, "loss": "hybrid"},
        "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2},
        "data": {"path": str(shapes), "split": "train", "image_size": 16},
        "crop_size": 8,
    }  # fmt: skip
    final = _run_stage("upsampler", cfg, tmp_path)
    assert from_pretrained(final).config.low_res_size == 8


def test_upsampler_stage_continues_from_init(shapes, tmp_path, capsys):
    """``init`` starts an upsampler run from a trained upsampler's weights (what the GPU kit's
    second visit does); weights that do not fit the model are refused in one line."""
    cfg = {
        "model": {"image_size": 16, "low_res_size": 8, "model_channels": 16,
                  "channel_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 8,
                  "learn_sigma": True},
        "diffusion": {"timesteps": 50, "learn_sigma": True, "loss": "hybrid"},
        "train": {"steps": 1, "batch_size": 8, "checkpoint_every": 1, "lr": 1e-12,
                  "warmup_steps": 0, "ema_decay": 0.0},
        "data": {"path": str(shapes), "split": "train", "image_size": 16},
    }  # fmt: skip
    first = _run_stage("upsampler", cfg, tmp_path / "first")
    capsys.readouterr()
    other_seed = {**cfg, "train": {**cfg["train"], "seed": 1}}  # would start elsewhere
    second = _run_stage("upsampler", {**other_seed, "init": str(first)}, tmp_path / "second")
    assert f"upsampler starts from {first}" in capsys.readouterr().out
    old, new = from_pretrained(first).state_dict(), from_pretrained(second).state_dict()
    for key, value in old.items():  # one step at lr 1e-12 from init: the same weights
        torch.testing.assert_close(new[key], value, rtol=0, atol=1e-6, msg=key)
    model = cfg["model"]
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps({**cfg, "init": str(first), "model": {**model, "model_channels": 8}})
    )
    args = ["train", "upsampler", "--config", str(path), "--run-dir", str(tmp_path / "bad")]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "init" in err and str(first) in err and "Traceback" not in err


def test_eval_clip_command_reports_recall_and_zero_shot(tiny_clip_and_embeddings, shapes, capsys):
    clip_dir, _ = tiny_clip_and_embeddings
    rc = main(["eval", "clip", "--clip", str(clip_dir), "--data", str(shapes), "--split", "val",
               "--json"])  # fmt: skip
    assert rc == 0
    result = json.loads(capsys.readouterr().out)["val"]
    assert result["images"] == 8
    for key in ("text_to_image_r@1", "image_to_text_r@5", "zero_shot_style", "zero_shot_group"):
        assert 0.0 <= result[key] <= 1.0
    assert result["text_to_image_r@10"] == 1.0  # 8 candidates: the match is always in the top 10


def test_clip_stage_trains_on_a_plain_image_folder(tokenizer_dir, tmp_path, capsys):
    """A folder of images with same-named .txt captions has no splits: the default split
    "train" reads all of it (said in one line); another split is a one-line error."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, color in COLORS.items():
        for shape in SHAPES:
            for copy in range(2):
                (folder / f"{name}-{shape}-{copy}.png").write_bytes(_image(color, shape))
                (folder / f"{name}-{shape}-{copy}.txt").write_text(f"a {name} {shape}\n")
    config = _clip_config(tmp_path, folder, tokenizer_dir, steps=2)
    doc = json.loads(config.read_text())
    del doc["data"]["split"]  # the default: "train"
    config.write_text(json.dumps(doc))
    args = ["train", "clip", "--config", str(config), "--no-progress"]
    capsys.readouterr()
    assert main([*args, "--run-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert f"{folder} has no splits; split 'train' reads all 16 samples" in err
    assert from_pretrained(tmp_path / "run" / "final").config.embed_dim == 16
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]

    doc["data"]["split"] = "val"
    config.write_text(json.dumps(doc))
    assert main([*args, "--run-dir", str(tmp_path / "val")]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: this data set has no splits, so no split 'val'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_text_encoder_reads_a_run_or_a_pipeline_clip_folder(
    shapes, tiny_clip_and_embeddings, tmp_path, capsys
):
    """The frozen text encoder of the prior and decoder takes a CLIP run's final/ (tokenizer
    inside), a pipeline folder, or a pipeline's clip/ (tokenizer beside it); a folder with
    neither is a one-line error naming the paths tried."""
    from unclip.train.stages.common import FrozenTextEncoder

    clip_dir, emb = tiny_clip_and_embeddings
    pipe = tmp_path / "pipe"
    shutil.copytree(clip_dir, pipe / "clip", ignore=shutil.ignore_patterns("tokenizer"))
    shutil.copytree(clip_dir / "tokenizer", pipe / "tokenizer")
    (pipe / "pipeline.json").write_text("{}")
    captions = ["a red square", "a blue circle"]
    expected = FrozenTextEncoder(clip_dir)(captions)
    for folder in (pipe, pipe / "clip"):
        got = FrozenTextEncoder(folder)(captions)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))

    cfg = _decoder_config(shapes, pipe / "clip", emb)
    cfg["train"]["steps"] = 1
    _run_stage("decoder", cfg, tmp_path / "from-pipeline")  # trains

    shutil.rmtree(pipe / "tokenizer")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    capsys.readouterr()
    args = ["train", "decoder", "--config", str(path), "--run-dir", str(tmp_path / "bad")]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"tried {pipe / 'clip' / 'tokenizer'}, {pipe / 'tokenizer'}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_threads_flag_sets_torch_threads_for_the_run(shapes, tmp_path, monkeypatch, capsys):
    """--threads N trains with N torch threads; without it, the physical cores (here faked
    as 3); the caller's setting is back afterwards; 0 is a usage error."""
    from unclip.train import distributed, loop

    seen: list[int] = []
    original = loop.Trainer._loss

    def spy(self, batch):
        seen.append(torch.get_num_threads())
        return original(self, batch)

    monkeypatch.setattr(loop.Trainer, "_loss", spy)
    monkeypatch.setattr(distributed, "physical_cores", lambda: 3)
    monkeypatch.delenv(distributed.THREADS_ENV, raising=False)
    cfg = {
        "model": {"image_size": 16, "low_res_size": 8, "model_channels": 8, "channel_mult": [1],
                  "num_res_blocks": 1, "norm_groups": 4, "learn_sigma": False},
        "diffusion": {"timesteps": 20, "learn_sigma": False, "loss": "mse"},
        "train": {"steps": 1, "batch_size": 4},
        "data": {"path": str(shapes), "image_size": 16},
    }  # fmt: skip
    path = tmp_path / "upsampler.json"
    path.write_text(json.dumps(cfg))
    before = torch.get_num_threads()
    for run, extra, threads in (("one", ["--threads", "1"], 1), ("default", [], 3)):
        args = ["train", "upsampler", "--config", str(path), "--run-dir", str(tmp_path / run),
                "--no-progress", *extra]  # fmt: skip
        assert main(args) == 0
        assert seen[-1] == threads
        assert torch.get_num_threads() == before
    with pytest.raises(SystemExit) as exit_:
        main(["train", "upsampler", "--run-dir", str(tmp_path / "x"), "--threads", "0"])
    assert exit_.value.code == 2
    assert "--threads: expected a whole number of at least 1, got '0'" in capsys.readouterr().err


def test_random_crop_takes_square_windows_of_the_images():
    from unclip.train.stages.upsampler import random_crop

    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    crops = random_crop(images, 4)
    assert crops.shape == (2, 1, 4, 4)
    for img, crop in zip(images, crops, strict=True):
        found = any(
            torch.equal(img[:, y : y + 4, x : x + 4], crop) for y in range(3) for x in range(3)
        )
        assert found
    assert random_crop(images, 0) is images


def test_eval_pipeline_command_reports_quality_metrics(shapes, tmp_path, capsys):
    from tiny_pipeline import write_tiny_pipeline

    pipe = write_tiny_pipeline(tmp_path / "pipe")
    grid = tmp_path / "grid.png"
    args = ["eval", "pipeline", "--pipeline", str(pipe), "--data", str(shapes), "--split", "val",
            "--limit", "6", "--no-prior-baseline", "--grid", str(grid), "--json", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"val/unclip", "val/no_prior"}
    for metrics in results.values():
        assert metrics["images"] == 6
        assert -1 <= metrics["clip_score"] <= 1 and metrics["fd_clip"] >= 0
        assert 0 <= metrics["retrieval_r@1"] <= metrics["retrieval_r@5"] <= 1
        # the shapes' manifest gives each image a style (its colour): named or not, per image
        named = metrics["style_named"] * 6
        assert named == pytest.approx(round(named), abs=1e-5)
        assert 0 <= metrics["style_named"] <= 1 and 0 <= metrics["real_style_named"] <= 1
    assert results["val/unclip"]["real_style_named"] == results["val/no_prior"]["real_style_named"]
    assert Image.open(grid).size[0] > 100


def test_eval_pipeline_reports_retrieval_by_a_manifest_field(shapes, tmp_path, capsys):
    """``--by FIELD``: retrieval per value of the field, which together make the whole; in the
    table a value that one split lacks is a dash."""
    from tiny_pipeline import write_tiny_pipeline

    pipe = write_tiny_pipeline(tmp_path / "pipe")
    base = ["eval", "pipeline", "--pipeline", str(pipe), "--data", str(shapes), "--split", "val",
            "--limit", "6", "--no-progress"]  # fmt: skip
    assert main([*base, "--by", "group", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["val/unclip"]
    records = [json.loads(x) for x in (shapes / "manifest.jsonl").read_text().splitlines()]
    groups = [r["group"] for r in records if r["split"] == "val"][:6]
    for k in (1, 5):
        parts = sum(metrics[f"r@{k} {g}"] * groups.count(g) for g in set(groups))
        assert parts / 6 == pytest.approx(metrics[f"retrieval_r@{k}"])

    assert main([*base, "--split", "train", "--by", "key"]) == 0  # keys: no value in both splits
    rows = {line.split()[1]: line.split()[2:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("r@1 ")}  # fmt: skip
    assert rows["0000"][1] == "-" and rows["0008"][0] == "-"
    assert rows["0000"][0] != "-" and rows["0008"][1] != "-"


def test_eval_pipeline_guidance_overrides_change_the_samples(shapes, tmp_path, capsys):
    from tiny_pipeline import write_tiny_pipeline

    pipe = write_tiny_pipeline(tmp_path / "pipe")
    base = ["eval", "pipeline", "--pipeline", str(pipe), "--data", str(shapes), "--split", "val",
            "--limit", "4", "--json", "--no-progress"]  # fmt: skip
    runs = {}
    for name, extra in (("default", []), ("again", []), ("g1", ["--decoder-guidance", "1"]),
                        ("p1", ["--prior-guidance", "1"]),
                        ("ddpm", ["--decoder-sampler", "ddpm"])):  # fmt: skip
        assert main([*base, *extra]) == 0
        runs[name] = json.loads(capsys.readouterr().out)["val/unclip"]["fd_clip"]
    assert runs["default"] == runs["again"]  # seeded: the same numbers
    assert all(runs[k] != runs["default"] for k in ("g1", "p1", "ddpm"))


def test_eval_pipeline_judge_measures_in_another_clips_space(
    shapes, tiny_clip_and_embeddings, tmp_path, capsys
):
    from tiny_pipeline import write_tiny_pipeline

    pipe = write_tiny_pipeline(tmp_path / "pipe")
    base = ["eval", "pipeline", "--pipeline", str(pipe), "--data", str(shapes), "--split", "val",
            "--limit", "6", "--json", "--no-progress"]  # fmt: skip
    runs = {}
    for name, extra in (("own", []), ("self", ["--judge", str(pipe)]),
                        ("other", ["--judge", str(tiny_clip_and_embeddings[0])])):  # fmt: skip
        assert main([*base, *extra]) == 0
        runs[name] = json.loads(capsys.readouterr().out)["val/unclip"]
    # the pipeline's own CLIP as a judge: the same space, the same numbers
    for key in ("clip_score", "fd_clip", "retrieval_r@1"):
        assert runs["self"][key] == pytest.approx(runs["own"][key], rel=1e-4, abs=1e-5)
    # another CLIP: the same samples measured in another space
    assert runs["other"]["fd_clip"] != pytest.approx(runs["own"]["fd_clip"], rel=1e-3)
    assert -1 <= runs["other"]["clip_score"] <= 1


def test_eval_pipeline_judge_without_tokenizer_is_a_clear_error(shapes, tmp_path, capsys):
    from tiny_pipeline import write_tiny_pipeline

    pipe = write_tiny_pipeline(tmp_path / "pipe")
    empty = tmp_path / "not-a-clip"
    empty.mkdir()
    args = ["eval", "pipeline", "--pipeline", str(pipe), "--data", str(shapes), "--split", "val",
            "--limit", "2", "--judge", str(empty), "--no-progress"]  # fmt: skip
    assert main(args) != 0
    assert "not-a-clip" in capsys.readouterr().err


def test_eval_tables_name_the_feature_space(shapes, tiny_clip_and_embeddings, tmp_path, capsys):
    from tiny_pipeline import write_tiny_pipeline

    clip_dir = str(tiny_clip_and_embeddings[0])
    assert main(["eval", "clip", "--clip", clip_dir, "--data", str(shapes), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "zero_shot_style" in out and "%" in out
    pipe = write_tiny_pipeline(tmp_path / "pipe")
    args = ["eval", "pipeline", "--pipeline", str(pipe), "--data", str(shapes), "--split", "val",
            "--limit", "2", "--judge", clip_dir, "--no-progress"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "clip_score" in captured.out and f"feature space of CLIP {clip_dir}" in captured.err
    assert main([*args, "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)["val/unclip"]
    table = {line.split()[0]: float(line.split()[1]) for line in captured.out.splitlines()[1:]}
    assert table.keys() == exact.keys()
    for name, value in exact.items():  # every metric, small ones (KID) included, to 4 figures
        assert table[name] == pytest.approx(value, rel=1e-3, abs=1e-12), name
