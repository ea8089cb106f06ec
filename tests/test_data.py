"""Data readers, transforms, shards, skip/count behaviour, the emoji builder, embedding shards."""

from __future__ import annotations

import csv
import io
import json
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from unclip.cli import main
from unclip.data.datasets import (
    WHOLE_SET_SPLIT,
    DataError,
    FolderDataset,
    ShardDataset,
    StreamingShards,
    TableDataset,
    open_dataset,
)
from unclip.data.embeddings import EmbeddingShards, compute_embeddings
from unclip.data.shards import ShardIndex, ShardWriter, expand_shards, split_key
from unclip.data.transforms import (
    BadImageError,
    center_crop_resize,
    from_tensor,
    load_image,
    onto_white,
    prepare_image,
    rasterize_svg,
    to_tensor,
)

SVG_MM = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="20mm" height="10mm" viewBox="0 0 20 10">'
    '<rect x="0" y="0" width="10" height="10" fill="#ff0000"/></svg>'
)


def png_bytes(color=(255, 0, 0), size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "red.png").write_bytes(png_bytes((255, 0, 0)))
    (root / "red.txt").write_text("a  red\nsquare ")
    (root / "sub" / "blue.png").write_bytes(png_bytes((0, 0, 255), (40, 20)))
    (root / "sub" / "blue.txt").write_text("a blue rectangle")
    (root / "tiny.png").write_bytes(png_bytes((0, 255, 0), (1, 1)))
    (root / "tiny.txt").write_text("one green pixel")
    (root / "vector.svg").write_text(SVG_MM)
    (root / "vector.txt").write_text("half red")
    (root / "broken.png").write_bytes(png_bytes()[:40])  # truncated PNG
    (root / "broken.txt").write_text("truncated")
    (root / "empty.jpg").write_bytes(b"")
    (root / "empty.txt").write_text("empty file")
    (root / "nocaption.png").write_bytes(png_bytes((9, 9, 9)))
    return root


# --- transforms -----------------------------------------------------------------------------


def test_rgba_onto_white_and_tensor_range():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert onto_white(img).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert onto_white(half).getpixel((0, 0)) == (127, 127, 127)
    x = to_tensor(Image.new("RGB", (3, 2), (0, 255, 128)))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert x[0].eq(-1).all() and x[1].eq(1).all()
    assert from_tensor(x).getpixel((0, 0)) == (0, 255, 128)


def test_center_crop_and_pad_modes():
    wide = Image.new("RGB", (80, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left, cropped away
    crop = center_crop_resize(wide, 10)
    assert crop.size == (10, 10) and crop.getpixel((0, 5)) == (0, 0, 255)
    padded = prepare_image(Image.new("RGBA", (40, 20), (0, 0, 255, 255)), 10, mode="pad")
    assert padded.size == (10, 10)
    assert padded.getpixel((5, 0)) == (255, 255, 255)  # padding is white
    assert padded.getpixel((5, 5)) == (0, 0, 255)


def test_svg_with_mm_units_renders_at_96_dpi():
    img = rasterize_svg(SVG_MM)
    # 20 mm at 96 dpi = 75.6 px
    assert img.size in ((75, 38), (76, 38), (76, 37), (75, 37))
    sized = rasterize_svg(SVG_MM, size=64)
    assert max(sized.size) == 64
    assert sized.getpixel((5, 5))[:3] == (255, 0, 0)
    assert sized.getpixel((60, 5))[3] == 0  # the right half is transparent


def test_load_image_refuses_empty_truncated_and_huge(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty.png: empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(BadImageError, match="cut.png"):
        load_image(png_bytes()[:50], name="cut.png")
    with pytest.raises(BadImageError, match="notimg"):
        load_image(b"hello world", name="notimg")
    # a PNG header declaring 100000 × 100000 pixels is refused before any decoding
    header = bytearray(png_bytes(size=(1, 1)))
    header[16:24] = (100000).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")  # keep IHDR valid
    with pytest.raises(BadImageError, match="limit"):
        load_image(bytes(header), name="bomb.png")


# --- readers --------------------------------------------------------------------------------


def test_folder_reader_skips_and_counts_bad_files(messy_folder):
    with pytest.warns(UserWarning, match="nocaption.png"):
        ds = FolderDataset(messy_folder, size=8)
    assert len(ds) == 6  # nocaption.png is left out
    assert ds.skips.counts == {"no caption": 1}
    items = [ds[i] for i in range(len(ds))]
    keys = [it["key"] for it in items]
    # the two bad files are replaced by the next good samples: batches keep their size
    assert "broken" not in keys and "empty" not in keys
    assert all(it["image"].shape == (3, 8, 8) for it in items)
    assert ds.skips.counts["empty file"] == 1
    assert sum(ds.skips.counts.values()) == 3
    assert "broken.png" in ds.skips.summary()
    captions = {it["key"]: it["caption"] for it in items}
    assert captions["red"] == "a red square"
    assert captions["sub/blue"] == "a blue rectangle"
    tiny = next(it for it in items if it["key"] == "tiny")
    assert torch.allclose(tiny["image"][1], torch.ones(8, 8))  # 1×1 green pixel scaled up
    svg = next(it for it in items if it["key"] == "vector")
    assert svg["image"][0].min() > 0.9  # red channel high everywhere (red + white)


def test_folder_reader_keeps_uncaptioned_on_request(messy_folder):
    ds = FolderDataset(messy_folder, size=8, missing_caption="empty")
    assert len(ds) == 7


def test_table_readers_csv_and_parquet(messy_folder):
    rows = [
        {"path": "red.png", "caption": "red"},
        {"path": "sub/blue.png", "caption": "blue"},
        {"path": "broken.png", "caption": "broken"},
        {"path": "tiny.png", "caption": ""},
    ]
    table = messy_folder / "data.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    with pytest.warns(UserWarning, match="data.csv:5"):
        ds = TableDataset(table, size=8)
    assert len(ds) == 3
    assert [ds[i]["caption"] for i in range(2)] == ["red", "blue"]
    assert ds[2]["caption"] == "red"  # the broken image is skipped, wrapping around
    assert ds.skips.counts["not a readable image"] == 1

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"file": ["red.png"], "text": ["red via parquet"]}), messy_folder / "d.parquet"
    )
    pds = open_dataset(messy_folder / "d.parquet", size=8)
    assert pds[0]["caption"] == "red via parquet"


def test_table_refuses_paths_leaving_the_folder(tmp_path):
    table = tmp_path / "evil.csv"
    table.write_text("path,caption\n../../etc/passwd,x\n")
    with pytest.raises(DataError, match="leaves the data folder"):
        TableDataset(table)
    table.write_text("path,caption\n/etc/passwd,x\n")
    with pytest.raises(DataError, match="leaves the data folder"):
        TableDataset(table)
    table.write_text("name,caption\na.png,x\n")
    with pytest.raises(DataError, match="no image path column"):
        TableDataset(table)


# --- shards ---------------------------------------------------------------------------------


def write_shards(folder: Path, n: int, per_shard: int, prefix: str = "data") -> list[Path]:
    with ShardWriter(folder, prefix, max_count=per_shard) as w:
        for i in range(n):
            w.write(
                f"{i:05d}",
                {"png": png_bytes((i, 0, 0)), "txt": f"sample {i}".encode(), "json": b"{}"},
            )
    return w.paths


def test_shard_writer_is_deterministic_and_readable(tmp_path):
    a = write_shards(tmp_path / "a", 7, 3)
    b = write_shards(tmp_path / "b", 7, 3)
    assert [p.name for p in a] == ["data-00000.tar", "data-00001.tar", "data-00002.tar"]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))
    index = ShardIndex(tmp_path / "a")
    assert len(index) == 7 and not index.problems
    key, files = index.read(4)
    assert key == "00004" and files["txt"] == b"sample 4"
    ds = open_dataset(tmp_path / "a", size=4)
    assert ds[4]["caption"] == "sample 4" and ds[4]["image"].shape == (3, 4, 4)
    assert split_key("x/00001.seg.png") == ("x/00001", "seg.png")
    assert len(expand_shards(str(tmp_path / "a" / "data-{00000..00002}.tar"))) == 3


def test_truncated_shard_keeps_whole_samples(tmp_path):
    paths = write_shards(tmp_path, 4, 4)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])
    ds = ShardDataset(tmp_path, size=4)
    assert 0 < len(ds) < 4
    assert ds.skips.total >= 1
    assert all(ds[i]["caption"].startswith("sample") for i in range(len(ds)))


def test_streaming_shards_split_by_rank_and_worker(tmp_path):
    write_shards(tmp_path, 23, 3)  # 8 shards
    seen = []
    for rank in range(2):
        stream = StreamingShards(tmp_path, size=4, rank=rank, world_size=2)
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        seen.extend(item["key"] for item in loader)
    assert sorted(seen) == [f"{i:05d}" for i in range(23)]  # every sample exactly once


def test_manifest_splits_select_samples(tmp_path):
    write_shards(tmp_path, 6, 10)
    records = [{"key": f"{i:05d}", "split": "val" if i < 2 else "train"} for i in range(6)]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(open_dataset(tmp_path, size=4, split="val")) == 2
    assert len(open_dataset(tmp_path, size=4, split="train")) == 4
    with pytest.raises(DataError, match="no samples in split 'test'"):
        open_dataset(tmp_path, size=4, split="test")


def test_data_sets_without_splits_are_one_training_split(messy_folder, tmp_path, capsys):
    """An image folder, a table or shards without a manifest (or whose manifest names no
    splits) have no splits: "train" (the training configs' default) reads all of it, with a
    one-line note; no split reads all of it silently; any other split is an error."""
    table = messy_folder / "pairs.csv"
    table.write_text("path,caption\nred.png,a red square\nsub/blue.png,a blue rectangle\n")
    write_shards(tmp_path / "bare", 3, 10)
    keyed = tmp_path / "keyed"
    write_shards(keyed, 3, 10)
    (keyed / "manifest.jsonl").write_text("".join(
        json.dumps({"key": f"{i:05d}", "style": "x"}) + "\n" for i in range(3)))  # fmt: skip
    with pytest.warns(UserWarning):  # the messy folder's uncaptioned image
        everything = len(open_dataset(messy_folder, size=4))
    for spec, n in ((messy_folder, everything), (table, 2), (tmp_path / "bare", 3), (keyed, 3)):
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert len(open_dataset(spec, size=4, split=WHOLE_SET_SPLIT)) == n
            note = capsys.readouterr().err
            assert note.count("\n") == 1 and f"has no splits; split 'train' reads all {n}" in note
            assert len(open_dataset(spec, size=4)) == n
            assert capsys.readouterr().err == ""
            with pytest.raises(DataError, match="has no splits, so no split 'val'"):
                open_dataset(spec, size=4, split="val")


# --- the emoji builder on a miniature copy of the packages ----------------------------------


def _fake_packages(root: Path) -> Path:
    mods = root / "node_modules"
    base = mods / "emojibase-data" / "en"
    base.mkdir(parents=True)
    data = [
        {"label": "grinning face", "hexcode": "1F600", "tags": ["face", "grin"], "group": 0,
         "subgroup": 0, "order": 1},
        {"label": "waving hand", "hexcode": "1F44B", "tags": ["wave"], "group": 1,
         "subgroup": 1, "order": 2,
         "skins": [{"label": "waving hand: dark skin tone", "hexcode": "1F44B-1F3FF",
                    "group": 1, "subgroup": 1, "order": 3, "tone": 5}]},
        {"label": "red heart", "hexcode": "2764", "tags": ["love"], "group": 0,
         "subgroup": 0, "order": 4},
    ]  # fmt: skip
    (base / "data.json").write_text(json.dumps(data))
    messages = {
        "groups": [{"key": "se", "message": "smileys & emotion", "order": 0},
                   {"key": "pb", "message": "people & body", "order": 1}],
        "subgroups": [{"key": "fs", "message": "face-smiling", "order": 0},
                      {"key": "hf", "message": "hand-fingers-open", "order": 1}],
    }  # fmt: skip
    (base / "messages.json").write_text(json.dumps(messages))
    from unclip.data.emoji import EMOJIBASE, SOURCES

    def package(name: str, version: str) -> Path:
        p = mods / name
        p.mkdir(parents=True, exist_ok=True)
        (p / "package.json").write_text(json.dumps({"name": name, "version": version}))
        return p

    package(*EMOJIBASE)
    for src in SOURCES:
        pkg = package(src.package, src.version)
        if src.kind == "iconify":
            icons = {
                "width": 32,
                "height": 32,
                "icons": {
                    "grinning-face": {"body": '<circle cx="16" cy="16" r="15" fill="#fc0"/>'},
                    "waving-hand-dark-skin-tone": {"body": '<rect width="32" height="16"/>'},
                    "red-heart": {"body": '<path d="M2 2h28v28z" fill="red"/>'},
                    "not-an-emoji": {"body": "<g/>"},
                },
            }
            (pkg / "icons.json").write_text(json.dumps(icons))
            continue
        folder = pkg / src.path
        folder.mkdir(parents=True)
        names = ["1f600", "1f44b-1f3ff", "2764-fe0f", "abcd"]
        for n in names:
            if src.kind == "svg":
                (folder / f"{n.upper()}.svg").write_text(SVG_MM)
            else:
                img = Image.new("RGBA", (72, 36), (0, 128, 0, 255))
                buf = io.BytesIO()
                img.save(buf, format="WEBP" if src.kind == "webp" else "PNG", lossless=True)
                (folder / f"{n}.{src.kind}").write_bytes(buf.getvalue())
        if src.kind == "png":
            entries = [
                {"image": f"{n}.png", f"has_img_{src.path.split('/')[1]}": True} for n in names
            ]
            (pkg / "emoji.json").write_text(json.dumps(entries))
    return mods


def test_emoji_builder_joins_captions_splits_and_is_deterministic(tmp_path):
    from unclip.data.emoji import assign_splits, build_emoji

    mods = _fake_packages(tmp_path)
    stats = build_emoji(tmp_path / "a", modules=mods, workers=1, progress=False, log=lambda m: None)
    assert stats["images"] == 21 and not stats["failed"]  # 3 emoji × 7 styles
    build_emoji(tmp_path / "b", modules=mods, workers=2, progress=False, log=lambda m: None)
    for name in ("emoji-00000.tar", "manifest.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    records = [json.loads(x) for x in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    by_key = {r["key"]: r for r in records}
    wave = by_key["noto-1f44b-1f3ff"]
    assert wave["caption"] == "waving hand, dark skin tone, noto style"
    assert wave["concept"] == "1F44B" and wave["licence"] == "Apache-2.0"
    assert wave["group"] == "people & body" and wave["tags"] == ["wave"]
    assert by_key["fluentflat-2764"]["caption"] == "red heart, fluent flat style"
    assert by_key["emojione-1f600"]["source"].startswith("@iconify-json/emojione@")
    ds = open_dataset(tmp_path / "a", size=16)
    assert ds.mode == "pad"
    item = ds[0]
    assert item["image"].shape == (3, 16, 16)

    # test pairs: their concept is in train in other styles, never in that style
    many = [
        {"key": f"s{s}-c{c}", "concept": f"c{c}", "style": f"s{s}"}
        for c in range(300)
        for s in range(4)
    ]
    assign_splits(many)
    test = [r for r in many if r["split"] == "test"]
    assert 5 < len(test) < 60
    train_pairs = {(r["concept"], r["style"]) for r in many if r["split"] == "train"}
    for r in test:
        assert (r["concept"], r["style"]) not in train_pairs
        assert any(c == r["concept"] for c, _ in train_pairs)
    assert any(r["split"] == "val" for r in many)


def test_cli_data_check_and_sheet(messy_folder, tmp_path, capsys):
    with pytest.warns(UserWarning):
        assert main(["data", "check", str(messy_folder), "--size", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 readable samples of 6 listed" in out
    assert "broken.png" in out
    with pytest.warns(UserWarning):
        assert (
            main(["data", "sheet", str(messy_folder), "--out", str(tmp_path / "s.png"), "-n", "4"])
            == 0
        )
    assert Image.open(tmp_path / "s.png").size[0] > 100
    assert main(["data", "check", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


# --- embedding shards -----------------------------------------------------------------------


class TinyEncoder(torch.nn.Module):
    """A small random image/text encoder standing in for CLIP in these tests."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(dim))
        self.table = torch.nn.Embedding(256, dim)
        self.calls = 0

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.normalize(self.image(x), dim=-1)

    def encode_text(self, captions) -> torch.Tensor:
        ids = torch.tensor([[ord(c) % 256 for c in (t + " " * 8)[:8]] for t in captions])
        return torch.nn.functional.normalize(self.table(ids).mean(1), dim=-1)


def test_embeddings_are_aligned_and_resumable(tmp_path):
    write_shards(tmp_path / "shards", 10, 4)
    ds = open_dataset(tmp_path / "shards", size=4)
    enc = TinyEncoder()
    out = tmp_path / "emb"
    assert compute_embeddings(ds, enc.encode_image, enc.encode_text, out, batch_size=3,
                              shard_size=4, progress=False) == 3  # fmt: skip
    emb = EmbeddingShards(out)
    assert len(emb) == 10 and emb.dim == 6
    row = emb[emb.index_of("00007")]
    assert row["caption"] == "sample 7"
    expected = enc.encode_image(ds[7]["image"][None])[0]
    torch.testing.assert_close(row["image_emb"], expected, atol=2e-3, rtol=0)
    assert torch.allclose(row["text_emb"].norm(), torch.tensor(1.0), atol=2e-3)
    # resume: only the missing shard is computed again
    (out / "img_emb" / "img_emb_0001.npy").unlink()
    before = enc.calls
    assert compute_embeddings(ds, enc.encode_image, enc.encode_text, out, batch_size=4,
                              shard_size=4, progress=False) == 1  # fmt: skip
    assert enc.calls - before == 1
    again = EmbeddingShards(out)
    assert np.array_equal(np.asarray(again.image_emb), np.asarray(emb.image_emb))
    (out / "metadata" / "metadata_0002.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        EmbeddingShards(out)


def test_embeddings_split_across_ranks(tmp_path):
    write_shards(tmp_path / "shards", 10, 4)
    ds = open_dataset(tmp_path / "shards", size=4)
    enc = TinyEncoder()
    out = tmp_path / "emb"
    kw = dict(batch_size=4, shard_size=3, progress=False, world_size=2)
    assert compute_embeddings(ds, enc.encode_image, enc.encode_text, out, rank=1, **kw) == 2
    assert not (out / "info.json").exists()  # rank 0 writes it
    assert compute_embeddings(ds, enc.encode_image, enc.encode_text, out, rank=0, **kw) == 2
    emb = EmbeddingShards(out)
    assert sorted(emb.keys) == [f"{i:05d}" for i in range(10)]


def test_svg_declaring_a_huge_size_is_refused_without_rendering():
    huge = '<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"><rect/></svg>'
    with pytest.raises(BadImageError, match="limit"):
        load_image(huge.encode(), name="huge.svg")
    # the same drawing asked for at a fixed size renders fine
    assert rasterize_svg(huge, size=32).size == (32, 32)
    with pytest.raises(BadImageError, match="bad.svg"):
        load_image(b"<svg", name="bad.svg")


def test_svg_linking_a_local_file_is_refused(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes((1, 2, 3)))
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
           f'width="8" height="8"><image xlink:href="{secret}" width="8" height="8"/></svg>')  # fmt: skip
    with pytest.raises(BadImageError, match="outside file"):
        load_image(svg.encode(), name="leak.svg")
    inline = svg.replace(str(secret), "data:image/png;base64,iVBORw0KGgo=")
    load_image(inline.encode(), name="inline.svg")  # data: URIs are fine
