"""Training inpainting masks (``unclip.data.masks``): batch-wide, on the device, reproducible,
and distributed as the per-image loops they replaced."""

from __future__ import annotations

import math

import pytest
import torch

from unclip.data import masks
from unclip.train.checkpoint import rng_state, seed_everything, set_rng_state

pytestmark = pytest.mark.usefixtures("one_thread")


def loop_stroke_mask(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """The per-image, per-disc loop the batch version replaced (the reference distribution)."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.float(), xs.float()
    mask = torch.ones(n, 1, size, size)
    for i in range(n):
        r = torch.rand(3, 8, 3, generator=g)
        for s in range(3):
            y, x = float(r[s, 0, 0]) * size, float(r[s, 0, 1]) * size
            radius = size * (0.05 + 0.07 * float(r[s, 0, 2]))
            for k in range(1, 8):
                angle = float(r[s, k, 0]) * 2 * math.pi
                length = size * (0.05 + 0.15 * float(r[s, k, 1]))
                for f in torch.linspace(0, 1, 6):
                    cy = y + float(f) * length * math.sin(angle)
                    cx = x + float(f) * length * math.cos(angle)
                    mask[i, 0][(ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2] = 0
                y = min(max(y + length * math.sin(angle), 0.0), size - 1.0)
                x = min(max(x + length * math.cos(angle), 0.0), size - 1.0)
    return mask


def test_box_masks_are_one_rectangle_of_30_to_80_percent_per_side() -> None:
    size = 20
    m = masks.random_box_mask(200, size, torch.Generator().manual_seed(0))
    assert m.shape == (200, 1, size, size) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, 1.0}
    hole = m[:, 0] == 0  # [N, S, S]
    rows, cols = hole.any(2), hole.any(1)  # [N, S] each
    h, w = rows.sum(1), cols.sum(1)
    # a rectangle: the painted pixels are exactly rows × cols
    assert torch.equal(hole, rows[:, :, None] & cols[:, None, :])
    lo, hi = (int(size * b) for b in masks.BOX_SIDE)
    assert int(h.min()) >= lo and int(h.max()) <= hi and int(w.min()) >= lo
    assert int(w.max()) <= hi
    assert int(h.max()) - int(h.min()) >= (hi - lo) // 2  # the sizes spread over the range


def test_stroke_masks_match_the_loop_in_distribution() -> None:
    """Painted share per image: mean and spread of 300 batch masks against 300 from the old
    per-image loop (different draws of the same distribution: a tolerance, not equality)."""
    size, n = 16, 300
    new = 1 - masks.random_stroke_mask(n, size, torch.Generator().manual_seed(1)).mean((1, 2, 3))
    old = 1 - loop_stroke_mask(n, size, torch.Generator().manual_seed(2)).mean((1, 2, 3))
    assert float(new.mean()) == pytest.approx(float(old.mean()), abs=0.02)
    assert float(new.std()) == pytest.approx(float(old.std()), abs=0.02)
    assert 0.1 < float(new.mean()) < 0.9  # strokes paint a real share, never all of it


def test_stroke_mask_chunks_give_the_same_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = masks.random_stroke_mask(5, 12, torch.Generator().manual_seed(3))
    monkeypatch.setattr(masks, "_CHUNK", 5 * 12 * 12 * 7)  # 7 discs at a time
    assert torch.equal(masks.random_stroke_mask(5, 12, torch.Generator().manual_seed(3)), whole)


def test_training_mask_inpaints_a_share_with_both_kinds() -> None:
    n, size = 400, 16
    m = masks.training_inpaint_mask(n, size, 0.3, torch.Generator().manual_seed(0))
    assert m.shape == (n, 1, size, size)
    used = m.flatten(1).any(1)  # plain-generation samples know no pixel
    assert 0.22 < float(used.float().mean()) < 0.38
    inpainted = m[used, 0]
    is_box = torch.tensor([
        torch.equal(h, h.any(1)[:, None] & h.any(0)[None, :]) for h in inpainted == 0
    ])  # fmt: skip
    assert 0.3 < float(is_box.float().mean()) < 0.7  # boxes and strokes, half each
    assert not masks.training_inpaint_mask(8, size, 0.0).any()
    assert masks.training_inpaint_mask(8, size, 1.0).flatten(1).any(1).all()


def test_training_mask_is_reproducible_and_resumes_from_the_saved_rngs() -> None:
    """Drawn from the global RNGs a checkpoint saves: the same seed, or the same restored
    state, gives the same masks."""
    seed_everything(5)
    first = masks.training_inpaint_mask(32, 16, 0.5)
    state = rng_state()
    second = masks.training_inpaint_mask(32, 16, 0.5)
    seed_everything(5)
    assert torch.equal(masks.training_inpaint_mask(32, 16, 0.5), first)
    set_rng_state(state)
    assert torch.equal(masks.training_inpaint_mask(32, 16, 0.5), second)
    assert not torch.equal(first, second)


def test_inpaint_mask_mixes_boxes_and_strokes() -> None:
    m = masks.training_inpaint_mask(64, 16, 1.0, torch.Generator().manual_seed(0))
    assert m.shape == (64, 1, 16, 16) and (m == 0).flatten(1).any(1).all()
    hole = m[:, 0] == 0  # [N, S, S]
    box = hole.any(2)[:, :, None] & hole.any(1)[:, None, :]  # each hole's bounding box
    boxes = int((hole == box).flatten(1).all(1).sum())  # holes that fill their bounding box
    assert 16 <= boxes <= 48  # about STROKE_SHARE = 1/2 of them strokes
