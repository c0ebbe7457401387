"""A whipcast node: the aiohttp application and the media roles it runs.

Roles are independent and talk only through Kafka, so one process may run all of them
(``whipcast dev``) or one each (``whipcast ingest`` / ``egress`` / ``signaling``).
Everything a node owns is started in ``on_startup`` and stopped in ``on_cleanup``, in
reverse order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from aiohttp import web
from whipcast.gateway.bus import Bus
from whipcast.gateway.clips import Clipper
from whipcast.gateway.codecs import install_passthrough_codecs
from whipcast.gateway.egress import EgressNode
from whipcast.gateway.hls.packager import HlsPackager
from whipcast.gateway.ingest import IngestNode
from whipcast.gateway.metrics import GatewayCollector, Metrics
from whipcast.gateway.nodes import Heartbeat, NodeInfo, NodeView
from whipcast.gateway.peer import use_host_addresses
from whipcast.gateway.playback import Rewinder
from whipcast.gateway.recorder import Recorder
from whipcast.gateway.registry import RegistryView
from whipcast.gateway.sessions import SessionsView
from whipcast.gateway.settings import Settings
from whipcast.gateway.thumbnails import ThumbnailMaker

from . import (
    clips_api,
    directory,
    hls_api,
    observability,
    openapi,
    pages,
    qa_api,
    recordings_api,
    security,
    thumbnails_api,
    whep,
    whip,
)
from .directory import Directory
from .kafkalog import StateLog
from .problem import problems_middleware
from .qa import QAService
from .resources import cors_middleware
from .routing import Router
from .thumbnails_api import Thumbnails

logger = logging.getLogger(__name__)

ROLES = ("ingest", "egress", "signaling", "thumbnails", "hls", "record")
"""Every role; ``record`` runs only where a recording directory is set."""


@dataclass
class Node:
    settings: Settings
    roles: tuple[str, ...]
    metrics: Metrics = field(init=False)
    bus: Bus = field(init=False)
    nodes: NodeView = field(init=False)
    view: RegistryView = field(init=False)
    heartbeat: Heartbeat = field(init=False)
    state_log: StateLog = field(init=False)
    directory: Directory = field(init=False)
    ingest: IngestNode | None = None
    egress: EgressNode | None = None
    sessions: SessionsView = field(init=False)
    rewinder: Rewinder | None = None
    qa: QAService | None = None
    thumbnails: Thumbnails | None = None
    thumbnail_maker: ThumbnailMaker | None = None
    clipper: Clipper | None = None
    recorder: Recorder | None = None
    hls: HlsPackager | None = None
    started_at: float = field(default_factory=time.time)
    ready: bool = False

    def __post_init__(self) -> None:
        self.metrics = Metrics()
        self.bus = Bus(self.settings, self.metrics)
        self.nodes = NodeView(self.bus)
        self.view = RegistryView(self.bus, self.nodes)
        self.sessions = SessionsView(self.bus, self.view.get)
        self.heartbeat = Heartbeat(self.bus, self.describe)
        if "ingest" in self.roles:
            self.ingest = IngestNode(self.settings, self.bus, self.view)
        if "egress" in self.roles:
            self.egress = EgressNode(self.settings, self.bus, self.view)
            self.rewinder = Rewinder(self.egress, self.sessions)
            self.clipper = Clipper(self.rewinder)
        self.state_log = StateLog(self.settings)
        self.directory = Directory(self.settings, self.bus, self.state_log)
        if "signaling" in self.roles:
            self.qa = QAService(self.settings, self.bus, self.view, self.state_log, self.metrics)
            self.thumbnails = Thumbnails(self.settings, self.bus, self.state_log)
        if "thumbnails" in self.roles:
            self.thumbnail_maker = ThumbnailMaker(self.settings, self.bus, self.view, self.nodes)
        if "record" in self.roles:
            assert self.settings.record_dir is not None
            self.recorder = Recorder(self.settings, self.bus, self.view, self.sessions)
        if "hls" in self.roles:
            self.hls = HlsPackager(self.settings, self.bus, self.view, self.sessions)
        sources = [part.snapshot for part in (self.ingest, self.egress) if part is not None]
        node_metrics = self._node_metrics()
        if self.thumbnail_maker is not None:
            node_metrics.update(self.thumbnail_maker.snapshot_metrics())
        if self.clipper is not None:
            node_metrics.update(self.clipper.snapshot_metrics())
        if self.recorder is not None:
            node_metrics.update(self.recorder.snapshot_metrics())
        if self.hls is not None:
            node_metrics.update(self.hls.snapshot_metrics())
        self.metrics.registry.register(GatewayCollector(sources, node_metrics))

    def _node_metrics(self) -> dict:
        bus = self.bus
        publishers = self.ingest.sessions if self.ingest else {}
        viewers = self.egress.viewers if self.egress else {}
        return {
            "whipcast_kafka_up": ("gauge", "1 while Kafka answers", lambda: int(bus.reachable)),
            "whipcast_kafka_produce_errors": (
                "counter", "Frames Kafka did not take", lambda: bus.produce_errors,
            ),
            "whipcast_publishers": (
                "gauge", "Open publisher connections", lambda: len(publishers),
            ),
            "whipcast_viewers": (
                "gauge", "Open viewer connections", lambda: len(viewers),
            ),
        }  # fmt: skip

    async def start(self) -> None:
        install_passthrough_codecs()
        use_host_addresses(self.settings.ice_host_addresses)
        await self.bus.start()
        await self.nodes.start()
        await self.view.start()
        await self.sessions.start()
        await self.state_log.start()
        await self.directory.start()
        parts = (self.ingest, self.egress, self.qa, self.thumbnails, self.thumbnail_maker,
                 self.recorder, self.hls)  # fmt: skip
        for part in parts:
            if part is not None:
                await part.start()
        await self.heartbeat.start()
        self.ready = True
        logger.info("node %s ready with roles %s", self.settings.node_id, ",".join(self.roles))

    async def stop(self) -> None:
        self.ready = False
        await self.heartbeat.stop()
        if self.rewinder is not None:
            await self.rewinder.stop()
        parts = (self.hls, self.recorder, self.thumbnail_maker, self.thumbnails, self.qa,
                 self.egress, self.ingest)  # fmt: skip
        for part in parts:
            if part is not None:
                await part.stop()
        await self.directory.stop()
        await self.state_log.stop()
        await self.sessions.stop()
        await self.view.stop()
        await self.nodes.stop()
        await self.bus.stop()

    def describe(self) -> NodeInfo:
        """This node's entry in the node registry (sent every heartbeat)."""
        settings = self.settings
        info = NodeInfo(
            node=settings.node_id,
            roles=list(self.roles),
            url=settings.url,
            max_publishers=settings.max_publishers,
            max_viewers=settings.max_viewers,
        )
        if self.ingest is not None:
            info.publishers = len(self.ingest.sessions)
            info.sessions_started += self.ingest.started
            info.publishing = sorted(self.ingest.sessions)
            info.bytes_total += sum(sum(s.stats.bytes) for s in self.ingest.sessions.values())
        if self.egress is not None:
            info.viewers = len(self.egress.viewers)
            info.sessions_started += self.egress.started
            # Counted from sessions, which exist from the POST on, like sessions_started.
            info.streams = dict(self.egress.viewer_counts())
            info.bytes_total += self.egress.octets_sent()
        return info


NODE = web.AppKey("node", Node)


def make_app(settings: Settings, roles: tuple[str, ...] = ROLES) -> web.Application:
    if settings.record_dir is None:
        roles = tuple(role for role in roles if role != "record")
    node = Node(settings, roles)
    app = web.Application(
        middlewares=[count_requests(node.metrics), cors_middleware, problems_middleware],
        client_max_size=settings.max_sdp_bytes + 1024,
    )
    app[NODE] = node
    app.on_response_prepare.append(security.add_headers)
    observability.add_routes(app, node)
    router = Router(settings, node.nodes, node.view)
    if node.ingest is not None:
        whip.add_routes(app, node.ingest, settings)
    else:
        whip.add_redirects(app, router, settings)
    if node.egress is not None:
        assert node.rewinder is not None
        whep.add_routes(app, node.egress, node.rewinder, settings)
    else:
        whep.add_redirects(app, router, settings)
    pages.add_routes(app, node, with_pages="signaling" in roles)
    directory.add_routes(app, node.directory, settings)
    if node.qa is not None:
        qa_api.add_routes(app, node.qa, settings)
    if node.thumbnails is not None:
        thumbnails_api.add_routes(app, node.thumbnails)
    if node.clipper is not None:
        clips_api.add_routes(app, node.clipper)
    recordings_api.add_routes(app, settings)
    if node.hls is not None:
        hls_api.add_routes(app, node.hls, settings)
    openapi.add_routes(app)

    async def lifecycle(app: web.Application):
        await node.start()
        yield
        await node.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


def count_requests(metrics: Metrics):
    """Count every request by route pattern (not path: bounded labels) and status."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.http_requests.labels(route, request.method, str(status)).inc()

    return middleware
