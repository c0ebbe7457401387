"""The processes a load test starts, and what /proc says about any process.

Every child is registered with :class:`Children` and stopped there (TERM, then KILL)
on any exit, Ctrl-C included; children also get SIGTERM from the kernel if this
process dies without cleaning up (``PR_SET_PDEATHSIG``), so nothing outlives a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG = 1

# ``whipcast ...`` in a child that dies with this process (a preexec_fn is unsafe with
# threads, so the child sets the death signal itself before it starts).
WHIPCAST_BOOTSTRAP = (
    "import os, signal, sys, ctypes; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == 1 and sys.exit(1); from whipcast.signaling.cli import main; main(sys.argv[1:])"
)


def die_with_parent() -> None:
    """In a child: SIGTERM when the parent dies, and leave Ctrl-C to the parent, which
    stops the children in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_event_loop(coro: Any) -> None:
    """``uvloop.run`` where uvloop is installed, else ``asyncio.run``."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Children:
    """Every process a run started, stopped in one place."""

    procs: list[Any] = field(default_factory=list)
    ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))

    def spawn(
        self, target: Callable[..., None], *args: Any
    ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]:
        """A Python child running ``target(conn, *args)``, and this side's end of its pipe
        (reads EOF once the child is gone)."""
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()
        self.procs.append(proc)
        return proc, parent

    async def exec(
        self, *argv: str, log: Any, cwd: str | None = None
    ) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, stdout=log, stderr=asyncio.subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    async def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, ValueError):
                if _alive(proc):
                    proc.terminate()
        for proc in self.procs:
            await _reap(proc)
        self.procs.clear()


def _alive(proc: Any) -> bool:
    if isinstance(proc, asyncio.subprocess.Process):
        return proc.returncode is None
    return proc.is_alive()


async def _reap(proc: Any, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError, ValueError):
        if isinstance(proc, asyncio.subprocess.Process):
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 5)
        else:
            await asyncio.to_thread(proc.join, timeout)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5)


async def ask(conn: multiprocessing.connection.Connection, message: tuple, timeout: float,
              what: str) -> Any:  # fmt: skip
    """Send ``message`` to a child and wait at most ``timeout`` s for its one reply."""
    conn.send(message)
    return await receive(conn, timeout, what)


async def receive(conn: multiprocessing.connection.Connection, timeout: float, what: str) -> Any:
    if not await asyncio.to_thread(conn.poll, timeout):
        raise TimeoutError(f"no answer from {what} in {timeout:.0f} s")
    try:
        reply = conn.recv()
    except EOFError:
        raise RuntimeError(f"{what} exited") from None
    if isinstance(reply, tuple) and reply and reply[0] == "error":
        raise RuntimeError(f"{what} failed: {reply[1]}")
    return reply


# ---------------------------------------------------------------------------------------
# /proc


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float
    """User + system CPU seconds of the process, all threads."""
    rss_mb: float


def sample(pid: int) -> ProcSample | None:
    """CPU time and resident memory of a process, or ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return ProcSample(cpu, int(fields[21]) * PAGE_SIZE / 2**20)


def machine_busy_s() -> float:
    """CPU seconds (all cores) the machine has spent busy since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK  # minus idle and iowait


def children_of(pid: int) -> list[int]:
    """Direct children of a process (e.g. the broker JVM of ``whipcast dev``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list as ``taskset -c`` takes it (``0-3,8``); ValueError if it is none."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return frozenset(cpus)


def unavailable_cpus(cpus: frozenset[int] | None) -> str | None:
    """Why ``cpus`` cannot be pinned to here (None if they can), checked before a run."""
    allowed = os.sched_getaffinity(0)
    if cpus and not cpus <= allowed:
        return f"CPUs {sorted(cpus - allowed)} are not available here (allowed: {sorted(allowed)})"
    return None


def pin(pid: int, cpus: frozenset[int] | None) -> None:
    """Pin a running process to ``cpus``, as ``taskset -a -p`` does: every thread it has
    and (for a server that started a broker) its child processes' threads; threads they
    start later inherit it. A process gone meanwhile is skipped."""
    if not cpus:
        return
    for proc in (pid, *children_of(pid)):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{proc}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def listening_pid(port: int) -> int | None:
    """The local process listening on TCP ``port``, if this user can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        return int(entry)
    return None


def machine() -> dict[str, Any]:
    """What a result depends on: cores, CPU model, memory, kernel, library versions."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for module in ("aiortc", "aiohttp", "aiokafka", "av", "uvloop"):
        with contextlib.suppress(Exception):
            versions[module] = __import__(module).__version__
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(PAGE_SIZE * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "packages": versions,
    }
