"""Frame readers wait long at the broker (few requests) yet get each frame at once.

A frame reader's fetch may wait ``kafka_fetch_wait_ms`` (500 ms) at the broker while
no record is there; Apache Kafka answers it as soon as one arrives. Against the real
embedded broker: a frame written while the reader's fetch waits must come out of
``FrameReader.read`` long before the wait would have ended.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from whipcast.gateway.bus import Bus, FrameReader
from whipcast.gateway.frames import Codec, Frame, Track
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.settings import Settings
from whipcast.signaling.cli import build_parser, settings_from

# A frame is written this long after the previous one came out of the reader, when the
# reader's next fetch is waiting at the broker: a broker that held the fetch to its end
# would deliver it only ~WAIT - GAP later.
GAP_S = 0.3
ROUNDS = 6


def _frame(track: Track, n: int) -> Frame:
    codec = Codec.H264 if track is Track.VIDEO else Codec.OPUS
    payload = bytes(4000 if track is Track.VIDEO else 160)
    return Frame(track, codec, n == 0, n * 3000, 7, n, time.time_ns() // 1000, payload)


async def test_long_fetch_wait_delivers_each_frame_at_once(kafka, stream_name):
    settings = Settings.from_env(env={}, kafka_bootstrap=kafka.bootstrap)
    assert settings.kafka_fetch_wait_ms >= 500
    bus = Bus(settings, Metrics())
    await bus.start()
    reader = FrameReader(bus, stream_name, lookback=0)
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def read() -> None:
        async for batch in reader.read():
            for _ in batch:
                arrived.put_nowait(time.monotonic())

    task = None
    try:
        await bus.create_stream_topic(stream_name)
        await reader.start()
        task = asyncio.create_task(read())
        await asyncio.sleep(1.0)  # the reader's first fetch is now waiting at the broker
        delays = []
        for n in range(ROUNDS):
            track = Track.VIDEO if n % 2 == 0 else Track.AUDIO
            sent = time.monotonic()
            await bus.send_frame(bus.stream_topic(stream_name), _frame(track, n))
            got = await asyncio.wait_for(arrived.get(), 5)
            delays.append(got - sent)
            await asyncio.sleep(GAP_S)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await reader.stop()
        await bus.stop()
    wait_s = settings.kafka_fetch_wait_ms / 1000
    # Held fetches would take ~WAIT - GAP (200 ms) for every frame; generous for a
    # loaded machine, far from that.
    assert statistics.median(delays) < (wait_s - GAP_S) / 2, delays


async def test_fetch_wait_flag_reaches_the_frame_readers_consumer():
    args = build_parser().parse_args(["egress", "--kafka-fetch-wait-ms", "20"])
    settings = settings_from(args).with_(kafka_bootstrap="127.0.0.1:9")
    bus = Bus(settings, Metrics())
    assert bus.consumer()._fetch_max_wait_ms == 20
    assert bus.consumer(500)._fetch_max_wait_ms == 500
    assert Bus(Settings(), Metrics()).consumer()._fetch_min_bytes == 1
