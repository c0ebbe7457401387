"""LL-HLS over HTTP: ``/hls/{stream}/index.m3u8`` and a session's media under
``/hls/{stream}/{session}/`` (media playlist, init segments, segments, parts).

Every URL below the session id is the same on every ``hls`` node and never reused by
another publish, so media is immutable (``Cache-Control: immutable`` with a strong ETag
made from the bytes); live playlists are short-lived, and a blocking reload is rendered
as of the part it asked for, so its answer is cacheable under its query string too.
With ``hls_url_secret`` set, every request needs ``exp`` and ``sig`` (HMAC-SHA256 of
``{stream}:{exp}``); playlists pass them on to the URLs they name.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from aiohttp import web
from whipcast.gateway.errors import SessionError
from whipcast.gateway.hls import playlist
from whipcast.gateway.hls.packager import HlsPackager, SessionPackage
from whipcast.gateway.hls.segmenter import Part, etag
from whipcast.gateway.settings import Settings

from . import resources

PLAYLIST = "application/vnd.apple.mpegurl"
IMMUTABLE = "public, max-age=31536000, immutable"
LIVE_PLAYLIST = "public, max-age=1"
BLOCKED_PLAYLIST = "public, max-age=60"
ENDED_PLAYLIST = "public, max-age=3600"
READ_ENDED_TIMEOUT_S = 20.0
"""How long a request waits for a session to be read from Kafka (at disk speed): an
ended one to its end, a live one opened on this request up to the live edge."""
_FILE = re.compile(r"^(init|seg|part)(\d{1,9})\.mp4$")


class Forbidden(SessionError):
    status = 403


class TooLong(SessionError):
    """A blocking request waited longer than the spec allows (3 target durations)."""

    status = 503
    headers = {"Retry-After": "1"}


def sign(secret: str, stream: str, expires: int) -> str:
    """The ``sig`` query value that admits requests for ``stream`` until ``expires``."""
    message = f"{stream}:{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _check_signature(settings: Settings, request: web.Request, stream: str) -> str:
    """The query string to pass on in playlists ('' when URLs are not signed)."""
    if not settings.hls_url_secret:
        return ""
    exp, sig = request.query.get("exp", ""), request.query.get("sig", "")
    if not exp.isdigit() or not sig:
        raise Forbidden("this stream's HLS URLs are signed: exp and sig are required")
    if not hmac.compare_digest(sign(settings.hls_url_secret, stream, int(exp)), sig):
        raise Forbidden("the URL signature is not valid for this stream")
    if int(exp) < time.time():
        raise Forbidden("the signed URL has expired")
    return f"?exp={exp}&sig={sig}"


def _int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 9:
        raise SessionError(f"{name} must be a non-negative integer")
    return int(value)


def _session(request: web.Request) -> int:
    return int(request.match_info["session"], 16)


def _media(request: web.Request, data: bytes, tag: str) -> web.Response:
    headers = {"ETag": tag, "Cache-Control": IMMUTABLE}
    if tag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=data, content_type="video/mp4", headers=headers)


def _text(request: web.Request, text: str, cache: str) -> web.Response:
    headers = {"ETag": etag(text.encode()), "Cache-Control": cache}
    if headers["ETag"] in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(text=text, content_type=PLAYLIST, headers=headers)


async def _first_part(package: SessionPackage) -> Part:
    """The newest part, once there is one and the package has caught up with the log (a
    live session packaged on its first request answers from the live edge); for a
    session that has ended, once it is read to its end (its whole playlist)."""
    last = package.last_part
    if last is not None and (package.ended or (package.live and package.caught_up)):
        return last
    timeout = 3 * package.timing.target_duration_s
    if package.live:
        await package.wait_for(lambda: package.caught_up, READ_ENDED_TIMEOUT_S)
        await package.wait_for(lambda: package.last_part is not None, timeout)
    else:
        await package.wait_for(lambda: package.ended, READ_ENDED_TIMEOUT_S)
    last = package.last_part
    if last is None:
        raise TooLong("the broadcast has no media yet; try again shortly")
    return last


def _requested(package: SessionPackage, msn: int, part: int | None) -> Part | None:
    """The part a blocking request waits for, once it exists (rfc8216bis 6.2.5.2)."""
    segment = package.segment(msn)
    if segment is None:
        return None
    if part is None:  # the whole segment: as of its last part
        return segment.parts[-1] if segment.complete else None
    if part < len(segment.parts):
        return segment.parts[part]
    if segment.complete:  # past the end of a segment: part 0 of the next one
        following = package.segment(msn + 1)
        if following is not None and following.parts:
            return following.parts[0]
        if package.ended:
            return package.last_part
    return None


def add_routes(app: web.Application, packager: HlsPackager, settings: Settings) -> None:
    async def multivariant(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        query = _check_signature(settings, request, stream)
        info = packager.resolve(stream)
        package = packager.package(stream, info.session)
        await _first_part(package)
        segments = package.segmenter.segments[-10:]
        measured = [s for s in segments if s.complete] or segments
        peak = max(sum(len(p.data) for p in s.parts) * 8 / max(s.duration, 0.1) for s in measured)
        bandwidth = int(peak * 1.2) // 1000 * 1000
        text = playlist.multivariant(
            f"{info.session:08x}/media.m3u8", package.segmenter.codecs, bandwidth, query
        )
        return _text(request, text, LIVE_PLAYLIST)

    async def media_playlist(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        query = _check_signature(settings, request, stream)
        msn, part = _int(request, "_HLS_msn"), _int(request, "_HLS_part")
        skip = request.query.get("_HLS_skip")
        if part is not None and msn is None:
            raise SessionError("_HLS_part needs _HLS_msn")
        if skip not in (None, "YES", "v2"):
            raise SessionError("_HLS_skip must be YES or v2")
        package = packager.package(stream, _session(request))
        timing = package.timing
        last = await _first_part(package)
        upto: Part | None = None
        if msn is not None and not package.ended:
            if msn > last.msn + 2:
                raise SessionError(f"_HLS_msn {msn} is too far ahead (last is {last.msn})")
            if part is not None and part > timing.advance_part_limit:
                raise SessionError(f"_HLS_part may be at most {timing.advance_part_limit}")
            first = package.segmenter.segments[0].msn
            if msn >= first:
                ready = await package.wait_for(
                    lambda: _requested(package, msn, part) is not None,
                    3 * timing.target_duration_s,
                )
                if not ready and not package.ended:
                    raise TooLong("the requested part did not appear in time")
                upto = _requested(package, msn, part)
        snapshot = package.snapshot(upto)
        assert snapshot is not None
        text = playlist.media(
            snapshot.segments,
            timing,
            snapshot.upto,
            ended=snapshot.ended,
            skip=skip is not None,
            discontinuities_before=snapshot.discontinuities_before,
            query=query,
        )
        if snapshot.ended:
            cache = ENDED_PLAYLIST
        else:
            cache = BLOCKED_PLAYLIST if upto is not None else LIVE_PLAYLIST
        return _text(request, text, cache)

    async def media_file(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        _check_signature(settings, request, stream)
        found = _FILE.match(request.match_info["file"])
        if found is None:
            raise web.HTTPNotFound(reason="no such file: init{n}.mp4, seg{n}.mp4, part{n}.mp4")
        kind, number = found.group(1), int(found.group(2))
        package = packager.package(stream, _session(request))
        segmenter = package.segmenter
        await _first_part(package)  # a node asked first for media opens the session here
        if kind == "init":
            if number >= len(segmenter.inits):
                raise web.HTTPNotFound(reason=f"no init segment {number}")
            data = segmenter.inits[number]
            return _media(request, data, etag(data))
        if kind == "seg":
            segment = package.segment(number)
            if segment is None or not segment.complete:
                raise web.HTTPNotFound(
                    reason=f"segment {number} is not in the window (or not done)"
                )
            return _media(request, segment.data, segment.etag)
        if number == segmenter.parts_made and not package.ended:  # the preload hint
            timeout = 3 * package.timing.target_duration_s
            if not await package.wait_for(lambda: number < segmenter.parts_made, timeout):
                raise TooLong(f"part {number} did not appear in time")
        part = package.parts.get(number)
        if part is None:
            raise web.HTTPNotFound(reason=f"part {number} is not in the window (or not hinted)")
        return _media(request, part.data, part.etag)

    app.router.add_get("/hls/{stream}/index.m3u8", multivariant)
    app.router.add_get("/hls/{stream}/{session:[0-9a-f]{8}}/media.m3u8", media_playlist)
    app.router.add_get("/hls/{stream}/{session:[0-9a-f]{8}}/{file}", media_file)
