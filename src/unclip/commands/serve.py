"""``unclip serve``: the OpenAI-compatible Images API and the web page, with uvicorn.

Light at import: FastAPI, uvicorn and the pipeline are imported by :func:`run_serve`, after
it has checked that the ``server`` extra is installed and that the access settings make
sense (a non-loopback address needs an API key, or an explicit ``--no-auth``).
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from unclip.commands import add_command, add_dtype_argument
from unclip.server.limits import (
    ANY_IP_HOST,
    DEFAULT_GALLERY_MAX_DAYS,
    DEFAULT_GALLERY_MAX_MB,
    DEFAULT_LIMITS,
    DEFAULT_QUEUE_SIZE,
    LOOPBACK_HOSTS,
    Limits,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

DEFAULT_PIPELINE = "emoji-small"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "UNCLIP_API_KEY"
#: what the ``server`` extra installs: (distribution, the module names it may provide)
SERVER_MODULES = (
    ("fastapi", ("fastapi",)),
    ("uvicorn", ("uvicorn",)),
    ("python-multipart", ("python_multipart", "multipart")),
)
SERVER_EXTRA = "pip install 'unclip[server]'"
#: the ``limits`` flags: flag -> (the :class:`Limits` field it sets, its type, what it limits);
#: a field in bytes is given in MiB
LIMIT_FLAGS: dict[str, tuple[str, type, str]] = {
    "--timeout": ("request_timeout", float, "request timeout in seconds"),
    "--max-n": ("max_n", int, "most images per request"),
    "--max-steps": ("max_steps", int, "most sampling steps per stage"),
    "--max-upload-mb": ("max_upload_bytes", float, "largest uploaded image, MiB"),
}


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


def missing_server_modules() -> list[str]:
    """The distributions of the ``server`` extra that are not installed (none imported)."""
    return [
        dist
        for dist, modules in SERVER_MODULES
        if all(importlib.util.find_spec(m) is None for m in modules)
    ]


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "serve",
        run_serve,
        description=(
            "Serve a pipeline over HTTP: POST /v1/images/generations, /edits and /variations "
            "in the shapes of the OpenAI Images API (the official openai client works with "
            "base_url=http://HOST:PORT/v1; output formats, usage, streamed partial images), "
            "/mix and /interpolations, progress as server-sent events, and a web page "
            "at / with a gallery kept in DATA_DIR. Bound to 127.0.0.1 unless --host says "
            f"otherwise; any other address needs an API key (${API_KEY_ENV} or "
            "--api-key-file) or an explicit --no-auth. Needs the server extra: "
            f"{SERVER_EXTRA}."
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
        "--queue-size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        help=f"jobs that may wait; more get 429 (default {DEFAULT_QUEUE_SIZE})",
    )
    access = p.add_argument_group("access")
    access.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require 'Authorization: Bearer KEY' on /v1 routes, KEY being this file's "
        f"content (default: ${API_KEY_ENV}, if set)",
    )
    access.add_argument(
        "--api-key",
        metavar="KEY",
        help="the key itself (works, but other users of this machine see it in 'ps': "
        f"prefer --api-key-file or ${API_KEY_ENV})",
    )
    access.add_argument(
        "--no-auth",
        action="store_true",
        help="serve a non-loopback --host without an API key: anyone who can reach the port "
        "can use the server",
    )
    access.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web site (https://host[:port]) whose pages may call the API (POST/DELETE, "
        "with CORS); repeatable. By default only the server's own page may",
    )
    access.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="off loopback, a host name clients may reach the server by (the Host header); "
        "repeatable; IP addresses are always accepted; '*': any name (no DNS-rebinding "
        "defence)",
    )
    gallery = p.add_argument_group("gallery")
    gallery.add_argument(
        "--data-dir",
        metavar="DIR",
        help="gallery.sqlite and images/ (default: $XDG_DATA_HOME/unclip)",
    )
    gallery.add_argument("--no-gallery", action="store_true", help="keep no gallery on disk")
    gallery.add_argument(
        "--gallery-max-mb",
        type=float,
        default=DEFAULT_GALLERY_MAX_MB,
        metavar="MB",
        help="the gallery's image files take at most this many MiB; the oldest go first "
        f"(default {DEFAULT_GALLERY_MAX_MB})",
    )
    gallery.add_argument(
        "--gallery-max-days",
        type=float,
        default=DEFAULT_GALLERY_MAX_DAYS,
        metavar="DAYS",
        help=f"drop gallery images older than this; 0: never (default {DEFAULT_GALLERY_MAX_DAYS})",
    )
    gallery.add_argument(
        "--gallery-keep-b64",
        action="store_true",
        help="store b64_json results in the gallery too (by default only url results, "
        "which the web page asks for, are stored)",
    )
    limits = p.add_argument_group("limits")
    for flag, (field, kind, text) in LIMIT_FLAGS.items():
        default = kind(getattr(DEFAULT_LIMITS, field) / _unit(field))
        limits.add_argument(flag, type=kind, default=default, help=f"{text} (default {default:g})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    add_dtype_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the sampling networks (the first requests of each "
                   "size wait for compiling; later ones run faster)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def _checked_key(key: str, source: str) -> str:
    if not key:
        raise ValueError(f"{source}: the API key is empty")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"{source}: the API key must be printable ASCII without spaces")
    return key


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """The API key from ``--api-key-file``, ``--api-key`` or ``$UNCLIP_API_KEY`` (in that
    order; the first two together are an error), checked against ``--host`` and
    ``--no-auth``: a non-loopback address without a key is refused unless ``--no-auth``.
    Prints what ``--api-key`` and ``--no-auth`` imply. ValueError/OSError: one line."""
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    key: str | None
    if args.api_key_file is not None:
        text = Path(args.api_key_file).read_text(encoding="utf-8")
        key = _checked_key(text.strip(), args.api_key_file)
    elif args.api_key is not None:
        key = _checked_key(args.api_key, "--api-key")
        print(
            "unclip serve: warning: --api-key is visible to every user of this machine "
            f"(ps, /proc); prefer --api-key-file FILE or ${API_KEY_ENV}",
            file=sys.stderr,
        )
    elif os.environ.get(API_KEY_ENV):
        key = _checked_key(os.environ[API_KEY_ENV].strip(), f"${API_KEY_ENV}")
    else:
        key = None
    if args.no_auth and key is not None:
        raise ValueError("--no-auth, but an API key is set (--api-key, --api-key-file or "
                         f"${API_KEY_ENV}): choose one")  # fmt: skip
    if key is None and not is_loopback(args.host):
        if not args.no_auth:
            raise ValueError(
                f"refusing to serve {args.host} without an API key: anyone who can reach it "
                f"could use it; set ${API_KEY_ENV} or --api-key-file FILE (or pass --no-auth "
                "to serve it open)"
            )
        print(
            f"unclip serve: warning: --no-auth: anyone who can reach {args.host}:{args.port} "
            "can generate images with this machine, read and delete the gallery and cancel "
            "jobs (pages of other web sites are still refused)",
            file=sys.stderr,
        )
    return key


def allowed_hosts(host: str, names: list[str]) -> tuple[str, ...]:
    """The Host header names a server bound to ``host`` answers: the loopback names on
    loopback; elsewhere those, any IP address and ``names`` (``--allow-host``)."""
    if is_loopback(host):
        if names:
            raise ValueError("--allow-host is for a non-loopback --host")
        return LOOPBACK_HOSTS
    cleaned = []
    for name in names:
        name = name.strip().lower().rstrip(".")
        if not name or any(c in name for c in "/:@ "):
            raise ValueError(f"--allow-host {name!r}: give a host name such as example.com")
        cleaned.append(name)
    return (*LOOPBACK_HOSTS, ANY_IP_HOST, *cleaned)


def _unit(field: str) -> int:
    return 2**20 if field.endswith("_bytes") else 1


def _limits(args: argparse.Namespace) -> Limits:
    """The request limits the ``limits`` flags set, each checked to be above 0."""
    values = {}
    for flag, (field, kind, _) in LIMIT_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if not value > 0:
            raise ValueError(f"{flag} must be {'at least 1' if kind is int else 'positive'}")
        values[field] = type(getattr(DEFAULT_LIMITS, field))(value * _unit(field))
    return Limits(**values)


def build_app(args: argparse.Namespace) -> FastAPI:
    """The app for parsed ``serve`` arguments (checked first; loads the pipeline)."""
    for name in ("workers", "queue_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    limits = _limits(args)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.gallery_max_mb > 0 or not args.gallery_max_days >= 0:
        raise ValueError("--gallery-max-mb must be positive and --gallery-max-days at least 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be at least 1")
    key = resolve_api_key(args)

    import torch

    from unclip.server.app import create_app, normalize_origin
    from unclip.server.gallery import DAY, Gallery

    origins = tuple(normalize_origin(o) for o in args.allow_origin)
    hosts = allowed_hosts(args.host, args.allow_host)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    gallery = None
    if not args.no_gallery:
        data = Path(args.data_dir) if args.data_dir else default_data_dir()
        data.mkdir(parents=True, exist_ok=True)
        gallery = Gallery(
            data / "gallery.sqlite",
            max_bytes=int(args.gallery_max_mb * 2**20),
            max_age=args.gallery_max_days * DAY if args.gallery_max_days > 0 else None,
        )
    return create_app(
        args.pipeline,
        workers=args.workers,
        queue_size=args.queue_size,
        limits=limits,
        api_key=key,
        gallery_db=gallery,
        gallery_keep_b64=args.gallery_keep_b64,
        allowed_hosts=hosts,
        allowed_origins=origins,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
    )


def run_serve(args: argparse.Namespace) -> int:
    """serve the OpenAI-compatible Images API and a web page (http://127.0.0.1:8000)"""
    missing = missing_server_modules()
    if missing:
        print(
            f"unclip serve: error: the server needs the 'server' extra ({', '.join(missing)} "
            f"missing): {SERVER_EXTRA}",
            file=sys.stderr,
        )
        return 2
    app = build_app(args)
    import uvicorn

    server = app.state.unclip
    where = server.gallery.db_path if server.gallery is not None else "none"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"unclip serve: {server.pipe.name} at http://{host}:{args.port}/ "
        f"(API: http://{host}:{args.port}/v1, gallery: {where}, "
        f"API key: {'required' if server.api_key else 'none'})",
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
