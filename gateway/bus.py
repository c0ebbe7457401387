"""The Kafka bus: topic layout, the node's producer, and per-stream frame readers.

Topics (``docs/architecture.md`` has the picture):

- ``{prefix}.stream.{name}``: one per live stream, partition 0 = video, 1 = audio (2 and
  3: further simulcast video layers, ``frames.video_partition``), one frame per record
  (:mod:`whipcast.gateway.frames`), deleted by retention after a few minutes.
- ``{prefix}.streams``: compacted registry of live streams (:mod:`whipcast.gateway.registry`).
- ``{prefix}.control``: keyframe requests from egress to the ingest owning a stream.
- ``{prefix}.nodes``: compacted node registry: address and load (:mod:`whipcast.gateway.nodes`).

Only the Kafka protocol is used, so any Kafka-compatible cluster works.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import InvalidPartitionsError, KafkaError, TopicAlreadyExistsError
from aiokafka.structs import TopicPartition

from .frames import Frame, FrameFormatError, Track, partition_layer, video_partition
from .kafka_frames import FrameProducer
from .metrics import Metrics
from .settings import Settings

logger = logging.getLogger(__name__)

STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_RECORD_BYTES = 8 * 1024 * 1024
# How long the broker may hold a fetch that finds no new data. Apache Kafka answers a
# waiting fetch as soon as a record arrives (fetch.min.bytes = 1), so the wait costs no
# latency, while every empty fetch costs the broker and the node a request: frame
# readers wait ``Settings.kafka_fetch_wait_ms`` (500). Registry and control readers wait
# less: liveness views (gateway/compacted.py) judge silence between their fetches, and
# with 500 ms a partition leader's failover made a live stream look ended and closed its
# viewers (tests/test_cluster.py); 200 ms costs a few requests per second per node.
CONTROL_FETCH_MAX_WAIT_MS = 200
PROBE_INTERVAL_S = 2.0
PRODUCE_TIMEOUT_MS = 10000
# Durability per topic (docs/architecture.md has the table and the reasons): every topic
# gets up to three replicas, so that a broker loss moves leadership instead of losing
# the data; control-plane state written with acks=all also needs two in-sync copies.
MAX_REPLICAS = 3
DURABLE_MIN_INSYNC = 2


def replication_factor(settings: Settings, brokers: int) -> int:
    """Replicas for a new topic: ``topic_replication_factor`` if set, else as many as
    the cluster has brokers, up to three."""
    return settings.topic_replication_factor or min(MAX_REPLICAS, max(1, brokers))


def stream_topic(prefix: str, stream: str) -> str:
    """The topic holding a stream's frames (any Kafka consumer can read it)."""
    return f"{prefix}.stream.{stream}"


class Bus:
    """A node's connection to Kafka: one producer shared by all its streams."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.producer: AIOKafkaProducer | None = None
        self._last_error_log = 0.0
        self.reachable = False
        """Whether the last metadata request (every 2 s) reached a broker."""
        self.reachable_since = time.monotonic()
        self._probe: asyncio.Task | None = None
        self._prefix = settings.topic_prefix
        self._replicas = 1
        self.produce_errors = 0
        self._frames: FrameProducer | None = None

    # Topic names
    def stream_topic(self, stream: str) -> str:
        return stream_topic(self._prefix, stream)

    @property
    def registry_topic(self) -> str:
        return f"{self._prefix}.streams"

    @property
    def control_topic(self) -> str:
        return f"{self._prefix}.control"

    @property
    def nodes_topic(self) -> str:
        return f"{self._prefix}.nodes"

    @property
    def sessions_topic(self) -> str:
        """Compacted history of publish sessions, live and ended (replays)."""
        return f"{self._prefix}.sessions"

    async def create_sessions_topic(self) -> None:
        """Compacted, and kept a day longer than frames: a session's record outlives
        the frames it describes, so every replay still in Kafka is listed."""
        retention = self.settings.stream_retention_ms + 24 * 3600 * 1000
        configs = {"cleanup.policy": "compact,delete", "retention.ms": str(retention)}
        topic = NewTopic(self.sessions_topic, 1, self._replicas, topic_configs=configs)
        await self._create_topics([topic])

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(
            **self.settings.kafka_client_options(),
            acks=1,
            linger_ms=0,
            max_request_size=MAX_RECORD_BYTES,
            request_timeout_ms=PRODUCE_TIMEOUT_MS,
        )
        await self.producer.start()
        # Frames take a lean path on the producer's client (gateway/kafka_frames.py).
        self._frames = FrameProducer(
            self.producer.client,
            timeout_ms=PRODUCE_TIMEOUT_MS,
            max_record_bytes=MAX_RECORD_BYTES,
            on_acked=self.metrics.produce_latency.observe,
            on_failed=self._produce_failed,
        )
        self._replicas = replication_factor(
            self.settings, len(self.producer.client.cluster.brokers())
        )
        await self._create_topics(
            [
                NewTopic(
                    self.registry_topic,
                    1,
                    self._replicas,
                    topic_configs={
                        "cleanup.policy": "compact",
                        "message.timestamp.type": "LogAppendTime",
                    },
                ),
                NewTopic(
                    self.control_topic, 1, self._replicas, topic_configs={"retention.ms": "3600000"}
                ),
                NewTopic(
                    self.nodes_topic,
                    1,
                    self._replicas,
                    topic_configs={
                        "cleanup.policy": "compact",
                        "segment.ms": "600000",
                        "message.timestamp.type": "LogAppendTime",
                    },
                ),
            ]
        )
        self.reachable = True
        self._probe = asyncio.create_task(self._watch_broker(), name="kafka-probe")

    async def _watch_broker(self) -> None:
        """Keep ``reachable`` current; readiness (``/readyz``) follows it."""
        assert self.producer is not None
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await asyncio.wait_for(self.producer.client.fetch_all_metadata(), PROBE_INTERVAL_S)
            except (KafkaError, TimeoutError, OSError):
                if self.reachable:
                    logger.warning("Kafka unreachable")
                self.reachable = False
            else:
                if not self.reachable:
                    logger.info("Kafka reachable again")
                    self.reachable_since = time.monotonic()
                self.reachable = True

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self._frames is not None:
            await self._frames.stop()
            self._frames = None
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def create_stream_topic(self, stream: str, video_layers: int = 1) -> None:
        """Create (or keep) the stream's topic: a partition per track and per further
        simulcast video layer, short retention. An existing topic with too few
        partitions (a simulcast publish reusing a single-layer stream's name) is grown;
        partitions are never removed, so a later single-layer publish leaves the
        layer partitions idle."""
        partitions = max(len(Track), video_partition(video_layers - 1) + 1)
        configs = {
            "retention.ms": str(self.settings.stream_retention_ms),
            "max.message.bytes": str(MAX_RECORD_BYTES),
            "message.timestamp.type": "LogAppendTime",
        }
        name = self.stream_topic(stream)
        replicas = self._stream_replicas(stream)
        if replicas is None:
            topic = NewTopic(name, partitions, self._replicas, topic_configs=configs)
        else:
            assignment = {partition: replicas for partition in range(partitions)}
            topic = NewTopic(name, -1, -1, replica_assignments=assignment, topic_configs=configs)
        await self._create_topics([topic])
        if partitions > len(Track):
            await self._grow_topic(name, partitions, replicas)

    async def _grow_topic(self, name: str, partitions: int, replicas: list[int] | None) -> None:
        """Give an existing topic at least ``partitions`` partitions (on ``replicas``,
        the stream's shared leader, when given), and wait (a few seconds at most) until
        this node's producer knows them all."""
        admin = AIOKafkaAdminClient(**self.settings.kafka_client_options())
        await admin.start()
        try:
            [described] = await admin.describe_topics([name])
            have = len(described["partitions"])
            if have < partitions:
                more = None if replicas is None else [replicas] * (partitions - have)
                try:
                    await admin.create_partitions({name: NewPartitions(partitions, more)})
                except InvalidPartitionsError:
                    pass  # grown meanwhile by another node's publish
        finally:
            await admin.close()
        assert self.producer is not None
        client = self.producer.client
        await client.add_topic(name)
        deadline = time.monotonic() + 10
        while len(client.cluster.partitions_for_topic(name) or ()) < partitions:
            if time.monotonic() > deadline:
                raise KafkaError(f"{name} did not get {partitions} partitions")
            await client.force_metadata_update()
            await asyncio.sleep(0.05)

    def _stream_replicas(self, stream: str) -> list[int] | None:
        """One replica list for every partition of a stream's topic, so that all its
        partitions share a preferred leader: a frame and the audio riding with it then go
        in one produce request, and a reader fetches the stream from one broker. Streams
        are spread over the brokers by name. ``None`` on a one-broker cluster."""
        assert self.producer is not None
        brokers = sorted(b.nodeId for b in self.producer.client.cluster.brokers())
        if len(brokers) < 2:
            return None
        first = zlib.crc32(stream.encode()) % len(brokers)
        ordered = brokers[first:] + brokers[:first]
        return ordered[: min(self._replicas, len(brokers))]

    async def create_topics(self, topics: list[NewTopic]) -> None:
        """Create the topics a reader of the log writes to (existing ones are kept),
        replicated like every topic of this bus (their own replication factor is
        replaced)."""
        await self._create_topics(
            [
                NewTopic(t.name, t.num_partitions, self._replicas, topic_configs=t.topic_configs)
                for t in topics
            ]
        )

    async def _create_topics(self, topics: list[NewTopic]) -> None:
        admin = AIOKafkaAdminClient(**self.settings.kafka_client_options())
        await admin.start()
        try:
            for topic in topics:
                try:
                    await admin.create_topics([topic])
                except TopicAlreadyExistsError:
                    pass
        finally:
            await admin.close()

    async def send_frame(self, topic: str, frame: Frame, partition: int | None = None) -> None:
        """Queue a frame for sending (to its track's partition unless ``partition`` is
        given: a simulcast layer's); returns once queued, not when acknowledged.

        A frame not acknowledged within the producer's timeout (broker unreachable,
        no leader) is counted and dropped: live media cannot wait for it. Each
        acknowledged one feeds the produce-latency metric.
        """
        assert self._frames is not None
        self._frames.send(topic, frame.track if partition is None else partition, frame.encode())

    def _produce_failed(self, exc: BaseException | None) -> None:
        """Count a lost frame; log at most every few seconds, not once per frame."""
        self.produce_errors += 1
        now = time.monotonic()
        if now - self._last_error_log > 5:
            self._last_error_log = now
            logger.warning(
                "frames are not reaching Kafka (%d so far): %s", self.produce_errors, exc
            )

    async def send_record(self, topic: str, key: str, value: bytes | None) -> None:
        """Send a control or registry record and wait until the broker has it."""
        assert self.producer is not None
        await self.producer.send_and_wait(topic, value, key=key.encode())

    def consumer(self, max_wait_ms: int | None = None) -> AIOKafkaConsumer:
        """A group-less consumer for manual assignment, tuned for low latency."""
        return AIOKafkaConsumer(
            **self.settings.kafka_client_options(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=self.settings.kafka_fetch_wait_ms
            if max_wait_ms is None
            else max_wait_ms,
            fetch_min_bytes=1,
            max_partition_fetch_bytes=MAX_RECORD_BYTES,
            fetch_max_bytes=4 * MAX_RECORD_BYTES,
        )


@dataclass(slots=True)
class ReadFrame:
    frame: Frame
    history: bool
    """Written before the reader started: feeds the GOP cache, is not sent live."""
    layer: int = 0
    """The simulcast video layer (0: the best, or the only one; always 0 for audio)."""


class FrameReader:
    """Reads one stream's frames: the one way every reader of the log reads them.

    By default (egress) it starts ``lookback`` video frames back so the current GOP can
    be rebuilt from Kafka and a first viewer can start on a keyframe without waiting
    for the next one, then follows live. Readers of the past (replay, recorders) give
    ``start`` offsets per track instead, and a ``session`` to read only that publish:
    frames of other sessions are skipped, and a partition on which a later session's
    frame appears is marked finished (the session ended there).
    """

    def __init__(
        self,
        bus: Bus,
        stream: str,
        lookback: int = 0,
        *,
        start: dict[Track, int] | None = None,
        session: int | None = None,
        layers: int = 1,
    ) -> None:
        self.topic = bus.stream_topic(stream)
        self._bus = bus
        # Simulcast: video layers 1.. on their own partitions (``frames.video_partition``),
        # read by the same consumer, so one fetch still serves the whole stream.
        self._partitions = [int(t) for t in Track]
        self._partitions += [video_partition(k) for k in range(1, layers)]
        self.layers = layers
        """Video layers read: fewer than asked for if the topic lacks their partitions."""
        self._behind: set[int] = set()  # video partitions whose history is not read yet
        self._consumer = bus.consumer()
        self._lookback = lookback
        self._start = start
        self.session = session
        self.finished: set[Track] = set()
        """Tracks on which a later session's frame was seen: this session is over there."""
        self._seen: set[Track] = set()
        self._live_from: dict[int, int] = {}
        self.caught_up = asyncio.Event()
        """Set once the history (the GOP in Kafka before this reader started) is read."""
        self.malformed = 0
        self.lag_ms = 0.0
        """Age of the newest frame read: ingest arrival until now."""
        self.lag_records = 0
        """Video records written but not yet read."""
        self._read_to: dict[int, int] = {}

    async def start(self) -> None:
        await self._consumer.start()
        if self.layers > 1:  # a layer whose partition is missing is not waited for
            known = await self._bus.producer.partitions_for(self.topic)
            while self.layers > 1 and video_partition(self.layers - 1) not in known:
                self.layers -= 1
                self._partitions.pop()
        partitions = [TopicPartition(self.topic, p) for p in self._partitions]
        self._consumer.assign(partitions)
        if self._start is not None:
            for tp in partitions:
                self._live_from[tp.partition] = 0
                self._read_to[tp.partition] = self._start[Track(tp.partition)]
                self._consumer.seek(tp, self._start[Track(tp.partition)])
            self.caught_up.set()
            return
        ends = await self._consumer.end_offsets(partitions)
        begins = await self._consumer.beginning_offsets(partitions)
        for tp in partitions:
            self._live_from[tp.partition] = ends[tp]
            if tp.partition != Track.AUDIO:
                start = max(begins[tp], ends[tp] - self._lookback)
                self._consumer.seek(tp, start)
                if start < ends[tp]:
                    self._behind.add(tp.partition)
            else:
                self._consumer.seek(tp, ends[tp])
        if not self._behind:
            self.caught_up.set()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def read(self) -> AsyncIterator[list[ReadFrame]]:
        """Batches of frames in partition order, as soon as the broker has them."""
        while True:
            batches = await self._consumer.getmany(timeout_ms=1000, max_records=500)
            out = []
            for tp, records in batches.items():
                live_from = self._live_from[tp.partition]
                layer = partition_layer(tp.partition) or 0
                if records:
                    self._read_to[tp.partition] = records[-1].offset + 1
                for record in records:
                    try:
                        frame = Frame.decode(record.value)
                    except FrameFormatError:
                        self.malformed += 1
                        continue
                    if self.session is not None:
                        if frame.session != self.session:
                            if frame.track in self._seen:  # a later publish began
                                self.finished.add(frame.track)
                            continue
                        self._seen.add(frame.track)
                    out.append(ReadFrame(frame, record.offset < live_from, layer))
                    if tp.partition in self._behind and record.offset >= live_from - 1:
                        self._behind.discard(tp.partition)
                        if not self._behind:
                            self.caught_up.set()
            if out:
                self.lag_ms = time.time() * 1000 - out[-1].frame.arrival_us / 1000
                video = TopicPartition(self.topic, Track.VIDEO)
                if video in batches:
                    highwater = self._consumer.highwater(video) or 0
                    self.lag_records = max(0, highwater - batches[video][-1].offset - 1)
                yield out

    def behind(self, track: Track) -> bool:
        """Whether the broker reported records of ``track`` that are not read yet (or has
        not answered for it yet: a reader catching up must not take unknown for none)."""
        tp = TopicPartition(self.topic, track)
        highwater = self._consumer.highwater(tp)
        return highwater is None or highwater > self._read_to.get(track, 0)

    async def at_end(self) -> bool:
        """Whether every partition has been read up to the newest record in Kafka."""
        partitions = [TopicPartition(self.topic, track) for track in Track]
        ends = await self._consumer.end_offsets(partitions)
        for tp in partitions:
            unread = await self._consumer.position(tp) < ends[tp]
            if unread and Track(tp.partition) not in self.finished:
                return False
        return True
