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

A stream with simulcast layers is read once per node with all its layers, each with
its own GOP cache; each viewer is on one layer, chosen by its ``layers.LayerSelector``
a few times a second, and switches at a keyframe of the target layer (the target's
cached GOP when it is cheap to send, else a keyframe asked for on that layer), its
RTP timestamps re-based so the player sees one continuous stream. A viewer on a layer
below the top drops a layer instead of pausing while there is one below.
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
from .batch import Batch
from .bus import Bus, FrameReader
from .control import KeyframeRequester
from .errors import NotLive, Unavailable, UnprocessableOffer
from .frames import MAX_VIDEO_LAYERS, Codec, Track
from .layers import FAST_SWITCH_S, PROBE_OK_S, LayerRate, LayerSelector, add_layer_metrics
from .metrics import StreamSeries
from .pacer import Pacer
from .peer import PeerSession, answer_offer, parse_offer
from .registry import STALE_AFTER_S, RegistryView, StreamInfo
from .rtpsend import (
    FanoutSender,
    PreparedFrame,
    RetransmitPolicy,
    SendBudget,
    SenderReports,
    native_core,
)
from .settings import Settings

logger = logging.getLogger(__name__)

BURST_CHUNK = 8  # GOP frames sent to a viewer between two yields to the loop
BUDGET_BURST_S = 1.0  # a viewer's send budget holds this many seconds of its rate
SELECT_INTERVAL_S = 0.25  # how often a layered stream's viewers' layers are reconsidered
TRY_CHECK_S = 0.05  # ... and a viewer's that just switched up, to undo a failed try at once
# A stream whose record still says live, in the same session, but whose ingest has not
# been heard from lately (a node heartbeat 2 s late: it queued behind a broker failover)
# keeps its viewers this long before it counts as ended; an ended record ends it at once.
SILENT_GRACE_S = 3.0


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
    layer_switches_up: int = 0
    layer_switches_down: int = 0
    layer_failed_ups: int = 0
    """Simulcast layer switches; switches up the link could not carry (undone)."""
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
        self.layer = 0
        """The simulcast layer this viewer gets (0: the best, or the only one)."""
        self.selector: LayerSelector | None = None
        """Set for a stream with simulcast layers (``Settings.viewer_layers``)."""
        self._rebase = False  # the next video frame sent starts a new layer's timeline
        self._up_pending: int | None = None  # better layer whose next keyframe it waits for
        self.send_log: twcc.SendLog | None = None
        """Transport-wide numbers of what this viewer was sent (transport-cc viewers)."""

    async def start(self, offer: SessionDescription, offer_sdp: str, info: StreamInfo) -> str:
        answer = await self.negotiate(offer, offer_sdp, info)
        self.fanout = await self.node.fanout(info)
        settings = self.settings
        if self.fanout.layer_count > 1 and self.estimate is not None:
            self.selector = LayerSelector(
                settings.layer_up_hold_s, settings.layer_up_max_hold_s, time.monotonic()
            )
        elif self.estimate is not None and not settings.viewer_adapt:
            self._drop_estimate()  # it was only for layers the topic turned out not to have
        self.fanout.join(self)
        if Track.VIDEO in self.senders:
            self.spawn(self._start_video(self.senders[Track.VIDEO]))
        self.log(logging.INFO, "viewer joined")
        return answer

    async def negotiate(self, offer: SessionDescription, offer_sdp: str, info: StreamInfo) -> str:
        """Answer the offer with the stream's codecs; no media flows yet."""
        settings = self.settings
        # A simulcast stream's viewers all get an estimate: it chooses their layer, and
        # leaves the top one only when the viewer's own feedback says its link is short.
        layered = settings.viewer_layers and len(info.layers or ()) > 1
        estimated = settings.viewer_adapt or layered
        matched = {}
        for media in offer.media:
            source = info.codec(media.kind)
            if source is not None:
                matched[media.kind] = codecs.match_viewer_codec(
                    media.rtp.codecs, source, media.kind, estimated
                )
        if not matched:
            raise UnprocessableOffer("the offer asks for no track this stream has")
        pc = self.pc = self.create_peer_connection()
        for media in offer.media:
            pc.addTransceiver(
                media.kind, direction="sendonly" if media.kind in matched else "inactive"
            )
        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        twcc_ids = {  # transport-cc where the viewer offers it (only with an estimate)
            media.kind: ext.id
            for media in offer.media
            if media.kind in matched and codecs.offers_transport_cc(matched[media.kind])
            for ext in media.rtp.headerExtensions
            if ext.uri == twcc.URI
        }
        rate = settings.viewer_max_bitrate / 8
        budget = SendBudget(rate, rate * BUDGET_BURST_S)  # shared by the viewer's tracks
        if estimated:
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
                self.node.reports,
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

    def _drop_estimate(self) -> None:
        """Back to the fixed budget of a viewer without adaptation."""
        video = self.senders.get(Track.VIDEO)
        if video is not None:
            video.estimate = None
            rate = self.settings.viewer_max_bitrate / 8
            video.budget.rate, video.budget.burst = rate, rate * BUDGET_BURST_S
        self.estimate = self._pacer = None

    async def _start_video(self, sender: FanoutSender) -> None:
        """Once DTLS is up: the cached GOP, then live frames."""
        fanout = self.fanout
        assert fanout is not None
        await sender.ready.wait()
        self._ready_at = time.monotonic()
        await fanout.caught_up()
        if not await self._send_gop(sender):
            fanout.request_keyframe("viewer joined without a cached GOP", self.layer)
            self._skip_to_keyframe = True

    async def _send_gop(self, sender: FanoutSender) -> bool:
        """Send the cached GOP, then the live frames that queued meanwhile; False if
        none is cached.

        Timestamps are packed one tick apart, so the player decodes the GOP at once
        and is at the live frame: ending at the newest frame's own timestamp for a
        joining viewer, or just after the last one this viewer got (RTP time never
        goes back). Live frames then keep their own, later, timestamps.
        """
        gop = list(self.fanout.gops[self.layer]) if self.fanout is not None else []
        self._leave_batch(Track.VIDEO)
        if not gop:
            self._bursting = False
            return False
        self._bursting = True
        self._skip_to_keyframe = False
        self._resume()
        self._queue.clear()  # the GOP supersedes whatever was waiting
        if self._rebase:  # a switch of layer: carry on from the last frame sent
            self._rebase = False
            sender.continue_with(gop[-1].frame, len(gop) + 1)
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
            self._join_batch(Track.AUDIO, sender)
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
            if self._rebase:  # the first frame of the layer it switched down to
                self._rebase = False
                sender.continue_with(frame)
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
        self._join_batch(Track.VIDEO, sender)

    def _join_batch(self, track: Track, sender: FanoutSender) -> None:
        """After a frame sent plainly: let the stream's native batch send this track's
        next frames, if nothing about them needs Python (``gateway/batch.py``)."""
        fanout = self.fanout
        if fanout is None or not fanout.batches:
            return
        if track is Track.AUDIO:
            native = sender.batch_track(0, budgeted=False)
        else:
            pacer = self._pacer
            if (
                self._bursting
                or self._queue
                or self._skip_to_keyframe
                or not self._live
                or self._link_limited()
                or (pacer is not None and pacer.busy)
            ):
                return
            native = sender.batch_track(0 if pacer is None else pacer.max_packets(), True)
        if native is not None:
            layer = self.layer if track is Track.VIDEO else 0
            fanout.batches[(track, layer)].add(self, sender.layout, native)

    def _leave_batch(self, track: Track | None = None) -> None:
        """Frames of ``track`` (None: both) take the Python path again."""
        fanout = self.fanout
        if fanout is not None:
            for (kind, _), batch in fanout.batches.items():
                if track is None or kind is track:
                    batch.remove(self)

    @property
    def frames_sent(self) -> int:
        """Video frames sent, by the Python path and by native batches."""
        video = self.senders.get(Track.VIDEO)
        return self.stats.frames_sent + (video.batch_frames if video is not None else 0)

    def _may_resume(self, sender: FanoutSender) -> bool:
        """At a keyframe while paused: resume if the estimate covers the stream's
        bitrate, or as a probe of the link (``BandwidthEstimate.probe``)."""
        estimate, fanout = self.estimate, self.fanout
        if estimate is not None and fanout is not None:
            need = fanout.rates[self.layer].bitrate
            if estimate.bitrate < need and not estimate.probe(
                need, time.monotonic(), sender.next_seq
            ):
                return False
        return self.can_send(sender)

    def _transport_feedback(self, feedback: twcc.Summary) -> None:
        """A transport-cc feedback from this viewer, on any of its SSRCs, matched
        against its send log."""
        if self.estimate is not None:
            self.estimate.on_transport_feedback(feedback, time.monotonic())

    def _covers_stream(self) -> bool:
        """Whether this viewer's estimate covers the stream's recent bitrate."""
        estimate, fanout = self.estimate, self.fanout
        return (
            estimate is None
            or fanout is None
            or estimate.bitrate >= fanout.rates[self.layer].bitrate
        )

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
            estimate.raise_probe(fanout.rates[self.layer].bitrate)
            self.stats.keyframe_drops += 1
            self._queue.clear()
            self._skip_to_keyframe = True
        elif not self._step_down():
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
        self._leave_batch(Track.VIDEO)
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

    # Simulcast layers (gateway/layers.py): the decision is the selector's, a few times
    # a second; the switch happens here, at a keyframe of the target layer.
    def select_layer(self, bitrates: list[float], alive: list[bool], now: float) -> None:
        """Asked by the fan-out every ``SELECT_INTERVAL_S`` (never per frame)."""
        selector, estimate = self.selector, self.estimate
        if selector is None or estimate is None or self._bursting or not self._live:
            return
        target = selector.choose(estimate.bitrate, bitrates, alive, now)
        if target > self.layer:
            self._switch_down(target, now)
        elif target < self.layer and self._paused_at is None:
            if self._up_pending != target:
                self._cancel_up()
                self._up_pending = target
                self.fanout.await_keyframe(self, target)
                self.fanout.request_keyframe("viewer switching up", target)
        else:
            self._cancel_up()

    def _cancel_up(self) -> None:
        if self._up_pending is not None and self.fanout is not None:
            self.fanout.await_keyframe(self, None)
        self._up_pending = None

    def _step_down(self) -> bool:
        """The viewer fell behind, or its picture broke, with an estimate short of its
        layer: the lower layer the selector picks, at once (False where there is none,
        or the estimate carries the layer: then the video pauses to the next keyframe
        it can take, as on a single-layer stream)."""
        fanout, selector, estimate = self.fanout, self.selector, self.estimate
        if fanout is None or selector is None or estimate is None or not self._live:
            return False
        bitrates, alive = fanout.layer_state()
        now = time.monotonic()
        target = selector.choose(estimate.bitrate, bitrates, alive, now)
        if target <= self.layer:
            return False  # its estimate carries this layer: the backlog is a burst's
        self._switch_down(target, now)
        return True

    def _move(self, layer: int, now: float) -> None:
        self._cancel_up()
        self.fanout.move(self, layer)
        self.selector.switched(layer, now)
        self.layer = layer
        self._queue.clear()  # frames of the old layer: the new one's keyframe supersedes them
        if self._pacer is not None:
            self._pacer.clear()
        self._rebase = True
        # What the old layer cost and the feedback still in flight about it describe
        # the old layer: the budget's debt is forgiven, and loss and REMB cut nothing
        # until the new layer has flowed for a while (as after a pause).
        self.senders[Track.VIDEO].budget.refill(now)
        if self._paused_at is None:
            self.estimate.paused(False, now)

    def _switch_down(self, layer: int, now: float) -> None:
        """To a lower layer at once: its cached GOP if the estimate sends it within
        ``FAST_SWITCH_S``, else from its next keyframe (asked for on that layer); the
        old layer stops now either way (its link is short of it)."""
        fanout, sender = self.fanout, self.senders.get(Track.VIDEO)
        if fanout is None or sender is None:
            return
        self._move(layer, now)
        if self._paused_at is None and self._gop_is_cheap():
            self._bursting = True  # live frames of the new layer wait behind its GOP
            self.spawn(self._send_gop(sender))
        else:
            self._skip_to_keyframe = True
            fanout.request_keyframe("viewer switching down", layer)

    def _gop_is_cheap(self) -> bool:
        """Whether the viewer's layer has a cached GOP its estimate sends within
        ``FAST_SWITCH_S`` (a layered viewer's picture restarts from it at once)."""
        gop, estimate = self.fanout.gops[self.layer], self.estimate
        if not gop or estimate is None:
            return False
        return sum(len(p.frame.payload) for p in gop) <= estimate.bitrate / 8 * FAST_SWITCH_S

    def switch_up_at(self, prepared: PreparedFrame, layer: int) -> None:
        """A keyframe of the better layer this viewer waits for: switch to it, as a
        probe of the link (``BandwidthEstimate.probe``: if the link cannot carry it,
        the estimate falls back and the selector brings the viewer down again)."""
        self._cancel_up()
        sender, estimate = self.senders.get(Track.VIDEO), self.estimate
        if sender is None or estimate is None or self.fanout is None:
            return
        now = time.monotonic()
        busy = self._bursting or self._skip_to_keyframe or not self._live
        if busy or not estimate.probe(self.fanout.rates[layer].bitrate, now, sender.next_seq):
            self.selector.not_now()
            return
        self._move(layer, now)
        self._rebase = False
        sender.continue_with(prepared.frame)
        self.spawn(self._watch_try(layer))

    async def _watch_try(self, layer: int) -> None:
        """While a switch up is unconfirmed, look at the estimate every ``TRY_CHECK_S``
        rather than every ``SELECT_INTERVAL_S``: a failed try costs the viewer a frozen
        picture until it is back on its old layer, so it goes back within one check."""
        end = time.monotonic() + PROBE_OK_S
        while self.layer == layer and self._live and time.monotonic() < end:
            await asyncio.sleep(TRY_CHECK_S)
            if self.fanout is None:
                return
            bitrates, alive = self.fanout.layer_state()
            self.select_layer(bitrates, alive, time.monotonic())

    def status(self) -> dict:
        """What the viewer's session resource tells its page (``GET``)."""
        estimate = self.estimate
        return {
            "stream": self.stream,
            "video": "paused" if self.video_paused else "reduced" if self.layer else "live",
            "reason": "connection too slow" if self.video_paused or self.layer else None,
            **self._layer_status(),
            "estimate_kbps": None if estimate is None else round(estimate.bitrate / 1000),
            "sent_kbps": None if estimate is None else round(estimate.sent_bitrate / 1000),
            "loss": None if estimate is None else round(estimate.loss, 3),
            "frames_sent": self.frames_sent,
            "pauses": self.stats.pauses,
        }

    def _layer_status(self) -> dict:
        selector, fanout = self.selector, self.fanout
        if selector is None or fanout is None:
            return {"layer": None, "layers": 1 if fanout is None else fanout.layer_count}
        described = fanout.layer_info[self.layer] if self.layer < len(fanout.layer_info) else {}
        return {
            "layer": self.layer,
            "layers": fanout.layer_count,
            "layer_width": described.get("width"),
            "layer_height": described.get("height"),
            "layer_switches": selector.switches_up + selector.switches_down,
        }

    # Hooks for replay (gateway/playback.py): a viewer leaves the live fan-out while it
    # plays the past, and rejoins it once the caller has sent it a GOP.
    def leave_live(self) -> None:
        self._live = False
        self._queue.clear()
        fanout, sender = self.fanout, self.senders.get(Track.VIDEO)
        if self.layer and fanout is not None and sender is not None:
            # The past is read from the top layer: re-base its timestamps (the replay
            # shifts them from here) and come back live on it.
            if fanout.gops[0]:
                sender.continue_with(fanout.gops[0][-1].frame)
            fanout.move(self, 0)
            self.layer = self.selector.layer = 0
            # Its estimate was held to a lower layer's rate: try the top one (a link
            # that cannot carry it fails the probe and the replay skips to keyframes).
            self.estimate.probe(fanout.rates[0].bitrate, time.monotonic(), sender.next_seq)
        self.drop_pending_video()  # live frames still waiting must not follow the past
        self._resume()

    def drop_pending_video(self) -> None:
        """Forget frames the pacer still holds (a seek's GOP supersedes them)."""
        if self._pacer is not None:
            self._pacer.clear()
        self._leave_batch()
        if self.fanout is not None:
            self._up_pending = None
            self.fanout.leave(self)

    def follow_live(self, fanout: StreamFanout) -> None:
        self.fanout = fanout
        self._queue.clear()
        self._skip_to_keyframe = False
        self._bursting = False
        self._live = True
        self._rebase = False
        self.layer = 0
        if self.selector is not None:
            self.selector.layer = 0
        fanout.join(self)

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
            if not self._step_down():
                self._drop_to_keyframe()  # the link cannot carry the stream: pause
        elif self._link_limited() and self.selector is not None and self._gop_is_cheap():
            self.stats.cached_keyframes += 1  # a lower layer's young GOP: cheap enough
            self.spawn(self._send_gop(sender))
        elif self._link_limited():
            # A GOP burst would only build a backlog on a link with little to spare:
            # the viewer waits for the stream's next keyframe instead. Its video is not
            # paused for that (nor a probe of the link failed): a PLI says a picture
            # broke, as after every resume, not that the link got slower; a backlog
            # pauses it by the queue-delay rule, loss fails a probe.
            self._queue.clear()
            self._skip_to_keyframe = True
            self._leave_batch(Track.VIDEO)
        elif not self.can_send(sender):
            self._drop_to_keyframe()  # backlogged: a GOP burst would only deepen it
        elif self.fanout.gops[self.layer]:
            self.stats.cached_keyframes += 1
            self.spawn(self._send_gop(sender))
        else:
            self.stats.upstream_keyframes += 1
            self.fanout.request_keyframe(f"viewer {reason}", self.layer)

    def final_stats(self) -> ViewerStats:
        stats = ViewerStats(**vars(self.stats))
        stats.frames_sent = self.frames_sent
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
        if self.selector is not None:
            stats.layer_switches_up = self.selector.switches_up
            stats.layer_switches_down = self.selector.switches_down
            stats.layer_failed_ups = self.selector.failed_ups
        return stats

    async def close(self) -> None:
        if self._closed:
            return
        if self.fanout is not None:
            self.fanout.remove(self)
        self.node.forget(self)
        self.log(logging.INFO, "viewer left after %d frames", self.frames_sent)
        await super().close()


class StreamFanout:
    """The single reader of one stream on this node, shared by all its viewers."""

    def __init__(self, node: EgressNode, info: StreamInfo) -> None:
        self.node = node
        self.stream = info.stream
        self.session = info.session
        self.viewers: set[ViewerSession] = set()
        """Viewers following the live stream (not those playing the past)."""
        layers = info.layers if node.settings.viewer_layers and info.layers else []
        self.layer_count = max(1, min(len(layers), MAX_VIDEO_LAYERS))
        """Simulcast video layers read (1: the stream has one, or layer choice is off)."""
        self.layer_info: list[dict] = list(layers[: self.layer_count])
        self.gops: list[list[PreparedFrame]] = [[] for _ in range(self.layer_count)]
        """The current GOP of each layer (a join or a switch starts from it at once)."""
        self.rates = [LayerRate() for _ in range(self.layer_count)]
        """Each layer's measured bitrate: what paused viewers probe for, what the
        viewers' layer selectors weigh their estimates against."""
        self._on_layer: list[set[ViewerSession]] = [set() for _ in range(self.layer_count)]
        self._awaiting: list[set[ViewerSession]] = [set() for _ in range(self.layer_count)]
        """Per layer, viewers that switch up to it at its next keyframe."""
        self.frames = 0
        self.audio_rtp: int | None = None
        """RTP timestamp of the last audio frame handed out: every later one follows it
        (a replay returning live keeps the viewer's audio time from going back)."""
        self.gop_overflows = 0
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=2048)
        # Frames carry the ingest's wall-clock arrival time; only when that ingest is this
        # process does one clock serve both ends, so only then is latency measured.
        self._one_clock = info.node == node.settings.node_id
        self._departed = ViewerStats()
        self._reader = FrameReader(
            node.bus, info.stream, lookback=node.settings.gop_cache_frames, layers=self.layer_count
        )
        self.batches: dict[tuple[Track, int], Batch] = {}
        """Per track kind and video layer (audio: 0), the viewers a native batch sends
        to (none without the core)."""
        if node.native is not None:
            self.batches[(Track.AUDIO, 0)] = Batch(node.native, Track.AUDIO)
            for layer in range(self.layer_count):
                self.batches[(Track.VIDEO, layer)] = Batch(node.native, Track.VIDEO)
        # One packetizer per video layer: each layer's VP8 picture ids run on without
        # gaps, which browsers read as lost frames (a switch jumps at a keyframe: fine).
        self._packetizers: dict[tuple[Track, int], codecs.Packetizer] = {}
        for track, kind in ((Track.VIDEO, "video"), (Track.AUDIO, "audio")):
            codec = info.codec(kind)
            for layer in range(self.layer_count if track is Track.VIDEO else 1):
                if codec is not None:
                    packetizer = codecs.Packetizer(Codec.from_mime_type(codec.mimeType))
                    self._packetizers[(track, layer)] = packetizer
        self._tasks: list[asyncio.Task] = []
        self._idle_since = time.monotonic()
        self._silent_since: float | None = None

    @property
    def gop(self) -> list[PreparedFrame]:
        """The top layer's current GOP (a replay returning live starts from it)."""
        return self.gops[0]

    async def start(self) -> None:
        await self._reader.start()
        if self._reader.layers < self.layer_count:  # the topic lacks some layers' partitions
            logger.warning(
                "stream %s lists %d layers but its topic holds %d",
                self.stream,
                self.layer_count,
                self._reader.layers,
            )
            n = self.layer_count = self._reader.layers
            del self.layer_info[n:], self.gops[n:], self.rates[n:]
            del self._on_layer[n:], self._awaiting[n:]
        self._tasks.append(asyncio.create_task(self._run(), name=f"fanout-{self.stream}"))
        if self.layer_count > 1:
            self._tasks.append(
                asyncio.create_task(self._select_layers(), name=f"layers-{self.stream}")
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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
        for batch in self.batches.values():
            batch.remove(viewer)
        if viewer in self.viewers:
            self._departed.add(viewer.final_stats())
        self.leave(viewer)
        if not self.viewers:
            self._idle_since = time.monotonic()

    def join(self, viewer: ViewerSession) -> None:
        """``viewer`` follows the live stream, on its layer."""
        self.viewers.add(viewer)
        self._on_layer[viewer.layer].add(viewer)

    def leave(self, viewer: ViewerSession) -> None:
        self.viewers.discard(viewer)
        for viewers in self._on_layer:
            viewers.discard(viewer)
        self.await_keyframe(viewer, None)

    def move(self, viewer: ViewerSession, layer: int) -> None:
        """``viewer`` gets ``layer``'s frames from now on instead of its current one's."""
        if viewer in self.viewers:
            self._on_layer[viewer.layer].discard(viewer)
            self._on_layer[layer].add(viewer)
            batch = self.batches.get((Track.VIDEO, viewer.layer))
            if batch is not None:  # it rejoins its new layer's batch after a plain send
                batch.remove(viewer)

    def await_keyframe(self, viewer: ViewerSession, layer: int | None) -> None:
        """Hand ``layer``'s next keyframe to ``viewer.switch_up_at`` (None: no layer)."""
        for k, waiting in enumerate(self._awaiting):
            if k == layer:
                waiting.add(viewer)
            else:
                waiting.discard(viewer)

    def viewers_per_layer(self) -> list[int]:
        """Live viewers on each layer, best first (``/api/stats``)."""
        return [len(viewers) for viewers in self._on_layer]

    def layer_state(self) -> tuple[list[float], list[bool]]:
        """Each layer's bitrate, and whether it still flows."""
        newest = max(rate.last_us for rate in self.rates)
        return [r.bitrate for r in self.rates], [r.alive(newest) for r in self.rates]

    def request_keyframe(self, reason: str, layer: int = 0) -> None:
        """Ask the publisher for a keyframe on ``layer`` (any layer of a single-layer
        stream), coalesced per stream and layer (``keyframe_request_interval``)."""
        self.node.keyframes.request(
            self.stream, self.session, reason, layer if self.layer_count > 1 else None
        )

    async def _select_layers(self) -> None:
        """Reconsider each viewer's layer a few times a second (off the frame path)."""
        while True:
            await asyncio.sleep(SELECT_INTERVAL_S)
            bitrates, alive = self.layer_state()
            now = time.monotonic()
            for viewer in list(self.viewers):
                viewer.select_layer(bitrates, alive, now)

    async def _run(self) -> None:
        try:
            async for batch in self._reader.read():
                for item in batch:
                    self._on_frame(item.frame, item.history, item.layer)
        finally:
            await self._reader.stop()

    def _on_frame(self, frame, history: bool, layer: int = 0) -> None:
        if frame.session != self.session:
            return  # an earlier publish of the same stream name
        packetizer = self._packetizers.get((frame.track, layer))
        if packetizer is None:
            return
        prepared = PreparedFrame(
            frame, packetizer.packetize(frame.payload), frame.track is Track.VIDEO
        )
        video = frame.track is Track.VIDEO
        if video:
            gops = self.gops
            if frame.keyframe:
                gops[layer] = [prepared]
            elif gops[layer]:
                gops[layer].append(prepared)
                if len(gops[layer]) > self.node.settings.gop_cache_frames:
                    gops[layer] = []
                    self.gop_overflows += 1
                    self.request_keyframe("cached GOP too long", layer)
        if history:
            return
        self.frames += 1
        if video:
            self.rates[layer].count(len(frame.payload), frame.arrival_us)
            if frame.keyframe and self._awaiting[layer]:
                for viewer in list(self._awaiting[layer]):
                    viewer.switch_up_at(prepared, layer)
            targets = self._on_layer[layer]
            batch = self.batches.get((Track.VIDEO, layer))
        else:
            self.audio_rtp = frame.rtp_timestamp
            targets = self.viewers
            batch = self.batches.get((Track.AUDIO, 0))
        if batch:  # one native call for its members; the Python path for the others
            others = targets.difference(batch.members)
            others.update(batch.send(prepared))
        else:
            others = list(targets)
        for viewer in others:
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
        self.reports = SenderReports(self.native) if self.native is not None else None
        """One timer for the sender reports of all native viewer tracks."""
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
        if self.reports is not None:
            await self.reports.close()

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
        counts = self.viewer_counts()
        for name, fanout in self.fanouts.items():
            totals = fanout.totals()
            lag_records, lag_ms = fanout.lag
            series.add(
                "gauge",
                "whipcast_egress_viewers",
                "Viewers on this node, live or rewound",
                name,
                counts[name],
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
            if fanout.layer_count > 1:
                add_layer_metrics(
                    series,
                    name,
                    fanout.viewers_per_layer(),
                    totals.layer_switches_up,
                    totals.layer_switches_down,
                    totals.layer_failed_ups,
                )

    def forget(self, viewer: ViewerSession) -> None:
        if self.viewers.pop(viewer.resource_id, None) is not None:
            self._departed_octets += sum(s.octets_sent for s in viewer.senders.values())

    def viewer_counts(self) -> collections.Counter[str]:
        """Viewers per stream on this node, following the live edge or rewound (a
        rewound viewer leaves its stream's fan-out but is still watching it)."""
        return collections.Counter(v.stream for v in self.viewers.values())

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
            layers = len(info.layers or ()) if self.settings.viewer_layers else 1
            layers = max(1, min(layers, MAX_VIDEO_LAYERS))
            if fanout is not None and not fanout.viewers and fanout.layer_count != layers:
                await self._end(fanout)  # the publisher's layers changed: read them anew
                fanout = None
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
        back, nothing can be known about streams, so viewers are kept and resume. Nor
        is a stream only not heard from lately ended at once (``SILENT_GRACE_S``).
        """
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            informed = self.bus.reachable and now - self.bus.reachable_since > STALE_AFTER_S
            # A rewound viewer left its fan-out but still watches the stream (and may
            # go back live): the linger counts from when the stream's last viewer left.
            watched = self.viewer_counts()
            for fanout in list(self.fanouts.values()):
                if watched[fanout.stream]:
                    fanout._idle_since = now
                info = self.view.get(fanout.stream)
                ended = informed and (info is None or info.session != fanout.session)
                record = self.view.records.get(fanout.stream)
                if not ended or record is None or record.state != "live":
                    fanout._silent_since = None
                elif record.session == fanout.session:  # live by its record, only silent
                    if fanout._silent_since is None:
                        fanout._silent_since = now
                    ended = now - fanout._silent_since > SILENT_GRACE_S
                idle = not fanout.viewers and now - fanout._idle_since > self.settings.fanout_linger
                if ended or idle:
                    if ended:
                        logger.info(
                            "stream %s ended; closing %d viewers",
                            fanout.stream,
                            len(fanout.viewers),
                        )
                    await self._end(fanout)
