"""WHIP endpoint (RFC 9725): ``POST /whip/{stream}`` starts publishing."""

from __future__ import annotations

from aiohttp import web
from whipcast.gateway.ingest import IngestNode
from whipcast.gateway.settings import Settings

from . import resources
from .auth import require_token
from .routing import Router


def add_routes(app: web.Application, ingest: IngestNode, settings: Settings) -> None:
    async def publish(request: web.Request) -> web.Response:
        require_token(request, settings.publish_token)
        stream = resources.stream_name(request)
        offer = await resources.read_body(request, resources.SDP, settings.max_sdp_bytes)
        session, answer = await ingest.publish(stream, offer)
        location = resources.location(settings, f"/whip/{stream}/{session.resource_id}")
        return resources.created(session, answer, location, settings)

    async def patch(request: web.Request) -> web.Response:
        require_token(request, settings.publish_token)
        return await resources.patch(request, ingest.find, settings)

    async def delete(request: web.Request) -> web.Response:
        require_token(request, settings.publish_token)
        return await resources.delete(request, ingest.find)

    app.router.add_post("/whip/{stream}", publish)
    app.router.add_options("/whip/{stream}", resources.options)
    app.router.add_patch("/whip/{stream}/{resource}", patch)
    app.router.add_delete("/whip/{stream}/{resource}", delete)
    app.router.add_options("/whip/{stream}/{resource}", resources.options)


def add_redirects(app: web.Application, router: Router, settings: Settings) -> None:
    """On a node without the ingest role: send publishers to an ingest node."""

    async def publish(request: web.Request) -> web.Response:
        require_token(request, settings.publish_token)
        return resources.redirect(router.place_publisher(resources.stream_name(request)), request)

    app.router.add_post("/whip/{stream}", publish)
    app.router.add_options("/whip/{stream}", resources.options)
