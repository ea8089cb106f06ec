"""The unclip HTTP server: an OpenAI-compatible Images API and a browser page.

- :mod:`.app`: :func:`create_app` (FastAPI), the routes, the request limits;
- :mod:`.jobs`: a bounded job queue served by worker threads, with progress events;
- :mod:`.gallery`: the SQLite gallery (PNGs on disk) and the in-memory image store;
- :mod:`.uploads`: checked decoding of uploaded images, PNG encoding;
- :mod:`.jsonbody`: JSON bodies parsed with limits (depth, keys, strings, numbers);
- :mod:`.limits`: :class:`Limits` and the defaults of ``unclip serve`` (no FastAPI);
- :mod:`.errors`: OpenAI-style error objects.

Started by ``unclip serve``. Needs the ``server`` extra (fastapi, uvicorn,
python-multipart); ``import unclip`` never imports this package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Limits", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from unclip.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'unclip.server' has no attribute {name!r}")
