"""Finding the keyframe at or before a point in a stream's past: the one way readers of
the log (replay, and later clips, recorders, thumbnails) turn a time into offsets.

Kafka's time index (``offsets_for_times``) finds the first record written at or after
a time; the keyframe before it is at most one GOP earlier, and the ingest bounds GOPs
(it asks the publisher for a keyframe after ``max_keyframe_interval``). So the finder
jumps to ``target - bound`` and reads forward at most to the target, keeping the last
keyframe: a few seconds of one partition, never minutes. A stream whose GOPs exceed the
bound is searched with a doubled bound a few times, then its next keyframe is used.
Record timestamps are the broker's append time, a few milliseconds after the frame's
ingest arrival time, which is what targets and positions are expressed in.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from .bus import Bus
from .frames import Frame, FrameFormatError, Track

WIDENINGS = 3  # times the search bound is doubled before falling forward
READ_TIMEOUT_S = 2.0  # one lookup's Kafka reads, at most


@dataclass(frozen=True, slots=True)
class SeekPoint:
    """Where to start reading so that playback begins on a keyframe."""

    video: int
    """Offset of the keyframe on the video partition."""
    audio: int
    """Offset of the first audio frame written at or after the keyframe."""
    keyframe_ms: float
    """Ingest arrival time of the keyframe (ms since the epoch)."""


@dataclass(frozen=True, slots=True)
class Extent:
    """What of a stream topic Kafka still holds."""

    first_ms: float | None
    """Append time of the oldest retained video record; ``None`` for an empty topic."""


class KeyframeFinder:
    """One node's lookups in stream topics; a single consumer, one lookup at a time
    (each takes a few milliseconds: one index lookup and one short read)."""

    def __init__(self, bus: Bus, bound_ms: float) -> None:
        self._bus = bus
        self._bound_ms = bound_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _assign(self, stream: str) -> tuple[TopicPartition, TopicPartition]:
        if self._consumer is None:  # made on first use: a node may never rewind
            consumer = self._bus.consumer()
            await consumer.start()
            self._consumer = consumer
        topic = self._bus.stream_topic(stream)
        video, audio = TopicPartition(topic, Track.VIDEO), TopicPartition(topic, Track.AUDIO)
        if self._consumer.assignment() != {video, audio}:
            self._consumer.assign([video, audio])
        return video, audio

    async def extent(self, stream: str) -> Extent:
        async with self._lock:
            video, _ = await self._assign(stream)
            found = (await self._consumer.offsets_for_times({video: 0}))[video]
            return Extent(found.timestamp if found is not None else None)

    async def find(self, stream: str, session: int, target_ms: float) -> SeekPoint | None:
        """The keyframe of ``session`` at or before ``target_ms``, else the first one
        after it; ``None`` if the session has no keyframe in Kafka near the target."""
        async with self._lock:
            video, audio = await self._assign(stream)
            end = (await self._consumer.end_offsets([video]))[video]
            bound = self._bound_ms
            for _ in range(WIDENINGS + 1):
                found = await self._scan(video, end, session, target_ms - bound, target_ms)
                if found is not None:
                    break
                bound *= 2
            else:
                found = await self._scan(
                    video, end, session, target_ms, target_ms + self._bound_ms, first=True
                )
            return None if found is None else await self._seek_point(audio, *found)

    async def oldest_keyframe(self, stream: str, session: int) -> SeekPoint | None:
        """The oldest keyframe of ``session`` still in Kafka (its first ones may have left
        with retention); ``None`` if none is found within one lookup's reads."""
        async with self._lock:
            video, audio = await self._assign(stream)
            end = (await self._consumer.end_offsets([video]))[video]
            found = await self._scan(video, end, session, 0, math.inf, first=True)
            return None if found is None else await self._seek_point(audio, *found)

    async def _seek_point(self, audio: TopicPartition, offset: int, keyframe: Frame) -> SeekPoint:
        """The keyframe and the first audio record appended at or after its arrival. The
        audio end is read first: with no such record yet, the next one appended is it
        (read after, a record appended in between would be skipped, and nodes would
        start their audio one frame apart)."""
        keyframe_ms = keyframe.arrival_us / 1000
        end = (await self._consumer.end_offsets([audio]))[audio]
        at = (await self._consumer.offsets_for_times({audio: int(keyframe_ms)}))[audio]
        return SeekPoint(offset, end if at is None else at.offset, keyframe_ms)

    async def newest_keyframe(self, stream: str, session: int, after_ms: float) -> Frame | None:
        """The newest keyframe of ``session`` appended after ``after_ms`` and within the
        search bound before now, with its bytes; ``None`` if there is none. Reads only
        that span of the video partition (thumbnails: one lookup per picture instead of
        a reader following every frame)."""
        async with self._lock:
            video, _ = await self._assign(stream)
            end = (await self._consumer.end_offsets([video]))[video]
            from_ms = max(after_ms, time.time() * 1000 - self._bound_ms)
            found = await self._scan(video, end, session, from_ms, math.inf)
            return None if found is None else found[1]

    async def _scan(
        self,
        video: TopicPartition,
        end: int,
        session: int,
        from_ms: float,
        to_ms: float,
        first: bool = False,
    ) -> tuple[int, Frame] | None:
        """Read video from ``from_ms`` up to ``to_ms``: the last keyframe of ``session``
        in that span (the first, if ``first``) as (offset, frame)."""
        start = (await self._consumer.offsets_for_times({video: max(0, int(from_ms))}))[video]
        if start is None:
            return None
        self._consumer.seek(video, start.offset)
        best = None
        position = start.offset
        deadline = time.monotonic() + READ_TIMEOUT_S
        while position < end and time.monotonic() < deadline:
            batches = await self._consumer.getmany(video, timeout_ms=200, max_records=200)
            for record in batches.get(video, []):
                position = record.offset + 1
                try:
                    frame = Frame.decode(record.value)
                except FrameFormatError:
                    continue
                arrival_ms = frame.arrival_us / 1000
                if arrival_ms > to_ms:
                    return best
                if frame.session == session and frame.keyframe:
                    best = (record.offset, frame)
                    if first:
                        return best
        return best
