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
BROKER_JVM_OPTIONS = ("-XX:+UseSerialGC",)

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


def _pick_ports(port: int | None) -> tuple[int, int]:
    """A client port (``port`` if given) and a controller port, both free right now.

    They are bound together so that they differ, then released for the broker to bind;
    another process may take one in between, which the caller handles by retrying.
    """
    with socket.socket() as client, socket.socket() as controller:
        if port:
            # As the JVM does for server sockets, so that TIME_WAIT does not count as taken.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            client.bind(("127.0.0.1", port or 0))
        except OSError as exc:
            raise BrokerUnavailable(f"cannot listen on 127.0.0.1:{port}: {exc}") from exc
        controller.bind(("127.0.0.1", 0))
        return client.getsockname()[1], controller.getsockname()[1]


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


async def _answers(port: int) -> bool:
    """Whether the broker on ``port`` serves metadata and lists itself as alive."""
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
    return bool(cluster["brokers"])


class EmbeddedKafka:
    """A single-node KRaft broker in a child JVM, listening on loopback only.

    Its configuration, log (``broker.log``) and data live in a private temporary
    directory removed by :meth:`stop`, or in ``data_dir`` when given, which is kept, so
    that topics survive restarts. ``port`` fixes the client port instead of picking one.
    """

    def __init__(
        self, settings: Settings, *, data_dir: Path | None = None, port: int | None = None
    ) -> None:
        self._settings = settings
        self._data_dir = data_dir.resolve() if data_dir is not None else None
        self._port = port
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._bootstrap: str | None = None

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT``, for ``bootstrap_servers``."""
        if self._bootstrap is None:
            raise RuntimeError("the broker is not running")
        return self._bootstrap

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def directory(self) -> Path | None:
        """Where ``server.properties``, ``broker.log`` and the data live while running."""
        return self._dir

    async def start(self) -> str:
        """Start the broker and return its bootstrap address once it serves requests."""
        if self._proc is not None:
            raise RuntimeError("the broker is already running")
        classpath = broker_classpath(self._settings)
        java = shutil.which("java")
        if java is None:
            raise BrokerUnavailable("Java 17 or newer (`java`) is needed to run Kafka")
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self._dir = self._data_dir
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="whipcast-kafka-"))
        started = time.monotonic()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                self._bootstrap = await self._launch(java, classpath)
        except TimeoutError:
            await self._terminate()
            error = BrokerUnavailable(
                f"Kafka broker did not start within {START_TIMEOUT:.0f} s; "
                f"end of {self._log}:\n{self._log_tail()}"
            )
            await self.stop()
            raise error from None
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "Kafka broker listening on %s (pid %d, started in %.1f s)",
            self._bootstrap,
            self.pid,
            time.monotonic() - started,
        )
        return self._bootstrap

    async def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after 10 s) and remove its private directory.

        Safe to call more than once, and after a failed :meth:`start`.
        """
        await self._terminate()
        self._bootstrap = None
        if self._dir is not None and self._dir != self._data_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    async def wait(self) -> int:
        """Wait for the broker process to exit, and return its exit status.

        A broker exits on its own only when it fails, so callers can watch for that.
        """
        if self._proc is None:
            raise RuntimeError("the broker is not running")
        return await self._proc.wait()

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

    @property
    def _log(self) -> Path:
        assert self._dir is not None
        return self._dir / "broker.log"

    def _log_tail(self) -> str:
        try:
            return _tail(self._log.read_text(errors="replace"))
        except OSError:
            return "(no log)"

    async def _launch(self, java: str, classpath: str) -> str:
        # Free ports found here can be taken by someone else before the JVM binds them.
        retry_bind = self._port is None
        while True:
            port, controller_port = _pick_ports(self._port)
            config = self._write_config(port, controller_port)
            if not (self._store / "meta.properties").exists():
                await self._format(java, classpath, config)
            self._proc = await self._spawn(java, classpath, config)
            while self._proc.returncode is None:
                if await _answers(port):
                    return f"127.0.0.1:{port}"
                await asyncio.sleep(0.1)
            await self._proc.wait()
            tail = self._log_tail()
            self._proc = None
            if retry_bind and "Address already in use" in tail:
                retry_bind = False
                logger.info("Kafka broker lost a port race; retrying with other ports")
                continue
            raise BrokerUnavailable(f"Kafka broker exited during start-up:\n{tail}")

    @property
    def _store(self) -> Path:
        assert self._dir is not None
        return self._dir / "data"

    def _write_config(self, port: int, controller_port: int) -> Path:
        assert self._dir is not None
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self._store),
            # One node: internal topics cannot have more replicas than that.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
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
        config = self._dir / "server.properties"
        config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        return config

    async def _format(self, java: str, classpath: str, config: Path) -> None:
        """Write the storage metadata (cluster id, node id) a KRaft node needs first."""
        proc = await asyncio.create_subprocess_exec(
            java,
            *JVM_OPTIONS,
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _cluster_id(),
            "-c",
            str(config),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
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

    async def _spawn(self, java: str, classpath: str, config: Path) -> asyncio.subprocess.Process:
        # Its own session keeps a terminal's Ctrl-C away from the JVM: whipcast stops it
        # in order, after the clients that use it.
        with self._log.open("wb") as log:
            return await asyncio.create_subprocess_exec(
                java,
                f"-Xmx{self._settings.kafka_heap}",
                *BROKER_JVM_OPTIONS,
                *JVM_OPTIONS,
                "-cp",
                classpath,
                "kafka.Kafka",
                str(config),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,  # where the JVM drops crash reports
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )

    async def _terminate(self) -> None:
        """SIGTERM for a clean shutdown (logs flushed, no recovery next start), then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            logger.warning("Kafka broker ignored SIGTERM for %.0f s; killing it", STOP_TIMEOUT)
            with suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def run_broker_forever(
    settings: Settings, *, data_dir: Path | None = None, port: int | None = None
) -> None:
    """``whipcast kafka start``: run a broker in the foreground until SIGINT or SIGTERM.

    Raises :class:`BrokerUnavailable` if it cannot start or dies on its own.
    """
    asyncio.run(_serve(settings, data_dir=data_dir, port=port))


async def _serve(settings: Settings, *, data_dir: Path | None, port: int | None) -> None:
    # A signal cancels whatever is under way, start-up included; leaving the ``async with``
    # then stops the broker. A second signal interrupts that stop, and the parent-death
    # signal takes the JVM down with this process.
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, main.cancel)
    try:
        async with EmbeddedKafka(settings, data_dir=data_dir, port=port) as kafka:
            where = f", data in {data_dir}" if data_dir is not None else ""
            print(f"Kafka {_kafka_version()} broker ready at {kafka.bootstrap}{where}", flush=True)
            print(f"  export WHIPCAST_KAFKA_BOOTSTRAP={kafka.bootstrap}", flush=True)
            status = await kafka.wait()
            raise BrokerUnavailable(
                f"Kafka broker exited unexpectedly (status {status}):\n{kafka._log_tail()}"
            )
    except asyncio.CancelledError:
        print("Kafka broker stopped", flush=True)
