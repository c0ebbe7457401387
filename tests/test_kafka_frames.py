"""The frame path's lean producer (gateway/kafka_frames.py) against the real broker.

Frames queued in one event-loop turn go out together and every one is acknowledged
(latency observed) and read back in order; a frame that cannot reach a leader is
counted as lost once the timeout passes. Leader changes: tests/test_cluster.py (a
killed leader, and a stream whose partitions have two leaders).
"""

from __future__ import annotations

import asyncio
import time

from whipcast.gateway.bus import Bus, FrameReader
from whipcast.gateway.frames import Codec, Frame, Track
from whipcast.gateway.kafka_frames import FrameProducer, check
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.settings import Settings

from .conftest import until

ROUNDS = 40
AUDIO_PER_ROUND = 3


def frame(track: Track, n: int, size: int = 0) -> Frame:
    codec = Codec.H264 if track is Track.VIDEO else Codec.OPUS
    payload = bytes(size or (5000 if track is Track.VIDEO else 160))
    return Frame(track, codec, n == 0, n * 3000, 11, n, time.time_ns() // 1000, payload)


def acked(metrics: Metrics) -> float:
    name = "whipcast_kafka_produce_latency_seconds_count"
    return metrics.registry.get_sample_value(name) or 0.0


async def read_all(reader: FrameReader, want: int, timeout: float = 20) -> list[Frame]:
    got: list[Frame] = []

    async def read() -> None:
        async for batch in reader.read():
            got.extend(item.frame for item in batch)
            if len(got) >= want:
                return

    await asyncio.wait_for(read(), timeout)
    return got


async def test_frames_of_one_turn_are_all_acked_and_read_in_order(kafka, stream_name):
    check()
    metrics = Metrics()
    bus = Bus(Settings.from_env(env={}, kafka_bootstrap=kafka.bootstrap), metrics)
    await bus.start()
    reader = FrameReader(bus, stream_name)
    try:
        await bus.create_stream_topic(stream_name)
        await reader.start()
        topic = bus.stream_topic(stream_name)
        seq = {Track.VIDEO: 0, Track.AUDIO: 0}
        for n in range(ROUNDS):  # each round in one turn: one request of two batches
            for track in [Track.VIDEO] + [Track.AUDIO] * AUDIO_PER_ROUND:
                # two records too big to share a batch: the second goes in the next request
                size = 5 * 1024 * 1024 if track is Track.VIDEO and n in (5, 6) else 0
                await bus.send_frame(topic, frame(track, seq[track], size))
                seq[track] += 1
            if n % 4 == 0:
                await asyncio.sleep(0.01)
        total = ROUNDS * (1 + AUDIO_PER_ROUND)
        got = await read_all(reader, total)
        for track in Track:
            assert [f.sequence for f in got if f.track is track] == list(range(seq[track]))
        # the acks may trail the records read back by a little
        await until(lambda: acked(metrics) >= total or bus.produce_errors, 10)
        assert bus.produce_errors == 0
        assert acked(metrics) == total
    finally:
        await reader.stop()
        await bus.stop()


async def test_frames_without_a_leader_are_counted_lost(kafka, stream_name):
    metrics = Metrics()
    bus = Bus(Settings.from_env(env={}, kafka_bootstrap=kafka.bootstrap), metrics)
    await bus.start()
    lost: list[BaseException | None] = []
    try:
        await bus.create_stream_topic(stream_name)
        producer = FrameProducer(
            bus.producer.client,
            timeout_ms=300,
            max_record_bytes=1024 * 1024,
            on_acked=lambda latency: None,
            on_failed=lost.append,
        )
        topic = bus.stream_topic(stream_name)
        for n in range(5):  # partition 9 does not exist: never a leader
            producer.send(topic, 9, frame(Track.VIDEO, n).encode())
        producer.send(topic, 0, frame(Track.VIDEO, 0).encode())
        assert await until(lambda: len(lost) >= 5, 10), lost
        await producer.stop()
        assert len(lost) == 5  # the frame for partition 0 was delivered
    finally:
        await bus.stop()
