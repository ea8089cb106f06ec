"""Random inpainting masks for training (GLIDE §4): rectangles and free-form brush strokes.

Masks are ``[N, 1, H, W]`` float tensors with **1 = known pixel, 0 = to paint** (the models'
convention; the pipeline converts user masks, where white/transparent means repaint).

Every function draws a whole batch with tensor operations on ``device`` (no loop over the
images), from ``generator`` when one is given (drawn on the generator's device, then moved, as
:func:`unclip.diffusion.gaussian.randn` does) or else from the global RNG of ``device``: the
RNGs a training checkpoint saves, so a resumed run draws the same masks.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BOX_SIDE",
    "STROKES",
    "STROKE_SHARE",
    "random_box_mask",
    "random_stroke_mask",
    "training_inpaint_mask",
]

#: a box's height and width, each uniform in this range of the image's side
BOX_SIDE = (0.3, 0.8)
#: brush strokes per stroke mask, random-walk segments per stroke, discs stamped per segment
STROKES, SEGMENTS, DISCS = 3, 7, 6
#: a stroke's radius and a segment's length, uniform in these ranges of the image's side
STROKE_RADIUS = (0.05, 0.12)
SEGMENT_LENGTH = (0.05, 0.20)
#: the share of inpainted images that get strokes (the others get a box)
STROKE_SHARE = 0.5
#: disc tests (images × discs × pixels) computed at once; bounds the memory of a stroke mask
_CHUNK = 1 << 23


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _uniform(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def random_box_mask(
    n: int,
    size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One rectangle per image, height and width each ``BOX_SIDE`` (30–80%) of the side, at a
    uniform position: -> [N, 1, size, size], 0 inside the rectangle."""
    device = torch.device(device or "cpu")
    r = _rand((n, 4), generator, device)  # [N, 4]: height, width, top, left
    h = (size * _uniform(r[:, 0], BOX_SIDE)).floor().clamp(min=1)  # [N]
    w = (size * _uniform(r[:, 1], BOX_SIDE)).floor().clamp(min=1)
    top = ((size - h) * r[:, 2]).floor()
    left = ((size - w) * r[:, 3]).floor()
    pos = torch.arange(size, device=device, dtype=r.dtype)  # [S]
    rows = (pos >= top[:, None]) & (pos < (top + h)[:, None])  # [N, S]
    cols = (pos >= left[:, None]) & (pos < (left + w)[:, None])
    inside = rows[:, :, None] & cols[:, None, :]  # [N, S, S]
    return (~inside).float()[:, None]


def random_stroke_mask(
    n: int,
    size: int,
    generator: torch.Generator | None = None,
    strokes: int = STROKES,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Free-form masks: ``strokes`` thick random-walk brush strokes per image -> [N, 1, S, S].

    A stroke starts at a uniform point with a radius in ``STROKE_RADIUS`` and walks
    ``SEGMENTS`` (7) segments of uniform direction and a length in ``SEGMENT_LENGTH``, each
    clamped to the image at its end; ``DISCS`` (6) discs of the stroke's radius are stamped
    evenly along each segment (closer than the radius, so they join into a thick line)."""
    device = torch.device(device or "cpu")
    r = _rand((n, strokes, SEGMENTS + 1, 3), generator, device)  # [N, K, 1+7, 3]
    y, x = r[:, :, 0, 0] * size, r[:, :, 0, 1] * size  # [N, K] start points
    radius = size * _uniform(r[:, :, 0, 2], STROKE_RADIUS)  # [N, K]
    angle = r[:, :, 1:, 0] * (2 * math.pi)  # [N, K, 7]
    length = size * _uniform(r[:, :, 1:, 1], SEGMENT_LENGTH)
    dy, dx = length * torch.sin(angle), length * torch.cos(angle)  # [N, K, 7]
    sy, sx = [], []
    for k in range(SEGMENTS):  # the walk: each segment starts where the last one ended, clamped
        sy.append(y)
        sx.append(x)
        y = (y + dy[:, :, k]).clamp(0.0, size - 1.0)
        x = (x + dx[:, :, k]).clamp(0.0, size - 1.0)
    f = torch.linspace(0, 1, DISCS, device=device)  # [P]
    cy = (torch.stack(sy, -1)[..., None] + f * dy[..., None]).reshape(n, -1)  # [N, K·7·P]
    cx = (torch.stack(sx, -1)[..., None] + f * dx[..., None]).reshape(n, -1)
    r2 = (radius**2)[:, :, None].expand(n, strokes, SEGMENTS * DISCS).reshape(n, -1)
    pos = torch.arange(size, device=device, dtype=cy.dtype)  # [S]
    painted = torch.zeros(n, size, size, dtype=torch.bool, device=device)
    step = max(1, _CHUNK // max(1, n * size * size))
    for c in range(0, cy.shape[1], step):  # discs in chunks: [N, C, S, S] at a time
        d2y = (pos - cy[:, c : c + step, None]) ** 2  # [N, C, S]
        d2x = (pos - cx[:, c : c + step, None]) ** 2
        d2 = d2y[:, :, :, None] + d2x[:, :, None, :]  # [N, C, S, S]
        painted |= (d2 <= r2[:, c : c + step, None, None]).any(dim=1)
    return (~painted).float()[:, None]


def training_inpaint_mask(
    n: int,
    size: int,
    prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The decoder's ``inpaint_mask`` for a training batch: each image is inpainted with
    probability ``prob``, with strokes (probability ``STROKE_SHARE``) or a box; the others get
    an all-zero mask (nothing known: plain generation). -> [N, 1, size, size] on ``device``.

    Masks are drawn only for the inpainted images. How many (and how many of them get strokes)
    is a coin per image drawn on the host (``generator``'s device, else the CPU's global RNG);
    which images is a random permutation drawn on ``device``: the same joint distribution as a
    coin per image, with no copy between host and device. With a CUDA ``generator`` the counts
    are read back from it (one synchronisation)."""
    device = torch.device(device or "cpu")
    coin_device = generator.device if generator is not None else torch.device("cpu")
    coins = torch.rand(n, 2, generator=generator, device=coin_device)  # [N, 2]
    inpainted = int((coins[:, 0] < prob).sum())
    with_strokes = int((coins[:inpainted, 1] < STROKE_SHARE).sum())
    mask = torch.zeros(n, 1, size, size, device=device)
    if inpainted == 0:
        return mask
    perm_device = generator.device if generator is not None else device
    chosen = torch.randperm(n, generator=generator, device=perm_device)[:inpainted].to(device)
    if with_strokes:
        mask[chosen[:with_strokes]] = random_stroke_mask(
            with_strokes, size, generator, device=device
        )
    if with_strokes < inpainted:
        mask[chosen[with_strokes:]] = random_box_mask(
            inpainted - with_strokes, size, generator, device
        )
    return mask
