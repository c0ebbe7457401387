"""Server-sent events (HTML Living Standard, "text/event-stream") over aiohttp.

Only what whipcast's live updates need: named events with one-line JSON data and
comment lines as heartbeats. A heartbeat is also how a vanished client is noticed:
writing to its closed connection fails.
"""

from __future__ import annotations

from aiohttp import web


def event_stream() -> web.StreamResponse:
    """A response to ``prepare()`` (after setting any cookie) and then write events to."""
    return web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",  # nginx: pass events through at once
        }
    )


async def send(response: web.StreamResponse, event: str, data: str) -> None:
    """One event; ``data`` must be a single line (compact JSON is)."""
    await response.write(f"event: {event}\ndata: {data}\n\n".encode())


async def heartbeat(response: web.StreamResponse) -> None:
    await response.write(b": keep-alive\n\n")
