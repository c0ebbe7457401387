"""The embedded Kafka broker, against a real JVM: no mocks."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from whipcast.gateway.broker import BrokerUnavailable, EmbeddedKafka, broker_classpath, fetch
from whipcast.gateway.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def settings() -> Settings:
    settings = Settings.from_env()
    if settings.kafka_home is None:
        fetch(settings)  # no-op when cached; a failure here fails the tests, never skips
    broker_classpath(settings)
    return settings


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie no longer holds ports, so it counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except OSError:
        return False
    writer.close()
    return True


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, *values: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        for value in values:
            await asyncio.wait_for(producer.send_and_wait(topic, value, partition=0), 10)
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        return [(await asyncio.wait_for(consumer.getone(), 10)).value for _ in range(count)]
    finally:
        await consumer.stop()


async def test_produce_consume_and_stop(settings: Settings) -> None:
    keyframe = os.urandom(5 * 1024 * 1024)  # over Kafka's 1 MiB default message limit
    kafka = EmbeddedKafka(settings)
    async with kafka:
        host, port = kafka.bootstrap.rsplit(":", 1)
        assert host == "127.0.0.1"
        pid = kafka.pid
        assert pid is not None and _alive(pid)
        await _create_topic(kafka.bootstrap, "frames")
        await _produce(kafka.bootstrap, "frames", b"hello", keyframe)
        assert await _consume(kafka.bootstrap, "frames", 2) == [b"hello", keyframe]
        directory = kafka.directory
        assert directory is not None and (directory / "broker.log").exists()

    assert not _alive(pid)
    assert not await _port_open(int(port))
    assert not directory.exists()
    await kafka.stop()  # a second stop is harmless
    with pytest.raises(RuntimeError):
        kafka.bootstrap  # noqa: B018


async def test_data_dir_survives_restart(settings: Settings, tmp_path: Path) -> None:
    async with EmbeddedKafka(settings, data_dir=tmp_path) as kafka:
        await _create_topic(kafka.bootstrap, "kept")
        await _produce(kafka.bootstrap, "kept", b"before restart")
    assert (tmp_path / "broker.log").exists()

    async with EmbeddedKafka(settings, data_dir=tmp_path) as kafka:
        assert await _consume(kafka.bootstrap, "kept", 1) == [b"before restart"]


async def test_broker_dies_with_its_parent(settings: Settings, tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from whipcast.gateway.broker import EmbeddedKafka\n"
        "from whipcast.gateway.settings import Settings\n"
        "async def main():\n"
        "    kafka = EmbeddedKafka(Settings.from_env(), data_dir=Path(sys.argv[1]))\n"
        "    await kafka.start()\n"
        "    print(kafka.pid, kafka.bootstrap.rsplit(':', 1)[1], flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(tmp_path), cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    try:
        line = await asyncio.wait_for(parent.stdout.readline(), 70)
        pid, port = map(int, line.split())
        assert _alive(pid)
    finally:
        parent.kill()
        await parent.wait()

    # Up to 10 s: a dying JVM's threads exit, and its sockets close, after its main one.
    for _ in range(100):
        if not _alive(pid) and not await _port_open(port):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"the broker (pid {pid}) outlived its parent")


async def test_start_failure_reports_the_broker_log(settings: Settings) -> None:
    kafka = EmbeddedKafka(settings.with_(kafka_heap="lots"))
    with pytest.raises(BrokerUnavailable, match="Invalid maximum heap size"):
        await kafka.start()
    await kafka.stop()


def test_fetch_is_idempotent(settings: Settings) -> None:
    libs = fetch(settings)
    started = time.monotonic()
    assert fetch(settings) == libs
    assert time.monotonic() - started < 0.5
    assert any(libs.glob("kafka_2.13-*.jar"))


def test_kafka_home_without_jars(tmp_path: Path) -> None:
    settings = Settings.from_env().with_(kafka_home=tmp_path)
    with pytest.raises(BrokerUnavailable, match="KAFKA_HOME") as failure:
        broker_classpath(settings)
    assert "whipcast kafka fetch" in str(failure.value)


def test_cli_runs_a_cluster_of_n_brokers() -> None:
    from whipcast.signaling.cli import build_parser

    args = build_parser().parse_args(["kafka", "start", "--brokers", "3"])
    assert args.brokers == 3
    assert build_parser().parse_args(["kafka", "start"]).brokers == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["kafka", "start", "--brokers", "0"])


async def test_a_cluster_needs_a_broker(settings: Settings) -> None:
    with pytest.raises(ValueError, match="at least one broker"):
        EmbeddedKafka(settings, brokers=0)
