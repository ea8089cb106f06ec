"""Errors in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}``.

``type`` as the OpenAI API uses it: ``invalid_request_error`` for anything the caller can
fix (400, 401, 404, 413), ``requests`` for 429 (here: the job queue is full, not a quota),
``server_error`` for 5xx. ``param`` names the offending request field, or None.
"""

from __future__ import annotations

from typing import Any

INVALID = "invalid_request_error"
SERVER = "server_error"
BUSY = "requests"


class APIError(Exception):
    """An error answered as an OpenAI error object with ``status`` and optional headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or (SERVER if status >= 500 else BUSY if status == 429 else INVALID)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = INVALID, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
