"""Errors as RFC 9457 problem documents: every 4xx says what was wrong, in words."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from whipcast.gateway.errors import SessionError

logger = logging.getLogger(__name__)

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    428: "Precondition Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "about:blank", "title": _TITLES.get(status, "Error"), "status": status,
            "detail": detail}  # fmt: skip
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )


@web.middleware
async def problems_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Turn client errors into problem documents and never leak a traceback."""
    try:
        return await handler(request)
    except SessionError as exc:
        return problem(exc.status, str(exc), headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/problem+json":
            raise
        return problem(exc.status, exc.reason, headers=_keep_headers(exc))
    except Exception:
        logger.exception("unexpected error in %s %s", request.method, request.path)
        return problem(500, "the server failed to handle this request; it has been logged")


def _keep_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
