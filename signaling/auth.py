"""Bearer-token checks (RFC 6750), compared in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web
from whipcast.gateway.errors import SessionError


class Unauthorized(SessionError):
    status = 401


def require_token(request: web.Request, token: str | None) -> None:
    """Raise :class:`Unauthorized` unless the request carries ``Bearer <token>``.

    ``None`` means no token is configured and anyone may proceed.
    """
    if token is None:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode(), token.encode()
    ):
        raise Unauthorized("a valid 'Authorization: Bearer <publish token>' header is required")
