"""``GET /api/recordings`` and the recording files themselves.

Served by any node that sees the recording directory (``--record-dir``): the recorder
itself, ``whipcast dev --record-dir``, or a signaling node on the same (shared) disk.
Files are sent with ``aiohttp.web.FileResponse`` (``Range`` requests, so a browser
can seek), only under names the recorder writes, from that directory alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from whipcast.gateway.bus import STREAM_NAME
from whipcast.gateway.recordings import CONTENT_TYPES, FILE_NAME, list_recordings, recording_path
from whipcast.gateway.settings import Settings

_OFF = "this node has no recordings: run it with --record-dir (or run whipcast record --dir)"


def add_routes(app: web.Application, settings: Settings) -> None:
    root: Path | None = settings.record_dir

    async def recordings(request: web.Request) -> web.Response:
        if root is None:
            raise web.HTTPNotFound(reason=_OFF)
        stream = request.query.get("stream")
        if stream is not None and not STREAM_NAME.match(stream):
            raise web.HTTPBadRequest(reason="stream names are 1-64 letters, digits, '-' or '_'")
        # Listing touches the disk: off the event loop, which may carry media.
        found = await asyncio.to_thread(list_recordings, root, stream)
        base = f"{request.scheme}://{request.host}"
        return web.json_response({"recordings": [r.to_json(base) for r in found]})

    async def recording(request: web.Request) -> web.StreamResponse:
        if root is None:
            raise web.HTTPNotFound(reason=_OFF)
        stream, file = request.match_info["stream"], request.match_info["file"]
        path = await asyncio.to_thread(recording_path, root, stream, file)
        if path is None:
            raise web.HTTPNotFound(reason=f"no recording {file!r} of stream {stream!r}")
        match = FILE_NAME.match(file)
        assert match is not None
        headers = {"Content-Type": CONTENT_TYPES[match["ext"]], "Cache-Control": "no-cache"}
        return web.FileResponse(path, headers=headers)

    app.router.add_get("/api/recordings", recordings)
    app.router.add_get("/api/recordings/{stream}/{file}", recording)
