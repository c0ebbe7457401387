"""One consumer per node for the control-plane topics (gateway/topic_reader.py): topics
followed at different times, while records keep coming, reach every follower once and
in order, against the real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from whipcast.gateway.bus import Bus
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.settings import Settings
from whipcast.gateway.topic_reader import TopicReader

WRITES = 60


async def _until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_followers_come_and_go_without_losing_records(kafka) -> None:
    prefix = f"reader{uuid.uuid4().hex[:6]}"
    a, b = f"{prefix}.a", f"{prefix}.b"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(a, 1, 1), NewTopic(b, 1, 1)])
    await admin.close()
    bus = Bus(Settings.from_env(env={}, kafka_bootstrap=kafka.bootstrap), Metrics())
    await bus.start()
    consumers = []
    make_consumer = bus.consumer

    def counted(*args, **kwargs):
        consumers.append(make_consumer(*args, **kwargs))
        return consumers[-1]

    bus.consumer = counted  # type: ignore[method-assign]
    reader = TopicReader.of(bus)
    got: dict[str, list[tuple[bytes, bool]]] = defaultdict(list)
    current: dict[str, int] = defaultdict(int)

    def collect(name: str):
        return lambda record, live: got[name].append((record.value, live))

    def count(name: str):
        def now_current() -> None:
            current[name] += 1

        return now_current

    followings = []
    try:
        for n in range(2):
            await bus.send_record(a, "k", f"a{n}".encode())
        await bus.send_record(b, "k", b"b0")
        followings.append(await reader.follow(a, collect("a"), history=True))
        assert got["a"] == [(b"a0", False), (b"a1", False)]

        # Records keep coming on ``a`` while followers of both topics come and go, each
        # one re-assigning the consumer: none may be lost or handed over twice.
        async def write() -> None:
            for n in range(2, WRITES):
                await bus.send_record(a, "k", f"a{n}".encode())

        writer = asyncio.create_task(write())
        await asyncio.sleep(0.05)
        followings.append(await reader.follow(b, collect("b"), history=True, on_current=count("b")))
        tail = await reader.follow(a, collect("a-end"), history=False)
        await asyncio.sleep(0.05)
        # Each reads the history with a consumer of its own and joins where that ended,
        # often behind the shared consumer, which then goes back for it.
        for n in range(3):
            followings.append(await reader.follow(a, collect(f"a-again{n}"), history=True))
        await reader.unfollow(tail)
        await asyncio.sleep(0.05)
        followings.append(await reader.follow(a, collect("a-end2"), history=False))
        await asyncio.wait_for(writer, 30)
        expected = [f"a{n}".encode() for n in range(WRITES)]
        again = [f"a-again{n}" for n in range(3)]
        assert await _until(lambda: all(len(got[name]) >= WRITES for name in ["a", *again]))
        await asyncio.sleep(0.3)  # anything handed over twice would have come by now
        for name in ["a", *again]:
            assert [value for value, _ in got[name]] == expected, name
        assert all(live for _, live in got["a"][2:])
        # A follower from the end gets a run of the records that came after it, all live.
        for name in ("a-end", "a-end2"):
            values = [value for value, _ in got[name]]
            start = expected.index(values[0]) if values else 0
            assert values == expected[start : start + len(values)], (name, values)
            assert all(live for _, live in got[name])
        assert got["b"] == [(b"b0", False)]

        # ``b`` is silent, yet its follower hears that it is current (the one fetch
        # covers both topics), and a record on it comes live.
        seen = current["b"]
        assert await _until(lambda: current["b"] >= seen + 2)
        await bus.send_record(b, "k", b"b1")
        assert await _until(lambda: len(got["b"]) == 2)
        assert got["b"][1] == (b"b1", True)

        # A follower that left gets nothing more; the others still do.
        await reader.unfollow(followings.pop(0))
        await bus.send_record(a, "k", b"last")
        assert await _until(lambda: got["a-again0"][-1][0] == b"last")
        assert got["a"][-1][0] == expected[-1]
        # One consumer follows; those that read a history or an end offset are gone.
        assert len([c for c in consumers if not c._closed]) == 1
    finally:
        for following in followings:
            await reader.unfollow(following)
        # With the last follower gone the consumer has stopped.
        assert reader._task is None or reader._task.done()
        await bus.stop()
    assert all(c._closed for c in consumers)


async def test_leaving_at_once_stops_the_consumer(kafka) -> None:
    """Followers leaving right after one came (a node stopped just after it started):
    the consumer stops. (Re-assigned to nothing and stopped in the same turn, it hung:
    aiokafka's fetcher swallowed the stop while it cancelled the old fetches.)"""
    prefix = f"reader{uuid.uuid4().hex[:6]}"
    topics = [f"{prefix}.{n}" for n in range(2)]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1) for topic in topics])
    await admin.close()
    bus = Bus(Settings.from_env(env={}, kafka_bootstrap=kafka.bootstrap), Metrics())
    await bus.start()
    reader = TopicReader.of(bus)
    try:
        for turns in range(6):
            first = await reader.follow(topics[0], lambda record, live: None, history=True)
            await asyncio.sleep(0.3)  # the consumer has started and polls
            second = await reader.follow(topics[1], lambda record, live: None, history=False)
            for _ in range(turns):  # the reader re-assigns, and is a few turns on
                await asyncio.sleep(0)
            await asyncio.wait_for(reader.unfollow(first), 10)
            await asyncio.wait_for(reader.unfollow(second), 10)
            assert reader._task.done()
    finally:
        await bus.stop()
