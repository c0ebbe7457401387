"""One Kafka consumer per node for every control-plane topic it follows.

A node follows several small topics for as long as it runs (the stream and node
registries, the session history, the directory, thumbnails, keyframe requests, Q&A
boards). An idle consumer sends a fetch every ``fetch_max_wait_ms``, so one consumer
per topic cost the broker and the node a request per topic per wait; one consumer for
all of them costs one per wait (per broker that leads one of them). Apache Kafka answers
a waiting fetch as soon as any fetched partition gets a record, so a record on one topic
is not held back by the others' silence.

A topic's history (a view's start: everything up to its end), or only its end offset
for a follower of what comes next, is read with a short-lived consumer of its own: on
the shared one every offset lookup would queue behind its waiting fetch at the broker
(Kafka answers a connection's requests in order), a fetch wait per lookup and per
topic at a node's start. The shared consumer then takes over at that offset.

aiokafka's ``assign()`` replaces the whole assignment and forgets every position, so a
topic followed later is added by re-assigning all of them and seeking the others back
to where they were; this happens in the reader's own task, between polls, so no record
is lost or handed over twice. Each :class:`Following` keeps its own next offset: two
followers of one topic may be at different places, and each gets every record once,
in order.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from .bus import CONTROL_FETCH_MAX_WAIT_MS, Bus

logger = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 1000
RETRY_S = 1.0  # after a failed poll (the broker gone): the fetcher reconnects meanwhile


@dataclass(eq=False)
class Following:
    """One follower of one topic (partition 0): what it is handed, and where it is."""

    tp: TopicPartition
    on_record: Callable[[ConsumerRecord, bool], None]
    """Called with each record in order, and whether it was appended after following
    began (``False``: read from the topic's history)."""
    on_current: Callable[[], None] | None
    """Called when a fetch found nothing more to read: the follower holds the whole
    topic at this moment."""
    next: int
    """Offset of the first record not yet handed over."""
    failed: bool = False
    """Its callback raised: it was dropped (the others go on)."""


class TopicReader:
    """A node's one consumer for its control-plane topics; :meth:`of` gives the bus's."""

    _readers: weakref.WeakKeyDictionary[Bus, TopicReader] = weakref.WeakKeyDictionary()

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._followings: dict[TopicPartition, list[Following]] = {}
        self._added: list[Following] = []
        self._removed: list[Following] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_poll: dict[TopicPartition, int | None] = {}

    @classmethod
    def of(cls, bus: Bus) -> TopicReader:
        """The one reader of ``bus`` (made on first use)."""
        reader = cls._readers.get(bus)
        if reader is None:
            reader = cls._readers[bus] = cls(bus)
        return reader

    async def follow(
        self,
        topic: str,
        on_record: Callable[[ConsumerRecord, bool], None],
        *,
        history: bool,
        on_current: Callable[[], None] | None = None,
    ) -> Following:
        """Follow partition 0 of ``topic``: with ``history``, first hand over everything
        up to its current end (returns after that), else only what is appended from now
        on."""
        tp = TopicPartition(topic, 0)
        start = await self._catch_up(tp, on_record if history else None)
        following = Following(tp, on_record, on_current, start)
        self._added.append(following)
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="topic-reader")
        return following

    async def unfollow(self, following: Following) -> None:
        """Stop handing records to ``following`` at once; the consumer is re-assigned in
        the reader's task, or, after the last follower, stopped before this returns."""
        self._drop(following)
        task = self._task
        if (
            task is not None
            and not self._added
            and all(f in self._removed for fs in self._followings.values() for f in fs)
        ):
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)

    def _drop(self, following: Following) -> None:
        if following in self._added:
            self._added.remove(following)
        else:
            self._removed.append(following)
        following.on_current = None
        following.on_record = _ignore
        self._changed.set()

    async def _catch_up(
        self, tp: TopicPartition, on_record: Callable[[ConsumerRecord, bool], None] | None
    ) -> int:
        """Hand over ``tp`` from its beginning up to its current end (``on_record``
        ``None``: only find the end); returns the offset to follow on from."""
        consumer = self._bus.consumer(CONTROL_FETCH_MAX_WAIT_MS)
        await consumer.start()
        try:
            end = (await consumer.end_offsets([tp]))[tp]
            if on_record is None:
                return end
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while (position := await consumer.position(tp)) < end:
                for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                    for record in records:
                        on_record(record, False)
            return position
        finally:
            await consumer.stop()

    async def _run(self) -> None:
        consumer = self._bus.consumer(CONTROL_FETCH_MAX_WAIT_MS)
        try:
            await consumer.start()
            while True:
                if self._added or self._removed:
                    await self._reassign(consumer)
                if not self._followings:
                    return
                try:
                    records = await self._poll(consumer)
                except KafkaError as exc:
                    logger.warning("control-plane reader: %s; retrying", exc)
                    await asyncio.sleep(RETRY_S)
                    continue
                await self._dispatch(consumer, records)
        except Exception:
            logger.exception("control-plane reader stopped")
            for following in [f for fs in self._followings.values() for f in fs] + self._added:
                following.failed = True
            self._added = []
            raise
        finally:
            self._followings.clear()
            self._last_poll.clear()
            await consumer.stop()
            if self._added:  # came while the consumer stopped
                self._task = asyncio.create_task(self._run(), name="topic-reader")

    async def _poll(self, consumer: AIOKafkaConsumer) -> dict:
        """The next records, or none as soon as a follower comes or goes."""
        poll = asyncio.ensure_future(consumer.getmany(timeout_ms=POLL_TIMEOUT_MS))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({poll, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            # Cancelled at its wait: records leave the fetcher's buffer only after it,
            # so none are lost (they are fetched again after the re-assignment).
            poll.cancel()
        (result,) = await asyncio.gather(poll, return_exceptions=True)
        if isinstance(result, asyncio.CancelledError):
            return {}
        if isinstance(result, BaseException):
            raise result
        return result

    async def _reassign(self, consumer: AIOKafkaConsumer) -> None:
        """Apply the followers that came and went: one new assignment, every partition
        seeked to where its followers are."""
        self._changed.clear()
        added, self._added = self._added, []
        removed, self._removed = self._removed, []
        for following in removed:
            others = self._followings.get(following.tp, [])
            if following in others:
                others.remove(following)
            if not others:
                self._followings.pop(following.tp, None)
        if not self._followings and not added:
            # Left as it is: the consumer stops next. (Stopping it in the same turn as
            # a new assignment hangs: aiokafka's fetcher swallows the cancellation while
            # it cancels the replaced assignment's fetches.)
            return
        kept = {tp: await consumer.position(tp) for tp in consumer.assignment()}
        seek = {tp: position for tp, position in kept.items() if tp in self._followings}
        for following in added:
            tp = following.tp
            seek[tp] = min(seek.get(tp, following.next), following.next)
            self._followings.setdefault(tp, []).append(following)
        reassigned = set(self._followings) != set(kept)
        if reassigned:
            consumer.assign(list(self._followings))
            self._last_poll = {tp: None for tp in self._followings}
        for tp, position in seek.items():
            if reassigned or kept[tp] != position:
                consumer.seek(tp, position)

    async def _dispatch(self, consumer: AIOKafkaConsumer, records: dict) -> None:
        for tp, batch in records.items():
            for record in batch:
                for following in list(self._followings.get(tp, ())):
                    if record.offset >= following.next:
                        following.next = record.offset + 1
                        self._hand(following, following.on_record, record, True)
        for tp in list(self._followings):
            # A fetch answered since the last poll (of this assignment: a new one
            # starts with none), and nothing left unread: the followers held the whole
            # topic at this moment.
            poll = consumer.last_poll_timestamp(tp)
            if poll is None or poll == self._last_poll.get(tp):
                continue
            self._last_poll[tp] = poll
            if await consumer.position(tp) >= (consumer.highwater(tp) or 0):
                for following in list(self._followings.get(tp, ())):
                    if following.on_current is not None:
                        self._hand(following, following.on_current)

    def _hand(self, following: Following, callback: Callable, *args) -> None:
        """Call a follower's callback; one that raises is dropped, not the reader."""
        try:
            callback(*args)
        except Exception:
            logger.exception("dropped a follower of %s", following.tp.topic)
            following.failed = True
            self._drop(following)


def _ignore(record: ConsumerRecord, live: bool) -> None:
    pass
