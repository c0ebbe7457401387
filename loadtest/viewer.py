"""One headless WHEP viewer: a real aiortc peer (ICE, DTLS, SRTP) that reassembles the
video frames it receives, counts them, and, as a *probe*, decodes them and reads the
capture time painted into their pixels.

aiortc's own receive path (NACK generator, jitter buffer, decoder thread per viewer)
would cost more than the gateway's work per viewer, so :class:`FrameTracker` replaces
the receiver's RTP handler on this one receiver: frames are complete when every packet
from the frame's first to its marker came in order. Probes hand complete frames to
their own decoder on a single thread (frames decode in order, off the event loop);
the glass-to-glass sample is wall-clock now minus the decoded stamp, the publisher and
the probe reading the same machine clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs.h264 import h264_depayload
from aiortc.codecs.vpx import vp8_depayload
from aiortc.rtp import RtpPacket
from aiortc.sdp import SessionDescription
from yarl import URL

from .stamp import StampLayout, age_ms

FREEZE_NS = 200_000_000
DEPAYLOAD = {"H264": h264_depayload, "VP8": vp8_depayload}
DECODER = {"H264": "h264", "VP8": "vp8"}


@dataclass
class WindowStats:
    """What one viewer saw while the measurement window was open."""

    frames: int = 0
    incomplete: int = 0
    packets_lost: int = 0
    freezes: int = 0
    freeze_ms: float = 0.0
    g2g_ms: list[float] = field(default_factory=list)
    decoded: int = 0
    unreadable: int = 0


class FrameTracker:
    """Stands in for ``RTCRtpReceiver._handle_rtp_packet`` of one video receiver."""

    def __init__(self, probe: bool) -> None:
        self.probe = probe
        self.layout: StampLayout | None = None
        """Probes: where the stamp lies, from the first decoded frame's size."""
        self.codec = ""
        self._pt: int | None = None
        self._depayload: Any = None
        self._last_seq: int | None = None
        self._timestamp: int | None = None
        self._broken = False
        self._payloads: list[bytes] = []
        self._last_frame_ns = 0
        self.first_packet_ns = 0
        self.first_frame_ns = 0
        """First complete frame (light viewer) or first decoded, stamped frame (probe)."""
        self.first_frame = asyncio.Event()
        self.recording = False
        self.window = WindowStats()
        self._decoder: av.CodecContext | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop = asyncio.get_running_loop()

    def configure(self, answer_sdp: str) -> None:
        """Learn the video codec and payload type the gateway answered with."""
        for media in SessionDescription.parse(answer_sdp).media:
            if media.kind != "video":
                continue
            for codec in media.rtp.codecs:
                if codec.name in DEPAYLOAD:
                    self.codec, self._pt = codec.name, codec.payloadType
                    self._depayload = DEPAYLOAD[codec.name]
                    break
        if self._pt is None:
            raise RuntimeError("the answer has no H.264 or VP8 video")
        if self.probe:
            self._decoder = av.CodecContext.create(DECODER[self.codec], "r")
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="probe-decode")

    def start_window(self) -> None:
        self.window = WindowStats()
        self.recording = True

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def handle(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        if packet.payload_type != self._pt:
            return  # RTX or padding: this viewer sends no NACKs
        if not self.first_packet_ns:
            self.first_packet_ns = time.time_ns()
        seq = packet.sequence_number
        gap = False
        if self._last_seq is not None:
            step = (seq - self._last_seq) & 0xFFFF
            if step == 0 or step >= 0x8000:
                return  # repeated or late
            if step > 1:
                gap = True
                if self.recording:
                    self.window.packets_lost += step - 1
        self._last_seq = seq
        if packet.timestamp != self._timestamp:
            if self._timestamp is not None and self.recording:
                self.window.incomplete += 1  # the previous frame never saw its marker
            self._timestamp, self._broken, self._payloads = packet.timestamp, gap, []
        else:
            self._broken |= gap
        if self._decoder is not None:
            self._payloads.append(packet.payload)
        if packet.marker:
            if self._broken:
                if self.recording:
                    self.window.incomplete += 1
            else:
                self._complete(time.time_ns())
            self._timestamp = None

    def _complete(self, now_ns: int) -> None:
        if self.recording:
            self.window.frames += 1
            if self._last_frame_ns and now_ns - self._last_frame_ns > FREEZE_NS:
                self.window.freezes += 1
                self.window.freeze_ms += (now_ns - self._last_frame_ns) / 1e6
        self._last_frame_ns = now_ns
        if self._decoder is None:
            if not self.first_frame_ns:
                self.first_frame_ns = now_ns
                self.first_frame.set()
            return
        data = b"".join(self._depayload(p) for p in self._payloads)
        assert self._executor is not None
        self._executor.submit(self._decode, data)

    def _decode(self, data: bytes) -> None:
        """On the probe's decode thread: decode, read the stamp, keep the sample."""
        assert self._decoder is not None
        try:
            frames = self._decoder.decode(av.Packet(data))
        except av.FFmpegError:
            if self.recording:
                self.window.unreadable += 1  # a frame the decoder rejects shows nothing
            return
        for frame in frames:
            now_ns = time.time_ns()
            if self.layout is None or self.layout.width != frame.width:
                self.layout = StampLayout(frame.width, frame.height)
            plane = frame.planes[0]
            luma = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
            stamp = self.layout.read(luma)
            window = self.window
            if self.recording and stamp is None:
                window.unreadable += 1
            elif self.recording:
                window.decoded += 1
                window.g2g_ms.append(age_ms(stamp, now_ns // 1_000_000))
            if stamp is not None and not self.first_frame_ns:
                self.first_frame_ns = now_ns
                self._loop.call_soon_threadsafe(self.first_frame.set)


@dataclass
class Viewer:
    pc: RTCPeerConnection
    tracker: FrameTracker
    posted_ns: int
    answered_ns: int
    location: str | None = None


async def connect(http: aiohttp.ClientSession, url: str, tracker: FrameTracker) -> Viewer:
    """WHEP: offer to receive video, POST it, apply the answer (ICE/DTLS follow)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiver = pc.addTransceiver("video", direction="recvonly").receiver
    receiver._handle_rtp_packet = tracker.handle  # type: ignore[method-assign]
    try:
        await pc.setLocalDescription(await pc.createOffer())
        posted = time.time_ns()
        async with http.post(
            url, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
        ) as response:
            body = await response.text()
            if response.status != 201:
                raise RuntimeError(f"WHEP POST answered {response.status}: {body[:200]}")
            location = response.headers.get("Location")
        answered = time.time_ns()
        tracker.configure(body)
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    except BaseException:
        await pc.close()
        tracker.close()
        raise
    resource = str(URL(url).join(URL(location))) if location else None
    return Viewer(pc, tracker, posted, answered, resource)


async def close(http: aiohttp.ClientSession, viewer: Viewer) -> None:
    """DELETE the session resource, then close the peer; failures only cost a log line
    on the server (the session also times out there)."""
    if viewer.location:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.delete(viewer.location) as response:
                await response.read()
    await viewer.pc.close()
    viewer.tracker.close()
