"""WebDataset ``.tar`` shards: a deterministic writer and a random-access index.

A shard is a plain POSIX tar in which the files of one sample share a key and differ in their
extension (``00042.png``, ``00042.txt``, ``00042.json``), the layout img2dataset and LAION use.
The writer fixes every header field (mtime, owner, mode), so the same samples give
byte-identical shards. The index reads the headers once and then serves any member by seeking,
which turns a set of shards into a map-style data set (shuffled, resumable, split by rank).
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unclip.config import write_text_atomic

__all__ = [
    "ShardError",
    "ShardIndex",
    "ShardSample",
    "ShardWriter",
    "expand_shards",
    "split_key",
]


class ShardError(ValueError):
    """A shard that cannot be read (missing, not a tar, or truncated)."""


def split_key(name: str) -> tuple[str, str]:
    """``"dir/00042.seg.png"`` -> (``"dir/00042"``, ``"seg.png"``): the key ends at the first dot
    of the base name, as WebDataset defines it."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext if dot else ""


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard paths from a folder, a glob, a brace range ``data-{000..009}.tar`` or a list."""
    if isinstance(spec, (list, tuple)):
        out: list[Path] = []
        for s in spec:
            out.extend(expand_shards(s))
        return out
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
        if not found:
            raise ShardError(f"{path}: no .tar shards in this folder")
        return found
    if "{" in text and ".." in text:
        pre, _, rest = text.partition("{")
        rng, _, post = rest.partition("}")
        lo, _, hi = rng.partition("..")
        width = len(lo)
        return expand_shards([f"{pre}{i:0{width}d}{post}" for i in range(int(lo), int(hi) + 1)])
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(text))
        if not found:
            raise ShardError(f"{text}: no shard matches this pattern")
        return found
    if not path.exists():
        raise ShardError(f"{path}: no such shard")
    return [path]


class ShardWriter:
    """Write samples into numbered shards ``{prefix}-00000.tar``… of at most ``max_count``.

    Each sample is a key and a mapping ``extension -> bytes``. Shards are written to a temporary
    name and renamed when closed, so an interrupted build never leaves a shard that looks whole.
    """

    def __init__(self, folder: str | os.PathLike, prefix: str = "shard", max_count: int = 2000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        final = self.folder / f"{self.prefix}-{len(self.paths):05d}.tar"
        self._tmp = final.with_name(f".tmp-{final.name}")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.paths.append(final)
        self._count = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} must not contain a dot")
        if self._tar is None or self._count >= self.max_count:
            self._close_current()
            self._open()
        assert self._tar is not None
        for ext in sorted(files):
            data = files[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp is not None
        os.replace(self._tmp, self.paths[-1])
        self._tar = None

    def close(self) -> list[Path]:
        self._close_current()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)


@dataclass
class ShardSample:
    """Where one sample's files lie: ``files[ext] = (offset, size)`` in ``shard``."""

    key: str
    shard: int
    files: dict[str, tuple[int, int]] = field(default_factory=dict)


class ShardIndex:
    """Random access to the samples of a list of shards.

    ``problems`` lists shards that were cut short or unreadable: their whole samples are kept,
    the rest is skipped and reported, never fatal.
    """

    def __init__(self, shards: Sequence[str | os.PathLike] | str | os.PathLike):
        self.shards = expand_shards(shards)
        self.samples: list[ShardSample] = []
        self.problems: list[str] = []
        for i, path in enumerate(self.shards):
            self._scan(i, path)

    def _scan(self, i: int, path: Path) -> None:
        by_key: dict[str, ShardSample] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                while True:
                    try:
                        info = tar.next()
                    except (tarfile.ReadError, EOFError, OSError) as e:
                        self.problems.append(f"{path}: truncated or corrupt ({e})")
                        break
                    if info is None:
                        break
                    if not info.isfile():
                        continue
                    key, ext = split_key(info.name)
                    sample = by_key.get(key)
                    if sample is None:
                        sample = by_key[key] = ShardSample(key, i)
                    sample.files[ext] = (info.offset_data, info.size)
        except (tarfile.ReadError, OSError) as e:
            self.problems.append(f"{path}: not a readable tar ({e})")
            return
        size = path.stat().st_size
        for sample in by_key.values():
            if all(off + n <= size for off, n in sample.files.values()):
                self.samples.append(sample)
            else:
                self.problems.append(f"{path}: sample {sample.key} is cut off at the end")

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        """The key and the files (extension -> bytes) of sample ``index``."""
        sample = self.samples[index]
        out: dict[str, bytes] = {}
        with open(self.shards[sample.shard], "rb") as f:
            for ext, (offset, size) in sample.files.items():
                f.seek(offset)
                out[ext] = f.read(size)
        return sample.key, out

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        for i in range(len(self)):
            yield self.read(i)


def write_manifest(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Write records as JSON lines (sorted keys, so the file is deterministic), atomically."""
    import json

    lines = (json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records)
    write_text_atomic(Path(path), "".join(line + "\n" for line in lines))


def read_manifest(path: str | os.PathLike) -> list[dict]:
    import json

    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ShardError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    return records
