"""What per-viewer bandwidth estimation adds to a viewer's send path, measured in process.

    python -m bench.adapt_cost [--frames 3000] [--packets 5]

Process-level CPU (``bench.adapt_bench``) cannot resolve a few per cent of a viewer's
~0.3-0.6 % of a core, so this times the code itself: the real ``FanoutSender.send_frame``
(real pylibsrtp protect, real UDP ``sendto`` on loopback; only the DTLS handshake is
skipped: the route and the SRTP key are set up here) for a 30 fps frame of N packets,

- *baseline*: no abs-send-time element, no pacer (a viewer before issue 14);
- *adapt*: the abs-send-time element stamped per frame, through the viewer's
  :class:`~whipcast.gateway.pacer.Pacer` (whole frames fit: no timer), the
  ``can_send`` check (budget + pacer) per frame;

plus the estimate's RTCP work per second of viewing: one REMB, one receiver report and
one NACK of 3 packets per second (Chrome sends REMB at most every 200 ms on change, so
this is the usual rate, not the worst), each through ``BandwidthEstimate``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time

from pylibsrtp import Policy, Session
from whipcast.gateway import aiortc_compat, rtpsend
from whipcast.gateway.bandwidth import BandwidthEstimate
from whipcast.gateway.frames import Codec, Frame, Track
from whipcast.gateway.pacer import Pacer
from whipcast.gateway.rtpsend import FanoutSender, Layout, PreparedFrame, RetransmitPolicy


def srtp_protect():
    key = os.urandom(30)
    policy = Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND)
    policy.allow_repeat_tx = True
    return Session(policy=policy).protect


async def sender_for(layout: Layout, budget: rtpsend.SendBudget) -> FanoutSender:
    from aiortc import RTCCertificate, RTCDtlsTransport, RTCIceGatherer, RTCIceTransport

    dtls = RTCDtlsTransport(
        RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()]
    )
    policy = RetransmitPolicy(budget=0.25, max_age=1.0, max_resends=3)
    sender = FanoutSender("video", dtls, lambda reason: None, budget, policy)
    sender.layout = layout
    return sender


def frames(count: int, packets: int) -> list[PreparedFrame]:
    payloads = [os.urandom(1100) for _ in range(packets)]
    out = []
    for i in range(count):
        frame = Frame(Track.VIDEO, Codec.H264, i % 60 == 0, i * 3000, 1, i, 0, b"")
        out.append(PreparedFrame(frame, payloads, True))
    return out


async def time_sends(sender: FanoutSender, batch: list[PreparedFrame], viewer) -> float:
    start = time.perf_counter()
    if viewer is None:
        for prepared in batch:
            sender.send_frame(prepared)
    else:
        for prepared in batch:
            if viewer.can_send(sender):
                viewer.send_video(sender, prepared)
            else:
                sender.send_frame(prepared)
    return (time.perf_counter() - start) / len(batch)


class BlockingSocket(socket.socket):
    """A UDP socket where FanoutSender expects asyncio's datagram transport: a blocking
    sendto never queues in user space, so each packet costs its system call."""

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_DGRAM)

    def get_write_buffer_size(self) -> int:
        return 0


class PacedViewer:
    """The two calls ``egress.ViewerSession`` makes per frame with adaptation on."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer

    def can_send(self, sender: FanoutSender) -> bool:
        return sender.writable() and not self.pacer.busy

    def send_video(self, sender: FanoutSender, prepared: PreparedFrame) -> None:
        self.pacer.send(prepared)


async def main(args) -> dict:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    route = (BlockingSocket(), sink.getsockname())  # every packet is a real sendto
    aiortc_compat.media_route = lambda dtls: route  # the nominated pair, without ICE
    protect = srtp_protect()
    aiortc_compat.srtp_protect = lambda dtls: protect
    batch = frames(args.frames, args.packets)
    results: dict = {"packets_per_frame": args.packets}
    rate = 50e6 / 8
    runs = {}
    for name, ast in (("baseline", None), ("adapt", 3)):
        budget = rtpsend.SendBudget(rate, rate)
        sender = await sender_for(Layout(96, 1, "0", ast), budget)
        viewer = None
        if ast is not None:
            BandwidthEstimate(budget, 100_000, 50e6, 50e6)
            viewer = PacedViewer(Pacer(sender, budget, lambda: None))
        runs[name] = (sender, viewer, [])
    for _ in range(args.repeat):  # interleaved, best of each: a busy machine's noise
        for sender, viewer, times in runs.values():
            times.append(await time_sends(sender, batch, viewer))
    for name, (_, _, times) in runs.items():
        results[f"{name}_us_per_frame"] = round(min(times) * 1e6, 2)
    budget = rtpsend.SendBudget(rate, rate)
    estimate = BandwidthEstimate(budget, 100_000, 50e6, 1.5e6)
    start, n = time.perf_counter(), args.frames
    now = time.monotonic()
    for i in range(n):
        t = now + i
        budget.spend(190_000)
        estimate.on_remb(1.4e6, t)
        estimate.on_receiver_report(3, t + 0.5)
    results["rtcp_us_per_viewer_second"] = round((time.perf_counter() - start) / n * 1e6, 2)
    extra = (results["adapt_us_per_frame"] - results["baseline_us_per_frame"]) * 30
    results["extra_us_per_viewer_second"] = round(extra + results["rtcp_us_per_viewer_second"], 1)
    results["baseline_us_per_viewer_second"] = round(results["baseline_us_per_frame"] * 30, 1)
    results["extra_percent"] = round(
        100 * results["extra_us_per_viewer_second"] / results["baseline_us_per_viewer_second"], 1
    )
    route[0].close()
    sink.close()
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--packets", type=int, default=5, help="per frame (1.5 Mbps 30 fps: ~5)")
    parser.add_argument("--repeat", type=int, default=15, help="best of")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args)), indent=2))


if __name__ == "__main__":
    cli()
