"""Broker failures in a real three-broker KRaft cluster, with real aiortc peers.

The partition leader of a live stream is SIGKILLed mid-stream: the viewer must see
frames again within seconds on the same WHEP session, every Q&A question the API
acknowledged (201) must still be on the board, and the killed broker, restarted, must
catch up and rejoin the in-sync replicas.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError
from whipcast.gateway.bus import Bus, FrameReader
from whipcast.gateway.frames import Codec, Frame, Track
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.settings import Settings

from .conftest import start_server, until
from .peers import play, publish

TOKEN = "cluster-host-token"
# The goal for viewers after a leader is killed is 3 s (the 1 s broker session timeout
# plus a metadata round: 1.1-2.5 s measured here on an idle machine); asserted with room
# for a loaded one, and still short of Kafka's default 9 s session timeout, which alone
# would keep viewers frozen longer.
RESUME_GOAL_S = 3.0
RESUME_WITHIN_S = 8.0
ISR_WITHIN_S = 30.0


async def _partitions(admin: AIOKafkaAdminClient, topic: str) -> dict[int, dict]:
    """Partition number -> {leader, replicas, isr}, from the cluster's metadata."""
    (described,) = await admin.describe_topics([topic])
    assert described["error_code"] == 0, described
    return {p["partition"]: p for p in described["partitions"]}


async def _config(admin: AIOKafkaAdminClient, topic: str, name: str) -> str:
    (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    for _resource, *_, entries in response.resources:
        for entry in entries:
            if entry[0] == name:
                return entry[1]
    raise AssertionError(f"{topic} has no {name}")


async def _ask_until(session: aiohttp.ClientSession, stream: str, stop: asyncio.Event,
                     acked: list[str], failed: list[int]) -> None:  # fmt: skip
    """Ask questions (each from a new client, so no rate limit applies) until ``stop``;
    record the id of each one the API acknowledged and the status of each it refused."""
    for n in range(400):
        if stop.is_set():
            return
        text = f"question {n} {uuid.uuid4().hex[:6]}"
        url = f"/api/streams/{stream}/questions"
        session.cookie_jar.clear()
        try:
            async with session.get(url) as response:  # a client identity (cookie) first
                await response.read()
            async with session.post(
                url, json={"name": "Ada", "text": text}, timeout=aiohttp.ClientTimeout(total=15)
            ) as response:
                if response.status == 201:
                    acked.append((await response.json())["id"])
                else:
                    failed.append(response.status)
        except (aiohttp.ClientError, TimeoutError):
            failed.append(0)
        await asyncio.sleep(0.05)


async def test_leader_killed_mid_stream(kafka_cluster):
    started = time.monotonic()
    server = await start_server(kafka_cluster, publish_token=TOKEN)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_cluster.bootstrap)
    await admin.start()
    publisher = viewer = None
    stop_asking = asyncio.Event()
    try:
        prefix = server.settings.topic_prefix
        # Control-plane state: three replicas, two of which must hold a write.
        directory = f"{prefix}.directory"
        assert len((await _partitions(admin, directory))[0]["replicas"]) == 3
        assert await _config(admin, directory, "min.insync.replicas") == "2"

        stream = f"failover-{uuid.uuid4().hex[:8]}"
        publisher = await publish(server.url, stream, token=TOKEN)
        view = server.node.view
        assert await view.wait_for(lambda: view.get(stream), 10)
        partitions = await _partitions(admin, f"{prefix}.stream.{stream}")
        video = partitions[0]
        assert len(video["replicas"]) == 3
        leader = video["leader"]
        # Every track of a stream has the same leader (audio rides in video's produce
        # requests; a reader fetches the stream from one broker), so the kill hits both.
        assert {p["leader"] for p in partitions.values()} == {leader}, partitions

        # The Q&A topic led by the same broker, so that the kill hits its writes too;
        # created as the node would (StateLog.ensure), with that broker as preferred leader.
        others = [b for b in video["replicas"] if b != leader]
        try:
            await admin.create_topics([NewTopic(
                f"{prefix}.qa.{stream}", -1, -1, replica_assignments={0: [leader, *others]},
                topic_configs={"min.insync.replicas": "2"},
            )])  # fmt: skip
        except TopicAlreadyExistsError:
            pass

        viewer = await play(server.url, stream)
        await viewer.wait_frames(30, timeout=15)
        whep_sessions = server.node.egress.started

        async with aiohttp.ClientSession(
            base_url=server.url, cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as http:
            acked: list[str] = []
            failed: list[int] = []
            asking = asyncio.create_task(_ask_until(http, stream, stop_asking, acked, failed))
            # The first answer waits for the node to load the stream's board from Kafka:
            # seconds on a busy machine.
            await until(lambda: len(acked) >= 3 or asking.done(), 30)
            asked_before = len(acked)
            assert asked_before > 0, failed

            killed_at_counter = publisher.track.counter
            killed_at = time.monotonic()
            await kafka_cluster.kill(leader)

            # Frames sent after the kill reach the same viewer within the goal.
            deadline = killed_at + RESUME_WITHIN_S + 10
            while time.monotonic() < deadline:
                resumed = [t for t, counter, _ in viewer.frames if counter > killed_at_counter]
                if resumed:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("no frame reached the viewer after the leader was killed")
            resumed_after = resumed[0] - killed_at
            print(f"viewer resumed {resumed_after:.2f} s after the leader was killed "
                  f"(goal {RESUME_GOAL_S:g} s)")  # fmt: skip
            assert resumed_after < RESUME_WITHIN_S
            assert server.node.egress.started == whep_sessions  # no new WHEP session
            assert viewer.pc.connectionState == "connected"

            await asyncio.sleep(2.0)  # keep asking while leadership settles
            stop_asking.set()
            await asking
            assert len(acked) > asked_before, failed  # questions were taken after the kill

            # Every acknowledged question is on the board.
            board: set[str] = set()
            for _ in range(50):
                async with http.get(f"/api/streams/{stream}/questions") as response:
                    board = {q["id"] for q in (await response.json())["questions"]}
                if set(acked) <= board:
                    break
                await asyncio.sleep(0.2)
            assert set(acked) - board == set(), f"lost {len(set(acked) - board)} of {len(acked)}"

        # The restarted broker catches up and rejoins every in-sync replica set.
        await kafka_cluster.restart(leader)
        topics = [f"{prefix}.stream.{stream}", f"{prefix}.qa.{stream}", directory]
        deadline = time.monotonic() + ISR_WITHIN_S
        while True:
            behind = [
                (topic, number)
                for topic in topics
                for number, partition in (await _partitions(admin, topic)).items()
                if leader not in partition["isr"]
            ]
            if not behind:
                break
            assert time.monotonic() < deadline, f"broker {leader} not back in the ISR: {behind}"
            await asyncio.sleep(0.5)
    finally:
        stop_asking.set()
        if viewer is not None:
            await viewer.close()
        if publisher is not None:
            await publisher.close()
        await admin.close()
        await server.runner.cleanup()
    print(f"test took {time.monotonic() - started:.1f} s")


async def test_frames_across_two_leaders(kafka_cluster, stream_name):
    """A stream topic whose partitions have different leaders (one made before a
    stream's partitions shared one, or after a partial failover): the frame producer
    sends to both leaders at once (gateway/kafka_frames.py, one request in flight per
    leader) and a reader gets every frame, in order."""
    settings = Settings.from_env(env={}, kafka_bootstrap=kafka_cluster.bootstrap)
    bus = Bus(settings, Metrics())
    await bus.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_cluster.bootstrap)
    await admin.start()
    reader = None
    try:
        brokers = sorted(b.nodeId for b in bus.producer.client.cluster.brokers())
        topic = bus.stream_topic(stream_name)
        split = {0: [brokers[0]], 1: [brokers[1]]}
        await admin.create_topics([NewTopic(topic, -1, -1, replica_assignments=split)])
        leaders: set[int] = set()
        for _ in range(100):  # until every broker's metadata has the new topic
            (described,) = await admin.describe_topics([topic])
            leaders = {p["leader"] for p in described["partitions"] if p["leader"] >= 0}
            if described["error_code"] == 0 and len(leaders) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(leaders) == 2, described
        reader = FrameReader(bus, stream_name)
        await reader.start()
        got: list[Frame] = []

        async def read() -> None:
            async for batch in reader.read():
                got.extend(item.frame for item in batch)

        task = asyncio.create_task(read())
        sent = {Track.VIDEO: 0, Track.AUDIO: 0}
        for _ in range(30):
            for track in (Track.VIDEO, Track.AUDIO, Track.AUDIO):
                payload = bytes(3000 if track is Track.VIDEO else 160)
                codec = Codec.H264 if track is Track.VIDEO else Codec.OPUS
                seq = sent[track]
                frame = Frame(track, codec, seq == 0, seq, 3, seq, time.time_ns() // 1000, payload)
                await bus.send_frame(topic, frame)
                sent[track] += 1
            await asyncio.sleep(0.01)
        done = await until(lambda: len(got) >= sum(sent.values()), 20)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert done, f"read {len(got)} of {sum(sent.values())}"
        for track in Track:
            assert [f.sequence for f in got if f.track is track] == list(range(sent[track]))
        assert bus.produce_errors == 0
    finally:
        if reader is not None:
            await reader.stop()
        await admin.close()
        await bus.stop()
