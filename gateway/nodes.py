"""Which whipcast nodes are up, where they are reached, and how loaded they are.

Every node writes a :class:`NodeInfo` to the compacted ``{prefix}.nodes`` topic every
:data:`HEARTBEAT_S` and a tombstone when it stops; a node whose heartbeats have not
reached this node for :data:`STALE_AFTER_S` (by this node's clock, see
:mod:`whipcast.gateway.compacted`) is down. Signaling routes publishers and viewers
with it, and the stream registry treats streams of a down ingest as ended. Kafka is the
only store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from aiokafka.errors import KafkaError

from .bus import Bus
from .compacted import Beat, CompactedView, decode_known

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
STALE_AFTER_S = 2.0
CPU_SMOOTHING = 0.15  # per heartbeat: about 3 s to follow a change
MEDIA_ROLES = frozenset({"ingest", "egress"})
"""Roles that take WebRTC sessions: readers of the log (thumbnails, hls, record) and
signaling do not, so they are not media nodes."""


def rendezvous(key: str, members: Iterable[str]) -> str | None:
    """The member that owns ``key``: the highest hash of (key, member).

    Every node computes the same answer from the same member list, and a member joining
    or leaving moves only the keys it gains or had."""
    return max(members, key=lambda m: hashlib.sha256(f"{key}\0{m}".encode()).digest(), default=None)


@dataclass
class NodeInfo(Beat):
    node: str
    roles: list[str]
    url: str
    """Base URL clients are redirected to (``--advertise-url``)."""
    publishers: int = 0
    viewers: int = 0
    max_publishers: int = 0
    max_viewers: int = 0
    cpu_percent: float = 0.0
    """CPU used by the node's process, in % of one core, smoothed over a few seconds
    (joins cost a burst of DTLS handshakes that must not make a node look full)."""
    bytes_total: int = 0
    """Media bytes this node has taken in (ingest) and sent (egress) so far."""
    bitrate_bps: int = 0
    """Media throughput over the last heartbeat, from ``bytes_total``."""
    sessions_started: int = 0
    """WHIP/WHEP sessions this node has taken so far: lets signaling tell which of its
    redirects have arrived."""
    streams: dict[str, int] = field(default_factory=dict)
    """Viewers per stream on this node (egress)."""
    publishing: list[str] = field(default_factory=list)
    """Streams published to this node (ingest)."""
    updated_at: float = field(default_factory=time.time)
    """The writer's wall clock: for people reading the topic, never for liveness."""

    @property
    def media(self) -> bool:
        """Takes publishers or viewers (runs :data:`MEDIA_ROLES`)."""
        return not MEDIA_ROLES.isdisjoint(self.roles)

    @property
    def alive(self) -> bool:
        """Heard from within :data:`STALE_AFTER_S`, judged by this node's clock."""
        return self.silence() < STALE_AFTER_S

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, value: bytes) -> NodeInfo:
        return decode_known(cls, value)


class NodeView(CompactedView[NodeInfo]):
    def __init__(self, bus: Bus) -> None:
        super().__init__(
            bus,
            bus.nodes_topic,
            NodeInfo.decode,
            confirm=lambda info: True,
            heartbeat_s=HEARTBEAT_S,
            stale_after_s=STALE_AFTER_S,
        )

    def alive(self, role: str) -> list[NodeInfo]:
        return [n for n in self.records.values() if role in n.roles and n.alive]

    def is_down(self, node_id: str) -> bool:
        """Known, and silent for too long (a cleanly stopped node leaves no record)."""
        info = self.records.get(node_id)
        return info is not None and not info.alive


class Heartbeat:
    """Publishes this node's :class:`NodeInfo` until stopped, then a tombstone."""

    def __init__(self, bus: Bus, describe: Callable[[], NodeInfo]) -> None:
        self._bus = bus
        self._describe = describe
        self._task: asyncio.Task | None = None
        self._cpu = (time.process_time(), time.monotonic())
        self._cpu_percent = 0.0
        self._bytes = 0

    async def start(self) -> None:
        await self._beat()
        self._task = asyncio.create_task(self._run(), name="node-heartbeat")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.wait_for(self._bus.send_record(self._bus.nodes_topic, self._id, None), 2)
        except (KafkaError, TimeoutError):
            pass  # the record goes stale on its own

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await asyncio.wait_for(self._beat(), HEARTBEAT_S * 4)
            except (KafkaError, TimeoutError) as exc:
                logger.debug("node heartbeat not written: %s", exc)

    async def _beat(self) -> None:
        info = self._describe()
        cpu, wall = time.process_time(), time.monotonic()
        elapsed = max(wall - self._cpu[1], 1e-3)
        recent = 100 * (cpu - self._cpu[0]) / elapsed
        info.bitrate_bps = int(8 * max(0, info.bytes_total - self._bytes) / elapsed)
        self._bytes = info.bytes_total
        self._cpu = (cpu, wall)
        self._cpu_percent += CPU_SMOOTHING * (recent - self._cpu_percent)
        info.cpu_percent = round(self._cpu_percent, 1)
        self._id = info.node
        await self._bus.send_record(self._bus.nodes_topic, info.node, info.encode())
