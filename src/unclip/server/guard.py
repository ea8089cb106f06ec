"""The server's front door: an ASGI middleware in front of every route.

:class:`Guard` checks the ``Host`` header (a DNS-rebinding defence), refuses a POST or
DELETE from another site (the ``Origin`` policy), bounds request bodies, adds the security
headers and turns an exception no route handled into a JSON 500. :func:`normalize_origin`
reads the origins ``unclip serve --allow-origin`` lists.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unclip.server.errors import APIError
from unclip.server.limits import ANY_IP_HOST

__all__ = ["CSP", "SAFE_METHODS", "Guard", "normalize_origin"]

log = logging.getLogger("unclip.server")

#: methods that change nothing; every other method is checked against the Origin policy
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: the web page's Content-Security-Policy (its scripts, styles and images come from the server)
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def normalize_origin(origin: str) -> str:
    """``origin`` as browsers send it (``scheme://host[:port]``, lower case, no default
    port), or ``"null"``; ValueError for anything else (a path, another scheme, ``*``)."""
    if origin == "null":
        return origin
    u = urlsplit(origin.strip().lower())
    try:
        port = u.port
    except ValueError:  # not a number, or out of range
        port = -1
    if (
        port == -1 or u.scheme not in ("http", "https") or not u.hostname
        or u.path not in ("", "/") or u.query or u.fragment or u.username or u.password
    ):  # fmt: skip
        raise ValueError(
            f"not an origin: {origin!r} (expected scheme://host[:port], e.g. "
            "https://example.com, or null)"
        )
    default = 443 if u.scheme == "https" else 80
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def _same_origin(origin: str, host: str) -> bool:
    """Whether the ``Origin`` header names the server the request was sent to (its
    ``Host`` header): same host name and port, the port defaulting to the origin's
    scheme's."""
    try:
        o = urlsplit(origin.lower())
        h = urlsplit(f"//{host.lower()}")
        if o.scheme not in ("http", "https") or not o.hostname or not h.hostname:
            return False
        default = 443 if o.scheme == "https" else 80
        return o.hostname == h.hostname and (o.port or default) == (h.port or default)
    except ValueError:
        return False


def _host_allowed(hostname: str, allowed: tuple[str, ...]) -> bool:
    if hostname in allowed or "*" in allowed:
        return True
    if ANY_IP_HOST in allowed:
        try:
            ipaddress.ip_address(hostname)
            return True
        except ValueError:
            return False
    return False


class Guard:
    """Pure ASGI middleware, in front of every route:

    - a ``Host`` not in ``allowed_hosts`` is refused (400; a DNS-rebinding defence:
      ``"*"`` accepts any, :data:`ANY_IP_HOST` any IP address literal);
    - a request with any method but GET, HEAD and OPTIONS is refused (403) when its
      ``Origin`` is not the server's own (the ``Host`` it was sent to) and not one of
      ``allowed_origins``; ``Origin: null`` (a sandboxed iframe, a ``data:`` or
      ``file:`` page) counts as another site. Without an ``Origin``, a
      ``Sec-Fetch-Site: cross-site`` or ``same-site`` is refused the same way;
    - bodies above ``limit_for(path)`` bytes are refused (413, on Content-Length and while
      the body streams in);
    - an exception no route handled becomes a JSON 500 (logged once), so the client gets
      an error object and its keep-alive connection stays open.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit_for: Callable[[str], int],
        allowed_hosts: tuple[str, ...] | None,
        allowed_origins: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.allowed_hosts = allowed_hosts
        self.allowed_origins = frozenset(allowed_origins)

    def cross_site(self, method: str, headers: dict[str, str]) -> str | None:
        """Why a request is refused as cross-site, or None."""
        if method in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is None:
            site = headers.get("sec-fetch-site", "").lower()
            if site in ("cross-site", "same-site"):
                return f"a {site} request (Sec-Fetch-Site) without an Origin"
            return None
        if _same_origin(origin, headers.get("host", "")):
            return None
        try:
            if normalize_origin(origin) in self.allowed_origins:
                return None
        except ValueError:
            pass
        return f"a {method} request from origin {origin[:100]!r}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.allowed_hosts is not None:
            hostname = ""
            with contextlib.suppress(ValueError):
                hostname = urlsplit(f"//{host}").hostname or ""
            if not _host_allowed(hostname, self.allowed_hosts):
                await _send_error(
                    send,
                    APIError(
                        400,
                        f"invalid Host header {host[:100]!r} (a name this server does not "
                        "answer to; list it with unclip serve --allow-host)",
                        code="invalid_host",
                    ),
                )
                return
        why = self.cross_site(scope["method"], headers)
        if why is not None:
            await _send_error(
                send,
                APIError(
                    403,
                    f"{why} refused: only the server's own page may send it (list another "
                    "site with unclip serve --allow-origin)",
                    code="cross_origin",
                ),
            )
            return
        limit = self.limit_for(scope["path"])
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, _too_large(int(length), limit))
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(received, limit)
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"x-content-type-options", b"nosniff")]
                if scope["path"] == "/":
                    extra += [
                        (b"content-security-policy", CSP.encode()),
                        (b"x-frame-options", b"DENY"),
                        (b"referrer-policy", b"no-referrer"),
                    ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_headers)
        except APIError as e:  # raised by counting_receive outside a route's handlers
            if started:
                raise
            await _send_error(send, e)
        except Exception as e:
            if started:
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            await _send_error(
                send,
                APIError(500, f"internal error ({type(e).__name__}); see the server's log"),
            )


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is {size:,} bytes or more; the limit for this route is {limit:,}",
        code="request_too_large",
    )


async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in err.headers.items()),
    ]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
