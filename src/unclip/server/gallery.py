"""Where result images live: the SQLite gallery (files on disk) or a bounded memory store.

Both hand out image ids of 32 hex digits (128 random bits) and keep each image's file format
(``png``, ``jpeg`` or ``webp``: the request's ``output_format``). The server serves an image
at ``/files/{id}.{format}`` without the API key, as a capability URL (like the signed URLs
of the OpenAI API): knowing the id is the permission. Ids are checked against
:data:`ID_PATTERN` and formats against :data:`FILE_FORMATS` before they touch the file system.

:class:`Gallery`: one table ``images`` in an SQLite file, the files in the ``images/`` folder
next to it (``{id}.{format}``), each written to a temporary name and renamed, so a crash
never leaves half a file.
It holds at most ``max_bytes`` of files and nothing older than ``max_age`` seconds: each new
image evicts the oldest ones past either limit (never itself), so whoever can reach the
server cannot fill its disk.
:class:`MemoryStore`: the most recent images up to a byte budget (for ``response_format=url``
when no gallery is configured).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unclip.server.limits import DEFAULT_GALLERY_MAX_DAYS, DEFAULT_GALLERY_MAX_MB

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
#: the formats a stored image may have (its file's extension)
FILE_FORMATS = ("png", "jpeg", "webp")
#: 2: the ``bytes`` column (for the size limit); 3: the ``format`` column. Older galleries
#: are upgraded on open (their images are PNGs)
SCHEMA_VERSION = 3
DAY = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    method TEXT NOT NULL,
    prompt TEXT,
    seed INTEGER,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    job TEXT,
    info TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    format TEXT NOT NULL DEFAULT 'png'
);
CREATE INDEX IF NOT EXISTS images_created ON images (created DESC, id DESC);
"""


@dataclass(frozen=True)
class StoredImage:
    """What a store keeps of an image: its file ``data`` in format ``fmt`` ("png", "jpeg",
    "webp"), its metadata as PNG text ``info``, its ``size`` (width, height) and the ``job``
    that made it (None outside a job)."""

    data: bytes
    info: dict[str, str]
    size: tuple[int, int]
    job: str | None = None
    fmt: str = "png"


def valid_id(image_id: str) -> bool:
    return bool(ID_PATTERN.fullmatch(image_id))


@dataclass
class GalleryItem:
    """One stored image: its metadata (the entries of its PNG text) in ``info``, its file
    format in ``format``."""

    id: str
    created: float
    method: str
    prompt: str | None
    seed: int | None
    width: int
    height: int
    job: str | None
    info: dict[str, str]
    format: str = "png"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "gallery.image",
            "created": self.created,
            "method": self.method,
            "prompt": self.prompt,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "job": self.job,
            "format": self.format,
            "info": self.info,
        }


def _seed(info: dict[str, str]) -> int | None:
    try:
        return int(info["seed"])
    except (KeyError, ValueError):
        return None


class Gallery:
    """Images persisted in SQLite (``db_path``) with their files in ``db_path.parent/images``,
    at most ``max_bytes`` of files and none older than ``max_age`` seconds (None: no limit)."""

    def __init__(
        self,
        db_path: str | os.PathLike,
        max_bytes: int | None = DEFAULT_GALLERY_MAX_MB * 2**20,
        max_age: float | None = DEFAULT_GALLERY_MAX_DAYS * DAY,
    ) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"the gallery's size limit must be positive, got {max_bytes}")
        if max_age is not None and max_age <= 0:
            raise ValueError(f"the gallery's age limit must be positive, got {max_age}")
        self.db_path = Path(db_path)
        self.folder = self.db_path.parent / "images"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.db_path}: gallery schema version {version} is newer than this "
                    f"unclip's ({SCHEMA_VERSION})"
                )
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(images)")}
            if "bytes" not in columns:  # version 1: sizes from the files
                db.execute("ALTER TABLE images ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0")
                for (image_id,) in db.execute("SELECT id FROM images").fetchall():
                    with contextlib.suppress(OSError, ValueError):
                        size = self.path(image_id).stat().st_size
                        db.execute("UPDATE images SET bytes = ? WHERE id = ?", (size, image_id))
            if "format" not in columns:  # versions 1 and 2: PNGs only
                db.execute("ALTER TABLE images ADD COLUMN format TEXT NOT NULL DEFAULT 'png'")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        with self._lock:
            self._evict()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def path(self, image_id: str, fmt: str = "png") -> Path:
        if not valid_id(image_id):
            raise ValueError(f"not an image id: {image_id!r}")
        if fmt not in FILE_FORMATS:
            raise ValueError(f"not an image format: {fmt!r}")
        return self.folder / f"{image_id}.{fmt}"

    def put(self, image: StoredImage) -> str:
        """Store an image file and its metadata; return the new image id."""
        image_id = secrets.token_hex(16)
        data, info, (width, height) = image.data, image.info, image.size
        path = self.path(image_id, image.fmt)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        row = (
            image_id, time.time(), info.get("method", "unknown"), info.get("prompt"),
            _seed(info), width, height, image.job, json.dumps(info), len(data), image.fmt,
        )  # fmt: skip
        try:
            with self._lock:
                with self._connect() as db:
                    db.execute(
                        "INSERT INTO images (id, created, method, prompt, seed, width, height, "
                        "job, info, bytes, format) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                self._evict(keep=image_id)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return image_id

    def _evict(self, keep: str | None = None) -> list[str]:
        """Delete images older than ``max_age`` and then the oldest ones until the files
        total at most ``max_bytes``, never ``keep`` (the image just added). Returns the
        ids deleted. Called with ``_lock`` held."""
        gone: list[tuple[str, str]] = []  # (id, format)
        with self._connect() as db:
            if self.max_age is not None:
                cutoff = time.time() - self.max_age
                gone += [(r[0], r[1]) for r in db.execute(
                    "SELECT id, format FROM images WHERE created < ? AND id IS NOT ?",
                    (cutoff, keep),
                )]  # fmt: skip
                db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i, _ in gone])
            if self.max_bytes is not None:
                total = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM images").fetchone()[0]
                if total > self.max_bytes:
                    oldest = db.execute(
                        "SELECT id, bytes, format FROM images WHERE id IS NOT ? "
                        "ORDER BY created ASC, id ASC",
                        (keep,),
                    )
                    evicted = []
                    for image_id, size, fmt in oldest:
                        if total <= self.max_bytes:
                            break
                        evicted.append((image_id, fmt))
                        total -= size
                    oldest.close()
                    db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i, _ in evicted])
                    gone += evicted
        for image_id, fmt in gone:
            self._unlink(image_id, fmt)
        return [image_id for image_id, _ in gone]

    def _unlink(self, image_id: str, fmt: str) -> None:
        with contextlib.suppress(ValueError):  # a format this version does not know
            self.path(image_id, fmt).unlink(missing_ok=True)

    def total_bytes(self) -> int:
        """The bytes of files the gallery holds (as recorded when each was stored)."""
        with self._connect() as db:
            return int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM images").fetchone()[0])

    def get_file(self, image_id: str) -> tuple[bytes, str] | None:
        """An image's file and format, or None."""
        if not valid_id(image_id):
            return None
        with self._connect() as db:
            row = db.execute("SELECT format FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            return None
        try:
            return self.path(image_id, row[0]).read_bytes(), row[0]
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def _item(row: sqlite3.Row) -> GalleryItem:
        return GalleryItem(
            id=row["id"], created=row["created"], method=row["method"], prompt=row["prompt"],
            seed=row["seed"], width=row["width"], height=row["height"], job=row["job"],
            info=json.loads(row["info"]), format=row["format"],
        )  # fmt: skip

    def get(self, image_id: str) -> GalleryItem | None:
        if not valid_id(image_id):
            return None
        with self._connect() as db:
            row = db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        return None if row is None else self._item(row)

    def list(self, limit: int = 50, before: str | None = None) -> list[GalleryItem]:
        """The newest ``limit`` images, or those older than the image ``before`` (paging)."""
        with self._connect() as db:
            if before is None:
                rows = db.execute(
                    "SELECT * FROM images ORDER BY created DESC, id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT i.* FROM images i, images b WHERE b.id = ? AND "
                    "(i.created < b.created OR (i.created = b.created AND i.id < b.id)) "
                    "ORDER BY i.created DESC, i.id DESC LIMIT ?",
                    (before, limit),
                ).fetchall()
        return [self._item(r) for r in rows]

    def count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def delete(self, image_id: str) -> bool:
        """Remove an image (row and file); False when there is no such image."""
        if not valid_id(image_id):
            return False
        with self._lock, self._connect() as db:
            row = db.execute("SELECT format FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))
        self._unlink(image_id, row[0])
        return True


class MemoryStore:
    """The most recent image files, at most ``max_bytes`` in all (oldest dropped first)."""

    def __init__(self, max_bytes: int = 64 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, image: StoredImage) -> str:
        """Keep an image file (its metadata is not kept); return the new image id."""
        image_id = secrets.token_hex(16)
        with self._lock:
            self._items[image_id] = (image.data, image.fmt)
            self._bytes += len(image.data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (old, _) = self._items.popitem(last=False)
                self._bytes -= len(old)
        return image_id

    def get_file(self, image_id: str) -> tuple[bytes, str] | None:
        """An image's file and format, or None."""
        with self._lock:
            return self._items.get(image_id)
