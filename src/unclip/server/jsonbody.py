"""JSON request bodies parsed with limits; every refusal is a 400 :class:`APIError`.

Python's :func:`json.loads` recurses once per nesting level: a 2 KB body of ``[[[[…`` raises
``RecursionError`` (or, on a thread with a small stack, worse), and it builds a list of a
million items from a 2 MB body at Python speed. So a body is measured before it is parsed,
with regular expressions and string methods only (C speed, no recursion, a few milliseconds
for a megabyte): strings are blanked out, then the commas outside strings are counted (the
keys and array elements), the longest run of number characters is found, and the nesting
depth is the running sum of the brackets (+1 opening, -1 closing; a numpy cumulative sum).
Only a body within every limit is parsed, and the parse refuses
what the standard library would let through: duplicate keys (two parsers could read two
different requests), ``NaN`` and ``Infinity`` (not JSON), numbers out of the float range,
lone UTF-16 surrogates (``"\\ud800"``: not text, and not encodable as UTF-8) and too long
strings. The body must be UTF-8 (RFC 8259 §8.1).

Nothing here imports FastAPI.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

import numpy as np

from unclip.server.errors import bad_request
from unclip.server.limits import Limits

#: a complete JSON string, escapes included
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@functools.lru_cache(maxsize=8)
def _number_run(longer_than: int) -> re.Pattern[str]:
    return re.compile(rf"[-+0-9.eE]{{{longer_than + 1},}}")


def blank_strings(text: str) -> str:
    """``text`` with every complete JSON string replaced by ``""``: what is left is the
    structure (brackets, commas, colons), numbers and literals."""
    return _STRING.sub('""', text)


def nesting(bare: str, max_depth: int) -> str:
    """``"deep"`` (arrays/objects open more than ``max_depth`` levels at some point),
    ``"malformed"`` (a bracket closed that was not open, or one left open) or ``"ok"``, for
    a text without strings (:func:`blank_strings`). The depth is the running sum of +1 per
    opening and -1 per closing bracket (numpy, no Python loop); which bracket closes which
    is left to the parser, whose recursion depth that sum bounds."""
    brackets = _NOT_BRACKET.sub("", bare).encode("ascii")
    if not brackets:
        return "ok"
    codes = np.frombuffer(brackets, dtype=np.uint8)
    depth = np.cumsum(np.where((codes == ord("[")) | (codes == ord("{")), 1, -1), dtype=np.int64)
    if int(depth.max()) > max_depth:
        return "deep"
    if int(depth.min()) < 0 or int(depth[-1]) != 0:
        return "malformed"
    return "ok"


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether the JSON ``text`` nests arrays/objects deeper than ``max_depth``."""
    return nesting(blank_strings(text), max_depth) == "deep"


def _unparsable() -> Exception:
    return bad_request(
        "We could not parse the JSON body of your request. (HINT: send a JSON object "
        "with Content-Type: application/json.)",
        code="invalid_json",
    )


def _describe(key: str) -> str:
    return repr(key if len(key) <= 40 else key[:40] + "…")


def parse_json_object(raw: bytes, limits: Limits) -> dict[str, Any]:
    """The JSON object in ``raw``, or a 400 naming what is wrong (``code``:
    ``invalid_json``, ``json_too_deep``, ``json_too_many_items``, ``string_too_long``,
    ``number_too_long``; ``param``: the top-level field concerned, where there is one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(
            f"the request body is not UTF-8 (byte {e.start}); send JSON as UTF-8",
            code="invalid_json",
        ) from None
    bare = blank_strings(text)
    items = bare.count(",") + 1
    if items > limits.max_json_items:
        raise bad_request(
            f"the JSON body has more than {limits.max_json_items} keys and array elements",
            code="json_too_many_items",
        )
    long_number = _number_run(limits.max_json_number_chars).search(bare)
    if long_number is not None:
        raise bad_request(
            f"a number of {len(long_number.group()):,} characters or more; the limit is "
            f"{limits.max_json_number_chars}",
            code="number_too_long",
        )
    shape = nesting(bare, limits.max_json_depth)
    if shape == "deep":
        raise bad_request(
            f"the JSON body is nested more than {limits.max_json_depth} levels deep",
            code="json_too_deep",
        )
    if shape == "malformed":
        raise _unparsable()
    max_chars = max(limits.max_json_string_chars, limits.max_prompt_chars)

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

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in members:
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
        raise _unparsable() from None
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
