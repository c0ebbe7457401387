"""``GET /api/streams/{stream}/clip?from=…&to=…``: a span of a stream as a file.

``from`` and ``to`` are epoch milliseconds or seconds before the live edge (``-30``),
parsed like WHEP's ``start``; ``session`` picks an ended broadcast (hex id). The file
(MP4 for H.264, WebM for VP8) starts on the keyframe at or before ``from`` and comes
with a ``Content-Disposition`` filename. :mod:`whipcast.gateway.clips` cuts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from aiohttp import web
from whipcast.gateway.clips import Clipper
from whipcast.gateway.errors import SessionError
from whipcast.gateway.playback import OutOfWindow

from . import resources, whep

CHUNK_BYTES = 256 * 1024


def add_routes(app: web.Application, clipper: Clipper) -> None:
    async def clip(request: web.Request) -> web.StreamResponse:
        stream = resources.stream_name(request)
        query = request.query
        if "from" not in query or "to" not in query:
            raise SessionError('give "from" and "to" (epoch ms, or seconds like -30)')
        try:
            made = await clipper.cut(stream, query["from"], query["to"], query.get("session"))
        except OutOfWindow as exc:
            return whep.out_of_window(exc)
        headers = {
            "Content-Disposition": f'attachment; filename="{made.filename}"',
            "X-Clip-Duration": f"{made.duration_s:.3f}",
            "Cache-Control": "no-store",
        }
        try:
            file = await asyncio.to_thread(open, made.path, "rb")  # unlinked at once
        finally:
            with contextlib.suppress(OSError):
                os.unlink(made.path)
        with file:
            response = web.StreamResponse(headers=headers)
            response.content_type = made.content_type
            response.content_length = os.fstat(file.fileno()).st_size
            await response.prepare(request)
            while chunk := await asyncio.to_thread(file.read, CHUNK_BYTES):
                await response.write(chunk)
        await response.write_eof()
        return response

    app.router.add_get("/api/streams/{stream}/clip", clip)
