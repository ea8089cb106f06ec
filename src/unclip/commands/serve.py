"""``unclip serve``: the OpenAI-compatible Images API and the web page, with uvicorn.

Light at import: FastAPI, uvicorn and the pipeline are imported by :func:`run_serve`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from unclip.commands import add_dtype_argument

if TYPE_CHECKING:
    from fastapi import FastAPI

DEFAULT_PIPELINE = "emoji-small"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "UNCLIP_API_KEY"


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/unclip`` (default ``~/.local/share/unclip``): gallery and PNGs."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "unclip"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible Images API and a web page (http://127.0.0.1:8000)",
        description=(
            "Serve a pipeline over HTTP: POST /v1/images/generations, /edits and /variations "
            "in the shapes of the OpenAI Images API (the official openai client works with "
            "base_url=http://HOST:PORT/v1), progress as server-sent events, and a web page "
            "at / with a gallery kept in DATA_DIR. Bound to 127.0.0.1 unless --host says "
            "otherwise; set an API key before serving beyond this machine."
        ),
    )
    p.add_argument(
        "--pipeline",
        default=DEFAULT_PIPELINE,
        metavar="NAME_OR_PATH",
        help=f"a pipeline folder or a shipped pipeline's name (default: {DEFAULT_PIPELINE})",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--workers", type=int, default=1, help="sampling threads (default 1)")
    p.add_argument(
        "--queue-size", type=int, default=8, help="jobs that may wait; more get 429 (default 8)"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="gallery.sqlite and images/ (default: $XDG_DATA_HOME/unclip)",
    )
    p.add_argument("--no-gallery", action="store_true", help="keep no gallery on disk")
    p.add_argument("--timeout", type=float, default=300.0, help="request timeout in seconds")
    p.add_argument("--max-n", type=int, default=10, help="most images per request (default 10)")
    p.add_argument("--max-steps", type=int, default=250, help="most sampling steps per stage")
    p.add_argument(
        "--max-upload-mb", type=float, default=4.0, help="largest uploaded image, MiB (default 4)"
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    add_dtype_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the sampling networks (the first requests of each "
                   "size wait for compiling; later ones run faster)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run_serve)


def build_app(args: argparse.Namespace) -> FastAPI:
    """The app for parsed ``serve`` arguments (checked first; loads the pipeline)."""
    import torch

    from unclip.server.app import LOOPBACK_HOSTS, Limits, create_app

    for name in ("workers", "queue_size", "max_n", "max_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.timeout > 0 or not args.max_upload_mb > 0:
        raise ValueError("--timeout and --max-upload-mb must be positive")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    limits = Limits(
        max_n=args.max_n,
        max_steps=args.max_steps,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        request_timeout=args.timeout,
    )
    gallery = None
    if not args.no_gallery:
        data = Path(args.data_dir) if args.data_dir else default_data_dir()
        data.mkdir(parents=True, exist_ok=True)
        gallery = data / "gallery.sqlite"
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return create_app(
        args.pipeline,
        workers=args.workers,
        queue_size=args.queue_size,
        limits=limits,
        api_key=key,
        gallery_db=gallery,
        allowed_hosts=LOOPBACK_HOSTS if is_loopback(args.host) else None,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    app = build_app(args)
    server = app.state.unclip
    if server.api_key is None and not is_loopback(args.host):
        print(
            f"unclip serve: warning: listening on {args.host} without an API key; anyone who "
            f"can reach this port can use it (set --api-key or ${API_KEY_ENV})",
            file=sys.stderr,
        )
    where = server.gallery.db_path if server.gallery is not None else "none"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"unclip serve: {server.pipe.name} at http://{host}:{args.port}/ "
        f"(API: http://{host}:{args.port}/v1, gallery: {where})",
        file=sys.stderr,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0
