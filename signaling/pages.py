"""Health, the stream directory API, and the pages in ``web/``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from whipcast.gateway.bus import STREAM_NAME
from whipcast.gateway.errors import SessionError

from .security import EMBED_PREFIX, PagePolicies

if TYPE_CHECKING:
    from .app import Node

PAGES = {
    "/": "index.html",
    "/studio/{stream}": "studio.html",
    "/watch/{stream}": "watch.html",
    "/embed/{stream}": "embed.html",
    "/dashboard": "dashboard.html",
}


def add_routes(app: web.Application, node: Node, with_pages: bool) -> None:
    async def streams(request: web.Request) -> web.Response:
        state = request.query.get("state", "live")
        if state == "ended":
            return web.json_response({"streams": _replays(node)})
        if state != "live":
            raise SessionError('state must be "live" or "ended"')
        return web.json_response(
            {"streams": [_describe(node, i.stream) for i in node.view.live_streams()]}
        )

    async def stream(request: web.Request) -> web.Response:
        name = request.match_info["stream"]
        if not STREAM_NAME.match(name) or node.view.get(name) is None:
            raise web.HTTPNotFound(reason=f"stream {name!r} is not live")
        return web.json_response(_describe(node, name))

    app.router.add_get("/api/streams", streams)
    app.router.add_get("/api/streams/{stream}", stream)
    if not with_pages:
        return
    root = node.settings.web_root
    # Without ingest or egress here, WHIP/WHEP requests are redirected to media nodes.
    policies = PagePolicies(connect_anywhere=node.ingest is None or node.egress is None)
    for path, filename in PAGES.items():
        app.router.add_get(path, _page(root / filename, policies, path.startswith(EMBED_PREFIX)))
    app.router.add_get("/publish/{stream}", _to_studio)
    app.router.add_static("/web/", root, follow_symlinks=False)


def _page(path: Path, policies: PagePolicies, frameable: bool):
    async def handler(request: web.Request) -> web.FileResponse:
        if "stream" in request.match_info and not STREAM_NAME.match(request.match_info["stream"]):
            raise web.HTTPNotFound(reason="no such stream page")
        headers = {
            "Cache-Control": "no-cache",
            "Content-Security-Policy": policies.for_page(path, frameable),
        }
        return web.FileResponse(path, headers=headers)

    return handler


async def _to_studio(request: web.Request) -> web.Response:
    """The publish page became the studio; old links keep working, with their query
    (``?simulcast=0``)."""
    name = request.match_info["stream"]
    if not STREAM_NAME.match(name):
        raise web.HTTPNotFound(reason="no such stream page")
    query = f"?{request.query_string}" if request.query_string else ""
    raise web.HTTPFound(f"/studio/{name}{query}")


def _describe(node: Node, name: str) -> dict:
    info = node.view.get(name)
    assert info is not None
    described: dict = {
        "stream": name,
        "live": True,
        **node.directory.details(name),
        "viewers": _viewers(node, name),
        "started_at": info.started_at,
        "uptime_s": round(time.time() - info.started_at, 1),
        "video": info.video,
        "audio": info.audio,
    }
    if node.egress is not None and name in node.egress.fanouts:
        described["viewers_here"] = node.egress.viewer_counts()[name]
    if node.ingest is not None and name in node.ingest.sessions:
        described["ingest"] = vars(node.ingest.sessions[name].stats)
    return described


def _replays(node: Node) -> list[dict]:
    """Ended broadcasts whose frames are still in Kafka, newest first: each plays with
    ``POST /whep/{stream}?session={session}&start={started}``."""
    retention_s = node.settings.stream_retention_ms / 1000
    horizon = time.time() - retention_s
    described = []
    for replay in node.sessions.replays(retention_s):
        info = replay.info
        described.append(
            {
                "stream": info.stream,
                "session": f"{info.session:08x}",
                "live": False,
                "title": node.directory.details(info.stream).get("title"),
                "started": info.started_at,
                "ended": replay.ended_at,
                "duration": round(replay.duration_s, 1),
                "available_from": max(info.started_at, horizon),
                "thumbnail": f"/api/streams/{info.stream}/thumbnail",
                "video": info.video,
                "audio": info.audio,
            }
        )
    return described


def _viewers(node: Node, name: str) -> int:
    """Viewers on every egress node: this one counted directly, others from their last
    heartbeat in the node registry."""
    count = node.egress.viewer_counts()[name] if node.egress is not None else 0
    for other in node.nodes.alive("egress"):
        if other.node != node.settings.node_id:
            count += other.streams.get(name, 0)
    return count
