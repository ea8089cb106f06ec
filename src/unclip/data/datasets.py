"""Image–caption data sets in the layouts the field uses.

- a folder of images with same-named ``.txt`` captions (``cat.png`` + ``cat.txt``);
- a CSV or Parquet table of (image path, caption), paths relative to the table's folder;
- WebDataset ``.tar`` shards (img2dataset layout: ``.jpg/.png/.webp`` + ``.txt``/``.json``).

Every reader is a map-style ``Dataset`` whose items are ``{"key": str, "image": [3, S, S] in
[-1, 1], "caption": str}``, so the training loop can shuffle, resume and split it by rank.
Bad data never stops a run: an unreadable image is skipped (the next sample takes its place),
counted in ``dataset.skips`` and reported with the first few names.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from unclip.data.shards import ShardIndex, expand_shards, read_manifest
from unclip.data.transforms import BadImageError, load_image, prepare_image, to_tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "WHOLE_SET_SPLIT",
    "DataError",
    "FolderDataset",
    "ImageTextDataset",
    "ShardDataset",
    "SkipLog",
    "StreamingShards",
    "TableDataset",
    "open_dataset",
    "read_split_keys",
    "safe_join",
    "split_for_rank",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".svg")
_SHARD_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "svg")


class DataError(ValueError):
    """A data set that cannot be used at all (no images, missing column, path outside root)."""


class SkipLog:
    """Counts of skipped samples by reason, with the first few names of each (thread-safe)."""

    def __init__(self, keep: int = 5) -> None:
        self.keep = keep
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def add(self, reason: str, name: str) -> None:
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
            names = self.examples.setdefault(reason, [])
            if len(names) < self.keep:
                names.append(name)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason: ``3 skipped (not a readable image): a.png, b.png, c.png``."""
        lines = []
        for reason in sorted(self.counts):
            n = self.counts[reason]
            more = ", …" if n > len(self.examples[reason]) else ""
            lines.append(f"{n} skipped ({reason}): {', '.join(self.examples[reason])}{more}")
        return "\n".join(lines)

    def state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": dict(self.examples)}


class ImageTextDataset(Dataset):
    """Base class: subclasses list their samples and implement :meth:`load` (bytes + caption).

    ``size``: output side in pixels; ``mode``: ``"crop"`` (centre crop, photos) or ``"pad"``
    (fit and pad onto white, icons and emoji).
    """

    max_retries = 64

    def __init__(self, size: int, mode: str = "crop") -> None:
        if mode not in ("crop", "pad"):
            raise DataError(f"mode must be 'crop' or 'pad', got {mode!r}")
        self.size = size
        self.mode = mode
        self.skips = SkipLog()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[str, bytes | Path, str, str]:
        """(key, image bytes or path, caption, name for messages) of sample ``index``."""
        raise NotImplementedError

    def key(self, index: int) -> str:
        """The key of sample ``index`` (subclasses answer without reading the image)."""
        return self.load(index)[0]

    def image(self, index: int) -> tuple[str, torch.Tensor, str]:
        key, source, caption, name = self.load(index)
        img = load_image(source, name=name)
        return key, to_tensor(prepare_image(img, self.size, self.mode)), caption

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        for attempt in range(self.max_retries):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            try:
                key, image, caption = self.image(i)
            except BadImageError as e:
                self._bad.add(i)
                # the message is "NAME: reason (detail)": no need to read the sample again
                name, _, rest = str(e).partition(": ")
                self.skips.add(rest.partition(" (")[0], name)
                continue
            return {"key": key, "image": image, "caption": caption}
        raise DataError(
            f"{self.max_retries} samples in a row could not be read; the data set looks broken:\n"
            + self.skips.summary()
        )


def _read_caption(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8", errors="replace").split())


class FolderDataset(ImageTextDataset):
    """Images anywhere under ``root`` with a same-named ``.txt`` caption next to each.

    An image without its caption is reported (``skips``, reason "no caption") and left out, or
    kept with an empty caption when ``missing_caption="empty"``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 64,
        mode: str = "crop",
        missing_caption: str = "skip",
    ) -> None:
        super().__init__(size, mode)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        self.items: list[tuple[Path, str]] = []
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            txt = path.with_suffix(".txt")
            if txt.is_file():
                self.items.append((path, _read_caption(txt)))
            elif missing_caption == "empty":
                self.items.append((path, ""))
            else:
                self.skips.add("no caption", f"{path.relative_to(self.root)} (no {txt.name})")
        if not self.items:
            raise DataError(f"{self.root}: no images with captions found")
        if self.skips.total:
            warnings.warn(f"{self.root}:\n{self.skips.summary()}", stacklevel=2)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[str, bytes | Path, str, str]:
        path, caption = self.items[index]
        rel = path.relative_to(self.root)
        return rel.with_suffix("").as_posix(), path, caption, str(path)


_PATH_COLUMNS = ("path", "image", "file", "filepath", "image_path")
_CAPTION_COLUMNS = ("caption", "text", "prompt", "label")


def _pick(columns: Sequence[str], wanted: str | None, options: Sequence[str], what: str, where):
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{where}: no column {wanted!r}; columns are {list(columns)}")
        return wanted
    for name in options:
        if name in columns:
            return name
    raise DataError(
        f"{where}: no {what} column (looked for {', '.join(options)}); columns are {list(columns)}"
    )


def safe_join(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, refusing absolute paths and ``..`` that leave ``root``."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{where}: path {relative!r} leaves the data folder; refused")
    return root / rel


class TableDataset(ImageTextDataset):
    """A CSV or Parquet table of (image path, caption); paths are relative to ``root``
    (default: the table's folder) and may not leave it."""

    def __init__(
        self,
        table: str | os.PathLike,
        size: int = 64,
        mode: str = "crop",
        root: str | os.PathLike | None = None,
        path_column: str | None = None,
        caption_column: str | None = None,
    ) -> None:
        super().__init__(size, mode)
        self.table = Path(table)
        if not self.table.is_file():
            raise DataError(f"{self.table}: no such table")
        self.root = Path(root) if root is not None else self.table.parent
        rows = self._rows()
        columns = list(rows[0].keys()) if rows else []
        if not rows:
            raise DataError(f"{self.table}: the table has no rows")
        pcol = _pick(columns, path_column, _PATH_COLUMNS, "image path", self.table)
        ccol = _pick(columns, caption_column, _CAPTION_COLUMNS, "caption", self.table)
        self.items: list[tuple[Path, str, str]] = []
        for n, row in enumerate(rows, start=2 if self.table.suffix.lower() == ".csv" else 0):
            where = f"{self.table}:{n}" if self.table.suffix.lower() == ".csv" else str(self.table)
            rel = str(row[pcol] or "")
            caption = row[ccol]
            if caption is None or str(caption).strip() == "":
                self.skips.add("no caption", f"{where} ({rel})")
                continue
            self.items.append(
                (safe_join(self.root, rel, where), rel, " ".join(str(caption).split()))
            )
        if not self.items:
            raise DataError(f"{self.table}: no rows with both an image path and a caption")
        if self.skips.total:
            warnings.warn(f"{self.table}:\n{self.skips.summary()}", stacklevel=2)

    def _rows(self) -> list[dict[str, Any]]:
        suffix = self.table.suffix.lower()
        if suffix == ".csv" or suffix == ".tsv":
            with open(self.table, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "reading Parquet needs pyarrow: pip install 'unclip[data]'"
                ) from e
            try:
                return pq.read_table(self.table).to_pylist()
            except Exception as e:  # pyarrow raises its own error types
                raise DataError(f"{self.table}: not a readable Parquet file ({e})") from None
        if suffix in (".jsonl", ".json"):
            return read_manifest(self.table)
        raise DataError(f"{self.table}: unknown table format (use .csv, .tsv, .parquet or .jsonl)")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[str, bytes | Path, str, str]:
        path, rel, caption = self.items[index]
        return Path(rel).with_suffix("").as_posix(), path, caption, str(path)


def _caption_from(files: dict[str, bytes]) -> str | None:
    if "txt" in files:
        return " ".join(files["txt"].decode("utf-8", errors="replace").split())
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        for name in ("caption", "text", "TEXT"):
            if isinstance(meta.get(name), str):
                return " ".join(meta[name].split())
    return None


class ShardDataset(ImageTextDataset):
    """WebDataset shards as a map-style data set (random access through :class:`ShardIndex`).

    ``keys``: keep only these sample keys (a split from a manifest). Shards cut short keep their
    whole samples; the rest is reported in ``skips``.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        size: int = 64,
        mode: str = "crop",
        keys: set[str] | None = None,
    ) -> None:
        super().__init__(size, mode)
        self.index = ShardIndex(shards)
        for problem in self.index.problems:
            self.skips.add("shard cut short or unreadable", problem)
        self.items: list[int] = []
        for i, sample in enumerate(self.index.samples):
            if keys is not None and sample.key not in keys:
                continue
            if not any(ext in sample.files for ext in _SHARD_IMAGE_EXTS):
                self.skips.add("no image file", sample.key)
                continue
            if "txt" not in sample.files and "json" not in sample.files:
                self.skips.add("no caption", sample.key)
                continue
            self.items.append(i)
        if not self.items:
            raise DataError(f"{self.index.shards[0].parent}: no usable samples in the shards")

    def __len__(self) -> int:
        return len(self.items)

    def key(self, index: int) -> str:
        return self.index.samples[self.items[index]].key

    def load(self, index: int) -> tuple[str, bytes | Path, str, str]:
        key, files = self.index.read(self.items[index])
        ext = next(e for e in _SHARD_IMAGE_EXTS if e in files)
        caption = _caption_from(files) or ""
        return key, files[ext], caption, f"{key}.{ext}"


def split_for_rank(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Every ``world``-th item starting at ``rank``: disjoint, and together complete."""
    return list(items[rank::world])


class StreamingShards(IterableDataset):
    """Stream samples shard by shard: shards are split across ranks, then across data-loader
    workers, so no sample is read twice and none is lost. For data sets too large to index."""

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        size: int = 64,
        mode: str = "crop",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.shards = expand_shards(shards)
        self.size, self.mode = size, mode
        if rank is None or world_size is None:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ready else 0
            world_size = dist.get_world_size() if ready else 1
        self.rank, self.world_size = rank, world_size
        self.skips = SkipLog()

    def my_shards(self) -> list[Path]:
        mine = split_for_rank(self.shards, self.rank, self.world_size)
        info = get_worker_info()
        if info is not None:
            mine = split_for_rank(mine, info.id, info.num_workers)
        return mine

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self.my_shards():
            index = ShardIndex([shard])
            for problem in index.problems:
                self.skips.add("shard cut short or unreadable", problem)
            for key, files in index:
                ext = next((e for e in _SHARD_IMAGE_EXTS if e in files), None)
                caption = _caption_from(files)
                if ext is None or caption is None:
                    self.skips.add("no image file" if ext is None else "no caption", key)
                    continue
                try:
                    img = load_image(files[ext], name=f"{shard.name}:{key}.{ext}")
                except BadImageError:
                    self.skips.add("not a readable image", f"{shard.name}:{key}.{ext}")
                    continue
                image = to_tensor(prepare_image(img, self.size, self.mode))
                yield {"key": key, "image": image, "caption": caption}


WHOLE_SET_SPLIT = "train"  # the split that means every sample of a data set without splits


def _no_splits(where: Path | str, split: str | None, n: int) -> None:
    """A data set without splits: ``split`` must be None or :data:`WHOLE_SET_SPLIT` (which
    then reads all ``n`` samples, said in one line on stderr); any other split is an error."""
    if split is None:
        return
    if split != WHOLE_SET_SPLIT:
        raise DataError(
            f"{where}: this data set has no splits, so no split {split!r}; splits need a shard "
            f"folder whose manifest.jsonl gives each sample one (split {WHOLE_SET_SPLIT!r} or "
            "an empty split reads the whole data set)"
        )
    print(f"unclip: {where} has no splits; split {split!r} reads all {n} samples", file=sys.stderr)


def open_dataset(
    spec: str | os.PathLike,
    size: int = 64,
    mode: str | None = None,
    split: str | None = None,
) -> ImageTextDataset:
    """Open a data set from a path: a folder of shards (with an optional ``manifest.jsonl``
    naming splits), a folder of images + captions, a CSV/Parquet table, or shard paths/globs.

    ``split``: the samples whose manifest record has this ``split`` (None: all). A data set
    without splits (an image folder, a table, shards without a manifest or whose manifest
    names none) is one training set: split ``"train"`` (:data:`WHOLE_SET_SPLIT`, the training
    configs' default) reads all of it, with a one-line note on stderr; another split is a
    :class:`DataError`.

    ``mode`` defaults to the manifest's ``"mode"`` (``pad`` for the emoji set) or ``crop``.
    """
    path = Path(spec)
    if path.is_dir() and any(path.glob("*.tar")):
        manifest = path / "manifest.jsonl"
        keys = None
        default_mode = "crop"
        records = read_manifest(manifest) if manifest.exists() else []
        if records:
            default_mode = "pad" if any(r.get("mode") == "pad" for r in records[:1]) else "crop"
        if split is not None and any("split" in r for r in records):
            keys = {r["key"] for r in records if r.get("split") == split}
            if not keys:
                splits = sorted({str(r.get("split")) for r in records})
                raise DataError(f"{manifest}: no samples in split {split!r}; splits: {splits}")
        ds = ShardDataset(path, size, mode or default_mode, keys=keys)
        if keys is None:
            _no_splits(manifest if records else path, split, len(ds))
        return ds
    if path.is_dir():
        ds: ImageTextDataset = FolderDataset(path, size, mode or "crop")
    elif path.suffix.lower() in (".csv", ".tsv", ".parquet", ".jsonl"):
        ds = TableDataset(path, size, mode or "crop")
    elif path.suffix.lower() == ".tar" or any(c in str(spec) for c in "*?{"):
        ds = ShardDataset(str(spec), size, mode or "crop")
    else:
        raise DataError(f"{path}: not a data set (folder, .csv/.parquet table, or .tar shards)")
    _no_splits(path, split, len(ds))
    return ds


def read_split_keys(manifest: str | os.PathLike, split: str) -> list[str]:
    return [r["key"] for r in read_manifest(manifest) if r.get("split") == split]
