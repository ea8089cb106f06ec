"""``unclip bench`` and the scripts in ``benchmarks/``: they run (quick modes, tiny models) and
write well-formed JSON, Markdown sections and plots. No timing is asserted here."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from PIL import Image

from unclip.allocator import keep_freed_memory
from unclip.commands import bench, bench_measure, bench_report, random_pipelines
from unclip.pipeline.stages import DTYPE_ENV, native_bf16

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_pipeline import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("bench") / "pipe", inpaint_decoder=False)


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_json(fn: Any, *args: Any) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert fn(*args) == 0
    return json.loads(out.getvalue())


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


# ---------------------------------------------------------------------------------------------
# helpers


def test_write_doc_section_replaces_only_its_section(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "b.md"
    bench_report.write_doc_section(doc, "one", "first\n")
    bench_report.write_doc_section(doc, "two", "second")
    bench_report.write_doc_section(doc, "one", "third")
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "first" not in text and text.count("<!-- one:start -->") == 1
    assert text.index("third") < text.index("second")


def test_markdown_table_and_timed() -> None:
    table = bench_report.markdown_table(["a", "b"], [(1, 0.123456), ("x", None)])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x |  |"]
    calls = []
    t = bench_measure.timed(lambda: calls.append(1), repeat=2)
    assert len(calls) == 3 and t["runs"] == 2 and 0 <= t["best_s"] <= t["median_s"]


def test_random_pipeline_from_configs_generates() -> None:
    pipe = random_pipelines.random_pipeline(random_pipelines.tiny_stage_configs())
    img = pipe.text_to_image("a red square", seed=0, prior_steps=1, decoder_steps=1,
                             upsampler_steps=1)[0]  # fmt: skip
    assert img.size == (pipe.image_size, pipe.image_size)
    sc = random_pipelines.stage_configs_from_dir(REPO / "configs" / "emoji-small")
    assert not sc.decoder.inpaint and sc.prior is not None and len(sc.upsamplers) == 1
    assert sc.train_batch["decoder"] >= 1


# ---------------------------------------------------------------------------------------------
# unclip bench


def test_bench_command_quick(tiny_pipe: Path, tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    args = bench_args(str(tiny_pipe), "--quick", "--json", "--peak-fp32", "100",
                      "--peak-bf16", "400", "--doc", str(doc))  # fmt: skip
    r = run_json(args.func, args)
    assert r["peak_gflops"] == {"fp32": 100.0, "bf16": 400.0}
    sampling = r["sampling"]
    assert list(sampling) == ["text", "prior", "decoder", "upsampler", "end_to_end"]
    dec = sampling["decoder"]
    assert dec["steps"] == 2 and dec["gflops_per_call_sample"] > 0
    # guidance doubles the rows: 2 steps × 2 × batch
    assert dec["latency"]["rows_per_run"] == 4 and dec["batch2"]["rows_per_run"] == 8
    for entry in (dec["latency"], dec["batch2"]):
        assert entry["achieved_gflops"] > 0
        assert entry["mfu_bf16"] == pytest.approx(entry["achieved_gflops"] / 400)
    assert sampling["end_to_end"]["batch2"]["images"] == 2
    # the prior's steps run four tokens after a cached caption: less than a full forward
    from unclip.eval.model_stats import model_stats
    from unclip.pipeline import load_pipeline

    full = model_stats(load_pipeline(tiny_pipe).prior.model.config).gflops
    assert 0 < sampling["prior"]["gflops_per_call_sample"] < full
    assert set(r["training"]) == {"clip", "prior", "decoder", "upsampler"}
    for row in r["training"].values():
        assert row["batch"] == 2 and row["samples_per_s"] > 0
    assert "mfu_fp32" in r["training"]["decoder"]
    text = doc.read_text()
    assert "<!-- unclip-bench:start -->" in text and "| decoder | 2 |" in text


def test_bench_falls_back_to_configs_and_checks_args(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    with pytest.raises(ValueError, match="--batch"):
        bench._bench(bench_args("--batch", "0"))
    with pytest.raises(FileNotFoundError):
        bench.open_pipeline("no-such-pipeline-name")
    shutil.copytree(REPO / "configs" / "emoji-small", tmp_path / "not-installed")
    monkeypatch.setattr(bench, "CONFIGS_ROOT", tmp_path)
    pipe, sc, source = bench.open_pipeline("not-installed")
    assert sc is not None and source.startswith("random weights")
    assert pipe.base_size == sc.decoder.image_size and pipe.prior is not None


def test_bench_in_cli() -> None:
    from unclip import cli

    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
        cli.main(["bench", "--help"])
    assert e.value.code == 0 and "--quick" in out.getvalue()


# ---------------------------------------------------------------------------------------------
# unclip bench train STAGE


@pytest.fixture(scope="module")
def tiny_run_configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run configs of the four stages at the tiny sizes (clip.json beside the others gives the
    synthetic text encoder its sizes); their data paths do not exist."""
    from unclip.config import DataConfig, TrainConfig
    from unclip.run_configs import (
        ClipRunConfig,
        DecoderRunConfig,
        PriorRunConfig,
        UpsamplerRunConfig,
    )

    sc = random_pipelines.tiny_stage_configs()
    folder = tmp_path_factory.mktemp("run-configs")
    train = TrainConfig(batch_size=4, ema_decay=0.9, warmup_steps=1, steps=100)
    missing = "no/such/data"
    up, up_diffusion = sc.upsamplers[0]
    configs = {
        "clip": ClipRunConfig(model=sc.clip, train=train,
                              data=DataConfig(path=missing, image_size=sc.clip.image_size)),
        "prior": PriorRunConfig(model=sc.prior, diffusion=sc.prior_diffusion, train=train,
                                clip="no/such/clip"),
        "decoder": DecoderRunConfig(model=sc.decoder.replace(inpaint=True),
                                    diffusion=sc.decoder_diffusion, train=train,
                                    data=DataConfig(path=missing, image_size=16),
                                    inpaint_prob=0.5),
        "upsampler": UpsamplerRunConfig(model=up, diffusion=up_diffusion, train=train,
                                        data=DataConfig(path=missing, image_size=32),
                                        crop_size=16),
    }  # fmt: skip
    for name, cfg in configs.items():
        cfg.save(folder / f"{name}.json")
    return folder


@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_bench_train_reports_every_part(tiny_run_configs: Path, stage: str) -> None:
    from unclip.commands import bench_train

    r = bench_train.profile(stage, tiny_run_configs / f"{stage}.json", batch=2, steps=2,
                            warmup=1, peaks_gflops={"bf16": 100.0, "fp32": 100.0})  # fmt: skip
    parts = r["parts_ms"]
    assert list(parts) == list(bench_train.PARTS) and all(v >= 0 for v in parts.values())
    # the parts are read between the same clock's start and stop: they add up to the step
    assert sum(parts.values()) == pytest.approx(r["step_ms"], rel=0.05, abs=1.0)
    for key in ("forward", "backward", "optimizer", "ema"):
        assert parts[key] > 0
    assert (parts["text"] > 0) == (stage in ("prior", "decoder"))
    assert r["batch"] == 2 and r["data"] == "synthetic" and r["peak_gflops"] == 100.0
    assert r["samples_per_s"] > 0 and r["free_samples_per_s"] > 0
    assert r["gflops_per_sample"] > 0 and r["mfu"] > 0
    assert 0 <= r["overhead_share"] < 1
    loss = r["loss_outside_network_ms"]
    assert loss["total"] > 0 and loss["total"] >= loss["text"] + loss["conditioning"]


def test_bench_train_command(tiny_run_configs: Path, tmp_path: Path, capsys) -> None:
    from unclip import cli

    doc = tmp_path / "b.md"
    argv = ["bench", "train", "decoder", "--config", str(tiny_run_configs / "decoder.json"),
            "--batch", "2", "--steps", "1", "--warmup", "1", "--peak-bf16", "50",
            "--peak-fp32", "50", "--doc", str(doc)]  # fmt: skip
    assert cli.main([*argv, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["stage"] == "decoder" and r["peak_gflops"] == 50.0
    # the tiny config's bf16, where this CPU has it natively (else the trainer's float32)
    assert r["precision"] == ("bf16 autocast" if native_bf16(torch.device("cpu")) else "float32")
    assert cli.main([*argv, "--json", "--train-fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "float32"
    text = doc.read_text()
    assert "<!-- bench-train-decoder:start -->" in text and "| **step** |" in text
    assert cli.main([*argv, "--loss-only"]) == 0
    assert "--loss-only`" in capsys.readouterr().out
    assert "<!-- bench-train-decoder-loss:start -->" in doc.read_text()
    assert cli.main(["bench", "train", "vae", "--config", "x.json"]) == 2
    assert "STAGE is one of clip, prior, decoder, upsampler" in capsys.readouterr().err
    assert cli.main(["bench", "train", "decoder"]) == 2
    assert "--config FILE" in capsys.readouterr().err
    assert cli.main(["bench", "train", "decoder", "--config", str(tmp_path / "none.json")]) == 2
    assert cli.main(["bench", "emoji-small", "decoder"]) == 2


def test_stand_in_returns_zeros_of_the_recorded_structure() -> None:
    import torch

    from unclip.commands.bench_train import StandIn

    out = (torch.ones(2, 3), torch.ones(2, 4, dtype=torch.bfloat16), torch.tensor(1.0))
    zeros = StandIn(StandIn.spec_of(out))(torch.ones(1))
    assert [z.shape for z in zeros] == [o.shape for o in out]
    assert zeros[1].dtype == torch.bfloat16 and all(not z.any() for z in zeros)


# ---------------------------------------------------------------------------------------------
# benchmarks/*.py


def test_pipeline_vs_diffusers_quick(tmp_path: Path) -> None:
    script = load_script("pipeline_vs_diffusers")
    doc = tmp_path / "b.md"
    r = run_json(script.main, ["--quick", "--doc", str(doc)])
    assert r["quick"] and [g["batch"] for g in r["generation"]] == [1, 2]
    for row in r["parameters"]:
        assert 0.9 <= row["ratio"] <= 1.1
    flops = r["decoder_forward_gflops"]
    assert flops["unclip"] == pytest.approx(flops["diffusers"], rel=0.05)
    for g in r["generation"]:
        for side in ("unclip_s_per_image", "diffusers_s_per_image"):
            assert set(g[side]) == {"text", "prior", "decoder", "upsampler", "other", "total"}
            assert g[side]["total"] > 0
        assert g["ratio"]["total"] > 0
        per_run = g["total_ratio_per_run"]  # one ratio per alternating pair, sorted
        assert len(per_run) == r["repeat"] and per_run == sorted(per_run) and per_run[0] > 0
    training = r["decoder_training_step"]
    assert training["ratio"] > 0
    assert len(training["ratio_per_step"]) == training["repeat"]
    # each side trains in its trainer's default precision: unclip in bf16 where it is native
    # (unless float32 is asked for), diffusers in float32
    unclip_bf16 = script.unclip_trains_bf16(script.parse_args(["--quick"]))
    asked = os.environ.get(DTYPE_ENV, "").strip()
    native = native_bf16(torch.device("cpu"))
    assert unclip_bf16 == {"float32": False, "bfloat16": True}.get(asked, native)
    assert training["precision"] == {
        "unclip": "bf16 autocast" if unclip_bf16 else "float32",
        "diffusers": "float32",
    }
    text = doc.read_text()
    # one section per kernel set and unclip precision, which its text states
    kernels = torch.backends.cpu.get_cpu_capability()
    section = f"pipeline-vs-diffusers-{kernels.lower()}-{r['dtype']['unclip']}"
    assert r["cpu"]["kernels"] == kernels
    assert f"<!-- {section}:start -->" in text and "Quick mode" in text
    assert "End-to-end ratio of each alternating pair of runs: 1 image(s)" in text
    assert f"kernels **{kernels}**" in text and f"samples in **{r['dtype']['unclip']}**" in text
    # diffusers runs in its own process, with glibc's default malloc settings unless asked
    assert r["keep_freed_memory"] == {"unclip": keep_freed_memory(), "diffusers": False}
    assert "each side in its own process" in text
    assert "diffusers with glibc's default malloc settings" in text


def test_pipeline_vs_diffusers_worker() -> None:
    """The diffusers worker takes unclip's malloc setting only when asked, and its errors (and
    its exit) surface in the parent as errors, not hangs."""
    script = load_script("pipeline_vs_diffusers")
    with script.DiffusersWorker(["--quick", "--diffusers-keep-freed-memory"], 1) as worker:
        assert worker.reply() == {"keep_freed_memory": keep_freed_memory()}
        assert worker(run="train") > 0
        with pytest.raises(RuntimeError, match="(?s)diffusers worker failed:.*unknown command"):
            worker(run="sample")
        with pytest.raises(RuntimeError, match="diffusers worker exited with code 1"):
            worker(run="train")


def test_steps_vs_quality_quick(tiny_pipe: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i, (colour, caption) in enumerate(
        [("red", "a red square"), ("green", "a green circle"), ("blue", "a blue square")]
    ):
        Image.new("RGB", (16, 16), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    script = load_script("steps_vs_quality")
    doc, plot = tmp_path / "docs" / "b.md", tmp_path / "docs" / "plot.svg"
    r = run_json(script.main, ["--quick", "--pipeline", str(tiny_pipe), "--data", str(data),
                               "--samplers", "ddim,dpmpp_2m", "--steps", "1,2",
                               "--doc", str(doc), "--plot", str(plot)])  # fmt: skip
    assert r["images"] == 3
    assert [(x["sampler"], x["steps"]) for x in r["results"]] == [
        ("ddim", 1), ("ddim", 2), ("dpmpp_2m", 1), ("dpmpp_2m", 2)
    ]  # fmt: skip
    assert all(x["fd"] >= 0 and x["s_per_image"] > 0 for x in r["results"])
    assert all(-1 <= x["clip_score"] <= 1 for x in r["results"])
    assert set(r["knee_steps"]) == {"ddim", "dpmpp_2m"}
    root = ET.fromstring(plot.read_text())
    assert root.tag.endswith("svg")
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
    text = doc.read_text()
    assert "<!-- steps-vs-quality:start -->" in text and "](plot.svg)" in text


def test_steps_vs_quality_rerender(tiny_pipe: Path, tmp_path: Path, capsys) -> None:
    """--from-json re-draws a saved run against the pipeline's current default, sampling
    nothing; a file that is not a result is refused with its name."""
    from unclip.pipeline import load_pipeline

    default = load_pipeline(str(tiny_pipe), device="cpu").sampling_settings().decoder
    k = default.steps

    def row(sampler: str, steps: int, fd: float) -> dict:
        return {"sampler": sampler, "steps": steps, "fd": fd, "clip_score": 0.5,
                "s_per_image": 0.1 * steps}  # fmt: skip

    saved = {
        "pipeline": "tiny", "data": "d", "split": "val", "images": 4, "dtype": "float32",
        "quick": False, "default": {"sampler": default.sampler, "steps": 999},
        "tolerance": 0.05, "clip_tolerance": 0.01, "knee_steps": {}, "default_at_knee": False,
        "machine": {"threads": 2, "time": "then"},
        "results": [row(default.sampler, k // 2 or 1, 2.0), row(default.sampler, k, 1.0),
                    row(default.sampler, 2 * k, 0.99)],
    }  # fmt: skip
    src = tmp_path / "run.json"
    src.write_text(json.dumps(saved))
    script = load_script("steps_vs_quality")
    doc, plot = tmp_path / "b.md", tmp_path / "p.svg"
    r = run_json(script.main, ["--from-json", str(src), "--pipeline", str(tiny_pipe),
                               "--doc", str(doc), "--plot", str(plot)])  # fmt: skip
    assert r["knee_steps"] == {default.sampler: k}
    assert r["default"] == {"sampler": default.sampler, "steps": k}
    assert r["default_at_knee"] is True
    text = doc.read_text()
    assert "Re-rendered from the JSON" in text and "— at the knee." in text
    assert "(then)" not in text and "2 threads, then." in text
    ET.fromstring(plot.read_text())

    bad = tmp_path / "bad.json"
    bad.write_text('{"results": 3}')
    assert script.main(["--from-json", str(bad), "--no-doc"]) == 2
    assert "bad.json: not a steps_vs_quality result" in capsys.readouterr().err


def test_steps_vs_quality_merges_runs_and_judges_the_fast_setting(
    tiny_pipe: Path, tmp_path: Path, capsys
) -> None:
    """--from-json twice adds the second run's rows (replacing equal settings) and judges the
    fast setting on them against the ``fast`` preset; a run of another set is refused."""
    from unclip.pipeline import load_pipeline
    from unclip.pipeline.config import SAMPLING_PRESETS

    default = load_pipeline(str(tiny_pipe), device="cpu").sampling_settings().decoder
    fast = SAMPLING_PRESETS["fast"]
    assert default.steps == 2 and fast["decoder_steps"] > 2  # so the preset is not measured

    def row(steps: int, fd: float) -> dict:
        return {"sampler": default.sampler, "steps": steps, "fd": fd, "clip_score": 0.5,
                "s_per_image": 0.1 * steps}  # fmt: skip

    def run(time: str, rows: list[dict]) -> dict:
        return {"pipeline": "tiny", "data": "d", "split": "val", "images": 4,
                "dtype": "float32", "quick": False, "tolerance": 0.05, "clip_tolerance": 0.01,
                "machine": {"threads": 2, "time": time}, "results": rows}  # fmt: skip

    files = []
    for name, doc in (("a", run("first", [row(2, 1.0), row(1, 1.5)])),
                      ("b", run("second", [row(1, 1.01)]))):  # fmt: skip
        files += ["--from-json", str(tmp_path / f"{name}.json")]
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    script = load_script("steps_vs_quality")
    out = tmp_path / "b.md"
    r = run_json(script.main, [*files, "--pipeline", str(tiny_pipe), "--doc", str(out),
                               "--plot", str(tmp_path / "p.svg")])  # fmt: skip
    assert sorted(x["fd"] for x in r["results"]) == [1.0, 1.01] and r["merged"] == ["second"]
    assert (r["fast"]["sampler"], r["fast"]["steps"]) == (default.sampler, 1)
    assert r["fast_preset"] == {"sampler": fast["decoder_sampler"], "steps": fast["decoder_steps"]}
    text = out.read_text()
    assert "1 more run of the same captions and seeds (second)" in text
    assert "FD +1.0% and CLIP score +0.0% against the default" in text
    assert "— not the measured setting." in text
    (tmp_path / "c.json").write_text(json.dumps(run("third", []) | {"images": 5}))
    assert script.main([*files[:2], "--from-json", str(tmp_path / "c.json"), "--no-doc"]) == 2
    assert "c.json: not a run of the same set" in capsys.readouterr().err


def test_steps_vs_quality_fast_setting() -> None:
    """The fewest steps, of any sampler, within 3% of the default's FD and 1% of its CLIP
    score; None when the default was not measured."""
    fast = load_script("steps_vs_quality").fast_setting

    def row(sampler: str, steps: int, fd: float, clip: float = 0.5) -> dict:
        return {"sampler": sampler, "steps": steps, "fd": fd, "clip_score": clip,
                "s_per_image": 0.01 * steps}  # fmt: skip

    rows = [row("ddim", 25, 1.0), row("ddim", 10, 1.06), row("dpmpp_2m", 10, 1.029),
            row("dpmpp_2m", 8, 1.031), row("ddpm", 5, 1.01, clip=0.49)]  # fmt: skip
    f = fast(rows, "ddim", 25, 0.03, 0.01)
    assert (f["sampler"], f["steps"]) == ("dpmpp_2m", 10)
    assert f["fd_ratio"] == pytest.approx(1.029) and f["speedup"] == pytest.approx(2.5)
    assert fast(rows, "ddim", 50, 0.03, 0.01) is None


def test_steps_vs_quality_step_plan() -> None:
    plan = load_script("steps_vs_quality").step_plan
    assert plan(["ddim", "dpmpp_2m"], None, [5, 25]) == {"ddim": [5, 25], "dpmpp_2m": [5, 25]}
    assert plan(["ddim", "dpmpp_2m"], ["10,5", "dpmpp_2m=8"], [25]) == {
        "ddim": [5, 10], "dpmpp_2m": [8]
    }  # fmt: skip
    for bad in (["ddpm=5"], ["ddim=x"], ["ddim=0"]):
        with pytest.raises(SystemExit):
            plan(["ddim"], bad, [25])


def test_knee_and_plot_helpers() -> None:
    script = load_script("steps_vs_quality")
    assert script.knee([(5, 2.0), (10, 1.04), (25, 1.0), (50, 1.01)], 0.05) == 10
    # higher is better (CLIP score): within 1% of the best 0.70 is >= 0.693
    assert script.knee([(5, 0.60), (10, 0.692), (25, 0.695), (50, 0.70)], 0.01, True) == 25
    svg = script.svg_line_plot({"a": [(5, 1.0), (250, 0.5)]}, title="t <&>", xlabel="x",
                               ylabel="y", marker_x=25, marker_label="default")  # fmt: skip
    ET.fromstring(svg)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
