"""Real aiortc peers for tests: a WHIP publisher whose frames carry a counter in their
pixels, and a WHEP viewer that decodes what it receives and reads the counters back.

Loopback never loses a packet, so a viewer can be given a lossy link: ``loss`` drops
that share of the RTP packets it receives (retransmissions included) before aiortc's
receiver sees them, so its own NACK and PLI logic reacts as on a bad network. A
:class:`Link` goes further: a bottleneck of a given bitrate with a short queue (kernel
traffic shaping is not available on test machines), so the viewer's REMB, receiver
reports and NACKs say what a slow real link would.

:func:`publish_simulcast` is a simulcasting publisher (aiortc cannot send simulcast): aiortc
does ICE and DTLS, and the publisher encodes the counter frames at up to three sizes
itself, sending each layer on its own SSRC with the RID header extension (and RTX with
the repaired RID), as browsers do."""

from __future__ import annotations

import asyncio
import fractions
import random
import time
from dataclasses import dataclass, field

import aiohttp
import av
import numpy as np
from aiortc import (
    AudioStreamTrack,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
    VideoStreamTrack,
    clock,
)
from aiortc.codecs import get_encoder
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import (
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    HeaderExtensionsMap,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtpPacket,
    wrap_rtx,
)
from aiortc.sdp import SessionDescription
from whipcast.gateway import aiortc_compat
from whipcast.gateway.frames import h264_nal_types

WIDTH, HEIGHT = 320, 240
BITS = 16
CELL = WIDTH // BITS


_NOISE = np.random.default_rng(7)


def draw_counter(counter: int, noise: bool = False) -> av.VideoFrame:
    """A frame whose top band holds ``counter`` as 16 black/white cells (survives any
    sane encoder), over a moving gradient so the encoder has real work; with ``noise``,
    fresh noise below the band makes it spend its whole target bitrate."""
    image = np.full((HEIGHT, WIDTH, 3), 64, dtype=np.uint8)
    image[HEIGHT // 2 :, :, 1] = (np.arange(WIDTH) + counter * 4) % 256
    if noise:
        image[CELL * 2 :] = _NOISE.integers(0, 256, (HEIGHT - CELL * 2, WIDTH, 3), np.uint8)
    for bit in range(BITS):
        if counter >> bit & 1:
            image[0:CELL, bit * CELL : (bit + 1) * CELL] = 255
        else:
            image[0:CELL, bit * CELL : (bit + 1) * CELL] = 0
    return av.VideoFrame.from_ndarray(image, format="rgb24")


def read_counter(frame: av.VideoFrame) -> int:
    image = frame.to_ndarray(format="gray")
    if image.shape[1] != WIDTH:
        image = frame.reformat(width=WIDTH, height=HEIGHT).to_ndarray(format="gray")
    value = 0
    for bit in range(BITS):
        cell = image[
            CELL // 4 : CELL * 3 // 4, bit * CELL + CELL // 4 : (bit + 1) * CELL - CELL // 4
        ]
        if cell.mean() > 128:
            value |= 1 << bit
    return value


class CounterTrack(VideoStreamTrack):
    def __init__(self, fps: int = 30, noise: bool = False) -> None:
        super().__init__()
        self.fps = fps
        self.noise = noise
        self.counter = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        target = self._start + self.counter / self.fps
        await asyncio.sleep(max(0.0, target - time.monotonic()))
        frame = draw_counter(self.counter, self.noise)
        frame.pts = self.counter * (90000 // self.fps)
        frame.time_base = fractions.Fraction(1, 90000)
        self.counter += 1
        return frame


def prefer(pc: RTCPeerConnection, kind: str, mime: str) -> None:
    codecs = [c for c in RTCRtpSender.getCapabilities(kind).codecs if c.mimeType == mime]
    rtx = [c for c in RTCRtpSender.getCapabilities(kind).codecs if c.mimeType.endswith("/rtx")]
    for t in pc.getTransceivers():
        if t.kind == kind:
            t.setCodecPreferences(codecs + rtx[:1])


async def hang_up(
    session: aiohttp.ClientSession, location: str, pc: RTCPeerConnection, delete: bool
) -> int | None:
    """End a WHIP session (DELETE unless ``delete`` is false); the DELETE's status."""
    status = None
    if delete:
        async with session.delete(location) as response:
            status = response.status
    await pc.close()
    await session.close()
    return status


@dataclass
class Publisher:
    pc: RTCPeerConnection
    location: str
    track: CounterTrack
    session: aiohttp.ClientSession

    async def close(self, delete: bool = True) -> int | None:
        return await hang_up(self.session, self.location, self.pc, delete)


async def post_sdp(session: aiohttp.ClientSession, url: str, sdp: str, headers=None):
    headers = {"Content-Type": "application/sdp", **(headers or {})}
    async with session.post(url, data=sdp, headers=headers) as response:
        return response.status, dict(response.headers), await response.text()


async def publish(base: str, stream: str, codec: str = "video/H264", token: str | None = None,
                  fps: int = 30, audio: bool = True, noise: bool = False) -> Publisher:  # fmt: skip
    pc = RTCPeerConnection()
    track = CounterTrack(fps, noise)
    pc.addTransceiver(track, direction="sendonly")
    if audio:
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    prefer(pc, "video", codec)
    await pc.setLocalDescription(await pc.createOffer())
    session = aiohttp.ClientSession(base_url=base)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, response_headers, body = await post_sdp(
        session, f"/whip/{stream}", pc.localDescription.sdp, headers
    )
    if status != 201:
        await pc.close()
        await session.close()
        raise AssertionError(f"WHIP POST answered {status}: {body}")
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return Publisher(pc, response_headers["Location"], track, session)


@dataclass
class Viewer:
    pc: RTCPeerConnection
    location: str
    session: aiohttp.ClientSession
    posted_at: float
    frames: list[tuple[float, int, bool]] = field(default_factory=list)
    """(arrival monotonic time, decoded counter, decoded frame was a keyframe)"""
    audio_frames: int = 0
    codec: str = ""
    rtp_received: int = 0
    rtp_dropped: int = 0
    """RTP packets that arrived, and those of them the simulated lossy link dropped."""
    audio_times: list[float] = field(default_factory=list)
    """Arrival (monotonic) time of each decoded audio frame."""
    video_pts: list[int] = field(default_factory=list)
    """RTP timestamp of each decoded video frame (a layer switch must not break it)."""
    video_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each decoded video frame."""
    link: Link | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def wait_frames(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"viewer got {len(self.frames)} of {count} frames")
            await asyncio.sleep(0.02)

    async def close(self, delete: bool = True) -> int | None:
        status = None
        if delete:
            async with self.session.delete(self.location) as response:
                status = response.status
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        await self.session.close()
        return status


@dataclass
class Link:
    """A bottleneck in front of a test viewer: packets leave a FIFO at ``bitrate``
    (bits/s; ``None``: unlimited), a packet that would wait more than ``queue_s`` in it
    is dropped, and ``loss`` of the rest is dropped at random. Change ``bitrate`` at any
    time to move the bottleneck."""

    bitrate: float | None = None
    queue_s: float = 0.1
    loss: float = 0.0
    overhead: int = 40
    """Bytes each packet adds on the wire besides its payload (IP, UDP, RTP, SRTP)."""
    packets: int = 0
    queue_drops: int = 0
    random_drops: int = 0
    _busy_until: float = 0.0

    def admit(self, size: int, now: float, rng: random.Random) -> float | None:
        """Seconds until a packet of ``size`` bytes arrives, or None if dropped."""
        self.packets += 1
        if self.loss and rng.random() < self.loss:
            self.random_drops += 1
            return None
        if self.bitrate is None:
            return 0.0
        start = max(now, self._busy_until)
        if start - now > self.queue_s:
            self.queue_drops += 1
            return None
        self._busy_until = start + (size + self.overhead) * 8 / self.bitrate
        return self._busy_until - now


async def play(
    base: str,
    stream: str,
    query: str = "",
    loss: float = 0.0,
    seed: int = 1,
    link: Link | None = None,
    rtx: bool = True,
    resync: bool = False,
) -> Viewer:
    """A WHEP viewer; ``query`` (e.g. ``start=-30``) is appended to the endpoint URL,
    ``loss`` drops that share of incoming RTP before aiortc sees it, ``link`` puts a
    bottleneck in front of it (an impaired link), and ``rtx=False`` offers no RTX, so
    resends come on the media SSRC."""
    pc = RTCPeerConnection()
    video = pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    if not rtx:
        codecs = RTCRtpSender.getCapabilities("video").codecs
        video.setCodecPreferences([c for c in codecs if not c.mimeType.endswith("/rtx")])
    session = aiohttp.ClientSession(base_url=base)
    await pc.setLocalDescription(await pc.createOffer())
    posted = time.monotonic()
    url = f"/whep/{stream}" + (f"?{query}" if query else "")
    status, headers, body = await post_sdp(session, url, pc.localDescription.sdp)
    if status != 201:
        await pc.close()
        await session.close()
        raise AssertionError(f"WHEP POST answered {status}: {body}")
    viewer = Viewer(pc, headers["Location"], session, posted, link=link)
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    rng = random.Random(seed)
    for transceiver in pc.getTransceivers():
        if loss:
            _impair(viewer, transceiver.receiver, loss, rng)
        if link is not None:
            _shape(link, transceiver.receiver, rng)
        if resync and transceiver.kind == "video":
            resync_on_keyframes(transceiver.receiver)
        track = transceiver.receiver.track
        if track is not None:  # None: the stream has no such track
            viewer._tasks.append(asyncio.create_task(_consume(viewer, track)))
    return viewer


def _impair(viewer: Viewer, receiver, loss: float, rng: random.Random) -> None:
    """Put a link that drops ``loss`` of the RTP packets in front of ``receiver``."""
    handle = receiver._handle_rtp_packet  # what aiortc's DTLS transport calls per packet

    async def lossy(packet, arrival_time_ms: int) -> None:
        viewer.rtp_received += 1
        if rng.random() < loss:
            viewer.rtp_dropped += 1
            return
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = lossy


def _starts_keyframe(data: bytes) -> bool:
    """Whether a depacketized RTP payload begins a keyframe: H.264 with its SPS, or a
    VP8 key frame (frame tag's P bit clear, then the start code 9d 01 2a)."""
    return h264_nal_types(data)[:1] == [7] or (
        len(data) >= 6 and not data[0] & 1 and data[3:6] == b"\x9d\x01\x2a"
    )


def resync_on_keyframes(receiver) -> None:
    """Decode the first complete keyframe after a gap NACKs could not fill, as a
    browser does. aiortc's jitter buffer instead waits for the gap until 512 packets
    have passed (seconds of frozen video at a few hundred kbps), so a test of what a
    viewer sees after its link dropped packets would measure aiortc, not the server."""
    jitter = receiver._RTCRtpReceiver__jitter_buffer
    add = jitter.add

    def resyncing_add(packet):
        origin = jitter._origin
        if origin is not None and _starts_keyframe(getattr(packet, "_data", b"")):
            delta = (packet.sequence_number - origin) & 0xFFFF
            held = jitter._packets
            if 0 < delta < jitter.capacity and any(
                held[(origin + i) % jitter.capacity] is None for i in range(delta)
            ):
                jitter.remove(delta)  # a keyframe starts here: what is before is moot
        return add(packet)

    jitter.add = resyncing_add


def _shape(link: Link, receiver, rng: random.Random) -> None:
    """Put ``link`` in front of ``receiver``; delayed packets reach aiortc with their
    delayed arrival time, so its REMB estimator sees the queue build up."""
    handle = receiver._handle_rtp_packet
    loop = asyncio.get_running_loop()

    def deliver(packet) -> None:
        loop.create_task(handle(packet, clock.current_ms()))

    async def shaped(packet, arrival_time_ms: int) -> None:
        delay = link.admit(len(packet.payload) + packet.padding_size, time.monotonic(), rng)
        if delay is None:
            return
        if delay <= 0:
            await handle(packet, arrival_time_ms)
        else:
            loop.call_later(delay, deliver, packet)

    receiver._handle_rtp_packet = shaped


async def _consume(viewer: Viewer, track) -> None:
    try:
        while True:
            frame = await track.recv()
            if track.kind == "video":
                viewer.frames.append((time.monotonic(), read_counter(frame), frame.key_frame))
                viewer.video_pts.append(frame.pts)
                viewer.video_sizes.append((frame.width, frame.height))
            else:
                viewer.audio_frames += 1
                viewer.audio_times.append(time.monotonic())
    except MediaStreamError:
        pass


# Simulcast publisher

RID_EXTENSION_ID, REPAIRED_RID_EXTENSION_ID = 10, 11
_SIMULCAST_EXTENSIONS = [
    RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
    RTCRtpHeaderExtensionParameters(
        id=3, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
    ),
    RTCRtpHeaderExtensionParameters(
        id=RID_EXTENSION_ID, uri="urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
    ),
    RTCRtpHeaderExtensionParameters(
        id=REPAIRED_RID_EXTENSION_ID,
        uri="urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
    ),
]
RID_PACKETS = 20
"""Packets of each SSRC that carry the RID before a receiver report acknowledges it
(libwebrtc stops sending it then): the receiver must bind the SSRC on the way."""


@dataclass(eq=False)  # hashable: aiortc keeps RTCP recipients in a set
class SimulcastLayer:
    """One encoding of a :class:`SimulcastPublisher`, and what it saw of the feedback."""

    rid: str
    width: int
    height: int
    ssrc: int
    rtx_ssrc: int
    encoder: object = None
    sequence: int = field(default_factory=lambda: random.randrange(1 << 16))
    rtx_sequence: int = 0
    history: dict[int, RtpPacket] = field(default_factory=dict)
    sent: int = 0
    acked: bool = False
    keyframe_wanted: bool = True
    keyframes: int = 0
    plis: int = 0
    nacked: int = 0
    retransmitted: int = 0
    drop: set[int] = field(default_factory=set)
    """Indexes (0 = first packet of the layer) to drop on first sending: a lossy link."""
    paused: bool = False
    """Set to stop sending the layer (as a browser short of uplink does); it resumes
    with a keyframe."""
    ts_offset: int = field(default_factory=lambda: random.getrandbits(32))
    """Browsers start each layer's RTP timestamps at a random value."""
    publisher: SimulcastPublisher | None = None

    async def _handle_rtcp_packet(self, packet) -> None:
        """Feedback aiortc routes here (``aiortc_compat.route_rtcp``)."""
        if isinstance(packet, RtcpRrPacket):
            self.acked = self.acked or any(r.ssrc == self.ssrc for r in packet.reports)
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI:
            self.plis += 1
            self.keyframe_wanted = True
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            self.nacked += len(packet.lost)
            self.publisher._retransmit(self, packet.lost)


@dataclass
class SimulcastPublisher:
    pc: RTCPeerConnection
    location: str
    session: aiohttp.ClientSession
    layers: list[SimulcastLayer]
    answer: str
    fps: int = 30
    counter: int = 0
    _task: asyncio.Task | None = None

    def layer(self, rid: str) -> SimulcastLayer:
        return next(x for x in self.layers if x.rid == rid)

    async def close(self, delete: bool = True) -> int | None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return await hang_up(self.session, self.location, self.pc, delete)

    def _start(self, codec, rtx_pt: int | None) -> None:
        self._codec, self._rtx_pt = codec, rtx_pt
        self._dtls = self.pc.getTransceivers()[0].sender.transport
        self._mid = self.pc.getTransceivers()[0].mid
        self._map = HeaderExtensionsMap()
        self._map.configure(RTCRtpParameters(headerExtensions=_SIMULCAST_EXTENSIONS))
        for layer in self.layers:
            layer.encoder = get_encoder(codec)
            layer.publisher = self
            aiortc_compat.route_rtcp(self._dtls, layer.ssrc, layer)
        connected = asyncio.Event()
        self.pc.on(
            "connectionstatechange",
            lambda: connected.set() if self.pc.connectionState == "connected" else None,
        )
        if self.pc.connectionState == "connected":
            connected.set()
        self._task = asyncio.create_task(self._run(connected))

    async def _run(self, connected: asyncio.Event) -> None:
        await connected.wait()
        start = time.monotonic()
        while True:
            await asyncio.sleep(max(0.0, start + self.counter / self.fps - time.monotonic()))
            image = draw_counter(self.counter)
            pts = self.counter * (90000 // self.fps)
            self.counter += 1
            encoded = await asyncio.to_thread(self._encode, image, pts)
            for layer, (payloads, timestamp) in zip(self.layers, encoded, strict=True):
                for index, payload in enumerate(payloads):
                    packet = RtpPacket(
                        payload_type=self._codec.payloadType,
                        marker=int(index == len(payloads) - 1),
                        sequence_number=layer.sequence,
                        timestamp=(timestamp + layer.ts_offset) & 0xFFFFFFFF,
                        ssrc=layer.ssrc,
                        payload=payload,
                    )
                    layer.sequence = (layer.sequence + 1) & 0xFFFF
                    packet.extensions.mid = self._mid
                    if not layer.acked or layer.sent < RID_PACKETS:
                        packet.extensions.rtp_stream_id = layer.rid
                    layer.history[packet.sequence_number] = packet
                    layer.history.pop((packet.sequence_number - 512) & 0xFFFF, None)
                    dropped = layer.sent in layer.drop
                    layer.sent += 1
                    if not dropped:
                        await self._send(packet)

    def _encode(self, image, pts: int) -> list[tuple[list[bytes], int]]:
        out = []
        for layer in self.layers:
            if layer.paused:
                layer.keyframe_wanted = True
                out.append(([], 0))
                continue
            frame = image.reformat(width=layer.width, height=layer.height)
            frame.pts, frame.time_base = pts, fractions.Fraction(1, 90000)
            keyframe, layer.keyframe_wanted = layer.keyframe_wanted, False
            layer.keyframes += keyframe
            out.append(layer.encoder.encode(frame, force_keyframe=keyframe))
        return out

    async def _send(self, packet: RtpPacket) -> None:
        packet.extensions.abs_send_time = (clock.current_ntp_time() >> 14) & 0x00FFFFFF
        try:
            await aiortc_compat.send_rtp(self._dtls, packet.serialize(self._map))
        except ConnectionError:
            pass

    def _retransmit(self, layer: SimulcastLayer, lost: list[int]) -> None:
        for seq in lost:
            original = layer.history.get(seq)
            if original is None:
                continue
            layer.retransmitted += 1
            if self._rtx_pt is None:
                asyncio.ensure_future(self._send(original))
                continue
            rtx = wrap_rtx(original, self._rtx_pt, layer.rtx_sequence, layer.rtx_ssrc)
            layer.rtx_sequence = (layer.rtx_sequence + 1) & 0xFFFF
            rtx.extensions = type(original.extensions)()
            rtx.extensions.mid = self._mid
            rtx.extensions.repaired_rtp_stream_id = layer.rid
            asyncio.ensure_future(self._send(rtx))


def simulcast_offer(sdp: str, rids: list[str]) -> str:
    """An aiortc offer turned into a browser-style simulcast one: its video section
    without SSRC lines, with the RID extensions, ``a=rid:<id> send`` and
    ``a=simulcast:send``."""
    out, inside = [], False

    def finish() -> None:
        out.extend(
            f"a=extmap:{e.id} {e.uri}" for e in _SIMULCAST_EXTENSIONS if e.id >= RID_EXTENSION_ID
        )
        out.extend(f"a=rid:{rid} send" for rid in rids)
        out.append("a=simulcast:send " + ";".join(rids))

    for line in sdp.splitlines():
        if line.startswith("m="):
            if inside:
                finish()
            inside = line.startswith("m=video")
        if inside and line.startswith(("a=ssrc:", "a=ssrc-group:")):
            continue
        out.append(line)
    if inside:
        finish()
    return "\r\n".join(out) + "\r\n"


async def publish_simulcast(
    base: str,
    stream: str,
    codec: str = "video/VP8",
    sizes: tuple[tuple[str, int, int], ...] = (("h", 320, 240), ("m", 160, 120), ("l", 80, 60)),
    fps: int = 30,
    audio: bool = True,
    token: str | None = None,
) -> SimulcastPublisher:
    """A WHIP publisher sending one layer per ``(rid, width, height)`` of ``sizes``, listed
    in the offer in that order (browsers list the full size first; reverse it to check
    that ingest orders layers by what it receives)."""
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="sendonly")
    if audio:
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    prefer(pc, "video", codec)
    await pc.setLocalDescription(await pc.createOffer())
    offer = simulcast_offer(pc.localDescription.sdp, [rid for rid, _, _ in sizes])
    session = aiohttp.ClientSession(base_url=base)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, response_headers, body = await post_sdp(session, f"/whip/{stream}", offer, headers)
    if status != 201:
        await pc.close()
        await session.close()
        raise AssertionError(f"WHIP POST answered {status}: {body}")
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    video = next(m for m in SessionDescription.parse(body).media if m.kind == "video")
    chosen = next(c for c in video.rtp.codecs if not c.mimeType.lower().endswith("/rtx"))
    rtx = [c.payloadType for c in video.rtp.codecs if c.parameters.get("apt") == chosen.payloadType]
    layers = [
        SimulcastLayer(rid, width, height, random.getrandbits(32), random.getrandbits(32))
        for rid, width, height in sizes
    ]
    publisher = SimulcastPublisher(pc, response_headers["Location"], session, layers, body, fps)
    publisher._start(chosen, rtx[0] if rtx else None)
    return publisher
