"""Ingest: a WHIP publisher's RTP in, complete encoded frames out to Kafka.

An :class:`IngestSession` is one publisher: its peer connection (whose receivers are
:class:`~whipcast.gateway.receiver.PassthroughReceiver`), its stream topic and registry entry,
and the keyframe policy. :class:`IngestNode` owns the publishing sessions of one
process.

A simulcasting publisher's video layers (:mod:`whipcast.gateway.simulcast`) each get
their own partition (``frames.video_partition``: the best on partition 0, so readers
that know nothing of layers keep the top one), frame counter, keyframe wait and
keyframe requests; the registry record lists them best first with the size of their
last keyframe and their measured bitrate.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from aiokafka.errors import KafkaError
from aiortc import RTCSessionDescription
from aiortc.sdp import SessionDescription

from . import aiortc_compat, codecs, registry, simulcast
from .bus import Bus
from .control import follow_keyframe_requests
from .errors import StreamBusy, Unavailable
from .frames import Codec, Frame, Track, is_keyframe, video_partition
from .metrics import StreamSeries
from .peer import PeerSession, answer_offer, parse_offer
from .receiver import PassthroughReceiver
from .registry import RegistryView, StreamInfo
from .settings import Settings
from .videosize import video_size

logger = logging.getLogger(__name__)

OUTBOX_FRAMES = 256  # about 3 s of 720p30 video with its audio
SETTLE_S = 1.0
"""How long after the first simulcast keyframe ingest waits for the other layers' before
it settles their order without them."""
LAYER_IDLE_S = 2.0
"""A simulcast layer silent this long (paused by the publisher) gives up its place to the
layers still sending, until it sends again."""


@dataclass
class IngestStats:
    packets: int = 0
    frames: list[int] = field(default_factory=lambda: [0, 0])  # indexed by Track
    bytes: list[int] = field(default_factory=lambda: [0, 0])
    keyframes: int = 0
    keyframe_interval_s: float = 0.0
    malformed_rtp: int = 0
    frames_lost: int = 0
    frames_skipped: int = 0
    frames_backlogged: int = 0
    """Frames dropped because Kafka did not keep up (outbox full)."""
    nacks_sent: int = 0
    plis_sent: int = 0
    keyframe_requests: int = 0
    layer_moves: int = 0
    """Times the simulcast layers changed places (sorted by size, or one paused)."""


@dataclass
class VideoLayer:
    """Ingest state of one video layer (the only one without simulcast)."""

    rid: str | None
    index: int
    """Its place, best first: 0 is written to partition 0."""
    offered: int = 0
    """Its place in the offer's simulcast list (breaks ties between equal sizes)."""
    waiting_for_keyframe: bool = True
    last_keyframe: float = field(default_factory=time.monotonic)
    last_pli: float = 0.0
    size: tuple[int, int] | None = None
    """(width, height) of its last keyframe."""
    bytes: int = 0
    """Bytes written since the last bitrate measurement."""
    bitrate: int | None = None
    last_frame: float = field(default_factory=time.monotonic)
    active: bool = True
    """Whether the publisher sends it (browsers pause top layers their uplink cannot
    carry)."""
    placed: int | None = None
    """The partition its ``ts_offset`` was worked out for."""
    ts_offset: int = 0
    """Added to its RTP timestamps on that partition (see ``IngestSession._retime``)."""

    @property
    def partition(self) -> int:
        return video_partition(self.index)

    def describe(self) -> dict:
        width, height = self.size or (None, None)
        return {
            "layer": self.index,
            "rid": self.rid,
            "width": width,
            "height": height,
            "bitrate": self.bitrate,
        }


class IngestSession(PeerSession):
    """One publisher: peer connection, stream topic, registry entry, keyframe policy."""

    def __init__(self, node: IngestNode, stream: str) -> None:
        super().__init__(node.settings, stream, "whip")
        self.node = node
        self.session_id = secrets.randbits(32)
        self.topic = node.bus.stream_topic(stream)
        self.stats = IngestStats()
        self.info: StreamInfo | None = None
        self.last_packet = time.monotonic()
        self._receivers: list[PassthroughReceiver] = []
        self._sequence: dict[int, int] = {}  # per partition: frames written
        self._layers: dict[str | None, VideoLayer] = {None: VideoLayer(None, 0)}
        self._simulcast: simulcast.SimulcastOffer | None = None
        self._measured = time.monotonic()
        self._first_keyframe: float | None = None
        self._video_clock: dict[int, tuple[int, float]] = {}  # partition: (RTP ts, when)
        self._settled = False  # simulcast layers placed (see _arrange)
        self._ended = False
        self._outbox: asyncio.Queue[tuple[int, Frame]] = asyncio.Queue(OUTBOX_FRAMES)
        self._audio_hold_s = max(0.0, node.settings.kafka_audio_hold_ms / 1000)
        self._video_seen = False
        self._held_audio: list[Frame] = []
        self._hold_timer: asyncio.TimerHandle | None = None

    async def start(self, offer: SessionDescription, offer_sdp: str) -> str:
        pc = self.pc = self.create_peer_connection()
        for media in offer.media:
            pc.addTransceiver(media.kind, direction="recvonly")
        chosen = {}
        for media in offer.media:
            chosen[media.kind] = codecs.choose_publish_codec(media.rtp.codecs, media.kind)
            if media.kind == "video":
                self._simulcast = simulcast.parse_offer(offer_sdp, media)
        rids = None
        if self._simulcast is not None:
            offered = [r.rid for r in self._simulcast.rids]
            rids = self._simulcast.best_first()
            self._layers = {
                rid: VideoLayer(rid, index, offered.index(rid)) for index, rid in enumerate(rids)
            }
        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        for transceiver in pc.getTransceivers():
            # Answer with exactly one codec, received by whipcast's own receiver.
            aiortc_compat.set_codecs(transceiver, chosen[transceiver.kind])
            if transceiver.kind == "video" and self._simulcast is not None:
                aiortc_compat.add_header_extensions(transceiver, self._simulcast.extensions)
            ssrc, _ = aiortc_compat.sender_ssrcs(transceiver.sender)
            receiver = PassthroughReceiver(
                transceiver.kind,
                transceiver.receiver.transport,
                ssrc,
                self,
                rids if transceiver.kind == "video" else None,
            )
            aiortc_compat.replace_receiver(transceiver, receiver)
            self._receivers.append(receiver)
        pc.on("iceconnectionstatechange", self._on_ice_state)
        answer = await answer_offer(pc, self.settings)
        if self._simulcast is not None:
            answer = simulcast.write_answer(answer, self._simulcast)
        self.info = StreamInfo(
            stream=self.stream,
            session=self.session_id,
            node=self.settings.node_id,
            video=registry.codec_to_dict(chosen["video"][0]) if "video" in chosen else None,
            audio=registry.codec_to_dict(chosen["audio"][0]) if "audio" in chosen else None,
            layers=self._describe_layers(),
        )
        await self.node.bus.create_stream_topic(self.stream, len(self._layers))
        await registry.publish(self.node.bus, self.info)
        self.spawn(self._watch())
        self.spawn(self._drain())
        self.log(
            logging.INFO,
            "publish started: %s%s",
            ", ".join(codecs.describe(c[0]) for c in chosen.values()),
            f", simulcast {'/'.join(rids)}" if rids else "",
        )
        return answer

    def _describe_layers(self) -> list[dict] | None:
        if self._simulcast is None:
            return None
        return [layer.describe() for layer in self.video_layers]

    def emit(
        self,
        track: Track,
        codec: Codec,
        timestamp: int,
        payload: bytes,
        rid: str | None = None,
    ) -> None:
        """Hand one complete frame to Kafka (called as soon as it is complete); video
        frames name their simulcast layer's RID.

        Frames go through a bounded outbox drained by one task, so RTP handling never
        waits on Kafka: during a broker outage the outbox fills, further frames are
        dropped and counted, and the publisher's connection stays healthy.

        Once video has come, audio is held until the next video frame, at most
        ``kafka_audio_hold_ms``: both go into the outbox in one event-loop turn, so the
        producer sends them in one request (one per video frame instead of ~80/s).
        Video is never held, audio of an audio-only stream neither, and a record's
        ``arrival_us`` is still its arrival.
        """
        keyframe = is_keyframe(codec, payload)
        stats = self.stats
        if track is Track.VIDEO:
            self._video_seen = True
            layer = self._layers[rid]
            if self._simulcast is not None and not self._arrange(layer, keyframe, codec, payload):
                stats.frames_skipped += 1
                self._release_audio()
                return
            if keyframe:
                now = time.monotonic()
                layer.waiting_for_keyframe = False
                if layer.index == 0:
                    stats.keyframe_interval_s = now - layer.last_keyframe
                layer.last_keyframe = now
                stats.keyframes += 1
            elif layer.waiting_for_keyframe:
                stats.frames_skipped += 1
                self.request_keyframe(layer.index)
                self._release_audio()
                return
            partition = layer.partition
            layer.bytes += len(payload)
            if self._simulcast is not None:
                timestamp = self._retime(layer, timestamp)
        else:
            partition = Track.AUDIO
        sequence = self._sequence.get(partition, 0)
        self._sequence[partition] = sequence + 1
        frame = Frame(
            track,
            codec,
            keyframe,
            timestamp,
            self.session_id,
            sequence,
            time.time_ns() // 1000,
            payload,
        )
        if track is Track.VIDEO:
            self._queue(partition, frame, rid)
            self._release_audio()
        elif self._audio_hold_s and self._video_seen:
            self._held_audio.append(frame)
            if self._hold_timer is None:
                loop = asyncio.get_running_loop()
                self._hold_timer = loop.call_later(self._audio_hold_s, self._release_audio)
        else:
            self._queue(partition, frame)

    def _release_audio(self) -> None:
        """Queue the held audio frames (with the video frame just queued, if any)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        held, self._held_audio = self._held_audio, []
        for frame in held:
            self._queue(Track.AUDIO, frame)

    def _queue(self, partition: int, frame: Frame, rid: str | None = None) -> None:
        try:
            self._outbox.put_nowait((partition, frame))
        except asyncio.QueueFull:
            self.stats.frames_backlogged += 1
            if frame.track is Track.VIDEO:
                self.frame_lost(rid)
            return
        self.stats.frames[frame.track] += 1
        self.stats.bytes[frame.track] += len(frame.payload)

    def _retime(self, layer: VideoLayer, timestamp: int) -> int:
        """Keep each video partition's RTP timestamps one timeline across a change of
        layer: browsers start every simulcast layer's timestamps at a random value, so
        a layer taking over a partition continues from the last one written there
        (plus the wall-clock time since). Until a layer changes place its timestamps
        are the publisher's own."""
        now = time.monotonic()
        partition = layer.partition
        if layer.placed != partition:
            layer.placed = partition
            last = self._video_clock.get(partition)
            layer.ts_offset = 0
            if last is not None:
                expected = last[0] + max(1, round((now - last[1]) * 90000))
                layer.ts_offset = (expected - timestamp) & 0xFFFFFFFF
        timestamp = (timestamp + layer.ts_offset) & 0xFFFFFFFF
        self._video_clock[partition] = (timestamp, now)
        return timestamp

    def _arrange(self, layer: VideoLayer, keyframe: bool, codec: Codec, payload: bytes) -> bool:
        """Keep the simulcast layers best first by the size of their keyframes; whether
        a frame of ``layer`` may be written yet.

        Nothing is written until every layer has sent a keyframe (or ``SETTLE_S`` after
        the first one, for a layer the publisher holds back), so that partition 0 starts
        with the best layer whatever order the offer listed them in. A layer that later
        changes place (one that started late, or changed size) waits for a keyframe of
        its own on its new partition: no partition mixes two layers between keyframes.
        """
        now = time.monotonic()
        layer.last_frame = now
        if not layer.active:
            layer.active = True
            if self._settled:
                self._order_layers()
        if keyframe:
            size = video_size(codec, payload)
            if size is not None and size != layer.size:
                layer.size = size
                if self._settled:
                    self._order_layers()
            self._first_keyframe = self._first_keyframe or now
        if not self._settled:
            unknown = any(x.size is None for x in self._layers.values())
            if self._first_keyframe is None or (unknown and now - self._first_keyframe < SETTLE_S):
                if layer.size is None:
                    self.request_keyframe(layer.index)  # a layer that started mid-GOP
                return False
            self._settled = True
            self._order_layers()
            for other in self._layers.values():
                if other is not layer or not keyframe:
                    # Its frames so far were held back: it starts from a new keyframe.
                    other.waiting_for_keyframe = True
                    self.request_keyframe(other.index)
        return True

    def _order_layers(self) -> None:
        """Rank the layers by keyframe size, paused ones and those not seen yet last."""
        layers = list(self._layers.values())
        ranked = sorted(
            layers,
            key=lambda x: (
                not x.active,
                x.size is None,
                -(x.size[0] * x.size[1]) if x.size else 0,
                x.offered,
            ),
        )
        if all(layer.index == index for index, layer in enumerate(ranked)):
            return
        for index, layer in enumerate(ranked):
            if layer.index != index:
                layer.index = index
                layer.placed = None  # its timestamps continue the new partition's
                layer.waiting_for_keyframe = True
                layer.last_pli = 0.0
                self.request_keyframe(index)
        self.stats.layer_moves += 1
        order = "/".join(str(x.rid) for x in ranked)
        paused = "".join(f", {x.rid} paused" for x in ranked if not x.active)
        self.log(logging.INFO, "simulcast layers ordered by size: %s%s", order, paused)
        if self.info is not None:
            self.info.layers = self._describe_layers()
            self.spawn(self._heartbeat(self.info))

    async def _drain(self) -> None:
        while True:
            partition, frame = await self._outbox.get()
            await self.node.bus.send_frame(self.topic, frame, partition)

    @property
    def layers(self) -> int:
        """How many video layers the publisher sends (1 without simulcast)."""
        return len(self._layers)

    @property
    def video_layers(self) -> list[VideoLayer]:
        """The video layers, best first (partition 0's first)."""
        return sorted(self._layers.values(), key=lambda x: x.index)

    @property
    def rtp_packets_lost(self) -> int:
        return sum(r.packets_lost for r in self._receivers)

    def frame_lost(self, rid: str | None = None) -> None:
        """A video frame of a layer could not be completed: later ones are undecodable
        until a keyframe, so skip them and ask for one."""
        layer = self._layers[rid]
        layer.waiting_for_keyframe = True
        self.request_keyframe(layer.index)

    def request_keyframe(self, layer: int | None = None) -> None:
        """Send a PLI for one video layer's SSRC (``None``: every layer), at most one
        per layer per ``keyframe_request_interval``."""
        now = time.monotonic()
        for state in self._layers.values():
            if layer is not None and state.index != layer:
                continue
            if now - state.last_pli < self.settings.keyframe_request_interval:
                continue
            state.last_pli = now
            self.stats.plis_sent += 1
            for receiver in self._receivers:
                if receiver.media_track is Track.VIDEO:
                    receiver.send_pli(state.rid)

    def publisher_left(self, reason: str) -> None:
        if not self._ended:
            self.log(logging.INFO, "publisher left: %s", reason)
            self.spawn(self.close())

    async def _watch(self) -> None:
        """Heartbeat the registry, enforce the keyframe interval, notice a silent peer."""
        while True:
            await asyncio.sleep(min(registry.HEARTBEAT_S, 0.5))
            now = time.monotonic()
            if now - self.last_packet > self.settings.publisher_timeout:
                self.publisher_left(f"no media for {self.settings.publisher_timeout:.0f} s")
                return
            if self._simulcast is not None and self._settled:
                self._notice_paused_layers(now)
            interval = self.settings.max_keyframe_interval
            for layer in self._layers.values():
                if interval and layer.active and now - layer.last_keyframe > interval:
                    self.request_keyframe(layer.index)
            if self.info and time.time() - self.info.updated_at >= registry.HEARTBEAT_S:
                if self._simulcast is not None:
                    self._measure(now)
                    self.info.layers = self._describe_layers()
                # Not awaited: a broker outage must not stall the media-timeout checks.
                self.spawn(self._heartbeat(self.info))

    def _notice_paused_layers(self, now: float) -> None:
        """Move layers the publisher stopped sending behind those it still sends, so
        that partition 0 keeps carrying the best layer there is."""
        idle = [x for x in self._layers.values() if x.active and now - x.last_frame > LAYER_IDLE_S]
        if idle and len(idle) < sum(x.active for x in self._layers.values()):
            for layer in idle:
                layer.active = False
            self._order_layers()

    def _measure(self, now: float) -> None:
        """Each layer's bitrate since the last heartbeat (bit/s)."""
        elapsed = now - self._measured
        if elapsed <= 0:
            return
        self._measured = now
        for layer in self._layers.values():
            layer.bitrate = int(layer.bytes * 8 / elapsed)
            layer.bytes = 0

    async def _heartbeat(self, info: StreamInfo) -> None:
        try:
            await registry.publish(self.node.bus, info)
        except KafkaError as exc:
            self.log(logging.WARNING, "registry heartbeat not written: %s", exc)

    def on_connection_state(self, state: str) -> None:
        if state in ("failed", "closed"):
            self.publisher_left(f"connection {state}")

    def _on_ice_state(self) -> None:
        """Stop ICE consent checks (RFC 7675) once connected.

        Consent guards what *we* send, and to a publisher ingest sends only RTCP. Some
        WHIP clients (FFmpeg 8's muxer) never answer the checks, and aioice would then
        close a healthy publish after 30 s; a publisher that really vanished is caught
        by the media timeout, RTCP BYE or DTLS close instead.
        """
        if self.pc is not None and self.pc.iceConnectionState == "completed":
            for transceiver in self.pc.getTransceivers():
                aiortc_compat.stop_consent_checks(transceiver.receiver.transport.transport)

    async def close(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self.node.sessions.pop(self.stream, None)
        if self.info is not None:
            self.info.state = "ended"
            try:
                await registry.publish(self.node.bus, self.info)
            except Exception as exc:  # the broker may be gone; the heartbeat then lapses
                logger.warning("could not mark %s ended: %s", self.stream, exc)
        await super().close()


class IngestNode:
    """The publishing sessions of this process, keyed by stream name."""

    def __init__(self, settings: Settings, bus: Bus, view: RegistryView) -> None:
        self.settings = settings
        self.bus = bus
        self.view = view
        self.sessions: dict[str, IngestSession] = {}
        self.started = 0
        self._listener: asyncio.Task | None = None

    async def start(self) -> None:
        self._listener = asyncio.create_task(
            follow_keyframe_requests(self.bus, self._on_keyframe_request), name="keyframe-requests"
        )

    async def stop(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())))
        if self._listener:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)

    def _on_keyframe_request(self, stream: str, session_id: int, layer: int | None) -> None:
        # A layer a single-layer publish does not have asks its one encoder.
        session = self.sessions.get(stream)
        if session is not None and session.session_id == session_id:
            session.stats.keyframe_requests += 1
            known = layer is not None and layer < session.layers
            session.request_keyframe(layer if known else None)

    async def publish(self, stream: str, offer_sdp: str) -> tuple[IngestSession, str]:
        """Start a publishing session; raises StreamBusy if the stream is already live."""
        offer = parse_offer(offer_sdp, direction="sendonly")
        if not self.bus.reachable:
            raise Unavailable("the media bus (Kafka) is unreachable; try again shortly")
        if len(self.sessions) >= self.settings.max_publishers:
            raise Unavailable("this ingest node is full; try again shortly")
        if stream in self.sessions or self.view.get(stream) is not None:
            raise StreamBusy(f"stream {stream!r} already has a publisher")
        session = IngestSession(self, stream)
        self.sessions[stream] = session
        self.started += 1
        try:
            answer = await session.start(offer, offer_sdp)
        except KafkaError as exc:
            await session.close()
            raise Unavailable(f"the media bus (Kafka) failed: {exc.__class__.__name__}") from None
        except BaseException:
            await session.close()
            raise
        return session, answer

    def snapshot(self, series: StreamSeries) -> None:
        """Per-stream counters for a metrics scrape (read, never reset)."""
        for session in self.sessions.values():
            name, stats = session.stream, session.stats
            for track in Track:
                kind = track.name.lower()
                series.add(
                    "counter",
                    "whipcast_ingest_frames",
                    "Frames written to Kafka",
                    name,
                    stats.frames[track],
                    track=kind,
                )
                series.add(
                    "counter",
                    "whipcast_ingest_bytes",
                    "Encoded bytes written to Kafka",
                    name,
                    stats.bytes[track],
                    track=kind,
                )
            series.add(
                "counter",
                "whipcast_ingest_keyframes",
                "Keyframes from the publisher",
                name,
                stats.keyframes,
            )
            series.add(
                "gauge",
                "whipcast_ingest_keyframe_interval_seconds",
                "Time between the publisher's last two keyframes",
                name,
                stats.keyframe_interval_s,
            )
            series.add(
                "counter",
                "whipcast_ingest_rtp_packets",
                "RTP packets from the publisher",
                name,
                stats.packets,
            )
            series.add(
                "counter",
                "whipcast_ingest_rtp_malformed",
                "RTP packets dropped as malformed",
                name,
                stats.malformed_rtp,
            )
            series.add(
                "gauge",
                "whipcast_ingest_rtp_lost_packets",
                "Publisher RTP packets lost so far (RFC 3550)",
                name,
                session.rtp_packets_lost,
            )
            for reason, value in (
                ("lost", stats.frames_lost),
                ("skipped", stats.frames_skipped),
                ("backlog", stats.frames_backlogged),
            ):
                series.add(
                    "counter",
                    "whipcast_ingest_frames_dropped",
                    "Frames not written: lost, skipped (no keyframe), backlog (Kafka slow)",
                    name,
                    value,
                    reason=reason,
                )
            for kind, value in (("nack", stats.nacks_sent), ("pli", stats.plis_sent)):
                series.add(
                    "counter",
                    "whipcast_rtcp_feedback_sent",
                    "RTCP feedback sent to publishers",
                    name,
                    value,
                    type=kind,
                )
            series.add(
                "counter",
                "whipcast_ingest_keyframe_requests",
                "Keyframe requests received from egress nodes",
                name,
                stats.keyframe_requests,
            )

    def find(self, stream: str, resource_id: str) -> IngestSession | None:
        session = self.sessions.get(stream)
        return session if session is not None and session.resource_id == resource_id else None
