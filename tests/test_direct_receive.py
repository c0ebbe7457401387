"""Media datagrams take the direct receive path (``aiortc_compat.DirectReceive``) on
both sides of the gateway, and garbage on the media socket is dropped without harm."""

from __future__ import annotations

import asyncio
import os
import socket

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpReceiveParameters
from aiortc.rtp import RtcpReceiverInfo, RtcpRrPacket, RtpPacket
from whipcast.gateway import aiortc_compat
from whipcast.gateway.frames import Track

from .conftest import until
from .peers import play, post_sdp, publish


def direct_path(pc) -> aiortc_compat.DirectReceive | None:
    """The direct receive path of a gateway peer connection (one BUNDLE transport)."""
    transports = {t.receiver.transport for t in pc.getTransceivers()}
    assert len(transports) == 1
    return aiortc_compat.direct_receive(transports.pop())


def server_media_addresses(answer: str) -> list[tuple[str, int]]:
    """The gateway's loopback host candidates, from the answer a test peer got."""
    addresses = []
    for line in answer.splitlines():
        parts = line.split()
        candidate = line.startswith("a=candidate:") and parts[2].lower() == "udp"
        if candidate and parts[4] == "127.0.0.1":
            addresses.append((parts[4], int(parts[5])))
    assert addresses
    return addresses


GARBAGE = [
    b"",  # aiortc's receive task would die on an empty datagram
    b"\x80",  # an RTP first byte and nothing else
    b"\x80\x60" + os.urandom(10),  # shorter than any SRTP packet
    b"\x80\x60" + os.urandom(200),  # RTP-looking, not decryptable
    b"\x81\xc8" + os.urandom(60),  # RTCP-looking (SR), not decryptable
    b"\xbf\xcd" + os.urandom(30),  # RTCP-looking (transport feedback)
]


async def test_media_and_feedback_take_the_direct_path(server, stream_name):
    publisher = await publish(server.url, stream_name)
    try:
        assert await until(lambda: stream_name in server.node.ingest.sessions, 10)
        ingest = server.node.ingest.sessions[stream_name]
        viewer = await play(server.url, stream_name)
        try:
            await viewer.wait_frames(30, timeout=20)
            rx = direct_path(ingest.pc)
            assert rx is not None and rx.active
            # Publisher RTP: all of it but what came before the switch; its sender
            # reports (aiortc sends one every 0.5-1.5 s) too.
            assert await until(lambda: rx.rtp_packets > 200 and rx.rtcp_packets >= 2, 20)
            assert rx.rtp_packets >= ingest.stats.packets - 20, (
                rx.rtp_packets,
                ingest.stats.packets,
            )
            assert rx.errors == 0

            egress = server.node.egress.find(stream_name, viewer.location.rsplit("/", 1)[1])
            assert egress is not None
            tx = direct_path(egress.pc)
            assert tx is not None and tx.active
            # The viewer's receiver reports reach the FanoutSender (its RTT needs the
            # report to answer one of the gateway's sender reports).
            video = egress.senders[Track.VIDEO]
            assert await until(lambda: tx.rtcp_packets >= 2 and video.rtt is not None, 20)
            assert tx.errors == 0
        finally:
            assert await viewer.close() == 200
        assert await until(lambda: not tx.active, 10)  # the viewer's DTLS is gone
    finally:
        assert await publisher.close() == 200
    assert await until(lambda: not rx.active, 10)


async def test_garbage_on_the_media_socket_is_dropped(server, stream_name):
    publisher = await publish(server.url, stream_name)
    try:
        assert await until(lambda: stream_name in server.node.ingest.sessions, 10)
        ingest = server.node.ingest.sessions[stream_name]
        assert await until(lambda: ingest.stats.packets > 30, 20)
        rx = direct_path(ingest.pc)
        assert rx is not None
        dropped, errors = rx.dropped, rx.errors
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for address in server_media_addresses(publisher.pc.remoteDescription.sdp):
                for datagram in GARBAGE:
                    sock.sendto(datagram, address)
        assert await until(lambda: rx.dropped - dropped >= len(GARBAGE), 10), rx.dropped
        assert rx.errors == errors
        # The publish goes on: media still arrives and reaches a new viewer.
        packets = rx.rtp_packets
        assert await until(lambda: rx.rtp_packets > packets + 30, 20)
        assert rx.active and ingest.pc.connectionState == "connected"
        viewer = await play(server.url, stream_name)
        try:
            await viewer.wait_frames(10, timeout=20)
        finally:
            assert await viewer.close() == 200
    finally:
        assert await publisher.close() == 200


async def test_an_empty_datagram_before_dtls_does_not_end_the_session(server, stream_name):
    """aiortc's DTLS task reads a queued datagram's first byte: an empty one sent to the
    gateway's port before the handshake used to end the session."""
    publisher = await publish(server.url, stream_name)
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        async with aiohttp.ClientSession(base_url=server.url) as http:
            status, _, answer = await post_sdp(http, f"/whep/{stream_name}", offer)
        assert status == 201, answer
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for address in server_media_addresses(answer):
                sock.sendto(b"", address)
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        video = next(t for t in pc.getTransceivers() if t.kind == "video")
        frame = await asyncio.wait_for(video.receiver.track.recv(), 20)
        assert frame is not None and pc.connectionState == "connected"
    finally:
        await pc.close()
        assert await publisher.close() == 200


class Recorder:
    """A receiver with both entry points (as whipcast's have): sequence numbers, in the
    order they arrive."""

    def __init__(self) -> None:
        self.seqs: list[int] = []

    def rtp_received(self, packet, arrival_time_ms: int) -> None:
        self.seqs.append(packet.sequence_number)

    async def _handle_rtp_packet(self, packet, arrival_time_ms: int) -> None:
        self.rtp_received(packet, arrival_time_ms)

    def _handle_disconnect(self) -> None:
        pass


class AsyncOnly:
    """A sender with only aiortc's coroutine entry point (as aiortc's own have)."""

    def __init__(self) -> None:
        self.packets: list = []

    async def _handle_rtcp_packet(self, packet) -> None:
        self.packets.append(packet)


async def connected_pair() -> tuple[RTCPeerConnection, RTCPeerConnection]:
    """Two plain aiortc peers on loopback, the second receiving video."""
    sender, receiver = RTCPeerConnection(), RTCPeerConnection()
    sender.addTransceiver("video", direction="sendonly")
    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(receiver.localDescription)
    connected = lambda: sender.connectionState == receiver.connectionState == "connected"  # noqa: E731
    assert await until(connected, 20)
    await asyncio.sleep(0.1)  # aiortc registers its receivers after "connected"
    return sender, receiver


async def test_datagrams_queued_before_the_switch_come_first():
    """What aioice queued before the switch is delivered first, in order; then the
    direct path takes over (synchronously), and a recipient with only a coroutine
    entry point still gets its RTCP."""
    sender, receiver = await connected_pair()
    try:
        tx = sender.getTransceivers()[0].sender.transport
        transceiver = receiver.getTransceivers()[0]
        dtls = transceiver.receiver.transport
        aiortc_compat.unregister_receiver(dtls, transceiver.receiver)
        recorder = Recorder()
        vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
        aiortc_compat.register_receiver(dtls, recorder, RTCRtpReceiveParameters(codecs=[vp8]))
        protect = aiortc_compat.srtp_protect(tx)
        packets = [
            protect(RtpPacket(payload_type=96, sequence_number=i, ssrc=7, payload=b"x").serialize())
            for i in range(30)
        ]
        sock, address = aiortc_compat.media_route(dtls)
        protocol = sock.get_protocol()
        for datagram in packets[:10]:  # aioice's callback: queued for aiortc's task
            protocol.datagram_received(datagram, address)
        path = aiortc_compat.receive_directly(dtls)
        assert path is not None and aiortc_compat.receive_directly(dtls) is path
        for datagram in packets[10:20]:  # the queue is not empty yet: they join it
            protocol.datagram_received(datagram, address)
        assert recorder.seqs == []
        assert await until(lambda: len(recorder.seqs) == 20, 10)
        assert recorder.seqs == list(range(20))
        assert path.rtp_packets == 0
        for datagram in packets[20:]:  # now straight through, no task in between
            protocol.datagram_received(datagram, address)
        assert recorder.seqs == list(range(30))
        assert path.rtp_packets == 10

        feedback = AsyncOnly()
        aiortc_compat.route_rtcp(dtls, 99, feedback)
        report = RtcpReceiverInfo(
            ssrc=99, fraction_lost=0, packets_lost=0, highest_sequence=1, jitter=0, lsr=0, dlsr=0
        )
        rtcp = aiortc_compat.srtcp_protect(tx)(bytes(RtcpRrPacket(ssrc=7, reports=[report])))
        protocol.datagram_received(rtcp, address)
        assert await until(lambda: feedback.packets, 10)
        assert feedback.packets[0].reports[0].ssrc == 99
        assert path.rtcp_packets >= 1 and path.errors == 0
    finally:
        await sender.close()
        await receiver.close()
    assert await until(lambda: not path.active, 10)
