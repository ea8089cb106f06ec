"""The generation commands end to end on a tiny random pipeline: outputs, metadata, bad input."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tiny_pipeline import OUT, write_stages
from unclip import cli

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = ("generate", "vary", "interpolate", "textdiff", "edit", "outpaint", "rank", "mix",
            "img2img")  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    paths = {}
    for name in ("a", "b"):
        arr = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # not square: gets cropped
        paths[name] = root / f"{name}.png"
        Image.fromarray(arr, "RGB").save(paths[name])
    mask = Image.new("L", (32, 24), 0)
    mask.paste(255, (10, 6, 22, 18))
    paths["mask"] = root / "mask.png"
    mask.save(paths["mask"])
    paths["small_mask"] = root / "small.png"
    Image.new("L", (8, 8), 255).save(paths["small_mask"])
    pal = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB").convert("P")
    pal.info["transparency"] = 0
    paths["palette"] = root / "palette.png"
    pal.save(paths["palette"], transparency=0)
    paths["text"] = root / "notes.png"
    paths["text"].write_text("this is not an image")
    return paths


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def common(pipeline_dir: Path, out: Path, seed: int = 3) -> list[str]:
    return ["--pipeline", str(pipeline_dir), "--out", str(out), "--seed", str(seed),
            "--device", "cpu", "--no-progress"]  # fmt: skip


def read_png(path: Path) -> tuple[Image.Image, dict[str, str]]:
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    return img, dict(img.text)


def test_generate_writes_pngs_with_metadata_json_and_grid(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    grid = tmp_path / "sheet.png"
    rc, stdout, err = run(["generate", "a red square", "-n", "2", "--json", "--grid", str(grid),
                           *common(pipeline_dir, out)], capsys)  # fmt: skip
    assert rc == 0, err
    doc = json.loads(stdout)
    paths = [Path(i["path"]) for i in doc["images"]]
    assert paths == [out / "generate-3-0.png", out / "generate-3-1.png"]
    assert [i["seed"] for i in doc["images"]] == [3, 4]
    assert doc["images"][0]["steps"] == {"prior": 2, "decoder": 2, "upsampler": 2}
    img, text = read_png(paths[0])
    assert img.size == (OUT, OUT)
    assert text["prompt"] == "a red square" and text["seed"] == "3" and text["model"] == "tiny"
    assert json.loads(text["guidance"]) == {"prior": 4.0, "decoder": 8.0}
    assert json.loads(text["steps"])["decoder"] == 2
    assert Image.open(grid).size[0] > OUT
    assert sorted(p.name for p in out.iterdir()) == ["generate-3-0.png", "generate-3-1.png"]


@pytest.fixture
def one_by_one(monkeypatch):
    """Every image sampled on its own (``max_batch`` 1), as a single call samples it: then an
    image of a bigger call is the single call's bit for bit by construction. (In a batch the
    networks run at another batch size, which may round otherwise; the random tiny networks
    amplify that rounding to whole grey levels, so no pixel tolerance would hold here.
    test_default_model checks batches against single calls, within a tolerance, on the
    shipped model.)"""
    from unclip.pipeline import core

    monkeypatch.setattr(core, "DEFAULT_MAX_BATCH", 1)


def test_generate_from_a_prompts_file_is_one_grid_row_per_caption(
    pipeline_dir, tmp_path, capsys, one_by_one
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# emoji to draw\na red square\n\na green circle\n")
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    rc, stdout, err = run(["generate", "--prompts", str(prompts), "-n", "2", "--json", "--grid",
                           str(grid), *common(pipeline_dir, out)], capsys)  # fmt: skip
    assert rc == 0, err
    doc = json.loads(stdout)
    assert [Path(i["path"]).name for i in doc["images"]] == [
        "generate-3-p0-0.png", "generate-3-p0-1.png", "generate-3-p1-0.png", "generate-3-p1-1.png"
    ]  # fmt: skip
    assert [i["prompt"] for i in doc["images"]] == ["a red square"] * 2 + ["a green circle"] * 2
    assert [i["seed"] for i in doc["images"]] == [3, 4, 5, 6]
    # a row is what a single-caption call with that row's seed gives
    rc, single, _ = run(["generate", "a green circle", *common(pipeline_dir, tmp_path / "one", 5)],
                        capsys)  # fmt: skip
    assert (out / "generate-3-p1-0.png").read_bytes() == Path(single.split()[0]).read_bytes()
    two_columns = Image.open(grid).size
    rc, _, _ = run(["generate", "--prompts", str(prompts), "-n", "1", "--grid",
                    str(tmp_path / "g1.png"), *common(pipeline_dir, tmp_path / "o1")], capsys)  # fmt: skip
    one_column = Image.open(tmp_path / "g1.png").size
    assert one_column[1] == two_columns[1] and one_column[0] < two_columns[0]  # rows = captions


def test_same_seed_same_bytes_other_seed_other_image(pipeline_dir, tmp_path, capsys, one_by_one):
    files = []
    for name, seed in (("one", 5), ("two", 5), ("three", 6)):
        rc, stdout, _ = run(
            ["generate", "a green circle", *common(pipeline_dir, tmp_path / name, seed)], capsys
        )
        assert rc == 0
        files.append(Path(stdout.split()[0]))
    assert files[0].read_bytes() == files[1].read_bytes()
    a, b = (np.asarray(Image.open(f)) for f in (files[0], files[2]))
    assert not np.array_equal(a, b)
    # image 2 of -n 2 from seed 5 is the single image of seed 6 (sampled one by one: exact)
    rc, stdout, _ = run(
        ["generate", "a green circle", "-n", "2", *common(pipeline_dir, tmp_path / "batch", 5)],
        capsys,
    )
    second = Path(stdout.split()[1])
    assert np.array_equal(np.asarray(Image.open(second)), b)
    assert Image.open(second).text["seed"] == "6"


def test_generate_with_reranking_and_overrides(pipeline_dir, tmp_path, capsys):
    rc, stdout, err = run(["generate", "a red square", "--candidates", "3", "--keep", "2", "--json",
                           "--decoder-steps", "3", "--sampler", "ddpm", "--prior-guidance", "1",
                           *common(pipeline_dir, tmp_path)], capsys)  # fmt: skip
    assert rc == 0, err
    items = json.loads(stdout)["images"]
    assert len(items) == 2 and items[0]["clip_score"] >= items[1]["clip_score"]
    assert items[0]["steps"]["decoder"] == 3 and items[0]["sampler"]["prior"] == "ddpm"
    assert items[0]["guidance"]["prior"] == 1.0


def test_progress_bar_goes_to_stderr(pipeline_dir, tmp_path, capsys):
    args = common(pipeline_dir, tmp_path)
    args.remove("--no-progress")
    rc, stdout, err = run(["generate", "a red square", *args, "--decoder-steps", "4",
                           "--upsampler-steps", "3"], capsys)  # fmt: skip
    assert rc == 0 and "upsampler" in err and "image 1/1" in err
    assert stdout.strip() == str(tmp_path / "generate-3-0.png")
    # every redraw of a stage's bar shows that stage's own step count (none is drawn with
    # the previous stage's label)
    totals = {}
    for stage, total in re.findall(r"image 1/1 (\w+):[^\r\n]*?\| *\d+/(\d+)", err):
        totals.setdefault(stage, set()).add(int(total))
    assert totals.get("decoder") == {4} and totals.get("upsampler") == {3}, totals


@pytest.mark.parametrize(
    ("argv", "names", "size"),
    [
        (["vary", "{a}", "-n", "2"], ["vary-3-0.png", "vary-3-1.png"], (OUT, OUT)),
        (["vary", "{palette}", "-n", "1", "--invert", "--eta", "0.3"], ["vary-3-0.png"], (OUT, OUT)),
        (["interpolate", "{a}", "{b}", "--frames", "3"],
         [f"interpolate-3-{i}.png" for i in range(3)], (OUT, OUT)),
        (["textdiff", "{a}", "--from", "a red square", "--to", "a blue square", "--frames", "2"],
         ["textdiff-3-0.png", "textdiff-3-1.png"], (OUT, OUT)),
        (["edit", "{a}", "a green circle", "--mask", "{mask}", "-n", "2"],
         ["edit-3-0.png", "edit-3-1.png"], (OUT, OUT)),
        (["edit", "{a}", "a green circle", "--mask", "{mask}", "--repaint", "--resample", "2"],
         ["edit-3-0.png"], (OUT, OUT)),
        (["outpaint", "{a}", "a red square", "--right", "8"], ["outpaint-3-0.png"], (16, 10)),
        (["mix", "a red square", "{a}", "--weights", "0.7,0.3", "-n", "2"],
         ["mix-3-0.png", "mix-3-1.png"], (OUT, OUT)),
        (["img2img", "{a}", "a green circle", "--strength", "0.5"], ["img2img-3-0.png"], (OUT, OUT)),
        (["img2img", "{b}", "-n", "2", "--negative", "a star"],
         ["img2img-3-0.png", "img2img-3-1.png"], (OUT, OUT)),
    ],
)  # fmt: skip
def test_every_image_command_writes_pngs_with_metadata(
    pipeline_dir, images, tmp_path, capsys, argv, names, size
):
    argv = [a.format(**{k: str(v) for k, v in images.items()}) for a in argv]
    rc, stdout, err = run([*argv, *common(pipeline_dir, tmp_path / "out")], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    assert stdout.split() == [str(tmp_path / "out" / n) for n in names]
    per_frame = argv[0] in ("interpolate", "textdiff")  # frames share the seed
    for i, name in enumerate(names):
        img, text = read_png(tmp_path / "out" / name)
        assert img.size == size
        assert text["seed"] == str(3 if per_frame else 3 + i)
        assert text["model"] == "tiny" and "steps" in text and "guidance" in text
        assert text["software"].startswith("unclip ")
    if argv[0] in ("edit", "outpaint"):
        assert text["prompt"] == argv[2]


def test_rank_prints_best_first(pipeline_dir, images, tmp_path, capsys):
    paths = [str(images["a"]), str(images["b"]), str(images["palette"])]
    rc, stdout, err = run(["rank", "a red square", *paths, "--pipeline", str(pipeline_dir),
                           "--device", "cpu", "--json", "--grid", str(tmp_path / "g.png")], capsys)  # fmt: skip
    assert rc == 0, err
    ranking = json.loads(stdout)["ranking"]
    assert sorted(r["path"] for r in ranking) == sorted(paths)
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores, reverse=True)
    assert (tmp_path / "g.png").is_file()
    rc, stdout, _ = run(["rank", "a red square", *paths, "-k", "1", "--pipeline",
                         str(pipeline_dir), "--device", "cpu"], capsys)  # fmt: skip
    score, path = stdout.strip().split("\t")
    assert path == ranking[0]["path"] and float(score) == pytest.approx(scores[0], abs=1e-4)


def test_train_pipeline_assembles_from_run_folders(tmp_path, capsys):
    stages = write_stages(tmp_path / "stages")
    run_dir = tmp_path / "decoder-run"  # a training run folder: its final/ is the model
    run_dir.mkdir()
    stages["decoder"].rename(run_dir / "final")
    out = tmp_path / "assembled"
    args = ["train", "pipeline", "--clip", str(stages["clip"]), "--prior", str(stages["prior"]),
            "--decoder", str(run_dir), "--upsampler", str(stages["upsampler"]),
            "--inpaint-decoder", str(stages["inpaint_decoder"]), "--out", str(out),
            "--name", "mine"]  # fmt: skip
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    doc = json.loads((out / "pipeline.json").read_text())
    assert doc["name"] == "mine" and doc["stages"]["inpaint_decoder"] == "inpaint_decoder"
    rc, _, err = run(args, capsys)
    assert rc == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run([*args, "--overwrite"], capsys)
    assert rc == 0, err
    assert json.loads((out / "pipeline.json").read_text())["sampling"]["decoder"]["guidance"] == 8.0


def test_train_pipeline_records_the_sampling_file(tmp_path, capsys):
    stages = write_stages(tmp_path / "stages")
    sampling = tmp_path / "sampling.json"
    sampling.write_text(json.dumps({"decoder": {"guidance": 1.5}, "upsampler": {"strength": 0.5}}))
    out = tmp_path / "assembled"
    args = ["train", "pipeline", "--clip", str(stages["clip"]), "--decoder", str(stages["decoder"]),
            "--upsampler", str(stages["upsampler"]), "--out", str(out), "--sampling"]  # fmt: skip
    rc, _, err = run([*args, str(sampling)], capsys)
    assert rc == 0, err
    doc = json.loads((out / "pipeline.json").read_text())["sampling"]
    assert doc["decoder"]["guidance"] == 1.5 and doc["upsampler"]["strength"] == 0.5
    assert doc["decoder"]["steps"] == 25  # unset keys keep the library defaults
    sampling.write_text(json.dumps({"decoder": {"guidance": "lots"}}))
    rc, _, err = run([*args, str(sampling), "--overwrite"], capsys)
    assert rc != 0 and "sampling.json" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "pipeline.json").read_text())["sampling"]["decoder"]["guidance"] == 1.5


def test_unknown_pipeline_name_is_one_line(tmp_path, capsys, monkeypatch):
    from unclip.pipeline import loading

    monkeypatch.setattr(loading, "WEIGHTS_DIR", tmp_path / "none")
    rc, _, err = run(["generate", "a red square", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    assert err.strip() == (
        "unclip generate: error: no pipeline 'emoji-small': not a folder, nor a pipeline shipped "
        "with unclip (shipped: none in this version); pass the path of a pipeline folder "
        "(`unclip train pipeline` assembles one)"
    )
    assert not (tmp_path / "o").exists()


LONG = "x" * 10_000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", ""], "the prompt is empty"),
        (["generate", "   "], "the prompt is empty"),
        (["generate", LONG], "the prompt is 10,000 characters long; the limit is 1,000"),
        (["generate", "a cat", "--decoder-steps", "-3"], "--decoder-steps must be between 1 and 1,000, got -3"),
        (["generate", "a cat", "--prior-steps", "0"], "--prior-steps must be between 1"),
        (["generate", "a cat", "--upsampler-steps", "1000000000"], "--upsampler-steps must be between 1 and 1,000"),
        (["generate", "a cat", "--decoder-steps", "60"], "decoder_steps=60 is more than the decoder's 50 diffusion timesteps"),
        (["generate", "a cat", "--decoder-guidance", "inf"], "--decoder-guidance must be between 0 and 100"),
        (["generate", "a cat", "-n", "0"], "-n must be between 1"),
        (["generate", "a cat", "--keep", "2"], "--keep needs --candidates"),
        (["generate"], "give either a CAPTION or --prompts FILE"),
        (["generate", "a cat", "--prompts", "{text}"], "give either a CAPTION or --prompts FILE"),
        (["generate", "--prompts", "{missing}"], "--prompts {missing}: no such file"),
        (["generate", "--prompts", "{empty_prompts}"], "no captions (one per line)"),
        (["generate", "--prompts", "{long_prompts}"], "the caption on line 2 of {long_prompts} is 10,000 characters long"),
        (["vary", "{missing}"], "{missing}: no such image file"),
        (["vary", "{text}"], "{text}: not a readable image"),
        (["vary", "{a}", "--eta", "3"], "--eta must be between 0 and 1"),
        (["interpolate", "{a}", "{missing}"], "{missing}: no such image file"),
        (["interpolate", "{a}", "{b}", "--frames", "1"], "--frames must be between 2"),
        (["textdiff", "{a}", "--from", "", "--to", "a dog"], "the --from caption is empty"),
        (["textdiff", "{a}", "--from", "a cat", "--to", "a dog", "--max-theta", "0"], "--max-theta must be in (0, 1]"),
        (["edit", "{a}", "a cat", "--mask", "{small_mask}"], "the mask is 8×8 but"),
        (["edit", "{a}", "a cat", "--mask", "{text}"], "{text}: not a readable image"),
        (["edit", "{a}", "a cat"], "no --mask given and the image has no transparent pixels"),
        (["edit", "{a}", LONG, "--mask", "{mask}"], "the limit is 1,000"),
        (["edit", "{a}", "a cat", "--mask", "{mask}", "--resample", "-1"], "--resample must be between 1 and 100"),
        (["outpaint", "{a}", "a cat"], "outpaint needs a margin"),
        (["outpaint", "{a}", "a cat", "--left", "-5"], "--left must be between 0 and 128, got -5"),
        (["outpaint", "{a}", "a cat", "--top", "99999"], "--top must be between 0 and 128"),
        (["rank", "", "{a}"], "the prompt is empty"),
        (["rank", "a cat", "{a}", "-k", "2"], "-k must be between 1 and 1"),
        (["rank", "a cat", "{missing}"], "no such image file"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line_and_writes_nothing(
    pipeline_dir, images, tmp_path, capsys, argv, message
):
    names = {k: str(v) for k, v in images.items()} | {"missing": str(tmp_path / "nope.png")}
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "long.txt").write_text("a cat\n" + LONG + "\n")
    names |= {
        "empty_prompts": str(tmp_path / "empty.txt"),
        "long_prompts": str(tmp_path / "long.txt"),
    }
    argv = [a.format(**names) for a in argv]
    out = tmp_path / "out"
    extra = ["--pipeline", str(pipeline_dir), "--device", "cpu", "--no-progress"]
    if argv[0] != "rank":
        extra += ["--out", str(out), "--seed", "1"]
    rc, stdout, err = run([*argv, *extra, "--grid", str(tmp_path / "grid.png")], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"unclip {argv[0]}: error: ")
    assert message.format(**names) in lines[0]
    assert stdout == ""
    assert not out.exists() and not (tmp_path / "grid.png").exists()


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a pipeline fails the test: a refusal must come before any model is read."""
    import unclip.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the input was refused")

    monkeypatch.setattr(unclip.pipeline, "load_pipeline", refuse)


SURROGATE = "a red \ud800 square"  # a lone surrogate (what undecodable argv bytes become)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "a cat", "--out", "{blocked}"], "--out {blocked}: {file} is a file, not a folder"),
        (["vary", "{a}", "--out", "{blocked}"], "--out {blocked}: {file} is a file, not a folder"),
        (["interpolate", "{a}", "{b}", "--out", "{blocked}"], "is a file, not a folder"),
        (["textdiff", "{a}", "--from", "a", "--to", "b", "--out", "{blocked}"], "is a file, not a folder"),
        (["edit", "{a}", "a cat", "--mask", "{mask}", "--out", "{blocked}"], "is a file, not a folder"),
        (["outpaint", "{a}", "a cat", "--left", "4", "--out", "{blocked}"], "is a file, not a folder"),
        (["generate", "a cat", "--grid", "{blocked}/grid.png"], "--grid {blocked}: {file} is a file"),
        (["rank", "a cat", "{a}", "--grid", "{blocked}/grid.png"], "--grid {blocked}: {file} is a file"),
        (["generate", "a cat", "--out", "{readonly}/new"], "--out {readonly}/new: cannot write into the folder {readonly} (permission denied)"),
        (["generate", "a cat", "--out", "{readonly}"], "--out {readonly}: cannot write into the folder (permission denied)"),
        (["generate", SURROGATE], "the prompt has a lone surrogate (U+D800) at character 7"),
        (["edit", "{a}", SURROGATE, "--mask", "{mask}"], "the prompt has a lone surrogate (U+D800) at character 7"),
        (["textdiff", "{a}", "--from", "a", "--to", SURROGATE], "the --to caption has a lone surrogate (U+D800) at character 7"),
        (["rank", SURROGATE, "{a}"], "lone surrogate"),
        (["generate", "--prompts", "{bad_bytes}"], "--prompts {bad_bytes}: line 2 is not UTF-8 text"),
        (["generate", "--prompts", "{folder}"], "--prompts {folder}: is a folder; give a text file"),
        (["vary", "{text}"], "{text}: not a readable image (not in a format Pillow reads"),
        (["generate", "a cat", "--negative", " "], "the --negative caption is empty"),
        (["vary", "{a}", "--negative", SURROGATE], "the --negative caption has a lone surrogate"),
        (["mix", "a cat", "{a}", "--weights", "1"], "--weights 1: 1 weights for 2 inputs; give one weight per input"),
        (["mix", "a cat", "{a}", "--weights", "1,x"], "--weights 1,x: not a comma-separated list of numbers"),
        (["mix", "a cat", "{a}", "--weights", "0,0"], "the mix weights are all 0"),
        (["mix", "a cat", "{a}", "--weights", "1,-2"], "mix weights must be finite and at least 0, got -2.0"),
        (["mix", "a cat", "{folder}/nope.png"], "{folder}/nope.png: no such image file"),
        (["mix", "a cat", "{text}"], "{text}: not a readable image"),
        (["mix", "a cat", ""], "the caption '' is empty"),
        (["img2img", "{a}", "a cat", "--strength", "1.5"], "--strength must be between 0 and 1, got 1.5"),
        (["img2img", "{a}", "--strength", "nan"], "--strength must be between 0 and 1"),
        (["img2img", "{text}", "a cat"], "{text}: not a readable image"),
        (["img2img", "{folder}/nope.png"], "{folder}/nope.png: no such image file"),
        (["generate", "--from-png", "{folder}/nope.png"], "--from-png {folder}/nope.png: no such file"),
        (["generate", "--from-png", "{a}"], "--from-png {a}: no unclip metadata"),
        (["generate", "--from-png", "{text}"], "--from-png {text}: not a readable image"),
        (["generate", "a cat", "--from-png", "{a}"], "give no CAPTION or --prompts with it"),
    ],
)  # fmt: skip
def test_mistakes_are_refused_before_the_pipeline_is_loaded(
    pipeline_dir, images, tmp_path, capsys, monkeypatch, no_loading, argv, message
):
    file = tmp_path / "notes.txt"
    file.write_text("a file where a folder should be")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    # chmod does not stop root (tests may run as root): the access check is what is tested
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != readonly and real_access(p, mode))
    (tmp_path / "bad.txt").write_bytes(b"a red square\na \xed\xa0\x80 surrogate, UTF-8 encoded\n")
    names = {k: str(v) for k, v in images.items()} | {
        "file": str(file), "blocked": str(file / "out"), "readonly": str(readonly),
        "bad_bytes": str(tmp_path / "bad.txt"), "folder": str(tmp_path),
    }  # fmt: skip
    argv = [a.format(**names) for a in argv]
    extra = ["--pipeline", str(pipeline_dir), "--device", "cpu", "--no-progress"]
    if "--out" not in argv and argv[0] != "rank":
        extra += ["--out", str(tmp_path / "out")]
    rc, stdout, err = run([*argv, *extra], capsys)
    assert rc == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"unclip {argv[0]}: error: ")
    assert message.format(**names) in lines[0], lines[0]
    assert "BytesIO" not in lines[0] and " at 0x" not in lines[0]


def test_a_failure_while_writing_leaves_no_partial_files(
    pipeline_dir, tmp_path, capsys, monkeypatch
):
    saved = []
    original = Image.Image.save

    def flaky_save(self, fp, *args, **kwargs):
        if len(saved) == 2:
            raise OSError("disk full")
        saved.append(fp)
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    out = tmp_path / "out"
    rc = cli.main(["generate", "a red square", "-n", "3", *common(pipeline_dir, out)])
    assert rc == 2 and "disk full" in capsys.readouterr().err  # one line, no traceback
    assert len(saved) == 2 and list(out.iterdir()) == []  # two written, both removed


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_every_option(command, capsys):
    parser = _subparsers(cli.build_parser())[command]
    for action in parser._actions:
        assert action.help and len(action.help) > 5, (command, action.dest)
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text
    if command != "generate":
        assert "centre square is cropped" in text  # the resize policy
    if command == "edit":
        assert "white or transparent = repaint" in text
    if command != "rank":
        assert "OUT/COMMAND-SEED-I.png" in text


def test_train_pipeline_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "pipeline", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--clip", "--prior", "--decoder", "--upsampler", "--inpaint-decoder", "--out"):
        assert flag in text
    assert "EMA weights" in text


# -- call depth ----------------------------------------------------------------------------------

#: package frames (unclip's own functions) strictly between a command function and the decoder
#: UNet's forward: the capability (text_to_image), the stage runner (decode), the sampler's loop
#: and classifier-free guidance; a command calls the capability itself. The issue's bound: the
#: UNet within six frames of the command (here five).
UNET_DEPTH = 4


def _frames_to_unet(monkeypatch, call, entry: str) -> tuple[list[str], int]:
    """(unclip frames strictly between the function ``entry`` and the first UNet.forward, all
    frames strictly between, torch's too) while ``call()`` runs; a frame as 'module:function'."""
    import traceback

    import unclip
    from unclip.decoder.unet import UNet

    package = str(Path(unclip.__file__).parent)
    stacks: list[traceback.StackSummary] = []
    forward = UNet.forward

    def recording(self, *args, **kwargs):
        if not stacks:
            stacks.append(traceback.extract_stack())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", recording)
    call()
    stack = stacks[0][:-1]  # the recording wrapper stands where UNet.forward's frame is
    start = max(i for i, f in enumerate(stack) if f.name == entry)
    between = stack[start + 1 :]
    ours = [f"{Path(f.filename).stem}:{f.name}" for f in between if f.filename.startswith(package)]
    return ours, len(between)


def test_the_generate_command_reaches_the_unet_within_five_frames(
    monkeypatch, pipeline_dir, tmp_path
):
    """run_generate -> text_to_image -> decode -> sampler loop -> guidance -> UNet.forward; a
    new layer anywhere on the way fails here."""
    argv = ["generate", "a red square", "--pipeline", str(pipeline_dir), "--out",
            str(tmp_path), "--no-progress", "--seed", "0"]  # fmt: skip
    ours, every = _frames_to_unet(monkeypatch, lambda: cli.main(argv), "run_generate")
    assert len(ours) <= UNET_DEPTH, f"{ours} ({every} frames in all)"


def test_a_pipeline_call_reaches_the_unet_within_four_frames(monkeypatch, pipe):
    """text_to_image -> decode -> sampler loop -> guidance -> UNet.forward."""
    call = lambda: pipe.text_to_image("a red square", seed=0, sampler="ddim")  # noqa: E731
    ours, every = _frames_to_unet(monkeypatch, call, "text_to_image")
    assert len(ours) <= UNET_DEPTH - 1, f"{ours} ({every} frames in all)"


def test_negative_prompts_reach_the_pipeline_and_the_metadata(
    pipeline_dir, images, tmp_path, capsys, one_by_one
):
    out = tmp_path / "out"
    rc, _, err = run(["generate", "a red square", *common(pipeline_dir, out)], capsys)
    rc, _, err = run(["generate", "a red square", "--negative", "a blue square",
                      *common(pipeline_dir, tmp_path / "neg")], capsys)  # fmt: skip
    assert rc == 0, err
    plain, text = read_png(out / "generate-3-0.png")
    steered, neg_text = read_png(tmp_path / "neg" / "generate-3-0.png")
    assert neg_text["negative_prompt"] == "a blue square" and "negative_prompt" not in text
    assert not np.array_equal(np.asarray(plain), np.asarray(steered))
    rc, _, err = run(["edit", str(images["a"]), "a cat", "--mask", str(images["mask"]),
                      "--negative", "a dog", *common(pipeline_dir, tmp_path / "edit")], capsys)  # fmt: skip
    assert rc == 0, err
    assert read_png(tmp_path / "edit" / "edit-3-0.png")[1]["negative_prompt"] == "a dog"


def test_img2img_at_strength_one_is_generate_with_the_same_seed(
    pipeline_dir, images, tmp_path, capsys
):
    rc, _, err = run(["generate", "a red square", *common(pipeline_dir, tmp_path / "g")], capsys)
    rc, _, err = run(["img2img", str(images["a"]), "a red square", "--strength", "1",
                      *common(pipeline_dir, tmp_path / "i")], capsys)  # fmt: skip
    assert rc == 0, err
    a, _ = read_png(tmp_path / "g" / "generate-3-0.png")
    b, text = read_png(tmp_path / "i" / "img2img-3-0.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert text["method"] == "image_to_image" and text["strength"] == "1.0"
    assert text["image"] == str(images["a"])  # the input file, for --from-png


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "a red square", "--negative", "a star", "--decoder-steps", "3",
         "--prior-candidates", "3"],
        ["img2img", "{a}", "a green circle", "--strength", "0.4"],
        ["mix", "a red square", "{b}", "--weights", "0.6,0.4"],
        ["vary", "{a}", "--invert", "--eta", "0.2"],
    ],
)  # fmt: skip
def test_generate_from_png_makes_the_same_image_again(pipeline_dir, images, tmp_path, capsys, argv):
    argv = [a.format(**{k: str(v) for k, v in images.items()}) for a in argv]
    rc, stdout, err = run([*argv, *common(pipeline_dir, tmp_path / "first", seed=5)], capsys)
    assert rc == 0, err
    first = Path(stdout.split()[0])
    redo = ["generate", "--from-png", str(first), "--pipeline", str(pipeline_dir), "--device",
            "cpu", "--no-progress"]  # fmt: skip
    rc, stdout, err = run([*redo, "--out", str(tmp_path / "again"), "--json"], capsys)
    assert rc == 0, err
    assert "warning" not in err
    (item,) = json.loads(stdout)["images"]
    assert item["seed"] == 5 and item["method"] == read_png(first)[1]["method"]
    assert Path(item["path"]).read_bytes() == first.read_bytes()  # pixels and metadata
    # another pipeline's (or another training's) PNG: redone with a one-line warning
    img, text = read_png(first)
    meta = PngInfo()
    for key, value in {**text, "weights_hash": "000000000000"}.items():
        meta.add_itxt(key, value)
    img.save(tmp_path / "other.png", pnginfo=meta)
    rc, stdout, err = run([*redo[:2], str(tmp_path / "other.png"), *redo[3:], "--out",
                           str(tmp_path / "third"), "--seed", "6"], capsys)  # fmt: skip
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "000000000000" in warnings[0], err
    assert Path(stdout.split()[0]).name == "generate-6-0.png"  # a flag given overrides


def test_generate_from_png_refuses_what_it_cannot_redo(pipeline_dir, images, tmp_path, capsys):
    rc, stdout, err = run(["interpolate", str(images["a"]), str(images["b"]), "--frames", "2",
                           *common(pipeline_dir, tmp_path / "out")], capsys)  # fmt: skip
    assert rc == 0, err
    frame = stdout.split()[0]
    rc, stdout, err = run(["generate", "--from-png", frame, *common(pipeline_dir, tmp_path)],
                          capsys)  # fmt: skip
    assert rc == 2 and stdout == ""
    assert err.strip() == (
        f"unclip generate: error: --from-png {frame}: cannot redo a interpolate image from its "
        "metadata; redoable: text_to_image, variations, image_to_image, mix"
    )


def test_generate_from_png_takes_fast_and_sampler_over_the_pngs_settings(
    pipeline_dir, images, tmp_path, capsys
):
    """--fast and --sampler replace the settings the PNG recorded (its decoder steps and every
    stage's sampler), as they replace the pipeline's defaults without --from-png; a step flag
    still wins over the preset."""
    from unclip.pipeline.config import SAMPLING_PRESETS

    fast = SAMPLING_PRESETS["fast"]
    rc, stdout, err = run(["img2img", str(images["a"]), "a green circle", "--decoder-steps", "3",
                           *common(pipeline_dir, tmp_path / "first")], capsys)  # fmt: skip
    assert rc == 0, err
    first = stdout.split()[0]
    redo = ["generate", "--from-png", first, "--pipeline", str(pipeline_dir), "--device", "cpu",
            "--no-progress", "--json"]  # fmt: skip

    def redone(*flags: str) -> dict:
        rc, stdout, err = run([*redo, *flags, "--out", str(tmp_path / "again")], capsys)
        assert rc == 0, err
        (item,) = json.loads(stdout)["images"]
        assert item["method"] == "image_to_image" and item["strength"] == 0.6
        return item

    item = redone("--fast")
    assert item["steps"]["decoder"] == fast["decoder_steps"]
    assert item["sampler"]["decoder"] == fast["decoder_sampler"]
    assert redone("--fast", "--decoder-steps", "4")["steps"]["decoder"] == 4
    item = redone("--sampler", "ddpm")
    assert set(item["sampler"].values()) == {"ddpm"} and item["steps"]["decoder"] == 3
