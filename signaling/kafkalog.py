"""Kafka topics the control plane keeps its state in (Q&A, directory details).

Unlike frames, this state must never be lost once a client was told it is saved, so it
is written by an idempotent producer with ``acks=all`` and acknowledged only after the
broker has it. Readers rebuild their state by reading a topic from the beginning, so a
restarted node, or a second one, sees exactly what the first one saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import ConsumerRecord, TopicPartition
from whipcast.gateway.bus import DURABLE_MIN_INSYNC, replication_factor
from whipcast.gateway.settings import Settings

PRODUCE_TIMEOUT_MS = 10_000


def durable_producer(settings: Settings) -> AIOKafkaProducer:
    """A producer whose acknowledgement means every in-sync replica has the record, and
    whose retries cannot write it twice."""
    return AIOKafkaProducer(
        **settings.kafka_client_options(),
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        request_timeout_ms=PRODUCE_TIMEOUT_MS,
    )


class StateLog:
    """A node's durable writer for control-plane state, and the topics it has made.

    Topics are created on first use; the set of known ones lets a read of a name nobody
    ever wrote to create nothing.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._admin: AIOKafkaAdminClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._known: set[str] = set()
        self._replicas = 1

    async def start(self) -> None:
        self._admin = AIOKafkaAdminClient(**self._settings.kafka_client_options())
        await self._admin.start()
        cluster = await self._admin.describe_cluster()
        self._replicas = replication_factor(self._settings, len(cluster["brokers"]))
        self._producer = durable_producer(self._settings)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def exists(self, name: str) -> bool:
        assert self._admin is not None
        if name not in self._known and name in await self._admin.list_topics():
            self._known.add(name)
        return name in self._known

    async def ensure(self, topic: NewTopic) -> None:
        """Create ``topic`` unless it exists, replicated as this state needs (its own
        replication factor is replaced): up to three replicas, and with two or more, an
        acknowledged write is on at least two."""
        assert self._admin is not None
        if topic.name in self._known:
            return
        configs = dict(topic.topic_configs)
        if self._replicas >= DURABLE_MIN_INSYNC:
            configs["min.insync.replicas"] = str(DURABLE_MIN_INSYNC)
        topic = NewTopic(topic.name, topic.num_partitions, self._replicas, topic_configs=configs)
        try:
            await self._admin.create_topics([topic])
        except TopicAlreadyExistsError:
            pass
        self._known.add(topic.name)

    async def write(self, topic: str, key: str, value: bytes | None) -> int:
        """Write one record; returns its offset once every in-sync replica has it."""
        assert self._producer is not None
        metadata = await self._producer.send_and_wait(topic, value, key=key.encode())
        return metadata.offset


async def read_to_end(
    consumer: AIOKafkaConsumer,
    partition: TopicPartition,
    apply: Callable[[ConsumerRecord], None],
    timeout: float,
) -> bool:
    """Replay ``partition`` from its beginning up to its current end into ``apply``.

    Returns False if the end was not reached within ``timeout`` seconds.
    """
    await consumer.seek_to_beginning(partition)
    end = (await consumer.end_offsets([partition]))[partition]
    deadline = time.monotonic() + timeout
    while await consumer.position(partition) < end:
        if time.monotonic() > deadline:
            return False
        for records in (await consumer.getmany(partition, timeout_ms=500)).values():
            for record in records:
                apply(record)
    return True
