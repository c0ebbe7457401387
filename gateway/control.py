"""Keyframe requests travel upstream as Kafka records, never as calls.

An egress node that needs a keyframe (a viewer sent PLI/FIR, or the cached GOP grew too
long) writes a record to the control topic; the ingest that owns the stream reads it
and asks its publisher for a keyframe. Egress and ingest may live in different
processes, so this is the only way back up the data path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from aiokafka.structs import ConsumerRecord

from .bus import Bus
from .topic_reader import TopicReader

logger = logging.getLogger(__name__)


class KeyframeRequester:
    """Egress side: coalesces requests per stream to at most one per ``interval``."""

    def __init__(self, bus: Bus, interval: float) -> None:
        self._bus = bus
        self._interval = interval
        self._last: dict[tuple[str, int | None], float] = {}
        self.sent = 0
        self.coalesced = 0

    def request(self, stream: str, session: int, reason: str, layer: int | None = None) -> None:
        """Ask for a keyframe on ``layer`` (``None``: every layer the publisher sends)."""
        now = time.monotonic()
        if now - self._last.get((stream, layer), -1e9) < self._interval:
            self.coalesced += 1
            return
        self._last[(stream, layer)] = now
        self.sent += 1
        message = {"type": "keyframe", "session": session, "reason": reason}
        if layer is not None:
            message["layer"] = layer
        value = json.dumps(message).encode()
        task = asyncio.ensure_future(self._bus.send_record(self._bus.control_topic, stream, value))
        task.add_done_callback(_log_failure)

    def forget(self, stream: str) -> None:
        for key in [key for key in self._last if key[0] == stream]:
            del self._last[key]


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("keyframe request not sent: %s", task.exception())


async def follow_keyframe_requests(
    bus: Bus, handler: Callable[[str, int, int | None], None]
) -> None:
    """Ingest side: call ``handler(stream, session, layer)`` for every new request, for
    ever (``layer`` ``None``: any layer will do), through the node's one
    :class:`~whipcast.gateway.topic_reader.TopicReader`."""

    def receive(record: ConsumerRecord, live: bool) -> None:
        try:
            message = json.loads(record.value)
            stream = record.key.decode()
            session = int(message["session"])
            layer = message.get("layer")
            layer = None if layer is None else int(layer)
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        if message.get("type") == "keyframe":
            handler(stream, session, layer)

    reader = TopicReader.of(bus)
    following = await reader.follow(bus.control_topic, receive, history=False)
    try:
        await asyncio.Future()  # until cancelled
    finally:
        await reader.unfollow(following)
