"""A live video source that costs little more than its encoder: stamped, encoded frames.

Rendering a 720p picture per frame in Python would saturate the load generator before
the gateway, so the moving background (FFmpeg's ``testsrc2``) is rendered once, as
raw I420, and each frame only copies it and paints the capture-time band
(:mod:`whipcast.loadtest.stamp`). Frames are encoded here, with libx264 (ultrafast, zerolatency,
constrained baseline, one slice) or libvpx (realtime), so the publisher's WebRTC sender
only packetizes them, and keyframe requests from the gateway reach this encoder.
"""

from __future__ import annotations

import fractions
import time
from dataclasses import dataclass

import av
import numpy as np

from .stamp import StampLayout

CODECS = {"h264": "libx264", "vp8": "libvpx"}
MIME = {"h264": "video/H264", "vp8": "video/VP8"}
BACKGROUND_SECONDS = 2
VIDEO_CLOCK = 90000


@dataclass(frozen=True)
class VideoFormat:
    codec: str
    width: int
    height: int
    fps: int
    bitrate_kbps: int
    gop_seconds: float = 2.0

    @property
    def gop(self) -> int:
        return max(1, round(self.gop_seconds * self.fps))


def render_background(fmt: VideoFormat) -> list[np.ndarray]:
    """``BACKGROUND_SECONDS`` of ``testsrc2`` as I420 arrays of shape (h * 3 / 2, w)."""
    frames: list[np.ndarray] = []
    source = f"testsrc2=size={fmt.width}x{fmt.height}:rate={fmt.fps}"
    with av.open(source, format="lavfi") as container:
        for frame in container.decode(video=0):
            frames.append(frame.reformat(format="yuv420p").to_ndarray())
            if len(frames) == BACKGROUND_SECONDS * fmt.fps:
                break
    return frames


def open_encoder(fmt: VideoFormat) -> av.VideoCodecContext:
    """An encoder tuned for real time on one core: no lookahead, no B-frames, one
    slice per frame (as browsers send), CBR-ish at the target bitrate."""
    codec = av.CodecContext.create(CODECS[fmt.codec], "w")
    codec.width, codec.height, codec.pix_fmt = fmt.width, fmt.height, "yuv420p"
    codec.time_base = fractions.Fraction(1, fmt.fps)
    codec.framerate = fractions.Fraction(fmt.fps, 1)
    codec.bit_rate = fmt.bitrate_kbps * 1000
    codec.gop_size = fmt.gop
    codec.thread_count = 1
    rate = f"{fmt.bitrate_kbps}k"
    if fmt.codec == "h264":
        codec.options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "profile": "baseline",
            "forced-idr": "1",
            "maxrate": rate,
            "bufsize": rate,
        }
    else:
        codec.options = {
            "deadline": "realtime",
            "cpu-used": "8",
            "lag-in-frames": "0",
            "error-resilient": "1",
            "minrate": rate,
            "maxrate": rate,
            "bufsize": rate,
            "static-thresh": "1",
        }
    return codec


class StampedSource:
    """Frame ``i``: background ``i`` mod its length, stamped with the wall-clock ms at
    which it is made, encoded into one ``av.Packet`` with 90 kHz timestamps."""

    def __init__(self, fmt: VideoFormat) -> None:
        self.fmt = fmt
        self.layout = StampLayout(fmt.width, fmt.height)
        self._background = render_background(fmt)
        self._canvas = np.empty_like(self._background[0])
        self._encoder = open_encoder(fmt)
        self._index = 0
        self._keyframe_wanted = False
        self.encode_seconds = 0.0
        self.keyframes = 0

    def request_keyframe(self) -> None:
        self._keyframe_wanted = True

    def next_packet(self) -> av.Packet:
        """Make, stamp and encode the next frame (blocking: run it off the event loop)."""
        started = time.perf_counter()
        np.copyto(self._canvas, self._background[self._index % len(self._background)])
        self.layout.paint(self._canvas[: self.fmt.height], time.time_ns() // 1_000_000)
        frame = av.VideoFrame.from_ndarray(self._canvas, format="yuv420p")
        frame.pts, frame.time_base = self._index, self._encoder.time_base
        if self._keyframe_wanted:
            self._keyframe_wanted = False
            frame.pict_type = av.video.frame.PictureType.I
        packets = self._encoder.encode(frame)
        data = b"".join(bytes(p) for p in packets)
        packet = av.Packet(data)
        packet.pts = packet.dts = self._index * VIDEO_CLOCK // self.fmt.fps
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.keyframes += any(p.is_keyframe for p in packets)
        self._index += 1
        self.encode_seconds += time.perf_counter() - started
        return packet

    @property
    def frames(self) -> int:
        return self._index
