"""Send-path micro-benchmark: CPU per viewer and frame, native core vs pure-Python path.

    python -m bench.send_path_bench [--viewers 200] [--frames 150] [--kbps 1500]

Each viewer is a real asyncio datagram endpoint on loopback, sending to a socket that
nobody reads: the kernel's whole loopback send path is paid per packet, then the full
receive queue drops it. Frames are 720p30-sized (``kbps`` / 30 bytes, split into RTP
payloads of 1200 bytes, a MID header extension), sent to every viewer as egress does:
the pure-Python path is ``FanoutSender._send_python`` itself (per packet: header join,
libsrtp protect, ``transport.sendto``); the native path is what ``send_frame`` does with
the core (one ``Track.send`` per viewer and frame: header fields, SRTP, ``sendmmsg``);
the batch path is what egress does for viewers that need nothing else
(``gateway/batch.py``: one ``send_batch`` call per frame for all of them, which also
counts and keeps each track's NACK history). The three alternate, ``--rounds`` times;
the best round of each counts. CPU is this process's user + system time; viewers per
core at 30 fps = 1 / (30 × cost).

It leaves out what both paths share (Kafka reading, the viewer's queue and budget,
RTCP), so it bounds the send path's gain; ``bench.gateway_bench`` measures the whole.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import time
from types import SimpleNamespace

from pylibsrtp import Policy, Session
from whipcast.gateway import rtpsend
from whipcast.gateway.rtpsend import FanoutSender, Layout, PreparedFrame

PROFILES = {
    "SRTP_AEAD_AES_128_GCM": (Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
    "SRTP_AEAD_AES_256_GCM": (Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
    "SRTP_AES128_CM_SHA1_80": (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
}


def cpu() -> float:
    return time.process_time()  # user + system, at clock_gettime's resolution


async def run(args) -> None:
    core = rtpsend.native_core()
    if core is None:
        raise SystemExit("the native core is not built")
    loop = asyncio.get_running_loop()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    sink.bind(("127.0.0.1", 0))
    addr = sink.getsockname()
    layout = Layout(102, 4, "0")
    size = args.kbps * 1000 // 8 // 30
    payloads = [os.urandom(min(1200, size - i)) for i in range(0, size, 1200)]
    frames = [PreparedFrame(None, payloads, True) for _ in range(8)]  # type: ignore[arg-type]
    profile, key_len = PROFILES[args.profile]
    viewers = []
    for _ in range(args.viewers):
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
        key = os.urandom(key_len)
        policy = Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)
        policy.allow_repeat_tx = True
        session = Session(policy)
        ssrc = random.getrandbits(32)
        python = SimpleNamespace(transport=SimpleNamespace(_tx_srtp=session), ssrc=ssrc, _py_seq=0)
        track = core.Track(args.profile, key, ssrc)
        track.route(transport.get_extra_info("socket").fileno(), *addr)
        track.allowance = 1 << 62
        viewers.append((transport, python, track))

    def python_frame(prepared: PreparedFrame, ts: int) -> None:
        packets = prepared.packets(layout)
        for transport, sender, _ in viewers:
            FanoutSender._send_python(sender, (transport, addr), packets, sender._py_seq, ts, b"")

    def native_frame(prepared: PreparedFrame, ts: int) -> None:
        native = prepared.native_packets(layout, core)
        for transport, _, track in viewers:
            if not transport.get_write_buffer_size():
                unsent = track.send(native, track.seq, ts)  # moves track.seq on
                if unsent:
                    for packet in unsent:
                        transport.sendto(packet, addr)

    tracks = [track for _, _, track in viewers]

    def batch_frame(prepared: PreparedFrame, ts: int) -> None:
        passed, unsent = core.send_batch(tracks, prepared.native_packets(layout, core), ts)
        for i, packets in unsent:
            transport = viewers[i][0]
            for packet in packets:
                transport.sendto(packet, addr)

    paths = (("python", python_frame), ("native", native_frame), ("batch", batch_frame))
    results: dict[str, list[float]] = {name: [] for name, _ in paths}
    for _ in range(args.rounds):
        for name, send in paths:
            start = cpu()
            for i in range(args.frames):
                send(frames[i % len(frames)], i * 3000)
                if i % 30 == 29:
                    await asyncio.sleep(0)  # let asyncio flush any queued packets
            results[name].append((cpu() - start) / (args.frames * args.viewers))
    for transport, _, _ in viewers:
        transport.close()
    sink.close()
    print(
        f"{args.viewers} viewers x {args.frames} frames of {size} B "
        f"({len(payloads)} packets), {args.profile}, load average {os.getloadavg()[0]:.1f}"
    )
    best = {name: min(costs) for name, costs in results.items()}
    for name, cost in best.items():
        rounds = ", ".join(f"{c * 1e6:.1f}" for c in results[name])
        print(
            f"{name:7s} {cost * 1e6:6.1f} us per viewer-frame (rounds: {rounds}) "
            f"-> {1 / (30 * cost):6.0f} viewers per core at 30 fps (send path only)"
        )
    print(
        f"native / python: {best['native'] / best['python']:.2f}, "
        f"batch / python: {best['batch'] / best['python']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.send_path_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--frames", type=int, default=150, help="frames per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kbps", type=int, default=1500, help="video bitrate (30 fps)")
    parser.add_argument("--profile", choices=list(PROFILES), default="SRTP_AEAD_AES_128_GCM")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
