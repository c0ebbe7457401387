"""How long a live session packaged on demand takes to reach the live edge.

    python -m bench.hls_catchup [--minutes 1 5 10] [--json FILE]

With on-demand packaging (the default, ``hls_always_package`` off) the first request
for a live stream opens its package, which reads the session from its first keyframe
and segments it all before the first playlist is answered (``SessionPackage.caught_up``),
so that every node cuts the same bytes. This writes ``--minutes`` of 720p30 H.264 at
1.5 Mbit/s plus 20 ms Opus (``bench/hls_bench.py``'s media, looped, with arrival times
as if the session had started that long ago) into a stream topic on an embedded broker,
then opens a :class:`~whipcast.gateway.hls.packager.SessionPackage` on it as the first
request would and reports the wall time and this process's CPU time (Kafka consumer +
segmenting) until it has caught up. The retention is raised for the run so that the
session's start stays in Kafka.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time

from whipcast.gateway.broker import EmbeddedKafka
from whipcast.gateway.bus import Bus
from whipcast.gateway.frames import Codec, Frame, Track
from whipcast.gateway.hls.packager import SessionPackage
from whipcast.gateway.keyframes import KeyframeFinder
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.registry import StreamInfo
from whipcast.gateway.settings import Settings

from .hls_bench import encode_video

LOOP_S = 20.0


def records(video: list[tuple[bytes, bool]], seconds: float, start_us: int, session: int):
    """Video and 20 ms audio records in arrival order, ``video`` looped for ``seconds``."""
    audio_ts = 0
    for i in range(int(seconds * 30)):
        data, key = video[i % len(video)]
        at = start_us + i * 33_333
        yield Frame(Track.VIDEO, Codec.H264, key, i * 3000, session, i, at, data)
        while audio_ts * 1_000_000 // 48000 <= i * 33_333:
            at = start_us + audio_ts * 1_000_000 // 48000
            yield Frame(Track.AUDIO, Codec.OPUS, True, audio_ts, session, audio_ts // 960, at,
                        bytes(120))  # fmt: skip
            audio_ts += 960


async def one(settings: Settings, bus: Bus, finder, video, minutes: float) -> dict:
    stream, session = f"catchup-{secrets.token_hex(3)}", secrets.randbits(32)
    await bus.create_stream_topic(stream)
    topic = bus.stream_topic(stream)
    started = time.time() - minutes * 60
    written = 0
    for frame in records(video, minutes * 60, int(started * 1e6), session):
        written += len(frame.payload)
        await bus.send_frame(topic, frame)
    await bus.producer.flush()
    info = StreamInfo(stream, session, "bench", started_at=started)
    info.video, info.audio = {"mimeType": "video/H264"}, {"mimeType": "audio/opus"}
    package = SessionPackage(settings, bus, finder, info)
    wall, cpu = time.perf_counter(), time.process_time()
    package.start(lambda: True)
    await package.wait_for(lambda: package.caught_up and package.last_part is not None, 900)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {
        "minutes": minutes,
        "megabytes": round(written / 1e6, 1),
        "parts": package.segmenter.parts_made,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "media_s_per_wall_s": round(minutes * 60 / wall, 1),
    }
    await package.stop()
    return result


async def main(minutes: list[float]) -> list[dict]:
    settings = Settings.from_env(stream_retention_ms=int(max(minutes) * 60_000 + 600_000))
    video = encode_video(LOOP_S)
    async with EmbeddedKafka(settings) as kafka:
        settings = settings.with_(kafka_bootstrap=kafka.bootstrap)
        bus = Bus(settings, Metrics())
        await bus.start()
        finder = KeyframeFinder(bus, settings.rewind_search_s * 1000)
        try:
            results = []
            for m in minutes:
                results.append(await one(settings, bus, finder, video, m))
                print(json.dumps(results[-1]), flush=True)
            return results
        finally:
            await finder.stop()
            await bus.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 5, 10])
    parser.add_argument("--json")
    args = parser.parse_args()
    out = asyncio.run(main(args.minutes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
