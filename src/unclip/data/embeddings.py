"""Precomputed CLIP embeddings as ``.npy`` shards aligned by key (the clip-retrieval layout).

    out/
      img_emb/img_emb_0000.npy     float16 [n, D]   L2-normalised image embeddings
      text_emb/text_emb_0000.npy   float16 [n, D]   L2-normalised caption embeddings
      metadata/metadata_0000.jsonl one line per row: {"key", "caption"}
      info.json                    embedding size, count, the CLIP used

Row ``j`` of every file of shard ``i`` describes the same sample. Shards are written file by
file atomically, metadata last, so :func:`compute_embeddings` resumes by skipping the shards
that are whole. The prior and the decoder train from these, so CLIP is not run in their loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from unclip.config import write_text_atomic

__all__ = ["EmbeddingShards", "compute_embeddings", "write_info", "write_shard"]

INFO_NAME = "info.json"


def _shard_paths(out: Path, i: int) -> dict[str, Path]:
    return {
        "img": out / "img_emb" / f"img_emb_{i:04d}.npy",
        "text": out / "text_emb" / f"text_emb_{i:04d}.npy",
        "meta": out / "metadata" / f"metadata_{i:04d}.jsonl",
    }


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(
    out: str | os.PathLike,
    i: int,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    rows: Sequence[dict[str, str]],
) -> None:
    """Write shard ``i`` of the embedding folder ``out``: ``image_emb`` and ``text_emb``
    ``[n, D]`` (stored as float16) and their ``n`` rows ``{"key", "caption"}``."""
    if not len(image_emb) == len(text_emb) == len(rows):
        raise ValueError(
            f"shard {i}: {len(image_emb)} image, {len(text_emb)} text embeddings, {len(rows)} rows"
        )
    paths = _shard_paths(Path(out), i)
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    _save_npy_atomic(paths["img"], np.asarray(image_emb, dtype=np.float16))
    _save_npy_atomic(paths["text"], np.asarray(text_emb, dtype=np.float16))
    lines = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    write_text_atomic(paths["meta"], lines)


def write_info(
    out: str | os.PathLike, count: int, shards: int, dim: int | None, info: dict | None = None
) -> None:
    """Write ``info.json``, which marks the embedding folder ``out`` whole."""
    doc = {"count": count, "shards": shards, "dim": dim, **(info or {})}
    write_text_atomic(Path(out) / INFO_NAME, json.dumps(doc, indent=2) + "\n")


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "key": [b["key"] for b in batch],
        "caption": [b["caption"] for b in batch],
        "image": torch.stack([b["image"] for b in batch]),
    }


@torch.no_grad()
def compute_embeddings(
    dataset: Dataset,
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[Sequence[str]], torch.Tensor],
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    shard_size: int = 10_000,
    num_workers: int = 0,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Embed every sample of ``dataset`` (items ``{"key", "image", "caption"}``) into shards.

    ``encode_image``: images ``[B, 3, H, W]`` in [-1, 1] -> ``[B, D]``; ``encode_text``: list of
    captions -> ``[B, D]`` (both L2-normalised). Returns the number of shards written now
    (whole shards already present are kept: the run resumes). Under ``torchrun`` give each
    process its ``rank``/``world_size``: shard ``i`` is computed by rank ``i % world_size``, and
    rank 0 writes ``info.json`` once every shard is whole.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # write_shard makes the shard folders
    n = len(dataset)  # type: ignore[arg-type]
    n_shards = (n + shard_size - 1) // shard_size
    written = 0
    bar = tqdm(total=n, desc="embed", unit="img", disable=not progress)
    dim = None
    for i in range(n_shards):
        paths = _shard_paths(out, i)
        lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
        if i % world_size != rank:
            continue
        if all(p.exists() for p in paths.values()):
            bar.update(hi - lo)
            continue
        loader = DataLoader(
            Subset(dataset, range(lo, hi)),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        imgs, texts, meta = [], [], []
        for batch in loader:
            imgs.append(encode_image(batch["image"]).float().cpu())
            texts.append(encode_text(batch["caption"]).float().cpu())
            meta.extend(
                {"key": k, "caption": c}
                for k, c in zip(batch["key"], batch["caption"], strict=True)
            )
            bar.update(len(batch["key"]))
        img = torch.cat(imgs).numpy()
        dim = img.shape[1]
        write_shard(out, i, img, torch.cat(texts).numpy(), meta)
        written += 1
    bar.close()
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if rank != 0:
            return written
    if dim is None and n_shards:
        dim = int(np.load(_shard_paths(out, 0)["img"], mmap_mode="r").shape[1])
    write_info(out, n, n_shards, dim, info)
    return written


class EmbeddingShards(Dataset):
    """Read embedding shards: item ``i`` is ``{"key", "caption", "image_emb": [D],
    "text_emb": [D]}`` (float32). ``index_of(key)`` finds a sample's row."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        img_files = sorted((self.folder / "img_emb").glob("img_emb_*.npy"))
        if not img_files:
            raise FileNotFoundError(f"{self.folder}: no embedding shards (img_emb/img_emb_*.npy)")
        imgs, texts, self.keys, self.captions = [], [], [], []
        for img_path in img_files:
            i = int(img_path.stem.rsplit("_", 1)[1])
            paths = _shard_paths(self.folder, i)
            if not (paths["text"].exists() and paths["meta"].exists()):
                raise FileNotFoundError(
                    f"{paths['meta']}: shard {i} is incomplete; run `unclip embed` again to finish"
                )
            imgs.append(np.load(paths["img"], mmap_mode="r"))
            texts.append(np.load(paths["text"], mmap_mode="r"))
            for line in paths["meta"].read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                self.keys.append(row["key"])
                self.captions.append(row["caption"])
            if not (
                len(imgs[-1]) == len(texts[-1]) == len(self.keys) - sum(len(a) for a in imgs[:-1])
            ):
                raise ValueError(f"{paths['img']}: rows of img_emb, text_emb and metadata differ")
        self.image_emb = np.concatenate(imgs) if len(imgs) > 1 else np.asarray(imgs[0])
        self.text_emb = np.concatenate(texts) if len(texts) > 1 else np.asarray(texts[0])
        self._index = {k: j for j, k in enumerate(self.keys)}

    @property
    def dim(self) -> int:
        return int(self.image_emb.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    def index_of(self, key: str) -> int:
        return self._index[key]

    def key(self, i: int) -> str:
        return self.keys[i]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "key": self.keys[i],
            "caption": self.captions[i],
            "image_emb": torch.from_numpy(np.asarray(self.image_emb[i], dtype=np.float32)),
            "text_emb": torch.from_numpy(np.asarray(self.text_emb[i], dtype=np.float32)),
        }
