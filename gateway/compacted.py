"""A node's live copy of a compacted Kafka topic: the latest value per key.

The stream registry and the node registry are both small compacted topics that every
node reads in full at start and then follows; this class is what they share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from aiokafka.structs import TopicPartition

from .bus import CONTROL_FETCH_MAX_WAIT_MS, Bus

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CompactedView(Generic[T]):
    def __init__(self, bus: Bus, topic: str, decode: Callable[[bytes], T]) -> None:
        self._bus = bus
        self._topic = topic
        self._decode = decode
        self.records: dict[str, T] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load the topic up to its current end, then keep following it."""
        consumer = self._bus.consumer(CONTROL_FETCH_MAX_WAIT_MS)
        await consumer.start()
        tp = TopicPartition(self._topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                for record in records:
                    self._apply(record.key, record.value)
        self._task = asyncio.create_task(self._follow(consumer), name=f"view-{self._topic}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self, consumer) -> None:
        try:
            while True:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        self._apply(record.key, record.value)
        finally:
            await consumer.stop()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        name = key.decode(errors="replace")
        if value is None:
            self.records.pop(name, None)
        else:
            try:
                self.records[name] = self._decode(value)
            except (ValueError, TypeError):
                logger.warning("ignoring malformed record %r on %s", name, self._topic)
                return
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
