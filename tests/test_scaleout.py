"""Real processes on loopback: embedded Kafka + 1 signaling + 1 ingest + 2 egress nodes.

Signaling routes with 307 redirects from the node registry in Kafka; viewers of a
stream share an egress node until it is full; a SIGKILLed egress's viewers land on
the other node within 3 s while the other node's viewers play on; a Kafka restart is
survived without restarting any node.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from whipcast.gateway.broker import EmbeddedKafka
from whipcast.gateway.settings import Settings
from yarl import URL

from .conftest import free_port
from .peers import Viewer, play, publish

MAX_VIEWERS = 3
RECONNECT_FOR_S = 30


@dataclass
class Process:
    name: str
    url: str
    process: asyncio.subprocess.Process


async def start_node(role: str, name: str, bootstrap: str, *extra: str) -> Process:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "whipcast.signaling.cli", role, "--port", str(port),
        "--kafka-bootstrap", bootstrap, "--node-id", name, "--advertise-url", url,
        "--log-level", "WARNING", *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    return Process(name, url, process)


async def wait_ready(http: aiohttp.ClientSession, node: Process, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get(f"{node.url}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{node.name} never became ready")


@dataclass
class Cluster:
    broker: EmbeddedKafka
    restart_broker: Callable[[float], Awaitable[None]]
    signaling: Process
    ingest: Process
    egress: list[Process]
    http: aiohttp.ClientSession
    nodes: dict[str, Process] = field(default_factory=dict)

    def node_of(self, location: str) -> str:
        origin = str(URL(location).origin())
        return next(p.name for p in self.egress + [self.ingest] if p.url == origin)

    async def wait_nodes(self, count: int, timeout: float = 10) -> None:
        """Until signaling's node registry shows ``count`` ready media nodes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with self.http.get(f"{self.signaling.url}/api/nodes") as response:
                if response.status == 200 and len((await response.json())["nodes"]) >= count:
                    return
            await asyncio.sleep(0.2)
        raise AssertionError("media nodes did not register")

    async def wait_idle(self, timeout: float = 10) -> None:
        """Until signaling's node registry shows no viewer on any media node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with self.http.get(f"{self.signaling.url}/api/nodes") as response:
                nodes = (await response.json())["nodes"]
            if not any(n["viewers"] for n in nodes):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"viewers still counted: {[(n['node'], n['viewers']) for n in nodes]}")


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory):
    settings = Settings.from_env()
    data_dir, port = tmp_path_factory.mktemp("kafka"), free_port()
    broker = EmbeddedKafka(settings, data_dir=data_dir, port=port)
    await broker.start()

    async def restart_broker(down_s: float) -> None:
        """Stop the broker, keep it down, start it again with the same data and port."""
        await cluster.broker.stop()
        await asyncio.sleep(down_s)
        cluster.broker = EmbeddedKafka(settings, data_dir=data_dir, port=port)
        await cluster.broker.start()

    bootstrap = broker.bootstrap
    processes = [
        await start_node("signaling", "sig-1", bootstrap),
        await start_node("ingest", "ingest-1", bootstrap),
        await start_node("egress", "egress-a", bootstrap, "--max-viewers", str(MAX_VIEWERS)),
        await start_node("egress", "egress-b", bootstrap, "--max-viewers", str(MAX_VIEWERS)),
    ]
    http = aiohttp.ClientSession()
    cluster: Cluster | None = None
    try:
        for node in processes:
            await wait_ready(http, node)
        cluster = Cluster(broker, restart_broker, processes[0], processes[1], processes[2:], http)
        await cluster.wait_nodes(3)
        yield cluster
    finally:
        await http.close()
        for node in processes:
            if node.process.returncode is None:
                node.process.send_signal(signal.SIGTERM)
        for node in processes:
            try:
                await asyncio.wait_for(node.process.wait(), 15)
            except TimeoutError:
                node.process.kill()
        await (cluster.broker if cluster else broker).stop()


async def wait_live(cluster: Cluster, stream: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with cluster.http.get(f"{cluster.signaling.url}/api/streams/{stream}") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{stream} never went live")


async def test_routing_colocates_then_spills(cluster):
    publisher_a = await publish(cluster.signaling.url, "scale-a")
    publisher_b = await publish(cluster.signaling.url, "scale-b")
    viewers: list[Viewer] = []
    try:
        assert cluster.node_of(publisher_a.location) == "ingest-1"
        await wait_live(cluster, "scale-a")
        await wait_live(cluster, "scale-b")
        for _ in range(MAX_VIEWERS + 1):
            viewers.append(await play(cluster.signaling.url, "scale-a"))
        placed = [cluster.node_of(v.location) for v in viewers]
        # One node takes the stream's viewers until full, then the other gets the rest.
        assert len(set(placed[:MAX_VIEWERS])) == 1, placed
        assert placed[MAX_VIEWERS] != placed[0], placed
        for viewer in viewers:
            await viewer.wait_frames(10)
        await asyncio.sleep(1)  # two heartbeats
        async with cluster.http.get(f"{cluster.signaling.url}/api/nodes") as response:
            nodes = {n["node"]: n for n in (await response.json())["nodes"]}
        assert nodes["ingest-1"]["publishing"] == ["scale-a", "scale-b"]
        assert nodes["ingest-1"]["bitrate_bps"] > 10_000
        assert nodes[placed[0]]["streams"] == {"scale-a": MAX_VIEWERS}
        assert nodes[placed[0]]["bitrate_bps"] > nodes["ingest-1"]["bitrate_bps"] / 2
        # Resource URLs point at the media node, so DELETE works after a redirect.
        assert await viewers.pop().close() == 200
    finally:
        for viewer in viewers:
            await viewer.close()
        await publisher_a.close()
        await publisher_b.close()


class Reconnecting:
    """A viewer that, like the watch page, starts over through signaling when frames
    stop for ``stall_s``."""

    def __init__(self, base: str, stream: str, stall_s: float = 0.8) -> None:
        self.base, self.stream, self.stall_s = base, stream, stall_s
        self.viewer: Viewer | None = None
        self.arrivals: list[float] = []
        self.connected: list[tuple[float, Viewer]] = []  # (when, connection)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.viewer = await play(self.base, self.stream)
        self.connected.append((time.monotonic(), self.viewer))
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        seen = 0
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            assert self.viewer is not None
            frames = self.viewer.frames
            if len(frames) > seen:
                self.arrivals.extend(t for t, _, _ in frames[seen:])
                seen, last = len(frames), time.monotonic()
            elif time.monotonic() - last > self.stall_s:
                old, self.viewer, seen = self.viewer, None, 0
                await old.close(delete=False)
                deadline, pause = time.monotonic() + RECONNECT_FOR_S, 0.1
                while time.monotonic() < deadline:  # bounded, with the player's backoff
                    try:
                        self.viewer = await play(self.base, self.stream)
                        self.connected.append((time.monotonic(), self.viewer))
                        break
                    except (AssertionError, aiohttp.ClientError):
                        await asyncio.sleep(pause)
                        pause = min(pause * 1.5, 1.0)
                assert self.viewer is not None, "could not reconnect"
                last = time.monotonic()

    def gap_after(self, moment: float) -> float:
        """Time from ``moment`` to the first frame of a connection made after it."""
        later = [v.frames[0][0] for t, v in self.connected if t > moment and v.frames]
        return (min(later) - moment) if later else float("inf")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.viewer:
            await self.viewer.close(delete=False)


async def test_egress_failover_and_kafka_restart(cluster):
    await cluster.wait_idle()  # the previous test's viewers have left every egress node
    publisher_a = await publish(cluster.signaling.url, "fail-a")
    publisher_b = await publish(cluster.signaling.url, "fail-b")
    await wait_live(cluster, "fail-a")
    await wait_live(cluster, "fail-b")
    a = [Reconnecting(cluster.signaling.url, "fail-a") for _ in range(2)]
    try:
        for viewer in a:
            await viewer.start()
        node_a = cluster.node_of(a[0].viewer.location)
        async with cluster.http.get(f"{cluster.signaling.url}/api/nodes") as response:
            nodes = (await response.json())["nodes"]
        brief = [(n["node"], n["viewers"], n["streams"], n["cpu_percent"]) for n in nodes]
        assert cluster.node_of(a[1].viewer.location) == node_a, brief
        # The least-loaded node takes the other stream; it has room for fail-a's viewers.
        b = [Reconnecting(cluster.signaling.url, "fail-b")]
        await b[0].start()
        survivors = [v for v in b if cluster.node_of(v.viewer.location) != node_a]
        assert survivors, "expected the fail-b viewer on the other node"
        await asyncio.sleep(2)

        victim = next(p for p in cluster.egress if p.name == node_a)
        killed_at = time.monotonic()
        victim.process.send_signal(signal.SIGKILL)
        await asyncio.sleep(4)
        for viewer in a:
            gap = viewer.gap_after(killed_at)
            assert gap < 3.0, f"a viewer of the killed node took {gap:.2f} s to play again"
            assert cluster.node_of(viewer.viewer.location) != node_a
        for viewer in survivors:
            arrivals = [t for t in viewer.arrivals if t > killed_at - 1]
            worst = max(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
            assert worst < 0.5, f"a viewer on the healthy node froze {worst:.2f} s"

        # Kafka restarts under running streams: nodes reconnect by themselves.
        await cluster.restart_broker(3)
        back_at = time.monotonic()
        for _ in range(150):
            if all(any(t > back_at for t in v.arrivals) for v in survivors + a):
                break
            await asyncio.sleep(0.1)
        for viewer in survivors + a:
            assert any(t > back_at for t in viewer.arrivals), "playback did not resume"
        for viewer in b:
            await viewer.close()
    finally:
        for viewer in a:
            await viewer.close()
        await publisher_a.close()
        await publisher_b.close()
