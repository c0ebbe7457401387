"""WHEP endpoint (draft-ietf-wish-whep): ``POST /whep/{stream}`` starts playing.

``?start=`` (seconds before the live edge, epoch ms or an ISO date) starts in the
past, also of an ended broadcast still in Kafka; ``?session=`` picks one of several
broadcasts of the same name. Every session resource has a position API
(``{session}/position``, announced in a ``Link`` header) to seek, pause and go live.
"""

from __future__ import annotations

import json
import math

from aiohttp import web
from whipcast.gateway.egress import EgressNode
from whipcast.gateway.errors import SessionError
from whipcast.gateway.playback import OutOfWindow, Rewinder
from whipcast.gateway.settings import Settings

from . import jsonbody, resources
from .routing import Router

POSITION_REL = "urn:whipcast:position"


async def probe(request: web.Request) -> web.Response:
    """HEAD/GET on the endpoint lets players recognise a WHEP URL."""
    resources.stream_name(request)
    return web.Response(status=200, content_type=resources.SDP)


def add_routes(
    app: web.Application, egress: EgressNode, rewinder: Rewinder, settings: Settings
) -> None:
    async def play(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        start = request.query.get("start")
        session = request.query.get("session")
        offer = await resources.read_body(request, resources.SDP, settings.max_sdp_bytes)
        try:
            if start is None and session is None:
                viewer, answer = await egress.play(stream, offer)
            else:
                viewer, answer = await rewinder.play(stream, offer, start or "0", session)
        except OutOfWindow as exc:
            return out_of_window(exc)
        path = f"/whep/{stream}/{viewer.resource_id}"
        response = resources.created(viewer, answer, resources.location(settings, path), settings)
        position = resources.location(settings, f"{path}/position")
        response.headers.add("Link", f'<{position}>; rel="{POSITION_REL}"')
        return response

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

    def playback(request: web.Request):
        viewer = egress.find(request.match_info["stream"], request.match_info["resource"])
        if viewer is None:
            raise web.HTTPNotFound(reason="no such session (it may have ended)")
        return rewinder.playback(viewer)

    async def get_position(request: web.Request) -> web.Response:
        return web.json_response(await playback(request).describe())

    async def move(request: web.Request) -> web.Response:
        current = playback(request)
        body = await jsonbody.read_object(request, {"seek", "at", "live", "paused"})
        move = _validate_move(body)
        try:
            await current.move(move)
        except OutOfWindow as exc:
            return out_of_window(exc)
        return web.json_response(await current.describe())

    app.router.add_post("/whep/{stream}", play)
    app.router.add_get("/whep/{stream}", probe)  # aiohttp answers HEAD from GET
    app.router.add_options("/whep/{stream}", resources.options)
    app.router.add_get("/whep/{stream}/{resource}", status)
    app.router.add_patch("/whep/{stream}/{resource}", patch)
    app.router.add_delete("/whep/{stream}/{resource}", delete)
    app.router.add_options("/whep/{stream}/{resource}", resources.options)
    app.router.add_get("/whep/{stream}/{resource}/position", get_position)
    app.router.add_post("/whep/{stream}/{resource}/position", move)
    app.router.add_options("/whep/{stream}/{resource}/position", _position_options)


def _validate_move(body: dict) -> dict:
    """Exactly one of ``seek`` (seconds), ``at`` (epoch ms), ``live`` or ``paused``."""
    if len(body) != 1:
        raise SessionError('give exactly one of "seek", "at", "live" or "paused"')
    (name, value), = body.items()  # fmt: skip
    if name in ("seek", "at"):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise SessionError(f'"{name}" must be a number')
    elif name == "live":
        if value is not True:
            raise SessionError('"live" can only be true (seek or pause to leave the live edge)')
    elif not isinstance(value, bool):
        raise SessionError('"paused" must be true or false')
    return body


def out_of_window(exc: OutOfWindow) -> web.Response:
    """422 with the window, so a player can clamp and retry."""
    body = {"type": "about:blank", "title": "Unprocessable Content", "status": 422,
            "detail": str(exc), **exc.window.as_dict()}  # fmt: skip
    return web.Response(status=422, text=json.dumps(body), content_type="application/problem+json")


async def _position_options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Allow": "OPTIONS, GET, POST"})


def add_redirects(app: web.Application, router: Router, settings: Settings) -> None:
    """On a node without the egress role: send viewers to an egress node."""

    async def play(request: web.Request) -> web.Response:
        replay = "start" in request.query or "session" in request.query
        stream = resources.stream_name(request)
        return resources.redirect(router.place_viewer(stream, replay=replay), request)

    app.router.add_post("/whep/{stream}", play)
    app.router.add_get("/whep/{stream}", probe)
    app.router.add_options("/whep/{stream}", resources.options)
