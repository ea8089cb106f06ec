"""Group labels from a shard folder's manifest, and sample weights that give each group an
equal share of training.

The emoji set is lopsided: almost half of its training images are the five skin-tone
variants of a person or hand emoji, so a uniform draw spends most steps on people. Weighting
every sample by ``1 / (size of its group)``, with the group named by manifest fields (e.g.
``concept`` and ``style``), makes the five variants of one emoji in one style count as one
image while every other image keeps its weight.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

MANIFEST_NAME = "manifest.jsonl"


def manifest_labels(
    keys: Iterable[str], records: Iterable[dict], fields: Sequence[str], where: str
) -> list[int]:
    """One integer per key naming the joint value of ``fields`` in its manifest record.

    ``where`` starts the error raised (a ``ValueError``) when a key has no record or its
    record lacks a field.
    """
    by_key = {r["key"]: r for r in records if "key" in r}
    ids: dict[tuple, int] = {}
    out = []
    for key in keys:
        record = by_key.get(key)
        if record is None:
            raise ValueError(f"{where}: sample {key!r} is not in the manifest")
        missing = [f for f in fields if record.get(f) is None]
        if missing:
            raise ValueError(f"{where}: sample {key!r} has no {missing[0]!r} in the manifest")
        value = tuple(str(record[f]) for f in fields)
        out.append(ids.setdefault(value, len(ids)))
    return out


def balance_weights(labels: Sequence[int]) -> list[float]:
    """``1 / count(label)`` per sample: every label gets the same total weight."""
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


def group_weights(
    data_path: str | os.PathLike, keys: Sequence[str], fields: Sequence[str], where: str
) -> list[float] | None:
    """Weights for the samples ``keys`` of the data set at ``data_path`` balanced over the
    manifest ``fields`` (None when ``fields`` is empty: a uniform draw)."""
    from unclip.config import ConfigError
    from unclip.data.shards import read_manifest

    if not fields:
        return None
    manifest = Path(data_path) / MANIFEST_NAME
    if not manifest.exists():
        raise ConfigError(
            f"{where}: data.balance needs a {MANIFEST_NAME} in data.path ({manifest})"
        )
    try:
        labels = manifest_labels(keys, read_manifest(manifest), fields, f"{where}: data.balance")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return balance_weights(labels)
