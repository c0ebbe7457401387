"""The history of publish sessions, for replays: which sessions ended, when, and
whether their frames are still in Kafka.

The registry (:mod:`whipcast.gateway.registry`) keeps one record per stream *name*,
overwritten by the next publish; every registry write also goes to the compacted
``{prefix}.sessions`` topic keyed ``{stream}/{session}``, so an ended session's record
(codecs, start, last heartbeat) survives a new publish, the ingest's exit and node
restarts. A session whose ingest crashed never wrote ``state="ended"``: its last
heartbeat (``updated_at``) is then its end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .bus import Bus
from .compacted import CompactedView
from .registry import StreamInfo, session_key


@dataclass(frozen=True, slots=True)
class Replay:
    info: StreamInfo
    ended_at: float
    """Unix time of the session's end (its last registry write)."""

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended_at - self.info.started_at)


class SessionsView(CompactedView[StreamInfo]):
    """This node's copy of the session history, followed live from Kafka."""

    def __init__(self, bus: Bus, live: Callable[[str], StreamInfo | None]) -> None:
        super().__init__(bus, bus.sessions_topic, StreamInfo.decode)
        self._bus = bus
        self._live = live

    async def start(self) -> None:
        await self._bus.create_sessions_topic()
        await super().start()

    def ended(self, info: StreamInfo) -> bool:
        """Ended: marked so, or no longer the live session of its stream name."""
        live = self._live(info.stream)
        return live is None or live.session != info.session

    def replays(self, retention_s: float) -> list[Replay]:
        """Ended sessions whose frames may still be in Kafka, newest first."""
        horizon = time.time() - retention_s
        found = [
            Replay(info, info.updated_at)
            for info in list(self.records.values())
            if info.updated_at > horizon and self.ended(info)
        ]
        return sorted(found, key=lambda r: r.ended_at, reverse=True)

    def latest_replay(self, stream: str, retention_s: float) -> Replay | None:
        return next((r for r in self.replays(retention_s) if r.info.stream == stream), None)

    def find(self, stream: str, session: int) -> StreamInfo | None:
        return self.records.get(session_key(stream, session))
