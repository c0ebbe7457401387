"""The RTP receiver of a publisher's peer connection, without a jitter buffer.

:class:`PassthroughReceiver` takes aiortc's place in the publisher's transceivers. It
keeps what a receiver owes the publisher (RTCP receiver reports, NACKs, REMB bandwidth
estimates, PLIs) and replaces aiortc's jitter buffer and decoder thread with
:class:`~whipcast.gateway.assembler.FrameAssembler`, handing each frame to its
:class:`~whipcast.gateway.ingest.IngestSession` the moment its last packet arrives.

A simulcasting publisher sends up to three video encodings on one video section, each
on its own SSRC; aiortc routes them all here by payload type. The receiver tells them
apart by the RID header extension (RTX by the repaired RID), binding each SSRC to its
RID on the first packet that names it (browsers stop sending the RID once a receiver
report acknowledges the SSRC), and keeps a frame assembler and NACK generator per
layer. One REMB covers all SSRCs, as in libwebrtc: it estimates the whole link.
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


class _Layer:
    """Receive state of one video encoding (one RID; the only one without simulcast)."""

    __slots__ = ("rid", "ssrc", "rtx_ssrc", "assembler", "nack")

    def __init__(self, rid: str | None) -> None:
        self.rid = rid
        self.ssrc: int | None = None
        self.rtx_ssrc: int | None = None
        self.assembler = FrameAssembler()
        self.nack = NackGenerator()

    def bind(self, ssrc: int) -> None:
        """Take ``ssrc`` as this layer's media SSRC (a new one restarts its state)."""
        if self.ssrc is not None and self.ssrc != ssrc:
            self.assembler = FrameAssembler()
            self.nack = NackGenerator()
        self.ssrc = ssrc


class PassthroughReceiver(RTCRtpReceiver):
    """An RTP receiver that reassembles encoded frames instead of decoding them."""

    def __init__(
        self,
        kind: str,
        transport,
        rtcp_ssrc: int,
        session: IngestSession,
        rids: list[str] | None = None,
    ) -> None:
        super().__init__(kind, transport)
        self._rtcp_ssrc = rtcp_ssrc
        self._session = session
        self.media_track = Track.VIDEO if kind == "video" else Track.AUDIO
        self._codecs: dict = {}
        self._rtx_ssrc: dict[int, int] = {}
        self._streams: dict[int, StreamStatistics] = {}
        self._lsr: dict[int, tuple[int, float]] = {}
        self._remb = RemoteBitrateEstimator() if kind == "video" else None
        self._simulcast = bool(rids)
        self._layers = {rid: _Layer(rid) for rid in rids} if rids else {None: _Layer(None)}
        self._by_ssrc: dict[int, _Layer] = {}
        self._by_rtx_ssrc: dict[int, _Layer] = {}
        self._audio = FrameAssembler()
        self._audio_highest: int | None = None
        self._rtcp_task: asyncio.Task | None = None

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
        """aiortc's entry point (datagrams its receive task still reads)."""
        self.rtcp_received(packet)

    def rtcp_received(self, packet) -> None:
        """The direct receive path's entry point (``aiortc_compat.DirectReceive``)."""
        if isinstance(packet, RtcpSrPacket):
            ntp = packet.sender_info.ntp_timestamp
            self._lsr[packet.ssrc] = ((ntp >> 16) & 0xFFFFFFFF, time.time())
        elif isinstance(packet, RtcpByePacket):
            self._session.publisher_left("RTCP BYE")

    def _media_layer(self, packet: RtpPacket) -> _Layer | None:
        """The layer a media packet belongs to: by its SSRC once bound, else by its RID."""
        if not self._simulcast:
            layer = self._layers[None]
            layer.ssrc = packet.ssrc
            return layer
        layer = self._by_ssrc.get(packet.ssrc)
        rid = packet.extensions.rtp_stream_id
        if rid is not None and (layer is None or layer.rid != rid):
            layer = self._layers.get(rid)
            if layer is not None:
                if layer.ssrc is not None and self._by_ssrc.get(layer.ssrc) is layer:
                    del self._by_ssrc[layer.ssrc]
                layer.bind(packet.ssrc)
                self._by_ssrc[packet.ssrc] = layer
        return layer

    def _rtx_layer(self, packet: RtpPacket) -> _Layer | None:
        """The layer an RTX packet repairs: by its SSRC once bound, else by its
        repaired RID (simulcast), or the offer's SSRC group (one layer)."""
        if not self._simulcast:
            return self._layers[None] if packet.ssrc in self._rtx_ssrc else None
        rid = packet.extensions.repaired_rtp_stream_id
        layer = self._layers.get(rid) if rid is not None else None
        if layer is not None and layer.rtx_ssrc != packet.ssrc:
            if layer.rtx_ssrc is not None and self._by_rtx_ssrc.get(layer.rtx_ssrc) is layer:
                del self._by_rtx_ssrc[layer.rtx_ssrc]
            layer.rtx_ssrc = packet.ssrc
            self._by_rtx_ssrc[packet.ssrc] = layer
        return self._by_rtx_ssrc.get(packet.ssrc)

    async def _handle_rtp_packet(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        """aiortc's entry point (datagrams its receive task still reads)."""
        self.rtp_received(packet, arrival_time_ms)

    def rtp_received(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        """The direct receive path's entry point (``aiortc_compat.DirectReceive``)."""
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
        # Every packet counts for the estimate, padding-only RTX probes too.
        if self._remb is not None and packet.extensions.abs_send_time is not None:
            remb = self._remb.add(
                abs_send_time=packet.extensions.abs_send_time,
                arrival_time_ms=arrival_time_ms,
                payload_size=len(packet.payload) + packet.padding_size,
                ssrc=packet.ssrc,
            )
            if remb is not None:
                self._send_rtcp(
                    RtcpPsfbPacket(
                        fmt=RTCP_PSFB_APP,
                        ssrc=self._rtcp_ssrc,
                        media_ssrc=0,
                        fci=pack_remb_fci(*remb),
                    )
                )

        layer = None
        if codec.mimeType.lower().endswith("/rtx"):
            layer = self._rtx_layer(packet)
            apt = codec.parameters.get("apt")
            if self._simulcast:
                original = layer.ssrc if layer is not None else None
            else:
                original = self._rtx_ssrc.get(packet.ssrc)
            if layer is None or original is None or apt not in self._codecs:
                stats.malformed_rtp += 1
                return
            if len(packet.payload) < 2:
                return  # padding-only probe
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=original)
            codec = self._codecs[apt]
        elif self.media_track is Track.VIDEO:
            layer = self._media_layer(packet)
            if layer is None:
                stats.malformed_rtp += 1  # a simulcast SSRC never named by a RID
                return

        if layer is not None and layer.nack.add(packet):
            stats.nacks_sent += 1
            nack = RtcpRtpfbPacket(
                fmt=RTCP_RTPFB_NACK, ssrc=self._rtcp_ssrc, media_ssrc=packet.ssrc
            )
            nack.lost = sorted(layer.nack.missing)
            self._send_rtcp(nack)
        if not packet.payload:
            return  # padding-only probe

        media_codec = Codec.from_mime_type(codec.mimeType)
        try:
            data = codecs.depayload(media_codec, packet.payload)
        except ValueError:
            stats.malformed_rtp += 1
            return

        if layer is None:  # audio
            ext = self._audio.unwrap(packet.sequence_number)
            if self._audio_highest is not None and ext <= self._audio_highest:
                return  # late or duplicate audio is useless downstream
            self._audio_highest = ext
            self._session.emit(self.media_track, media_codec, packet.timestamp, data)
            return

        frames, lost = layer.assembler.add(
            packet.sequence_number,
            packet.timestamp,
            bool(packet.marker),
            data,
            _starts_frame(media_codec, packet.payload),
            time.monotonic(),
        )
        if lost:
            stats.frames_lost += 1
            self._session.frame_lost(layer.rid)
        for frame in frames:
            self._session.emit(
                self.media_track, media_codec, frame.timestamp, frame.payload, layer.rid
            )

    @property
    def packets_lost(self) -> int:
        return sum(stream.packets_lost for stream in self._streams.values())

    def layer_ssrcs(self) -> dict[str | None, int | None]:
        """Each layer's media SSRC by RID (``None`` until its first packet)."""
        return {rid: layer.ssrc for rid, layer in self._layers.items()}

    def send_pli(self, rid: str | None = None) -> None:
        """Ask for a keyframe of one layer (its RID; ``None`` without simulcast)."""
        layer = self._layers.get(rid)
        if layer is not None and layer.ssrc is not None:
            self._send_rtcp(
                RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=self._rtcp_ssrc, media_ssrc=layer.ssrc)
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
                self._send_rtcp(RtcpRrPacket(ssrc=self._rtcp_ssrc, reports=reports))

    def _send_rtcp(self, packet) -> None:
        aiortc_compat.send_rtcp_now(self.transport, bytes(packet))


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
