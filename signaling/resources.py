"""What WHIP and WHEP endpoints share (RFC 9725 and the WHEP draft): reading offers,
session-resource PATCH/DELETE, CORS, ``Link`` headers for ICE servers."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote

from aiohttp import web
from whipcast.gateway.bus import STREAM_NAME
from whipcast.gateway.peer import PeerSession, SessionError
from whipcast.gateway.settings import Settings

from .problem import problem

ALLOWED_METHODS = "OPTIONS, GET, HEAD, POST, PATCH, DELETE"
EXPOSED_HEADERS = "Location, ETag, Link, Accept-Post, Accept-Patch"
SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"

Finder = Callable[[str, str], PeerSession | None]


class UnsupportedMediaType(SessionError):
    status = 415


class ContentTooLarge(SessionError):
    status = 413


def stream_name(request: web.Request) -> str:
    name = request.match_info["stream"]
    if not STREAM_NAME.match(name):
        raise SessionError("stream names are 1-64 letters, digits, '-' or '_'")
    return name


async def read_body(request: web.Request, content_type: str, limit: int) -> str:
    """The request body as text, if it has the expected type and a sane size."""
    if request.content_type != content_type:
        raise UnsupportedMediaType(f"Content-Type must be {content_type}")
    if request.content_length is not None and request.content_length > limit:
        raise ContentTooLarge(f"the body may be at most {limit} bytes")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise ContentTooLarge(f"the body may be at most {limit} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SessionError("the body is not UTF-8 text") from None
    if not text.strip():
        raise SessionError("the body is empty")
    return text


def ice_server_links(settings: Settings) -> list[str]:
    """``Link`` header values for the configured STUN/TURN servers (RFC 9725 4.6)."""
    links = []
    for url in settings.ice_servers:
        scheme, _, rest = url.partition(":")
        user, _, host = rest.rpartition("@")
        link = f'<{scheme}:{host}>; rel="ice-server"'
        if user and scheme in ("turn", "turns"):
            username, _, credential = user.partition(":")
            link += (
                f'; username="{unquote(username)}"; credential="{unquote(credential)}"'
                '; credential-type="password"'
            )
        links.append(link)
    return links


def created(session: PeerSession, answer: str, location: str, settings: Settings) -> web.Response:
    response = web.Response(status=201, text=answer, content_type=SDP)
    response.headers["Location"] = location
    response.headers["ETag"] = session.etag
    response.headers["Accept-Patch"] = SDPFRAG
    for link in ice_server_links(settings):
        response.headers.add("Link", link)
    return response


async def options(request: web.Request) -> web.Response:
    """CORS preflight and capability discovery; never needs auth."""
    headers = {"Accept-Post": SDP, "Allow": ALLOWED_METHODS}
    if request.match_info.get("resource"):
        headers = {"Accept-Patch": SDPFRAG, "Allow": "OPTIONS, PATCH, DELETE"}
    return web.Response(status=204, headers=headers)


async def patch(request: web.Request, find: Finder, settings: Settings) -> web.Response:
    session = _session(request, find)
    if_match = request.headers.get("If-Match")
    if if_match is not None and if_match not in ("*", session.etag):
        return problem(412, "If-Match does not match this session's ETag")
    fragment = await read_body(request, SDPFRAG, settings.max_sdp_bytes)
    await session.add_candidates(fragment)
    return web.Response(status=204)


async def delete(request: web.Request, find: Finder) -> web.Response:
    session = _session(request, find)
    await session.close()
    return web.Response(status=200)


def _session(request: web.Request, find: Finder) -> PeerSession:
    session = find(request.match_info["stream"], request.match_info["resource"])
    if session is None:
        raise web.HTTPNotFound(reason="no such session (it may have ended)")
    return session


@web.middleware
async def cors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Let players and publishers on other origins use the endpoints."""
    if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
        response: web.StreamResponse = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, If-Match"
        response.headers["Access-Control-Max-Age"] = "86400"
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    if isinstance(response, web.HTTPException):
        raise response
    return response


def location(settings: Settings, path: str) -> str:
    """The session URL: absolute when this node is reached through a redirect (clients
    must come back to this node, not to the signaling node they first asked), else
    relative, which RFC 9725 allows and which survives proxies in front."""
    return f"{settings.url}{path}" if settings.advertise_url else path


def redirect(base_url: str, request: web.Request) -> web.Response:
    """307 keeps the method and body: the client re-sends its offer to ``base_url``."""
    return web.Response(status=307, headers={"Location": f"{base_url}{request.path_qs}"})
