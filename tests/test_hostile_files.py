"""Hostile and broken files: each is refused with one clear line that names the file.

Every case goes through the Python API (``unclip.hub.from_pretrained``,
``unclip.load_pipeline``, the data readers) and through ``unclip.cli.main([...])``, which must
exit with code 2 and print a single line on stderr naming the file, never a traceback, and
write nothing. Weights and configs are those of a real tiny pipeline (``tiny_pipeline.py``),
tampered with one way per test.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import unclip
from unclip import cli
from unclip.config import ConfigError
from unclip.data.datasets import DataError, open_dataset
from unclip.data.transforms import MAX_IMAGE_PIXELS, BadImageError, load_image
from unclip.hub import HubError, UnsafeWeightsError, from_pretrained

STAGE_WEIGHTS = "decoder/model.safetensors"


@pytest.fixture
def pipe_dir(pipeline_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny pipeline, to tamper with."""
    return Path(shutil.copytree(pipeline_dir, tmp_path / "pipe"))


def refused_by_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], *needles: str, out: Path | None = None
) -> str:
    """Run the CLI; assert exit code 2 and one stderr line holding every needle."""
    capsys.readouterr()
    rc = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, (needle, err)
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), "nothing may be written"
    return err


def generate_args(pipe: Path, out: Path) -> list[str]:
    return ["generate", "a red square", "--pipeline", str(pipe), "--out", str(out),
            "--seed", "0", "--no-progress"]  # fmt: skip


def refused_everywhere(
    pipe: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    error: type[Exception],
    *needles: str,
    stage: str | None = "decoder",
) -> None:
    """The tampered ``pipe`` is refused by from_pretrained (its ``stage`` folder),
    load_pipeline and ``unclip generate``, each time with every needle in the message."""
    if stage is not None:
        with pytest.raises(error) as info:
            from_pretrained(pipe / stage)
        assert all(n in str(info.value) for n in needles), str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(error) as info:
        unclip.load_pipeline(pipe, device="cpu")
    assert all(n in str(info.value) for n in needles), str(info.value)
    out = tmp_path / "out"
    refused_by_cli(generate_args(pipe, out), capsys, *needles, out=out)


def rewrite_weights(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(str(file))
    change(state)
    save_file(state, str(file), metadata={"format": "pt"})


def rewrite_config(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((folder / "config.json").read_text())
    change(doc)
    (folder / "config.json").write_text(json.dumps(doc))


# ---------------------------------------------------------------------------------------------
# Weights


def test_the_untampered_pipeline_loads(pipe_dir: Path, tmp_path: Path) -> None:
    """The baseline every refusal below is measured against."""
    assert unclip.load_pipeline(pipe_dir, device="cpu").image_size == 16
    assert cli.main(generate_args(pipe_dir, tmp_path / "out")) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_weights_of_the_wrong_shape(pipe_dir: Path, tmp_path: Path, capsys) -> None:
    def widen(state: dict[str, torch.Tensor]) -> None:
        state["out_conv.weight"] = torch.zeros(7, 16, 3, 3)

    rewrite_weights(pipe_dir / STAGE_WEIGHTS, widen)
    refused_everywhere(
        pipe_dir, tmp_path, capsys, HubError, STAGE_WEIGHTS, "'out_conv.weight'", "(7, 16, 3, 3)"
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_tensors_where_floats_belong(
    pipe_dir: Path, tmp_path: Path, capsys, dtype: torch.dtype
) -> None:
    def to_ints(state: dict[str, torch.Tensor]) -> None:
        state["out_conv.weight"] = torch.ones_like(state["out_conv.weight"]).to(dtype)

    rewrite_weights(pipe_dir / STAGE_WEIGHTS, to_ints)
    refused_everywhere(
        pipe_dir, tmp_path, capsys, HubError, STAGE_WEIGHTS, "'out_conv.weight'", str(dtype)
    )


def test_unknown_dtype_in_a_handwritten_header(pipe_dir: Path, tmp_path: Path, capsys) -> None:
    header = json.dumps({"out_conv.weight": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}})
    raw = header.encode()
    (pipe_dir / STAGE_WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0\0")
    refused_everywhere(pipe_dir, tmp_path, capsys, HubError, STAGE_WEIGHTS)


def test_low_precision_floats_still_load(pipe_dir: Path) -> None:
    """Not hostile: float16/bfloat16/float8 weights are cast to the model's float32."""

    def to_low(state: dict[str, torch.Tensor]) -> None:
        state["out_conv.weight"] = state["out_conv.weight"].to(torch.float8_e4m3fn)
        state["out_conv.bias"] = state["out_conv.bias"].to(torch.bfloat16)

    rewrite_weights(pipe_dir / STAGE_WEIGHTS, to_low)
    model = from_pretrained(pipe_dir / "decoder")
    assert model.out_conv.weight.dtype == torch.float32


def test_missing_and_extra_tensors(pipe_dir: Path, tmp_path: Path, capsys) -> None:
    def swap(state: dict[str, torch.Tensor]) -> None:
        state["backdoor.weight"] = state.pop("out_conv.weight")

    rewrite_weights(pipe_dir / STAGE_WEIGHTS, swap)
    refused_everywhere(
        pipe_dir,
        tmp_path,
        capsys,
        HubError,
        STAGE_WEIGHTS,
        "'out_conv.weight'",
        "'backdoor.weight'",
    )


@pytest.mark.parametrize("keep", [0, 7, 100, -200])
def test_truncated_or_garbage_safetensors(
    pipe_dir: Path, tmp_path: Path, capsys, keep: int
) -> None:
    file = pipe_dir / STAGE_WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[:keep])
    refused_everywhere(
        pipe_dir, tmp_path, capsys, HubError, STAGE_WEIGHTS, "not a valid safetensors file"
    )


def test_safetensors_header_declaring_a_huge_length(pipe_dir: Path, tmp_path: Path, capsys) -> None:
    """An 8-byte header length of 2**62 must not be believed (nor allocated)."""
    (pipe_dir / STAGE_WEIGHTS).write_bytes(struct.pack("<Q", 2**62) + b"{}")
    refused_everywhere(
        pipe_dir, tmp_path, capsys, HubError, STAGE_WEIGHTS, "not a valid safetensors file"
    )


def test_pickle_in_a_stage_folder_is_refused_and_never_run(
    pipe_dir: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "pwned"
    weights = pipe_dir / STAGE_WEIGHTS
    weights.unlink()
    payload = (
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )  # pickle protocol 0: os.system("touch MARKER")
    (weights.parent / "pytorch_model.bin").write_bytes(payload)
    refused_everywhere(
        pipe_dir, tmp_path, capsys, UnsafeWeightsError, "decoder/pytorch_model.bin", "pickle"
    )
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# config.json


def test_config_that_does_not_match_the_weights(pipe_dir: Path, tmp_path: Path, capsys) -> None:
    rewrite_config(pipe_dir / "decoder", lambda d: d["config"].update(model_channels=24))
    refused_everywhere(pipe_dir, tmp_path, capsys, HubError, STAGE_WEIGHTS, "the config needs")


def test_config_declaring_a_huge_model_fails_before_allocating(
    pipe_dir: Path, tmp_path: Path, capsys
) -> None:
    """About 2.6 TB of float32 weights: built for real, this would die in the allocator (a
    RuntimeError, i.e. a traceback) or, under overcommit, take the machine's memory. The
    model is checked against the weights file's header first."""
    rewrite_config(pipe_dir / "decoder", lambda d: d["config"].update(model_channels=200_000))
    refused_everywhere(pipe_dir, tmp_path, capsys, HubError, STAGE_WEIGHTS, "the config needs")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d["config"].update(colour="red"), "unknown key 'colour'"),
        (lambda d: d["config"].update(num_res_blocks="one"), "expected an integer, got 'one'"),
        (lambda d: d["config"].update(channel_mult="12"), "expected a list"),
        (lambda d: d["config"].update(learn_sigma=1), "expected true or false"),
        (lambda d: d.update(type="os:system"), "unknown model type 'os:system'"),
        (lambda d: d.update(type=["decoder_unet"]), "'type' must be a string"),
        (lambda d: d.update(format_version=99), "newer unclip"),
        (lambda d: d.pop("config"), "expected an object with"),
    ],
    ids=[
        "unknown-key",
        "str-for-int",
        "str-for-list",
        "int-for-bool",
        "type",
        "type-list",
        "version",
        "shape",
    ],
)
def test_config_with_unknown_keys_or_wrong_types(
    pipe_dir: Path, tmp_path: Path, capsys, change: Callable[[dict[str, Any]], None], needle: str
) -> None:
    rewrite_config(pipe_dir / "decoder", change)
    refused_everywhere(pipe_dir, tmp_path, capsys, HubError, "decoder/config.json", needle)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "\xff\xfe"])
def test_config_that_is_not_a_json_object(
    pipe_dir: Path, tmp_path: Path, capsys, text: str
) -> None:
    (pipe_dir / "decoder" / "config.json").write_text(text, encoding="latin-1")
    refused_everywhere(pipe_dir, tmp_path, capsys, HubError, "decoder/config.json")


def test_stages_that_do_not_fit_together(pipe_dir: Path, tmp_path: Path, capsys) -> None:
    """Each stage is whole and loads alone, but the decoder expects another CLIP's embedding
    size (a stage folder copied in from another pipeline)."""
    from unclip.decoder.unet import UNet, UNetConfig
    from unclip.hub import save_pretrained

    doc = json.loads((pipe_dir / "decoder" / "config.json").read_text())
    assert doc["config"]["clip_dim"] == 16
    save_pretrained(
        UNet(UNetConfig.from_dict({**doc["config"], "clip_dim": 32})), pipe_dir / "decoder"
    )
    from_pretrained(pipe_dir / "decoder")  # whole on its own
    with pytest.raises(ValueError, match="clip_dim") as info:
        unclip.load_pipeline(pipe_dir, device="cpu")
    assert str(pipe_dir) in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "out"
    refused_by_cli(generate_args(pipe_dir, out), capsys, str(pipe_dir), "clip_dim", out=out)


# ---------------------------------------------------------------------------------------------
# pipeline.json


@pytest.mark.parametrize(
    "stage_path",
    ["../decoder", "../../etc", "decoder/../../outside", "/etc", "C:\\Windows", "..\\decoder"],
)
def test_pipeline_stage_paths_may_not_leave_the_folder(
    pipe_dir: Path, tmp_path: Path, capsys, stage_path: str
) -> None:
    # a real decoder folder right outside: following the path would load it without complaint
    shutil.copytree(pipe_dir / "decoder", pipe_dir.parent / "decoder")
    doc = json.loads((pipe_dir / "pipeline.json").read_text())
    doc["stages"]["decoder"] = stage_path
    (pipe_dir / "pipeline.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="inside the pipeline folder") as info:
        unclip.load_pipeline(pipe_dir, device="cpu")
    assert "pipeline.json" in str(info.value) and "decoder" in str(info.value)
    out = tmp_path / "out"
    refused_by_cli(
        generate_args(pipe_dir, out), capsys, "pipeline.json", "inside the pipeline folder", out=out
    )


def test_pipeline_upsampler_paths_are_checked_too(pipe_dir: Path, tmp_path: Path, capsys) -> None:
    doc = json.loads((pipe_dir / "pipeline.json").read_text())
    doc["stages"]["upsamplers"] = ["upsampler", "../../x"]
    (pipe_dir / "pipeline.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    refused_by_cli(generate_args(pipe_dir, out), capsys, "pipeline.json", "upsamplers[1]", out=out)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.update(stages={**d["stages"], "script": "x.py"}), "unknown key 'script'"),
        (lambda d: d["sampling"]["decoder"].update(steps="25"), "expected an integer"),
        (lambda d: d["sampling"]["decoder"].update(guidance=1e9), "guidance"),
        (lambda d: d.update(type="something_else"), "type"),
    ],
    ids=["unknown-key", "wrong-type", "bad-value", "wrong-document"],
)
def test_pipeline_json_with_unknown_keys_or_wrong_types(
    pipe_dir: Path, tmp_path: Path, capsys, change: Callable[[dict[str, Any]], None], needle: str
) -> None:
    doc = json.loads((pipe_dir / "pipeline.json").read_text())
    change(doc)
    (pipe_dir / "pipeline.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=needle):
        unclip.load_pipeline(pipe_dir, device="cpu")
    out = tmp_path / "out"
    refused_by_cli(generate_args(pipe_dir, out), capsys, "pipeline.json", needle, out=out)


# ---------------------------------------------------------------------------------------------
# Images with huge declared sizes (unclip vary / edit)


def declared_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width × height black pixels (kilobytes for many megapixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + (width + 7) // 8)
    idat = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def small_png(path: Path, mode: str = "RGBA") -> Path:
    Image.new(mode, (16, 16), (200, 30, 30, 0) if mode == "RGBA" else (200, 30, 30)).save(path)
    return path


HUGE = {
    # above unclip's limit but below PIL's bomb threshold: unclip's own check answers
    "over-limit.png": declared_png(9000, 9000),
    # a decompression bomb by PIL's measure too (400 megapixels in ~40 KB)
    "bomb.png": declared_png(20_000, 20_000),
    "huge.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="90000" height="90000"/>',
}


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_images_are_refused_by_the_reader(tmp_path: Path, name: str) -> None:
    assert MAX_IMAGE_PIXELS < 9000 * 9000
    file = tmp_path / name
    file.write_bytes(HUGE[name])
    with pytest.raises(BadImageError) as info:
        load_image(file)
    assert str(file) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(HUGE))
@pytest.mark.parametrize("command", ["vary", "edit-image", "edit-mask", "interpolate"])
def test_huge_images_through_the_cli(
    pipe_dir: Path, tmp_path: Path, capsys, name: str, command: str
) -> None:
    huge = tmp_path / name
    huge.write_bytes(HUGE[name])
    ok = small_png(tmp_path / "ok.png")
    out = tmp_path / "out"
    common = ["--pipeline", str(pipe_dir), "--out", str(out), "--no-progress"]
    args = {
        "vary": ["vary", str(huge), "-n", "1", *common],
        "edit-image": ["edit", str(huge), "a red apple", *common],
        "edit-mask": ["edit", str(ok), "a red apple", "--mask", str(huge), *common],
        "interpolate": ["interpolate", str(ok), str(huge), "--frames", "2", *common],
    }[command]
    refused_by_cli(args, capsys, str(huge), out=out)


def test_truncated_and_fake_images_through_the_cli(pipe_dir: Path, tmp_path: Path, capsys) -> None:
    whole = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(whole, "PNG")
    cases = {
        "truncated.png": whole.getvalue()[:60],
        "empty.png": b"",
        "text.png": b"hello, not an image",
        "script.svg": b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script",
    }
    for name, data in cases.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        out = tmp_path / f"out-{name}"
        args = ["vary", str(bad), "-n", "1", "--pipeline", str(pipe_dir), "--out", str(out),
                "--no-progress"]  # fmt: skip
        err = refused_by_cli(args, capsys, str(bad), out=out)
        assert "BytesIO" not in err and " at 0x" not in err, err  # the file, not our buffer


def test_undecodable_bytes_are_named_as_the_upload_or_by_the_given_name() -> None:
    for data in (b"hello, not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a" * 4):
        with pytest.raises(BadImageError) as info:
            load_image(data)
        message = str(info.value)
        assert message.startswith("the uploaded image: not a readable image"), message
        assert "BytesIO" not in message and " at 0x" not in message, message
        with pytest.raises(BadImageError, match=r"^upload\.png: not a readable image"):
            load_image(data, name="upload.png")


# ---------------------------------------------------------------------------------------------
# Data manifests and tables with `..`


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("bad", ["../secret.png", "a/../../secret.png", "/etc/passwd"])
def test_tables_with_paths_leaving_the_folder(
    tmp_path: Path, capsys, suffix: str, bad: str
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    small_png(root / "ok.png", "RGB")
    small_png(tmp_path / "secret.png", "RGB")  # what `..` would reach
    rows = [{"path": "ok.png", "caption": "a red square"}, {"path": bad, "caption": "x"}]
    table = root / f"table{suffix}"
    if suffix == ".csv":
        table.write_text("path,caption\n" + "".join(f"{r['path']},{r['caption']}\n" for r in rows))
    elif suffix == ".jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    with pytest.raises(DataError, match="leaves the data folder") as info:
        open_dataset(table, size=16)
    assert str(table) in str(info.value) and repr(bad) in str(info.value)
    refused_by_cli(["data", "check", str(table), "--no-progress"], capsys, str(table), repr(bad))


def _shard(folder: Path, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data-00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shard_members_and_manifest_keys_with_dots_never_touch_other_files(
    tmp_path: Path, capsys
) -> None:
    """Shards are read in place (by offset), never extracted, and manifest keys only select
    samples: a member called ``../../x.png`` or a key ``../../secret`` reaches no file."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(png, "PNG")
    root = tmp_path / "deep" / "data"
    _shard(
        root,
        {
            "ok.png": png.getvalue(),
            "ok.txt": b"a grey square",
            "../../escape.png": png.getvalue(),
            "../../escape.txt": b"an escaped square",
        },
    )
    secret = tmp_path / "deep" / "secret.txt"
    secret.write_text("the secret caption")
    records = [
        {"key": "ok", "caption": "a grey square", "split": "train"},
        {"key": "../escape", "caption": "x", "split": "train"},
        {"key": "../secret", "caption": "x", "split": "val"},
    ]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    ds = open_dataset(root, size=16, split="train")
    captions = sorted(ds[i]["caption"] for i in range(len(ds)))
    assert "the secret caption" not in captions
    assert cli.main(["data", "check", str(root), "--split", "train", "--no-progress"]) == 0
    # a split whose only key names a real file outside selects nothing: refused
    with pytest.raises(DataError, match="no usable samples"):
        open_dataset(root, size=16, split="val")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (
        not (tmp_path / "escape.png").exists() and not (tmp_path / "deep" / "escape.png").exists()
    )
