"""A node's live copy of a compacted Kafka topic: the latest value per key.

The stream registry, the node registry and the stream directory are small compacted
topics that every node reads in full at start and then follows; this class is what
they share.

Registry records are heartbeats, and whether their writer is still there is judged
here by *this* node's clock alone, never by a time written by another machine (clocks
drift apart; a skewed one must not make a dead node look alive or a live one dead):

- a record's silence is the time from when this node *received* it until the last
  moment this view was known to hold everything in the topic. While the view cannot
  read (a broker failover, an outage) silence does not grow: the writer's heartbeats
  may be waiting in the same place, so nothing is declared dead on their account;
- a record read back from the topic's history at start-up is of unknown age, so it
  counts as silent until its writer beats again. :meth:`CompactedView.start` waits up
  to one heartbeat interval for that, for records that may still have a writer (those
  appended, by the broker's clock, shortly before the topic's newest record).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from aiokafka.structs import ConsumerRecord

from .bus import Bus
from .topic_reader import Following, TopicReader

logger = logging.getLogger(__name__)

T = TypeVar("T")


def decode_known(cls: type[T], value: bytes) -> T:
    """A JSON record as dataclass ``cls``, ignoring fields a newer version added, so
    that nodes of two versions can share a topic during a rolling upgrade."""
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


class Beat:
    """A record its writer re-sends as a heartbeat; the view that received it says how
    long the writer has been silent (:meth:`silence`)."""

    _silence: ClassVar[Callable[[], float]] = staticmethod(lambda: math.inf)

    def silence(self) -> float:
        """Seconds its writer has been silent as far as this node can tell (``inf``:
        not heard from since this node started, or not received from Kafka at all)."""
        return self._silence()


class CompactedView(Generic[T]):
    """Follows ``topic`` into :attr:`records`, through the node's one
    :class:`~whipcast.gateway.topic_reader.TopicReader`.

    For heartbeat topics, ``confirm`` (records that claim a live writer) and
    ``heartbeat_s`` (how often writers re-send) make :meth:`start` wait for the fresh
    beats that confirm what the history says; ``stale_after_s`` bounds which history
    records are worth waiting for.
    """

    def __init__(
        self,
        bus: Bus,
        topic: str,
        decode: Callable[[bytes], T],
        *,
        confirm: Callable[[T], bool] | None = None,
        heartbeat_s: float = 0.0,
        stale_after_s: float = 0.0,
    ) -> None:
        self._bus = bus
        self._topic = topic
        self._decode = decode
        self._confirm = confirm
        self._heartbeat_s = heartbeat_s
        self._stale_after_s = stale_after_s
        self.records: dict[str, T] = {}
        self._changed = asyncio.Event()
        self._following: Following | None = None
        self._current_at = -math.inf
        self._newest_ms = -math.inf
        self._appended_ms: dict[str, int] = {}

    async def start(self) -> None:
        """Load the topic up to its current end, then keep following it."""
        self._following = await TopicReader.of(self._bus).follow(
            self._topic, self._receive, history=True, on_current=self._now_current
        )
        self._current_at = time.monotonic()
        appended_ms, self._appended_ms = self._appended_ms, {}
        if self._confirm is not None:
            recent = self._newest_ms - 1000 * self._stale_after_s
            waiting = {
                name
                for name, info in self.records.items()
                if appended_ms.get(name, -math.inf) >= recent and self._confirm(info)
            }
            await self._confirm_beats(waiting)

    async def _confirm_beats(self, waiting: set[str]) -> None:
        """Wait, for up to a heartbeat interval, until every record in ``waiting`` has
        been beaten afresh (or has gone)."""

        def confirmed() -> bool:
            return not any(
                name in self.records and self.records[name].silence() == math.inf
                for name in waiting
            )

        await self.wait_for(confirmed, self._heartbeat_s + 0.5)

    async def stop(self) -> None:
        if self._following is not None:
            await TopicReader.of(self._bus).unfollow(self._following)
            self._following = None

    def _receive(self, record: ConsumerRecord, live: bool) -> None:
        if not live:
            self._newest_ms = max(self._newest_ms, record.timestamp)
            if record.key is not None:
                self._appended_ms[record.key.decode(errors="replace")] = record.timestamp
        self._apply(record, live)

    def _now_current(self) -> None:
        """The reader found nothing more to read: this view held the whole topic now."""
        self._current_at = time.monotonic()

    def _silence_since(self, received: float) -> float:
        return max(0.0, self._current_at - received)

    def _apply(self, record: ConsumerRecord, live: bool) -> None:
        if record.key is None:
            return
        name = record.key.decode(errors="replace")
        if record.value is None:
            self.records.pop(name, None)
        else:
            try:
                info: Any = self._decode(record.value)
            except (ValueError, TypeError):
                logger.warning("ignoring malformed record %r on %s", name, self._topic)
                return
            if live and isinstance(info, Beat):
                info._silence = functools.partial(self._silence_since, time.monotonic())
            self.records[name] = info
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], object], timeout: float) -> bool:
        """Wait (bounded) until ``predicate()`` holds, re-checking after each update."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass
        return True
