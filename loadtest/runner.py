"""One load test from start to report: target, publisher, viewer workers, window, results.

A run joins the viewers at the ramp rate (time to first frame is measured here), lets
them settle for ``warmup`` seconds, then opens the measurement window on every viewer at
once: frames, freezes, glass-to-glass samples, server and generator CPU and keyframe
drops are all counted over that same window. A sweep repeats the viewer part for each
count against the same target and publisher.

Every wait has a deadline, every child process is stopped on the way out (exceptions
and Ctrl-C included), and the publisher and viewers exit by themselves after a lifetime
longer than the run if this process vanishes without a word.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import multiprocessing.connection
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from . import stats
from .procs import Children, ask, machine, machine_busy_s, pin, receive, sample
from .publisher import publisher_main
from .report import SCHEMA_VERSION
from .source import VideoFormat
from .target import Target, keyframe_drops, open_target, wait_stream
from .workers import CONNECT_TIMEOUT, FIRST_FRAME_TIMEOUT, ViewerSpec, worker_main

PUBLISH_TIMEOUT = 90.0
SATURATED_PERCENT = 85.0
"""A generator process above this share of one core may be what limits the run."""
LATE_FRACTION = 0.01
"""More of the publisher's frames than this made a frame period late: it is saturated."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LoadConfig:
    fmt: VideoFormat
    streams: int = 1
    viewers: int = 3
    """Per stream."""
    probes: int = 1
    """Per stream, among its viewers: these decode and read the stamps."""
    duration: float = 20.0
    """Seconds of the measurement window."""
    ramp: float = 10.0
    """Viewers joining per second, all workers together."""
    workers: int = 0
    """Viewer processes; 0: one up to 10 viewers, else one per core (2 to 4)."""
    url: str | None = None
    server: str = "dev"
    """Private target when no URL is given: ``dev`` or ``split`` (roles apart)."""
    publish_token: str | None = None
    warmup: float = 2.0
    stream_prefix: str = "loadtest"
    server_cpus: frozenset[int] | None = None
    """CPUs the private target's processes (node or roles, and the broker) run on."""
    load_cpus: frozenset[int] | None = None
    """CPUs the publisher and the viewer workers run on (apart from the server's, on a
    machine with many cores)."""


def worker_count(config: LoadConfig, viewers: int) -> int:
    wanted = config.workers or (1 if viewers <= 10 else min(4, max(2, os.cpu_count() or 1)))
    return max(1, min(wanted, viewers))


def plan_viewers(whep_urls: list[str], per_stream: int, probes: int) -> list[ViewerSpec]:
    """Viewers of all streams interleaved, probes first, so that round-robin shares give
    every worker a mix of streams and spread the probes."""
    specs = []
    for i in range(per_stream):
        specs += [ViewerSpec(url, probe=i < probes) for url in whep_urls]
    return specs


async def execute(config: LoadConfig, sweep: list[int] | None, progress: Progress) -> dict:
    """Run the whole test (a sweep: one run per viewer count) and return the report."""
    children = Children()
    started = datetime.datetime.now(datetime.UTC)
    host = machine()  # before the run: its load average is what else was running
    logs = Path(tempfile.mkdtemp(prefix="whipcast-loadtest-"))
    try:
        runs, target, source = await _execute(config, sweep, progress, children, logs)
    except BaseException:
        if config.url is None:
            progress(f"the private server's logs are kept in {logs}")
        else:
            await asyncio.to_thread(shutil.rmtree, logs)
        raise
    await asyncio.to_thread(shutil.rmtree, logs)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": "whipcast loadtest",
        "mode": "sweep" if sweep else "single",
        "started_at": started.isoformat(timespec="seconds"),
        "machine": host,
        "target": target.describe(),
        "config": {
            **asdict(config),
            "fmt": asdict(config.fmt),
            "sweep": sweep,
            "publish_token": "(set)" if config.publish_token else None,
            "server_cpus": sorted(config.server_cpus) if config.server_cpus else None,
            "load_cpus": sorted(config.load_cpus) if config.load_cpus else None,
        },
        "source": {**source, "background": "testsrc2, 2 s loop, capture-time stamp band"},
    }
    if sweep:
        report["runs"] = runs
        report["sweep"] = stats.capacity(runs, target.egress_processes)
    else:
        report.update(runs[0])
    return report


async def _execute(config: LoadConfig, sweep: list[int] | None, progress: Progress,
                   children: Children, logs: Path) -> tuple[list[dict], Target, dict]:  # fmt: skip
    """Target and publisher up, one run per viewer count, everything stopped again."""
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(children.stop)
        if config.url is None:
            progress(f"starting a private whipcast ({config.server}) with its broker ...")
        target = await open_target(stack, children, config.url, config.server,
                                   config.publish_token, logs)  # fmt: skip
        if config.url is None:
            for pid in target.pids.values():
                pin(pid, config.server_cpus)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        )
        tag = secrets.token_hex(3)
        names = [f"{config.stream_prefix}-{tag}-{i}" for i in range(config.streams)]
        steps = sweep or [config.viewers]
        lifetime = sum(_step_seconds(config, n) for n in steps) + PUBLISH_TIMEOUT + 300
        progress(f"publishing {config.streams} stream(s): encoding {config.fmt.codec} ...")
        publisher, pub = children.spawn(
            publisher_main, [f"{target.whip_base}/whip/{name}" for name in names],
            config.fmt, config.publish_token, lifetime, target.loopback,
        )  # fmt: skip
        pin(publisher.pid, config.load_cpus)
        await receive(pub, PUBLISH_TIMEOUT, "the publisher")
        for name in names:
            await wait_stream(http, target.whep_base, name)
        whep_urls = [f"{target.whep_base}/whep/{name}" for name in names]
        runs = []
        for n in steps:
            run = await _run_step(config, target, http, whep_urls, (publisher.pid, pub),
                                  children, n, progress)  # fmt: skip
            runs.append(run)
        _, source = await ask(pub, ("stop",), 30, "the publisher")
    return runs, target, source


def _step_seconds(config: LoadConfig, per_stream: int) -> float:
    joining = per_stream * config.streams / config.ramp + CONNECT_TIMEOUT + FIRST_FRAME_TIMEOUT
    return joining + config.warmup + config.duration + 60


@dataclass
class _Fleet:
    """The viewer workers of one run."""

    procs: list[Any]
    conns: list[multiprocessing.connection.Connection]

    async def ask_all(self, message: tuple, timeout: float = 15.0) -> list[Any]:
        return [(await ask(c, message, timeout, "a viewer worker"))[1] for c in self.conns]

    async def join(self, total: int, deadline: float, label: str, progress: Progress) -> None:
        """Start the ramp and wait until every viewer got its first frame or failed."""
        await self.ask_all(("join",))
        while time.monotonic() < deadline:
            peeks = await self.ask_all(("peek",))
            joined, failed = sum(p["joined"] for p in peeks), sum(p["failed"] for p in peeks)
            progress(f"{label}: joining {joined}/{total}, {failed} failed")
            if joined + failed == total:
                return
            await asyncio.sleep(1)

    async def stop(self) -> None:
        """Each worker closes its viewers and exits; wait for that, so that a sweep's next
        run does not measure the teardown of this one."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for conn in self.conns:
            with contextlib.suppress(Exception):
                await receive(conn, 30, "a viewer worker")
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 10)


async def _run_step(config: LoadConfig, target: Target, http: aiohttp.ClientSession,
                    whep_urls: list[str], publisher: tuple[int, Any], children: Children,
                    per_stream: int, progress: Progress) -> dict[str, Any]:  # fmt: skip
    specs = plan_viewers(whep_urls, per_stream, config.probes)
    workers = worker_count(config, len(specs))
    lifetime = _step_seconds(config, per_stream) + 120
    fleet = _Fleet([], [])
    for i in range(workers):
        proc, conn = children.spawn(worker_main, specs[i::workers], config.ramp / workers,
                                    lifetime, target.loopback)  # fmt: skip
        pin(proc.pid, config.load_cpus)
        fleet.procs.append(proc)
        fleet.conns.append(conn)
    pub_pid, pub = publisher
    label = f"{len(specs)} viewers"
    try:
        deadline = time.monotonic() + _step_seconds(config, per_stream) - config.duration
        await fleet.join(len(specs), deadline, label, progress)
        await asyncio.sleep(config.warmup)

        pids = {**target.pids, "publisher": pub_pid, "controller": os.getpid()}
        pids.update({f"viewers{i}": p.pid for i, p in enumerate(fleet.procs)})
        before = {name: sample(pid) for name, pid in pids.items()}
        busy0, drops0 = machine_busy_s(), await keyframe_drops(http, target.whep_base)
        # Publisher counts taken right before the viewers' start and end marks, so that
        # both windows are shifted by the same few ms and frames sent and received match.
        sent0 = (await ask(pub, ("stats",), 10, "the publisher"))[1]
        await fleet.ask_all(("mark",))
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < config.duration:
            await asyncio.sleep(min(1.0, config.duration - elapsed))
            peeks = await fleet.ask_all(("peek",))
            now = {name: sample(pid) for name, pid in pids.items()}
            progress(_live_line(label, time.monotonic() - t0, config.duration, peeks,
                                stats.cpu_use(before, now, time.monotonic() - t0)))  # fmt: skip
        sent1 = (await ask(pub, ("stats",), 10, "the publisher"))[1]
        viewers = [v for part in await fleet.ask_all(("collect",), 30) for v in part]
        window = time.monotonic() - t0
        after = {name: sample(pid) for name, pid in pids.items()}
        busy1, drops1 = machine_busy_s(), await keyframe_drops(http, target.whep_base)
    finally:
        await fleet.stop()
    used = stats.cpu_use(before, after, window)
    server = {role: used[role] for role in target.pids if role in used}
    run = stats.summarize(viewers, sent1["frames"] - sent0["frames"], window, server)
    run["viewers_per_stream"] = per_stream
    run["streams"] = len(whep_urls)
    run["keyframe_drops"] = drops1 - drops0 if drops0 is not None and drops1 is not None else None
    run["cpu"] = server
    late = (sent1["late_frames"] - sent0["late_frames"]) / max(1, run["frames_sent"])
    run["generator"] = _generator(used, workers, late)
    busy = 100 * (busy1 - busy0) / window
    run["machine_busy_percent"] = round(busy, 1)
    # Whatever else ran meanwhile: it takes cores from the gateway and the viewers alike.
    run["other_processes_percent"] = round(
        max(0.0, busy - sum(u["percent"] for u in used.values())), 1
    )
    progress(f"{label}: done")
    return run


def _generator(used: dict[str, dict[str, float]], workers: int, late: float) -> dict[str, Any]:
    """The load generator's own CPU: is it, rather than the server, the limit?"""
    worker_use = [v for k, v in used.items() if k.startswith("viewers")]
    busiest = max(
        [u["percent"] for u in worker_use] + [used.get("publisher", {}).get("percent", 0)]
    )
    return {
        "publisher": used.get("publisher"),
        "viewers": {
            "workers": workers,
            "percent": round(sum(u["percent"] for u in worker_use), 1),
            "max_worker_percent": max((u["percent"] for u in worker_use), default=None),
            "rss_mb": round(sum(u["rss_mb"] for u in worker_use), 1),
        },
        "controller": used.get("controller"),
        "publisher_late_fraction": round(late, 4),
        "saturated": busiest >= SATURATED_PERCENT or late > LATE_FRACTION,
    }


def _live_line(label: str, elapsed: float, duration: float, peeks: list[dict],
               cpu: dict[str, dict[str, float]]) -> str:  # fmt: skip
    joined = sum(p["joined"] for p in peeks)
    fps = sum(p["frames"] for p in peeks) / max(1, joined) / max(elapsed, 1e-3)
    recent = sorted(v for p in peeks for v in p["g2g_recent"])
    g2g = f"{recent[len(recent) // 2]:.0f} ms" if recent else "-"
    roles = " ".join(f"{k} {v['percent']:.0f}%" for k, v in cpu.items()
                     if not k.startswith("viewers") and k != "controller")  # fmt: skip
    viewers = sum(v["percent"] for k, v in cpu.items() if k.startswith("viewers"))
    return (f"{label}: {elapsed:4.0f}/{duration:.0f} s  {fps:4.1f} fps/viewer  g2g p50 {g2g}"
            f"  cpu {roles} viewers {viewers:.0f}%")  # fmt: skip
