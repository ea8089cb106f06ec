"""Training: one loop for every stage, EMA, atomic checkpoints, resumable data order.

``import unclip.train`` (and so ``unclip train STAGE --help``, whose stage module sits in this
package) loads no torch: the loop's names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names loaded on first use, for type checkers and editors
    from unclip.train.loop import Trainer, TrainingDiverged, TrainResult

__all__ = ["TrainResult", "Trainer", "TrainingDiverged"]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'unclip.train' has no attribute {name!r}")
    from unclip.train import loop

    value = getattr(loop, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
