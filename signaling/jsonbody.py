"""JSON request bodies for the small control-plane resources (Q&A, directory)."""

from __future__ import annotations

import json

from aiohttp import web
from whipcast.gateway.errors import SessionError

from . import resources

JSON = "application/json"
MAX_JSON_BYTES = 4096


async def read_object(request: web.Request, allowed: set[str]) -> dict:
    """The body as a JSON object with no fields but ``allowed``; 4xx problems otherwise."""
    text = await resources.read_body(request, JSON, MAX_JSON_BYTES)
    try:
        body = json.loads(text)
    except ValueError:
        raise SessionError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise SessionError("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise SessionError(f"unknown field(s): {', '.join(unknown)}")
    return body
