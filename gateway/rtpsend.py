"""Per-viewer RTP sending with the per-frame work done once per stream.

A :class:`PreparedFrame` holds a frame's RTP payloads, split once for all viewers, and
caches per :class:`Layout` (payload type and header extensions, which each viewer
negotiates) whole RTP packets with zero sequence number, timestamp and SSRC. Sending
to one viewer is then: copy the packet, write those three fields, SRTP-protect, send.

:class:`FanoutSender` takes aiortc's place as the RTP sender of a viewer's peer
connection: aiortc still negotiates, runs ICE and DTLS and routes RTCP to it, but the
media path below bypasses aiortc's per-packet coroutines (the reason stock senders
top out near 100 viewers per core) and writes straight to the SRTP session and the
ICE pair's socket. It answers NACKs from its own history (RTX when negotiated) and
passes PLI/FIR upstream through its viewer.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiortc import clock
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import (
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpByePacket,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSdesPacket,
    RtcpSenderInfo,
    RtcpSourceInfo,
    RtcpSrPacket,
)

from .frames import Frame

MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
HISTORY_SIZE = 1024  # packets kept per viewer track for NACK (about 5 s of 720p video)
_FIELDS = struct.Struct("!HII")  # sequence number, timestamp, SSRC: RTP bytes 2-11
_SEQ = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Layout:
    """What a viewer negotiated that shapes the RTP header; shared by most viewers."""

    payload_type: int
    mid_id: int | None
    mid: str | None

    def header(self, marker: bool) -> bytes:
        ext = b""
        if self.mid_id is not None and self.mid:
            element = bytes([(self.mid_id << 4) | (len(self.mid) - 1)]) + self.mid.encode()
            element += b"\x00" * (-len(element) % 4)
            ext = b"\xbe\xde" + _SEQ.pack(len(element) // 4) + element
        first = 0x90 if ext else 0x80
        second = (0x80 if marker else 0) | self.payload_type
        return bytes([first, second]) + b"\x00" * 10 + ext


@dataclass(slots=True)
class PreparedFrame:
    frame: Frame
    payloads: list[bytes]
    marker_last: bool
    _packets: dict[Layout, list[tuple[bytes, bytes]]] = field(default_factory=dict)

    def packets(self, layout: Layout) -> list[tuple[bytes, bytes]]:
        """RTP packets for ``layout``, built once and shared by its viewers, each as
        (bytes 0-1, bytes 12-end): a viewer's sequence number, timestamp and SSRC go
        in between."""
        built = self._packets.get(layout)
        if built is None:
            last = len(self.payloads) - 1
            plain = layout.header(False)
            marked = layout.header(True) if self.marker_last else plain
            built = [
                ((marked if i == last else plain)[:2], plain[12:] + payload)
                for i, payload in enumerate(self.payloads)
            ]
            self._packets[layout] = built
        return built


class FanoutSender(RTCRtpSender):
    """One track of one viewer: header fields, SRTP and the send are all it does."""

    def __init__(self, kind: str, transport, on_keyframe_request: Callable[[str], None]) -> None:
        super().__init__(kind, transport)
        self._on_keyframe_request = on_keyframe_request
        self.layout: Layout | None = None
        self.clock_rate = 90000
        self.ready = asyncio.Event()
        self._rtx_pt: int | None = None
        self._cname = ""
        self._seq = random.randint(0, 0x7FFF)  # low half: avoids early SRTP rollover
        self._rtx_seq = random.randint(0, 0x7FFF)
        self._history: list[tuple[int, tuple[bytes, bytes], int] | None] = [None] * HISTORY_SIZE
        self._rtcp_task: asyncio.Task | None = None
        self._last_ts = 0
        self._last_arrival_us = 0
        # Replay (gateway/playback.py) re-bases a viewer's timeline: added to each frame's
        # RTP timestamp and arrival time; both stay 0 for live viewers.
        self.ts_offset = 0
        self.clock_shift_us = 0
        self.packets_sent = 0
        self.octets_sent = 0
        self.retransmitted = 0
        self.nacks_received = 0
        self.rtt: float | None = None
        self.fraction_lost = 0

    async def send(self, parameters: RTCRtpSendParameters) -> None:
        """Called by aiortc once DTLS is up: note what was negotiated and go live."""
        if self.layout is not None:
            return
        codec = parameters.codecs[0]
        self.clock_rate = codec.clockRate
        for c in parameters.codecs[1:]:
            if c.mimeType.lower().endswith("/rtx") and c.parameters.get("apt") == codec.payloadType:
                self._rtx_pt = c.payloadType
        mid_id = next((e.id for e in parameters.headerExtensions if e.uri == MID_URI), None)
        self.layout = Layout(codec.payloadType, mid_id, parameters.muxId)
        self._cname = parameters.rtcp.cname or ""
        self.transport._register_rtp_sender(self, parameters)
        self._rtcp_task = asyncio.create_task(self._run_rtcp())
        self.ready.set()

    async def stop(self) -> None:
        if self._rtcp_task is not None:
            self.transport._unregister_rtp_sender(self)
            self._rtcp_task.cancel()
            await asyncio.gather(self._rtcp_task, return_exceptions=True)
            self._rtcp_task = None
            await self._send_rtcp([RtcpByePacket(sources=[self._ssrc])])

    def writable(self) -> bool:
        """Connected, and the socket has no backlog (a backlog means a slow path)."""
        route = self._route()
        return route is not None and route[0].get_write_buffer_size() == 0

    def _route(self):
        dtls = self.transport
        if dtls._state is not DtlsState.CONNECTED:
            return None
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None:
            return None
        return pair.protocol.transport, pair.remote_addr

    def send_frame(self, prepared: PreparedFrame, timestamp: int | None = None) -> None:
        """Send one prepared frame (``timestamp`` overrides the frame's, for fast start)."""
        route = self._route()
        if route is None or self.layout is None:
            return
        sock, addr = route
        protect = self.transport._tx_srtp.protect
        packets = prepared.packets(self.layout)
        if timestamp is None:
            timestamp = (prepared.frame.rtp_timestamp + self.ts_offset) & 0xFFFFFFFF
        ts = timestamp
        seq, ssrc, history, pack = self._seq, self._ssrc, self._history, _FIELDS.pack
        join, sendto = b"".join, sock.sendto
        octets = 0
        for packet in packets:
            head, rest = packet
            history[seq % HISTORY_SIZE] = (seq, packet, ts)
            sendto(protect(join((head, pack(seq, ts, ssrc), rest))), addr)
            octets += len(rest)
            seq = (seq + 1) & 0xFFFF
        self._seq = seq
        self.packets_sent += len(packets)
        self.octets_sent += octets
        self._last_ts = ts
        self._last_arrival_us = prepared.frame.arrival_us + self.clock_shift_us

    @property
    def last_timestamp(self) -> int:
        """RTP timestamp of the last frame sent (what a re-based timeline continues)."""
        return self._last_ts

    def _retransmit(self, seq: int) -> None:
        entry = self._history[seq % HISTORY_SIZE]
        route = self._route()
        if entry is None or entry[0] != seq or route is None or self.layout is None:
            return
        _, (head, rest), ts = entry
        if self._rtx_pt is not None:
            # RFC 4588: RTX payload type and SSRC, own sequence, original seq first.
            ext_size = len(self.layout.header(False)) - 12
            head = bytes([head[0], (head[1] & 0x80) | self._rtx_pt])
            fields = _FIELDS.pack(self._rtx_seq, ts, self._rtx_ssrc)
            rest = rest[:ext_size] + _SEQ.pack(seq) + rest[ext_size:]
            self._rtx_seq = (self._rtx_seq + 1) & 0xFFFF
        else:
            fields = _FIELDS.pack(seq, ts, self._ssrc)
        sock, addr = route
        sock.sendto(self.transport._tx_srtp.protect(head + fields + rest), addr)
        self.retransmitted += 1

    async def _handle_rtcp_packet(self, packet) -> None:
        if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            self.nacks_received += 1
            for seq in packet.lost:
                self._retransmit(seq)
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            self._on_keyframe_request("FIR" if packet.fmt == RTCP_PSFB_FIR else "PLI")
        elif isinstance(packet, RtcpRrPacket | RtcpSrPacket):
            for report in packet.reports:
                if report.ssrc == self._ssrc:
                    self.fraction_lost = report.fraction_lost
                    if report.lsr and report.dlsr:
                        now = (clock.current_ntp_time() >> 16) & 0xFFFFFFFF
                        self.rtt = max(0.0, ((now - report.lsr - report.dlsr) & 0xFFFFFFFF) / 65536)

    async def _run_rtcp(self) -> None:
        """Sender reports map RTP time to wall-clock time (players need it for A/V sync).

        The mapping uses each frame's ingest arrival time, so audio and video of one
        publisher share one clock however far apart they were read from Kafka.
        """
        while True:
            await asyncio.sleep(0.5 + random.random())
            if not self._last_arrival_us:
                continue
            now_us = time.time_ns() // 1000
            elapsed = (now_us - self._last_arrival_us) / 1e6
            rtp_ts = (self._last_ts + int(elapsed * self.clock_rate)) & 0xFFFFFFFF
            packets = [
                RtcpSrPacket(
                    ssrc=self._ssrc,
                    sender_info=RtcpSenderInfo(
                        ntp_timestamp=clock.current_ntp_time(),
                        rtp_timestamp=rtp_ts,
                        packet_count=self.packets_sent & 0xFFFFFFFF,
                        octet_count=self.octets_sent & 0xFFFFFFFF,
                    ),
                ),
                RtcpSdesPacket(
                    chunks=[RtcpSourceInfo(ssrc=self._ssrc, items=[(1, self._cname.encode())])]
                ),
            ]
            await self._send_rtcp(packets)

    async def _send_rtcp(self, packets: list) -> None:
        try:
            await self.transport._send_rtp(b"".join(bytes(p) for p in packets))
        except ConnectionError:
            pass
