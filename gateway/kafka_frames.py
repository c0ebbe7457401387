"""Frame records into Kafka: a lean produce path built from aiokafka's client and protocol.

Why a library path was replaced: a stream's frames are its Kafka traffic, one produce
request per video frame (audio rides along: ``gateway/ingest.py``), ~30 per second per
stream. Through aiokafka's generic producer the node spent ~0.9–1.0 ms of CPU per
produce request (``bench/kclient_cost.py``; docs/benchmarks.md, "The Kafka client's CPU
per request"), most of it the producer's machinery rather than the request: a record
future per record and a batch future per partition, the sender task woken through
``asyncio.wait`` over every pending future, a task per request, the accumulator's
bookkeeping. The same request sent on aiokafka's client (``AIOKafkaClient.send``, the
producer's own client and connection) from one task per request costs ~25 % less:
1.04 → 0.78 ms per request in the same benchmark. Everything on the wire is as before: the
request (aiokafka picks its version), acks=1, the record batches (aiokafka's builder).

:class:`FrameProducer` keeps what aiokafka's producer guaranteed for frames: one request
in flight per leader and partition (order), every record acknowledged or counted as lost
(``on_acked`` with its latency / ``on_failed``), retries after a leader change or a lost
connection until ``timeout_ms``, a bounded queue. Control-plane records keep aiokafka's
producer, and readers its consumer.

No private aiokafka name is used; the classes and methods used below the producer API
are listed in :data:`REQUIRED` and checked at import, like ``gateway/aiortc_compat.py``,
so an aiokafka that changes them fails at start-up.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from importlib import metadata

import aiokafka.errors as Errors
from aiokafka import AIOKafkaClient
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import TopicPartition

logger = logging.getLogger(__name__)

RETRY_BACKOFF_S = 0.1

REQUIRED: tuple[tuple[object, str, str], ...] = (
    (AIOKafkaClient, "bootstrap", "attr"),
    (AIOKafkaClient, "close", "attr"),
    (AIOKafkaClient, "send", "attr"),
    (AIOKafkaClient, "add_topic", "attr"),
    (AIOKafkaClient, "force_metadata_update", "attr"),
    (AIOKafkaClient, "cluster", "init"),
    (ProduceRequest, "required_acks", "attr"),
    (DefaultRecordBatchBuilder, "append", "attr"),
    (DefaultRecordBatchBuilder, "build", "attr"),
    (Errors, "for_code", "attr"),
)
"""What this module uses of aiokafka below its producer (no private name):
(owner, name, how), "init" = an attribute the class's ``__init__`` assigns."""


def check() -> None:
    """Fail at import, naming the version, when the installed aiokafka lacks one."""
    lacking = []
    for owner, name, how in REQUIRED:
        if how == "init":
            present = name in owner.__init__.__code__.co_names
        else:
            present = hasattr(owner, name)
        if not present:
            lacking.append(f"{getattr(owner, '__name__', owner)}.{name}")
    if lacking:
        raise ImportError(
            f"aiokafka {metadata.version('aiokafka')} lacks {', '.join(lacking)}, which "
            "whipcast's frame path (gateway/kafka_frames.py) uses"
        )


check()

METADATA_RETRY_S = 0.02
MAX_PENDING_BYTES = 64 * 1024 * 1024
"""Frames queued for a leader that does not answer beyond this are dropped (and counted)."""

Pending = collections.deque  # of (value, queued at perf_counter)


class FrameProducer:
    """Sends frame records with acks=1 on an aiokafka client, one request per leader.

    :meth:`send` queues a record and returns; every record queued in the same event-loop
    turn for partitions of one leader goes out in one produce request (a video frame and
    the audio riding with it), and records queued while a leader's request is in flight
    go in its next one.
    """

    def __init__(
        self,
        client: AIOKafkaClient,
        *,
        timeout_ms: int,
        max_record_bytes: int,
        on_acked: Callable[[float], None],
        on_failed: Callable[[BaseException | None], None],
    ) -> None:
        self._client = client
        self._timeout_ms = timeout_ms
        self._max_record_bytes = max_record_bytes
        self._on_acked = on_acked
        self._on_failed = on_failed
        self._pending: dict[TopicPartition, Pending] = {}
        self._pending_bytes = 0
        self._busy: set[TopicPartition] = set()  # partitions in a request in flight
        self._in_flight: dict[int, asyncio.Task] = {}  # leader -> its request
        self._topics: set[str] = set()
        self._scheduled = False
        self._closed = False

    def send(self, topic: str, partition: int, value: bytes) -> None:
        """Queue a record; its outcome goes to ``on_acked`` or ``on_failed``."""
        if self._closed or self._pending_bytes + len(value) > MAX_PENDING_BYTES:
            self._on_failed(Errors.KafkaTimeoutError("frame queue full or producer stopped"))
            return
        tp = TopicPartition(topic, partition)
        queue = self._pending.get(tp)
        if queue is None:
            queue = self._pending[tp] = collections.deque()
            if topic not in self._topics:
                self._topics.add(topic)
                self._client.add_topic(topic)
        queue.append((value, time.perf_counter()))
        self._pending_bytes += len(value)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _schedule(self, delay: float = 0.0) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            loop.call_later(delay, self._flush) if delay else loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Start a request for every leader that has records queued and none in flight."""
        self._scheduled = False
        if self._closed:
            return
        leader_for = self._client.cluster.leader_for_partition
        by_node: dict[int, list[TopicPartition]] = {}
        unknown = False
        for tp, queue in self._pending.items():
            if not queue or tp in self._busy:
                continue
            node = leader_for(tp)
            if node is None or node < 0:
                unknown = True
                self._expire(tp, queue)
            elif node not in self._in_flight:
                by_node.setdefault(node, []).append(tp)
        for node, tps in by_node.items():
            batches = {tp: self._take(tp) for tp in tps}
            self._busy.update(tps)
            self._in_flight[node] = asyncio.ensure_future(self._produce(node, batches))
        if unknown:  # a new topic, or a leader change: metadata first, then again
            self._client.force_metadata_update()
            self._schedule(METADATA_RETRY_S)

    def _take(self, tp: TopicPartition) -> tuple[bytes, list[tuple[bytes, float]]]:
        """A record batch of the partition's queued records, up to one record's size."""
        builder = DefaultRecordBatchBuilder(
            magic=2,
            compression_type=0,
            is_transactional=0,
            producer_id=-1,
            producer_epoch=-1,
            base_sequence=-1,
            batch_size=self._max_record_bytes,
        )
        queue = self._pending[tp]
        taken = []
        now_ms = int(time.time() * 1000)
        while queue:
            value = queue[0][0]
            offset = len(taken)  # offset delta within the batch
            if builder.append(offset, timestamp=now_ms, key=None, value=value, headers=[]) is None:
                break  # full: the rest goes in the next request
            taken.append(queue.popleft())
            self._pending_bytes -= len(value)
        return bytes(builder.build()), taken

    async def _produce(self, node: int, batches: dict) -> None:
        by_topic: dict[str, list[tuple[int, bytes]]] = {}
        for tp, (data, _records) in batches.items():
            by_topic.setdefault(tp.topic, []).append((tp.partition, data))
        request = ProduceRequest(None, 1, self._timeout_ms, list(by_topic.items()))
        retry: dict[TopicPartition, BaseException] = {}
        try:
            try:
                response = await self._client.send(node, request)
            except Errors.KafkaError as exc:  # connection lost, node gone, timed out
                retry = dict.fromkeys(batches, exc)
            except asyncio.CancelledError:  # stopped: these records are lost
                for _data, records in batches.values():
                    for _ in records:
                        self._on_failed(Errors.KafkaTimeoutError("producer stopped"))
                raise
            else:
                answered = set()
                for topic, partitions in response.topics:
                    for partition, error_code, *_ in partitions:
                        tp = TopicPartition(topic, partition)
                        if tp not in batches:
                            continue
                        answered.add(tp)
                        if error_code == 0:
                            now = time.perf_counter()
                            for _value, queued in batches[tp][1]:
                                self._on_acked(now - queued)
                            continue
                        error = Errors.for_code(error_code)()
                        if error.retriable:
                            retry[tp] = error
                        else:
                            for _ in batches[tp][1]:
                                self._on_failed(error)
                for tp in batches.keys() - answered:
                    retry[tp] = Errors.KafkaError(f"no answer for {tp}")
            if retry:
                self._client.force_metadata_update()
                for tp, error in retry.items():  # back to the front, in order
                    records = batches[tp][1]
                    self._pending[tp].extendleft(reversed(records))
                    self._pending_bytes += sum(len(v) for v, _ in records)
                    self._expire(tp, self._pending[tp], error)
                await asyncio.sleep(RETRY_BACKOFF_S)
        finally:
            self._busy.difference_update(batches)
            del self._in_flight[node]
            self._schedule()

    def _expire(
        self, tp: TopicPartition, queue: Pending, error: BaseException | None = None
    ) -> None:
        """Drop (and count) the records that waited longer than the timeout."""
        oldest = time.perf_counter() - self._timeout_ms / 1000
        while queue and queue[0][1] < oldest:
            value, _ = queue.popleft()
            self._pending_bytes -= len(value)
            self._on_failed(error or Errors.KafkaTimeoutError(f"no leader for {tp}"))

    async def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (for up to ``timeout``), then fail the rest."""
        deadline = time.monotonic() + timeout
        while (self._in_flight or any(self._pending.values())) and time.monotonic() < deadline:
            if self._in_flight:
                await asyncio.wait(list(self._in_flight.values()), timeout=RETRY_BACKOFF_S)
            else:
                self._flush()
                await asyncio.sleep(0.01)
        self._closed = True
        for task in list(self._in_flight.values()):
            task.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        for queue in self._pending.values():
            for _ in queue:
                self._on_failed(Errors.KafkaTimeoutError("producer stopped"))
            queue.clear()
        self._pending_bytes = 0
