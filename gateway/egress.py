"""Egress: frames from Kafka out to WHEP viewers, one Kafka read per stream per node.

:class:`StreamFanout` reads a stream once, keeps the current GOP, splits each frame into
RTP payloads once, and hands it to every :class:`ViewerSession` on this node. A viewer
joins on a keyframe at once: the cached GOP is sent first with its timestamps packed
together, so the player decodes up to the live frame immediately instead of waiting
for the publisher's next keyframe; a viewer's PLI/FIR is answered the same way, for
that viewer alone, and goes upstream to the publisher only when no GOP is cached (a
viewer its estimate holds below the node's cap waits for the next keyframe instead). A
viewer that cannot keep up (its socket backs up or its send budget is spent) queues a
bounded number of frames, then is dropped to the next keyframe; the others never wait
for it.

A viewer's send budget follows its bandwidth estimate (``gateway/bandwidth.py``): when
its link cannot carry the stream, its frames wait at most ``viewer_max_queue_delay``,
then its video pauses until the next keyframe its budget can take, while audio keeps
flowing; the pause shows in the viewer's session resource (``GET``), which the watch
page polls.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, fields

from aiokafka.errors import KafkaError
from aiortc import RTCSessionDescription
from aiortc.sdp import SessionDescription

from . import aiortc_compat, codecs, twcc
from .bandwidth import BandwidthEstimate
from .bus import Bus, FrameReader
from .control import KeyframeRequester
from .errors import NotLive, Unavailable, UnprocessableOffer
from .frames import Codec, Track
from .metrics import StreamSeries
from .pacer import Pacer
from .peer import PeerSession, answer_offer, parse_offer
from .registry import STALE_AFTER_S, RegistryView, StreamInfo
from .rtpsend import FanoutSender, PreparedFrame, RetransmitPolicy, SendBudget, native_core
from .settings import Settings

logger = logging.getLogger(__name__)

BURST_CHUNK = 8  # GOP frames sent to a viewer between two yields to the loop
BUDGET_BURST_S = 1.0  # a viewer's send budget holds this many seconds of its rate
STREAM_RATE_WINDOW_S = 2.0  # a stream's video bitrate is measured over this (GOPs vary)


@dataclass
class ViewerStats:
    frames_sent: int = 0
    keyframe_drops: int = 0
    plis: int = 0
    firs: int = 0
    cached_keyframes: int = 0
    """PLI/FIR answered from the cached GOP, for this viewer only."""
    upstream_keyframes: int = 0
    """PLI/FIR passed on to the publisher (no GOP cached)."""
    nacks: int = 0
    retransmissions: int = 0
    retransmitted_octets: int = 0
    refused_budget: int = 0
    refused_age: int = 0
    refused_repeat: int = 0
    """Resends refused: allowance spent, packet too old, packet resent enough."""
    pauses: int = 0
    """Times the viewer's video paused because its link could not carry the stream."""
    paused_s: float = 0.0
    """Seconds its video spent paused, over all pauses that ended."""
    keyframes_skipped: int = 0
    """Keyframes a paused viewer's link could not take (it waited for a later one)."""
    congestion_cuts: int = 0
    """Times REMB or loss cut the viewer's bandwidth estimate."""
    first_frame_s: float | None = None
    """Seconds from the WHEP request to the first video frame sent."""

    def add(self, other: ViewerStats) -> None:
        for f in fields(self):
            if f.name != "first_frame_s":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class ViewerSession(PeerSession):
    """One WHEP viewer: its peer connection and one :class:`FanoutSender` per track."""

    def __init__(self, node: EgressNode, stream: str) -> None:
        super().__init__(node.settings, stream, "whep")
        self.node = node
        self.created = time.monotonic()
        self.stats = ViewerStats()
        self.senders: dict[Track, FanoutSender] = {}
        self.fanout: StreamFanout | None = None
        self._queue: collections.deque[PreparedFrame] = collections.deque()
        self._bursting = True  # live video waits in the queue while a GOP is sent
        self._skip_to_keyframe = False
        self._ready_at = 0.0
        self._keyframe_answered = float("-inf")
        self.estimate: BandwidthEstimate | None = None
        self._pacer: Pacer | None = None
        self._paused_at: float | None = None
        """When the video paused for a slow link (None: not paused)."""
        self._live = True  # False while gateway/playback.py sends this viewer the past
        self.send_log: twcc.SendLog | None = None
        """Transport-wide numbers of what this viewer was sent (transport-cc viewers)."""

    async def start(self, offer: SessionDescription, offer_sdp: str, info: StreamInfo) -> str:
        answer = await self.negotiate(offer, offer_sdp, info)
        self.fanout = await self.node.fanout(info)
        self.fanout.viewers.add(self)
        if Track.VIDEO in self.senders:
            self.spawn(self._start_video(self.senders[Track.VIDEO]))
        self.log(logging.INFO, "viewer joined")
        return answer

    async def negotiate(self, offer: SessionDescription, offer_sdp: str, info: StreamInfo) -> str:
        """Answer the offer with the stream's codecs; no media flows yet."""
        matched = {}
        for media in offer.media:
            source = info.codec(media.kind)
            if source is not None:
                matched[media.kind] = codecs.match_viewer_codec(
                    media.rtp.codecs, source, media.kind, self.settings.viewer_adapt
                )
        if not matched:
            raise UnprocessableOffer("the offer asks for no track this stream has")
        pc = self.pc = self.create_peer_connection()
        for media in offer.media:
            pc.addTransceiver(
                media.kind, direction="sendonly" if media.kind in matched else "inactive"
            )
        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        twcc_ids = {  # transport-cc where the viewer offers it (only with adaptation)
            media.kind: ext.id
            for media in offer.media
            if media.kind in matched and codecs.offers_transport_cc(matched[media.kind])
            for ext in media.rtp.headerExtensions
            if ext.uri == twcc.URI
        }
        settings = self.settings
        rate = settings.viewer_max_bitrate / 8
        budget = SendBudget(rate, rate * BUDGET_BURST_S)  # shared by the viewer's tracks
        if settings.viewer_adapt:
            self.estimate = BandwidthEstimate(
                budget,
                floor=settings.viewer_min_bitrate,
                ceiling=settings.viewer_max_bitrate,
                initial=settings.viewer_max_bitrate,
            )
        retransmit = RetransmitPolicy(
            budget=settings.retransmit_budget,
            max_age=settings.retransmit_max_age,
            max_resends=settings.retransmit_max_resends,
        )
        for transceiver in pc.getTransceivers():
            if transceiver.kind not in matched:
                continue
            aiortc_compat.set_codecs(transceiver, matched[transceiver.kind])
            track = Track.VIDEO if transceiver.kind == "video" else Track.AUDIO
            if transceiver.kind in twcc_ids:
                aiortc_compat.add_header_extension(
                    transceiver, twcc.URI, twcc_ids[transceiver.kind]
                )
            sender = FanoutSender(
                transceiver.kind,
                transceiver.receiver.transport,
                self.keyframe_requested,
                budget,
                retransmit,
                self.node.native,
            )
            aiortc_compat.replace_sender(transceiver, sender)
            self.senders[track] = sender
            if transceiver.kind in twcc_ids and self.estimate is not None:
                if self.send_log is None:
                    native = self.node.native
                    self.send_log = native.SendLog() if native is not None else twcc.SendLog()
                sender.send_log = self.send_log
                sender.on_transport_feedback = self._transport_feedback
            if track is Track.VIDEO and self.estimate is not None:
                sender.estimate = self.estimate
                self._pacer = Pacer(sender, budget, self._drain)
        return await answer_offer(pc, self.settings)

    async def _start_video(self, sender: FanoutSender) -> None:
        """Once DTLS is up: the cached GOP, then live frames."""
        fanout = self.fanout
        assert fanout is not None
        await sender.ready.wait()
        self._ready_at = time.monotonic()
        await fanout.caught_up()
        if not await self._send_gop(sender):
            fanout.request_keyframe("viewer joined without a cached GOP")
            self._skip_to_keyframe = True

    async def _send_gop(self, sender: FanoutSender) -> bool:
        """Send the cached GOP, then the live frames that queued meanwhile; False if
        none is cached.

        Timestamps are packed one tick apart, so the player decodes the GOP at once
        and is at the live frame: ending at the newest frame's own timestamp for a
        joining viewer, or just after the last one this viewer got (RTP time never
        goes back). Live frames then keep their own, later, timestamps.
        """
        gop = list(self.fanout.gop) if self.fanout is not None else []
        if not gop:
            self._bursting = False
            return False
        self._bursting = True
        self._skip_to_keyframe = False
        self._resume()
        self._queue.clear()  # the GOP supersedes whatever was waiting
        first = (gop[-1].frame.rtp_timestamp + sender.ts_offset - (len(gop) - 1)) & 0xFFFFFFFF
        last = sender.last_timestamp
        if last is not None and 0 < (last + 1 - first) & 0xFFFFFFFF < 0x80000000:
            first = (last + 1) & 0xFFFFFFFF
        for i, prepared in enumerate(gop):
            self.send_video(sender, prepared, (first + i) & 0xFFFFFFFF)
            self._count_sent()
            if i % BURST_CHUNK == BURST_CHUNK - 1:
                await asyncio.sleep(0.002)
        newest = gop[-1].frame.sequence
        self._bursting = False
        while self._queue:
            prepared = self._queue.popleft()
            if prepared.frame.sequence > newest:
                self.send_video(sender, prepared)
                self._count_sent()
        return True

    def _count_sent(self) -> None:
        self.stats.frames_sent += 1
        if self.stats.first_frame_s is None:  # always a keyframe: viewers start on one
            now = time.monotonic()
            self.stats.first_frame_s = now - self.created
            metrics = self.node.bus.metrics
            metrics.time_to_first_frame.observe(self.stats.first_frame_s)
            metrics.keyframe_wait.observe(now - self._ready_at)

    def deliver(self, prepared: PreparedFrame) -> None:
        """Hand one live frame to this viewer; never blocks, never waits on the viewer."""
        frame = prepared.frame
        sender = self.senders.get(frame.track)
        if sender is None or sender.layout is None:
            return
        if frame.track is Track.AUDIO:
            sender.send_frame(prepared)
            return
        if self.estimate is not None and self.estimate.probe_failed:
            self.estimate.probe_failed = False
            if self._paused_at is None:  # the link cannot take the probe: stop it now
                if self._pacer is not None:
                    self._pacer.drop_unstarted()
                self._drop_to_keyframe()
        if self._skip_to_keyframe:
            if not frame.keyframe:
                return
            if self._paused_at is not None and not self._may_resume(sender):
                self.stats.keyframes_skipped += 1  # the link cannot take it yet
                return
            self._skip_to_keyframe = False
            self._queue.clear()
            self._resume()
        queue = self._queue
        if self._bursting or queue or not self.can_send(sender):
            queue.append(prepared)
            if len(queue) > self.settings.viewer_queue_frames or (
                self._link_limited()
                and frame.arrival_us - queue[0].frame.arrival_us
                > self.settings.viewer_max_queue_delay * 1e6
            ):
                self._backlogged()
            else:
                self._drain()
            return
        self.send_video(sender, prepared)
        self._count_sent()

    def _may_resume(self, sender: FanoutSender) -> bool:
        """At a keyframe while paused: resume if the estimate covers the stream's
        bitrate, or as a probe of the link (``BandwidthEstimate.probe``)."""
        estimate, fanout = self.estimate, self.fanout
        if estimate is not None and fanout is not None:
            need = fanout.video_bitrate
            if estimate.bitrate < need and not estimate.probe(
                need, time.monotonic(), sender.next_seq
            ):
                return False
        return self.can_send(sender)

    def _transport_feedback(self, feedback: twcc.Feedback) -> None:
        """A transport-cc feedback from this viewer, on any of its SSRCs."""
        if self.estimate is not None and self.send_log is not None:
            self.estimate.on_transport_feedback(feedback, self.send_log, time.monotonic())

    def _covers_stream(self) -> bool:
        """Whether this viewer's estimate covers the stream's recent bitrate."""
        estimate, fanout = self.estimate, self.fanout
        return estimate is None or fanout is None or estimate.bitrate >= fanout.video_bitrate

    def _link_limited(self) -> bool:
        """Whether this viewer's estimate holds it below the node's cap: only then is
        a backlog the link's fault (on a busy node a socket backlog is the CPU's)."""
        estimate = self.estimate
        return not self._bursting and estimate is not None and estimate.bitrate < estimate.ceiling

    def can_send(self, sender: FanoutSender) -> bool:
        """Whether a video frame may go out now (socket clear, budget left, pacer idle);
        also asked by gateway/playback.py for a viewer playing the past."""
        return sender.writable() and (self._pacer is None or not self._pacer.busy)

    def send_video(
        self, sender: FanoutSender, prepared: PreparedFrame, timestamp: int | None = None
    ) -> None:
        """Send one video frame, through the pacer when the viewer has one (live and
        replay alike: both go through the viewer's budget and abs-send-time stamps)."""
        if self._pacer is not None:
            self._pacer.send(prepared, timestamp)
        else:
            sender.send_frame(prepared, timestamp)

    def _drain(self) -> None:
        """Send queued frames while the viewer can take them (also the pacer's call
        when it has sent everything it held)."""
        sender = self.senders.get(Track.VIDEO)
        queue = self._queue
        while queue and not self._bursting and sender is not None and self.can_send(sender):
            self.send_video(sender, queue.popleft())
            self._count_sent()

    def _backlogged(self) -> None:
        """The queue outgrew its bound: the video pauses, unless a probe of the link
        is under way and the link has not dropped it. Then the probe's estimate, not
        the link, held the frames back (a stream burstier than its average): the
        estimate rises and the viewer skips to the next keyframe, still live."""
        estimate, fanout = self.estimate, self.fanout
        if estimate is not None and fanout is not None and estimate.probing(time.monotonic()):
            estimate.raise_probe(fanout.video_bitrate)
            self.stats.keyframe_drops += 1
            self._queue.clear()
            self._skip_to_keyframe = True
        else:
            self._drop_to_keyframe()

    def _drop_to_keyframe(self) -> None:
        """Give up on a viewer's backlog: its video pauses until the stream's next
        keyframe that its budget can take (audio keeps flowing).

        Nothing is asked of the publisher (that would cost every viewer a keyframe):
        ingest forces one every ``max_keyframe_interval``, and the fan-out asks for
        one when the cached GOP grows too long.
        """
        self.stats.keyframe_drops += 1
        self._queue.clear()
        self._skip_to_keyframe = True
        if self._paused_at is None:
            self._paused_at = time.monotonic()
            self.stats.pauses += 1
            if self.estimate is not None:
                self.estimate.paused(True, self._paused_at)

    def _resume(self) -> None:
        if self._paused_at is not None:
            now = time.monotonic()
            self.stats.paused_s += now - self._paused_at
            self._paused_at = None
            if self.estimate is not None:
                self.estimate.paused(False, now)

    @property
    def video_paused(self) -> bool:
        return self._paused_at is not None

    def status(self) -> dict:
        """What the viewer's session resource tells its page (``GET``)."""
        estimate = self.estimate
        return {
            "stream": self.stream,
            "video": "paused" if self.video_paused else "live",
            "reason": "connection too slow" if self.video_paused else None,
            "layer": None,
            "estimate_kbps": None if estimate is None else round(estimate.bitrate / 1000),
            "sent_kbps": None if estimate is None else round(estimate.sent_bitrate / 1000),
            "loss": None if estimate is None else round(estimate.loss, 3),
            "frames_sent": self.stats.frames_sent,
            "pauses": self.stats.pauses,
        }

    # Hooks for replay (gateway/playback.py): a viewer leaves the live fan-out while it
    # plays the past, and rejoins it once the caller has sent it a GOP.
    def leave_live(self) -> None:
        self._live = False
        self._queue.clear()
        self.drop_pending_video()  # live frames still waiting must not follow the past
        self._resume()

    def drop_pending_video(self) -> None:
        """Forget frames the pacer still holds (a seek's GOP supersedes them)."""
        if self._pacer is not None:
            self._pacer.clear()
        if self.fanout is not None:
            self.fanout.viewers.discard(self)

    def follow_live(self, fanout: StreamFanout) -> None:
        self.fanout = fanout
        self._queue.clear()
        self._skip_to_keyframe = False
        self._bursting = False
        self._live = True
        fanout.viewers.add(self)

    def keyframe_requested(self, reason: str) -> None:
        """A PLI/FIR from this viewer: answered from the cached GOP, for it alone, at
        most once per ``viewer_keyframe_interval``; upstream only without a cache."""
        if reason == "PLI":
            self.stats.plis += 1
        elif reason == "FIR":
            self.stats.firs += 1
        sender = self.senders.get(Track.VIDEO)
        if self.fanout is None or sender is None or self._bursting or self._skip_to_keyframe:
            return  # a keyframe is already on its way to this viewer
        if not self._live:
            return  # playing the past: the live GOP is not its picture; the next keyframe is
        now = time.monotonic()
        if now - self._keyframe_answered < self.settings.viewer_keyframe_interval:
            return
        self._keyframe_answered = now
        if self._link_limited() and not self._covers_stream():
            self._drop_to_keyframe()  # the link cannot carry the stream: pause
        elif self._link_limited():
            # A GOP burst would only build a backlog on a link with little to spare:
            # the viewer waits for the stream's next keyframe instead. Its video is not
            # paused for that (nor a probe of the link failed): a PLI says a picture
            # broke, as after every resume, not that the link got slower; a backlog
            # pauses it by the queue-delay rule, loss fails a probe.
            self._queue.clear()
            self._skip_to_keyframe = True
        elif not self.can_send(sender):
            self._drop_to_keyframe()  # backlogged: a GOP burst would only deepen it
        elif self.fanout.gop:
            self.stats.cached_keyframes += 1
            self.spawn(self._send_gop(sender))
        else:
            self.stats.upstream_keyframes += 1
            self.fanout.request_keyframe(f"viewer {reason}")

    def final_stats(self) -> ViewerStats:
        stats = ViewerStats(**vars(self.stats))
        senders = self.senders.values()
        stats.nacks = sum(s.nacks_received for s in senders)
        stats.retransmissions = sum(s.retransmitted for s in senders)
        stats.retransmitted_octets = sum(s.retransmitted_octets for s in senders)
        stats.refused_budget = sum(s.retransmit_refused["budget"] for s in senders)
        stats.refused_age = sum(s.retransmit_refused["age"] for s in senders)
        stats.refused_repeat = sum(s.retransmit_refused["repeat"] for s in senders)
        if self._paused_at is not None:
            stats.paused_s += time.monotonic() - self._paused_at
        if self.estimate is not None:
            stats.congestion_cuts = self.estimate.stats.congestion_cuts
        return stats

    async def close(self) -> None:
        if self._closed:
            return
        if self.fanout is not None:
            self.fanout.remove(self)
        self.node.forget(self)
        self.log(logging.INFO, "viewer left after %d frames", self.stats.frames_sent)
        await super().close()


class StreamFanout:
    """The single reader of one stream on this node, shared by all its viewers."""

    def __init__(self, node: EgressNode, info: StreamInfo) -> None:
        self.node = node
        self.stream = info.stream
        self.session = info.session
        self.viewers: set[ViewerSession] = set()
        self.gop: list[PreparedFrame] = []
        self.frames = 0
        self.gop_overflows = 0
        self.video_bitrate = 0.0
        """The stream's video bitrate over the last ``STREAM_RATE_WINDOW_S`` or more (bits/s)."""
        self._rate_bytes = 0
        self._rate_from_us: int | None = None
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=2048)
        # Frames carry the ingest's wall-clock arrival time; only when that ingest is this
        # process does one clock serve both ends, so only then is latency measured.
        self._one_clock = info.node == node.settings.node_id
        self._departed = ViewerStats()
        self._reader = FrameReader(node.bus, info.stream, lookback=node.settings.gop_cache_frames)
        self._packetizers = {}
        for track, kind in ((Track.VIDEO, "video"), (Track.AUDIO, "audio")):
            codec = info.codec(kind)
            if codec is not None:
                self._packetizers[track] = codecs.Packetizer(Codec.from_mime_type(codec.mimeType))
        self._task: asyncio.Task | None = None
        self._idle_since = time.monotonic()

    async def start(self) -> None:
        await self._reader.start()
        self._task = asyncio.create_task(self._run(), name=f"fanout-{self.stream}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(v.close() for v in list(self.viewers)))

    async def caught_up(self) -> None:
        """Wait until the GOP cache holds what Kafka had when this reader started."""
        await self._reader.caught_up.wait()

    def totals(self) -> ViewerStats:
        """Viewer counters summed over present and departed viewers."""
        total = ViewerStats()
        total.add(self._departed)
        for viewer in self.viewers:
            total.add(viewer.final_stats())
        return total

    def remove(self, viewer: ViewerSession) -> None:
        if viewer in self.viewers:
            self._departed.add(viewer.final_stats())
        self.viewers.discard(viewer)
        if not self.viewers:
            self._idle_since = time.monotonic()

    def request_keyframe(self, reason: str) -> None:
        self.node.keyframes.request(self.stream, self.session, reason)

    async def _run(self) -> None:
        try:
            async for batch in self._reader.read():
                for item in batch:
                    self._on_frame(item.frame, item.history)
        finally:
            await self._reader.stop()

    def _count_rate(self, frame) -> None:
        """Once per video frame for all viewers: the bitrate paused viewers probe for."""
        self._rate_bytes += len(frame.payload)
        start = self._rate_from_us
        if start is None:
            self._rate_from_us, self._rate_bytes = frame.arrival_us, 0
        elif frame.arrival_us - start >= STREAM_RATE_WINDOW_S * 1e6:
            self.video_bitrate = self._rate_bytes * 8e6 / (frame.arrival_us - start)
            self._rate_from_us, self._rate_bytes = frame.arrival_us, 0

    def _on_frame(self, frame, history: bool) -> None:
        if frame.session != self.session:
            return  # an earlier publish of the same stream name
        packetizer = self._packetizers.get(frame.track)
        if packetizer is None:
            return
        prepared = PreparedFrame(
            frame, packetizer.packetize(frame.payload), frame.track is Track.VIDEO
        )
        if frame.track is Track.VIDEO:
            if frame.keyframe:
                self.gop = [prepared]
            elif self.gop:
                self.gop.append(prepared)
                if len(self.gop) > self.node.settings.gop_cache_frames:
                    self.gop = []
                    self.gop_overflows += 1
                    self.request_keyframe("cached GOP too long")
        if history:
            return
        self.frames += 1
        if frame.track is Track.VIDEO:
            self._count_rate(frame)
        for viewer in list(self.viewers):
            viewer.deliver(prepared)
        if self._one_clock:
            latency_ms = time.time() * 1000 - frame.arrival_us / 1000
            self.latency_ms.append(latency_ms)
            if self.viewers:
                self.node.bus.metrics.gateway_latency.observe(latency_ms / 1000)

    @property
    def lag(self) -> tuple[int, float]:
        """(records, ms) this reader is behind the stream's newest frame."""
        return self._reader.lag_records, self._reader.lag_ms


class EgressNode:
    """The viewers and stream fan-outs of this process."""

    def __init__(self, settings: Settings, bus: Bus, view: RegistryView) -> None:
        self.settings = settings
        self.bus = bus
        self.view = view
        self.keyframes = KeyframeRequester(bus, settings.keyframe_request_interval)
        self.native = native_core(settings.no_native_fanout)
        """The native fan-out core viewers send with, or None for the pure-Python path."""
        self.viewers: dict[str, ViewerSession] = {}
        self.started = 0
        self._departed_octets = 0
        self.fanouts: dict[str, StreamFanout] = {}
        self._fanout_lock = asyncio.Lock()
        self._janitor: asyncio.Task | None = None

    async def start(self) -> None:
        self._janitor = asyncio.create_task(self._sweep(), name="egress-janitor")

    async def stop(self) -> None:
        if self._janitor:
            self._janitor.cancel()
            await asyncio.gather(self._janitor, return_exceptions=True)
        await asyncio.gather(*(f.stop() for f in list(self.fanouts.values())))
        self.fanouts.clear()

    async def play(self, stream: str, offer_sdp: str) -> tuple[ViewerSession, str]:
        offer = parse_offer(offer_sdp, direction="recvonly")
        if not self.bus.reachable:
            raise Unavailable("the media bus (Kafka) is unreachable; try again shortly")
        if len(self.viewers) >= self.settings.max_viewers:
            raise Unavailable("this egress node is full; try again shortly")
        info = self.view.get(stream)
        if info is None:
            raise NotLive(f"stream {stream!r} is not live")
        viewer = ViewerSession(self, stream)
        self.viewers[viewer.resource_id] = viewer
        self.started += 1
        try:
            answer = await viewer.start(offer, offer_sdp, info)
        except KafkaError as exc:
            await viewer.close()
            raise Unavailable(f"the media bus (Kafka) failed: {exc.__class__.__name__}") from None
        except BaseException:
            await viewer.close()
            raise
        return viewer, answer

    def snapshot(self, series: StreamSeries) -> None:
        """Per-stream counters for a metrics scrape (read, never reset)."""
        for name, fanout in self.fanouts.items():
            totals = fanout.totals()
            lag_records, lag_ms = fanout.lag
            series.add(
                "gauge",
                "whipcast_egress_viewers",
                "Viewers on this node",
                name,
                len(fanout.viewers),
            )
            series.add(
                "counter",
                "whipcast_egress_frames_read",
                "Frames read from Kafka",
                name,
                fanout.frames,
            )
            series.add(
                "counter",
                "whipcast_egress_frames_sent",
                "Frames sent, summed over viewers",
                name,
                totals.frames_sent,
            )
            series.add(
                "counter",
                "whipcast_egress_viewer_keyframe_drops",
                "Slow viewers dropped to the next keyframe after a queue overflow",
                name,
                totals.keyframe_drops,
            )
            for kind, value in (("nack", totals.nacks), ("pli", totals.plis), ("fir", totals.firs)):
                series.add(
                    "counter",
                    "whipcast_rtcp_feedback_received",
                    "RTCP feedback received from viewers",
                    name,
                    value,
                    type=kind,
                )
            series.add(
                "counter",
                "whipcast_egress_retransmissions",
                "Packets resent on NACK",
                name,
                totals.retransmissions,
            )
            series.add(
                "counter",
                "whipcast_egress_retransmitted_bytes",
                "RTP payload bytes resent on NACK",
                name,
                totals.retransmitted_octets,
            )
            for reason, value in (
                ("budget", totals.refused_budget),
                ("age", totals.refused_age),
                ("repeat", totals.refused_repeat),
            ):
                series.add(
                    "counter",
                    "whipcast_egress_retransmissions_refused",
                    "NACKed packets not resent: viewer allowance spent, too old, resent enough",
                    name,
                    value,
                    reason=reason,
                )
            for where, value in (
                ("cache", totals.cached_keyframes),
                ("upstream", totals.upstream_keyframes),
            ):
                series.add(
                    "counter",
                    "whipcast_egress_viewer_keyframes",
                    "Viewer PLI/FIR answered from the cached GOP or passed to the publisher",
                    name,
                    value,
                    answer=where,
                )
            series.add(
                "counter",
                "whipcast_egress_gop_overflows",
                "Cached GOPs dropped for being too long",
                name,
                fanout.gop_overflows,
            )
            series.add(
                "gauge",
                "whipcast_egress_consumer_lag_records",
                "Video records in Kafka not yet read",
                name,
                lag_records,
            )
            series.add(
                "gauge",
                "whipcast_egress_consumer_lag_seconds",
                "Age of the newest frame read (ingest arrival to now)",
                name,
                lag_ms / 1000,
            )

    def forget(self, viewer: ViewerSession) -> None:
        if self.viewers.pop(viewer.resource_id, None) is not None:
            self._departed_octets += sum(s.octets_sent for s in viewer.senders.values())

    def octets_sent(self) -> int:
        """RTP payload bytes sent to viewers so far (present and departed)."""
        departed = self._departed_octets
        return departed + sum(
            s.octets_sent for v in self.viewers.values() for s in v.senders.values()
        )

    def find(self, stream: str, resource_id: str) -> ViewerSession | None:
        viewer = self.viewers.get(resource_id)
        return viewer if viewer is not None and viewer.stream == stream else None

    async def fanout(self, info: StreamInfo) -> StreamFanout:
        async with self._fanout_lock:
            fanout = self.fanouts.get(info.stream)
            if fanout is not None and fanout.session != info.session:
                await self._end(fanout)
                fanout = None
            if fanout is None:
                fanout = StreamFanout(self, info)
                await fanout.start()
                self.fanouts[info.stream] = fanout
            return fanout

    async def _end(self, fanout: StreamFanout) -> None:
        self.fanouts.pop(fanout.stream, None)
        self.keyframes.forget(fanout.stream)
        await fanout.stop()

    async def _sweep(self) -> None:
        """End fan-outs whose stream ended, and idle ones after a grace period.

        While Kafka is unreachable, and until heartbeats had time to arrive after it is
        back, nothing can be known about streams, so viewers are kept and resume.
        """
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            informed = self.bus.reachable and now - self.bus.reachable_since > STALE_AFTER_S
            for fanout in list(self.fanouts.values()):
                info = self.view.get(fanout.stream)
                ended = informed and (info is None or info.session != fanout.session)
                idle = not fanout.viewers and now - fanout._idle_since > self.settings.fanout_linger
                if ended or idle:
                    if ended:
                        logger.info(
                            "stream %s ended; closing %d viewers",
                            fanout.stream,
                            len(fanout.viewers),
                        )
                    await self._end(fanout)
