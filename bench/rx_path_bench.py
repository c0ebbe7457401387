"""Receive-path micro-benchmark: event-loop CPU per SRTP/SRTCP datagram, aiortc's path
vs the direct receive path (``aiortc_compat.DirectReceive``).

    python -m bench.rx_path_bench [--packets 2000] [--rate 1000] [--rounds 3]

Each round is a fresh pair of aiortc peer connections on loopback (ICE, DTLS, SRTP all
real). On the receiving side, a counting receiver takes the place of aiortc's (the same
body behind both entry points: ``_handle_rtp_packet`` for aiortc's task,
``rtp_received`` for the direct path) and a counting sender is routed the RTCP. A
process of its own sends pre-protected datagrams from a plain socket at ``--rate`` per
second, one per wake-up as a publisher's packets arrive: RTP (1,100-byte payloads), then
receiver reports. CPU is the event-loop thread's own (``RUSAGE_THREAD``, user + system)
from the first datagram sent to the last one counted, per datagram; the loop is uvloop
where installed, as in a node. The two paths alternate, ``--rounds`` times; the best
round of each counts.

It measures the receive path alone, not a receiver's work on a packet (a counter
here); ``bench.fixed_cost`` measures a whole node.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import socket
import time

from aiortc import RTCPeerConnection
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpReceiveParameters
from aiortc.rtp import RtcpReceiverInfo, RtcpRrPacket, RtpPacket
from whipcast.gateway import aiortc_compat
from whipcast.loadtest.procs import run_event_loop

PAYLOAD_TYPE = 96
MEDIA_SSRC = 0x1234
SENDER_SSRC = 0x5678


class Counter:
    """Counts what reaches it, through either entry point, and says when all did."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = asyncio.Event()

    def _add(self) -> None:
        self.count += 1
        if self.count == self.target:
            self.done.set()

    def rtp_received(self, packet, arrival_time_ms: int) -> None:
        self._add()

    async def _handle_rtp_packet(self, packet, arrival_time_ms: int) -> None:
        self.rtp_received(packet, arrival_time_ms)

    def rtcp_received(self, packet) -> None:
        self._add()

    async def _handle_rtcp_packet(self, packet) -> None:
        self.rtcp_received(packet)

    def _handle_disconnect(self) -> None:
        pass


async def connected_pair() -> tuple[RTCPeerConnection, RTCPeerConnection]:
    sender, receiver = RTCPeerConnection(), RTCPeerConnection()
    sender.addTransceiver("video", direction="sendonly")
    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(receiver.localDescription)
    for _ in range(500):
        if sender.connectionState == receiver.connectionState == "connected":
            await asyncio.sleep(0.2)  # receivers and senders registered
            return sender, receiver
        await asyncio.sleep(0.02)
    raise RuntimeError("the peer connections did not connect")


def datagrams(dtls, packets: int) -> tuple[list[bytes], list[bytes]]:
    """``packets`` SRTP packets and as many SRTCP receiver reports, protected by ``dtls``."""
    protect = aiortc_compat.srtp_protect(dtls)
    rtp = [
        protect(
            RtpPacket(
                payload_type=PAYLOAD_TYPE,
                sequence_number=i & 0xFFFF,
                timestamp=i * 3000,
                ssrc=MEDIA_SSRC,
                payload=bytes(1100),
            ).serialize()
        )
        for i in range(packets)
    ]
    rtcp = []
    for i in range(packets):
        report = RtcpReceiverInfo(
            ssrc=SENDER_SSRC,
            fraction_lost=0,
            packets_lost=0,
            highest_sequence=i,
            jitter=0,
            lsr=0,
            dlsr=0,
        )
        rtcp.append(bytes(RtcpRrPacket(ssrc=MEDIA_SSRC, reports=[report])))
    protect_rtcp = aiortc_compat.srtcp_protect(dtls)
    return rtp, [protect_rtcp(r) for r in rtcp]


def send_paced(data: list[bytes], address: tuple[str, int], rate: float, go) -> None:
    """In a process of its own, so that nothing but the receive path runs in this one."""
    go.wait()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        start = time.monotonic()
        for i, datagram in enumerate(data):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sock.sendto(datagram, address)


async def measure(counter: Counter, data: list[bytes], address, rate: float) -> float:
    """Event-loop thread CPU µs per datagram while ``data`` is sent and counted."""
    counter.count, counter.target = 0, len(data)
    counter.done.clear()
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    sender = context.Process(target=send_paced, args=(data, address, rate, go), daemon=True)
    sender.start()
    try:
        await asyncio.sleep(2)  # the process is up and waits
        before = resource.getrusage(resource.RUSAGE_THREAD)
        go.set()
        await asyncio.wait_for(counter.done.wait(), len(data) / rate + 10)
        after = resource.getrusage(resource.RUSAGE_THREAD)
    finally:
        await asyncio.to_thread(sender.join, 10)
        if sender.is_alive():
            sender.kill()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return cpu / len(data) * 1e6


async def one_round(direct: bool, packets: int, rate: float) -> tuple[float, float, int]:
    """(µs per RTP packet, µs per RTCP packet, datagrams the direct path took)."""
    sender, receiver = await connected_pair()
    try:
        tx_dtls = sender.getTransceivers()[0].sender.transport
        transceiver = receiver.getTransceivers()[0]
        dtls = transceiver.receiver.transport
        aiortc_compat.unregister_receiver(dtls, transceiver.receiver)
        counter = Counter()
        codec = RTCRtpCodecParameters(
            mimeType="video/VP8", clockRate=90000, payloadType=PAYLOAD_TYPE
        )
        aiortc_compat.register_receiver(dtls, counter, RTCRtpReceiveParameters(codecs=[codec]))
        aiortc_compat.route_rtcp(dtls, SENDER_SSRC, counter)
        path = aiortc_compat.receive_directly(dtls) if direct else None
        _, address = aiortc_compat.media_route(tx_dtls)
        rtp, rtcp = datagrams(tx_dtls, packets)
        rtp_us = await measure(counter, rtp, address, rate)
        rtcp_us = await measure(counter, rtcp, address, rate)
        taken = path.rtp_packets + path.rtcp_packets if path is not None else 0
        return rtp_us, rtcp_us, taken
    finally:
        await sender.close()
        await receiver.close()


async def main(args: argparse.Namespace) -> None:
    best: dict[str, tuple[float, float]] = {}
    for round_ in range(args.rounds):
        for name in ("aiortc", "direct"):
            rtp_us, rtcp_us, taken = await one_round(name == "direct", args.packets, args.rate)
            print(
                f"round {round_ + 1} {name:>6}: {rtp_us:6.1f} µs/RTP  {rtcp_us:6.1f} µs/RTCP"
                f"  (direct path took {taken})",
                flush=True,
            )
            old = best.get(name)
            best[name] = (
                (rtp_us, rtcp_us) if old is None else (min(old[0], rtp_us), min(old[1], rtcp_us))
            )
    (a_rtp, a_rtcp), (d_rtp, d_rtcp) = best["aiortc"], best["direct"]
    print(f"\nbest of {args.rounds}, event-loop CPU per datagram at {args.rate:g}/s:")
    print(f"  RTP : aiortc {a_rtp:.1f} µs, direct {d_rtp:.1f} µs ({d_rtp / a_rtp:.0%})")
    print(f"  RTCP: aiortc {a_rtcp:.1f} µs, direct {d_rtcp:.1f} µs ({d_rtcp / a_rtcp:.0%})")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=2000, help="per kind and round")
    parser.add_argument("--rate", type=float, default=1000, help="datagrams per second")
    parser.add_argument("--rounds", type=int, default=3)
    run_event_loop(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
