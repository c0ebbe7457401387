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

from gateway.bus import Bus
from gateway.codecs import install_passthrough_codecs
from gateway.egress import EgressNode
from gateway.ingest import IngestNode
from gateway.peer import use_host_addresses
from gateway.registry import RegistryView
from gateway.settings import Settings

from . import pages, whep, whip
from .problem import problems_middleware
from .resources import cors_middleware

logger = logging.getLogger(__name__)

ROLES = ("ingest", "egress", "signaling")


@dataclass
class Node:
    settings: Settings
    roles: tuple[str, ...]
    bus: Bus = field(init=False)
    view: RegistryView = field(init=False)
    ingest: IngestNode | None = None
    egress: EgressNode | None = None
    started_at: float = field(default_factory=time.time)
    ready: bool = False

    def __post_init__(self) -> None:
        self.bus = Bus(self.settings)
        self.view = RegistryView(self.bus)
        if "ingest" in self.roles:
            self.ingest = IngestNode(self.settings, self.bus, self.view)
        if "egress" in self.roles:
            self.egress = EgressNode(self.settings, self.bus, self.view)

    async def start(self) -> None:
        install_passthrough_codecs()
        use_host_addresses(self.settings.ice_host_addresses)
        await self.bus.start()
        await self.view.start()
        for part in (self.ingest, self.egress):
            if part is not None:
                await part.start()
        self.ready = True
        logger.info("node %s ready with roles %s", self.settings.node_id, ",".join(self.roles))

    async def stop(self) -> None:
        self.ready = False
        for part in (self.egress, self.ingest):
            if part is not None:
                await part.stop()
        await self.view.stop()
        await self.bus.stop()


NODE = web.AppKey("node", Node)


def make_app(settings: Settings, roles: tuple[str, ...] = ROLES) -> web.Application:
    app = web.Application(
        middlewares=[cors_middleware, problems_middleware],
        client_max_size=settings.max_sdp_bytes + 1024,
    )
    node = Node(settings, roles)
    app[NODE] = node
    if node.ingest is not None:
        whip.add_routes(app, node.ingest, settings)
    if node.egress is not None:
        whep.add_routes(app, node.egress, settings)
    pages.add_routes(app, node, with_pages="signaling" in roles)

    async def lifecycle(app: web.Application):
        await node.start()
        yield
        await node.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
