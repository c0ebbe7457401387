"""Which streams are live, with which codecs, on which ingest: kept in Kafka.

The owning ingest writes a :class:`StreamInfo` record to the compacted registry topic
when a publish starts, re-writes it every :data:`HEARTBEAT_S` seconds while media
flows, and writes ``state="ended"`` when it stops. Every node reads the whole topic
into a :class:`RegistryView`; a record whose heartbeat has not reached this node for
:data:`STALE_AFTER_S` (by this node's clock, see :mod:`whipcast.gateway.compacted`)
counts as ended, so a crashed ingest cannot leave a stream "live" for ever.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from .bus import Bus
from .compacted import Beat, CompactedView, decode_known
from .nodes import NodeView

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
class StreamInfo(Beat):
    stream: str
    session: int
    node: str
    state: str = "live"
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    """The writer's wall clock: when the owning ingest sent this heartbeat (it paces
    its own heartbeats with it); never compared with another machine's clock."""
    video: dict | None = None
    audio: dict | None = None
    layers: list[dict] | None = None
    """Simulcast video layers, best first: ``{"layer", "rid", "width", "height",
    "bitrate"}`` each (``bitrate`` in bit/s as ingest measured it, sizes from the
    last keyframe; unknown values ``None``). ``None`` or one entry: a single layer."""

    @property
    def live(self) -> bool:
        """Published, and heard from within :data:`STALE_AFTER_S` by this node's clock."""
        return self.state == "live" and self.silence() < STALE_AFTER_S

    def codec(self, kind: str) -> RTCRtpCodecParameters | None:
        data = self.video if kind == "video" else self.audio
        return codec_from_dict(data) if data else None

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, value: bytes) -> StreamInfo:
        return decode_known(cls, value)


async def publish(bus: Bus, info: StreamInfo) -> None:
    """Write the registry record, and the same record to the session history
    (:mod:`whipcast.gateway.sessions`), where it outlives the next publish."""
    info.updated_at = time.time()
    value = info.encode()
    await asyncio.gather(
        bus.send_record(bus.registry_topic, info.stream, value),
        bus.send_record(bus.sessions_topic, session_key(info.stream, info.session), value),
    )


def session_key(stream: str, session: int) -> str:
    return f"{stream}/{session:08x}"


class RegistryView(CompactedView[StreamInfo]):
    """This node's copy of the registry, followed live from Kafka.

    A stream counts as live while its record says so, its heartbeat is fresh, and the
    ingest node that owns it has not stopped heartbeating (``nodes``).
    """

    def __init__(self, bus: Bus, nodes: NodeView) -> None:
        super().__init__(
            bus,
            bus.registry_topic,
            StreamInfo.decode,
            confirm=lambda info: info.state == "live",
            heartbeat_s=HEARTBEAT_S,
            stale_after_s=STALE_AFTER_S,
        )
        self._nodes = nodes

    def get(self, stream: str) -> StreamInfo | None:
        """The stream's record if it is live now, else ``None``."""
        info = self.records.get(stream)
        if info is None or not info.live or self._nodes.is_down(info.node):
            return None
        return info

    def live_streams(self) -> list[StreamInfo]:
        return [info for name in list(self.records) if (info := self.get(name)) is not None]
