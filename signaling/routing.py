"""Placing sessions on media nodes when signaling runs apart from them.

A signaling-only node answers ``POST /whip/{stream}`` and ``POST /whep/{stream}`` with
``307 Temporary Redirect`` (RFC 9725 section 4.5) to the chosen node's own endpoint;
the client re-sends its offer there and keeps talking to that node (the session URL in
``Location`` is absolute), so signaling never sits in the media or session path.
Redirecting rather than proxying keeps signaling stateless and cheap, and lets
resource URLs (PATCH/DELETE) work without a lookup.

Placement: a publisher goes to the least-loaded ingest; a viewer to an egress already
serving its stream while it has room (one Kafka read per stream per node), else to the
least-loaded egress. Loads come from the node registry (heartbeats every 0.5 s) plus
the redirects this signaling node sent that the nodes' heartbeats do not show yet (each
node reports how many sessions it has taken), so a burst of joins is counted once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from whipcast.gateway.errors import NotLive, Unavailable
from whipcast.gateway.nodes import NodeInfo, NodeView
from whipcast.gateway.registry import RegistryView
from whipcast.gateway.settings import Settings

RESERVATION_S = 3.0
"""A redirected client that has not reached its node by then is not coming."""


class NoCapacity(Unavailable):
    pass


@dataclass
class _Pending:
    """Redirects to one node its heartbeats do not show yet."""

    placed: list[tuple[float, str]] = field(default_factory=list)  # (time, stream)
    seen_started: int | None = None

    def update(self, node: NodeInfo) -> None:
        """Forget placements the node has taken since (its session counter moved on),
        oldest first, and those that expired."""
        if self.seen_started is not None:
            arrived = max(0, node.sessions_started - self.seen_started)
            del self.placed[:arrived]
        self.seen_started = node.sessions_started
        cutoff = time.monotonic() - RESERVATION_S
        self.placed = [p for p in self.placed if p[0] > cutoff]

    def count(self, stream: str | None = None) -> int:
        return sum(1 for _, s in self.placed if stream in (None, s))


class Router:
    def __init__(self, settings: Settings, nodes: NodeView, streams: RegistryView) -> None:
        self._settings = settings
        self._nodes = nodes
        self._streams = streams
        self._pending: dict[str, _Pending] = defaultdict(_Pending)

    def _alive(self, role: str) -> list[tuple[NodeInfo, _Pending]]:
        out = []
        for node in self._nodes.alive(role):
            pending = self._pending[node.node]
            pending.update(node)
            out.append((node, pending))
        return out

    def _has_room(self, node: NodeInfo, load: int, limit: int) -> bool:
        return load < limit and node.cpu_percent < self._settings.max_cpu_percent

    def _place(self, node: NodeInfo, stream: str) -> str:
        self._pending[node.node].placed.append((time.monotonic(), stream))
        return node.url

    def place_publisher(self, stream: str) -> str:
        """Base URL of the ingest node that should take this publish."""
        fitting = [
            (n.publishers + p.count(), n)
            for n, p in self._alive("ingest")
            if self._has_room(n, n.publishers + p.count(), n.max_publishers)
        ]
        if not fitting:
            raise NoCapacity("no ingest node can take a publisher now; try again shortly")
        return self._place(min(fitting, key=lambda c: (c[0], c[1].cpu_percent))[1], stream)

    def place_viewer(self, stream: str, replay: bool = False) -> str:
        """Base URL of the egress node that should take this viewer (a ``replay`` may
        be of a broadcast that ended: the egress node checks it is in Kafka)."""
        if not replay and self._streams.get(stream) is None:
            raise NotLive(f"stream {stream!r} is not live")
        fitting = [
            (n.viewers + p.count(), n.streams.get(stream, 0) + p.count(stream), n)
            for n, p in self._alive("egress")
            if self._has_room(n, n.viewers + p.count(), n.max_viewers)
        ]
        if not fitting:
            raise NoCapacity("no egress node can take a viewer now; try again shortly")
        serving = [f for f in fitting if f[1] > 0]
        if serving:  # co-locate: the node with most viewers of this stream that has room
            return self._place(max(serving, key=lambda f: (f[1], -f[0]))[2], stream)
        return self._place(min(fitting, key=lambda f: (f[0], f[2].cpu_percent))[2], stream)
