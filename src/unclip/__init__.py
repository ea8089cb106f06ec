"""unclip: a complete, open, trainable implementation of DALL·E 2 (unCLIP).

``import unclip`` stays light: torch and the core modules only; the server, data-building
and evaluation dependencies are imported by the commands that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from unclip.config import Config, ConfigError, DiffusionConfig, TrainConfig
from unclip.hub import from_pretrained, save_pretrained

__all__ = [
    "Config",
    "ConfigError",
    "DiffusionConfig",
    "TrainConfig",
    "__version__",
    "from_pretrained",
    "save_pretrained",
]
