"""Thumbnails: the latest picture of every live stream, for the directory and replays.

A reader of the log beside egress, never on the live path. Every
``thumbnail_interval`` seconds it looks up each live stream it owns (:func:`rendezvous`
over the nodes running this role, so a cluster decodes each keyframe once, and a node
that goes down hands its streams to the others within seconds) for its newest video keyframe in
Kafka (:class:`~whipcast.gateway.keyframes.KeyframeFinder`: the time index, then a
short read of the video partition since the last picture), decodes it if it has not
been pictured yet, scales it to ``thumbnail_width`` pixels wide and writes it as a JPEG
to the compacted topic ``{prefix}.thumbnails`` (key = stream name). No reader follows
a stream between pictures, so a stream costs a few requests per interval, not a fetch
per frame. Decoding and encoding run
in one worker thread, so a node spends at most about one core on pictures and the event
loop never waits for FFmpeg. Nothing is deleted when a stream ends: its last picture
stays for the replay list.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import av
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError

from .bus import Bus
from .frames import Codec, Frame
from .keyframes import KeyframeFinder
from .nodes import NodeView, rendezvous
from .registry import RegistryView
from .settings import Settings

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# version, width, height, time the keyframe reached ingest (ms since the epoch); then JPEG
_HEADER = struct.Struct(">BHHQ")
_DECODERS = {Codec.H264: "h264", Codec.VP8: "vp8"}
JPEG_QUALITY = 4
"""FFmpeg's JPEG quantiser (2 = best, 31 = worst): small files that still look sharp."""
TOPIC_CONFIGS = {
    "cleanup.policy": "compact",
    # Short segments so the cleaner can drop superseded pictures within minutes.
    "segment.ms": "600000",
    "segment.bytes": str(16 * 1024 * 1024),
}


def thumbnails_topic(prefix: str) -> str:
    return f"{prefix}.thumbnails"


def topic_spec(settings: Settings) -> NewTopic:
    """The compacted topic; every role that reads or writes it creates it the same way
    (the replication factor is the creator's: ``Bus.create_topics``, ``StateLog.ensure``)."""
    return NewTopic(thumbnails_topic(settings.topic_prefix), 1, 1, topic_configs=TOPIC_CONFIGS)


@dataclass(frozen=True, slots=True)
class Thumbnail:
    width: int
    height: int
    taken_ms: int
    """When the pictured keyframe reached ingest (ms since the epoch)."""
    jpeg: bytes

    def encode(self) -> bytes:
        header = _HEADER.pack(FORMAT_VERSION, self.width, self.height, self.taken_ms)
        return header + self.jpeg

    @classmethod
    def decode(cls, value: bytes) -> Thumbnail:
        if len(value) <= _HEADER.size:
            raise ValueError("thumbnail record shorter than its header")
        version, width, height, taken_ms = _HEADER.unpack_from(value)
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown thumbnail format version {version}")
        return cls(width, height, taken_ms, value[_HEADER.size :])


def picture(frame: Frame, width: int) -> Thumbnail:
    """Decode one keyframe and encode it as a JPEG at most ``width`` pixels wide.

    Blocking (FFmpeg); runs in the worker thread. Raises ``ValueError`` when the frame
    does not decode to a picture.
    """
    decoder = av.CodecContext.create(_DECODERS[frame.codec], "r")
    try:
        decoded = decoder.decode(av.Packet(frame.payload)) + decoder.decode(None)
    except av.FFmpegError as exc:
        raise ValueError(f"keyframe does not decode: {exc}") from None
    if not decoded or not decoded[-1].width:
        raise ValueError("keyframe decoded to no picture")
    source = decoded[-1]
    out_width = min(width, source.width) // 2 * 2
    out_height = max(2, round(source.height * out_width / source.width / 2) * 2)
    scaled = source.reformat(width=out_width, height=out_height, format="yuvj420p")
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = out_width, out_height, "yuvj420p"
    encoder.time_base = fractions.Fraction(1, 1)
    encoder.options = {"qmin": str(JPEG_QUALITY), "qmax": str(JPEG_QUALITY)}
    jpeg = b"".join(bytes(packet) for packet in encoder.encode(scaled) + encoder.encode(None))
    return Thumbnail(out_width, out_height, frame.arrival_us // 1000, jpeg)


class ThumbnailMaker:
    """The ``thumbnails`` role: one picture per live stream and interval."""

    def __init__(self, settings: Settings, bus: Bus, view: RegistryView, nodes: NodeView) -> None:
        self.settings = settings
        self._bus = bus
        self._view = view
        self._nodes = nodes
        self.topic = thumbnails_topic(settings.topic_prefix)
        self._finder = KeyframeFinder(bus, settings.rewind_search_s * 1000)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="thumbnails")
        self._task: asyncio.Task | None = None
        self._live: dict[str, int] = {}
        """Streams live at the last round: name -> session."""
        self._pictured: dict[str, int] = {}
        """Arrival time (µs) of the keyframe last pictured, per stream."""
        self.pictures = 0
        self.errors = 0

    async def start(self) -> None:
        await self._bus.create_topics([topic_spec(self.settings)])
        self._task = asyncio.create_task(self._run(), name="thumbnails")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._finder.stop()
        self._worker.shutdown(wait=True, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            live = {
                info.stream: info.session
                for info in self._view.live_streams()
                if self.owns(info.stream)
            }
            # A stream that ended since the last round gets its last keyframe pictured.
            for stream, session in {**self._live, **live}.items():
                await self._picture(stream, session)
            for stream in set(self._pictured) - set(live):
                del self._pictured[stream]
            self._live = live
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.5, self.settings.thumbnail_interval - elapsed))

    def owns(self, stream: str) -> bool:
        """Whether this node pictures ``stream``. Before its own heartbeat is back, a
        node counts itself in: two nodes picturing a stream for a round is harmless."""
        makers = {node.node for node in self._nodes.alive("thumbnails")}
        makers.add(self.settings.node_id)
        return rendezvous(stream, makers) == self.settings.node_id

    async def _picture(self, stream: str, session: int) -> None:
        pictured_us = self._pictured.get(stream, 0)
        try:
            frame = await self._finder.newest_keyframe(stream, session, pictured_us / 1000)
        except KafkaError as exc:
            logger.warning("no thumbnail for %s: %s", stream, exc)
            return
        if frame is None or frame.arrival_us <= pictured_us or frame.codec not in _DECODERS:
            return
        self._pictured[stream] = frame.arrival_us
        loop = asyncio.get_running_loop()
        width = self.settings.thumbnail_width
        try:
            thumbnail = await loop.run_in_executor(self._worker, picture, frame, width)
            await self._bus.send_record(self.topic, stream, thumbnail.encode())
        except (ValueError, KafkaError) as exc:
            self.errors += 1
            logger.warning("no thumbnail for %s: %s", stream, exc)
            return
        self.pictures += 1

    def snapshot_metrics(self) -> dict:
        """Counters for ``/metrics`` (read at scrape time)."""
        return {
            "whipcast_thumbnails_written": (
                "counter", "Keyframes decoded and written as thumbnails", lambda: self.pictures,
            ),
            "whipcast_thumbnail_errors": (
                "counter", "Keyframes that gave no thumbnail", lambda: self.errors,
            ),
            "whipcast_thumbnail_streams": (
                "gauge", "Live streams pictured for thumbnails", lambda: len(self._live),
            ),
        }  # fmt: skip
