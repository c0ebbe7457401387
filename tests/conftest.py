"""Shared fixtures: one real Apache Kafka broker per test session (and a three-broker
cluster for the modules that ask for one), and whipcast nodes on loopback ports that use
it. Nothing here is mocked."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass

import pytest
from aiohttp import web
from whipcast.gateway.broker import EmbeddedKafka
from whipcast.gateway.settings import Settings
from whipcast.signaling.app import NODE, Node, make_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(condition, timeout: float, interval: float = 0.02) -> bool:
    """Wait for ``condition()`` to hold, up to ``timeout`` seconds; whether it did.

    Tests wait for what they need rather than sleep a fixed time: as fast as the machine
    allows, and bounded generously enough for a loaded one."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


@pytest.fixture(scope="session")
async def kafka():
    async with EmbeddedKafka(Settings.from_env()) as broker:
        yield broker


@pytest.fixture(scope="module")
async def kafka_cluster():
    """A real three-broker KRaft cluster, for the modules that test broker failures.

    Module-scoped and started only when a test asks for it: three JVMs (256 MiB heap
    each) are too much to keep for the whole session."""
    async with EmbeddedKafka(Settings.from_env(kafka_heap="256m"), brokers=3) as cluster:
        yield cluster


@dataclass
class Server:
    url: str
    settings: Settings
    node: Node
    runner: web.AppRunner


async def start_server(kafka: EmbeddedKafka, **overrides) -> Server:
    port = free_port()
    settings = Settings.from_env(
        # Only the send-path switch passes through: WHIPCAST_NO_NATIVE=1 runs the
        # suite on the pure-Python fallback.
        env={"WHIPCAST_NO_NATIVE": os.environ.get("WHIPCAST_NO_NATIVE", "")},
        host="127.0.0.1",
        port=port,
        kafka_bootstrap=kafka.bootstrap,
        kafka_cache_dir=Settings.from_env().kafka_cache_dir,
        fanout_linger=1.0,
        **overrides,
    )
    app = make_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Server(f"http://127.0.0.1:{port}", settings, app[NODE], runner)


@pytest.fixture(scope="session")
async def server(kafka):
    """A whipcast node with every role, shared by the tests that need no special
    settings (each test uses its own stream names)."""
    node = await start_server(kafka)
    yield node
    await node.runner.cleanup()


@pytest.fixture
def stream_name(request) -> str:
    return request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60]
