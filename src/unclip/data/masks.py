"""Random inpainting masks for training (GLIDE §4): rectangles and free-form brush strokes.

Masks are ``[N, 1, H, W]`` float tensors with **1 = known pixel, 0 = to paint** (the models'
convention; the pipeline converts user masks, where white/transparent means repaint).
"""

from __future__ import annotations

import math

import torch

__all__ = ["random_box_mask", "random_inpaint_mask", "random_stroke_mask"]


def _rand(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


def random_box_mask(n: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random rectangle per image, covering 10–60% of each side squared."""
    mask = torch.ones(n, 1, size, size)
    r = _rand(generator, n, 4)
    for i in range(n):
        h = max(1, int(size * (0.3 + 0.5 * float(r[i, 0]))))
        w = max(1, int(size * (0.3 + 0.5 * float(r[i, 1]))))
        top = int((size - h) * float(r[i, 2]))
        left = int((size - w) * float(r[i, 3]))
        mask[i, :, top : top + h, left : left + w] = 0
    return mask


def random_stroke_mask(n: int, size: int, generator: torch.Generator | None = None,
                       strokes: int = 3) -> torch.Tensor:  # fmt: skip
    """Free-form masks: a few thick random-walk brush strokes per image."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.float(), xs.float()
    mask = torch.ones(n, 1, size, size)
    for i in range(n):
        r = _rand(generator, strokes, 8, 3)
        for s in range(strokes):
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


def random_inpaint_mask(
    n: int, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Half rectangles, half free-form strokes (chosen per image). -> [N, 1, size, size]."""
    boxes = random_box_mask(n, size, generator)
    strokes = random_stroke_mask(n, size, generator)
    pick = (_rand(generator, n) < 0.5).view(n, 1, 1, 1)
    return torch.where(pick, boxes, strokes)
