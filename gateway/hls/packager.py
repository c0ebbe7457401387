"""The ``hls`` role: publish sessions packaged as LL-HLS, from Kafka, when asked for.

A reader of the log beside egress, never on the live path. For a session someone asks
for (live or ended, still in Kafka) a :class:`SessionPackage` finds the session's first
keyframe (:class:`~whipcast.gateway.keyframes.KeyframeFinder`), reads the session from
there with its own :class:`~whipcast.gateway.bus.FrameReader` and feeds a
:class:`~.segmenter.Segmenter`; the first answer waits until it has caught up with the
log. Because every node starts at the same record and cuts only by what the records
say, any number of nodes serve byte-identical playlists, parts and segments for a
session (a load balancer or CDN may send each request anywhere), whenever each opened
it. A live package nobody asks for stops after ``hls_idle_stop_s`` (a waiting blocking
request counts as asking), so an unwatched stream costs no reader; with
``hls_always_package`` every live H.264 session is packaged from its start instead.
A session whose first keyframe has already left Kafka is read from its oldest retained
keyframe instead, and then only nodes that opened it alike agree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..bus import Bus, FrameReader
from ..errors import NotLive, SessionError
from ..frames import Codec, Track
from ..keyframes import KeyframeFinder, SeekPoint
from ..registry import RegistryView, StreamInfo
from ..sessions import SessionsView
from ..settings import Settings
from .playlist import Timing
from .segmenter import Part, Segment, Segmenter

logger = logging.getLogger(__name__)

END_CHECK_S = 1.0
IDLE_EVICT_S = 600.0
"""An ended session's package is dropped after this long without a request."""
FOLLOW_INTERVAL_S = 1.0
FIND_RETRY_S = 0.3


class NotPackaged(SessionError):
    """A stream whose video HLS cannot carry (415)."""

    status = 415


@dataclass(frozen=True, slots=True)
class Snapshot:
    segments: list[Segment]
    upto: Part
    ended: bool
    discontinuities_before: int


class SessionPackage:
    """One publish session's LL-HLS media, kept for the DVR window."""

    def __init__(self, settings: Settings, bus: Bus, finder: KeyframeFinder, info: StreamInfo):
        self.stream = info.stream
        self.session = info.session
        self.info = info
        self.timing = timing(settings)
        self._bus = bus
        self._finder = finder
        self._search_ms = settings.rewind_search_s * 1000
        self._is_live = lambda: True
        self.segmenter = Segmenter(
            part_target_s=settings.hls_part_target,
            target_duration_s=settings.hls_target_duration,
            min_segment_s=settings.hls_min_segment,
            with_audio=info.audio is not None,
            on_part=self._on_part,
        )
        self.parts: dict[int, Part] = {}
        self.discontinuities_before = 0
        self.changed = asyncio.Condition()
        self.used = time.monotonic()
        self.waiters = 0
        """Requests waiting in :meth:`wait_for` (blocking reloads): in use while any."""
        self.caught_up = False
        """Read up to what Kafka held a moment ago: a first answer is live, not history."""
        self.bytes_in = 0
        self._audio_unpushed = 0
        self.task: asyncio.Task | None = None

    def start(self, is_live) -> None:
        self._is_live = is_live
        self.task = asyncio.create_task(self._run(), name=f"hls-{self.stream}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    @property
    def ended(self) -> bool:
        return self.segmenter.ended

    @property
    def live(self) -> bool:
        """Still the stream's live session (else it is being read to its end)."""
        return self._is_live()

    def idle_s(self, now: float) -> float:
        """Seconds since the last request, 0 while one is waiting."""
        return 0.0 if self.waiters else now - self.used

    @property
    def last_part(self) -> Part | None:
        return self.parts.get(self.segmenter.parts_made - 1)

    def _on_part(self, segment: Segment, part: Part) -> None:
        self.parts[part.index] = part
        segments = self.segmenter.segments
        end = segment.start + segment.duration
        # Keep the window plus one segment (a playlist rendered as of an older part).
        while len(segments) > 2 and end - segments[2].start >= self.timing.window_s:
            dropped = segments.pop(0)
            self.discontinuities_before += dropped.discontinuity
            for old in dropped.parts:
                self.parts.pop(old.index, None)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _run(self) -> None:
        try:
            start = await self._find_start()
            while start is None and self._is_live():  # its first frames are on their way
                self.caught_up = True  # nothing to catch up with yet
                await asyncio.sleep(FIND_RETRY_S)
                start = await self._find_start()
            if start is None:
                logger.warning("hls: no keyframe of %s/%08x in Kafka", self.stream, self.session)
                self.segmenter.finish()
                return
            reader = FrameReader(
                self._bus,
                self.stream,
                start={Track.VIDEO: start.video, Track.AUDIO: start.audio},
                session=self.session,
            )
            await reader.start()
            self.segmenter.audio_behind = lambda: (
                self._audio_unpushed > 0 or reader.behind(Track.AUDIO)
            )
            try:
                await self._follow(reader)
            finally:
                await reader.stop()
        finally:
            await self._notify()

    async def _find_start(self) -> SeekPoint | None:
        """The session's first keyframe, else (it left with retention) its oldest one."""
        target_ms = self.info.started_at * 1000 - 1000
        start = await self._finder.find(self.stream, self.session, target_ms)
        if start is None:
            start = await self._finder.oldest_keyframe(self.stream, self.session)
            if start is not None and start.keyframe_ms > target_ms + 2 * self._search_ms:
                logger.warning(
                    "hls: the start of %s/%08x left Kafka; packaging from %.0f s in",
                    self.stream, self.session, start.keyframe_ms / 1000 - self.info.started_at,
                )  # fmt: skip
        return start

    async def _follow(self, reader: FrameReader) -> None:
        frames = reader.read()
        pending = asyncio.ensure_future(anext(frames))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=END_CHECK_S)
                if done:
                    before = self.segmenter.parts_made
                    # Both tracks in arrival order: a batch holds each partition's
                    # records one after the other. Audio read but not yet pushed counts
                    # as unread (a reader catching up reads many seconds at once).
                    batch = sorted(pending.result(), key=lambda r: r.frame.arrival_us)
                    self._audio_unpushed = sum(r.frame.track is Track.AUDIO for r in batch)
                    for read in batch:
                        self.bytes_in += len(read.frame.payload)
                        self._audio_unpushed -= read.frame.track is Track.AUDIO
                        self.segmenter.push(read.frame)
                    if Track.VIDEO in reader.finished:
                        break
                    pending = asyncio.ensure_future(anext(frames))
                    caught_up = not self.caught_up and not any(map(reader.behind, Track))
                    self.caught_up |= caught_up
                    if self.segmenter.parts_made != before or caught_up:
                        await self._notify()
                elif not self._is_live() and await reader.at_end():
                    break
                elif not self.caught_up and await reader.at_end():  # a quiet stream
                    self.caught_up = True
                    await self._notify()
        finally:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
            await frames.aclose()
        self.segmenter.finish()

    # What the HTTP side asks
    def snapshot(self, upto: Part | None = None) -> Snapshot | None:
        last = self.last_part
        if last is None:
            return None
        upto = last if upto is None else upto
        ended = self.ended and upto is last
        return Snapshot(list(self.segmenter.segments), upto, ended, self.discontinuities_before)

    def segment(self, msn: int) -> Segment | None:
        return next((s for s in self.segmenter.segments if s.msn == msn), None)

    async def wait_for(self, ready, timeout: float) -> bool:
        """Wait until ``ready()`` or the session ends; False after ``timeout``."""
        self.waiters += 1
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(lambda: ready() or self.ended)
        except TimeoutError:
            return False
        finally:
            self.waiters -= 1
            self.used = time.monotonic()
        return ready()


def timing(settings: Settings) -> Timing:
    return Timing(
        settings.hls_part_target,
        settings.hls_target_duration,
        max(settings.hls_window_s, 3 * settings.hls_target_duration + 1),
    )


class HlsPackager:
    """The ``hls`` role: a package per session asked for (per live one, if always)."""

    def __init__(
        self, settings: Settings, bus: Bus, view: RegistryView, sessions: SessionsView
    ) -> None:
        self.settings = settings
        self._bus = bus
        self._view = view
        self._sessions = sessions
        self.finder = KeyframeFinder(bus, settings.rewind_search_s * 1000)
        self.packages: dict[tuple[str, int], SessionPackage] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hls")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(p.stop() for p in self.packages.values()))
        self.packages.clear()
        await self.finder.stop()

    async def _run(self) -> None:
        """Stop packages nobody asks for (or, if always, package live sessions as they
        start and stop only ended ones)."""
        always = self.settings.hls_always_package
        while True:
            if always:
                for info in self._view.live_streams():
                    key = (info.stream, info.session)
                    if packageable(info) is None and key not in self.packages:
                        self._open(info)
            now = time.monotonic()
            for key, package in list(self.packages.items()):
                if package.ended:
                    limit = IDLE_EVICT_S
                elif always and package.live:
                    continue
                else:
                    limit = self.settings.hls_idle_stop_s
                if package.idle_s(now) > limit:
                    del self.packages[key]
                    await package.stop()
                    logger.info("hls: stopped packaging %s/%08x (not asked for)", *key)
            await asyncio.sleep(FOLLOW_INTERVAL_S)

    def _open(self, info: StreamInfo) -> SessionPackage:
        package = SessionPackage(self.settings, self._bus, self.finder, info)
        self.packages[(info.stream, info.session)] = package

        def is_live() -> bool:
            live = self._view.get(info.stream)
            return live is not None and live.session == info.session

        package.start(is_live)
        logger.info("hls: packaging %s/%08x", info.stream, info.session)
        return package

    def resolve(self, stream: str) -> StreamInfo:
        """The session ``/hls/{stream}/index.m3u8`` names: live, else the latest ended."""
        info = self._view.get(stream)
        if info is None:
            replay = self._sessions.latest_replay(stream, self.settings.stream_retention_ms / 1000)
            if replay is None:
                raise NotLive(f"{stream!r} is not live and has no recent broadcast")
            info = replay.info
        reason = packageable(info)
        if reason is not None:
            raise NotPackaged(reason)
        return info

    def package(self, stream: str, session: int) -> SessionPackage:
        """The session's package, opened on first use for a session still in Kafka."""
        found = self.packages.get((stream, session))
        if found is None:
            live = self._view.get(stream)
            info = live if live is not None and live.session == session else None
            info = info or self._sessions.find(stream, session)
            if info is None:
                raise NotLive(f"no broadcast {session:08x} of {stream!r} is known")
            reason = packageable(info)
            if reason is not None:
                raise NotPackaged(reason)
            found = self._open(info)
        found.used = time.monotonic()
        return found

    def snapshot_metrics(self) -> dict:
        """Gauges and counters for ``/metrics`` (read at scrape time)."""
        packages = self.packages
        return {
            "whipcast_hls_sessions": (
                "gauge", "Publish sessions packaged as LL-HLS on this node",
                lambda: len(packages),
            ),
            "whipcast_hls_parts": (
                "gauge", "LL-HLS parts made by the sessions packaged now",
                lambda: sum(p.segmenter.parts_made for p in list(packages.values())),
            ),
            "whipcast_hls_frames_dropped": (
                "gauge", "Frames the packaged sessions left out (before a keyframe, late audio)",
                lambda: sum(p.segmenter.dropped for p in list(packages.values())),
            ),
        }  # fmt: skip


def packageable(info: StreamInfo) -> str | None:
    """Why a session cannot be served as HLS, or ``None`` if it can."""
    video = info.video or {}
    mime = str(video.get("mimeType", "")).lower()
    if not mime:
        return "the broadcast has no video track; HLS here needs H.264 video"
    try:
        codec = Codec.from_mime_type(mime)
    except ValueError:
        codec = None
    if codec is not Codec.H264:
        name = mime.split("/")[-1].upper()
        return (
            f"{name} video cannot be carried in HLS (browsers play only H.264/HEVC there); "
            "watch it over WebRTC, or publish with H.264"
        )
    return None
