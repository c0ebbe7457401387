"""Which streams are live, with which codecs, on which ingest: kept in Kafka.

The owning ingest writes a :class:`StreamInfo` record to the compacted registry topic
when a publish starts, re-writes it every :data:`HEARTBEAT_S` seconds while media
flows, and writes ``state="ended"`` when it stops. Every node reads the whole topic
into a :class:`RegistryView`; a record whose heartbeat is older than
:data:`STALE_AFTER_S` counts as ended, so a crashed ingest cannot leave a stream
"live" for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from aiokafka.structs import TopicPartition
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from .bus import CONTROL_FETCH_MAX_WAIT_MS, Bus

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
STALE_AFTER_S = 3 * HEARTBEAT_S


def codec_to_dict(codec: RTCRtpCodecParameters) -> dict:
    return {
        "mimeType": codec.mimeType,
        "clockRate": codec.clockRate,
        "channels": codec.channels,
        "parameters": {k: v for k, v in codec.parameters.items() if v is not None},
    }


def codec_from_dict(data: dict) -> RTCRtpCodecParameters:
    return RTCRtpCodecParameters(
        mimeType=data["mimeType"],
        clockRate=data["clockRate"],
        channels=data.get("channels"),
        parameters=dict(data.get("parameters", {})),
    )


@dataclass
class StreamInfo:
    stream: str
    session: int
    node: str
    state: str = "live"
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    video: dict | None = None
    audio: dict | None = None

    @property
    def live(self) -> bool:
        return self.state == "live" and time.time() - self.updated_at < STALE_AFTER_S

    def codec(self, kind: str) -> RTCRtpCodecParameters | None:
        data = self.video if kind == "video" else self.audio
        return codec_from_dict(data) if data else None

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, value: bytes) -> StreamInfo:
        return cls(**json.loads(value))


async def publish(bus: Bus, info: StreamInfo) -> None:
    info.updated_at = time.time()
    await bus.send_record(bus.registry_topic, info.stream, info.encode())


class RegistryView:
    """This node's copy of the registry, followed live from Kafka."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._streams: dict[str, StreamInfo] = {}
        self._listeners: list[Callable[[StreamInfo], None]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load the registry up to its current end, then keep following it."""
        consumer = self._bus.consumer(CONTROL_FETCH_MAX_WAIT_MS)
        await consumer.start()
        tp = TopicPartition(self._bus.registry_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                for record in records:
                    self._apply(record.key, record.value)
        self._task = asyncio.create_task(self._follow(consumer), name="registry-view")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self, consumer) -> None:
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        self._apply(record.key, record.value)
        finally:
            await consumer.stop()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        name = key.decode(errors="replace")
        if value is None:
            self._streams.pop(name, None)
            return
        try:
            info = StreamInfo.decode(value)
        except (ValueError, TypeError):
            logger.warning("ignoring malformed registry record for %r", name)
            return
        self._streams[name] = info
        for listener in self._listeners:
            listener(info)
        self._changed.set()
        self._changed = asyncio.Event()

    def on_change(self, listener: Callable[[StreamInfo], None]) -> None:
        self._listeners.append(listener)

    def get(self, stream: str) -> StreamInfo | None:
        """The stream's record if it is live now, else ``None``."""
        info = self._streams.get(stream)
        return info if info is not None and info.live else None

    def live_streams(self) -> list[StreamInfo]:
        return [info for info in self._streams.values() if info.live]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (bounded) until ``predicate()`` holds after some registry update."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True
