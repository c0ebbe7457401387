"""A viewer worker process: joins its share of the viewers at the ramp rate and answers
the controller's questions over a pipe.

Viewers are spread over several such processes so that the load generator is not the
bottleneck; each process is one event loop, like a browser tab per viewer would not be.
Commands (each answered once): ``join``, ``peek`` (live counters for the progress
line), ``mark`` (open the measurement window), ``collect`` (per-viewer results),
``stop`` (DELETE every session and exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.connection
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from . import viewer as whep
from .procs import die_with_parent, run_event_loop

CONNECT_TIMEOUT = 20.0
FIRST_FRAME_TIMEOUT = 15.0


@dataclass(frozen=True)
class ViewerSpec:
    url: str
    """The stream's WHEP endpoint."""
    probe: bool


@dataclass
class Joined:
    spec: ViewerSpec
    tracker: whep.FrameTracker
    viewer: whep.Viewer | None = None
    ttff_ms: float | None = None
    answer_ms: float | None = None
    first_packet_ms: float | None = None
    failure: str | None = None


class Worker:
    def __init__(self, specs: list[ViewerSpec], ramp_per_s: float) -> None:
        self.specs = specs
        self.ramp_per_s = ramp_per_s
        self.joined: list[Joined] = []
        self._tasks: list[asyncio.Task] = []
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT))

    async def join_all(self) -> None:
        """Start one join per 1/ramp seconds, not waiting for the previous one, so that
        the ramp does not slow down when joins do."""
        start = time.monotonic()
        for i, spec in enumerate(self.specs):
            await asyncio.sleep(max(0.0, start + i / self.ramp_per_s - time.monotonic()))
            entry = Joined(spec, whep.FrameTracker(spec.probe))
            self.joined.append(entry)
            self._tasks.append(asyncio.create_task(self._join(entry)))

    async def _join(self, entry: Joined) -> None:
        try:
            viewer = entry.viewer = await asyncio.wait_for(
                whep.connect(self.http, entry.spec.url, entry.tracker), CONNECT_TIMEOUT
            )
            await asyncio.wait_for(entry.tracker.first_frame.wait(), FIRST_FRAME_TIMEOUT)
            entry.answer_ms = (viewer.answered_ns - viewer.posted_ns) / 1e6
            entry.first_packet_ms = (entry.tracker.first_packet_ns - viewer.posted_ns) / 1e6
            entry.ttff_ms = (entry.tracker.first_frame_ns - viewer.posted_ns) / 1e6
        except TimeoutError:
            entry.failure = "no first frame" if entry.viewer else "connect timed out"
        except Exception as exc:
            entry.failure = f"{type(exc).__name__}: {exc}"

    def peek(self) -> dict[str, Any]:
        windows = [e.tracker.window for e in self.joined]
        return {
            "joined": sum(e.ttff_ms is not None for e in self.joined),
            "failed": sum(e.failure is not None for e in self.joined),
            "frames": sum(w.frames for w in windows),
            "g2g_recent": [v for w in windows for v in w.g2g_ms[-30:]],
        }

    def mark(self) -> None:
        for entry in self.joined:
            entry.tracker.start_window()

    def collect(self) -> list[dict[str, Any]]:
        results = []
        for entry in self.joined:
            entry.tracker.recording = False
            w = entry.tracker.window
            results.append({
                "probe": entry.spec.probe,
                "codec": entry.tracker.codec,
                "ttff_ms": entry.ttff_ms,
                "answer_ms": entry.answer_ms,
                "first_packet_ms": entry.first_packet_ms,
                "failure": entry.failure,
                "frames": w.frames,
                "incomplete": w.incomplete,
                "packets_lost": w.packets_lost,
                "freezes": w.freezes,
                "freeze_ms": w.freeze_ms,
                "decoded": w.decoded,
                "unreadable": w.unreadable,
                "g2g_ms": list(w.g2g_ms),
            })  # fmt: skip
        return results

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        closing = [whep.close(self.http, e.viewer) for e in self.joined if e.viewer]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 20)
        await self.http.close()


async def _serve(conn: multiprocessing.connection.Connection, specs: list[ViewerSpec],
                 ramp_per_s: float, lifetime_s: float, loopback: bool) -> None:  # fmt: skip
    if loopback:
        from whipcast.gateway.peer import use_host_addresses

        use_host_addresses(("127.0.0.1",))
    worker = Worker(specs, ramp_per_s)
    joining: asyncio.Task | None = None
    deadline = time.monotonic() + lifetime_s
    try:
        while time.monotonic() < deadline:
            if not await asyncio.to_thread(conn.poll, 0.5):
                continue
            command = conn.recv()[0]
            if command == "join":
                joining = asyncio.create_task(worker.join_all())
                conn.send(("ok", None))
            elif command == "peek":
                conn.send(("peek", worker.peek()))
            elif command == "mark":
                worker.mark()
                conn.send(("ok", None))
            elif command == "collect":
                conn.send(("stats", worker.collect()))
            elif command == "stop":
                break
    except EOFError:
        pass  # the controller is gone
    finally:
        if joining is not None:
            joining.cancel()
            await asyncio.gather(joining, return_exceptions=True)
        await worker.stop()
    with contextlib.suppress(OSError):
        conn.send(("ok", None))


def worker_main(conn: multiprocessing.connection.Connection, specs: list[ViewerSpec],
                ramp_per_s: float, lifetime_s: float, loopback: bool) -> None:  # fmt: skip
    """Process entry point (spawned by :class:`whipcast.loadtest.procs.Children`)."""
    die_with_parent()
    run_event_loop(_serve(conn, specs, ramp_per_s, lifetime_s, loopback))
