"""A simulcast publisher for tests: one moving picture encoded (H.264, FFmpeg's libx264
through PyAV) in three layers of falling size and bitrate, written into Kafka the way a
simulcast ingest writes it (``docs/wire-format.md``: layer k on partition
``frames.video_partition(k)``, the registry record's ``layers`` best first), with
keyframes every ``keyframe_s`` and on request: a keyframe request on the control topic
naming a layer forces one on that layer (none: on every layer). Each layer's RTP
timestamps start from their own random origin, as a browser's simulcast encodings do.
The picture is :func:`peers.draw_counter`'s, so a viewer reads the frame counter back
whatever layer it decodes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from dataclasses import dataclass, field
from fractions import Fraction

import av
from aiokafka.admin import NewTopic
from whipcast.gateway import registry
from whipcast.gateway.bus import Bus
from whipcast.gateway.control import follow_keyframe_requests
from whipcast.gateway.frames import Codec, Frame, Track, video_partition
from whipcast.gateway.registry import StreamInfo

from .peers import draw_counter

H264 = {
    "mimeType": "video/H264",
    "clockRate": 90000,
    "channels": None,
    "parameters": {
        "level-asymmetry-allowed": "1",
        "packetization-mode": "1",
        "profile-level-id": "42e01f",
    },
}


@dataclass(frozen=True)
class Layer:
    rid: str
    width: int
    height: int
    bitrate: int


LAYERS = (
    Layer("h", 320, 240, 1_500_000),
    Layer("m", 160, 120, 400_000),
    Layer("l", 80, 60, 120_000),
)


@dataclass
class LayeredSource:
    bus: Bus
    stream: str
    layers: tuple[Layer, ...] = LAYERS
    fps: int = 30
    keyframe_s: float = 1.0
    session: int = field(default_factory=lambda: random.getrandbits(32))
    requests: list[tuple[float, int | None]] = field(default_factory=list)
    """(monotonic time, layer) of every keyframe request for this stream's session."""
    keyframes: list[int] = field(init=False)
    """Keyframes written, per layer."""
    sent: list[int] = field(init=False)
    """Frames written, per layer."""
    _force: set[int] = field(default_factory=set)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keyframes = [0] * len(self.layers)
        self.sent = [0] * len(self.layers)
        self._encoders = [self._encoder(layer) for layer in self.layers]
        self._origins = [random.getrandbits(32) for _ in self.layers]
        self.info = StreamInfo(
            stream=self.stream,
            session=self.session,
            node=f"layered-{secrets.token_hex(4)}",
            video=H264,
            layers=[
                {"layer": k, "rid": x.rid, "width": x.width, "height": x.height,
                 "bitrate": x.bitrate}
                for k, x in enumerate(self.layers)
            ],
        )  # fmt: skip

    def _encoder(self, layer: Layer) -> av.video.codeccontext.VideoCodecContext:
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = layer.width, layer.height, "yuv420p"
        ctx.time_base = Fraction(1, 90000)
        ctx.framerate = Fraction(self.fps, 1)
        ctx.bit_rate = layer.bitrate
        ctx.gop_size = 10 * self.fps  # keyframes come from this source's own clock
        kbps = layer.bitrate // 1000
        ctx.options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "profile": "baseline",
            "x264-params": f"repeat-headers=1:scenecut=0:vbv-maxrate={kbps}"
            f":vbv-bufsize={kbps // 2}",
        }
        return ctx

    async def start(self) -> None:
        topic = self.bus.stream_topic(self.stream)
        partitions = video_partition(len(self.layers) - 1) + 1
        configs = {"message.timestamp.type": "LogAppendTime"}
        topics = [NewTopic(topic, max(2, partitions), 1, topic_configs=configs)]
        await self.bus.create_topics(topics)
        await registry.publish(self.bus, self.info)
        self._tasks = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(follow_keyframe_requests(self.bus, self._on_request)),
            asyncio.create_task(self._run(topic)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.info.state = "ended"
        with contextlib.suppress(Exception):
            await registry.publish(self.bus, self.info)

    def _on_request(self, stream: str, session: int, layer: int | None) -> None:
        if stream != self.stream or session != self.session:
            return
        self.requests.append((time.monotonic(), layer))
        self._force.update(range(len(self.layers)) if layer is None else [layer])

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(registry.HEARTBEAT_S)
            await registry.publish(self.bus, self.info)

    def _encode(self, counter: int, forced: set[int]) -> list[tuple[int, bytes, bool]]:
        """One picture in every layer: (layer, Annex B access unit, keyframe)."""
        picture = draw_counter(counter, noise=True)
        every = max(1, round(self.keyframe_s * self.fps))
        out = []
        for k, (layer, ctx) in enumerate(zip(self.layers, self._encoders, strict=True)):
            frame = picture.reformat(width=layer.width, height=layer.height, format="yuv420p")
            frame.pts = counter * (90000 // self.fps)
            frame.time_base = ctx.time_base
            if counter % every == 0 or k in forced:
                frame.pict_type = av.video.frame.PictureType.I
            for packet in ctx.encode(frame):
                out.append((k, bytes(packet), packet.is_keyframe))
        return out

    async def _run(self, topic: str) -> None:
        start = time.monotonic()
        counter = 0
        while True:
            await asyncio.sleep(max(0.0, start + counter / self.fps - time.monotonic()))
            forced, self._force = self._force, set()
            encoded = await asyncio.to_thread(self._encode, counter, forced)
            arrival_us = time.time_ns() // 1000
            for k, payload, keyframe in encoded:
                frame = Frame(
                    Track.VIDEO,
                    Codec.H264,
                    keyframe,
                    (self._origins[k] + counter * (90000 // self.fps)) & 0xFFFFFFFF,
                    self.session,
                    self.sent[k],
                    arrival_us,
                    payload,
                )
                self.sent[k] += 1
                self.keyframes[k] += keyframe
                await self.bus.producer.send(topic, frame.encode(), partition=video_partition(k))
            counter += 1
