"""The deployment under test: a given URL, or a private one started on loopback.

A private target is either ``whipcast dev`` (every role and its embedded broker in one
node, as an operator tries it first) or ``split``: the embedded broker, ``whipcast
ingest`` and ``whipcast egress`` as separate processes, so that each role's CPU and
memory can be read from /proc apart. A given URL is used as it is; if it is on this
machine, the process listening on its port is sampled as ``node``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from yarl import URL

from .cli import LOOPBACK_HOSTS
from .procs import WHIPCAST_BOOTSTRAP, Children, children_of, free_port, listening_pid

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120.0
KEYFRAME_DROPS = "whipcast_egress_viewer_keyframe_drops_total"


@dataclass
class Target:
    kind: str
    """``dev``, ``split`` or ``url``."""
    whip_base: str
    whep_base: str
    pids: dict[str, int] = field(default_factory=dict)
    """Server processes by role, when they run on this machine."""
    egress_processes: int = 1

    @property
    def loopback(self) -> bool:
        hosts = (URL(self.whip_base).host, URL(self.whep_base).host)
        return all(host in LOOPBACK_HOSTS for host in hosts)

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "whip": self.whip_base,
            "whep": self.whep_base,
            "local_processes": sorted(self.pids),
            "server_cpu": "sampled from /proc" if self.pids else "not measured (remote)",
            "egress_processes": self.egress_processes,
        }


async def open_target(stack: contextlib.AsyncExitStack, children: Children, url: str | None,
                      kind: str, token: str | None, logs: Path) -> Target:  # fmt: skip
    """The target, started if needed; ``stack`` stops what was started."""
    if url is not None:
        base = url.rstrip("/")
        target = Target("url", base, base)
        port = URL(base).port
        pid = listening_pid(port) if target.loopback and port else None
        if pid is not None and pid != os.getpid():
            target.pids["node"] = pid
        return target
    if kind == "dev":
        port = free_port()
        proc = await _whipcast(children, logs / "dev.log", "dev", port, token)
        base = f"http://127.0.0.1:{port}"
        await _started(base, proc, logs / "dev.log")
        target = Target("dev", base, base, {"node": proc.pid})
        brokers = children_of(proc.pid)
        if brokers:
            target.pids["kafka"] = brokers[0]
        return target

    from whipcast.gateway.broker import EmbeddedKafka
    from whipcast.gateway.settings import Settings

    kafka = await stack.enter_async_context(EmbeddedKafka(Settings.from_env()))
    stack.push_async_callback(children.stop)  # the roles stop before their broker
    bases, pids = {}, {"kafka": kafka.pid}
    for role in ("ingest", "egress"):
        port = free_port()
        proc = await _whipcast(children, logs / f"{role}.log", role, port, token,
                               "--kafka-bootstrap", kafka.bootstrap)  # fmt: skip
        bases[role], pids[role] = f"http://127.0.0.1:{port}", proc.pid
        await _started(bases[role], proc, logs / f"{role}.log")
    return Target("split", bases["ingest"], bases["egress"], pids)


async def _whipcast(children: Children, log_path: Path, role: str, port: int,
                    token: str | None, *extra: str) -> asyncio.subprocess.Process:  # fmt: skip
    argv = [sys.executable, "-c", WHIPCAST_BOOTSTRAP, role, "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "WARNING", *extra]  # fmt: skip
    if token:
        argv += ["--publish-token", token]
    log = await asyncio.to_thread(open, log_path, "w")
    try:
        return await children.exec(*argv, log=log, cwd=str(ROOT))
    finally:
        log.close()  # the child has its own copy of the descriptor


async def _started(base: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
    try:
        await wait_ready(base, proc)
    except (RuntimeError, TimeoutError) as exc:
        text = await asyncio.to_thread(log_path.read_text, errors="replace")
        tail = text.splitlines()[-15:]
        raise RuntimeError("\n  ".join([str(exc), *tail])) from None


async def wait_ready(base: str, proc: asyncio.subprocess.Process | None = None,
                     timeout: float = START_TIMEOUT) -> None:  # fmt: skip
    """Until ``/readyz`` answers 200 (the node started and reached Kafka)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            if proc is not None and proc.returncode is not None:
                raise RuntimeError(f"the server at {base} exited ({proc.returncode})")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{base} was not ready within {timeout:.0f} s")


async def wait_stream(http: aiohttp.ClientSession, whep_base: str, stream: str,
                      timeout: float = 30.0) -> None:  # fmt: skip
    """Until the egress side knows the stream (its registry saw the publish)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(f"{whep_base}/api/streams/{stream}") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{whep_base} did not see stream {stream!r} within {timeout:.0f} s")


async def keyframe_drops(http: aiohttp.ClientSession, whep_base: str) -> int | None:
    """Viewers dropped to the next keyframe, summed over streams, from ``/metrics``
    (``None`` when the endpoint is not reachable)."""
    try:
        async with http.get(f"{whep_base}/metrics") as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(KEYFRAME_DROPS)
        )
    )
