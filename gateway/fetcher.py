"""A lean fetch loop for frame readers, built from aiokafka's client and protocol classes.

Why a library path was replaced: a frame reader (``bus.FrameReader``: egress, HLS, tap,
replay) sends one fetch per produce request, ~30 per second per stream, and through
``AIOKafkaConsumer.getmany`` each of them costs the node ~0.75 ms of CPU (measured in
``bench/kclient_cost.py``; docs/benchmarks.md, section 2f). Most of that is the
consumer's generic machinery, not the request: per fetch its fetcher task wakes twice
and rebuilds its plan from the subscription state (``asyncio.wait`` over every pending
future each time), a task per request, a waiter future per ``getmany``, the records
buffered in per-partition iterators. Sending the same ``FetchRequest`` on the same kind
of aiokafka client connection and reading the answer in the reader's own task costs
~0.42 ms: ~45 % less. Everything on the wire is as before: the request (aiokafka picks
its version), the broker's wait (``fetch.max.wait.ms``, answered as soon as a record
lands), the records (aiokafka's record batch reader, CRCs checked).

:class:`Fetcher` follows partitions of one topic with one fetch in flight per leader
(one request for a stream whose partitions share a leader, ``Bus._stream_replicas``),
refreshes metadata and retries after a leader change or a connection loss, and resets an
out-of-range position through a callback (the reader's consumer: the newest offset, as
``auto_offset_reset="latest"``). It uses no private aiokafka name; the classes and
methods it does use are listed in :data:`REQUIRED` and checked at import, like
``gateway/aiortc_compat.py``, so an aiokafka that changes them fails at start-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import metadata

import aiokafka.errors as Errors
from aiokafka import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

logger = logging.getLogger(__name__)

READ_UNCOMMITTED = 0
RETRY_BACKOFF_S = 0.1

REQUIRED: tuple[tuple[object, str, str], ...] = (
    (AIOKafkaClient, "bootstrap", "attr"),
    (AIOKafkaClient, "close", "attr"),
    (AIOKafkaClient, "send", "attr"),
    (AIOKafkaClient, "add_topic", "attr"),
    (AIOKafkaClient, "force_metadata_update", "attr"),
    (AIOKafkaClient, "cluster", "init"),
    (FetchRequest, "topics", "attr"),
    (MemoryRecords, "next_batch", "attr"),
    (Errors, "for_code", "attr"),
    (Errors, "CorruptRecordException", "attr"),
)
"""What this module uses of aiokafka below its consumer and producer (no private name):
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
            "whipcast's frame fetcher (gateway/fetcher.py) uses"
        )


check()

Reset = Callable[[list[int]], Awaitable[dict[int, int]]]


class Fetcher:
    """Fetches records of some partitions of one topic, in order, without a consumer.

    ``positions`` holds the next offset to read per partition (set with :meth:`seek`),
    ``highwater`` the broker's last reported end per partition.
    """

    def __init__(
        self,
        client_options: dict[str, object],
        topic: str,
        *,
        max_wait_ms: int,
        partition_bytes: int,
        max_bytes: int,
        reset: Reset,
    ) -> None:
        self.topic = topic
        self._options = client_options
        self._client: AIOKafkaClient | None = None
        self.max_wait_ms = max_wait_ms
        self._partition_bytes = partition_bytes
        self._max_bytes = max_bytes
        self._reset = reset
        self.positions: dict[int, int] = {}
        self.highwater: dict[int, int] = {}
        self._tps: dict[int, TopicPartition] = {}
        self._busy: set[int] = set()  # partitions with a fetch in flight
        self._pending: dict[int, asyncio.Task] = {}  # node -> fetch (several leaders)
        self.errors = 0

    async def start(self) -> None:
        self._client = AIOKafkaClient(**self._options)
        await self._client.bootstrap()
        await self._client.add_topic(self.topic)

    async def stop(self) -> None:
        for task in self._pending.values():
            task.cancel()
        await asyncio.gather(*self._pending.values(), return_exceptions=True)
        self._pending.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    def seek(self, partition: int, offset: int) -> None:
        self.positions[partition] = offset
        self._tps.setdefault(partition, TopicPartition(self.topic, partition))

    async def fetch(self) -> dict[int, list]:
        """Records per partition from the next answered fetch (waits at most about
        ``max_wait_ms``; may return none)."""
        assert self._client is not None, "start() first"
        by_node: dict[int, list[int]] = {}
        leader_for = self._client.cluster.leader_for_partition
        unknown = False
        for partition, tp in self._tps.items():
            if partition in self._busy:
                continue
            node = leader_for(tp)
            if node is None or node < 0:
                unknown = True
            else:
                by_node.setdefault(node, []).append(partition)
        if unknown:
            self._client.force_metadata_update()
        if not self._pending:
            if len(by_node) == 1:  # the usual case: the stream's partitions share a leader
                [(node, partitions)] = by_node.items()
                return await self._fetch(node, partitions)
            if not by_node:
                await asyncio.sleep(RETRY_BACKOFF_S)
                return {}
        for node, partitions in by_node.items():
            if node not in self._pending:
                self._pending[node] = asyncio.ensure_future(self._fetch(node, partitions))
        done, _ = await asyncio.wait(self._pending.values(), return_when=asyncio.FIRST_COMPLETED)
        out: dict[int, list] = {}
        for node, task in list(self._pending.items()):
            if task in done:
                del self._pending[node]
                out.update(task.result())
        return out

    async def _fetch(self, node: int, partitions: list[int]) -> dict[int, list]:
        offsets = {p: self.positions[p] for p in partitions}
        wanted = [(p, offset, self._partition_bytes) for p, offset in offsets.items()]
        assert self._client is not None
        request = FetchRequest(
            self.max_wait_ms, 1, self._max_bytes, READ_UNCOMMITTED, [(self.topic, wanted)]
        )
        self._busy.update(partitions)
        try:
            response = await self._client.send(node, request)
        except Errors.KafkaError as exc:  # connection lost, node gone, timed out
            self._failed(f"fetch from node {node} failed: {exc!r}")
            await asyncio.sleep(RETRY_BACKOFF_S)
            return {}
        finally:
            self._busy.difference_update(partitions)
        out: dict[int, list] = {}
        reset = []
        retry = False
        for _topic, answered in response.topics:
            for partition, error_code, highwater, *rest in answered:
                if self.positions.get(partition) != offsets.get(partition):
                    continue  # sought elsewhere meanwhile
                if error_code == 0:
                    self.highwater[partition] = highwater
                    records = self._records(partition, rest[-1])
                    if records:
                        out[partition] = records
                elif error_code == Errors.OffsetOutOfRangeError.errno:
                    reset.append(partition)
                else:
                    error = Errors.for_code(error_code)
                    self._failed(f"fetch of {self.topic}/{partition}: {error.__name__}")
                    retry = True
                    if getattr(error, "invalid_metadata", False) or error in (
                        Errors.NotLeaderForPartitionError,
                        Errors.UnknownTopicOrPartitionError,
                    ):
                        self._client.force_metadata_update()
        if reset:
            logger.info("%s: offsets out of range, reading on from the newest", self.topic)
            for partition, offset in (await self._reset(reset)).items():
                self.positions[partition] = offset
        if retry:  # e.g. a leader change: give the metadata update time
            await asyncio.sleep(RETRY_BACKOFF_S)
        return out

    def _records(self, partition: int, data: bytes | None) -> list:
        """The records of a fetched batch set from the current position on; advances it."""
        if not data:
            return []
        position = self.positions[partition]
        out = []
        records = MemoryRecords(data)
        while (batch := records.next_batch()) is not None:
            if not batch.validate_crc():
                raise Errors.CorruptRecordException(f"invalid CRC in {self.topic}/{partition}")
            if not batch.is_control_batch:
                for record in batch:
                    if record.offset >= position:
                        out.append(record)
            position = max(position, batch.next_offset)
        self.positions[partition] = position
        return out

    def _failed(self, message: str) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 100 == 0:
            logger.warning("%s (%d so far)", message, self.errors)
