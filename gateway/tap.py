"""``whipcast tap``: a live stream out of Kafka as a standard container, for FFmpeg.

A reader of the log beside egress: it reads the stream topic with its own
:class:`~whipcast.gateway.bus.FrameReader` (one publish session, followed live) and
muxes the frames unchanged (:mod:`whipcast.gateway.mux`) to a pipe, so
``whipcast tap demo | ffplay -`` plays it and ``... | ffmpeg -i - -c copy out.mkv``
records it. Output starts on a keyframe: by default the current GOP's, found in the
GOP Kafka holds before the live edge; with ``start`` (seconds before the edge) the one
at or before that point (:class:`~whipcast.gateway.keyframes.KeyframeFinder`), from
where it catches up as fast as Kafka reads and then follows live. It stops when the
session ends (registry says so, and two checks in a row find everything read), when
the reader of the pipe goes away, or when cancelled (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import IO

import av

from . import mux
from .bus import Bus, FrameReader
from .errors import NotLive, SessionError
from .frames import Codec, Track
from .keyframes import KeyframeFinder
from .metrics import Metrics
from .nodes import NodeView
from .playback import parse_start
from .registry import RegistryView, StreamInfo
from .settings import Settings

logger = logging.getLogger(__name__)

END_CHECK_S = 0.5
REGISTRY_WAIT_S = 10.0


@dataclass
class TapStats:
    frames_read: int = 0
    bytes_read: int = 0
    frames_written: int = 0
    bytes_written: int = 0
    frames_dropped: int = 0
    reason: str = ""
    """Why the tap stopped."""


def stream_codecs(info: StreamInfo) -> tuple[Codec | None, Codec | None]:
    """The stream's video and audio codecs, from its registry record."""
    found = []
    for kind in ("video", "audio"):
        codec = info.codec(kind)
        found.append(Codec.from_mime_type(codec.mimeType) if codec is not None else None)
    return found[0], found[1]


class Tap:
    """One stream written to ``out`` until it ends; :meth:`run` does it all."""

    def __init__(
        self,
        settings: Settings,
        stream: str,
        out: IO[bytes] | str,
        fmt: str | None = None,
        start: str | None = None,
    ) -> None:
        self.settings = settings
        self.stream = stream
        self.out = out
        self.format = fmt
        self.start = parse_start(start) if start is not None else None
        self.stats = TapStats()
        self._bus = Bus(settings, Metrics())
        self._nodes = NodeView(self._bus)
        self._view = RegistryView(self._bus, self._nodes)

    async def run(self) -> TapStats:
        await self._nodes.start()
        await self._view.start()
        try:
            info = self._view.get(self.stream)
            if info is None:
                await self._view.wait_for(lambda: self._view.get(self.stream), REGISTRY_WAIT_S)
                info = self._view.get(self.stream)
            if info is None:
                raise NotLive(f"stream {self.stream!r} is not live")
            video, audio = stream_codecs(info)
            fmt = self.format or mux.default_format(video, live=True)
            if fmt == "mp4":
                fmt = "fmp4"  # a pipe gets the fragmented form, playable while written
            mux.check_format(fmt, video, audio)
            reader = await self._reader(info)
            muxer = mux.Muxer(self.out, fmt, video, audio)
            try:
                await self._copy(info, reader, muxer)
            finally:
                await reader.stop()
                try:
                    await asyncio.to_thread(muxer.close)
                except (OSError, av.FFmpegError):
                    pass  # the pipe's reader is gone: nothing more to say to it
                self.stats.frames_dropped = muxer.dropped
        finally:
            await self._view.stop()
            await self._nodes.stop()
        return self.stats

    async def _reader(self, info: StreamInfo) -> FrameReader:
        if self.start is None:
            reader = FrameReader(
                self._bus, self.stream, self.settings.gop_cache_frames, session=info.session
            )
        else:
            kind, value = self.start
            target = time.time() * 1000 + value * 1000 if kind == "relative" else value
            finder = KeyframeFinder(self._bus, self.settings.rewind_search_s * 1000)
            try:
                point = await finder.find(self.stream, info.session, target)
            finally:
                await finder.stop()
            if point is None:
                raise SessionError("no keyframe of this broadcast is in Kafka near that point")
            start = {Track.VIDEO: point.video, Track.AUDIO: point.audio}
            reader = FrameReader(self._bus, self.stream, start=start, session=info.session)
        await reader.start()
        return reader

    async def _copy(self, info: StreamInfo, reader: FrameReader, muxer: mux.Muxer) -> None:
        """Copy until the session is over: the registry says it ended and two checks in a
        row find everything read. Ingest marks a session ended before its last frames
        stop arriving (a receiver still hands over what was in flight), so a single
        check could stop the tap just before them; clips (:mod:`.clips`) wait alike."""
        copy = asyncio.create_task(self._write_all(reader, muxer), name=f"tap-{self.stream}")
        try:
            read_at_end = -1  # frames_read when a check last found the session over
            while not copy.done():
                await asyncio.wait([copy], timeout=END_CHECK_S)
                live = self._view.get(self.stream)
                if live is not None and live.session == info.session:
                    continue
                read = self.stats.frames_read
                if await reader.at_end() and read == self.stats.frames_read:
                    if read == read_at_end:
                        self.stats.reason = "the stream ended"
                        break
                    read_at_end = read
                else:
                    read_at_end = -1
            else:
                copy.result()
        finally:
            copy.cancel()
            await asyncio.gather(copy, return_exceptions=True)

    async def _write_all(self, reader: FrameReader, muxer: mux.Muxer) -> None:
        stats = self.stats
        async for batch in reader.read():
            frames = [item.frame for item in batch]
            stats.frames_read += len(frames)
            stats.bytes_read += sum(len(f.payload) for f in frames)
            try:
                await mux.write_in_thread(muxer, frames)
            except (BrokenPipeError, av.FFmpegError, OSError) as exc:
                stats.reason = f"the output closed ({exc.__class__.__name__})"
                return
            stats.frames_written, stats.bytes_written = muxer.frames, muxer.bytes
