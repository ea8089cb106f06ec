"""The API key: when the server has one, every ``/v1`` route requires it as
``Authorization: Bearer KEY`` (compared in constant time)."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from unclip.server.errors import APIError
from unclip.server.state import state

__all__ = ["check_key"]

bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")


async def check_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
) -> None:
    """Refuse (401) a request without the server's API key; pass any without a key set."""
    key = state(request).api_key
    if key is None:
        return
    headers = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise APIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
            code="missing_api_key",
            headers=headers,
        )
    if not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers=headers)
