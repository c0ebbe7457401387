"""Per-viewer RTP sending with the per-frame work done once per stream.

A :class:`PreparedFrame` holds a frame's RTP payloads, split once for all viewers, and
caches per :class:`Layout` (payload type and header extensions, which each viewer
negotiates) whole RTP packets with zero sequence number, timestamp and SSRC. Sending
to one viewer is then: copy the packet, write those three fields, SRTP-protect, send.

:class:`FanoutSender` takes aiortc's place as the RTP sender of a viewer's peer
connection: aiortc still negotiates, runs ICE and DTLS and routes RTCP to it, but the
media path below bypasses aiortc's per-packet coroutines (the reason stock senders
top out near 100 viewers per core) and writes straight to the SRTP session and the
ICE pair's socket. It answers NACKs from its own history (RTX when negotiated), within
a per-viewer retransmission budget, and hands PLI/FIR to its viewer. It stamps
abs-send-time (once per frame) when the viewer negotiated it, and passes REMB, receiver
reports to the viewer's ``bandwidth.BandwidthEstimate``.

Below :meth:`FanoutSender.send_frame` sits an optional native core (``gateway/native/``,
the extension module ``whipcast.gateway._fanout``), as aiohttp puts its C parser below an
unchanged interface: per viewer and frame, one call writes the header fields, protects
every packet with SRTP and hands them to the kernel with ``sendmmsg``. Its output is the
pure-Python path's, byte for byte (``tests/test_native_fanout.py``); that path stays as
the fallback where the core was not built, or with ``Settings.no_native_fanout``.
SRTP ownership: a viewer's native :class:`_fanout.Track` protects every packet of its
media SSRC (live frames and non-RTX resends) and every RTCP packet sent from it
(sender reports, BYE: SRTCP's index is per SSRC too); aiortc's libsrtp session keeps
the RTX SSRC, so no SSRC is ever protected by two contexts. Once a track has a native
Track, that Track also keeps the sequence number, the counters and the NACK history,
so a frame sent by ``_fanout.send_batch`` for many viewers at once
(``gateway/batch.py``) needs no Python per viewer; and its sender reports come from
the node's :class:`SenderReports`: one timer, one native call for all viewers.

Each viewer has a :class:`SendBudget`: bytes it may be sent, refilled at the rate its
bandwidth estimate sets. A viewer whose budget is spent is a slow viewer: its frames
wait in the viewer's bounded queue (``egress.ViewerSession``). Budget checks are O(1)
per frame and per resend. Both send paths take a pacer's slice of a frame and stamp
abs-send-time per viewer frame (the native core writes it into each packet itself).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from aiortc import clock
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpByePacket,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    unpack_remb_fci,
)

from . import aiortc_compat, twcc
from .frames import Frame

try:
    from . import _fanout
except ImportError as exc:  # not built: no Rust toolchain when this was installed
    _fanout = None
    _NOT_BUILT = f"the native core was not built ({exc})"

if TYPE_CHECKING:
    from .bandwidth import BandwidthEstimate

logger = logging.getLogger(__name__)
aiortc_compat.keep_transport_feedback()

MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
HISTORY_FRAMES = 256  # frames kept per viewer track for NACK (8 s of 30 fps video)
RESENDS_KEPT = 1024  # resent packets whose resend count is kept
_FIELDS = struct.Struct("!HII")  # sequence number, timestamp, SSRC: RTP bytes 2-11
_SEQ = struct.Struct("!H")
RTX_AGE_FLOOR = 0.2  # s: a resend may be this much older than 3 round trips and still help
RTX_AGE_RTTS = 3
# Mean seconds between sender reports, as libwebrtc sends them: a viewer's reports cost
# the egress a packet each (SRTCP, the ICE socket), as much as a frame of audio.
SR_INTERVAL = {"video": 1.0, "audio": 5.0}


def native_core(disabled: bool = False) -> ModuleType | None:
    """The native fan-out core, or None for the pure-Python path; logs which and why
    (called once per egress node)."""
    if disabled:
        logger.info("egress send path: pure-Python fan-out (native core disabled by setting)")
        return None
    if _fanout is None:
        logger.warning("egress send path: pure-Python fan-out (%s)", _NOT_BUILT)
        return None
    logger.info("egress send path: native fan-out core (SRTP and sendmmsg in %s)", _fanout.__name__)
    return _fanout


@dataclass(frozen=True, slots=True)
class RetransmitPolicy:
    """How much NACK answering one viewer may cost (see ``Settings``)."""

    budget: float = 0.25
    """Retransmitted bytes may add at most this fraction to the media bytes sent."""
    burst: int = 64 * 1024
    """Most retransmission allowance a viewer can save up, in bytes."""
    max_age: float = 1.0
    """No resend of a packet first sent longer ago (tighter once the RTT is known)."""
    max_resends: int = 3
    """Resends of one packet at most."""


class SendBudget:
    """A token bucket of bytes: refills at ``rate`` up to ``burst``. A frame is never
    split, so a send may overdraw it; nothing more goes out until the debt is repaid.

    What the viewer's native tracks send they count themselves (``attach``); the bucket
    reads their counters when asked, so a frame sent in a native batch costs no Python
    here. A batch sends a track frames while its ``allowance`` (the tokens there were
    when it joined) lasts; a lower rate takes that allowance back at once."""

    __slots__ = ("_rate", "burst", "_spent", "_tokens", "_at", "_tracks", "_seen")

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self.burst = burst
        self._spent = 0
        self._tokens = burst
        self._at = time.monotonic()
        self._tracks: list = []  # native Tracks whose octets_sent count here
        self._seen = 0  # their octets already taken from the bucket

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, rate: float) -> None:
        if rate < self._rate:
            for track in self._tracks:
                track.allowance = 0  # batches pass it by: Python looks again
        self._rate = rate

    @property
    def spent(self) -> int:
        """Bytes spent so far (the viewer's sent rate, for its bandwidth estimate)."""
        self._sync()
        return self._spent

    def attach(self, track) -> None:
        """A native track of this viewer: its sends count against this budget."""
        self._tracks.append(track)
        self._seen += track.octets_sent

    def _sync(self) -> None:
        if self._tracks:
            total = sum(t.octets_sent for t in self._tracks)
            if total != self._seen:
                self._tokens -= total - self._seen
                self._spent += total - self._seen
                self._seen = total

    def tokens(self, now: float) -> float:
        """Bytes that may be sent now (spending below 0 is a debt)."""
        self._sync()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        return self._tokens

    def available(self, now: float) -> bool:
        return self.tokens(now) > 0

    def refill(self, now: float) -> None:
        """Forgive the debt: a fresh start at the current rate (a probe's)."""
        self._sync()
        self._tokens, self._at = self.burst, now

    def spend(self, octets: int) -> None:
        self._tokens -= octets
        self._spent += octets


@dataclass(frozen=True, slots=True)
class Layout:
    """What a viewer negotiated that shapes the RTP header; shared by most viewers."""

    payload_type: int
    mid_id: int | None
    mid: str | None
    abs_send_time_id: int | None = None
    """abs-send-time goes first in the extension block, so its 3 bytes sit at a fixed
    place that a viewer's send fills in (its REMB estimate needs it)."""
    transport_cc_id: int | None = None
    """transport-cc's element (its id byte and the 2-byte transport-wide sequence
    number) follows abs-send-time, so the per-packet bytes are one run."""

    def header(self, marker: bool) -> bytes:
        elements = b""
        if self.abs_send_time_id is not None:
            elements += bytes([(self.abs_send_time_id << 4) | 2]) + b"\x00\x00\x00"
        if self.transport_cc_id is not None:
            elements += twcc.stamp_element(self.transport_cc_id) + b"\x00\x00"
        if self.mid_id is not None and self.mid:
            elements += bytes([(self.mid_id << 4) | (len(self.mid) - 1)]) + self.mid.encode()
        ext = b""
        if elements:
            elements += b"\x00" * (-len(elements) % 4)
            ext = b"\xbe\xde" + _SEQ.pack(len(elements) // 4) + elements
        first = 0x90 if ext else 0x80
        second = (0x80 if marker else 0) | self.payload_type
        return bytes([first, second]) + b"\x00" * 10 + ext

    @property
    def extension_size(self) -> int:
        return len(self.header(False)) - 12

    @property
    def hole(self) -> tuple[int, int]:
        """(offset in bytes 12-end, length) of the per-packet bytes a send writes:
        the abs-send-time value, then transport-cc's whole element."""
        at = _AST_AT if self.abs_send_time_id is not None else 4
        size = (3 if self.abs_send_time_id is not None else 0) + (
            3 if self.transport_cc_id is not None else 0
        )
        return at, size


# Where the abs-send-time value lies in a packet's bytes 12-end: after the extension
# profile and length (4 bytes) and the element's id/length byte.
_AST_AT = 5


def abs_send_time(now: float) -> int:
    """The 24-bit abs-send-time value (6.18 fixed-point seconds, wrapping every 64 s);
    only differences matter to the receiver, so any monotonic clock serves."""
    return int(now * 262144) & 0xFFFFFF


_AST = struct.Struct("!I")  # abs-send-time: the low 3 bytes of this


Packet = tuple[bytes, bytes, bytes]
"""(bytes 0-1, bytes 12 up to the per-packet stamp, the rest): a viewer's sequence
number, timestamp and SSRC go after the first; its abs-send-time value and
transport-cc element (``Layout.hole``) after the second."""


@dataclass(slots=True)
class PreparedFrame:
    frame: Frame
    payloads: list[bytes]
    marker_last: bool
    _packets: dict[Layout, list[Packet]] = field(default_factory=dict)
    _native: dict[Layout, object] = field(default_factory=dict)

    def packets(self, layout: Layout) -> list[Packet]:
        """RTP packets for ``layout``, built once and shared by its viewers."""
        built = self._packets.get(layout)
        if built is None:
            last = len(self.payloads) - 1
            plain = layout.header(False)
            marked = layout.header(True) if self.marker_last else plain
            ext = plain[12:]
            at, size = layout.hole
            if not size:
                before, after = ext, b""
            else:
                before, after = ext[:at], ext[at + size :]
            built = [
                ((marked if i == last else plain)[:2], before, after + payload)
                for i, payload in enumerate(self.payloads)
            ]
            self._packets[layout] = built
        return built

    def native_packets(self, layout: Layout, core: ModuleType):
        """:meth:`packets` as the native core's ``Packets``, built once per layout."""
        built = self._native.get(layout)
        if built is None:
            stamped = layout.abs_send_time_id is not None
            built = self._native[layout] = core.Packets(
                self.packets(layout), stamped, layout.transport_cc_id
            )
        return built


class FanoutSender(RTCRtpSender):
    """One track of one viewer: header fields, SRTP and the send are all it does."""

    def __init__(
        self,
        kind: str,
        transport,
        on_keyframe_request: Callable[[str], None],
        budget: SendBudget,
        retransmit: RetransmitPolicy,
        native: ModuleType | None = None,
        reports: SenderReports | None = None,
    ) -> None:
        super().__init__(kind, transport)
        self._on_keyframe_request = on_keyframe_request
        self.ssrc, self.rtx_ssrc = aiortc_compat.sender_ssrcs(self)
        self.budget = budget
        self.retransmit_policy = retransmit
        self.layout: Layout | None = None
        self.clock_rate = 90000
        self.ready = asyncio.Event()
        self._rtx_pt: int | None = None
        self._cname = ""
        self._py_seq = random.randint(0, 0x7FFF)  # low half: avoids early SRTP rollover
        self._rtx_seq = random.randint(0, 0x7FFF)
        # Per frame the pure-Python path sent: (first sequence number, its packets,
        # timestamp, monotonic time, send id); a native track keeps its own history.
        self._history: collections.deque[tuple[int, list[Packet], int, float, int]]
        self._history = collections.deque(maxlen=HISTORY_FRAMES)
        # Resends per packet, kept only for packets resent (nothing per packet sent).
        self._resends: dict[int, tuple[int, int]] = {}  # seq: (send id, resends)
        self._native = native
        self._reports = reports  # the node's report timer for native tracks
        self._track = None  # native core's Track: SRTP state of self.ssrc, once routed
        self._track_transport = None
        self._direct = False
        self._rtx_allowance = 0.0
        self._rtx_seen = 0  # octets_sent when the allowance was last brought up to date
        self._rtcp_task: asyncio.Task | None = None
        self._last_ts = 0
        self._last_arrival_us = 0
        # Replay (gateway/playback.py) re-bases a viewer's timeline: added to each frame's
        # RTP timestamp and arrival time; both stay 0 for live viewers.
        self.ts_offset = 0
        self.clock_shift_us = 0
        # Sent by the pure-Python path; the native track counts its own.
        self._py_packets = 0
        self._py_octets = 0
        self.retransmitted = 0
        self.retransmitted_octets = 0
        self.retransmit_refused: collections.Counter[str] = collections.Counter()
        """Resends refused, by reason: ``budget``, ``age``, ``repeat``."""
        self.nacks_received = 0
        self.rtt: float | None = None
        self.fraction_lost = 0
        self.estimate: BandwidthEstimate | None = None
        """Set on a viewer's video sender: its feedback feeds the viewer's estimate."""
        self.send_log: twcc.SendLog | None = None
        """The viewer's transport-wide sequence numbers (one log for all its senders),
        where it negotiated transport-cc."""
        self.on_transport_feedback: Callable[[twcc.Summary], None] | None = None
        """Where the viewer's transport-cc feedback goes (it may name any of its SSRCs)."""
        self._twcc_element = b""

    async def send(self, parameters: RTCRtpSendParameters) -> None:
        """Called by aiortc once DTLS is up: note what was negotiated and go live."""
        if self.layout is not None:
            return
        codec = parameters.codecs[0]
        self.clock_rate = codec.clockRate
        for c in parameters.codecs[1:]:
            if c.mimeType.lower().endswith("/rtx") and c.parameters.get("apt") == codec.payloadType:
                self._rtx_pt = c.payloadType
        ids = {e.uri: e.id for e in parameters.headerExtensions}
        twcc_id = ids.get(twcc.URI) if self.send_log is not None else None
        self.layout = Layout(
            codec.payloadType,
            ids.get(MID_URI),
            parameters.muxId,
            ids.get(ABS_SEND_TIME_URI),
            twcc_id,
        )
        if twcc_id is not None:
            self._twcc_element = twcc.stamp_element(twcc_id)
        self._cname = parameters.rtcp.cname or ""
        aiortc_compat.register_sender(self.transport, self, parameters)
        self._rtcp_task = asyncio.create_task(self._run_rtcp())
        self.ready.set()

    async def stop(self) -> None:
        if self._track is not None:
            if self._reports is not None:
                self._reports.remove(self._track)
            self._track.unroute()  # its duplicate of the ICE socket closes now, not at GC
            self._direct = False
        if self._rtcp_task is not None:
            aiortc_compat.unregister_sender(self.transport, self)
            self._rtcp_task.cancel()
            await asyncio.gather(self._rtcp_task, return_exceptions=True)
            self._rtcp_task = None
            await self._send_rtcp(bytes(RtcpByePacket(sources=[self.ssrc])))

    @property
    def _seq(self) -> int:
        track = self._track
        return self._py_seq if track is None else track.seq

    @_seq.setter
    def _seq(self, seq: int) -> None:
        if self._track is None:
            self._py_seq = seq
        else:
            self._track.seq = seq

    @property
    def next_seq(self) -> int:
        """The RTP sequence number the next media packet gets."""
        return self._seq

    @property
    def packets_sent(self) -> int:
        track = self._track
        return self._py_packets + (track.packets_sent if track is not None else 0)

    @property
    def octets_sent(self) -> int:
        """RTP bytes past the fixed 12-byte headers sent (what sender reports count)."""
        track = self._track
        return self._py_octets + (track.octets_sent if track is not None else 0)

    @property
    def batch_frames(self) -> int:
        """Frames a native batch (``egress.StreamFanout``) sent this track."""
        track = self._track
        return track.batch_frames if track is not None else 0

    def batch_track(self, max_packets: int, budgeted: bool):
        """This track's native Track, set up for ``_fanout.send_batch``; None where a
        batch may not send it frames (no direct route, a socket backlog, or, where
        ``budgeted``, no budget left). A batch sends it frames of up to ``max_packets``
        packets (0: any) while the budget's tokens of now last."""
        track, route = self._track, aiortc_compat.media_route(self.transport)
        if (
            track is None
            or not self._direct
            or route is None
            or route[0] is not self._track_transport
            or route[0].get_write_buffer_size()
        ):
            return None
        allowance = self.budget.tokens(time.monotonic()) if budgeted else 1 << 62
        if allowance <= 0:
            return None
        track.allowance = int(allowance)
        track.max_packets = max_packets
        track.ts_offset = self.ts_offset & 0xFFFFFFFF
        track.arrival_shift_us = self.clock_shift_us
        return track

    def queue_unsent(self, packets: list[bytes]) -> None:
        """Protected packets a batch could not send (the socket was full), in order."""
        route = aiortc_compat.media_route(self.transport)
        if route is not None:
            transport, addr = route
            for packet in packets:
                transport.sendto(packet, addr)

    def writable(self) -> bool:
        """Connected, the socket has no backlog and the viewer's budget is not spent
        (either means a slow path: the caller queues instead)."""
        route = aiortc_compat.media_route(self.transport)
        return (
            route is not None
            and route[0].get_write_buffer_size() == 0
            and self.budget.available(time.monotonic())
        )

    def send_frame(
        self,
        prepared: PreparedFrame,
        timestamp: int | None = None,
        first: int = 0,
        end: int | None = None,
    ) -> None:
        """Send one prepared frame (``timestamp`` overrides the frame's, for fast start),
        or its packets ``first`` to ``end`` (a pacer's slice)."""
        route = aiortc_compat.media_route(self.transport)
        if route is None or self.layout is None:
            return
        packets = prepared.packets(self.layout)
        if first or end is not None:
            packets = packets[first:end]
        if timestamp is None:
            timestamp = (prepared.frame.rtp_timestamp + self.ts_offset) & 0xFFFFFFFF
        ts = timestamp
        now = time.monotonic()
        stamped = self.layout.abs_send_time_id is not None
        log = self.send_log if self.layout.transport_cc_id is not None else None
        track = self._native_track(route) if self._native is not None else None
        if track is not None:  # it counts, keeps history and moves the sequence on
            native = prepared.native_packets(self.layout, self._native)
            sent_at = abs_send_time(now) if stamped else None
            transport, addr = route
            seq = track.seq
            if not self._direct or transport.get_write_buffer_size():
                # behind the queue, in order
                unsent = track.protect_frame(native, seq, ts, first, end, sent_at)
            else:
                unsent = track.send(native, seq, ts, first, end, sent_at)
            if unsent:
                for packet in unsent:  # the socket was full: queue the rest
                    transport.sendto(packet, addr)
            track.last_arrival_us = prepared.frame.arrival_us + self.clock_shift_us
            return
        seq = self._py_seq
        sent_at = _AST.pack(abs_send_time(now))[1:] if stamped else b""
        octets = self._send_python(route, packets, seq, ts, sent_at, log)
        self._history.append((seq, packets, ts, now, self._py_packets))
        self._py_packets += len(packets)
        self._py_octets += octets
        self.budget.spend(octets)
        self._last_ts = ts
        self._last_arrival_us = prepared.frame.arrival_us + self.clock_shift_us

    def _send_python(
        self, route, packets: list[Packet], seq: int, ts: int, sent_at: bytes, log
    ) -> int:
        """The pure-Python send path: per packet, header fields, libsrtp, ``sendto``
        (and, for transport-cc, a transport-wide number from the viewer's log)."""
        sock, addr = route
        protect = aiortc_compat.srtp_protect(self.transport)
        ssrc, pack, join, sendto = self.ssrc, _FIELDS.pack, b"".join, sock.sendto
        octets = 0
        if log is None:
            for head, before, after in packets:
                packet = join((head, pack(seq, ts, ssrc), before, sent_at, after))
                sendto(protect(packet), addr)
                octets += len(packet) - 12
                seq = (seq + 1) & 0xFFFF
        else:
            stamp, take, now_us, number = sent_at + self._twcc_element, log.take, 0, _SEQ.pack
            now_us = twcc.monotonic_us()
            for head, before, after in packets:
                size = 14 + len(before) + len(stamp) + len(after)
                tseq = number(take(size, now_us))
                packet = join((head, pack(seq, ts, ssrc), before, stamp, tseq, after))
                sendto(protect(packet), addr)
                octets += len(packet) - 12
                seq = (seq + 1) & 0xFFFF
        self._py_seq = seq
        return octets

    def _native_track(self, route):
        """This viewer's native Track, routed to ``route``'s socket (``_direct``) where
        it can be; None where the native core cannot protect its packets (then the
        pure-Python path serves it, for good: an SSRC never changes SRTP context)."""
        transport, addr = route
        if self._track_transport is not transport:
            if self._track is None:
                try:
                    profile, key = aiortc_compat.srtp_tx_key(self.transport)
                    track = self._native.Track(profile, key, self.ssrc, HISTORY_FRAMES)
                    if self.send_log is not None:
                        track.log_to(self.send_log)
                except ValueError as exc:
                    logger.warning("pure-Python send path for a viewer track: %s", exc)
                    self._native = None
                    return None
                track.seq = self._py_seq
                track.clock_rate = self.clock_rate
                track.cname = self._cname[:255]
                self._track = track  # from now on every packet of self.ssrc is its
                self.budget.attach(track)
                self.transport.on("statechange", self._on_dtls_state)
            try:
                self._track.route(transport.get_extra_info("socket").fileno(), addr[0], addr[1])
                self._direct = True
            except (ValueError, OSError, AttributeError) as exc:
                logger.warning("a viewer track is sent through its transport: %s", exc)
                self._direct = False
            self._track_transport = transport
        return self._track

    def continue_with(self, frame: Frame, ticks: int = 1) -> None:
        """Re-base ``ts_offset`` so that ``frame`` follows the last frame sent by the
        ingest arrival time between them, and at least ``ticks`` later: for a switch
        of simulcast layer, whose RTP timestamps start from unrelated origins."""
        if not self.packets_sent:
            return
        last_ts, last_arrival_us = self._last_sent()
        elapsed_us = frame.arrival_us + self.clock_shift_us - last_arrival_us
        ticks = max(ticks, elapsed_us * self.clock_rate // 1_000_000)
        self.ts_offset = (last_ts + ticks - frame.rtp_timestamp) & 0xFFFFFFFF

    def _on_dtls_state(self) -> None:
        """DTLS is gone: the native track stops sending (batches pass it by)."""
        if self.transport.state != "connected" and self._track is not None:
            self._track.unroute()
            self._direct = False

    def _last_sent(self) -> tuple[int, int]:
        """(RTP timestamp, ingest arrival µs on this viewer's clock) of the last frame."""
        track = self._track
        if track is not None:
            return track.last_ts, track.last_arrival_us
        return self._last_ts, self._last_arrival_us

    @property
    def last_timestamp(self) -> int | None:
        """RTP timestamp of the last frame sent (None before the first)."""
        return self._last_sent()[0] if self.packets_sent else None

    def _retransmit_deadline(self) -> float:
        policy = self.retransmit_policy
        if self.rtt is None:
            return policy.max_age
        return min(policy.max_age, RTX_AGE_FLOOR + RTX_AGE_RTTS * self.rtt)

    def _find(self, seq: int) -> tuple[int, bytes, bytes, bytes, int, float] | None:
        """The newest packet sent with ``seq``, from the history: (send id, bytes 0-1,
        bytes 12 up to the abs-send-time value, the rest, timestamp, send time)."""
        track = self._track
        if track is not None:
            found = track.find(seq)
            if found is None:
                return None
            key, head, rest, ts, sent_at = found
            if self.layout is not None and self.layout.abs_send_time_id is not None:
                return key, head, rest[:_AST_AT], rest[_AST_AT + 3 :], ts, sent_at
            return key, head, rest, b"", ts, sent_at
        for first, packets, ts, sent_at, key in reversed(self._history):
            index = (seq - first) & 0xFFFF
            if index < len(packets):
                return (key, *packets[index], ts, sent_at)
        return None

    def _rtx_room(self) -> float:
        """Bytes of resends allowed now: ``budget`` of each byte sent since the last
        look, up to ``burst`` (the same as adding it per frame sent)."""
        policy, octets = self.retransmit_policy, self.octets_sent
        gained = (octets - self._rtx_seen) * policy.budget
        self._rtx_seen = octets
        self._rtx_allowance = min(policy.burst, self._rtx_allowance + gained)
        return self._rtx_allowance

    def _retransmit(self, seq: int, now: float, deadline: float) -> None:
        """Resend one packet the viewer NACKed, unless it is unknown, was resent
        enough, is too old to arrive in time, or the viewer's allowance is spent."""
        found = self._find(seq)
        route = aiortc_compat.media_route(self.transport)
        if found is None or route is None or self.layout is None:
            return
        key, head, before, after, ts, sent_at = found
        layout = self.layout
        if layout.abs_send_time_id is not None:
            before += _AST.pack(abs_send_time(now))[1:]
        log = self.send_log if layout.transport_cc_id is not None else None
        if log is not None:
            before += self._twcc_element
        rest = before + after
        resent_key, resends = self._resends.get(seq, (None, 0))
        if resent_key != key:
            resends = 0  # the count was for an older packet with this sequence number
        if resends >= self.retransmit_policy.max_resends:
            self.retransmit_refused["repeat"] += 1
            return
        if now - sent_at > deadline:
            self.retransmit_refused["age"] += 1
            return
        if self._rtx_room() < len(rest):
            self.retransmit_refused["budget"] += 1
            return
        if log is not None:  # a resend is a packet of its own on the transport
            size = 14 + len(rest) + (2 if self._rtx_pt is not None else 0)
            tseq = _SEQ.pack(log.take(size, twcc.monotonic_us()))
            rest = before + tseq + after
        if len(self._resends) >= RESENDS_KEPT:
            self._resends.clear()  # bounded; packets this old are refused for age anyway
        self._resends[seq] = (key, resends + 1)
        self._rtx_allowance -= len(rest)
        self.budget.spend(len(rest))
        self.retransmitted_octets += len(rest)
        if self._rtx_pt is not None:
            # RFC 4588: RTX payload type and SSRC, own sequence, original seq first.
            ext_size = layout.extension_size
            head = bytes([head[0], (head[1] & 0x80) | self._rtx_pt])
            fields = _FIELDS.pack(self._rtx_seq, ts, self.rtx_ssrc)
            rest = rest[:ext_size] + _SEQ.pack(seq) + rest[ext_size:]
            self._rtx_seq = (self._rtx_seq + 1) & 0xFFFF
            protect = aiortc_compat.srtp_protect(self.transport)  # RTX SSRC: libsrtp's
        else:
            fields = _FIELDS.pack(seq, ts, self.ssrc)
            # The media SSRC's SRTP context: the native track's once it has one.
            track = self._track
            protect = track.protect if track else aiortc_compat.srtp_protect(self.transport)
        sock, addr = route
        sock.sendto(protect(head + fields + rest), addr)
        self.retransmitted += 1

    async def _handle_rtcp_packet(self, packet) -> None:
        """aiortc's entry point (datagrams its receive task still reads)."""
        self.rtcp_received(packet)

    def rtcp_received(self, packet) -> None:
        """The direct receive path's entry point (``aiortc_compat.DirectReceive``)."""
        estimate = self.estimate
        if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            self.nacks_received += 1
            now, deadline = time.monotonic(), self._retransmit_deadline()
            if estimate is not None:
                estimate.on_nack(packet.lost, self._seq, now)
            for seq in packet.lost:
                self._retransmit(seq, now, deadline)
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == twcc.FMT:
            fci = aiortc_compat.transport_feedback_fci(packet)
            log = self.send_log
            if fci is not None and log is not None and self.on_transport_feedback is not None:
                try:
                    feedback = log.summarize(fci)  # native where the log is: one call
                except ValueError as exc:
                    logger.debug("malformed transport-cc feedback: %s", exc)
                    return
                self.on_transport_feedback(feedback)
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            self._on_keyframe_request("FIR" if packet.fmt == RTCP_PSFB_FIR else "PLI")
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            # REMB: this viewer's own estimate; it never goes on to the publisher.
            if estimate is not None:
                try:
                    bitrate, _ = unpack_remb_fci(packet.fci)
                except ValueError:
                    return
                estimate.on_remb(bitrate, time.monotonic())
        elif isinstance(packet, RtcpRrPacket | RtcpSrPacket):
            for report in packet.reports:
                if report.ssrc == self.ssrc:
                    self.fraction_lost = report.fraction_lost
                    if report.lsr and report.dlsr:
                        now = (clock.current_ntp_time() >> 16) & 0xFFFFFFFF
                        self.rtt = max(0.0, ((now - report.lsr - report.dlsr) & 0xFFFFFFFF) / 65536)
                    if estimate is not None:
                        estimate.on_receiver_report(
                            report.fraction_lost, time.monotonic(), report.highest_sequence
                        )

    async def _run_rtcp(self) -> None:
        """Sender reports map RTP time to wall-clock time (players need it for A/V sync).

        The mapping uses each frame's ingest arrival time, so audio and video of one
        publisher share one clock however far apart they were read from Kafka. The first
        report goes out within 1.5 s for either kind (the player syncs from then on),
        later ones every ``SR_INTERVAL`` x 0.5-1.5 (RFC 3550's randomisation). A track
        with a direct native route, due for its first report, is handed to the node's
        :class:`SenderReports` instead (which sends that report at once and the rest
        from its one timer, one native call for all viewers), and this task ends.
        """
        interval = 1.0
        while True:
            await asyncio.sleep(interval * (0.5 + random.random()))
            last_ts, last_arrival_us = self._last_sent()
            if not last_arrival_us:
                continue
            track = self._track
            if track is not None and self._direct and self._reports is not None:
                track.report_interval = SR_INTERVAL.get(self.kind, 1.0)
                track.next_report = 0.0  # due now: this first one goes at once
                self._reports.add(track)
                return
            now_us = time.time_ns() // 1000
            elapsed = (now_us - last_arrival_us) / 1e6
            rtp_ts = (last_ts + int(elapsed * self.clock_rate)) & 0xFFFFFFFF
            report = sender_report(
                self.ssrc,
                ntp_time(now_us),
                rtp_ts,
                self.packets_sent,
                self.octets_sent,
                self._cname.encode(),
            )
            await self._send_rtcp(report)
            interval = SR_INTERVAL.get(self.kind, 1.0)

    async def _send_rtcp(self, data: bytes) -> None:
        """Send compound RTCP from this sender's SSRC: SRTCP-protected by its native
        track where it has one (that track owns the SSRC's SRTCP index), else by
        aiortc's libsrtp."""
        track = self._track
        if track is None:
            try:
                await aiortc_compat.send_rtcp(self.transport, data)
            except ConnectionError:
                pass
            return
        route = aiortc_compat.media_route(self.transport)
        if route is not None:
            transport, addr = route
            transport.sendto(track.protect_rtcp(data), addr)


_SR = struct.Struct("!BBHIQIII")  # SR header, SSRC, NTP time, RTP time, packets, octets
_SDES = struct.Struct("!BBHIBB")  # SDES header, chunk's SSRC, CNAME item type and length
NTP_UNIX_OFFSET = 2_208_988_800  # s from 1900 (NTP's epoch) to 1970


def ntp_time(now_us: int) -> int:
    """64-bit NTP time of ``now_us`` µs after the Unix epoch (aiortc's
    ``clock.current_ntp_time()`` of that instant)."""
    seconds, micros = divmod(now_us, 1_000_000)
    return ((seconds + NTP_UNIX_OFFSET) << 32) | ((micros << 32) // 1_000_000)


def sender_report(
    ssrc: int, ntp: int, rtp_ts: int, packets: int, octets: int, cname: bytes
) -> bytes:
    """A sender report and an SDES CNAME chunk, byte for byte aiortc's
    ``RtcpSrPacket`` + ``RtcpSdesPacket`` (built with ``struct``: a report costs no
    objects), and what the native core's ``Track.report`` builds."""
    pad = -(4 + 2 + len(cname) + 2) % 4 + 2
    chunk_words = (4 + 2 + len(cname) + pad) // 4
    return b"".join(
        (
            _SR.pack(0x80, 200, 6, ssrc, ntp, rtp_ts, packets & 0xFFFFFFFF, octets & 0xFFFFFFFF),
            _SDES.pack(0x81, 202, chunk_words, ssrc, 1, len(cname)),
            cname,
            bytes(pad),
        )
    )


REPORT_TICK = 0.2
"""Seconds between looks for native tracks' due sender reports (each report's time is
randomised far more than this anyway). Each look wakes the event loop, which on a VM
costs more than the reports it sends (``bench/sender_report_cost.py``)."""


class SenderReports:
    """The sender reports of every native track of an egress node with one timer: each
    tick, one ``_fanout.send_reports`` call builds, SRTCP-protects and sends the
    reports that are due, so a viewer's reports cost no task, no Python objects and no
    libsrtp or aioice call. A track leaves when its sender stops or its route is gone
    (DTLS closed); the timer runs while there are tracks."""

    def __init__(self, core: ModuleType) -> None:
        self._core = core
        self._tracks: list = []
        self._task: asyncio.Task | None = None
        self.sent = 0
        """Reports sent (for tests and benchmarks)."""

    def __len__(self) -> int:
        return len(self._tracks)

    def add(self, track) -> None:
        """Report for ``track`` (a routed ``_fanout.Track``) from now on, starting with
        one at its ``next_report``."""
        self._tracks.append(track)
        self._send()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sender-reports")

    def remove(self, track) -> None:
        if track in self._tracks:
            self._tracks.remove(track)

    async def _run(self) -> None:
        try:
            while self._tracks:
                await asyncio.sleep(REPORT_TICK)
                self._send()
        finally:
            self._task = None

    def _send(self) -> None:
        sent, gone = self._core.send_reports(self._tracks)
        self.sent += sent
        if gone:
            dropped = set(gone)
            self._tracks = [t for i, t in enumerate(self._tracks) if i not in dropped]

    async def close(self) -> None:
        self._tracks.clear()
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
