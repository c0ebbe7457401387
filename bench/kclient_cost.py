"""The aiokafka client's CPU per produce request and per frame fetch, base against dev.

    python -m bench.kclient_cost --baseline main --repeat 3 --seconds 20
    python -m bench.kclient_cost --variants dev --profile /tmp/kc   # + py-spy of each side

One embedded broker (``gateway/broker.py``) serves every cell. A cell runs two client
processes of one variant side by side: a *producer* that writes one stream as ingest does
(``Bus.send_frame`` from an outbox task: every 33 ms a ~6 KB video frame and the Opus
frames held meanwhile, 1–2 of ~160 B, in one event-loop turn) and a *reader* that follows
it as egress does (``FrameReader.read``, envelope decode included). Each process reads
its own CPU (utime + stime) in a window and counts the Kafka requests it sent by type
(``AIOKafkaConnection.send``, wrapped in this benchmark only), so the producer's CPU per
produce request and the reader's per fetch come out directly; the reader also reports a
frame's age when read (ingest arrival to the reader's hand, one clock). ``base`` runs the
code of git ``--baseline``, ``dev`` this tree; cells alternate, so a shared machine's load
hits both alike: compare medians.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FPS = 30


def _count_requests() -> collections.Counter[str]:
    """Count requests by type as the connections send them (this process only)."""
    from aiokafka.conn import AIOKafkaConnection

    counts: collections.Counter[str] = collections.Counter()
    send = AIOKafkaConnection.send

    def counted(self, request, *args, **kwargs):
        counts[type(request).__name__.split("_")[0]] += 1
        return send(self, request, *args, **kwargs)

    AIOKafkaConnection.send = counted
    return counts


async def _client(role: str, bootstrap: str, warmup: float, seconds: float, profile: str) -> dict:
    counts = _count_requests()
    from whipcast.gateway.bus import Bus, FrameReader
    from whipcast.gateway.frames import Codec, Frame, Track
    from whipcast.gateway.metrics import Metrics
    from whipcast.gateway.settings import Settings

    bus = Bus(Settings(kafka_bootstrap=bootstrap), Metrics())
    await bus.start()
    topic = bus.stream_topic("kc")
    await bus.create_stream_topic("kc")
    stop = asyncio.Event()
    ages: list[float] = []
    window = {"on": False}

    async def produce() -> None:
        outbox: asyncio.Queue = asyncio.Queue()

        async def drain() -> None:  # as IngestSession._drain
            while True:
                partition, frame = await outbox.get()
                await bus.send_frame(topic, frame, partition)

        task = asyncio.create_task(drain())
        video, audio = os.urandom(6000), os.urandom(160)
        start, n = time.monotonic(), 0
        while not stop.is_set():
            n += 1
            now_us = time.time_ns() // 1000
            frame = Frame(Track.VIDEO, Codec.H264, n % 60 == 1, n * 3000, 1, n, now_us, video)
            outbox.put_nowait((None, frame))
            for i in range(2 if n % 3 else 1):  # 50 audio / 30 video per second
                a = Frame(Track.AUDIO, Codec.OPUS, True, n * 1600 + i, 1, n, now_us, audio)
                outbox.put_nowait((None, a))
            await asyncio.sleep(max(0, start + n / FPS - time.monotonic()))
        task.cancel()

    async def read() -> None:
        reader = FrameReader(bus, "kc", lookback=0)
        await reader.start()
        try:
            async for batch in reader.read():
                if window["on"]:
                    now_us = time.time_ns() // 1000
                    ages.extend(
                        (now_us - item.frame.arrival_us) / 1000
                        for item in batch
                        if item.frame.track is Track.VIDEO
                    )
        finally:
            await reader.stop()

    task = asyncio.create_task(produce() if role == "producer" else read())
    await asyncio.sleep(warmup)
    spy = None
    if profile:
        spy = subprocess.Popen(  # noqa: ASYNC220 - started once, before the window
            ["py-spy", "record", "--rate", "250", "--format", "raw",
             "--pid", str(os.getpid()), "--duration", str(int(seconds)), "-o", profile,
             *(["--native"] if os.environ.get("KC_NATIVE") else ["--nonblocking"])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    window["on"] = True
    before, t0, c0 = dict(counts), time.monotonic(), os.times()
    await asyncio.sleep(seconds)
    after, t1, c1 = dict(counts), time.monotonic(), os.times()
    window["on"] = False
    stop.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await bus.stop()
    if spy is not None:
        await asyncio.to_thread(spy.wait)
    wall = t1 - t0
    cpu_ms = 1000 * ((c1.user - c0.user) + (c1.system - c0.system))
    requests = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    out = {"cpu_pct": cpu_ms / wall / 10, "cpu_ms": cpu_ms, "wall": wall, "requests": requests}
    if ages:
        ages.sort()
        out["age_p50"] = ages[len(ages) // 2]
        out["age_p99"] = ages[int(len(ages) * 0.99)]
        out["frames"] = len(ages)
    return out


def _baseline_path(ref: str, tmp: Path) -> Path:
    from bench.fixed_cost import baseline_tree

    return baseline_tree(ref, tmp)


def _cell(variant: str, env: dict, args, bootstrap: str, rep: int) -> dict:
    procs = {}
    for role in ("producer", "reader"):
        profile = f"{args.profile}/{variant}-{role}-{rep}.txt" if args.profile else ""
        cmd = [sys.executable, "-m", "bench.kclient_cost", "--client", role, "--bootstrap",
               bootstrap, "--seconds", str(args.seconds), "--profile", profile]  # fmt: skip
        procs[role] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return {
        role: json.loads(p.communicate()[0].strip().splitlines()[-1]) for role, p in procs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["base", "dev"])
    parser.add_argument("--baseline", default="main", help="git ref the base variant runs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--profile", default="", help="folder for py-spy raw stacks")
    parser.add_argument("--client", choices=["producer", "reader"], help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        import uvloop

        out = uvloop.run(_client(args.client, args.bootstrap, 5, args.seconds, args.profile))
        print(json.dumps(out))
        return
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    asyncio.run(_run(args))


async def _run(args) -> None:
    from whipcast.gateway.broker import EmbeddedKafka
    from whipcast.gateway.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        envs = {}
        for variant in args.variants:
            env = dict(os.environ)
            if variant == "base":
                env["PYTHONPATH"] = str(_baseline_path(args.baseline, Path(tmp)))
            envs[variant] = env
        results: dict[str, list[dict]] = collections.defaultdict(list)
        async with EmbeddedKafka(Settings()) as kafka:
            for rep in range(args.repeat):
                for variant in args.variants:
                    cell = await asyncio.to_thread(
                        _cell, variant, envs[variant], args, kafka.bootstrap, rep
                    )
                    results[variant].append(cell)
                    p, r = cell["producer"], cell["reader"]
                    produces = p["requests"].get("ProduceRequest", 0)
                    fetches = r["requests"].get("FetchRequest", 0)
                    print(
                        f"rep {rep} {variant:5} producer {p['cpu_pct']:5.2f} % "
                        f"({p['cpu_ms'] / max(1, produces):.2f} ms/produce, {p['requests']}) "
                        f"reader {r['cpu_pct']:5.2f} % ({r['cpu_ms'] / max(1, fetches):.2f} "
                        f"ms/fetch, {r['requests']}) age p50/p99 {r.get('age_p50', 0):.1f}/"
                        f"{r.get('age_p99', 0):.1f} ms load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    print("medians: producer % / ms per produce, reader % / ms per fetch, age p50 / p99 ms")
    for variant, cells in results.items():
        p = [c["producer"] for c in cells]
        r = [c["reader"] for c in cells]
        per_produce = [c["cpu_ms"] / max(1, c["requests"].get("ProduceRequest", 0)) for c in p]
        per_fetch = [c["cpu_ms"] / max(1, c["requests"].get("FetchRequest", 0)) for c in r]
        med = statistics.median
        print(
            f"  {variant:5} producer {med(c['cpu_pct'] for c in p):5.2f} / {med(per_produce):.2f}"
            f"  reader {med(c['cpu_pct'] for c in r):5.2f} / {med(per_fetch):.2f}"
            f"  age {med(c.get('age_p50', 0) for c in r):.1f} / "
            f"{med(c.get('age_p99', 0) for c in r):.1f}"
        )


if __name__ == "__main__":
    main()
