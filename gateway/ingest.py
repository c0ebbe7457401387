"""Ingest: a WHIP publisher's RTP in, complete encoded frames out to Kafka.

An :class:`IngestSession` is one publisher: its peer connection (whose receivers are
:class:`~whipcast.gateway.receiver.PassthroughReceiver`), its stream topic and registry entry,
and the keyframe policy. :class:`IngestNode` owns the publishing sessions of one
process.
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

from . import aiortc_compat, codecs, registry
from .bus import Bus
from .control import follow_keyframe_requests
from .errors import StreamBusy, Unavailable
from .frames import Codec, Frame, Track, is_keyframe
from .metrics import StreamSeries
from .peer import PeerSession, answer_offer, parse_offer
from .receiver import PassthroughReceiver
from .registry import RegistryView, StreamInfo
from .settings import Settings

logger = logging.getLogger(__name__)

OUTBOX_FRAMES = 256  # about 3 s of 720p30 video with its audio


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
        self._sequence = {Track.VIDEO: 0, Track.AUDIO: 0}
        self._waiting_for_keyframe = True
        self._last_keyframe = time.monotonic()
        self._last_pli = 0.0
        self._ended = False
        self._outbox: asyncio.Queue[Frame] = asyncio.Queue(OUTBOX_FRAMES)
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
        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        for transceiver in pc.getTransceivers():
            # Answer with exactly one codec, received by whipcast's own receiver.
            aiortc_compat.set_codecs(transceiver, chosen[transceiver.kind])
            ssrc, _ = aiortc_compat.sender_ssrcs(transceiver.sender)
            receiver = PassthroughReceiver(
                transceiver.kind, transceiver.receiver.transport, ssrc, self
            )
            aiortc_compat.replace_receiver(transceiver, receiver)
            self._receivers.append(receiver)
        pc.on("iceconnectionstatechange", self._on_ice_state)
        answer = await answer_offer(pc, self.settings)
        self.info = StreamInfo(
            stream=self.stream,
            session=self.session_id,
            node=self.settings.node_id,
            video=registry.codec_to_dict(chosen["video"][0]) if "video" in chosen else None,
            audio=registry.codec_to_dict(chosen["audio"][0]) if "audio" in chosen else None,
        )
        await self.node.bus.create_stream_topic(self.stream)
        await registry.publish(self.node.bus, self.info)
        self.spawn(self._watch())
        self.spawn(self._drain())
        self.log(
            logging.INFO,
            "publish started: %s",
            ", ".join(codecs.describe(c[0]) for c in chosen.values()),
        )
        return answer

    def emit(self, track: Track, codec: Codec, timestamp: int, payload: bytes) -> None:
        """Hand one complete frame to Kafka (called as soon as it is complete).

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
            if keyframe:
                now = time.monotonic()
                self._waiting_for_keyframe = False
                stats.keyframe_interval_s = now - self._last_keyframe
                self._last_keyframe = now
                stats.keyframes += 1
            elif self._waiting_for_keyframe:
                stats.frames_skipped += 1
                self.request_keyframe()
                self._release_audio()
                return
        sequence = self._sequence[track]
        self._sequence[track] = sequence + 1
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
            self._queue(frame)
            self._release_audio()
        elif self._audio_hold_s and self._video_seen:
            self._held_audio.append(frame)
            if self._hold_timer is None:
                loop = asyncio.get_running_loop()
                self._hold_timer = loop.call_later(self._audio_hold_s, self._release_audio)
        else:
            self._queue(frame)

    def _release_audio(self) -> None:
        """Queue the held audio frames (with the video frame just queued, if any)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        held, self._held_audio = self._held_audio, []
        for frame in held:
            self._queue(frame)

    def _queue(self, frame: Frame) -> None:
        try:
            self._outbox.put_nowait(frame)
        except asyncio.QueueFull:
            self.stats.frames_backlogged += 1
            if frame.track is Track.VIDEO:
                self.frame_lost()
            return
        self.stats.frames[frame.track] += 1
        self.stats.bytes[frame.track] += len(frame.payload)

    async def _drain(self) -> None:
        while True:
            frame = await self._outbox.get()
            await self.node.bus.send_frame(self.topic, frame)

    @property
    def rtp_packets_lost(self) -> int:
        return sum(r.packets_lost for r in self._receivers)

    def frame_lost(self) -> None:
        """A video frame could not be completed: later ones are undecodable until a
        keyframe, so skip them and ask for one."""
        self._waiting_for_keyframe = True
        self.request_keyframe()

    def request_keyframe(self) -> None:
        now = time.monotonic()
        if now - self._last_pli < self.settings.keyframe_request_interval:
            return
        self._last_pli = now
        self.stats.plis_sent += 1
        for receiver in self._receivers:
            if receiver.media_track is Track.VIDEO:
                self.spawn(receiver.send_pli())

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
            interval = self.settings.max_keyframe_interval
            if interval and now - self._last_keyframe > interval:
                self.request_keyframe()
            if self.info and time.time() - self.info.updated_at >= registry.HEARTBEAT_S:
                # Not awaited: a broker outage must not stall the media-timeout checks.
                self.spawn(self._heartbeat(self.info))

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
        # Single-layer ingest: any layer's request asks the one encoder.
        session = self.sessions.get(stream)
        if session is not None and session.session_id == session_id:
            session.stats.keyframe_requests += 1
            session.request_keyframe()

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
