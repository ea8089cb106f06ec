"""Training: one loop for every stage, EMA, atomic checkpoints, resumable data order.

``import unclip.train`` (and so ``unclip train STAGE --help``, whose stage module sits in this
package) loads no torch: the loop's names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unclip.lazy import lazy_exports

if TYPE_CHECKING:  # the names loaded on first use, for type checkers and editors
    from unclip.train.loop import Trainer, TrainingDiverged, TrainResult

__all__ = ["TrainResult", "Trainer", "TrainingDiverged"]


__getattr__, __dir__ = lazy_exports(globals(), dict.fromkeys(__all__, "unclip.train.loop"))
