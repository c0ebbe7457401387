"""WHEP endpoint (draft-ietf-wish-whep): ``POST /whep/{stream}`` starts playing."""

from __future__ import annotations

from aiohttp import web
from whipcast.gateway.egress import EgressNode
from whipcast.gateway.settings import Settings

from . import resources
from .routing import Router


async def probe(request: web.Request) -> web.Response:
    """HEAD/GET on the endpoint lets players recognise a WHEP URL."""
    resources.stream_name(request)
    return web.Response(status=200, content_type=resources.SDP)


def add_routes(app: web.Application, egress: EgressNode, settings: Settings) -> None:
    async def play(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        offer = await resources.read_body(request, resources.SDP, settings.max_sdp_bytes)
        viewer, answer = await egress.play(stream, offer)
        location = resources.location(settings, f"/whep/{stream}/{viewer.resource_id}")
        return resources.created(viewer, answer, location, settings)

    async def patch(request: web.Request) -> web.Response:
        return await resources.patch(request, egress.find, settings)

    async def delete(request: web.Request) -> web.Response:
        return await resources.delete(request, egress.find)

    async def status(request: web.Request) -> web.Response:
        """The viewer's state for its page: video live or paused for a slow link,
        layer and bandwidth estimate (the resource URL is the capability)."""
        stream = resources.stream_name(request)
        viewer = egress.find(stream, request.match_info["resource"])
        if viewer is None:
            raise web.HTTPNotFound(reason="no such session (it may have ended)")
        response = web.json_response(viewer.status())
        response.headers["Cache-Control"] = "no-store"
        return response

    app.router.add_post("/whep/{stream}", play)
    app.router.add_get("/whep/{stream}", probe)  # aiohttp answers HEAD from GET
    app.router.add_options("/whep/{stream}", resources.options)
    app.router.add_get("/whep/{stream}/{resource}", status)
    app.router.add_patch("/whep/{stream}/{resource}", patch)
    app.router.add_delete("/whep/{stream}/{resource}", delete)
    app.router.add_options("/whep/{stream}/{resource}", resources.options)


def add_redirects(app: web.Application, router: Router, settings: Settings) -> None:
    """On a node without the egress role: send viewers to an egress node."""

    async def play(request: web.Request) -> web.Response:
        return resources.redirect(router.place_viewer(resources.stream_name(request)), request)

    app.router.add_post("/whep/{stream}", play)
    app.router.add_get("/whep/{stream}", probe)
    app.router.add_options("/whep/{stream}", resources.options)
