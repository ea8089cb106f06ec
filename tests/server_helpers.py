"""Helpers of the server tests: small images and masks, error checks, waiting, server-sent
event parsing, wrapped pipelines, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn
from PIL import Image

from unclip.server import Limits

LIMITS = Limits(
    max_prompt_chars=200,
    max_n=4,
    max_frames=4,
    max_steps=20,
    max_upload_bytes=64 * 1024,
    max_image_pixels=512 * 512,
    max_json_bytes=16 * 1024,
    request_timeout=60.0,
)


class GatedPipeline:
    """The tiny pipeline, except that ``text_to_image`` waits for ``gate``: it holds a
    worker for as long as a test needs."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self.gate = threading.Event()
        self.raised: list[BaseException] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def text_to_image(self, *args: Any, **kwargs: Any) -> Any:
        assert self.gate.wait(30), "gate never opened"
        try:
            return self._pipe.text_to_image(*args, **kwargs)
        except BaseException as e:
            self.raised.append(e)
            raise


def png(size=(20, 20), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def box_mask(size=(20, 20), box=(5, 5, 15, 15)) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side × side black pixels: about 40 KB declaring 400 megapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + side // 8)
    raw = zlib.compress(row * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_error(r: httpx.Response, status: int, param: str | None = None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["type"] == ("invalid_request_error" if status < 429 else err["type"])
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def parse_sse(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        ev: dict[str, Any] = {}
        for line in block.splitlines():
            key, _, value = line.partition(": ")
            if key in ("id", "event", "data"):
                ev[key] = value
        if "event" in ev:
            ev["data"] = json.loads(ev["data"])
            events.append(ev)
    return events


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """``app`` under uvicorn on 127.0.0.1 (a free port), in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
