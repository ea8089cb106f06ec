"""unclip: a complete, open, trainable implementation of DALL·E 2 (unCLIP).

``import unclip`` stays light: the configs only, no torch (so ``unclip --help`` starts fast);
the hub, the pipeline and the models load on first use of a name that needs them, and the
server, data-building and evaluation dependencies are imported by the commands that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from unclip.config import Config, ConfigError, DiffusionConfig, TrainConfig
from unclip.lazy import lazy_exports

if TYPE_CHECKING:  # the names loaded on first use (_LAZY), for type checkers and editors
    from unclip.hub import from_pretrained, save_pretrained
    from unclip.pipeline import UnclipPipeline, load_pipeline

__all__ = [
    "Config",
    "ConfigError",
    "DiffusionConfig",
    "TrainConfig",
    "UnclipPipeline",
    "__version__",
    "from_pretrained",
    "load_pipeline",
    "save_pretrained",
]

# Imported on first use, so ``import unclip`` loads neither torch nor the model packages.
_LAZY = {
    "from_pretrained": "unclip.hub",
    "save_pretrained": "unclip.hub",
    "load_pipeline": "unclip.pipeline",
    "UnclipPipeline": "unclip.pipeline",
}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
