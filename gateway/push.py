"""``whipcast push``: an FFmpeg-readable input published into Kafka as a live stream.

What it writes is what the WHIP ingest writes, so WebRTC viewers, rewind, tap, clips
and every other reader cannot tell the difference: the stream topic and the registry
record (codecs as SDP would describe them, a random session id, heartbeats while live,
``state="ended"`` at the end: :func:`whipcast.gateway.registry.publish`), and frames
in the wire format of :mod:`whipcast.gateway.frames` through the node's
:class:`~whipcast.gateway.bus.Bus`: RTP-clock timestamps (90 kHz video, 48 kHz Opus)
from a random origin, per-track sequence numbers, keyframe flags, the ingest arrival
time. H.264 goes out as the WHIP ingest writes it (Annex B, SPS/PPS before every IDR,
no access unit delimiters), so egress packetizes it unchanged; length-prefixed input
(MP4) is converted. Video is never re-encoded; audio that is not Opus is transcoded to
Opus (cheap). Input with B-frames or a codec WebRTC cannot carry is refused at once
with what to change. Frames are sent at the pace of the input's timestamps.

Nothing answers keyframe requests: a file cannot make a keyframe on demand, so viewers
wait for the input's next one (the ingest does the same for a publisher that ignores
PLI). Push writes to Kafka directly, so Kafka's own credentials are the real gate;
when a publish token is configured it must also be presented (``--token``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import IO

import av
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from . import mux, registry
from .bus import Bus
from .frames import Codec, Frame, Track, is_keyframe
from .metrics import Metrics
from .nodes import NodeView
from .registry import RegistryView, StreamInfo
from .settings import Settings

logger = logging.getLogger(__name__)

_VIDEO = {"h264": Codec.H264, "vp8": Codec.VP8}
_DROPPED_NAL_TYPES = (9, 12)  # access unit delimiter, filler: WebRTC publishers send none
PROBE_OPTIONS = {"analyzeduration": "1000000", "probesize": "2000000"}
"""Enough to see the codecs and the SPS; a live pipe is not held for seconds."""
QUEUE_FRAMES = 64


class PushError(Exception):
    """The input cannot be published; the message says what to change."""


@dataclass
class PushStats:
    frames: list[int] = field(default_factory=lambda: [0, 0])  # indexed by Track
    bytes: list[int] = field(default_factory=lambda: [0, 0])
    audio_transcoded: bool = False
    frames_skipped: int = 0
    """Video frames before the first keyframe (not decodable on their own)."""


@dataclass(slots=True)
class _Item:
    track: Track
    seconds: float
    """Presentation time on the input's clock."""
    payload: bytes


def check_token(configured: str | None, presented: str | None) -> None:
    """Push needs the publish token when one is configured (constant-time compare)."""
    if configured is None:
        return
    if presented is None or not hmac.compare_digest(presented.encode(), configured.encode()):
        raise PushError("a publish token is configured: give it with --token (or WHIPCAST_TOKEN)")


def h264_codec(sps: bytes) -> RTCRtpCodecParameters:
    """The SDP description a WHIP publisher of this H.264 would have given."""
    return RTCRtpCodecParameters(
        mimeType="video/H264",
        clockRate=90000,
        parameters={
            "level-asymmetry-allowed": "1",
            "packetization-mode": "1",
            "profile-level-id": sps[1:4].hex(),
        },
    )


VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000)
OPUS = RTCRtpCodecParameters(
    mimeType="audio/opus", clockRate=48000, channels=2,
    parameters={"minptime": "10", "useinbandfec": "1"},
)  # fmt: skip


class _Input:
    """The demuxing side, blocking (FFmpeg): runs in a worker thread."""

    def __init__(self, source: str | IO[bytes]) -> None:
        try:
            self.container = av.open(source, "r", options=PROBE_OPTIONS)
        except av.FFmpegError as exc:
            raise PushError(f"the input cannot be read: {exc}") from None
        videos, audios = self.container.streams.video, self.container.streams.audio
        self.video = videos[0] if videos else None
        self.audio = audios[0] if audios else None
        if self.video is None and self.audio is None:
            raise PushError("the input has neither video nor audio")
        self.video_codec = None
        self.parameter_sets = b""
        self.length_size = 0
        if self.video is not None:
            name = self.video.codec_context.name
            if name not in _VIDEO:
                raise PushError(
                    f"video codec {name} cannot go to WebRTC viewers unchanged; re-encode "
                    "it: -c:v libx264 -tune zerolatency -bf 0 (H.264) or -c:v libvpx (VP8)"
                )
            if self.video.codec_context.has_b_frames:
                raise _b_frames()
            self.video_codec = _VIDEO[name]
            extradata = self.video.codec_context.extradata or b""
            if self.video_codec is Codec.H264 and extradata[:1] == b"\x01":
                self.length_size, self.parameter_sets = mux.avcc_parameter_sets(extradata)
            elif extradata:
                self.parameter_sets = mux.parameter_sets(extradata)
        self.transcode = self.audio is not None and self.audio.codec_context.name != "opus"
        self._encoder = None
        self._resampler = None
        self._samples = 0
        if self.transcode:
            encoder = av.CodecContext.create("libopus", "w")
            encoder.sample_rate, encoder.layout, encoder.format = 48000, "stereo", "s16"
            encoder.bit_rate = 96000
            self._encoder = encoder
            self._resampler = av.AudioResampler("s16", "stereo", 48000, frame_size=960)

    def items(self, stop: threading.Event):
        """Frames in input order until the end of the input (or ``stop``)."""
        streams = [s for s in (self.video, self.audio) if s is not None]
        for packet in self.container.demux(streams):
            if stop.is_set():
                return
            if packet.stream is self.video:
                if packet.pts is None or packet.size == 0:
                    continue
                if packet.dts is not None and packet.pts != packet.dts:
                    raise _b_frames()
                yield _Item(Track.VIDEO, float(packet.pts * packet.time_base),
                            self._video_payload(packet))  # fmt: skip
            elif self.transcode:
                yield from self._opus(packet)
            elif packet.pts is not None and packet.size:
                yield _Item(Track.AUDIO, float(packet.pts * packet.time_base), bytes(packet))
        if self.transcode:
            yield from self._opus(None)

    def _video_payload(self, packet: av.Packet) -> bytes:
        data = bytes(packet)
        if self.video_codec is not Codec.H264:
            return data
        if self.length_size:
            data = mux.avcc_to_annexb(data, self.length_size)
        units = [u for u in mux.split_nal_units(data) if u[0] & 0x1F not in _DROPPED_NAL_TYPES]
        types = [u[0] & 0x1F for u in units]
        if 7 in types:
            self.parameter_sets = mux.annexb(u for u in units if u[0] & 0x1F in (7, 8))
        elif 5 in types and self.parameter_sets:
            return self.parameter_sets + mux.annexb(units)  # viewers need them per IDR
        return mux.annexb(units)

    def _opus(self, packet: av.Packet | None):
        """Decode, resample to 48 kHz stereo in 20 ms frames, encode as Opus."""
        assert self._encoder is not None and self._resampler is not None
        try:
            decoded = packet.decode() if packet is not None else []
        except av.FFmpegError:
            return  # a damaged audio packet: skip it, as a decoder would
        for frame in decoded:
            if self._samples == 0 and frame.pts is not None:
                self._start_s = float(frame.pts * frame.time_base)
            for resampled in self._resampler.resample(frame):
                resampled.pts = self._samples
                self._samples += resampled.samples
                for out in self._encoder.encode(resampled):
                    yield _Item(Track.AUDIO, self._start_s + out.pts / 48000, bytes(out))
        if packet is None:
            for out in self._encoder.encode(None):
                yield _Item(Track.AUDIO, self._start_s + out.pts / 48000, bytes(out))

    def close(self) -> None:
        self.container.close()


def _b_frames() -> PushError:
    return PushError(
        "the input's video has B-frames, which WebRTC viewers cannot play in order; "
        "re-encode without them: -c:v libx264 -tune zerolatency -bf 0"
    )


class Push:
    """One input published as ``stream`` until it ends; :meth:`run` does it all."""

    def __init__(self, settings: Settings, stream: str, source: str | IO[bytes],
                 token: str | None = None) -> None:  # fmt: skip
        check_token(settings.publish_token, token)
        self.settings = settings
        self.stream = stream
        self.source = source
        self.session_id = secrets.randbits(32)
        self.stats = PushStats()
        self.info: StreamInfo | None = None
        self._bus = Bus(settings, Metrics())
        self._rtp_origin = {track: random.getrandbits(32) for track in Track}
        self._opened_at = 0.0
        self._sequence = {Track.VIDEO: 0, Track.AUDIO: 0}
        self._waiting_for_keyframe = True
        self._heartbeats: asyncio.Task | None = None

    async def run(self) -> PushStats:
        self._opened_at = time.monotonic()
        source = await asyncio.to_thread(_Input, self.source)
        try:
            await self._bus.start()
            try:
                await self._refuse_if_live()
                await self._publish(source)
            finally:
                await self._bus.stop()
        finally:
            await asyncio.to_thread(source.close)
        return self.stats

    async def _refuse_if_live(self) -> None:
        nodes = NodeView(self._bus)
        view = RegistryView(self._bus, nodes)
        await nodes.start()
        await view.start()
        try:
            if view.get(self.stream) is not None:
                raise PushError(f"stream {self.stream!r} already has a publisher")
        finally:
            await view.stop()
            await nodes.stop()

    async def _publish(self, source: _Input) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item | BaseException | None] = asyncio.Queue(QUEUE_FRAMES)
        stop = threading.Event()

        def demux() -> None:
            def put(item) -> None:
                asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

            try:
                for item in source.items(stop):
                    put(item)
                put(None)
            except BaseException as exc:  # handed to the loop, raised there
                if not stop.is_set():
                    put(exc)

        worker = loop.run_in_executor(None, demux)
        try:
            await self._send_all(source, queue)
        finally:
            stop.set()
            while not worker.done():  # unblock a worker waiting on a full queue
                while not queue.empty():
                    queue.get_nowait()
                await asyncio.sleep(0.01)
            if self._heartbeats is not None:
                self._heartbeats.cancel()
                await asyncio.gather(self._heartbeats, return_exceptions=True)
            if self.info is not None:
                self.info.state = "ended"
                try:
                    await registry.publish(self._bus, self.info)
                except Exception as exc:  # the heartbeat then lapses
                    logger.warning("could not mark %s ended: %s", self.stream, exc)
                if self._bus.producer is not None:
                    await self._bus.producer.flush()

    async def _send_all(self, source: _Input, queue: asyncio.Queue) -> None:
        topic = self._bus.stream_topic(self.stream)
        clock: tuple[float, float] | None = None  # (input seconds, monotonic) at the start
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if self.info is None:
                if not self._can_register(source, item):
                    continue  # H.264 without an SPS yet: its profile is still unknown
                await self._register(source)
            if clock is None:
                # Paced from when the input was opened, not from the first frame sent:
                # what waited in the pipe while the input was probed and Kafka and the
                # registry started goes out at once instead of staying as latency.
                clock = (item.seconds, self._opened_at)
            wait = clock[1] + (item.seconds - clock[0]) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            frame = self._frame(source, item)
            if frame is not None:
                await self._bus.send_frame(topic, frame)
                self.stats.frames[frame.track] += 1
                self.stats.bytes[frame.track] += len(frame.payload)

    def _frame(self, source: _Input, item: _Item) -> Frame | None:
        codec = source.video_codec if item.track is Track.VIDEO else Codec.OPUS
        assert codec is not None
        keyframe = is_keyframe(codec, item.payload)
        if item.track is Track.VIDEO:
            if keyframe:
                self._waiting_for_keyframe = False
            elif self._waiting_for_keyframe:
                self.stats.frames_skipped += 1
                return None
        sequence = self._sequence[item.track]
        self._sequence[item.track] = sequence + 1
        ticks = round(item.seconds * codec.clock_rate)
        rtp = (self._rtp_origin[item.track] + ticks) & 0xFFFFFFFF
        arrival = time.time_ns() // 1000
        return Frame(item.track, codec, keyframe, rtp, self.session_id, sequence, arrival,
                     item.payload)  # fmt: skip

    @staticmethod
    def _sps(source: _Input) -> bytes | None:
        units = mux.split_nal_units(source.parameter_sets)
        return next((u for u in units if u[0] & 0x1F == 7), None)

    def _can_register(self, source: _Input, item: _Item) -> bool:
        return source.video_codec is not Codec.H264 or self._sps(source) is not None

    async def _register(self, source: _Input) -> None:
        video = None
        if source.video_codec is Codec.H264:
            sps = self._sps(source)
            assert sps is not None
            video = h264_codec(sps)
        elif source.video_codec is Codec.VP8:
            video = VP8
        self.stats.audio_transcoded = source.transcode
        self.info = StreamInfo(
            stream=self.stream,
            session=self.session_id,
            node=f"push-{secrets.token_hex(4)}",
            video=registry.codec_to_dict(video) if video is not None else None,
            audio=registry.codec_to_dict(OPUS) if source.audio is not None else None,
        )
        await self._bus.create_stream_topic(self.stream)
        await registry.publish(self._bus, self.info)
        self._heartbeats = asyncio.create_task(self._heartbeat(), name="push-heartbeat")
        logger.info("push %s started (session %08x)", self.stream, self.session_id)

    async def _heartbeat(self) -> None:
        while self.info is not None:
            await asyncio.sleep(registry.HEARTBEAT_S)
            try:
                await registry.publish(self._bus, self.info)
            except Exception as exc:
                logger.warning("registry heartbeat not written: %s", exc)
