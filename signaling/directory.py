"""What the stream directory (``GET /api/streams``) shows beyond the registry: a title
and the resolution, set by the host and kept in Kafka so every node shows the same.

The compacted topic ``{prefix}.directory`` holds one record per stream, key the
stream name, value ``{"title", "width", "height", "at"}``, written by
``PATCH /api/streams/{stream}`` (publish token). Width and height are what the
publisher reports sending: whipcast never decodes video, so it cannot know them itself.
Details outlive a broadcast, so a channel keeps its title for the next one.
"""

from __future__ import annotations

import json
import time

from aiohttp import web
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError
from whipcast.gateway.bus import Bus
from whipcast.gateway.compacted import CompactedView
from whipcast.gateway.errors import SessionError, Unavailable
from whipcast.gateway.settings import Settings

from . import jsonbody, resources
from .auth import require_token
from .kafkalog import StateLog
from .qa import clean_text

MAX_TITLE = 100
MAX_DIMENSION = 16384
FIELDS = ("title", "width", "height")


class Directory:
    """This node's copy of the details topic, and the host's way to change it."""

    def __init__(self, settings: Settings, bus: Bus, log: StateLog) -> None:
        self.topic = f"{settings.topic_prefix}.directory"
        self._settings = settings
        self._log = log
        self._view: CompactedView[dict] = CompactedView(bus, self.topic, _decode)

    async def start(self) -> None:
        await self._log.ensure(
            NewTopic(self.topic, 1, self._settings.topic_replication_factor,
                     topic_configs={"cleanup.policy": "compact"})
        )  # fmt: skip
        await self._view.start()

    async def stop(self) -> None:
        await self._view.stop()

    def details(self, stream: str) -> dict:
        """Title and reported resolution, each ``None`` when unknown."""
        found = self._view.records.get(stream, {})
        return {key: found.get(key) for key in FIELDS}

    async def update(self, stream: str, changes: dict) -> dict:
        """Merge the host's changes into the stream's details; returns them once saved."""
        details = {**self.details(stream), **changes, "at": time.time()}
        try:
            await self._log.write(self.topic, stream, json.dumps(details).encode())
        except KafkaError as exc:
            raise Unavailable(f"not saved: Kafka did not acknowledge it ({exc})") from exc
        await self._view.wait_for(lambda: self._view.records.get(stream) == details, 5.0)
        return self.details(stream)


def _decode(value: bytes) -> dict:
    details = json.loads(value)
    if not isinstance(details, dict):
        raise ValueError("details must be a JSON object")
    return details


def add_routes(app: web.Application, directory: Directory, settings: Settings) -> None:
    async def update(request: web.Request) -> web.Response:
        require_token(request, settings.publish_token)
        stream = resources.stream_name(request)
        body = await jsonbody.read_object(request, set(FIELDS))
        return web.json_response(await directory.update(stream, _changes(body)))

    app.router.add_patch("/api/streams/{stream}", update)


def _changes(body: dict) -> dict:
    """The valid fields of a details PATCH (JSON merge patch: null clears a field)."""
    if not body:
        raise SessionError("set at least one of title, width, height")
    changes: dict = {}
    for key, value in body.items():
        if value is None:
            changes[key] = None
        elif key == "title":
            changes[key] = clean_text(value, "title", MAX_TITLE) or None
        elif isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_DIMENSION:
            changes[key] = value
        else:
            raise SessionError(f"{key} must be a whole number from 1 to {MAX_DIMENSION}")
    return changes
