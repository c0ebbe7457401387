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

- *twcc*: *adapt* plus the transport-cc element, a transport-wide number taken from
  the viewer's ``twcc.SendLog`` per packet (a transport-cc viewer, e.g. Chromium);

plus the estimate's RTCP work per second of viewing: one REMB, one receiver report and
one NACK of 3 packets per second (Chrome sends REMB at most every 200 ms on change, so
this is the usual rate, not the worst), each through ``BandwidthEstimate``; and for a
transport-cc viewer, 10 feedback messages per second covering all its packets (30 fps
x N, as Chromium sends every ~100 ms), each summarized by the viewer's send log (parsed
and matched: ``SendLog.summarize``, in Python and, where built, in the native core)
and fed through the delay-based detector. With the native core built, the same
per-frame comparison for its ``Track.send`` (abs-send-time only vs abs-send-time +
transport-cc numbered into its native ``SendLog``), real ``sendmmsg`` on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import time

from pylibsrtp import Policy, Session
from whipcast.gateway import aiortc_compat, rtpsend, twcc
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
    for name, ast, tcc in (("baseline", None, None), ("adapt", 3, None), ("twcc", 3, 5)):
        budget = rtpsend.SendBudget(rate, rate)
        sender = await sender_for(Layout(96, 1, "0", ast, tcc), budget)
        if tcc is not None:
            sender.send_log = twcc.SendLog()
            sender._twcc_element = twcc.stamp_element(tcc)
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
    results.update(feedback_cost(args.packets, n // 10, args.repeat))
    extra = (results["twcc_us_per_frame"] - results["baseline_us_per_frame"]) * 30
    results["twcc_extra_us_per_viewer_second"] = round(
        extra + results["twcc_feedback_us_per_viewer_second"], 1
    )
    results.update(native_cost(args.packets, args.frames, args.repeat))
    extra = (results["adapt_us_per_frame"] - results["baseline_us_per_frame"]) * 30
    results["extra_us_per_viewer_second"] = round(extra + results["rtcp_us_per_viewer_second"], 1)
    results["baseline_us_per_viewer_second"] = round(results["baseline_us_per_frame"] * 30, 1)
    results["extra_percent"] = round(
        100 * results["extra_us_per_viewer_second"] / results["baseline_us_per_viewer_second"], 1
    )
    results["twcc_extra_percent"] = round(
        100 * results["twcc_extra_us_per_viewer_second"] / results["baseline_us_per_viewer_second"],
        1,
    )
    if "native_twcc_feedback_us_per_viewer_second" in results:  # against a native viewer's send
        results["native_twcc_feedback_percent"] = round(
            100
            * results["native_twcc_feedback_us_per_viewer_second"]
            / (results["native_twcc_us_per_frame"] * 30),
            1,
        )
    route[0].close()
    sink.close()
    return results


def feedback_messages(log, packets: int, seconds: int) -> list[bytes]:
    """10 feedback messages a second for ``seconds``, each on the packets of 3 frames,
    built as Chromium builds them (one run of small deltas), the packets numbered in
    ``log`` as they are sent."""
    per = 3 * packets
    messages = []
    for i in range(seconds * 10):
        base = log.next_seq
        sent_us = 100_000 * i
        for _ in range(per):  # a frame's packets leave together, every 33 ms
            log.take(1200, sent_us)
        arrival = sent_us + 20_000  # 20 ms one-way, 1 ms apart (in 250 µs units: 4)
        reference = arrival // 64_000
        first = (arrival - reference * 64_000) // 250
        body = struct.pack("!HHI", base, per, (reference << 8) | (i & 0xFF))
        body += struct.pack("!H", (1 << 13) | per) + bytes([first] + [4] * (per - 1))
        messages.append(body + b"\x00" * (-len(body) % 4))
    return messages


def feedback_cost(packets: int, seconds: int, repeat: int) -> dict:
    """µs per viewer-second of transport-cc feedback (10 messages a second), best of
    ``repeat`` interleaved runs, through the pure-Python send log and, where built, the
    native one: in all (summarized and fed to the estimate), and the summary alone
    (parse + match against the log: what the native core took over)."""
    logs = {"python": twcc.SendLog}
    if rtpsend._fanout is not None:
        logs["native"] = rtpsend._fanout.SendLog
    runs = {}
    for name, make in logs.items():
        log = make()
        runs[name] = (log, feedback_messages(log, packets, seconds), [], [])
    for _ in range(repeat):
        for log, messages, whole, alone in runs.values():
            budget = rtpsend.SendBudget(1e6, 1e6)
            estimate = BandwidthEstimate(budget, 100_000, 50e6, 1.5e6)
            summarize, feed, now = log.summarize, estimate.on_transport_feedback, time.monotonic()
            start = time.perf_counter()
            for i, body in enumerate(messages):
                feed(summarize(body), now + i / 10)
            whole.append(time.perf_counter() - start)
            start = time.perf_counter()
            for body in messages:
                summarize(body)
            alone.append(time.perf_counter() - start)
    results = {}
    for name, (_, _, whole, alone) in runs.items():
        prefix = "twcc_feedback" if name == "python" else "native_twcc_feedback"
        results[f"{prefix}_us_per_viewer_second"] = round(min(whole) / seconds * 1e6, 2)
        results[f"{prefix}_summary_us_per_viewer_second"] = round(min(alone) / seconds * 1e6, 2)
    return results


def native_cost(packets: int, count: int, repeat: int) -> dict:
    """The native Track's send per frame, without and with transport-cc numbering."""
    core = rtpsend._fanout
    if core is None:
        return {}
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    payloads = [os.urandom(1100) for _ in range(packets)]
    runs = {}
    for name, tcc in (("native_adapt", None), ("native_twcc", 5)):
        track = core.Track("SRTP_AEAD_AES_128_GCM", os.urandom(28), 1234)
        track.route(tx.fileno(), "127.0.0.1", sink.getsockname()[1])
        track.log_to(core.SendLog())
        layout = Layout(96, 1, "0", 3, tcc)
        native = PreparedFrame(None, payloads, True).native_packets(layout, core)  # type: ignore[arg-type]
        runs[name] = (track, native, [])
    for _ in range(repeat):
        for track, native, times in runs.values():
            start, seq = time.perf_counter(), 0
            for _ in range(count):
                track.send(native, seq, 0, 0, None, 1)  # unsent packets: the sink is full
                seq = (seq + packets) & 0xFFFF
            times.append((time.perf_counter() - start) / count)
    sink.close()
    tx.close()
    return {f"{name}_us_per_frame": round(min(t) * 1e6, 2) for name, (_, _, t) in runs.items()}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--packets", type=int, default=5, help="per frame (1.5 Mbps 30 fps: ~5)")
    parser.add_argument("--repeat", type=int, default=15, help="best of")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args)), indent=2))


if __name__ == "__main__":
    cli()
