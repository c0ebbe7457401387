"""Rewind benchmark: seek latency, time to first frame of a ``start=-30`` join, and the
gateway CPU of a rewinding viewer next to a live one.

    python -m bench.rewind_bench [--viewers 5] [--seconds 10] [--seeks 20] [--json FILE]

An embedded Apache Kafka broker, one ``whipcast dev`` process (every role, so its CPU
is the gateway's: read from ``/proc/PID/stat``), and the pre-encoded 720p30 ~1.5 Mbps
H.264 + Opus loop of ``gateway_bench`` published in real time by an aiortc peer in a
process of its own. Viewers are aiortc peers in this process that count RTP packets
instead of decoding. After a warm-up long enough for ``start=-30``:

- gateway CPU with no viewer, with N live viewers, with N viewers each rewound to a
  different point (each its own Kafka read), and with N viewers rewound to the same
  point (sharing one read); per viewer = (run - no viewer) / N;
- time to first frame for ``start=-30`` joins: WHEP POST sent to the first complete video
  frame received (ICE and DTLS included) — the same measure as the gateway benchmark's;
- seek latency: ``POST {session}/position`` with alternating ``seek`` values, request
  sent to its answer. The handler sends the new GOP before it answers, so this bounds
  the time from the request to the first frame sent from above.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import sys
import time

import aiohttp
from whipcast.gateway.broker import EmbeddedKafka
from whipcast.gateway.settings import Settings
from whipcast.loadtest.procs import CLK_TCK, free_port, machine

from bench.gateway_bench import (
    STREAM,
    BenchViewer,
    TrackCounters,
    _close_viewer,
    _count_rtp_packet,
    cpu_ticks,
    publisher_main,
    summary,
)


async def connect(http: aiohttp.ClientSession, base: str, query: str = "") -> BenchViewer:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    viewer = BenchViewer(pc, TrackCounters(), TrackCounters(audio=True))
    pc.addTransceiver("video", direction="recvonly").receiver._bench = viewer.video
    pc.addTransceiver("audio", direction="recvonly").receiver._bench = viewer.audio
    await pc.setLocalDescription(await pc.createOffer())
    viewer.posted_ns = time.time_ns()
    url = f"{base}/whep/{STREAM}" + (f"?{query}" if query else "")
    sdp_type = {"Content-Type": "application/sdp"}
    async with http.post(url, data=pc.localDescription.sdp, headers=sdp_type) as response:
        body = await response.text()
        if response.status != 201:
            await pc.close()
            raise RuntimeError(f"WHEP POST answered {response.status}: {body[:200]}")
        viewer.location = response.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return viewer


async def cpu_percent(pid: int, seconds: float) -> float:
    before = sum(cpu_ticks(pid) or (0, 0))
    start = time.monotonic()
    await asyncio.sleep(seconds)
    used = (sum(cpu_ticks(pid) or (0, 0)) - before) / CLK_TCK
    return 100 * used / (time.monotonic() - start)


async def run_viewers(http, base: str, queries: list[str], pid: int, seconds: float) -> dict:
    viewers = await asyncio.gather(*(connect(http, base, q) for q in queries))
    try:
        await asyncio.wait_for(asyncio.gather(*(v.video.started.wait() for v in viewers)), 30)
        ttff = [(v.video.first_frame_ns - v.posted_ns) / 1e6 for v in viewers]
        await asyncio.sleep(2)
        cpu = await cpu_percent(pid, seconds)
        return {"cpu_percent": cpu, "ttff_ms": ttff, "frames": sum(v.video.frames for v in viewers)}
    finally:
        await asyncio.gather(*(_close_viewer(http, base, v) for v in viewers))


async def seeks(http, base: str, count: int) -> list[float]:
    viewer = await connect(http, base, "start=-20")
    try:
        await asyncio.wait_for(viewer.video.started.wait(), 30)
        url = base + viewer.location + "/position"
        took = []
        for i in range(count):
            await asyncio.sleep(0.7)
            move = {"seek": -6} if i % 2 == 0 else {"seek": 5}
            sent = time.perf_counter()
            async with http.post(url, json=move) as response:
                await response.read()
                if response.status == 200:
                    took.append((time.perf_counter() - sent) * 1000)
        return took
    finally:
        await _close_viewer(http, base, viewer)


async def main(args) -> dict:
    from aiortc.rtcrtpreceiver import RTCRtpReceiver
    from whipcast.gateway.peer import use_host_addresses

    use_host_addresses(("127.0.0.1",))
    RTCRtpReceiver._handle_rtp_packet = _count_rtp_packet
    ctx = multiprocessing.get_context("spawn")
    async with EmbeddedKafka(Settings.from_env()) as kafka:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        node = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "whipcast.signaling.cli", "dev", "--kafka-bootstrap",
            kafka.bootstrap, "--port", str(port), "--log-level", "WARNING",
        )  # fmt: skip
        publisher = None
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(base + "/readyz") as response:
                            if response.status == 200:
                                break
                    await asyncio.sleep(0.2)
                parent, child = ctx.Pipe()
                publisher = ctx.Process(
                    target=publisher_main,
                    args=("aiortc", f"{base}/whip/{STREAM}", "", "", 10.0, 1500, child),
                    daemon=True,
                )
                publisher.start()
                message = await asyncio.to_thread(parent.recv)
                if message[0] != "live":
                    raise RuntimeError(f"publisher: {message}")
                print(f"publishing {message[1]}; warming up {args.warmup:.0f} s", flush=True)
                await asyncio.sleep(args.warmup)
                n, seconds, pid = args.viewers, args.seconds, node.pid
                results: dict = {"machine": machine(), "viewers": n}
                results["idle_cpu_percent"] = await cpu_percent(pid, seconds)
                results["live"] = await run_viewers(http, base, [""] * n, pid, seconds)
                apart = [f"start=-{30 - 3 * i}" for i in range(n)]
                results["rewind_apart"] = await run_viewers(http, base, apart, pid, seconds)
                same = ["start=-30"] * n
                results["rewind_same"] = await run_viewers(http, base, same, pid, seconds)
                results["seek_ms"] = summary(await seeks(http, base, args.seeks))
                idle = results["idle_cpu_percent"]
                for key in ("live", "rewind_apart", "rewind_same"):
                    run = results[key]
                    run["cpu_per_viewer"] = (run["cpu_percent"] - idle) / n
                    run["ttff_ms"] = summary(run["ttff_ms"])
                parent.send("stop")
        finally:
            if publisher is not None:
                publisher.join(5)
                if publisher.is_alive():
                    publisher.kill()
            node.terminate()
            await node.wait()
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=40.0)
    parser.add_argument("--seeks", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    cli()
