"""The unclip HTTP server: an OpenAI-compatible Images API and a browser page.

- :mod:`.app`: :func:`create_app` (FastAPI): wires the state, the middleware and the routes;
- :mod:`.routes_images`, :mod:`.routes_jobs`, :mod:`.routes_gallery`: the route handlers;
- :mod:`.schemas`: the request models; :mod:`.bodies`: body parsing and the checks of a
  request;
- :mod:`.responses`: jobs made from requests, and the JSON answers built from them;
- :mod:`.streaming`: streamed requests (OpenAI's image stream events, partial images);
- :mod:`.usage`: the ``usage`` object (what a request's networks read and sampled);
- :mod:`.state`: the per-app state the handlers read (``request.app.state.unclip``);
- :mod:`.guard`: the Host/Origin checks and body limits in front of every route;
- :mod:`.auth`: the API key; :mod:`.openapi`: what the OpenAPI document says by hand;
- :mod:`.jobs`: a bounded job queue served by worker threads, with progress events;
- :mod:`.gallery`: the SQLite gallery (image files on disk) and the in-memory image store;
- :mod:`.uploads`: checked decoding of uploaded images, encoding of PNG, JPEG and WebP;
- :mod:`.jsonbody`: JSON bodies parsed with limits (depth, keys, strings, numbers);
- :mod:`.limits`: :class:`Limits` and the defaults of ``unclip serve`` (no FastAPI);
- :mod:`.errors`: OpenAI-style error objects.

Started by ``unclip serve``. Needs the ``server`` extra (fastapi, uvicorn,
python-multipart); ``import unclip`` never imports this package.
"""

from __future__ import annotations

from unclip.lazy import lazy_exports

__all__ = ["Limits", "create_app"]

__getattr__, __dir__ = lazy_exports(globals(), dict.fromkeys(__all__, "unclip.server.app"))
