"""What RTCP sender reports cost the egress, per path, measured in process.

    python -m bench.sender_report_cost [--reports 400] [--window 4]

``--reports`` reports due at random times over ``--window`` seconds, as a node's viewers'
reports fall due, each path sending them as the egress does; the process's CPU time over
the window (an otherwise idle event loop, uvloop as in the egress) divided by the reports:

- *aiortc objects*: ``FanoutSender._run_rtcp`` before the native reports: a timer per
  report waking its task, ``RtcpSrPacket`` + ``RtcpSdesPacket`` objects and ``bytes()``,
  libsrtp's ``protect_rtcp``, one ``sendto`` (aioice's own Python on top, ``Connection.send``
  -> ``StunProtocol.send_data``, not counted);
- *struct*: the pure-Python path now (``rtpsend.sender_report``), otherwise the same;
- *native*: the node's ``rtpsend.SenderReports``: every 0.2 s one ``_fanout.send_reports``
  call over all the tracks, building, SRTCP-protecting and sending the due ones (the
  ticks' own wake-ups included: with fewer reports per second, each costs more).

Real loopback UDP sockets (the receiver is drained after the window); AEAD_AES_128_GCM;
one libsrtp session with two SSRCs, as one viewer has.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import time

import uvloop
from aiortc.rtp import RtcpSdesPacket, RtcpSenderInfo, RtcpSourceInfo, RtcpSrPacket
from pylibsrtp import Policy, Session
from whipcast.gateway import rtpsend

CNAME = "{2f3c4d5e-6a7b-4c8d-9e0f-a1b2c3d4e5f6}"
PROFILE = "SRTP_AEAD_AES_128_GCM"


def sockets() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    return rx, tx


def drain(rx: socket.socket) -> int:
    count = 0
    try:
        while True:
            rx.recv(2048)
            count += 1
    except BlockingIOError:
        return count


async def python_path(count: int, window: float, objects: bool) -> float:
    policy = Policy(
        key=os.urandom(28),
        ssrc_type=Policy.SSRC_ANY_OUTBOUND,
        srtp_profile=Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    )
    protect = Session(policy).protect_rtcp
    rx, tx = sockets()
    addr = rx.getsockname()
    cname = CNAME.encode()

    async def one(ssrc: int, delay: float) -> None:
        await asyncio.sleep(delay)
        now_us = time.time_ns() // 1000
        if objects:
            packets = [
                RtcpSrPacket(
                    ssrc=ssrc,
                    sender_info=RtcpSenderInfo(
                        ntp_timestamp=rtpsend.ntp_time(now_us),
                        rtp_timestamp=now_us & 0xFFFFFFFF,
                        packet_count=1000,
                        octet_count=100000,
                    ),
                ),
                RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=ssrc, items=[(1, cname)])]),
            ]
            data = b"".join(bytes(p) for p in packets)
        else:
            data = rtpsend.sender_report(
                ssrc, rtpsend.ntp_time(now_us), now_us & 0xFFFFFFFF, 1000, 100000, cname
            )
        tx.sendto(protect(data), addr)

    begin = time.process_time()
    await asyncio.gather(*(one(1 + i % 2, random.uniform(0, window)) for i in range(count)))
    spent = time.process_time() - begin
    assert drain(rx) == count
    return spent / count * 1e6


async def native_path(count: int, window: float) -> float:
    core = rtpsend._fanout
    rx, tx = sockets()
    port = rx.getsockname()[1]
    reports = rtpsend.SenderReports(core)
    now = time.monotonic()
    for i in range(count):
        track = core.Track(PROFILE, os.urandom(28), 1 + i)
        track.cname = CNAME
        track.route(tx.fileno(), "127.0.0.1", port)
        track.last_arrival_us = time.time_ns() // 1000
        track.report_interval = 1000.0  # one report each in the window
        track.next_report = now + random.uniform(0, window)
        reports._tracks.append(track)  # as add() does, without its first report now
    begin = time.process_time()
    reports.add(reports._tracks.pop())
    await asyncio.sleep(window + 2 * rtpsend.REPORT_TICK)
    spent = time.process_time() - begin
    await reports.close()
    assert drain(rx) == count
    return spent / count * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=int, default=400)
    parser.add_argument("--window", type=float, default=4.0)
    args = parser.parse_args()
    for round_ in range(3):
        old = await python_path(args.reports, args.window, objects=True)
        new = await python_path(args.reports, args.window, objects=False)
        line = f"round {round_ + 1}: aiortc objects {old:.1f} µs, struct {new:.1f} µs"
        if rtpsend._fanout is not None:
            line += f", native {await native_path(args.reports, args.window):.1f} µs"
        print(line + " of CPU per report")


if __name__ == "__main__":
    uvloop.run(main())
