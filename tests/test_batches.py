"""Resumable batch streams: plain epochs and epochs of hard-negative runs (EpochBatches)."""

from __future__ import annotations

import itertools

import pytest

from unclip.train.batches import EpochBatches

LABELS = [(i * 7) % 23 for i in range(230)]  # 23 labels, 10 samples each, interleaved


def _runs(order: list[int], labels: list[int]) -> list[int]:
    """Lengths of the maximal runs of equal labels along ``order``."""
    return [len(list(g)) for _, g in itertools.groupby(labels[i] for i in order)]


@pytest.mark.parametrize("k", [2, 4])
def test_grouped_epochs_are_runs_of_one_label_and_see_every_sample_once(k):
    data = list(range(len(LABELS)))
    batches = EpochBatches(data, 10, groups=LABELS, group_run=k)
    for epoch in range(3):
        order = [i for b in batches.epoch_batches(epoch) for i in b]
        assert sorted(order) == data  # 230 = 23 batches of 10: nothing dropped
        runs = _runs(order, LABELS)
        # Runs of k (or the remainder, 10 % k), except where two runs of a label happen to meet.
        assert sum(runs) == len(data)
        assert min(runs) >= min(k, 10 % k or k)
        assert sum(r >= k for r in runs) >= len(data) // k * 0.8
    # Epochs differ, and the same (seed, epoch) gives the same order.
    assert batches.epoch_batches(0) != batches.epoch_batches(1)
    again = EpochBatches(data, 10, groups=LABELS, group_run=k)
    assert again.epoch_batches(2) == batches.epoch_batches(2)


def test_plain_epochs_rarely_hold_runs():
    data = list(range(len(LABELS)))
    order = [i for b in EpochBatches(data, 10, groups=LABELS).epoch_batches(0) for i in b]
    runs = _runs(order, LABELS)
    assert max(runs) <= 3 and sum(r >= 2 for r in runs) < 30


def test_grouped_batches_resume_at_the_same_position():
    data = list(range(len(LABELS)))
    straight = EpochBatches(data, 10, groups=LABELS, group_run=3, collate_fn=list)
    seen = list(itertools.islice(iter(straight), 30))
    first = EpochBatches(data, 10, groups=LABELS, group_run=3, collate_fn=list)
    part = list(itertools.islice(iter(first), 17))
    resumed = EpochBatches(data, 10, groups=LABELS, group_run=3, collate_fn=list)
    resumed.load_state_dict(first.state_dict())
    assert part + list(itertools.islice(iter(resumed), 13)) == seen


def test_group_errors_name_the_problem():
    with pytest.raises(ValueError, match="3 group labels for a data set of 4"):
        EpochBatches([0, 1, 2, 3], 2, groups=[0, 0, 1], group_run=2)
    with pytest.raises(ValueError, match="group_run must be at least 1"):
        EpochBatches([0, 1, 2, 3], 2, groups=[0, 0, 1, 1], group_run=0)


def test_weighted_epochs_draw_by_weight_and_resume():
    """Nine samples of one group at 1/9 each and one alone at 1: the lone sample is half of
    every draw; a zero weight is never drawn; the order is fixed by (seed, epoch)."""
    data = list(range(11))
    weights = [1 / 9] * 9 + [1.0, 0.0]
    batches = EpochBatches(data, 11, weights=weights)
    drawn = [i for epoch in range(200) for b in batches.epoch_batches(epoch) for i in b]
    assert len(drawn) == 200 * 11
    assert 10 not in drawn
    assert 0.45 < drawn.count(9) / len(drawn) < 0.55
    assert all(drawn.count(i) > 0 for i in range(9))
    assert batches.epoch_batches(3) == EpochBatches(data, 11, weights=weights).epoch_batches(3)
    assert batches.epoch_batches(3) != batches.epoch_batches(4)

    straight = EpochBatches(data, 2, weights=weights, collate_fn=list)
    seen = list(itertools.islice(iter(straight), 12))
    first = EpochBatches(data, 2, weights=weights, collate_fn=list)
    part = list(itertools.islice(iter(first), 7))
    resumed = EpochBatches(data, 2, weights=weights, collate_fn=list)
    resumed.load_state_dict(first.state_dict())
    assert part + list(itertools.islice(iter(resumed), 5)) == seen


def test_weight_errors_name_the_problem():
    with pytest.raises(ValueError, match="3 sample weights for a data set of 4"):
        EpochBatches([0, 1, 2, 3], 2, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="finite and non-negative"):
        EpochBatches([0, 1, 2, 3], 2, weights=[1, -1, 1, 1])
    with pytest.raises(ValueError, match="all zero"):
        EpochBatches([0, 1, 2, 3], 2, weights=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="cannot be combined"):
        EpochBatches([0, 1, 2, 3], 2, weights=[1, 1, 1, 1], groups=[0, 0, 1, 1], group_run=2)
