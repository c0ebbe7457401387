"""Tools benchmark: glass-to-glass of ``whipcast tap`` read like ``tap | ffplay``, of
``whipcast push`` to a WebRTC viewer, and the time to cut a 60 s clip.

    python -m bench.tools_bench [--seconds 10] [--clips 3] [--json FILE]

An embedded Apache Kafka broker and one ``whipcast dev`` process (every role). Video
carries a frame counter in its pixels (the test peers' ``draw_counter``, 320x240 at
30 fps), so each frame decoded at the far end is matched to the moment it was made:

- tap: an aiortc peer publishes over WHIP (capture time of frame i: the track's start
  plus i/30 s, when the track hands it to the encoder); ``whipcast tap`` (a process)
  writes MPEG-TS to a pipe that this process demuxes and decodes as ffplay does
  (``-fflags nobuffer``, tiny probe); latency = decoded here - captured;
- push: this process encodes (libx264 zerolatency, MPEG-TS, each frame flushed) into
  ``whipcast push``'s stdin in real time; an aiortc WHEP viewer decodes; latency =
  decoded by the viewer - frame written to the pipe;
- clip: ``GET /api/streams/{stream}/clip?from=-61&to=-1`` of the gateway benchmark's
  pre-encoded 720p30 ~1.5 Mbps H.264 + Opus loop (an aiortc publisher in a process of
  its own) once it has run 63 s: request sent to last byte received, with the size and
  the ``X-Clip-Duration`` the server reports.

The first 3 s of each reading are left out (the tap starts on the GOP in Kafka and
catches up). All of it shares the machine: its load average is in the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import multiprocessing
import os
import sys
import threading
import time

import aiohttp
import av
from whipcast.gateway.broker import EmbeddedKafka
from whipcast.gateway.settings import Settings
from whipcast.loadtest.procs import free_port, machine

from bench.gateway_bench import STREAM, publisher_main, summary
from tests.peers import draw_counter, play, publish, read_counter

FPS = 30
SKIP_S = 3.0
START_S = 6.0
CLIP_S = 60


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "whipcast.signaling.cli", *args]


def read_tap(pipe: int, decoded: list[tuple[float, int]], stop: threading.Event) -> None:
    """Demux and decode the tap's MPEG-TS as it comes, like ``ffplay -fflags nobuffer``."""
    options = {"fflags": "nobuffer", "probesize": "32768", "analyzeduration": "0"}
    # FFmpeg's pipe protocol, as ffplay reads stdin: a read returns what the pipe has (a
    # Python buffered file would wait for a whole 32 KiB buffer).
    with av.open(f"pipe:{pipe}", "r", format="mpegts", options=options) as container:
        for frame in container.decode(video=0):
            decoded.append((time.monotonic(), read_counter(frame)))
            if stop.is_set():
                return


async def tap_latency(kafka: str, publisher, seconds: float) -> dict:
    """``publisher``: the aiortc WHIP peer of ``bench-tap``, live for a second or more."""
    out, into = os.pipe()
    tap = await asyncio.create_subprocess_exec(
        *cli_command("tap", "bench-tap", "--kafka-bootstrap", kafka),
        stdout=into,
        stderr=asyncio.subprocess.DEVNULL,
    )
    os.close(into)
    decoded: list[tuple[float, int]] = []
    stop = threading.Event()
    reader = threading.Thread(target=read_tap, args=(out, decoded, stop), daemon=True)
    reader.start()
    try:
        await asyncio.sleep(seconds + SKIP_S + 2.0)  # ~2 s to start the tap process
    finally:
        stop.set()
        tap.terminate()
        await tap.wait()
        await asyncio.to_thread(reader.join, 10)
        os.close(out)
    start = publisher.track._start
    first = decoded[0][0] if decoded else 0.0
    latency = [
        (at - (start + counter / FPS)) * 1000 for at, counter in decoded if at > first + SKIP_S
    ]
    return {"frames": len(decoded), "latency_ms": summary(latency)}


def feed_push(stdin, sent: dict[int, float], frames: int) -> None:
    """Encode counter frames in real time into ``push``'s stdin, each flushed at once;
    until ``frames`` are sent or push has gone."""
    options = {"flush_packets": "1"}
    with (
        contextlib.suppress(OSError, ValueError, av.FFmpegError),
        av.open(stdin, "w", format="mpegts", options=options) as out,
    ):
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
        video.options = {"bf": "0", "g": str(FPS), "preset": "ultrafast",
                         "tune": "zerolatency"}  # fmt: skip
        start = time.monotonic()
        for i in range(frames):
            time.sleep(max(0.0, start + i / FPS - time.monotonic()))
            picture = draw_counter(i).reformat(format="yuv420p")
            picture.pts, picture.time_base = i, fractions.Fraction(1, FPS)
            out.mux(video.encode(picture))
            sent[i] = time.monotonic()


async def push_latency(kafka: str, base: str, seconds: float) -> dict:
    out, into = os.pipe()
    push = await asyncio.create_subprocess_exec(
        *cli_command("push", "bench-push", "--kafka-bootstrap", kafka),
        stdin=out,
        stderr=asyncio.subprocess.DEVNULL,
    )
    os.close(out)
    stdin = os.fdopen(into, "wb", buffering=0)
    sent: dict[int, float] = {}
    total = int((seconds + SKIP_S + 6.0) * FPS)
    feeder = threading.Thread(target=feed_push, args=(stdin, sent, total), daemon=True)
    await asyncio.sleep(START_S)  # push starts (imports, Kafka) and waits on its stdin
    feeder.start()
    viewer = None
    try:
        for _ in range(50):  # until push is live
            with contextlib.suppress(AssertionError):
                viewer = await play(base, "bench-push")
                break
            await asyncio.sleep(0.2)
        if viewer is None:
            raise RuntimeError("push never went live")
        await asyncio.sleep(seconds + SKIP_S)
        first = viewer.frames[0][0] if viewer.frames else 0.0
        latency = [
            (at - sent[counter]) * 1000
            for at, counter, _ in viewer.frames
            if at > first + SKIP_S and counter in sent
        ]
        return {"frames": len(viewer.frames), "latency_ms": summary(latency)}
    finally:
        if viewer is not None:
            await viewer.close()
        push.terminate()
        await push.wait()
        await asyncio.to_thread(feeder.join, 10)
        with contextlib.suppress(OSError):
            stdin.close()


async def clip_times(http: aiohttp.ClientSession, base: str, count: int) -> dict:
    url = f"{base}/api/streams/{STREAM}/clip?from=-{CLIP_S + 1}&to=-1"
    took, sizes, durations = [], [], []
    for _ in range(count):
        sent = time.perf_counter()
        async with http.get(url) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"clip answered {response.status}: {body[:200]!r}")
            durations.append(float(response.headers["X-Clip-Duration"]))
        took.append((time.perf_counter() - sent) * 1000)
        sizes.append(len(body))
    return {"ms": summary(took), "bytes": sizes, "duration_s": durations}


async def main(args) -> dict:
    from whipcast.gateway.peer import use_host_addresses

    use_host_addresses(("127.0.0.1",))
    results: dict = {"machine": machine(), "loadavg_before": os.getloadavg()}
    async with EmbeddedKafka(Settings.from_env()) as kafka:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        node = await asyncio.create_subprocess_exec(
            *cli_command("dev", "--kafka-bootstrap", kafka.bootstrap, "--port", str(port),
                         "--log-level", "WARNING"),
        )  # fmt: skip
        keep = clip_publisher = None
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(base + "/readyz") as response:
                            if response.status == 200:
                                break
                    await asyncio.sleep(0.2)
                started = time.monotonic()
                if args.clips:  # the gateway benchmark's 720p30 1.5 Mbps loop, to clip
                    parent, child = multiprocessing.get_context("spawn").Pipe()
                    clip_publisher = multiprocessing.get_context("spawn").Process(
                        target=publisher_main,
                        args=("aiortc", f"{base}/whip/{STREAM}", "", "", 10.0, 1500, child),
                        daemon=True,
                    )
                    clip_publisher.start()
                    message = await asyncio.to_thread(parent.recv)
                    if message[0] != "live":
                        raise RuntimeError(f"publisher: {message}")
                    started = time.monotonic()
                keep = await publish(base, "bench-tap")
                await asyncio.sleep(2.0)  # in the registry
                results["tap"] = await tap_latency(kafka.bootstrap, keep, args.seconds)
                print("tap", json.dumps(results["tap"]), flush=True)
                await keep.close()
                keep = None
                results["push"] = await push_latency(kafka.bootstrap, base, args.seconds)
                print("push", json.dumps(results["push"]), flush=True)
                if args.clips:
                    await asyncio.sleep(max(0.0, started + CLIP_S + 3 - time.monotonic()))
                    results["clip_60s"] = await clip_times(http, base, args.clips)
                    print("clip", json.dumps(results["clip_60s"]), flush=True)
                    parent.send("stop")
        finally:
            if keep is not None:
                await keep.close()
            if clip_publisher is not None:
                clip_publisher.join(5)
                if clip_publisher.is_alive():
                    clip_publisher.kill()
            node.terminate()
            await node.wait()
    results["loadavg_after"] = os.getloadavg()
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="of each latency reading")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    cli()
