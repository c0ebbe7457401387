"""Muxing: whipcast frames into a standard container, through PyAV, without transcoding.

The one place where frames become a file or a byte stream (``tap``, clips, recording):
a :class:`Muxer` takes the frames of one publish session, as read from Kafka, and
writes them with FFmpeg's muxers to a path or a file-like object:

========  ===============  ==========================================================
format    codecs           use
========  ===============  ==========================================================
mpegts    H.264 + Opus     live pipes (``tap | ffplay -``); no VP8 in MPEG-TS
fmp4      H.264 + Opus     fragmented MP4, playable while written (live pipes)
mp4       H.264 + Opus     a finished file with its index up front (clips); a path
                           only (FFmpeg re-reads the file to move the index)
webm      VP8 + Opus       live pipes and files (Matroska's web profile)
========  ===============  ==========================================================

What FFmpeg needs and the wire format does not carry is derived here: H.264 stays in
Annex B (FFmpeg's MP4 and Matroska muxers convert it to length-prefixed NAL units
themselves) and its SPS/PPS, taken from the first keyframe, become the stream's
extradata; Opus gets an ``OpusHead``. Output starts on a video keyframe (earlier frames
are dropped). Timestamps are the RTP timestamps, unwrapped and rebased so the first
keyframe is at 0; the two tracks' RTP clocks have unrelated origins, so each track's
first frame is placed by its ingest arrival time relative to that keyframe, which keeps
audio and video as in sync as they arrived. FFmpeg interleaves the tracks by time.
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
from collections.abc import Iterable
from fractions import Fraction
from typing import IO

import av

from .frames import Codec, Frame, Track, h264_nal_types

FORMATS = ("mpegts", "fmp4", "mp4", "webm")
CONTENT_TYPES = {
    "mpegts": "video/mp2t",
    "fmp4": "video/mp4",
    "mp4": "video/mp4",
    "webm": "video/webm",
}
EXTENSIONS = {"mpegts": "ts", "fmp4": "mp4", "mp4": "mp4", "webm": "webm"}
_FFMPEG_FORMAT = {"mpegts": "mpegts", "fmp4": "mp4", "mp4": "mp4", "webm": "webm"}
_OPTIONS = {
    # A fragment per GOP, the moov up front: readable while it is written. The moov waits
    # for the first fragment (delay_moov) so that its edit lists keep each track's start:
    # without it audio that began 250 ms after the video was read back at 0.
    "fmp4": {"movflags": "frag_keyframe+empty_moov+delay_moov+default_base_moof"},
    "mp4": {"movflags": "faststart"},
}
_VIDEO_CODECS = {
    "mpegts": {Codec.H264},
    "fmp4": {Codec.H264},
    "mp4": {Codec.H264},
    "webm": {Codec.VP8},
}
# Only to describe a stream to the muxer (never opened, nothing is encoded).
_ENCODERS = {Codec.H264: "libx264", Codec.VP8: "libvpx", Codec.OPUS: "libopus"}
_DECODERS = {Codec.H264: "h264", Codec.VP8: "vp8"}
# A live muxer must not wait long for a silent track before writing the other.
MAX_INTERLEAVE_DELAY_US = 500_000
_WRAP = 1 << 32
_START_CODE = b"\x00\x00\x00\x01"


class MuxError(ValueError):
    """Frames this container cannot carry; the message says which container can."""


def default_format(video: Codec | None, live: bool) -> str:
    """The container for a stream's video codec: WebM for VP8, else MPEG-TS for live
    pipes and MP4 for files."""
    if video is Codec.VP8:
        return "webm"
    return "mpegts" if live else "mp4"


def check_format(fmt: str, video: Codec | None, audio: Codec | None) -> None:
    """Raise :class:`MuxError` unless ``fmt`` can carry these codecs."""
    if fmt not in FORMATS:
        raise MuxError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if video is not None and video not in _VIDEO_CODECS[fmt]:
        fits = [f for f in FORMATS if video in _VIDEO_CODECS[f]]
        raise MuxError(
            f"{fmt} cannot carry {video.name} video; use {' or '.join(fits)} for this stream"
        )
    if audio is not None and audio is not Codec.OPUS:
        raise MuxError(f"{audio.name} audio is not supported")


def opus_head(channels: int = 2) -> bytes:
    """The 19-byte ``OpusHead`` (RFC 7845 §5.1) FFmpeg wants as Opus extradata; WebRTC
    Opus is always signalled as 2 channels at 48 kHz, with the usual 312-sample pre-skip."""
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, 312, 48000, 0, 0)


def split_nal_units(annexb: bytes) -> list[bytes]:
    """The NAL units of an Annex B access unit, without start codes."""
    units = []
    start = annexb.find(b"\x00\x00\x01")
    while start != -1:
        begin = start + 3
        nxt = annexb.find(b"\x00\x00\x01", begin)
        end = len(annexb) if nxt == -1 else nxt
        unit = annexb[begin:end]
        if nxt != -1 and unit.endswith(b"\x00"):
            unit = unit.rstrip(b"\x00")  # the leading zero of a 4-byte start code
        if unit:
            units.append(unit)
        start = nxt
    return units


def annexb(units: Iterable[bytes]) -> bytes:
    return b"".join(_START_CODE + unit for unit in units)


def parameter_sets(access_unit: bytes) -> bytes:
    """The SPS and PPS of an Annex B access unit, in Annex B (empty if none)."""
    return annexb(u for u in split_nal_units(access_unit) if u[0] & 0x1F in (7, 8))


def avcc_to_annexb(packet: bytes, length_size: int = 4) -> bytes:
    """A length-prefixed (AVCC, as in MP4) access unit in Annex B."""
    units, pos = [], 0
    while pos + length_size <= len(packet):
        size = int.from_bytes(packet[pos : pos + length_size], "big")
        pos += length_size
        if size == 0 or pos + size > len(packet):
            raise ValueError("malformed length-prefixed H.264 access unit")
        units.append(packet[pos : pos + size])
        pos += size
    return annexb(units)


def avcc_parameter_sets(extradata: bytes) -> tuple[int, bytes]:
    """NAL length size and SPS/PPS (Annex B) of an ``avcC`` record (ISO 14496-15)."""
    if len(extradata) < 7 or extradata[0] != 1:
        raise ValueError("not an avcC record")
    length_size = (extradata[4] & 0x03) + 1
    units, pos = [], 5
    for count_mask in (0x1F, 0xFF):  # SPS count (5 bits), then PPS count
        count = extradata[pos] & count_mask
        pos += 1
        for _ in range(count):
            size = int.from_bytes(extradata[pos : pos + 2], "big")
            units.append(extradata[pos + 2 : pos + 2 + size])
            pos += 2 + size
    return length_size, annexb(units)


def picture_size(keyframe: Frame) -> tuple[int, int]:
    """Width and height of a video keyframe (decoded once: containers want them)."""
    decoder = av.CodecContext.create(_DECODERS[keyframe.codec], "r")
    try:
        pictures = decoder.decode(av.Packet(keyframe.payload)) + decoder.decode(None)
    except av.FFmpegError as exc:
        raise MuxError(f"the first keyframe does not decode: {exc}") from None
    if not pictures:
        raise MuxError("the first keyframe decodes to no picture")
    return pictures[-1].width, pictures[-1].height


def _stream_like(container: av.container.OutputContainer, encoder: str, kind: str):
    """A stream for already-encoded packets whose codec parameters (extradata, size)
    can be set. PyAV's ``add_mux_stream`` gives no way to set extradata, and
    ``add_stream`` would open an encoder; a stream made from a template is neither."""
    scratch = av.open(io.BytesIO(), "w", format="matroska")
    try:
        if kind == "audio":
            template = scratch.add_stream(encoder, rate=48000, layout="stereo")
        else:
            template = scratch.add_stream(encoder)
        return container.add_stream_from_template(template, opaque=False)
    finally:
        scratch.close()


class _Clock:
    """One track's RTP timestamps, unwrapped and rebased onto the output timeline."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.origin: int | None = None
        self._last_rtp = 0
        self._extended = 0
        self.last_pts: int | None = None

    def pts(self, frame: Frame, base_us: int) -> int:
        if self.origin is None:
            # Place the track's first frame by its arrival relative to the start.
            self.origin = (frame.arrival_us - base_us) * self.rate // 1_000_000
            self._last_rtp = frame.rtp_timestamp
            return self.origin
        delta = (frame.rtp_timestamp - self._last_rtp) % _WRAP
        if delta >= _WRAP // 2:
            delta -= _WRAP  # reordered or stepped back
        self._last_rtp = frame.rtp_timestamp
        self._extended += delta
        return self.origin + self._extended


class Muxer:
    """Frames of one publish session in, one container out (call :meth:`close`).

    ``target`` is a path or a writable binary file-like object (``mp4`` needs a
    path). Nothing is written before the first video keyframe (or the first audio
    frame of an audio-only stream). Not thread-safe; blocking (FFmpeg): readers run it
    in a worker thread or accept the cost of small writes on their own loop.
    """

    def __init__(
        self,
        target: str | os.PathLike | IO[bytes],
        fmt: str,
        video: Codec | None,
        audio: Codec | None,
        *,
        flush_s: float | None = None,
    ) -> None:
        check_format(fmt, video, audio)
        if video is None and audio is None:
            raise MuxError("a stream without tracks has nothing to mux")
        if fmt == "mp4" and not isinstance(target, str | os.PathLike):
            raise MuxError("mp4 is written to a path (use fmp4 for a pipe)")
        self.format = fmt
        self._target = target
        self._flush_s = flush_s
        """Recording: a fragment (fMP4) or cluster (WebM) at least this often, each
        handed to the target as soon as it is complete, so a crash loses at most that."""
        self._codecs = {Track.VIDEO: video, Track.AUDIO: audio}
        self._container: av.container.OutputContainer | None = None
        self._streams: dict[Track, av.stream.Stream] = {}
        self._clocks = {
            track: _Clock(codec.clock_rate) for track, codec in self._codecs.items() if codec
        }
        self._base_us: int | None = None
        self.session: int | None = None
        self.frames = 0
        self.bytes = 0
        self.dropped = 0
        """Frames not written: before the first keyframe, or out of time order."""
        self.first_us: int | None = None
        self.last_us: int | None = None
        """Arrival times of the first and last frames written."""

    @property
    def started(self) -> bool:
        return self._container is not None

    def duration_s(self) -> float:
        """Span of the frames written, by their rebased timestamps."""
        ends = [clock.last_pts / clock.rate for clock in self._clocks.values() if clock.last_pts]
        return max(ends, default=0.0)

    def write(self, frame: Frame) -> bool:
        """Mux one frame; ``False`` if it was dropped (before the start, or late)."""
        codec = self._codecs.get(frame.track)
        if codec is None or frame.codec is not codec:
            self.dropped += 1
            return False
        if self._container is None:
            starts = (
                frame.keyframe if frame.track is Track.VIDEO else self._codecs[Track.VIDEO] is None
            )
            if not starts:
                self.dropped += 1
                return False
            self._open(frame)
        if self.session is not None and frame.session != self.session:
            raise MuxError("a muxer takes the frames of one publish session")
        clock = self._clocks[frame.track]
        assert self._base_us is not None
        pts = clock.pts(frame, self._base_us)
        if pts < 0 or (clock.last_pts is not None and pts <= clock.last_pts):
            self.dropped += 1  # audio from before the keyframe, or a step back in time
            return False
        clock.last_pts = pts
        packet = av.Packet(frame.payload)
        packet.stream = self._streams[frame.track]
        packet.time_base = Fraction(1, clock.rate)
        packet.pts = packet.dts = pts
        packet.is_keyframe = frame.keyframe
        self._container.mux(packet)
        self.frames += 1
        self.bytes += len(frame.payload)
        self.last_us = frame.arrival_us
        return True

    def _open(self, first: Frame) -> None:
        self.session = first.session
        self._base_us = first.arrival_us
        self.first_us = first.arrival_us
        options = dict(_OPTIONS.get(self.format, {}))
        if self._flush_s is not None:
            options["flush_packets"] = "1"
            if self.format == "fmp4":
                options["frag_duration"] = str(int(self._flush_s * 1_000_000))
            elif self.format == "webm":
                options["cluster_time_limit"] = str(int(self._flush_s * 1000))
        container = av.open(
            self._target,
            "w",
            format=_FFMPEG_FORMAT[self.format],
            options=options,
            container_options={"max_interleave_delta": str(MAX_INTERLEAVE_DELAY_US)},
        )
        video, audio = self._codecs[Track.VIDEO], self._codecs[Track.AUDIO]
        try:
            if video is not None:
                stream = _stream_like(container, _ENCODERS[video], "video")
                if video is Codec.H264:
                    if 7 not in h264_nal_types(first.payload):
                        raise MuxError("the first H.264 keyframe carries no SPS")
                    stream.codec_context.extradata = parameter_sets(first.payload)
                stream.width, stream.height = picture_size(first)
                stream.time_base = Fraction(1, video.clock_rate)
                self._streams[Track.VIDEO] = stream
            if audio is not None:
                stream = _stream_like(container, _ENCODERS[audio], "audio")
                stream.codec_context.extradata = opus_head()
                stream.time_base = Fraction(1, 48000)
                self._streams[Track.AUDIO] = stream
        except BaseException:
            container.close()
            raise
        self._container = container

    def close(self) -> None:
        """Flush and finish the container (trailer, index); safe to call twice."""
        container, self._container = self._container, None
        if container is not None:
            container.close()


async def write_in_thread(muxer: Muxer, frames: list[Frame]) -> None:
    """Mux ``frames`` in a worker thread (FFmpeg writes block: a slow pipe, a disk),
    so the loop reading Kafka never waits. If the caller is cancelled meanwhile, the
    write still completes before the cancellation goes on, so that nobody closes the
    muxer while a thread is writing to it."""
    write = asyncio.ensure_future(asyncio.to_thread(_write_all, muxer, frames))
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        await asyncio.gather(write, return_exceptions=True)
        raise


def _write_all(muxer: Muxer, frames: list[Frame]) -> None:
    for frame in frames:
        muxer.write(frame)
