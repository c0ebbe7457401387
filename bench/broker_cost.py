"""The embedded broker's CPU per request, variant against variant, in one run.

    python -m bench.broker_cost --variants base c1 c2 --repeat 3 --age 15 --seconds 20

A cell starts a fresh embedded broker (``gateway/broker.py``) with one variant's JVM
flags and broker settings, drives the Kafka traffic of one ``whipcast dev`` stream with
no viewer from this process (variant ``viewer`` adds a frame reader, as egress has), and
reads the broker JVM's CPU (utime + stime, whole process and per thread name, from
``/proc``) in a window ``--age`` s after it started serving, the age of the broker in a
``bench/fixed_cost.py`` window. This process's own CPU in the window is the client side.

The traffic: one 2-partition stream topic; every 33 ms a ~6 KB video record to partition
0 with the Opus records held meanwhile (1–2 of ~160 B) to partition 1 in the same event
loop turn (one produce request, acks=1, as ``gateway/ingest.py`` sends them); six idle
control-plane readers long-polling their own one-partition topics (three at 200 ms, three
at 500 ms, as a node's registry, nodes, control, sessions, directory and thumbnail views);
the producer's metadata probe every 2 s (``Bus._watch_broker``).

Variants alternate cell by cell, so a shared machine's load hits each alike; compare
medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from whipcast.gateway import broker as broker_mod
from whipcast.gateway.settings import Settings

try:  # the event loop whipcast's nodes run on
    import uvloop
except ImportError:
    uvloop = None

CLK_TCK = os.sysconf("SC_CLK_TCK")

C1 = "-XX:TieredStopAtLevel=1"
CTS = "-XX:CompileThresholdScaling=0.3"
# name -> (JVM flags replacing gateway/broker.py's JIT flags (None: as shipped; the
# serial GC and the log configuration stay), extra broker settings, traffic options:
# producer options, ``readers`` idle readers, ``produce`` or not, ``frame_readers``).
VARIANTS: dict[str, tuple[tuple[str, ...] | None, dict[str, str], dict]] = {
    "base": (None, {}, {}),  # as shipped: C1 only, CompileThresholdScaling=0.3
    "c1": ((C1,), {}, {}),  # C1 only at the default thresholds (before h-broker)
    "c2": ((), {}, {}),  # tiered C1 + C2, the JVM's default
    "cts0.3": ((C1, CTS), {}, {}),
    "cts0.1": ((C1, "-XX:CompileThresholdScaling=0.1"), {}, {}),
    "cts0.03": ((C1, "-XX:CompileThresholdScaling=0.03"), {}, {}),
    "noperf": ((C1, CTS, "-XX:-UsePerfData"), {}, {}),
    "nojmx": (None, {"metric.reporters": ""}, {}),
    "acks0": (None, {}, {"acks": 0}),
    # The traffic's parts apart: the stream's produce requests only, the idle readers only.
    "produce": (None, {}, {"readers": 0}),
    "readers": (None, {}, {"produce": False}),
    # A viewer's egress node: one frame reader of the stream (500 ms wait) on top.
    "viewer": (None, {}, {"frame_readers": 1}),
    # For ``perf record -g`` with Java frames (and ``jcmd PID Compiler.perfmap``).
    "base-fp": ((C1, CTS, "-XX:+PreserveFramePointer"), {}, {}),
}


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _threads(pid: int) -> dict[int, int]:
    """CPU ticks per thread id."""
    out: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = int(fields[11]) + int(fields[12])
    return out


def _thread_names(pid: int) -> dict[int, str]:
    """Java thread names by thread id (``jcmd Thread.print``), digits stripped so that
    pools add up; JVM threads jcmd does not list keep their ``comm``."""
    names = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            names[int(task.name)] = (task / "comm").read_text().strip()
    dump = subprocess.run(["jcmd", str(pid), "Thread.print"], capture_output=True, text=True)
    for match in re.finditer(r'^"([^"]+)".* nid=0x([0-9a-f]+)', dump.stdout, re.M):
        names[int(match.group(2), 16)] = match.group(1)
    return {tid: re.sub(r"[-\d]+$", "", re.sub(r"-\d+-", "-N-", n)) for tid, n in names.items()}


async def _traffic(bootstrap: str, options: dict, stop: asyncio.Event) -> None:
    producer_options = dict(options)
    readers = producer_options.pop("readers", 6)
    produce = producer_options.pop("produce", True)
    frame_readers = producer_options.pop("frame_readers", 0)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    idle = [f"bc.idle{i}" for i in range(6)]
    await admin.create_topics([NewTopic("bc.stream", 2, 1)] + [NewTopic(t, 1, 1) for t in idle])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=0, **({"acks": 1} | producer_options)
    )
    await producer.start()
    consumers = []
    for i, topic in enumerate(idle[:readers]):
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=200 if i < 3 else 500,
            fetch_min_bytes=1,
        )
        await consumer.start()
        consumer.assign([TopicPartition(topic, 0)])
        consumers.append(consumer)
    for _ in range(frame_readers):
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=500,
            fetch_min_bytes=1,
        )
        await consumer.start()
        consumer.assign([TopicPartition("bc.stream", 0), TopicPartition("bc.stream", 1)])
        consumers.append(consumer)

    async def drain(consumer: AIOKafkaConsumer) -> None:
        while True:
            await consumer.getmany(timeout_ms=1000)

    async def probe() -> None:
        while True:
            await asyncio.sleep(2)
            await producer.client.fetch_all_metadata()

    tasks = [asyncio.create_task(drain(c)) for c in consumers] + [asyncio.create_task(probe())]
    video, audio = os.urandom(6000), os.urandom(160)
    start = time.monotonic()
    n = 0
    try:
        while not stop.is_set():
            n += 1
            if produce:
                await producer.send("bc.stream", video, partition=0)
                for _ in range(2 if n % 3 else 1):  # 50 audio / 30 video per second
                    await producer.send("bc.stream", audio, partition=1)
            await asyncio.sleep(max(0, start + n / 30 - time.monotonic()))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for consumer in consumers:
            await consumer.stop()
        await producer.stop()


async def _cell(name: str, age: float, seconds: float) -> tuple[float, float, dict[str, float]]:
    jvm, extra, producer_options = VARIANTS[name]
    saved = broker_mod.JVM_OPTIONS, broker_mod.BROKER_JVM_OPTIONS, dict(broker_mod.SINGLE_NODE)
    if jvm is not None:
        broker_mod.JVM_OPTIONS = (*jvm, *broker_mod.JVM_OPTIONS[-1:])  # keep log4j
        broker_mod.BROKER_JVM_OPTIONS = ("-XX:+UseSerialGC",)
    broker_mod.SINGLE_NODE.update(extra)
    try:
        started = time.monotonic()
        async with broker_mod.EmbeddedKafka(Settings()) as kafka:
            served = time.monotonic()
            print(f"   {name} serving after {served - started:.1f} s "
                  f"({_cpu_ticks(kafka.pid) / CLK_TCK:.1f} s of CPU), pid {kafka.pid}",
                  flush=True)  # fmt: skip
            stop = asyncio.Event()
            traffic = asyncio.create_task(_traffic(kafka.bootstrap, producer_options, stop))
            await asyncio.sleep(max(0, served + age - time.monotonic()))
            pid = kafka.pid
            assert pid is not None
            t0, b0, c0, th0 = time.monotonic(), _cpu_ticks(pid), os.times(), _threads(pid)
            await asyncio.sleep(seconds)
            t1, b1, c1, th1 = time.monotonic(), _cpu_ticks(pid), os.times(), _threads(pid)
            names = _thread_names(pid)
            stop.set()
            await traffic
    finally:
        broker_mod.JVM_OPTIONS, broker_mod.BROKER_JVM_OPTIONS, broker_mod.SINGLE_NODE = saved
    wall = t1 - t0
    broker = 100 * (b1 - b0) / CLK_TCK / wall
    client = 100 * ((c1.user - c0.user) + (c1.system - c0.system)) / wall
    threads: dict[str, float] = defaultdict(float)
    for tid, ticks in th1.items():
        threads[names.get(tid, str(tid))] += 100 * (ticks - th0.get(tid, 0)) / CLK_TCK / wall
    return broker, client, threads


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["base"], choices=sorted(VARIANTS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--age", type=float, default=15, help="window start, s after serving")
    parser.add_argument("--seconds", type=float, default=20, help="window length")
    parser.add_argument("--threads", action="store_true", help="print per-thread CPU")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for rep in range(args.repeat):
        for name in args.variants:
            broker, client, threads = await _cell(name, args.age, args.seconds)
            results[name].append((broker, client))
            load = os.getloadavg()[0]
            print(f"rep {rep} {name:8} broker {broker:5.2f} % client {client:5.2f} % "
                  f"load {load:.1f}", flush=True)  # fmt: skip
            if args.threads:
                top = sorted(threads.items(), key=lambda kv: -kv[1])[:8]
                print("   ", ", ".join(f"{k} {v:.2f}" for k, v in top if v > 0.05), flush=True)
    print("median broker / client % of a core:")
    for name, values in results.items():
        broker = statistics.median(b for b, _ in values)
        client = statistics.median(c for _, c in values)
        print(f"  {name:8} {broker:5.2f} / {client:5.2f}  ({len(values)} cells)")


if __name__ == "__main__":
    uvloop.run(main()) if uvloop is not None else asyncio.run(main())
