"""Embedded single-node Apache Kafka broker for ``whipcast dev`` and the tests.

Deployments point :attr:`Settings.kafka_bootstrap` at a real cluster. Development uses a
real broker too, because retention, ``message.max.bytes`` and offsets should behave as
they will in production. Apache's download site may be out of reach where Maven Central
is not, so :func:`fetch` resolves the broker jars with Maven into a local cache;
``KAFKA_HOME`` may point at an Apache Kafka download instead.

The broker runs in KRaft mode (broker and controller in one JVM) on two free loopback
ports, in a private directory that is removed when it stops.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from .settings import Settings, package_dir

__all__ = ["BrokerUnavailable", "EmbeddedKafka", "broker_classpath", "fetch", "run_broker_forever"]

logger = logging.getLogger(__name__)

KAFKA_DIR = package_dir(__package__) / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG4J_CONFIG = KAFKA_DIR / "log4j2.yaml"

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
# 4K keyframes can exceed Kafka's 1 MiB default.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
LOG_TAIL_LINES = 30

# For both JVMs (storage format and broker). Start-up is bound by JIT compilation on
# small machines; C1 alone halves it, and its code serves a dev broker's load just as well:
# with C2 the broker used 5-9 % of a core more over its first minute, compiling
# (docs/benchmarks.md, "What a stream costs").
JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}")
# The serial collector suits a heap this small and runs no background GC threads.
# C1 compiles a method after 30 % of the default invocation counts: a fresh broker leaves
# the interpreter sooner (interpreted code was 18 % of its CPU at 25-45 s of age), ~0.6 %
# of a core less for one stream with no viewer in the first minute (no difference seen
# with viewers), for ~2.5 MiB more code cache
# (docs/benchmarks.md, "What one Kafka request costs").
BROKER_JVM_OPTIONS = ("-XX:+UseSerialGC", "-XX:CompileThresholdScaling=0.3")

# A cluster's nodes notice a dead peer (and move its partition leaderships to live
# replicas) after a broker session timeout; Kafka's 9 s default would leave a live
# stream frozen that long, so a local cluster fails over within a second or two.
# Production clusters choose their own; docs/architecture.md says what it costs viewers.
CLUSTER_FAILOVER = {
    "broker.heartbeat.interval.ms": "250",
    "broker.session.timeout.ms": "1000",
    "controller.quorum.fetch.timeout.ms": "1000",
    "controller.quorum.election.timeout.ms": "500",
    "controller.quorum.election.backoff.max.ms": "300",
    # A follower that lags this long leaves the ISR (so acks=all stops waiting for it).
    "replica.lag.time.max.ms": "5000",
}

# A one-node dev broker serves one machine's streams: fewer request threads, and the
# controller's liveness no-op record (a metadata-log append every 0.5 s by default)
# every 5 s. An idle broker used ~0.6 % of a core less (docs/benchmarks.md, "What a
# stream costs"); nothing here changes what clients see.
SINGLE_NODE = {
    "num.network.threads": "1",
    "num.io.threads": "2",
    "background.threads": "2",
    "metadata.max.idle.interval.ms": "5000",
}

_PR_SET_PDEATHSIG = 1


class BrokerUnavailable(RuntimeError):
    """The embedded broker cannot be found, fetched or started."""


@functools.cache
def _kafka_version() -> str:
    """The Kafka version pinned in the bundled pom; it also names the cache folder."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    for dependency in ET.parse(POM).getroot().iterfind("m:dependencies/m:dependency", ns):
        if dependency.findtext("m:artifactId", namespaces=ns) == "kafka_2.13":
            version = dependency.findtext("m:version", namespaces=ns)
            if version:
                return version
    raise RuntimeError(f"{POM} does not pin org.apache.kafka:kafka_2.13")


def _cached_libs(settings: Settings) -> Path:
    return settings.kafka_cache_dir / f"kafka-{_kafka_version()}" / "libs"


def _has_broker_jars(libs: Path) -> bool:
    return any(libs.glob("kafka_2.*.jar"))


def _tail(text: str) -> str:
    """The last lines of a log, without Java stack frames: the messages are what tell why."""
    lines = [line for line in text.splitlines() if not line.startswith(("\tat ", "\t..."))]
    return "\n".join(lines[-LOG_TAIL_LINES:])


def broker_classpath(settings: Settings) -> str:
    """The broker's JVM class path: ``KAFKA_HOME``'s jars if set, else the fetched cache."""
    if settings.kafka_home is not None:
        libs = settings.kafka_home / "libs"
        if not _has_broker_jars(libs):
            raise BrokerUnavailable(
                f"KAFKA_HOME={settings.kafka_home} is not an Apache Kafka installation "
                f"(no kafka_2.*.jar in {libs}): point it at an unpacked Kafka download, "
                "or unset it and run `whipcast kafka fetch`"
            )
    else:
        libs = _cached_libs(settings)
        if not _has_broker_jars(libs):
            raise BrokerUnavailable(
                f"Kafka {_kafka_version()} is not in {libs.parent}: run `whipcast kafka fetch` "
                "(needs Maven and Maven Central), or set KAFKA_HOME to an Apache Kafka download"
            )
    return str(libs / "*")


def fetch(settings: Settings) -> Path:
    """Resolve the broker jars from Maven Central into the cache; return their folder.

    Maven writes into a staging folder that is renamed into place only once complete,
    so an interrupted fetch never leaves a partial broker in the cache.
    """
    libs = _cached_libs(settings)
    if _has_broker_jars(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerUnavailable(
            "Maven (`mvn`) is needed to fetch Kafka: install it, "
            "or set KAFKA_HOME to an Apache Kafka download"
        )
    release = libs.parent
    release.parent.mkdir(parents=True, exist_ok=True)
    # Beside the release folder, so that the final rename stays on one file system.
    staging = Path(tempfile.mkdtemp(prefix=f".{release.name}-", dir=release.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="whipcast-pom-") as project:
            pom = shutil.copy(POM, project)
            result = subprocess.run(
                [
                    mvn,
                    "--batch-mode",
                    "--quiet",
                    "--file",
                    pom,
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={staging / 'libs'}",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0 or not _has_broker_jars(staging / "libs"):
            raise BrokerUnavailable(
                f"mvn could not fetch Kafka {_kafka_version()} (exit {result.returncode}):\n"
                + _tail(result.stdout + result.stderr)
            )
        try:
            staging.rename(release)
        except OSError as exc:
            if not _has_broker_jars(libs):  # else a concurrent fetch got there first
                raise BrokerUnavailable(f"cannot install Kafka into {release}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Fetched Kafka %s into %s", _kafka_version(), libs)
    return libs


def _pick_ports(count: int, port: int | None) -> list[int]:
    """``count`` distinct loopback ports free right now, the first one ``port`` if given.

    They are bound together so that they differ, then released for the brokers to bind;
    another process may take one in between, which the caller handles by retrying.
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        if port:
            # As the JVM does for server sockets, so that TIME_WAIT does not count as taken.
            sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sockets[0].bind(("127.0.0.1", port or 0))
        except OSError as exc:
            raise BrokerUnavailable(f"cannot listen on 127.0.0.1:{port}: {exc}") from exc
        for sock in sockets[1:]:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _cluster_id() -> str:
    """A random cluster id, in the 22-character unpadded base64url form Kafka expects."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):  # would parse as a command line option
            return cluster_id


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux SIGKILL the child when this process dies.

    Without it a crashed or SIGKILLed whipcast leaves an orphan JVM holding its ports.
    libc is loaded here, before the fork, because ``dlopen`` is not safe in the child.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


async def _answers(port: int, brokers: int) -> bool:
    """Whether the broker on ``port`` serves metadata listing ``brokers`` live brokers."""
    try:
        # A bare connect first: aiokafka logs an error for every refused connection.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=5000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    except (KafkaError, OSError):
        return False
    finally:
        await admin.close()
    return len(cluster["brokers"]) >= brokers


@dataclass
class _Node:
    """One KRaft process: broker and controller in one JVM."""

    node_id: int
    directory: Path
    port: int = 0
    controller_port: int = 0
    proc: asyncio.subprocess.Process | None = None

    @property
    def log(self) -> Path:
        return self.directory / "broker.log"

    @property
    def config(self) -> Path:
        return self.directory / "server.properties"

    @property
    def store(self) -> Path:
        return self.directory / "data"

    def log_tail(self) -> str:
        try:
            return _tail(self.log.read_text(errors="replace"))
        except OSError:
            return "(no log)"


class EmbeddedKafka:
    """A KRaft cluster of ``brokers`` child JVMs (one by default), on loopback only.

    Every node is broker and controller at once, and the nodes form one controller
    quorum, so a cluster of three survives the loss of any one node, as production
    clusters do. Configuration, logs (``broker.log``) and data live in a private
    temporary directory removed by :meth:`stop`, or in ``data_dir`` when given, which is
    kept, so that topics survive restarts (a node of a cluster uses ``node-N/`` in it).
    ``port`` fixes the first node's client port instead of picking one.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        data_dir: Path | None = None,
        port: int | None = None,
        brokers: int = 1,
    ) -> None:
        if brokers < 1:
            raise ValueError("a Kafka cluster needs at least one broker")
        self._settings = settings
        self._data_dir = data_dir.resolve() if data_dir is not None else None
        self._port = port
        self._size = brokers
        self._dir: Path | None = None
        self._nodes: list[_Node] = []
        self._java = ""
        self._classpath = ""
        self._running = False

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT[,...]``, every node's client port, for ``bootstrap_servers``."""
        if not self._running:
            raise RuntimeError("the broker is not running")
        return ",".join(f"127.0.0.1:{node.port}" for node in self._nodes)

    @property
    def brokers(self) -> int:
        """How many nodes the cluster has (running or not)."""
        return self._size

    @property
    def pid(self) -> int | None:
        """The first node's process id (the only one of a single broker)."""
        return self.pid_of(1)

    def pid_of(self, node_id: int) -> int | None:
        """The process id of node ``node_id`` (1-based, as in Kafka's ``node.id``)."""
        proc = self._node(node_id).proc if self._nodes else None
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def directory(self) -> Path | None:
        """Where ``server.properties``, ``broker.log`` and the data live while running."""
        return self._dir

    async def start(self) -> str:
        """Start the cluster and return its bootstrap address once every node serves."""
        if self._running:
            raise RuntimeError("the broker is already running")
        self._classpath = broker_classpath(self._settings)
        java = shutil.which("java")
        if java is None:
            raise BrokerUnavailable("Java 17 or newer (`java`) is needed to run Kafka")
        self._java = java
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self._dir = self._data_dir
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="whipcast-kafka-"))
        self._nodes = [
            _Node(i, self._dir if self._size == 1 else self._dir / f"node-{i}")
            for i in range(1, self._size + 1)
        ]
        started = time.monotonic()
        try:
            async with asyncio.timeout(START_TIMEOUT * self._size):
                await self._launch()
        except TimeoutError:
            await self._terminate()
            error = BrokerUnavailable(
                f"Kafka did not start within {START_TIMEOUT * self._size:.0f} s; "
                f"end of the logs:\n{self._log_tail()}"
            )
            await self.stop()
            raise error from None
        except BaseException:
            await self.stop()
            raise
        self._running = True
        logger.info(
            "Kafka (%d broker%s) listening on %s (pids %s, started in %.1f s)",
            self._size,
            "s" if self._size > 1 else "",
            self.bootstrap,
            ", ".join(str(self.pid_of(node.node_id)) for node in self._nodes),
            time.monotonic() - started,
        )
        return self.bootstrap

    async def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after 10 s) and remove the private directory.

        Safe to call more than once, and after a failed :meth:`start`.
        """
        await self._terminate()
        self._running = False
        if self._dir is not None and self._dir != self._data_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    async def kill(self, node_id: int) -> None:
        """SIGKILL one node, as a crash or power loss would, and wait until it is gone."""
        node = self._node(node_id)
        proc, node.proc = node.proc, None
        if proc is not None and proc.returncode is None:
            with suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def restart(self, node_id: int) -> None:
        """Start a killed node again, on its old ports and data, until it serves."""
        node = self._node(node_id)
        if node.proc is not None and node.proc.returncode is None:
            raise RuntimeError(f"Kafka node {node_id} is running")
        async with asyncio.timeout(START_TIMEOUT):
            node.proc = await self._spawn(node)
            await self._until_serving(node)

    async def wait(self) -> int:
        """Wait for any node's process to exit, and return its exit status.

        A broker exits on its own only when it fails, so callers can watch for that.
        """
        procs = [node.proc for node in self._nodes if node.proc is not None]
        if not self._running or not procs:
            raise RuntimeError("the broker is not running")
        done, pending = await asyncio.wait(
            [asyncio.ensure_future(proc.wait()) for proc in procs],
            return_when=asyncio.FIRST_COMPLETED,
        )
        for task in pending:
            task.cancel()
        return done.pop().result()

    async def __aenter__(self) -> EmbeddedKafka:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _node(self, node_id: int) -> _Node:
        if not 1 <= node_id <= len(self._nodes):
            raise ValueError(f"no Kafka node {node_id} (the cluster has {len(self._nodes)})")
        return self._nodes[node_id - 1]

    def _log_tail(self) -> str:
        if len(self._nodes) == 1:
            return self._nodes[0].log_tail()
        return "\n".join(f"--- node {n.node_id}:\n{n.log_tail()}" for n in self._nodes)

    async def _launch(self) -> None:
        # Free ports found here can be taken by someone else before the JVMs bind them.
        retry_bind = self._port is None
        while True:
            ports = _pick_ports(2 * self._size, self._port)
            for node in self._nodes:
                node.port, node.controller_port = ports[node.node_id - 1], ports[-node.node_id]
            for node in self._nodes:
                node.directory.mkdir(parents=True, exist_ok=True)
                self._write_config(node)
            unformatted = [n for n in self._nodes if not (n.store / "meta.properties").exists()]
            if unformatted:
                cluster_id = _cluster_id()
                await asyncio.gather(*(self._format(node, cluster_id) for node in unformatted))
            for node in self._nodes:
                node.proc = await self._spawn(node, fresh_log=True)
            try:
                await asyncio.gather(*(self._until_serving(node) for node in self._nodes))
                return
            except BrokerUnavailable:
                tail = self._log_tail()
                await self._terminate()
                if retry_bind and "Address already in use" in tail:
                    retry_bind = False
                    logger.info("Kafka lost a port race; retrying with other ports")
                    continue
                raise

    async def _until_serving(self, node: _Node) -> None:
        """Return once ``node`` serves metadata listing the whole cluster."""
        assert node.proc is not None
        while node.proc.returncode is None:
            if await _answers(node.port, self._size):
                return
            await asyncio.sleep(0.1)
        raise BrokerUnavailable(
            f"Kafka node {node.node_id} exited during start-up:\n{node.log_tail()}"
        )

    def _write_config(self, node: _Node) -> None:
        replicas = min(3, self._size)
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self._nodes)
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},"
            f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.store),
            # Internal topics cannot have more replicas than there are nodes.
            "offsets.topic.replication.factor": str(replicas),
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min(2, replicas)),
            "default.replication.factor": str(replicas),
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            # whipcast creates its topics with explicit settings; a typo should fail.
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(MAX_MESSAGE_BYTES),
            "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
            # Short segments and frequent checks so that stream retention frees disk.
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.retention.check.interval.ms": "30000",
        }
        settings.update(CLUSTER_FAILOVER if self._size > 1 else SINGLE_NODE)
        node.config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))

    async def _format(self, node: _Node, cluster_id: str) -> None:
        """Write the storage metadata (cluster id, node id) a KRaft node needs first."""
        proc = await asyncio.create_subprocess_exec(
            self._java,
            *JVM_OPTIONS,
            "-cp",
            self._classpath,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(node.config),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=node.directory,
            preexec_fn=_die_with_parent(),
        )
        try:
            output, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                with suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise BrokerUnavailable(
                f"formatting Kafka storage failed (exit {proc.returncode}):\n"
                + _tail(output.decode(errors="replace"))
            )

    async def _spawn(self, node: _Node, fresh_log: bool = False) -> asyncio.subprocess.Process:
        # Its own session keeps a terminal's Ctrl-C away from the JVM: whipcast stops it
        # in order, after the clients that use it. A restarted node appends to its log.
        with node.log.open("wb" if fresh_log else "ab") as log:
            return await asyncio.create_subprocess_exec(
                self._java,
                f"-Xmx{self._settings.kafka_heap}",
                *BROKER_JVM_OPTIONS,
                *JVM_OPTIONS,
                "-cp",
                self._classpath,
                "kafka.Kafka",
                str(node.config),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node.directory,  # where the JVM drops crash reports
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )

    async def _terminate(self) -> None:
        """Stop every node: SIGTERM for a clean shutdown (logs flushed, no recovery next
        start), then SIGKILL. All at once, so that no node waits for a departed quorum."""
        await asyncio.gather(*(self._terminate_node(node) for node in self._nodes))

    async def _terminate_node(self, node: _Node) -> None:
        proc, node.proc = node.proc, None
        if proc is None or proc.returncode is not None:
            return
        with suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            logger.warning("Kafka node %d ignored SIGTERM for %.0f s; killing it",
                           node.node_id, STOP_TIMEOUT)  # fmt: skip
            with suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def run_broker_forever(
    settings: Settings, *, data_dir: Path | None = None, port: int | None = None, brokers: int = 1
) -> None:
    """``whipcast kafka start``: run a broker (or a cluster of ``brokers``) in the
    foreground until SIGINT or SIGTERM.

    Raises :class:`BrokerUnavailable` if it cannot start or a node dies on its own.
    """
    asyncio.run(_serve(settings, data_dir=data_dir, port=port, brokers=brokers))


async def _serve(
    settings: Settings, *, data_dir: Path | None, port: int | None, brokers: int
) -> None:
    # A signal cancels whatever is under way, start-up included; leaving the ``async with``
    # then stops the broker. A second signal interrupts that stop, and the parent-death
    # signal takes the JVM down with this process.
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, main.cancel)
    try:
        async with EmbeddedKafka(settings, data_dir=data_dir, port=port, brokers=brokers) as kafka:
            where = f", data in {data_dir}" if data_dir is not None else ""
            what = "broker" if brokers == 1 else f"cluster of {brokers} brokers"
            print(f"Kafka {_kafka_version()} {what} ready at {kafka.bootstrap}{where}", flush=True)
            print(f"  export WHIPCAST_KAFKA_BOOTSTRAP={kafka.bootstrap}", flush=True)
            status = await kafka.wait()
            raise BrokerUnavailable(
                f"a Kafka node exited unexpectedly (status {status}):\n{kafka._log_tail()}"
            )
    except asyncio.CancelledError:
        print("Kafka stopped", flush=True)


def announce_path(settings: Settings) -> Path:
    """Where ``whipcast dev`` leaves its embedded broker's address for this machine's
    other commands (``tap``, ``push``, ``record``), so they need no flag next to it."""
    return settings.kafka_cache_dir / "dev-bootstrap"


@contextlib.contextmanager
def announced(settings: Settings, bootstrap: str):
    """Announce ``bootstrap`` while the block runs; withdraw it after, unless a later
    ``whipcast dev`` has announced its own meanwhile."""
    path = announce_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bootstrap)
    try:
        yield
    finally:
        with suppress(OSError):
            if path.read_text() == bootstrap:
                path.unlink()


def announced_bootstrap(settings: Settings) -> str | None:
    """The embedded broker a running ``whipcast dev`` announced, if it still answers."""
    try:
        bootstrap = announce_path(settings).read_text().strip()
        host, port = bootstrap.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1.0):
            return bootstrap
    except (OSError, ValueError):
        return None
