"""Every use of aiortc's and aioice's private internals, in one place.

whipcast swaps its own RTP sender and receiver into aiortc's transceivers and sends
straight to the SRTP session and the ICE pair's socket; none of that has a public API.
Each private name is used only through a function below, and :func:`check` (run at
import) verifies that the installed aiortc and aioice still have every one of them, so
an upgrade that renames one fails at start-up with a message naming the versions,
instead of with an ``AttributeError`` in the middle of a live stream.
``pyproject.toml`` pins the versions in :data:`TESTED`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata

import aioice.ice
import pylibsrtp
from aiortc import clock
from aiortc import codecs as aiortc_codecs
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.rtp import RtcpPacket, RtcpRtpfbPacket, RtpPacket, is_rtcp

TESTED = {"aiortc": "1.16.0", "aioice": "0.13.0"}
"""The versions whipcast was tested with, and pins."""

# (owner, name, how): "attr" = class or module attribute; "init" = an attribute the
# class's __init__ assigns (instance state, checked without building an instance).
REQUIRED: tuple[tuple[object, str, str], ...] = (
    (aiortc_codecs, "CODECS", "attr"),
    (aioice.ice, "get_host_addresses", "attr"),
    (aioice.ice.Connection, "_nominated", "init"),
    (aioice.ice.Connection, "_query_consent_task", "init"),
    (aioice.ice.Connection, "_queue", "init"),
    (aioice.ice.StunProtocol, "datagram_received", "attr"),
    (RTCIceGatherer, "_connection", "init"),
    (RTCIceTransport, "_connection", "init"),
    (RTCDtlsTransport, "_state", "init"),
    (RTCDtlsTransport, "_tx_srtp", "init"),
    (RTCDtlsTransport, "_rx_srtp", "init"),
    (RTCDtlsTransport, "_rtp_header_extensions_map", "init"),
    (RTCDtlsTransport, "_ssl", "init"),
    (RTCDtlsTransport, "_role", "init"),
    (RTCDtlsTransport, "_srtp_profiles", "init"),
    (RTCDtlsTransport, "_rtp_router", "init"),
    (RTCDtlsTransport, "_send_rtp", "attr"),
    (RTCDtlsTransport, "_register_rtp_sender", "attr"),
    (RTCDtlsTransport, "_unregister_rtp_sender", "attr"),
    (RTCDtlsTransport, "_register_rtp_receiver", "attr"),
    (RTCDtlsTransport, "_unregister_rtp_receiver", "attr"),
    (RTCRtpTransceiver, "_RTCRtpTransceiver__sender", "init"),
    (RTCRtpTransceiver, "_RTCRtpTransceiver__receiver", "init"),
    (RTCRtpTransceiver, "_codecs", "init"),
    (RTCRtpTransceiver, "_headerExtensions", "init"),
    (RTCRtpSender, "_ssrc", "init"),
    (RTCRtpSender, "_rtx_ssrc", "init"),
    (RTCRtpSender, "_stream_id", "init"),
    (RTCRtpSender, "_handle_rtcp_packet", "attr"),
    (RTCRtpReceiver, "_handle_rtp_packet", "attr"),
    (RTCRtpReceiver, "_handle_rtcp_packet", "attr"),
    (RTCRtpReceiver, "_handle_disconnect", "attr"),
    (RTCRtpReceiver, "_set_rtcp_ssrc", "attr"),
    (H264Encoder, "_packetize", "attr"),
    (H264Encoder, "_split_bitstream", "attr"),
    (Vp8Encoder, "_packetize", "attr"),
)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def missing(required: Iterable[tuple[object, str, str]] = REQUIRED) -> list[str]:
    """The private names the installed aiortc/aioice lack, as ``Owner.name``."""
    lacking = []
    for owner, name, how in required:
        if how == "init":
            init = getattr(owner, "__init__", None)
            present = name in getattr(getattr(init, "__code__", None), "co_names", ())
        else:
            present = hasattr(owner, name)
        if not present:
            lacking.append(f"{getattr(owner, '__name__', owner)}.{name}")
    return lacking


def check(required: Iterable[tuple[object, str, str]] = REQUIRED) -> None:
    """Fail with a clear message when an aiortc/aioice internal whipcast needs is gone."""
    lacking = missing(required)
    if lacking:
        installed = ", ".join(f"{p} {_version(p)}" for p in TESTED)
        tested = ", ".join(f"{p}=={v}" for p, v in TESTED.items())
        raise ImportError(
            f"whipcast needs {tested} (installed: {installed}); this version lacks the "
            f"internals whipcast relies on: {', '.join(lacking)}"
        )


check()

logger = logging.getLogger(__name__)


# ICE (aioice)


def use_host_addresses(addresses: tuple[str, ...]) -> None:
    """Make aioice gather host candidates on exactly these addresses (process-wide)."""
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(addresses)


_stun_datagram_received = aioice.ice.StunProtocol.datagram_received


def _datagram_received_unless_empty(self, data: bytes, addr: tuple) -> None:
    if data:
        _stun_datagram_received(self, data, addr)


def drop_empty_datagrams() -> None:
    """aioice queues a datagram that is not STUN for aiortc's DTLS transport, whose
    receive task reads its first byte: one empty UDP datagram from anywhere ends that
    task and closes the connection (aiortc 1.16). Drop empty datagrams before aioice
    sees them (process-wide; the direct receive path drops them itself)."""
    aioice.ice.StunProtocol.datagram_received = _datagram_received_unless_empty


def stop_consent_checks(ice: RTCIceTransport) -> None:
    """Cancel aioice's RFC 7675 consent checks of one connection."""
    task = ice._connection._query_consent_task
    if task is not None:
        task.cancel()


def media_route(dtls: RTCDtlsTransport) -> tuple[object, object] | None:
    """(datagram transport, remote address) of the nominated ICE pair once DTLS is up."""
    if dtls._state is not DtlsState.CONNECTED:
        return None
    pair = dtls.transport._connection._nominated.get(1)
    if pair is None:
        return None
    return pair.protocol.transport, pair.remote_addr


class DirectReceive:
    """SRTP and SRTCP of one connected transport, unprotected and handed to its
    receivers and senders right in the ICE socket's datagram callback.

    aiortc's own path tries to parse every datagram as STUN, queues it on the aioice
    connection and wakes the DTLS transport's receive task, which unprotects, parses
    and routes it through coroutines: a queue hop, a task wake-up and a chain of
    coroutines per packet a publisher sends and per feedback message a viewer sends
    (``bench/rx_path_bench.py``). Here a datagram whose first byte says RTP or RTCP
    (128..191, RFC 7983) on the nominated pair's socket takes the same steps (SRTP
    unprotect, aiortc's parsers and header-extension map, its RTP router) without
    queue, task or coroutine; STUN and DTLS still go aioice's and aiortc's way.
    Recipients are called through their synchronous entry points
    ``rtp_received(packet, arrival_time_ms)`` and ``rtcp_received(packet)``; one
    without them (aiortc's stock classes) gets its coroutine run as a task.

    While aioice's queue holds datagrams not yet read (those that came before the
    switch), media keeps joining that queue, so nothing overtakes what came first;
    once aiortc's task has drained it, every media datagram comes here. aiortc's
    receive counters (``getStats`` ``packetsReceived``) then count DTLS only.
    """

    def __init__(self, dtls: RTCDtlsTransport) -> None:
        pair = dtls.transport._connection._nominated[1]
        self.rtp_packets = 0
        """RTP packets delivered to a receiver on this path."""
        self.rtcp_packets = 0
        """Compound RTCP datagrams parsed and routed on this path."""
        self.dropped = 0
        """Media datagrams dropped: undecryptable (or replayed), unparsable, unrouted."""
        self.errors = 0
        """Exceptions a recipient raised (logged; the path goes on)."""
        self.active = True
        """Taken until DTLS leaves the connected state."""
        self._dtls = dtls
        self._protocol = pair.protocol
        self._queue = dtls.transport._connection._queue
        self._fallback = pair.protocol.datagram_received
        self._unprotect = dtls._rx_srtp.unprotect
        self._unprotect_rtcp = dtls._rx_srtp.unprotect_rtcp
        self._extensions = dtls._rtp_header_extensions_map
        self._router = dtls._rtp_router
        self._tasks: set[asyncio.Task] = set()
        pair.protocol.datagram_received = self.datagram_received
        dtls.on("statechange", self._on_dtls_state)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        """The socket's callback (in place of aioice's): never raises."""
        if not data:
            self.dropped += 1  # aiortc's receive task would die on it (data[0])
            return
        if not 127 < data[0] < 192 or self._queue.qsize():
            self._fallback(data, addr)
            return
        try:
            if is_rtcp(data):
                self._rtcp(self._unprotect_rtcp(data))
            else:
                arrival_time_ms = clock.current_ms()
                self._rtp(self._unprotect(data), arrival_time_ms)
        except pylibsrtp.Error:
            self.dropped += 1
        except Exception:
            self.errors += 1
            logger.log(
                logging.WARNING if self.errors == 1 else logging.DEBUG,
                "RTP/RTCP handler failed (%d so far)",
                self.errors,
                exc_info=True,
            )

    def _rtp(self, data: bytes, arrival_time_ms: int) -> None:
        try:
            packet = RtpPacket.parse(data, self._extensions)
        except ValueError:
            self.dropped += 1
            return
        receiver = self._router.route_rtp(packet)
        if receiver is None:
            self.dropped += 1
            return
        self.rtp_packets += 1
        handle = getattr(receiver, "rtp_received", None)
        if handle is not None:
            handle(packet, arrival_time_ms)
        else:
            self._spawn(receiver._handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms))

    def _rtcp(self, data: bytes) -> None:
        try:
            packets = RtcpPacket.parse(data)
        except ValueError:
            self.dropped += 1
            return
        self.rtcp_packets += 1
        for packet in packets:
            for recipient in self._router.route_rtcp(packet):
                handle = getattr(recipient, "rtcp_received", None)
                if handle is not None:
                    handle(packet)
                else:
                    self._spawn(recipient._handle_rtcp_packet(packet))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_dtls_state(self) -> None:
        """DTLS closed or failed: the socket's datagrams go aioice's way again."""
        if self.active and self._dtls._state is not DtlsState.CONNECTED:
            self._protocol.__dict__.pop("datagram_received", None)
            self.active = False


def receive_directly(dtls: RTCDtlsTransport) -> DirectReceive | None:
    """Take the direct receive path for a transport whose DTLS is connected (once;
    None while it is not connected)."""
    if dtls._state is not DtlsState.CONNECTED or dtls._rx_srtp is None:
        return None
    if dtls.transport._connection._nominated.get(1) is None:
        return None
    path = direct_receive(dtls)
    if path is None:
        path = dtls.whipcast_direct_receive = DirectReceive(dtls)
    return path


def direct_receive(dtls: RTCDtlsTransport) -> DirectReceive | None:
    """The direct receive path a transport took, if it did."""
    return getattr(dtls, "whipcast_direct_receive", None)


def send_rtcp_now(dtls: RTCDtlsTransport, data: bytes) -> None:
    """Send compound RTCP (SRTCP-protected) from synchronous code, as the direct
    receive path's recipients do; nothing while DTLS is not connected."""
    route = media_route(dtls)
    if route is not None:
        sock, addr = route
        sock.sendto(srtcp_protect(dtls)(data), addr)


# DTLS/SRTP transport


def srtp_protect(dtls: RTCDtlsTransport) -> Callable[[bytes], bytes]:
    """The SRTP protect function of a connected transport (one per packet sent)."""
    return dtls._tx_srtp.protect


def srtcp_protect(dtls: RTCDtlsTransport) -> Callable[[bytes], bytes]:
    """The SRTCP protect function of a connected transport (compound RTCP)."""
    return dtls._tx_srtp.protect_rtcp


def srtp_tx_key(dtls: RTCDtlsTransport) -> tuple[str, bytes]:
    """(DTLS-SRTP profile name, sending master key + master salt) of a connected
    transport, for an SRTP context outside aiortc (the native fan-out core).

    aiortc derives them once in its handshake and keeps only the libsrtp session; the
    RFC 5764 exporter gives the same bytes again, split as aiortc splits them.
    """
    selected = dtls._ssl.get_selected_srtp_profile()
    profile = next(p for p in dtls._srtp_profiles if p.openssl_profile == selected)
    material = dtls._ssl.export_keying_material(
        b"EXTRACTOR-dtls_srtp", 2 * (profile.key_length + profile.salt_length)
    )
    return profile.openssl_profile.decode(), profile.get_key_and_salt(
        material, 1 if dtls._role == "server" else 0
    )


async def send_rtcp(dtls: RTCDtlsTransport, data: bytes) -> None:
    """Send compound RTCP through aiortc (SRTCP-protected there)."""
    await dtls._send_rtp(data)


async def send_rtp(dtls: RTCDtlsTransport, data: bytes) -> None:
    """Send one RTP packet built outside aiortc (SRTP-protected there)."""
    await dtls._send_rtp(data)


def route_rtcp(dtls: RTCDtlsTransport, ssrc: int, recipient) -> None:
    """Hand RTCP feedback about ``ssrc`` (receiver reports, NACK, PLI) to
    ``recipient._handle_rtcp_packet``: for RTP streams sent with :func:`send_rtp`, which
    aiortc knows nothing of (the simulcast test publisher's layers)."""
    dtls._rtp_router.register_sender(recipient, ssrc)


def register_sender(dtls: RTCDtlsTransport, sender, parameters) -> None:
    dtls._register_rtp_sender(sender, parameters)


def unregister_sender(dtls: RTCDtlsTransport, sender) -> None:
    dtls._unregister_rtp_sender(sender)


def register_receiver(dtls: RTCDtlsTransport, receiver, parameters) -> None:
    dtls._register_rtp_receiver(receiver, parameters)


def unregister_receiver(dtls: RTCDtlsTransport, receiver) -> None:
    dtls._unregister_rtp_receiver(receiver)


# Transceivers, senders and receivers


def set_codecs(transceiver: RTCRtpTransceiver, codecs: list) -> None:
    """The codecs the answer will offer for this transceiver (aiortc picks otherwise)."""
    transceiver._codecs = codecs


def add_header_extensions(transceiver: RTCRtpTransceiver, extensions: Iterable) -> None:
    """Negotiate header extensions aiortc does not offer itself (the simulcast RID
    ones), with the ids the offer gave them; the answer and the receive parameters
    (and so the transport's header extension map) then include them."""
    known = {e.uri for e in transceiver._headerExtensions}
    transceiver._headerExtensions += [e for e in extensions if e.uri not in known]


def sender_ssrcs(sender: RTCRtpSender) -> tuple[int, int]:
    """(media SSRC, RTX SSRC) aiortc chose for a sender."""
    return sender._ssrc, sender._rtx_ssrc


def replace_sender(transceiver: RTCRtpTransceiver, sender: RTCRtpSender) -> None:
    """Put ``sender`` in place of the transceiver's own, keeping its stream id; the
    transceiver's receiver sends its RTCP from the new sender's SSRC."""
    sender._stream_id = transceiver.sender._stream_id
    transceiver.receiver._set_rtcp_ssrc(sender._ssrc)
    transceiver._RTCRtpTransceiver__sender = sender


def add_header_extension(transceiver: RTCRtpTransceiver, uri: str, ext_id: int) -> None:
    """Answer with one more header extension (aiortc negotiates only the ones in its
    module-level table; this adds one for a single transceiver)."""
    extensions = transceiver._headerExtensions
    if all(e.uri != uri for e in extensions):
        extensions.append(RTCRtpHeaderExtensionParameters(id=ext_id, uri=uri))


def replace_receiver(transceiver: RTCRtpTransceiver, receiver: RTCRtpReceiver) -> None:
    transceiver._RTCRtpTransceiver__receiver = receiver


# Codecs


def codec_table(kind: str) -> list:
    """aiortc's process-wide list of codecs it negotiates for ``kind`` (mutable)."""
    return aiortc_codecs.CODECS[kind]


def packetize_h264(access_unit: bytes) -> list[bytes]:
    return H264Encoder._packetize(H264Encoder._split_bitstream(access_unit))


def packetize_vp8(frame: bytes, picture_id: int) -> list[bytes]:
    return Vp8Encoder._packetize(frame, picture_id)


# RTCP


TRANSPORT_FEEDBACK_FMT = 15


@dataclass
class TransportFeedbackPacket(RtcpRtpfbPacket):
    """A transport-cc feedback (RTPFB fmt 15) with its FCI kept as bytes."""

    fci: bytes = b""


_parse_rtpfb = RtcpRtpfbPacket.parse.__func__


def _parse_rtpfb_keeping_twcc(cls, data: bytes, fmt: int) -> RtcpRtpfbPacket:
    if fmt != TRANSPORT_FEEDBACK_FMT:
        return _parse_rtpfb(cls, data, fmt)
    if len(data) < 8:
        raise ValueError("RTCP RTP feedback length is invalid")
    ssrc, media_ssrc = struct.unpack_from("!LL", data)
    return TransportFeedbackPacket(fmt=fmt, ssrc=ssrc, media_ssrc=media_ssrc, fci=bytes(data[8:]))


def keep_transport_feedback() -> None:
    """aiortc 1.16 parses every RTPFB message's FCI as a generic NACK, so a transport-cc
    feedback (fmt 15) arrives as a list of bogus lost packets. Make its parser keep
    fmt 15's FCI instead (process-wide; aiortc's own senders act on fmt 1 only, and it
    still routes the packet by its media SSRC)."""
    RtcpRtpfbPacket.parse = classmethod(_parse_rtpfb_keeping_twcc)


def transport_feedback_fci(packet: RtcpRtpfbPacket) -> bytes | None:
    """The FCI of a transport-cc feedback, None for anything else."""
    return packet.fci if isinstance(packet, TransportFeedbackPacket) else None
