"""Recorder benchmark: CPU of one ``whipcast record`` process per recorded stream.

    python -m bench.recorder_bench [--streams 1 4] [--seconds 20] [--json FILE]

An embedded Apache Kafka broker; this process writes N streams of the pre-encoded
720p30 ~1.5 Mbps H.264 + Opus loop of ``gateway_bench`` straight to their stream topics
in real time (frame records as ingest writes them, no WebRTC), and one ``whipcast
record`` process records them all to a temporary directory. Its CPU is read from
``/proc/PID/stat`` once every stream is being written (warm-up excluded); per stream =
CPU / N. The recorder's fsyncs hit a temporary directory: on a slower disk they cost
wall time in its worker thread, not CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from whipcast.gateway.broker import EmbeddedKafka
from whipcast.gateway.bus import Bus
from whipcast.gateway.frames import Codec, Frame, Track
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.registry import StreamInfo, publish
from whipcast.gateway.settings import Settings
from whipcast.loadtest.procs import CLK_TCK, free_port

from bench.gateway_bench import FPS, cpu_ticks, preencode


async def feed(bus: Bus, stream: str, video, audio, stop: asyncio.Event) -> None:
    """One stream in real time: 30 video frames and 50 Opus packets a second."""
    session = hash(stream) & 0xFFFFFFFF
    await bus.create_stream_topic(stream)
    info = StreamInfo(stream, session, "bench", video={"mimeType": "video/H264",
                      "clockRate": 90000}, audio={"mimeType": "audio/opus",
                      "clockRate": 48000, "channels": 2})  # fmt: skip
    await publish(bus, info)
    topic, start, tick = bus.stream_topic(stream), time.monotonic(), 0
    while not stop.is_set():
        now_us = time.time_ns() // 1000
        if tick % 50 == 0:
            await publish(bus, info)  # heartbeat, as ingest does
        payload, key = video[(tick * FPS // 50) % len(video)]
        if tick * FPS % 50 < FPS:  # 30 of every 50 ticks
            n = tick * FPS // 50
            frame = Frame(Track.VIDEO, Codec.H264, key, n * 3000, session, n, now_us, payload)
            await bus.send_frame(topic, frame)
        opus = audio[tick % len(audio)]
        await bus.send_frame(
            topic, Frame(Track.AUDIO, Codec.OPUS, True, tick * 960, session, tick, now_us, opus)
        )
        tick += 1
        await asyncio.sleep(max(0.0, start + tick / 50 - time.monotonic()))


async def run(kafka: EmbeddedKafka, streams: int, seconds: float, video, audio) -> dict:
    settings = Settings.from_env(env={}, kafka_bootstrap=kafka.bootstrap)
    bus = Bus(settings, Metrics())
    await bus.start()
    root = Path(tempfile.mkdtemp(prefix="recorder-bench-"))
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "whipcast.signaling.cli", "record", "--dir", str(root),
        "--kafka-bootstrap", kafka.bootstrap, "--port", str(port), "--log-level", "WARNING",
    )  # fmt: skip
    stop = asyncio.Event()
    names = [f"bench-{streams}-{i}-{int(time.time())}" for i in range(streams)]
    feeders = [asyncio.create_task(feed(bus, n, video, audio, stop)) for n in names]
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                await asyncio.sleep(1)
                try:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                        text = await response.text()
                except aiohttp.ClientConnectionError:
                    continue
                if f"whipcast_recorder_streams {float(streams)}" in text:
                    break
            else:
                raise RuntimeError("the recorder never wrote every stream")
        await asyncio.sleep(3)  # warm-up
        before, started = sum(cpu_ticks(process.pid) or (0, 0)), time.monotonic()
        await asyncio.sleep(seconds)
        used = (sum(cpu_ticks(process.pid) or (0, 0)) - before) / CLK_TCK
        percent = 100 * used / (time.monotonic() - started)
        written = await asyncio.to_thread(
            lambda: sum(f.stat().st_size for f in root.rglob("*.mp4"))
        )
    finally:
        stop.set()
        await asyncio.gather(*feeders, return_exceptions=True)
        process.terminate()
        await process.wait()
        await bus.stop()
        shutil.rmtree(root, ignore_errors=True)
    per_stream = round(percent / streams, 2)
    return {"streams": streams, "cpu_percent": round(percent, 2),
            "cpu_percent_per_stream": per_stream, "bytes_written": written}  # fmt: skip


async def main(args) -> list[dict]:
    _, _, video, audio = preencode(10.0, 1500)
    results = []
    async with EmbeddedKafka(Settings.from_env()) as kafka:
        for streams in args.streams:
            result = await run(kafka, streams, args.seconds, video, audio)
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    cli()
