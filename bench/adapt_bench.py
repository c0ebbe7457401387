"""Adaptation benchmark (issue 14): a constrained and an unconstrained viewer of one
stream, and the gateway CPU that per-viewer estimation adds.

    python -m bench.adapt_bench [--link-kbps 800] [--loss 0.02] [--seconds 30] [--json FILE]
    python -m bench.adapt_bench --no-viewer-adapt      # the same run without estimation
    python -m bench.adapt_bench --layers               # a three-layer simulcast stream

An embedded Apache Kafka broker, one ``whipcast dev`` process (every role: its CPU is
the gateway's, read from ``/proc/PID/stat``) and the pre-encoded 720p30 ~1.5 Mbps H.264
+ Opus loop of ``gateway_bench``, published in real time by an aiortc peer in a process
of its own. The two viewers are aiortc peers in this process that decode video (so
their receivers send real RR, NACK and REMB). The constrained one sits behind a
simulated link (:class:`Link`: a bottleneck FIFO with a 100 ms queue, then random
loss, applied where aiortc hands a received packet to its receiver; arrival times are
the delayed ones, so its REMB estimator sees the queue). Phases:

1. both unconstrained for ``--warmup`` s;
2. **drop**: the link falls to ``--link-kbps`` with ``--loss``; *settle* = seconds from
   the drop until the link stops overflowing (under 5 % of packets dropped by its queue
   over a sliding 2 s window, held for 2 s);
3. ``--seconds`` s steady: frames decoded per second and freezes per minute for both
   viewers (a freeze: an inter-frame gap over max(3 x mean interval, mean + 150 ms), the
   WebRTC stats definition), link drops, the gateway's estimate for the constrained one;
4. **recovery**: the limit and loss are lifted; *settle* = seconds until the viewer
   decodes >= 90 % of the source frame rate over 1 s; *live* = seconds until the
   gateway says the viewer's video is live and keeps it so for 3 s (the gateway's
   part, apart from the test viewer's decoding on a busy machine), with its states;
5. gateway CPU with no viewer and with ``--cpu-viewers`` unconstrained viewers: per
   viewer = (run - idle) / N. Compare a run with ``--no-viewer-adapt``: the difference is
   what estimation costs (the abs-send-time stamp is written in both, as negotiated).

``--layers``: the stream is ``tests/layered_source.py``'s instead (the same picture in
three H.264 layers, 320x240 ~1.5 Mbps, 160x120 ~400 kbps, 80x60 ~120 kbps, written into
the broker as a simulcast ingest writes them, keyframes every second and on request per
layer), no audio, and the gateway runs with its defaults (layer choice needs no
``--viewer-adapt``). The constrained viewer's layer is sampled every 0.5 s, and its
layer switches and failed tries of a better layer are reported. Both viewers decode the
first complete keyframe after a gap NACKs could not fill, as browsers do
(``peers.resync_on_keyframes``; aiortc alone waits 512 packets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp
from whipcast.gateway.broker import EmbeddedKafka
from whipcast.gateway.bus import Bus
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.settings import Settings
from whipcast.loadtest.procs import free_port, machine

from bench.gateway_bench import FPS, STREAM, publisher_main
from bench.rewind_bench import cpu_percent
from tests.layered_source import LayeredSource
from tests.peers import resync_on_keyframes


@dataclass
class Link:
    """A bottleneck: packets leave a FIFO at ``bitrate`` bits/s (None: unlimited), one
    that would wait over ``queue_s`` is dropped, and ``loss`` of all are dropped at random."""

    bitrate: float | None = None
    loss: float = 0.0
    queue_s: float = 0.1
    overhead: int = 40
    log: list = field(default_factory=list)
    """(time, dropped by the queue) per packet, for the settle measure."""
    _busy_until: float = 0.0

    def admit(self, size: int, now: float, rng: random.Random) -> float | None:
        if self.loss and rng.random() < self.loss:
            self.log.append((now, False))
            return None
        if self.bitrate is None:
            self.log.append((now, False))
            return 0.0
        start = max(now, self._busy_until)
        if start - now > self.queue_s:
            self.log.append((now, True))
            return None
        self.log.append((now, False))
        self._busy_until = start + (size + self.overhead) * 8 / self.bitrate
        return self._busy_until - now


@dataclass
class Viewer:
    pc: object
    location: str = ""
    frames: list = field(default_factory=list)
    tasks: list = field(default_factory=list)
    ended: str | None = None
    """Why its video track stopped giving frames, if it did."""


async def connect(
    http: aiohttp.ClientSession, base: str, link: Link | None, resync: bool = False
) -> Viewer:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.clock import current_ms

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    viewer = Viewer(pc)
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp_type = {"Content-Type": "application/sdp"}
    url, sdp = f"{base}/whep/{STREAM}", pc.localDescription.sdp
    async with http.post(url, data=sdp, headers=sdp_type) as r:
        body = await r.text()
        if r.status != 201:
            await pc.close()
            raise RuntimeError(f"WHEP POST answered {r.status}: {body[:200]}")
        viewer.location = r.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    loop, rng = asyncio.get_running_loop(), random.Random(7)
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if link is not None:
            handle = receiver._handle_rtp_packet  # where aiortc hands over each packet

            async def shaped(packet, arrival_time_ms, handle=handle) -> None:
                delay = link.admit(len(packet.payload), time.monotonic(), rng)
                if delay is None:
                    return
                if delay <= 0:
                    await handle(packet, arrival_time_ms)
                else:
                    loop.call_later(delay, lambda: loop.create_task(handle(packet, current_ms())))

            receiver._handle_rtp_packet = shaped
        if transceiver.kind == "video":
            if resync:
                resync_on_keyframes(receiver)
            viewer.tasks.append(asyncio.create_task(_consume(viewer, receiver.track)))
    return viewer


async def _consume(viewer: Viewer, track) -> None:
    try:
        while True:
            await track.recv()
            viewer.frames.append(time.monotonic())
    except Exception as exc:  # the track ended (or broke): say so in the results
        viewer.ended = f"{type(exc).__name__}: {exc}"


async def close(http: aiohttp.ClientSession, base: str, viewer: Viewer) -> None:
    for task in viewer.tasks:
        task.cancel()
    with contextlib.suppress(Exception):
        async with http.delete(base + viewer.location) as response:
            await response.read()
    with contextlib.suppress(Exception):
        await viewer.pc.close()


def playback(frames: list[float], start: float, end: float) -> dict:
    """Frames decoded per second and freezes per minute over [start, end)."""
    times = [t for t in frames if start <= t < end]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    if not gaps:
        return {"fps": 0.0, "freezes_per_min": None, "longest_gap_s": None}
    mean = sum(gaps) / len(gaps)
    freezes = sum(1 for g in gaps if g > max(3 * mean, mean + 0.15))
    minutes = (end - start) / 60
    return {
        "fps": round(len(times) / (end - start), 1),
        "freezes_per_min": round(freezes / minutes, 1),
        "longest_gap_s": round(max(gaps), 2),
    }


async def settle_after_drop(link: Link, since: float, limit: float) -> float | None:
    """Seconds until the link's queue drops stay under 5 % over 2 s windows for 2 s."""
    calm_since = None
    while time.monotonic() - since < limit:
        await asyncio.sleep(0.25)
        now = time.monotonic()
        window = [dropped for at, dropped in link.log if at >= max(since, now - 2)]
        calm = now - since >= 2 and sum(window) <= 0.05 * max(1, len(window))
        if not calm:
            calm_since = None
        elif calm_since is None:
            calm_since = now
        elif now - calm_since >= 2:
            return round(calm_since - since, 2)
    return None


async def settle_after_recovery(
    http: aiohttp.ClientSession, base: str, viewer: Viewer, since: float, limit: float
) -> tuple[float | None, float | None, list]:
    """(seconds until the viewer decodes >= 90 % of the source frame rate over 1 s,
    seconds until the gateway says its video is live and keeps it live for 3 s, the
    gateway's (seconds, video, estimate kbps, frames it sent, frames decoded) every
    0.5 s meanwhile)."""
    decoding = live_since = None
    states: list = []
    polled = 0.0
    while time.monotonic() - since < limit:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        if decoding is None and sum(1 for t in viewer.frames if t >= now - 1) >= 0.9 * FPS:
            decoding = round(now - since, 2)
        if now - polled >= 0.5:
            polled = now
            state = await session_state(http, base, viewer)
            states.append(
                (
                    round(now - since, 1),
                    state.get("video"),
                    state.get("estimate_kbps"),
                    state.get("frames_sent"),
                    len(viewer.frames),
                )
            )
            if state.get("video") != "live":
                live_since = None
            elif live_since is None:
                live_since = now
        if decoding is not None and live_since is not None and now - live_since >= 3:
            break
    held = live_since is not None and time.monotonic() - live_since >= 3
    return decoding, round(live_since - since, 2) if held else None, states


async def settle_on_layer(
    http: aiohttp.ClientSession,
    base: str,
    viewer: Viewer,
    layer: int,
    since: float,
    limit: float,
) -> float | None:
    """Seconds until the viewer's session resource names ``layer``."""
    while time.monotonic() - since < limit:
        await asyncio.sleep(0.25)
        if (await session_state(http, base, viewer)).get("layer") == layer:
            return round(time.monotonic() - since, 2)
    return None


async def session_state(http: aiohttp.ClientSession, base: str, viewer: Viewer) -> dict:
    async with http.get(base + viewer.location) as response:
        return await response.json() if response.status == 200 else {}


async def scenario(http, base: str, args) -> dict:
    link = Link()
    slow = await connect(http, base, link, True)
    fast = await connect(http, base, None, True)
    try:
        await asyncio.sleep(args.warmup)
        link.bitrate, link.loss = args.link_kbps * 1000, args.loss
        dropped_at = time.monotonic()
        settle_drop = await settle_after_drop(link, dropped_at, 30)
        start = time.monotonic()
        estimates, layers = [], []
        while time.monotonic() - start < args.seconds:
            state = await session_state(http, base, slow)
            if state.get("estimate_kbps") is not None:
                estimates.append(state["estimate_kbps"])
            if state.get("layer") is not None:
                layers.append(state["layer"])
            await asyncio.sleep(0.5)
        end = time.monotonic()
        window = [dropped for at, dropped in link.log if start <= at < end]
        constrained = playback(slow.frames, start, end)
        constrained["link_queue_drop_share"] = round(sum(window) / max(1, len(window)), 3)
        constrained["estimate_kbps"] = {
            "min": min(estimates, default=None),
            "median": sorted(estimates)[len(estimates) // 2] if estimates else None,
            "max": max(estimates, default=None),
        }
        constrained["pauses"] = (await session_state(http, base, slow)).get("pauses")
        if layers:
            constrained["layer_share"] = {
                k: round(layers.count(k) / len(layers), 2) for k in sorted(set(layers))
            }
        link.bitrate, link.loss = None, 0.0
        lifted = time.monotonic()
        if args.layers:
            settle_up = await settle_on_layer(http, base, slow, 0, lifted, 45)
            live_up, states = None, []
        else:
            settle_up, live_up, states = await settle_after_recovery(http, base, slow, lifted, 30)
        now = time.monotonic()
        # Both viewers decode in this process: after recovery they share its CPU, so
        # compare the two rates over the same last seconds.
        recovered = {
            "constrained_fps": playback(slow.frames, now - 5, now)["fps"],
            "unconstrained_fps": playback(fast.frames, now - 5, now)["fps"],
            "constrained_packets": sum(1 for at, _ in link.log if at >= now - 5),
            "constrained_track_ended": slow.ended,
        }
        results = {
            "constrained": constrained,
            "unconstrained": playback(fast.frames, start, end),
            "settle_after_drop_s": settle_drop,
            "settle_after_recovery_s": settle_up,
            "live_after_recovery_s": live_up,
            "after_recovery_last_5_s": recovered,
            "recovery_states": states,
        }
        if args.layers:
            async with http.get(f"{base}/api/stats") as response:
                egress = (await response.json())["streams"][STREAM]["egress"]
            results["layers"] = {
                key: egress[key]
                for key in ("layer_switches_down", "layer_switches_up", "layer_failed_ups")
            }
            results["unconstrained"]["layer"] = (await session_state(http, base, fast)).get("layer")
        return results
    finally:
        await close(http, base, slow)
        await close(http, base, fast)


async def cpu_per_viewer(
    http, base: str, pid: int, n: int, seconds: float, resync: bool = False
) -> dict:
    idle = await cpu_percent(pid, seconds)
    viewers = [await connect(http, base, None, resync) for _ in range(n)]
    try:
        await asyncio.sleep(3)
        before = sum(len(v.frames) for v in viewers)
        busy = await cpu_percent(pid, seconds)
        fps = (sum(len(v.frames) for v in viewers) - before) / seconds / n
    finally:
        for viewer in viewers:
            await close(http, base, viewer)
    return {"idle_percent": round(idle, 1), "viewers": n, "percent": round(busy, 1),
            "per_viewer_percent": round((busy - idle) / n, 2),
            "fps_per_viewer": round(fps, 1)}  # fmt: skip


async def main(args) -> dict:
    from whipcast.gateway.peer import use_host_addresses

    use_host_addresses(("127.0.0.1",))
    ctx = multiprocessing.get_context("spawn")
    async with EmbeddedKafka(Settings.from_env()) as kafka:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        flags = [] if args.no_viewer_adapt or args.layers else ["--viewer-adapt"]
        node = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "whipcast.signaling.cli", "dev", "--kafka-bootstrap",
            kafka.bootstrap, "--port", str(port), "--log-level", "WARNING", *flags,
        )  # fmt: skip
        publisher = layered = None
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(base + "/readyz") as response:
                            if response.status == 200:
                                break
                    await asyncio.sleep(0.2)
                if args.layers:
                    bus = Bus(Settings.from_env(kafka_bootstrap=kafka.bootstrap), Metrics())
                    await bus.start()
                    layered = LayeredSource(bus, STREAM)
                    await layered.start()
                    print("publishing three layers", flush=True)
                else:
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
                    print(f"publishing {message[1]}", flush=True)
                await asyncio.sleep(3)
                results: dict = {"machine": machine(), "adapt": not args.no_viewer_adapt,
                                 "layers": args.layers, "link_kbps": args.link_kbps,
                                 "loss": args.loss}  # fmt: skip
                if not args.cpu_only:
                    results.update(await scenario(http, base, args))
                results["cpu"] = await cpu_per_viewer(
                    http, base, node.pid, args.cpu_viewers, args.cpu_seconds, args.layers
                )
                if publisher is not None:
                    parent.send("stop")
        finally:
            if layered is not None:
                await layered.stop()
                await bus.stop()
            if publisher is not None:
                publisher.join(5)
                if publisher.is_alive():
                    publisher.kill()
            node.terminate()
            await node.wait()
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link-kbps", type=float, default=800)
    parser.add_argument("--loss", type=float, default=0.02)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="constrained window")
    parser.add_argument("--cpu-viewers", type=int, default=4)
    parser.add_argument("--cpu-seconds", type=float, default=10.0)
    parser.add_argument("--cpu-only", action="store_true", help="skip the link scenario")
    parser.add_argument("--no-viewer-adapt", action="store_true")
    parser.add_argument("--layers", action="store_true", help="publish a three-layer "
                        "simulcast stream (tests/layered_source.py)")  # fmt: skip
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    cli()
