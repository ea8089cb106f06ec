"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio * lr``.

A pure function of the step, so a resumed run needs no scheduler state beyond the step.
"""

from __future__ import annotations

import math


def lr_at(
    step: int, *, lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
