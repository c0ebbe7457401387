"""The RTP receiver of a publisher's peer connection, without a jitter buffer.

:class:`PassthroughReceiver` takes aiortc's place in the publisher's transceivers. It
keeps what a receiver owes the publisher (RTCP receiver reports, NACKs, REMB bandwidth
estimates, PLIs) and replaces aiortc's jitter buffer and decoder thread with
:class:`~whipcast.gateway.assembler.FrameAssembler`, handing each frame to its
:class:`~whipcast.gateway.ingest.IngestSession` the moment its last packet arrives.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING

from aiortc.rate import RemoteBitrateEstimator
from aiortc.rtcrtpparameters import RTCRtpReceiveParameters
from aiortc.rtcrtpreceiver import NackGenerator, RTCRtpReceiver, StreamStatistics
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpByePacket,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
    unwrap_rtx,
)

from . import aiortc_compat, codecs
from .assembler import FrameAssembler
from .frames import Codec, Track

if TYPE_CHECKING:
    from .ingest import IngestSession


class PassthroughReceiver(RTCRtpReceiver):
    """An RTP receiver that reassembles encoded frames instead of decoding them."""

    def __init__(self, kind: str, transport, rtcp_ssrc: int, session: IngestSession) -> None:
        super().__init__(kind, transport)
        self._rtcp_ssrc = rtcp_ssrc
        self._session = session
        self.media_track = Track.VIDEO if kind == "video" else Track.AUDIO
        self._codecs: dict = {}
        self._rtx_ssrc: dict[int, int] = {}
        self._streams: dict[int, StreamStatistics] = {}
        self._lsr: dict[int, tuple[int, float]] = {}
        self._nack = NackGenerator() if kind == "video" else None
        self._remb = RemoteBitrateEstimator() if kind == "video" else None
        self._assembler = FrameAssembler()
        self._audio_highest: int | None = None
        self._rtcp_task: asyncio.Task | None = None
        self.media_ssrc: int | None = None

    async def receive(self, parameters: RTCRtpReceiveParameters) -> None:
        if self._rtcp_task is not None:
            return
        self._codecs = {c.payloadType: c for c in parameters.codecs}
        for encoding in parameters.encodings:
            if encoding.rtx:
                self._rtx_ssrc[encoding.rtx.ssrc] = encoding.ssrc
        aiortc_compat.register_receiver(self.transport, self, parameters)
        self._rtcp_task = asyncio.create_task(self._run_rtcp())

    async def stop(self) -> None:
        if self._rtcp_task is not None:
            aiortc_compat.unregister_receiver(self.transport, self)
            self._rtcp_task.cancel()
            await asyncio.gather(self._rtcp_task, return_exceptions=True)

    def _handle_disconnect(self) -> None:
        pass

    async def _handle_rtcp_packet(self, packet) -> None:
        if isinstance(packet, RtcpSrPacket):
            ntp = packet.sender_info.ntp_timestamp
            self._lsr[packet.ssrc] = ((ntp >> 16) & 0xFFFFFFFF, time.time())
        elif isinstance(packet, RtcpByePacket):
            self._session.publisher_left("RTCP BYE")

    async def _handle_rtp_packet(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        stats = self._session.stats
        stats.packets += 1
        self._session.last_packet = time.monotonic()
        codec = self._codecs.get(packet.payload_type)
        if codec is None:
            stats.malformed_rtp += 1
            return
        if packet.ssrc not in self._streams:
            self._streams[packet.ssrc] = StreamStatistics(codec.clockRate)
        self._streams[packet.ssrc].add(packet)

        if codec.mimeType.lower().endswith("/rtx"):
            original_ssrc = self._rtx_ssrc.get(packet.ssrc)
            apt = codec.parameters.get("apt")
            if original_ssrc is None or apt not in self._codecs or len(packet.payload) < 2:
                stats.malformed_rtp += 1
                return
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=original_ssrc)
            codec = self._codecs[apt]
        self.media_ssrc = packet.ssrc

        if self._remb is not None and packet.extensions.abs_send_time is not None:
            remb = self._remb.add(
                abs_send_time=packet.extensions.abs_send_time,
                arrival_time_ms=arrival_time_ms,
                payload_size=len(packet.payload) + packet.padding_size,
                ssrc=packet.ssrc,
            )
            if remb is not None:
                await self._send_rtcp(
                    RtcpPsfbPacket(
                        fmt=RTCP_PSFB_APP,
                        ssrc=self._rtcp_ssrc,
                        media_ssrc=0,
                        fci=pack_remb_fci(*remb),
                    )
                )
        if self._nack is not None and self._nack.add(packet):
            stats.nacks_sent += 1
            nack = RtcpRtpfbPacket(
                fmt=RTCP_RTPFB_NACK, ssrc=self._rtcp_ssrc, media_ssrc=packet.ssrc
            )
            nack.lost = sorted(self._nack.missing)
            await self._send_rtcp(nack)
        if not packet.payload:
            return  # padding-only probe

        media_codec = Codec.from_mime_type(codec.mimeType)
        try:
            data = codecs.depayload(media_codec, packet.payload)
        except ValueError:
            stats.malformed_rtp += 1
            return

        if self.media_track is Track.AUDIO:
            ext = self._assembler.unwrap(packet.sequence_number)
            if self._audio_highest is not None and ext <= self._audio_highest:
                return  # late or duplicate audio is useless downstream
            self._audio_highest = ext
            self._session.emit(self.media_track, media_codec, packet.timestamp, data)
            return

        frames, lost = self._assembler.add(
            packet.sequence_number,
            packet.timestamp,
            bool(packet.marker),
            data,
            _starts_frame(media_codec, packet.payload),
            time.monotonic(),
        )
        if lost:
            stats.frames_lost += 1
            self._session.frame_lost()
        for frame in frames:
            self._session.emit(self.media_track, media_codec, frame.timestamp, frame.payload)

    @property
    def packets_lost(self) -> int:
        return sum(stream.packets_lost for stream in self._streams.values())

    async def send_pli(self) -> None:
        if self.media_ssrc is not None:
            await self._send_rtcp(
                RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=self._rtcp_ssrc, media_ssrc=self.media_ssrc)
            )

    async def _run_rtcp(self) -> None:
        while True:
            await asyncio.sleep(0.5 + random.random())
            reports = []
            for ssrc, stream in self._streams.items():
                lsr, dlsr = 0, 0
                if ssrc in self._lsr:
                    lsr, when = self._lsr[ssrc]
                    dlsr = int((time.time() - when) * 65536) & 0xFFFFFFFF
                reports.append(
                    RtcpReceiverInfo(
                        ssrc=ssrc,
                        fraction_lost=stream.fraction_lost,
                        packets_lost=stream.packets_lost,
                        highest_sequence=stream.max_seq,
                        jitter=stream.jitter,
                        lsr=lsr,
                        dlsr=dlsr,
                    )
                )
            if reports:
                await self._send_rtcp(RtcpRrPacket(ssrc=self._rtcp_ssrc, reports=reports))

    async def _send_rtcp(self, packet) -> None:
        try:
            await aiortc_compat.send_rtcp(self.transport, bytes(packet))
        except ConnectionError:
            pass


def _starts_frame(codec: Codec, payload: bytes) -> bool:
    """Whether an RTP payload is the first of a frame, by the codec's own flags. Asked
    only when the packet before is unknown (lost, late, or the stream's first)."""
    if codec is Codec.VP8:
        # RFC 7741: S bit set and partition index 0.
        return bool(payload[0] & 0x10) and payload[0] & 0x0F == 0
    # H.264: the first NAL unit this packet begins, and the byte after its header.
    nal_type = payload[0] & 0x1F
    if nal_type == 28:  # FU-A: only its first fragment begins a NAL unit
        if len(payload) < 3 or not payload[1] & 0x80:
            return False
        nal_type, after = payload[1] & 0x1F, payload[2]
    elif nal_type == 24:  # STAP-A: 2-byte size, then the first NAL unit
        if len(payload) < 5:
            return False
        nal_type, after = payload[3] & 0x1F, payload[4]
    elif len(payload) > 1:
        after = payload[1]
    else:
        return False
    if nal_type in (6, 7, 8, 9):  # SEI, SPS, PPS, access unit delimiter
        return True
    # A non-IDR slice with first_mb_in_slice 0 (ue(v) 0 is a single 1 bit) begins a
    # picture; any later slice does not. An IDR slice does not count: its SPS and PPS
    # usually come first and may be what was lost, and a keyframe without them would
    # pass for one a new viewer can start from.
    return nal_type == 1 and bool(after & 0x80)
