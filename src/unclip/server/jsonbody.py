"""JSON request bodies parsed with limits; every refusal is a 400 :class:`APIError`.

Python's :func:`json.loads` recurses once per nesting level: a 2 KB body of ``[[[[…`` raises
``RecursionError`` (or, on a thread with a small stack, worse). So the nesting depth is
measured first, by a flat scan over the brackets outside strings, and the body is only
parsed when it is shallow enough. The parse then refuses what the standard library would
let through: duplicate keys (two parsers could read two different requests), ``NaN`` and
``Infinity`` (not JSON), numbers of more than a few dozen digits and numbers out of the
float range, lone UTF-16 surrogates (``"\\ud800"``: not text, and not encodable as UTF-8),
too many keys and too long strings. The body must be UTF-8 (RFC 8259 §8.1).

Nothing here imports FastAPI.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from unclip.server.errors import bad_request
from unclip.server.limits import Limits

#: a JSON string (escapes included) or one bracket; brackets inside strings are skipped
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether ``text`` nests arrays/objects deeper than ``max_depth``, without recursion
    (and without reading past the first level that is too deep)."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    depth = 0
    for m in _TOKENS.finditer(text):
        c = m.group()[0]
        if c in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif c in "]}":
            depth -= 1
    return False


def _describe(key: str) -> str:
    return repr(key if len(key) <= 40 else key[:40] + "…")


def parse_json_object(raw: bytes, limits: Limits) -> dict[str, Any]:
    """The JSON object in ``raw``, or a 400 naming what is wrong (``code``:
    ``invalid_json``, ``json_too_deep``, ``json_too_many_keys``, ``string_too_long``,
    ``number_too_long``; ``param``: the top-level field concerned, where there is one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(
            f"the request body is not UTF-8 (byte {e.start}); send JSON as UTF-8",
            code="invalid_json",
        ) from None
    if json_depth_exceeds(text, limits.max_json_depth):
        raise bad_request(
            f"the JSON body is nested more than {limits.max_json_depth} levels deep",
            code="json_too_deep",
        )
    max_chars = max(limits.max_json_string_chars, limits.max_prompt_chars)
    keys = 0

    def check_string(s: str, where: str | None) -> None:
        if len(s) > max_chars:
            raise bad_request(
                f"a string {'in ' + _describe(where) + ' ' if where else ''}is {len(s):,} "
                f"characters long; the limit is {max_chars:,}",
                param=where,
                code="string_too_long",
            )
        if _SURROGATE.search(s):
            raise bad_request(
                f"a string {'in ' + _describe(where) + ' ' if where else ''}holds a lone "
                "UTF-16 surrogate (such as \\ud800), which is not text",
                param=where,
                code="invalid_json",
            )

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal keys
        keys += len(items)
        if keys > limits.max_json_keys:
            raise bad_request(
                f"the JSON body has more than {limits.max_json_keys} keys",
                code="json_too_many_keys",
            )
        out: dict[str, Any] = {}
        for key, value in items:
            check_string(key, None)
            if key in out:
                raise bad_request(
                    f"the key {_describe(key)} appears more than once", param=key,
                    code="invalid_json",
                )  # fmt: skip
            out[key] = value
        return out

    def number(s: str) -> None:
        if len(s) > limits.max_json_number_chars:
            raise bad_request(
                f"a number of {len(s):,} characters; the limit is {limits.max_json_number_chars}",
                code="number_too_long",
            )

    def parse_int(s: str) -> int:
        number(s)
        return int(s)

    def parse_float(s: str) -> float:
        number(s)
        value = float(s)
        if not math.isfinite(value):
            raise bad_request(f"the number {s} is out of range", code="invalid_json")
        return value

    def parse_constant(s: str) -> Any:
        raise bad_request(f"{s} is not JSON (JSON has no NaN or Infinity)", code="invalid_json")

    try:
        data = json.loads(
            text,
            object_pairs_hook=pairs,
            parse_int=parse_int,
            parse_float=parse_float,
            parse_constant=parse_constant,
        )
    except ValueError:  # JSONDecodeError
        raise bad_request(
            "We could not parse the JSON body of your request. (HINT: send a JSON object "
            "with Content-Type: application/json.)",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise bad_request("the JSON body must be an object", code="invalid_json")
    # strings in values, with the top-level field they are under (the depth is bounded)
    stack: list[tuple[Any, str]] = [(v, k) for k, v in data.items()]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            check_string(value, where)
        elif isinstance(value, dict):
            stack.extend((v, where) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, where) for v in value)
    return data
