"""``GET /api/streams/{stream}/thumbnail``: the latest picture of a stream, as a JPEG.

The ``thumbnails`` role (:mod:`whipcast.gateway.thumbnails`) makes the pictures and keeps
them in a compacted topic; every signaling node follows that topic, so any node answers,
also for a stream that has ended (its replay keeps the last picture).
"""

from __future__ import annotations

from aiohttp import web
from whipcast.gateway.bus import Bus
from whipcast.gateway.compacted import CompactedView
from whipcast.gateway.settings import Settings
from whipcast.gateway.thumbnails import Thumbnail, thumbnails_topic, topic_spec

from . import resources
from .kafkalog import StateLog

MAX_AGE_S = 5
"""How long browsers may show a picture without asking again (about one interval)."""


class Thumbnails:
    """This node's copy of the thumbnails topic: the latest picture per stream."""

    def __init__(self, settings: Settings, bus: Bus, log: StateLog) -> None:
        self._settings = settings
        self._log = log
        self._view: CompactedView[Thumbnail] = CompactedView(
            bus, thumbnails_topic(settings.topic_prefix), Thumbnail.decode
        )

    async def start(self) -> None:
        await self._log.ensure(topic_spec(self._settings))
        await self._view.start()

    async def stop(self) -> None:
        await self._view.stop()

    def get(self, stream: str) -> Thumbnail | None:
        return self._view.records.get(stream)


def add_routes(app: web.Application, thumbnails: Thumbnails) -> None:
    async def thumbnail(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        found = thumbnails.get(stream)
        if found is None:
            raise web.HTTPNotFound(
                reason=f"no picture of {stream!r} yet: thumbnails are made every few "
                "seconds while a stream is live"
            )
        headers = {
            "ETag": f'"{found.taken_ms:x}"',
            "Cache-Control": f"public, max-age={MAX_AGE_S}",
        }
        if headers["ETag"] in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=found.jpeg, content_type="image/jpeg", headers=headers)

    app.router.add_get("/api/streams/{stream}/thumbnail", thumbnail)
