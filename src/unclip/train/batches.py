"""Resumable batch streams: the data position is part of a checkpoint.

The training loop reads micro-batches from a *batch source*: an iterable of batches with
``state_dict()`` / ``load_state_dict()`` describing how far it has got. :class:`EpochBatches`
is the source for map-style data sets: each epoch is a permutation drawn from
``(seed, epoch)`` alone, so a resumed run skips exactly the batches already consumed (by
index, without loading them) and then sees the same order as an uninterrupted run.

A data set may draw random augmentations from the global RNGs (torch, numpy, ``random``). In
the training process (``num_workers`` 0) those are the trainer's generators, saved in every
checkpoint. In loader workers, whose generators no checkpoint holds, each sample's draws are
seeded from ``(seed, epoch, rank, position in the epoch)`` alone (:class:`SeededSamples`), so a
resumed run draws what an uninterrupted one drew, whichever worker loads the sample.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class BatchSource(Protocol):
    """What the trainer reads micro-batches from: endless batches and their position."""

    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _generator(seed: int, epoch: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + salt) % (2**63))
    return g


class SeededSamples(Dataset):
    """``dataset`` for loader workers: item ``(i, seed)`` is ``dataset[i]`` drawn after seeding
    the worker's torch, numpy and ``random`` generators with ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        return self.dataset[index]


class _Schedule:
    """The ``batch_sampler`` of :meth:`EpochBatches.__iter__`: its batches from a position on."""

    def __init__(self, source: EpochBatches, epoch: int, done: int) -> None:
        self.source, self.epoch, self.done = source, epoch, done

    def __iter__(self) -> Iterator[list[Any]]:
        return self.source._schedule(self.epoch, self.done)


@dataclass(eq=False)
class EpochBatches:
    """Endless micro-batches of a map-style ``dataset``, reshuffled every epoch, resumable.

    ``rank``/``world_size`` give each process a disjoint slice of every epoch's permutation
    (the last incomplete micro-batch of an epoch is dropped so shapes never change).

    ``groups`` (one label per sample, e.g. the emoji concept) with ``group_run`` = k > 1 makes
    batches of *hard negatives*: each epoch's order is built from runs of up to k shuffled
    samples sharing a label, the runs themselves shuffled, so a batch of B holds about B/k
    labels with k samples each (for CLIP: one emoji in k art styles, which only the style
    word tells apart). Every sample is still seen once per epoch.

    ``weights`` (one non-negative number per sample) makes each epoch ``len(dataset)`` draws
    with replacement, sample i with probability proportional to ``weights[i]``, instead of a
    permutation (see :mod:`unclip.data.balance`); it excludes ``group_run`` > 1.

    ``pin_memory``: collate into page-locked memory, for asynchronous copies to a GPU.
    """

    dataset: Dataset = field(repr=False)
    batch_size: int
    _: KW_ONLY
    seed: int = 0
    shuffle: bool = True
    collate_fn: Callable | None = None
    num_workers: int = 0
    rank: int = 0
    world_size: int = 1
    groups: Sequence[int] | None = None
    group_run: int = 1
    weights: Sequence[float] | None = None
    pin_memory: bool = False
    #: the position: the epoch being read and how many of its micro-batches are consumed
    epoch: int = field(default=0, init=False)
    batches_done: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.group_run < 1:
            raise ValueError(f"group_run must be at least 1, not {self.group_run}")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"{len(self.groups)} group labels for a data set of {n} samples")
        self._labels = torch.as_tensor(list(self.groups)) if self.groups is not None else None
        self._weights = None
        if self.weights is not None:
            if len(self.weights) != n:
                raise ValueError(
                    f"{len(self.weights)} sample weights for a data set of {n} samples"
                )
            self._weights = torch.as_tensor(list(self.weights), dtype=torch.float64)
            if not torch.isfinite(self._weights).all() or (self._weights < 0).any():
                raise ValueError("sample weights must be finite and non-negative")
            if self._weights.sum() <= 0:
                raise ValueError("sample weights are all zero")
            if self.group_run > 1:
                raise ValueError("sample weights and group_run > 1 cannot be combined")
        self.batches_per_epoch = n // (self.batch_size * self.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the data set has {n} samples, fewer than one batch of "
                f"{self.batch_size * self.world_size}; use a smaller batch_size or more data"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for ``epoch``."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self._weights is not None:
            order = torch.multinomial(
                self._weights, n, replacement=True, generator=_generator(self.seed, epoch, 4)
            )
        elif self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, epoch, 1))
        else:
            order = torch.arange(n)
        if self._labels is not None and self.group_run > 1:
            order = self._grouped(order, _generator(self.seed, epoch, 3))
        per_step = self.batch_size * self.world_size
        batches = []
        for b in range(self.batches_per_epoch):
            chunk = order[b * per_step : (b + 1) * per_step]
            batches.append(
                chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            )
        return batches

    def _grouped(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Reorder a permutation into shuffled runs of up to ``group_run`` same-label samples."""
        assert self._labels is not None
        labels = self._labels[order]
        # A stable sort keeps each label's samples in their shuffled order.
        by_label = order[torch.sort(labels, stable=True).indices]
        sorted_labels = self._labels[by_label]
        starts = torch.ones_like(sorted_labels, dtype=torch.bool)
        starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
        first = torch.cummax(torch.where(starts, torch.arange(len(by_label)), 0), 0).values
        # Rank within the label -> run number; a run's key is (label start, run number).
        run_id = first + (torch.arange(len(by_label)) - first) // self.group_run
        runs = torch.unique(run_id)
        shuffled = runs[torch.randperm(len(runs), generator=generator)]
        position = torch.empty(int(run_id.max()) + 1, dtype=torch.long)
        position[shuffled] = torch.arange(len(shuffled))
        return by_label[torch.sort(position[run_id], stable=True).indices]

    def _seeded(self, epoch: int, batches: list[list[int]]) -> list[list[tuple[int, int]]]:
        """``batches`` with each sample's seed: a function of (seed, epoch, rank, position)."""
        base = int(torch.randint(2**62, (), generator=_generator(self.seed, epoch, 5)))
        base += self.rank * 2**40  # each rank's samples are seeded differently
        return [
            [(i, (base + b * self.batch_size + k) % 2**63) for k, i in enumerate(batch)]
            for b, batch in enumerate(batches)
        ]

    def _schedule(self, epoch: int, done: int) -> Iterator[list[Any]]:
        """Micro-batches of indices from batch ``done`` of ``epoch`` on, epoch after epoch."""
        while True:
            batches: list[Any] = self.epoch_batches(epoch)
            if self.num_workers > 0:  # see the module docstring
                batches = self._seeded(epoch, batches)
            yield from batches[done:]
            epoch, done = epoch + 1, 0

    def __iter__(self) -> Iterator[Any]:
        # One loader for the whole run, so its workers and their prefetched batches carry on
        # across epochs (a loader per epoch restarts every worker and stalls a GPU each time).
        # The position advances as batches are *consumed*, not as the workers read ahead.
        start = (self.epoch, self.batches_done)
        loader = DataLoader(
            SeededSamples(self.dataset) if self.num_workers > 0 else self.dataset,
            batch_sampler=_Schedule(self, *start),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            # Its own generator: building a loader must not draw from the global RNG,
            # or a resumed run would diverge from an uninterrupted one.
            generator=_generator(self.seed, self.epoch, 2),
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        for batch in loader:
            self.batches_done += 1
            if self.batches_done >= self.batches_per_epoch:
                self.epoch, self.batches_done = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
