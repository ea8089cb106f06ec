"""Where result images live: the SQLite gallery (PNGs on disk) or a bounded memory store.

Both hand out image ids of 32 hex digits (128 random bits). The server serves an image at
``/files/{id}.png`` without the API key, as a capability URL (like the signed URLs of the
OpenAI API): knowing the id is the permission. Ids are checked against :data:`ID_PATTERN`
before they touch the file system.

:class:`Gallery`: one table ``images`` in an SQLite file, PNGs in the ``images/`` folder next
to it, each written to a temporary name and renamed, so a crash never leaves half a file.
:class:`MemoryStore`: the most recent images up to a byte budget (for ``response_format=url``
when no gallery is configured).
"""

from __future__ import annotations

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

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
SCHEMA_VERSION = 1

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
    info TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_created ON images (created DESC, id DESC);
"""


def valid_id(image_id: str) -> bool:
    return bool(ID_PATTERN.fullmatch(image_id))


@dataclass
class GalleryItem:
    """One stored image: its PNG text metadata in ``info``."""

    id: str
    created: float
    method: str
    prompt: str | None
    seed: int | None
    width: int
    height: int
    job: str | None
    info: dict[str, str]

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
            "info": self.info,
        }


def _seed(info: dict[str, str]) -> int | None:
    try:
        return int(info["seed"])
    except (KeyError, ValueError):
        return None


class Gallery:
    """Images persisted in SQLite (``db_path``) with their PNGs in ``db_path.parent/images``."""

    def __init__(self, db_path: str | os.PathLike) -> None:
        self.db_path = Path(db_path)
        self.folder = self.db_path.parent / "images"
        self.folder.mkdir(parents=True, exist_ok=True)
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
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def path(self, image_id: str) -> Path:
        if not valid_id(image_id):
            raise ValueError(f"not an image id: {image_id!r}")
        return self.folder / f"{image_id}.png"

    def put(
        self, png: bytes, info: dict[str, str], size: tuple[int, int], job: str | None = None
    ) -> str:
        """Store a PNG and its metadata; return the new image id."""
        image_id = secrets.token_hex(16)
        path = self.path(image_id)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(png)
        os.replace(tmp, path)
        row = (
            image_id, time.time(), info.get("method", "unknown"), info.get("prompt"),
            _seed(info), size[0], size[1], job, json.dumps(info),
        )  # fmt: skip
        try:
            with self._lock, self._connect() as db:
                db.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return image_id

    def get_png(self, image_id: str) -> bytes | None:
        if not valid_id(image_id):
            return None
        try:
            return self.path(image_id).read_bytes()
        except FileNotFoundError:
            return None

    @staticmethod
    def _item(row: sqlite3.Row) -> GalleryItem:
        return GalleryItem(
            id=row["id"], created=row["created"], method=row["method"], prompt=row["prompt"],
            seed=row["seed"], width=row["width"], height=row["height"], job=row["job"],
            info=json.loads(row["info"]),
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
            gone = db.execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount
        self.path(image_id).unlink(missing_ok=True)
        return bool(gone)


class MemoryStore:
    """The most recent PNGs, at most ``max_bytes`` in all (oldest dropped first)."""

    def __init__(self, max_bytes: int = 64 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(
        self, png: bytes, info: dict[str, str], size: tuple[int, int], job: str | None = None
    ) -> str:
        image_id = secrets.token_hex(16)
        with self._lock:
            self._items[image_id] = png
            self._bytes += len(png)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return image_id

    def get_png(self, image_id: str) -> bytes | None:
        with self._lock:
            return self._items.get(image_id)
