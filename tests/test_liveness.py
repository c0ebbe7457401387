"""Liveness without synchronized clocks, and records from newer versions (rolling
upgrades): the node and stream registries judge a writer by when *this* node received
its heartbeat, whatever time the writer's clock put in the record."""

from __future__ import annotations

import json
import math
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from whipcast.gateway.bus import Bus
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.nodes import STALE_AFTER_S, NodeInfo, NodeView
from whipcast.gateway.registry import RegistryView, StreamInfo
from whipcast.gateway.settings import Settings

DECADE_S = 10 * 365 * 24 * 3600


def _node_record(node: str, updated_at: float) -> bytes:
    """A heartbeat as a newer whipcast might write it: a field this version lacks, and
    a wall-clock time from a badly skewed machine."""
    info = NodeInfo(node, ["ingest", "egress"], "http://127.0.0.1:9", updated_at=updated_at)
    return json.dumps({**json.loads(info.encode()), "gpu_percent": 12.5}).encode()


def _record(key: str, value: bytes | None) -> ConsumerRecord:
    return ConsumerRecord("t", 0, 0, 0, 1, key.encode(), value, None, 0, 0, [])


def test_records_with_unknown_fields_are_read() -> None:
    node = NodeInfo.decode(_node_record("n1", 0.0))
    assert node.node == "n1" and node.roles == ["ingest", "egress"]
    stream = StreamInfo("s", 7, "n1")
    newer = json.dumps({**json.loads(stream.encode()), "region": "eu", "layers": [1, 2]})
    assert StreamInfo.decode(newer.encode()).session == 7


async def test_liveness_is_judged_by_receipt_not_by_the_writers_clock() -> None:
    # Unit level: the view's own bookkeeping, fed records as the consumer hands them.
    view = NodeView(Bus(Settings.from_env(env={}), Metrics()))
    view._current_at = time.monotonic()
    for name, skew in (("past", -DECADE_S), ("future", DECADE_S), ("exact", 0)):
        view._apply(_record(name, _node_record(name, time.time() + skew)), live=True)
    assert all(view.records[n].alive for n in ("past", "future", "exact"))
    # Read back from history at start-up: of unknown age until its writer beats again,
    # however recent its own timestamp claims to be.
    view._apply(_record("replayed", _node_record("replayed", time.time())), live=False)
    assert not view.records["replayed"].alive
    assert view.is_down("replayed")
    # Silence grows only while the view is known to be current.
    view._current_at = time.monotonic() + STALE_AFTER_S + 0.1
    assert not view.records["future"].alive
    assert NodeInfo("local", [], "").silence() == math.inf


async def test_skewed_heartbeats_through_kafka(kafka) -> None:
    prefix = f"live{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env(env={}, kafka_bootstrap=kafka.bootstrap, topic_prefix=prefix)
    bus = Bus(settings, Metrics())
    await bus.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    nodes = NodeView(bus)
    views = [nodes]
    try:
        await nodes.start()
        registry = RegistryView(bus, nodes)
        views.append(registry)
        await registry.start()
        stream = StreamInfo("skewed", 1, "past", updated_at=time.time() - DECADE_S)
        newer = {**json.loads(stream.encode()), "region": "eu"}
        await producer.send_and_wait(bus.registry_topic, json.dumps(newer).encode(), key=b"skewed")
        for name, skew in (("past", -DECADE_S), ("future", DECADE_S)):
            value = _node_record(name, time.time() + skew)
            await producer.send_and_wait(bus.nodes_topic, value, key=name.encode())
        assert await nodes.wait_for(lambda: {"past", "future"} <= set(nodes.records), 5)
        assert [n.node for n in nodes.alive("egress")] == ["past", "future"]
        assert await registry.wait_for(lambda: registry.get("skewed"), 5)

        # Silent writers go down after STALE_AFTER_S of this node's time, not before.
        went_silent = time.monotonic()
        assert await nodes.wait_for(lambda: not nodes.alive("egress"), STALE_AFTER_S + 3)
        assert time.monotonic() - went_silent >= STALE_AFTER_S - 0.5
        assert registry.get("skewed") is None  # its ingest is down

        # A node started now reads the same history but trusts none of it, even the
        # record stamped ten years ahead, until a fresh heartbeat arrives.
        late = NodeView(bus)
        views.append(late)
        await late.start()
        assert {"past", "future"} <= set(late.records)
        assert late.alive("egress") == []
        await producer.send_and_wait(
            bus.nodes_topic, _node_record("past", time.time() - DECADE_S), key=b"past"
        )
        assert await late.wait_for(lambda: [n.node for n in late.alive("egress")] == ["past"], 5)
    finally:
        for view in views:
            await view.stop()
        await producer.stop()
        await bus.stop()
