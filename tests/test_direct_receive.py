"""Media datagrams take the direct receive path (``aiortc_compat.DirectReceive``) on
both sides of the gateway, and garbage on the media socket is dropped without harm."""

from __future__ import annotations

import os
import socket

from whipcast.gateway import aiortc_compat
from whipcast.gateway.frames import Track

from .conftest import until
from .peers import play, publish


def direct_path(pc) -> aiortc_compat.DirectReceive | None:
    """The direct receive path of a gateway peer connection (one BUNDLE transport)."""
    transports = {t.receiver.transport for t in pc.getTransceivers()}
    assert len(transports) == 1
    return aiortc_compat.direct_receive(transports.pop())


def server_media_addresses(client_pc) -> list[tuple[str, int]]:
    """The gateway's loopback host candidates, from the answer a test peer got."""
    addresses = []
    for line in client_pc.remoteDescription.sdp.splitlines():
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
            for address in server_media_addresses(publisher.pc):
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
