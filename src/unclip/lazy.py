"""Package attributes imported on first use (PEP 562), so importing a package loads no torch.

A package lists each public name and the module that defines it, then takes the module-level
``__getattr__`` and ``__dir__`` this makes::

    __getattr__, __dir__ = lazy_exports(globals(), {"load_pipeline": "unclip.pipeline.loading"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the module whose globals are ``namespace``: a name of
    ``names`` (name -> module path) is imported at its first use and kept in ``namespace``;
    any other missing name raises ``AttributeError`` as usual."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
