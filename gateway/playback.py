"""Rewind and replay: a WHEP viewer playing a stream's past, straight from Kafka.

A reader of the log beside egress, never inside it: viewers at the live edge stay on
:class:`~whipcast.gateway.egress.StreamFanout` exactly as before. A viewer that asks
for the past gets a :class:`Playback`, which moves it between sources:

- a :class:`Cursor`: its own Kafka read position (:class:`~whipcast.gateway.bus.FrameReader`
  from a :class:`~whipcast.gateway.keyframes.SeekPoint`), frames packetized once and
  paced in real time by their ingest arrival times against one clock, so audio and
  video stay as in sync as they arrived. Viewers wanting the same moment share a
  cursor: a joiner gets the cursor's current GOP (timestamps packed, as a live join
  does) and then follows it;
- the stream's live fan-out (``{"live": true}``), joined the same way;
- nothing, while paused (the peer connection stays up).

The player never sees a switch: sequence numbers run on in the viewer's senders, and
RTP timestamps are re-based per viewer (``FanoutSender.ts_offset``): when the
viewer's playback clock (wall time minus arrival time) moves by ``d``, every track's
offset moves by ``d`` times its clock rate, which keeps audio and video related
exactly as the publisher sent them, and timestamps advance with wall time across the
switch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from . import codecs
from .bus import FrameReader
from .egress import EgressNode, ViewerSession
from .errors import NotLive, SessionError, Unavailable
from .frames import Codec, Track
from .keyframes import KeyframeFinder, SeekPoint
from .peer import parse_offer
from .registry import StreamInfo
from .rtpsend import PreparedFrame
from .sessions import SessionsView

logger = logging.getLogger(__name__)

LIVE_SNAP_MS = 1000  # a target this close to a live stream's edge plays live
SHARE_SLACK_MS = 250  # a viewer may land this much before its target on a shared cursor
READY_TIMEOUT_S = 3.0
_MASK = 0xFFFFFFFF


class OutOfWindow(SessionError):
    """A target outside what Kafka holds of the session (422, with the window)."""

    status = 422

    def __init__(self, message: str, window: Window) -> None:
        super().__init__(message)
        self.window = window


@dataclass(frozen=True, slots=True)
class Window:
    start_ms: float
    edge_ms: float
    live: bool
    """Whether the session is still being published (its edge moves)."""

    def as_dict(self) -> dict:
        return {"window_start": int(self.start_ms), "live_edge": int(self.edge_ms)}


def parse_start(value: str) -> tuple[str, float]:
    """``start`` query value: ("relative", seconds <= 0) or ("at", epoch ms).

    Accepts seconds before the live edge (``-30``), epoch milliseconds, or an ISO 8601
    date with a time zone.
    """
    try:
        number = float(value)
    except ValueError:
        try:
            date = datetime.fromisoformat(value)
        except ValueError:
            raise SessionError(
                "start must be seconds before the live edge (e.g. -30), epoch "
                "milliseconds, or an ISO 8601 date"
            ) from None
        if date.tzinfo is None:
            raise SessionError("a start date needs a time zone (e.g. Z or +02:00)") from None
        return "at", date.timestamp() * 1000
    if number != number or number in (float("inf"), float("-inf")):
        raise SessionError("start must be a finite number")
    if number <= 0:
        return "relative", number
    if number >= 1e12:
        return "at", number
    raise SessionError("start must be <= 0 (seconds before the live edge) or epoch milliseconds")


class Cursor:
    """One paced read of a session's past, shared by the viewers playing from it."""

    def __init__(self, rewinder: Rewinder, info: StreamInfo, point: SeekPoint, target_ms: float):
        self.rewinder = rewinder
        self.stream = info.stream
        self.session = info.session
        self.point = point
        self.target_ms = max(target_ms, point.keyframe_ms)
        self.playbacks: set[Playback] = set()
        self.gop: list[PreparedFrame] = []
        self.shift_us: int | None = None
        """Playback clock: a frame is sent at its arrival time plus this (wall µs)."""
        self.ready = asyncio.Event()
        self.done = False
        self._anchor_us = 0
        """Arrival time of the frame the playback clock started on: nothing older plays."""
        self._audio_read: int | None = None  # RTP timestamp of the last audio frame read
        self._reader = FrameReader(
            rewinder.egress.bus,
            info.stream,
            start={Track.VIDEO: point.video, Track.AUDIO: point.audio},
            session=info.session,
        )
        self._packetizers = {}
        for track, kind in ((Track.VIDEO, "video"), (Track.AUDIO, "audio")):
            codec = info.codec(kind)
            if codec is not None:
                self._packetizers[track] = codecs.Packetizer(Codec.from_mime_type(codec.mimeType))
        self._buffer: dict[Track, collections.deque[PreparedFrame]] = {
            track: collections.deque() for track in Track
        }
        self._added = asyncio.Event()
        self._taken = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def position_ms(self) -> float:
        """The moment being played now (arrival-time ms)."""
        if self.shift_us is None:
            return self.target_ms
        return (time.time_ns() // 1000 - self.shift_us) / 1000

    def can_serve(self, target_ms: float) -> bool:
        """Whether a viewer wanting ``target_ms`` can join this cursor instead of
        reading Kafka itself (it lands at most one GOP before the target)."""
        if self.done:
            return False
        if not self.ready.is_set():
            return self.point.keyframe_ms <= target_ms <= self.target_ms + SHARE_SLACK_MS
        return (
            bool(self.gop)
            and self.gop[0].frame.arrival_us / 1000 <= target_ms
            and target_ms <= self.position_ms + SHARE_SLACK_MS
        )

    async def start(self) -> None:
        await self._reader.start()
        self._tasks = [
            asyncio.create_task(self._read(), name=f"rewind-read-{self.stream}"),
            asyncio.create_task(self._pace(), name=f"rewind-pace-{self.stream}"),
        ]

    async def stop(self) -> None:
        self.done = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._reader.stop()

    @property
    def audio_after(self) -> int | None:
        """An RTP timestamp every audio frame this cursor delivers from now on follows
        (None: no audio read yet). Kafka orders audio only within its partition, so
        where it stands against the video the joiner's timeline is set by is up to
        the fetches; a joiner's audio must not go back all the same."""
        audio = self._buffer[Track.AUDIO]
        if audio:
            return (audio[0].frame.rtp_timestamp - 1) & _MASK
        return self._audio_read

    def _buffered_us(self) -> int:
        """How far ahead of the playback clock the buffer reaches, for the track that
        reaches least far: one fetch can bring seconds more audio than video, and
        waiting on the audio's lead would starve the video."""
        if self.shift_us is None:
            return 0
        now_us = time.time_ns() // 1000
        ahead = [
            queue[-1].frame.arrival_us + self.shift_us - now_us if queue else 0
            for track, queue in self._buffer.items()
            if track in self._packetizers and track not in self._reader.finished
        ]
        return min(ahead, default=0)

    async def _read(self) -> None:
        """Frames from Kafka: up to the target into the GOP (the joiners' burst),
        then into the buffer, at most ``rewind_ahead_s`` ahead of the playback clock."""
        ahead_us = int(self.rewinder.settings.rewind_ahead_s * 1e6)
        target_us = self.target_ms * 1000
        async for batch in self._reader.read():
            for item in batch:
                frame = item.frame
                packetizer = self._packetizers.get(frame.track)
                if packetizer is None:
                    continue
                if frame.track is Track.AUDIO:
                    self._audio_read = frame.rtp_timestamp
                prepared = PreparedFrame(
                    frame, packetizer.packetize(frame.payload), frame.track is Track.VIDEO
                )
                if not self.ready.is_set():
                    if frame.arrival_us <= target_us:
                        if frame.track is Track.VIDEO:
                            self._keep(prepared)
                        continue
                    if frame.track is Track.VIDEO:
                        self._begin(frame.arrival_us if not self.gop else None)
                if frame.arrival_us < self._anchor_us:
                    continue  # audio of the burst's span, fetched after the video
                self._buffer[frame.track].append(prepared)
            self._added.set()
            while self.ready.is_set() and self._buffered_us() > ahead_us:
                self._taken.clear()
                await self._taken.wait()

    def _begin(self, first_arrival_us: int | None) -> None:
        """Start the playback clock: the GOP's newest frame (or the first buffered
        one) plays now."""
        anchor = first_arrival_us if first_arrival_us is not None else self.gop[-1].frame.arrival_us
        self._anchor_us = anchor
        self.shift_us = time.time_ns() // 1000 - anchor
        # Audio read before the first video frame past the target belongs to the burst.
        audio = self._buffer[Track.AUDIO]
        while audio and audio[0].frame.arrival_us < anchor:
            audio.popleft()
        self.ready.set()

    def _keep(self, prepared: PreparedFrame) -> None:
        if prepared.frame.keyframe:
            self.gop = [prepared]
        elif self.gop and len(self.gop) < self.rewinder.settings.gop_cache_frames:
            self.gop.append(prepared)

    async def _pace(self) -> None:
        """Send each buffered frame when the playback clock reaches its arrival time."""
        try:
            await self._wait_ready()
            while True:
                heads = [q[0] for q in self._buffer.values() if q]
                if not heads:
                    if await self._at_end():
                        break
                    self._added.clear()
                    try:
                        await asyncio.wait_for(self._added.wait(), 0.5)
                    except TimeoutError:
                        pass
                    continue
                assert self.shift_us is not None
                due_us = min(p.frame.arrival_us for p in heads) + self.shift_us
                wait_s = (due_us - time.time_ns() // 1000) / 1e6
                if wait_s > 0.001:
                    await asyncio.sleep(min(wait_s, 0.5))
                    continue
                now_us = time.time_ns() // 1000
                for queue in self._buffer.values():
                    while queue and queue[0].frame.arrival_us + self.shift_us <= now_us:
                        prepared = queue.popleft()
                        if prepared.frame.track is Track.VIDEO:
                            self._keep(prepared)
                        for playback in list(self.playbacks):
                            playback.deliver(prepared)
                self._taken.set()
        finally:
            self.done = True
            for playback in list(self.playbacks):
                playback.source_ended(self)

    async def _wait_ready(self) -> None:
        """Until the target is reached; a recording that ends first plays its GOP."""
        while not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), 0.5)
            except TimeoutError:
                if await self._at_end():
                    if self.gop:
                        self._begin(None)
                    else:
                        raise asyncio.CancelledError from None

    async def _at_end(self) -> bool:
        """All of the session that Kafka holds was read and the session is over."""
        if not self.rewinder.session_over(self.stream, self.session):
            return False
        return len(self._reader.finished) == len(Track) or await self._reader.at_end()


class Playback:
    """Where one viewer is in the stream's timeline, and the moves it can make."""

    def __init__(self, rewinder: Rewinder, viewer: ViewerSession, info: StreamInfo) -> None:
        self.rewinder = rewinder
        self.viewer = viewer
        self.info = info
        self.cursor: Cursor | None = None
        self.live = viewer.fanout is not None and viewer in viewer.fanout.viewers
        self.paused_ms: float | None = None
        self.ended = False
        self._end_ms: float | None = None
        self._shift_us = 0
        self._skip_to_keyframe = False
        self._lock = asyncio.Lock()
        viewer.spawn(self._held())

    async def _held(self) -> None:
        """Lives as long as the viewer session; lets go of the cursor when it closes."""
        try:
            await asyncio.Event().wait()
        finally:
            self._detach()
            self.rewinder.playbacks.pop(self.viewer.resource_id, None)

    # What the position API reports
    async def describe(self) -> dict:
        window = await self.rewinder.window(self.info)
        if self.ended:
            position = self._end_ms if self._end_ms is not None else window.edge_ms
        elif self.paused_ms is not None:
            position = self.paused_ms
        elif self.live:
            position = window.edge_ms
        elif self.cursor is not None:
            position = min(self.cursor.position_ms, window.edge_ms)
        else:
            position = window.edge_ms
        return {
            "position": int(position),
            **window.as_dict(),
            "live": self.live,
            "paused": self.paused_ms is not None,
            "ended": self.ended,
            "session": f"{self.info.session:08x}",
        }

    # Moves
    async def move(self, request: dict) -> None:
        """Apply one position request (``seek``, ``at``, ``live`` or ``paused``)."""
        if self.ended:
            raise SessionError("this replay has ended; start a new session to watch again")
        async with self._lock:
            if "paused" in request:
                if request["paused"]:
                    await self._pause()
                elif self.paused_ms is not None:
                    window = await self.rewinder.window(self.info)
                    target = min(max(self.paused_ms, window.start_ms), window.edge_ms)
                    await self._go(target, window)
                return
            if request.get("live"):
                await self._go_live()
                return
            window = await self.rewinder.window(self.info)
            if "seek" in request:
                base = self.paused_ms
                if base is None:
                    base = self.cursor.position_ms if self.cursor is not None else window.edge_ms
                target = base + request["seek"] * 1000
            else:
                target = request["at"]
            await self._go(target, window)

    async def start_at(self, target_ms: float) -> None:
        """First play of a ``?start=`` session, once DTLS is up. The keyframe search and
        the cursor's first read run while ICE and DTLS connect, so the join does not
        wait for them in turn; :meth:`_go` then finds that cursor as a shared one."""
        early = asyncio.ensure_future(self._early_cursor(target_ms))
        waits = [asyncio.ensure_future(s.ready.wait()) for s in self.viewer.senders.values()]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        try:
            async with self._lock:
                await self._go(target_ms, await self.rewinder.window(self.info))
        except SessionError as exc:  # e.g. the frames left the window meanwhile
            self.viewer.log(logging.WARNING, "replay could not start: %s", exc)
            await self.viewer.close()
        finally:
            cursor = await early
            if cursor is not None and not cursor.playbacks:
                self.rewinder.release(cursor, self)  # nobody joined it after all

    async def _early_cursor(self, target_ms: float) -> Cursor | None:
        """The cursor :meth:`_go` will join, or None: its errors are :meth:`_go`'s to
        report, since it meets the same ones."""
        try:
            window = await self.rewinder.window(self.info)
            if window.live and target_ms >= window.edge_ms - LIVE_SNAP_MS:
                return None  # plays live: nothing to read ahead
            return await self.rewinder.cursor(self.info, target_ms)
        except Exception as exc:
            self.viewer.log(logging.DEBUG, "no early cursor: %s", exc)
            return None

    async def _go(self, target_ms: float, window: Window) -> None:
        check_target(target_ms, window)
        if window.live and target_ms >= window.edge_ms - LIVE_SNAP_MS:
            await self._go_live()
            return
        cursor = await self.rewinder.cursor(self.info, target_ms)
        try:
            await asyncio.wait_for(cursor.ready.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            if not cursor.playbacks:
                self.rewinder.release(cursor, self)
            raise Unavailable("the stream's frames could not be read from Kafka in time") from None
        self._detach()
        self.paused_ms = None
        gop = list(cursor.gop)
        assert cursor.shift_us is not None
        self._rebase(cursor.shift_us, gop, cursor.audio_after)
        self._burst(gop)
        self.cursor = cursor
        cursor.playbacks.add(self)

    async def _go_live(self) -> None:
        info = self.rewinder.egress.view.get(self.info.stream)
        if info is None or info.session != self.info.session:
            raise NotLive("this broadcast is no longer live")
        fanout = await self.rewinder.egress.fanout(info)
        await fanout.caught_up()
        self._detach()
        self.paused_ms = None
        gop = list(fanout.gop)
        self._rebase(0, gop, fanout.audio_rtp)
        self._burst(gop)
        self.live = True
        self.viewer.follow_live(fanout)

    async def _pause(self) -> None:
        if self.paused_ms is not None:
            return
        if self.live:
            position = (await self.rewinder.window(self.info)).edge_ms
        elif self.cursor is not None:
            position = self.cursor.position_ms
        else:
            position = (await self.rewinder.window(self.info)).edge_ms
        self._detach()
        self.paused_ms = position

    def _detach(self) -> None:
        if self.live:
            self.viewer.leave_live()
            self.live = False
        if self.cursor is not None:
            self.rewinder.release(self.cursor, self)
            self.cursor = None

    # Sending
    def _rebase(self, shift_us: int, burst: list[PreparedFrame], audio_after: int | None) -> None:
        """Move the viewer's timeline to a new playback clock (see the module doc).

        ``audio_after``: an RTP timestamp every audio frame of the new source follows
        (None: unknown). Neither track may go back across the switch: the burst must
        start after the video the player has, the new source's next audio after the
        audio it has. Which of the two the old source sent last, and how far the new
        one's audio trails its video, depends on how the fetches of the two partitions
        fell (Kafka orders each partition alone), so each track is checked, and both
        are shifted alike by the larger shortfall to keep them in sync.
        """
        self.viewer.drop_pending_video()
        delta_us = shift_us - self._shift_us
        senders = self.viewer.senders
        for sender in senders.values():
            sender.ts_offset += delta_us * sender.clock_rate // 1_000_000
            sender.clock_shift_us = shift_us
        self._shift_us = shift_us
        behind_us = 0
        video = senders.get(Track.VIDEO)
        if video is not None and burst and video.packets_sent:
            # A shared cursor's clock may lag this viewer's.
            newest = (burst[-1].frame.rtp_timestamp + video.ts_offset) & _MASK
            needed = video.last_timestamp + len(burst) + 1
            behind_us = _shortfall_us(needed, newest, video.clock_rate)
        audio = senders.get(Track.AUDIO)
        if audio is not None and audio_after is not None and audio.packets_sent:
            after = (audio_after + audio.ts_offset) & _MASK
            behind_us = max(behind_us, _shortfall_us(audio.last_timestamp, after, audio.clock_rate))
        if behind_us > 0:
            for sender in senders.values():
                sender.ts_offset += -(-behind_us * sender.clock_rate // 1_000_000)

    def _burst(self, gop: list[PreparedFrame]) -> None:
        """A GOP up to the current frame, timestamps packed: decoded at once."""
        sender = self.viewer.senders.get(Track.VIDEO)
        self._skip_to_keyframe = False
        if sender is None:
            return
        if not gop:
            self._skip_to_keyframe = True
            return
        newest = (gop[-1].frame.rtp_timestamp + sender.ts_offset) & _MASK
        for i, prepared in enumerate(gop):
            self.viewer.send_video(sender, prepared, (newest - (len(gop) - 1 - i)) & _MASK)
            self._count()

    def deliver(self, prepared: PreparedFrame) -> None:
        """One paced frame from the cursor; a viewer whose socket backs up skips to the
        next keyframe instead of queueing (the past can wait, the clock cannot)."""
        frame = prepared.frame
        sender = self.viewer.senders.get(frame.track)
        if sender is None or sender.layout is None:
            return
        if frame.track is Track.VIDEO:
            if self._skip_to_keyframe:
                if not frame.keyframe:
                    return
                self._skip_to_keyframe = False
            if not self.viewer.can_send(sender):
                self._skip_to_keyframe = True
                self.viewer.stats.keyframe_drops += 1
                return
            self.viewer.send_video(sender, prepared)
            self._count()
        else:
            sender.send_frame(prepared)

    def _count(self) -> None:
        stats = self.viewer.stats
        stats.frames_sent += 1
        if stats.first_frame_s is None:
            stats.first_frame_s = time.monotonic() - self.viewer.created
            self.rewinder.egress.bus.metrics.time_to_first_frame.observe(stats.first_frame_s)

    def source_ended(self, cursor: Cursor) -> None:
        """The cursor reached the end of the recording: say so, then close (BYE)."""
        if cursor is not self.cursor:
            return
        self._end_ms = cursor.position_ms
        self._detach()
        self.ended = True
        self.viewer.log(logging.INFO, "replay reached the end of the recording")
        self.viewer.spawn(self._close_later())

    async def _close_later(self) -> None:
        await asyncio.sleep(self.rewinder.settings.replay_end_grace_s)
        await self.viewer.close()


def _shortfall_us(needed: int, have: int, clock_rate: int) -> int:
    """How far RTP timestamp ``have`` is before ``needed``, in µs rounded up (0: not)."""
    behind = ((needed - have + 0x80000000) & _MASK) - 0x80000000
    return -(-behind * 1_000_000 // clock_rate) if behind > 0 else 0


def check_target(target_ms: float, window: Window) -> None:
    if not window.start_ms <= target_ms <= window.edge_ms + LIVE_SNAP_MS / 2:
        raise OutOfWindow(
            f"{int(target_ms)} is outside the window Kafka holds of this broadcast "
            f"({int(window.start_ms)} to {int(window.edge_ms)} ms since the epoch)",
            window,
        )


class Rewinder:
    """A node's replays: cursors shared by viewers, the keyframe finder, playbacks."""

    def __init__(self, egress: EgressNode, sessions: SessionsView) -> None:
        self.egress = egress
        self.settings = egress.settings
        self.sessions = sessions
        self.finder = KeyframeFinder(egress.bus, self.settings.rewind_search_s * 1000)
        self.playbacks: dict[str, Playback] = {}
        self.cursors: dict[tuple[str, int], list[Cursor]] = {}
        self.cursors_started = 0
        self._lock = asyncio.Lock()

    async def stop(self) -> None:
        for cursors in list(self.cursors.values()):
            await asyncio.gather(*(c.stop() for c in cursors))
        self.cursors.clear()
        await self.finder.stop()

    def resolve(self, stream: str, session: str | None) -> StreamInfo:
        """The session to play: the live one, else the latest ended one in Kafka, or
        exactly ``session`` (hex id from the replay list)."""
        retention_s = self.settings.stream_retention_ms / 1000
        if session is not None:
            try:
                wanted = int(session, 16)
            except ValueError:
                raise SessionError("session must be a hexadecimal session id") from None
            info = self.sessions.find(stream, wanted)
            live = self.egress.view.get(stream)
            if live is not None and live.session == wanted:
                return live
            if info is None or info.updated_at < time.time() - retention_s:
                raise NotLive(f"no session {session} of stream {stream!r} is in Kafka")
            return info
        live = self.egress.view.get(stream)
        if live is not None:
            return live
        replay = self.sessions.latest_replay(stream, retention_s)
        if replay is None:
            raise NotLive(f"stream {stream!r} is not live and has no replay in Kafka")
        return replay.info

    def session_over(self, stream: str, session: int) -> bool:
        live = self.egress.view.get(stream)
        return live is None or live.session != session

    async def window(self, info: StreamInfo) -> Window:
        live = not self.session_over(info.stream, info.session)
        now_ms = time.time() * 1000
        extent = await self.finder.extent(info.stream)
        edge = now_ms if live else min(now_ms, info.updated_at * 1000)
        first = extent.first_ms if extent.first_ms is not None else edge
        start = int(info.started_at * 1000)
        if first > start + self.settings.rewind_search_s * 1000:
            start = first  # retention has taken the beginning of the broadcast
        return Window(start, edge, live)

    async def play(
        self, stream: str, offer_sdp: str, start: str, session: str | None = None
    ) -> tuple[ViewerSession, str]:
        """A WHEP session that starts in the past (``?start=``)."""
        kind, value = parse_start(start)
        offer = parse_offer(offer_sdp, direction="recvonly")
        egress = self.egress
        if not egress.bus.reachable:
            raise Unavailable("the media bus (Kafka) is unreachable; try again shortly")
        if len(egress.viewers) >= self.settings.max_viewers:
            raise Unavailable("this egress node is full; try again shortly")
        info = self.resolve(stream, session)
        window = await self.window(info)
        target = window.edge_ms + value * 1000 if kind == "relative" else value
        check_target(target, window)
        viewer = ViewerSession(egress, stream)
        egress.viewers[viewer.resource_id] = viewer
        egress.started += 1
        try:
            answer = await viewer.negotiate(offer, offer_sdp, info)
        except BaseException:
            await viewer.close()
            raise
        playback = Playback(self, viewer, info)
        self.playbacks[viewer.resource_id] = playback
        viewer.spawn(playback.start_at(target))
        behind_s = (window.edge_ms - target) / 1000
        viewer.log(logging.INFO, "viewer joined %.1f s behind the edge", behind_s)
        return viewer, answer

    def playback(self, viewer: ViewerSession) -> Playback:
        """The viewer's playback, created on first use for a viewer that joined live."""
        playback = self.playbacks.get(viewer.resource_id)
        if playback is None:
            info = self.egress.view.get(viewer.stream)
            if viewer.fanout is None or info is None or info.session != viewer.fanout.session:
                raise NotLive("this broadcast is no longer live")
            playback = Playback(self, viewer, info)
            self.playbacks[viewer.resource_id] = playback
        return playback

    async def cursor(self, info: StreamInfo, target_ms: float) -> Cursor:
        """A cursor playing ``target_ms``: a shared one if it can serve, else a new one."""
        key = (info.stream, info.session)
        async with self._lock:
            for cursor in self.cursors.get(key, []):
                if cursor.can_serve(target_ms):
                    return cursor
            point = await self.finder.find(info.stream, info.session, target_ms)
            if point is None:
                raise OutOfWindow("no keyframe of this broadcast is in Kafka near that point",
                                  await self.window(info))  # fmt: skip
            cursor = Cursor(self, info, point, target_ms)
            self.cursors.setdefault(key, []).append(cursor)  # others may share it already
            self.cursors_started += 1
        try:
            await cursor.start()  # outside the lock: joins elsewhere need not wait for it
        except BaseException:
            cursor.done = True
            self.cursors.get(key, []).remove(cursor)
            raise
        return cursor

    def release(self, cursor: Cursor, playback: Playback) -> None:
        """A viewer left ``cursor``; the last one out stops it."""
        cursor.playbacks.discard(playback)
        if cursor.playbacks:
            return
        key = (cursor.stream, cursor.session)
        cursors = self.cursors.get(key, [])
        if cursor in cursors:
            cursors.remove(cursor)
        if not cursors:
            self.cursors.pop(key, None)
        asyncio.ensure_future(cursor.stop())
