"""Clips: a span of a stream's past as one downloadable file, cut from Kafka.

A reader of the log beside egress, composed of the pieces rewind uses: the session
and its window (:meth:`~whipcast.gateway.playback.Rewinder.resolve` and ``window``:
live, or ended and still in Kafka), the keyframe at or before ``from``
(:class:`~whipcast.gateway.keyframes.KeyframeFinder`), a
:class:`~whipcast.gateway.bus.FrameReader` from there, and the muxer
(:mod:`whipcast.gateway.mux`): MP4 for H.264 + Opus, WebM for VP8 + Opus, frames
copied, never transcoded. The file is written to a temporary file (MP4 puts its index
up front, which needs a second pass) and deleted once sent. Length and concurrent
cuts per node are capped; a cut over a cap is refused with the reason, not queued.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime

from . import mux
from .bus import FrameReader
from .errors import SessionError
from .frames import Codec, Track
from .playback import OutOfWindow, Rewinder, check_target, parse_start
from .tap import stream_codecs

END_CHECK_S = 0.5
READ_TIMEOUT_S = 120.0
"""A cut that has not finished reading by then is abandoned (Kafka too slow)."""


class ClipRefused(SessionError):
    """Too many clips being cut on this node right now."""

    status = 429
    headers = {"Retry-After": "5"}


@dataclass
class Clip:
    path: str
    filename: str
    content_type: str
    duration_s: float
    frames: int


class Clipper:
    """Clips cut on this node: at most ``clip_max_jobs`` at once."""

    def __init__(self, rewinder: Rewinder) -> None:
        self.rewinder = rewinder
        self.settings = rewinder.settings
        self.running = 0
        self.made = 0
        self.refused: dict[str, int] = {"busy": 0, "invalid": 0}
        self.seconds_cut = 0.0

    def snapshot_metrics(self) -> dict:
        """Counters for ``/metrics`` (read at scrape time)."""
        return {
            "whipcast_clips_running": ("gauge", "Clips being cut now", lambda: self.running),
            "whipcast_clips_made": ("counter", "Clips cut and sent", lambda: self.made),
            "whipcast_clips_refused_busy": (
                "counter", "Clips refused: the node was cutting its most at once",
                lambda: self.refused["busy"],
            ),
            "whipcast_clips_refused_invalid": (
                "counter", "Clips refused: bad range, out of window, unknown stream, too long",
                lambda: self.refused["invalid"],
            ),
            "whipcast_clip_seconds": (
                "counter", "Seconds of media cut into clips", lambda: self.seconds_cut,
            ),
        }  # fmt: skip

    async def cut(self, stream: str, start: str, end: str, session: str | None = None) -> Clip:
        """The clip from ``start`` to ``end`` (epoch ms, or seconds <= 0 before the
        live edge); the caller deletes ``Clip.path``."""
        try:
            info, from_ms, to_ms = await self._span(stream, start, end, session)
        except SessionError:
            self.refused["invalid"] += 1
            raise
        if self.running >= self.settings.clip_max_jobs:
            self.refused["busy"] += 1
            raise ClipRefused(
                f"this node is already cutting {self.running} clips (the most it cuts at "
                "once); try again in a few seconds"
            )
        self.running += 1
        try:
            clip = await self._cut(info, from_ms, to_ms)
        finally:
            self.running -= 1
        self.made += 1
        self.seconds_cut += clip.duration_s
        return clip

    async def _span(self, stream: str, start: str, end: str, session: str | None):
        rewinder = self.rewinder
        info = rewinder.resolve(stream, session)
        window = await rewinder.window(info)
        points = []
        for name, value in (("from", start), ("to", end)):
            try:
                kind, number = parse_start(value)
            except SessionError as exc:
                raise SessionError(str(exc).replace("start", name, 1)) from None
            points.append(window.edge_ms + number * 1000 if kind == "relative" else number)
        from_ms, to_ms = points
        if to_ms <= from_ms:
            raise SessionError('"to" must be after "from"')
        longest = self.settings.clip_max_s
        if to_ms - from_ms > longest * 1000:
            raise SessionError(f"a clip may be at most {longest:g} s long on this server")
        check_target(from_ms, window)
        check_target(to_ms, window)
        return info, from_ms, min(to_ms, window.edge_ms)

    async def _cut(self, info, from_ms: float, to_ms: float) -> Clip:
        point = await self.rewinder.finder.find(info.stream, info.session, from_ms)
        if point is None:
            raise OutOfWindow("no keyframe of this broadcast is in Kafka near that point",
                              await self.rewinder.window(info))  # fmt: skip
        video, audio = stream_codecs(info)
        fmt = "webm" if video is Codec.VP8 else "mp4"
        handle, path = tempfile.mkstemp(prefix="whipcast-clip-", suffix="." + fmt)
        os.close(handle)
        muxer = mux.Muxer(path, fmt, video, audio)
        start = {Track.VIDEO: point.video, Track.AUDIO: point.audio}
        reader = FrameReader(self.rewinder.egress.bus, info.stream, start=start,
                             session=info.session)  # fmt: skip
        try:
            await reader.start()
            try:
                tracks = {t for t, c in zip(Track, (video, audio), strict=True) if c}
                await asyncio.wait_for(self._copy(reader, muxer, to_ms, tracks), READ_TIMEOUT_S)
            finally:
                await reader.stop()
            await asyncio.to_thread(muxer.close)
        except BaseException:
            muxer.close()
            os.unlink(path)
            raise
        moment = datetime.fromtimestamp(point.keyframe_ms / 1000, UTC).strftime("%Y%m%d-%H%M%S")
        filename = f"{info.stream}-{moment}.{mux.EXTENSIONS[fmt]}"
        return Clip(path, filename, mux.CONTENT_TYPES[fmt], muxer.duration_s(), muxer.frames)

    async def _copy(
        self, reader: FrameReader, muxer: mux.Muxer, to_ms: float, tracks: set[Track]
    ) -> None:
        """Frames up to ``to_ms`` on every track, or to the end of what Kafka holds."""
        to_us = to_ms * 1000
        progress = [0]  # batches handled: the end is the end only if nothing moved

        async def copy() -> None:
            done: set[Track] = set()
            async for batch in reader.read():
                keep = []
                for item in batch:
                    if item.frame.arrival_us > to_us:
                        done.add(item.frame.track)
                    elif item.frame.track not in done:
                        keep.append(item.frame)
                await mux.write_in_thread(muxer, keep)
                progress[0] += 1
                if done >= tracks:
                    return

        task = asyncio.create_task(copy(), name="clip-copy")
        try:
            seen = -1
            while not task.done():
                await asyncio.wait([task], timeout=END_CHECK_S)
                if not task.done() and progress[0] == seen and await reader.at_end():
                    break
                seen = progress[0]
            if task.done():
                task.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
