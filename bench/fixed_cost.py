"""What a stream costs: whipcast and MediaMTX side by side, one run, cells interleaved.

    python -m bench.fixed_cost --servers mediamtx base dev split --viewers 0 10 100 \\
        --baseline main --mediamtx-src ~/src/mediamtx --repeat 2 --json out.json
    python -m bench.fixed_cost --servers mediamtx dev --streams 20 --viewers 5   # S x V

The workload is the one of ``../shared/notes/peer-benchmark.md``, identical for every
server: a pre-encoded 720p30 ~1.5 Mbps H.264 + Opus 64 kbps loop published in real time
by FFmpeg's WHIP muxer (stream copy, one publisher process per stream), and aiortc WHEP
viewers in worker processes that count RTP and never decode.

A *cell* is one server, S streams and V viewers per stream: a fresh server, the
publishers, ``--settle`` s (3), viewers joining at ``--join-rate``, ``--warmup`` s, then
a window of ``--seconds`` in which the CPU of the server's whole process tree is read from
``/proc`` (whipcast: the Python node(s) and the broker JVM, also apart). Cells run
repetition by repetition, viewer count by viewer count, server by server, so that load
from other processes on a shared machine hits every server alike; each cell records the
load average and the CPU everything else used in its window.

Servers: ``dev`` (``whipcast dev``: one node + embedded broker), ``split`` (``whipcast
kafka start``, ``whipcast ingest``, ``whipcast egress``: ingest, broker and egress
apart), ``base``/``base-split`` (the same from the git ref ``--baseline``, so a change
is judged before/after in one run), ``mediamtx`` (see ``bench/mediamtx.py``; skipped
with a message without Go and a checkout).

Per cell: CPU % of one core (server total and parts), TTFF (WHEP POST to the first
complete video frame), frames received, and *in→out* latency: kernel time a frame's
last RTP packet reaches the server to the time the server sends that frame's last
packet to each viewer (``AF_PACKET`` capture on ``lo``, needs CAP_NET_RAW; flows are
matched by RTP timestamp, so servers that rewrite timestamps are matched by offset).
``--profile DIR`` adds py-spy of the whipcast node(s), a JFR CPU sample and per-thread
CPU of the broker per cell; ``ss`` counts the TCP data segments the broker received per
second (≈ requests while they are few; it undercounts when requests share segments).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import aiohttp
from whipcast.loadtest.ffmpeg_cert import write_p256_certificate
from whipcast.loadtest.procs import (
    CLK_TCK,
    WHIPCAST_BOOTSTRAP,
    Children,
    die_with_parent,
    free_port,
    machine,
    machine_busy_s,
    receive,
    run_event_loop,
)

from . import mediamtx
from .gateway_bench import (
    FPS,
    BenchViewer,
    MarkerCapture,
    NoCapture,
    TrackCounters,
    _count_rtp_packet,
    mux_loop,
    percentile,
    preencode,
    profile_top,
    udp_ports,
)

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 90.0
WHIPCAST_SERVERS = ("dev", "split", "base", "base-split")


# ---------------------------------------------------------------------------------------
# /proc: a process tree's CPU


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))):
            parent_of[int(entry)] = int(fields[1])
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, ppid in parent_of.items() if ppid in frontier]
        found += frontier
    return found


def cpu_s(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0


def comm(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
    return "?"


def broker_requests(port: int) -> int:
    """Data segments the broker's client port has received so far on its open
    connections (one small request is one segment): ``ss`` reads them from the kernel."""
    try:
        out = subprocess.run(
            ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(int(m) for m in re.findall(r"data_segs_in:(\d+)", out))


# ---------------------------------------------------------------------------------------
# Publisher: S FFmpeg WHIP muxers in one process, fed the same pre-encoded loop


def write_source(directory: Path, seconds: float, bitrate: int) -> Path:
    """Encode the loop once (``gateway_bench.preencode``) into a file that every
    publisher process reads: the H.264 access units and Opus packets."""
    _, _, video, audio = preencode(seconds, bitrate)
    path = directory / "source.pickle"
    path.write_bytes(pickle.dumps((video, audio)))
    return path


def publisher_main(conn, url: str, cert: str, key: str, seconds: float, bitrate: int,
                   source: str) -> None:  # fmt: skip
    """One stream through FFmpeg's WHIP muxer, in a process of its own: a muxer answers
    ICE consent checks only while it is written to, so one process per stream keeps
    every session alive while the others are still in their handshakes."""
    import av

    die_with_parent()
    av.logging.set_level(av.logging.ERROR)
    out = None
    try:
        video, audio = pickle.loads(Path(source).read_bytes())
        video_in, audio_in = _templates(seconds, bitrate)
        options = {"handshake_timeout": "10000", "cert_file": cert, "key_file": key}
        out = av.open(url, mode="w", format="whip", options=options)
        vs = out.add_stream_from_template(video_in.streams.video[0])
        aus = out.add_stream_from_template(audio_in.streams.audio[0])
        mux_loop(out, vs, aus, video, audio, conn, ("live",))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    finally:
        if out is not None:
            with contextlib.suppress(Exception):
                out.close()
    conn.send(("stopped",))


def _templates(seconds: float, bitrate: int):
    """Stream templates (codec parameters) for the muxer: a one-frame encode."""
    video_in, audio_in, _, _ = preencode(1 / FPS, bitrate)
    return video_in, audio_in


# ---------------------------------------------------------------------------------------
# Viewers: aiortc peers that count RTP (gateway_bench's counters), any WHEP URL


async def _connect(http: aiohttp.ClientSession, url: str) -> BenchViewer:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    viewer = BenchViewer(pc, TrackCounters(), TrackCounters(audio=True))
    pc.addTransceiver("video", direction="recvonly").receiver._bench = viewer.video
    pc.addTransceiver("audio", direction="recvonly").receiver._bench = viewer.audio
    await pc.setLocalDescription(await pc.createOffer())
    viewer.posted_ns = time.time_ns()
    async with http.post(url, data=pc.localDescription.sdp,
                         headers={"Content-Type": "application/sdp"}) as response:  # fmt: skip
        body = await response.text()
        if response.status != 201:
            await pc.close()
            raise RuntimeError(f"WHEP POST answered {response.status}: {body[:200]}")
        location = response.headers.get("Location")
        viewer.location = urljoin(url, location) if location else None
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return viewer


async def _viewers(conn) -> None:
    from aiortc.rtcrtpreceiver import RTCRtpReceiver
    from whipcast.gateway.peer import use_host_addresses

    use_host_addresses(("127.0.0.1",))
    RTCRtpReceiver._handle_rtp_packet = _count_rtp_packet
    viewers: list[BenchViewer] = []
    failures: list[str] = []
    async with aiohttp.ClientSession() as http:
        while True:
            command, *args = await asyncio.to_thread(conn.recv)
            if command == "start":
                urls, rate, ready_timeout = args
                for url in urls:
                    try:
                        viewers.append(await asyncio.wait_for(_connect(http, url), 20))
                    except Exception as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(1 / rate)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(*(v.video.started.wait() for v in viewers)), ready_timeout
                    )
                ttff = [(v.video.first_frame_ns - v.posted_ns) / 1e6
                        for v in viewers if v.video.first_frame_ns]  # fmt: skip
                conn.send(("ready", ttff, failures))
            elif command == "mark":
                for v in viewers:
                    v.video.reset(recording=False)
                    v.audio.reset(recording=False)
                conn.send(("marked",))
            elif command == "collect":
                conn.send(("stats", [(v.video.frames, v.video.lost, v.audio.packets)
                                     for v in viewers]))  # fmt: skip
            elif command == "stop":

                async def close(v: BenchViewer) -> None:
                    with contextlib.suppress(Exception):
                        if v.location:
                            async with http.delete(v.location) as response:
                                await response.read()
                    with contextlib.suppress(Exception):
                        await v.pc.close()

                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*(close(v) for v in viewers)), 20)
                conn.send(("stopped",))
                return


def viewers_main(conn) -> None:
    die_with_parent()
    run_event_loop(_viewers(conn))


# ---------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    name: str
    pids: dict[str, int] = field(default_factory=dict)
    """Part name (node, ingest, egress, launcher) -> pid; the broker JVM is found below."""
    whip: str = ""
    whep: str = ""
    """URL templates with ``{stream}``."""
    broker_port: int | None = None
    egress_api: str = ""

    def tree(self) -> dict[str, list[int]]:
        """Every process of the server by part; JVMs count as ``broker``."""
        parts: dict[str, list[int]] = defaultdict(list)
        for part, pid in self.pids.items():
            for p in descendants(pid):
                parts["broker" if comm(p) == "java" else part].append(p)
        return parts


def baseline_tree(ref: str, tmp: Path) -> Path:
    """A ``PYTHONPATH`` folder whose ``whipcast`` package is the code at git ``ref``."""
    src = tmp / "baseline-src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True,
                             check=True).stdout  # fmt: skip
    subprocess.run(["tar", "x", "-C", str(src)], input=archive, check=True)
    pkg = tmp / "baseline-path" / "whipcast"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for part in ("gateway", "signaling", "loadtest", "web"):
        (pkg / part).symlink_to(src / part)
    return pkg.parent


async def _http_up(url: str, timeout: float, ok=(200,)) -> bool:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url) as response:
                    if response.status in ok:
                        return True
            await asyncio.sleep(0.25)
    return False


async def _whipcast(args, name: str, children: Children, tmp: Path, log) -> Server:
    env = dict(os.environ)
    name, _, extra = name.partition(":")
    extra_args = tuple(a for a in extra.split(",") if a and not a[:1].isupper())
    # NAME=VALUE in upper case sets the environment, e.g. JAVA_TOOL_OPTIONS for the broker.
    env.update(a.split("=", 1) for a in extra.split(",") if a[:1].isupper() and "=" in a)
    if name.startswith("base"):
        env["PYTHONPATH"] = str(args.baseline_path)
    server = Server(":".join(filter(None, (name, extra))))

    async def role(*argv: str) -> asyncio.subprocess.Process:
        log_level = () if argv[0] == "kafka" else ("--log-level", args.log_level, *extra_args)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WHIPCAST_BOOTSTRAP, *argv, *log_level,
            cwd=tmp, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        children.procs.append(proc)
        return proc

    if name.endswith("split"):
        kafka_port = free_port()
        launcher = await role("kafka", "start")
        server.pids["launcher"] = launcher.pid
        # `whipcast kafka start` takes no port: find the one it prints.
        deadline = time.monotonic() + START_TIMEOUT
        bootstrap = None
        while bootstrap is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if launcher.returncode is not None:
                break
            log.flush()
            text = await asyncio.to_thread(Path(log.name).read_text)
            found = re.findall(r"WHIPCAST_KAFKA_BOOTSTRAP=(\S+)", text)
            bootstrap = found[-1] if found else None
        if bootstrap is None:
            raise RuntimeError(f"{name}: broker did not start (see {log.name})")
        kafka_port = int(bootstrap.rsplit(":", 1)[1])
        ports = {"ingest": free_port(), "egress": free_port()}
        for part, port in ports.items():
            proc = await role(part, "--port", str(port), "--kafka-bootstrap", bootstrap,
                              "--node-id", f"bench-{part}")  # fmt: skip
            server.pids[part] = proc.pid
        server.broker_port = kafka_port
    else:
        port = free_port()
        ports = {"ingest": port, "egress": port}
        proc = await role("dev", "--port", str(port))
        server.pids["node"] = proc.pid
    for port in set(ports.values()):
        if not await _http_up(f"http://127.0.0.1:{port}/healthz", START_TIMEOUT):
            raise RuntimeError(f"{name} did not start (see {log.name})")
    if server.broker_port is None:
        for p in descendants(server.pids["node"]):
            if comm(p) == "java":
                server.broker_port = _java_client_port(p)
    server.whip = f"http://127.0.0.1:{ports['ingest']}/whip/{{stream}}"
    server.whep = f"http://127.0.0.1:{ports['egress']}/whep/{{stream}}"
    server.egress_api = f"http://127.0.0.1:{ports['egress']}/api/streams/{{stream}}"
    return server


def _java_client_port(pid: int) -> int | None:
    """The embedded broker's client port: the lowest port it listens on that is not
    the controller's (both are loopback; the client port is the one clients connect to)."""
    out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=False).stdout
    ports = sorted(int(m) for m in re.findall(rf"127\.0\.0\.1\]?:(\d+)\s.*pid={pid},", out))
    best, most = None, -1
    for port in ports:  # the client port is the one with the most connections
        n = broker_requests(port)
        if n > most:
            best, most = port, n
    return best


async def _mediamtx(args, children: Children, tmp: Path, log) -> Server:
    http_port, udp_port = free_port(), free_port()
    config = mediamtx.write_config(tmp, http_port, udp_port)
    proc = await children.exec(str(args.mediamtx_bin), str(config), log=log, cwd=str(tmp))
    server = Server("mediamtx", {"server": proc.pid})
    if not await _http_up(f"http://127.0.0.1:{http_port}/", START_TIMEOUT, ok=range(200, 500)):
        raise RuntimeError(f"MediaMTX did not start (see {log.name})")
    server.whip = f"http://127.0.0.1:{http_port}/{{stream}}/whip"
    server.whep = f"http://127.0.0.1:{http_port}/{{stream}}/whep"
    return server


# ---------------------------------------------------------------------------------------
# Latency from the loopback capture


def in_out_latency(records: list, server_ports: set[int]) -> list[float]:
    """ms from a frame's last packet reaching the server to the server sending it to a
    viewer, for every (frame, viewer) pair.

    Outgoing flows are matched to incoming ones by an RTP timestamp offset that their
    first packets agree on. The frames that came in just before a send all get a vote,
    so a server that keeps timestamps ties the true offset with one or two frame
    intervals (each an older frame); of the offsets with about the most votes, the one
    with the shortest median latency is the match (an older frame only adds a frame
    interval)."""
    incoming: dict[int, list[tuple[int, int]]] = defaultdict(list)  # ts -> [(ns, flow)]
    in_list: list[tuple[int, int]] = []
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for ns, sport, dport, ts in records:
        if dport in server_ports and sport not in server_ports:
            incoming[ts].append((ns, dport))
            in_list.append((ns, ts))
        elif sport in server_ports:
            outgoing[(sport, dport)].append((ns, ts))
    in_list.sort()

    def latencies(packets: list[tuple[int, int]], offset: int) -> list[float]:
        found = []
        for ns, ts in packets:
            sources = incoming.get((ts - offset) & 0xFFFFFFFF)
            if sources:
                earlier = [s for s, _ in sources if s <= ns]
                if earlier:
                    found.append((ns - max(earlier)) / 1e6)
        return found

    out = []
    for packets in outgoing.values():
        votes: Counter[int] = Counter()
        j = 0
        for ns, ts in packets[:60]:
            while j < len(in_list) and in_list[j][0] <= ns:
                j += 1
            for k in range(max(0, j - 8), j):  # the last few frames in before this send
                votes[(ts - in_list[k][1]) & 0xFFFFFFFF] += 1
        if not votes:
            continue
        top = votes.most_common(1)[0][1]
        candidates = [latencies(packets, o) for o, n in votes.items() if n >= 0.9 * top]
        candidates = [c for c in candidates if len(c) * 2 >= len(packets)] or candidates
        out.extend(min(candidates, key=lambda c: statistics.median(c) if c else math.inf))
    return out


# ---------------------------------------------------------------------------------------
# A cell


async def cell(args, name: str, streams: int, viewers: int, capture) -> dict:
    children = Children()
    with tempfile.TemporaryDirectory(prefix=f"whipcast-fc-{name}-") as tmp_name:
        tmp = Path(tmp_name)
        log = await asyncio.to_thread(open, tmp / "server.log", "w")
        try:
            return await _cell(args, name, streams, viewers, capture, children, tmp, log)
        finally:
            await children.stop()
            log.close()
            if args.logs:
                keep = Path(args.logs) / f"{name}-{streams}x{viewers}-{time.time():.0f}.log"
                await asyncio.to_thread(keep.parent.mkdir, parents=True, exist_ok=True)
                await asyncio.to_thread(shutil.copy, tmp / "server.log", keep)


async def _cell(args, name, streams, viewers, capture, children, tmp, log) -> dict:
    load = [round(v, 2) for v in os.getloadavg()]
    if name == "mediamtx":
        server = await _mediamtx(args, children, tmp, log)
    else:
        server = await _whipcast(args, name, children, tmp, log)
    names = [f"s{i}" for i in range(streams)]
    cert, key = write_p256_certificate(tmp)
    publishers = [
        children.spawn(publisher_main, server.whip.format(stream=s), str(cert), str(key),
                       args.source_seconds, args.bitrate, str(args.source))
        for s in names
    ]  # fmt: skip
    for _, conn in publishers:
        message = await receive(conn, START_TIMEOUT, "a publisher")
        if message[0] != "live":
            raise RuntimeError(f"publisher: {message}")
    if name != "mediamtx":
        for s in names:
            if not await _http_up(server.egress_api.format(stream=s), 30):
                raise RuntimeError(f"{name}: stream {s} never became live")
    await asyncio.sleep(args.settle)
    total = streams * viewers
    workers = []
    if total:
        n_workers = max(1, min(args.workers or (1 if total <= 10 else 2), total))
        urls = [server.whep.format(stream=s) for _ in range(viewers) for s in names]
        for w in range(n_workers):
            workers.append(children.spawn(viewers_main)[1])
            workers[-1].send(("start", urls[w::n_workers], args.join_rate / n_workers, 30.0))
    ttff, failures = [], []
    for conn in workers:
        _, got, failed = await receive(conn, total / args.join_rate + 60, "viewers")
        ttff += got
        failures += failed
    await asyncio.sleep(args.warmup)
    for conn in workers:
        conn.send(("mark",))
        await receive(conn, 10, "viewers")

    parts = server.tree()
    ports = set().union(*(udp_ports(p) for ps in parts.values() for p in ps))
    own = [os.getpid()] + [p.pid for p in children.procs if hasattr(p, "pid")]
    own = sorted(set(own) - {p for ps in parts.values() for p in ps})
    profilers = await _start_profilers(args, name, viewers, parts, tmp) if args.profile else []
    before = {part: sum(cpu_s(p) for p in ps) for part, ps in parts.items()}
    own0, busy0 = sum(cpu_s(p) for p in own), machine_busy_s()
    req0 = broker_requests(server.broker_port) if server.broker_port else 0
    capture.records.clear()
    capture.recording = True
    t0 = time.monotonic()
    await asyncio.sleep(args.seconds)
    capture.recording = False
    elapsed = time.monotonic() - t0
    after = {part: sum(cpu_s(p) for p in ps) for part, ps in parts.items()}
    own1, busy1 = sum(cpu_s(p) for p in own), machine_busy_s()
    req1 = broker_requests(server.broker_port) if server.broker_port else 0
    stats = []
    for conn in workers:
        conn.send(("collect",))
        stats += (await receive(conn, 30, "viewers"))[1]
    profile = await _stop_profilers(profilers, args, name, viewers)

    cpu = {part: 100 * (after[part] - before[part]) / elapsed for part in parts}
    cpu.pop("launcher", None)
    server_cpu = sum(cpu.values())
    own_cpu = 100 * (own1 - own0) / elapsed
    machine_cpu = 100 * (busy1 - busy0) / elapsed
    latency = in_out_latency(capture.records, ports)
    fps = [frames / elapsed for frames, _, _ in stats]
    for conn in workers:
        conn.send(("stop",))
    for conn in workers:
        with contextlib.suppress(Exception):
            await receive(conn, 30, "viewers")
    for _, conn in publishers:
        conn.send("stop")
    for _, conn in publishers:
        with contextlib.suppress(Exception):
            await receive(conn, 10, "a publisher")
    return {
        "server": name,
        "streams": streams,
        "viewers_per_stream": viewers,
        "viewers_receiving": len([f for f in fps if f > 0]),
        "join_failures": failures[:3] + ([f"... {len(failures)} in all"] if failures else []),
        "load_average": load,
        "window_s": round(elapsed, 2),
        "cpu": {k: round(v, 2) for k, v in cpu.items()},
        "server_cpu": round(server_cpu, 2),
        "server_cpu_per_stream": round(server_cpu / streams, 2),
        "bench_cpu": round(own_cpu, 2),
        "other_cpu": round(max(0.0, machine_cpu - server_cpu - own_cpu), 2),
        "broker_requests_per_s": round((req1 - req0) / elapsed, 1) if server.broker_port else None,
        "latency_ms": {q: percentile(latency, q) for q in (50, 99)} | {"n": len(latency)},
        "ttff_ms": {q: percentile(ttff, q) for q in (50, 95)},
        "fps_mean": statistics.fmean(fps) if fps else None,
        "fps_min": min(fps) if fps else None,
        "video_lost": sum(lost for _, lost, _ in stats),
        "profile": profile,
    }


async def _start_profilers(args, name, viewers, parts, tmp) -> list:
    """py-spy on each whipcast node process, JFR on the broker JVM, for the window."""
    out_dir = Path(args.profile)
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    started = []
    seconds = str(max(1, int(args.seconds) - 1))
    for part, pids in parts.items():
        if part in ("node", "ingest", "egress") and shutil.which("py-spy"):
            path = out_dir / f"{name}-{viewers}-{part}.txt"
            proc = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--pid", str(pids[0]), "--rate", "100", "--duration",
                seconds, "--format", "raw", "--nonblocking", "-o", str(path),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            started.append((part, proc, path))
        elif part == "broker" and shutil.which("jcmd"):
            path = out_dir / f"{name}-{viewers}-broker.jfr"
            names = await asyncio.to_thread(jvm_threads, pids[0])
            before = (pids[0], names, thread_cpu(pids[0], names), time.monotonic())
            started.append(("broker threads", before, None))
            for pid in pids:
                command = ["jcmd", str(pid), "JFR.start", f"duration={seconds}s",
                           f"filename={path}", "settings=profile"]  # fmt: skip
                await asyncio.to_thread(
                    subprocess.run, command, capture_output=True, timeout=30, check=False
                )
            started.append((part, None, path))
    return started


async def _stop_profilers(started, args, name, viewers) -> dict:
    profile = {}
    for part, proc, path in started:
        if part == "broker threads":
            pid, names, before, t0 = proc
            after = thread_cpu(pid, names)
            seconds = time.monotonic() - t0
            profile[part] = [
                {"thread": t, "cpu_pct": round(100 * (after[t] - before[t]) / seconds, 2)}
                for t in sorted(after, key=lambda t: before[t] - after[t])[:15]
            ]
        elif proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
            profile[part] = profile_top(path, 25)
        else:
            await asyncio.sleep(2)  # JFR writes the file as its duration ends
            profile[part] = jfr_top(path)
    return profile


def jvm_threads(pid: int) -> dict[int, str]:
    """Native thread id -> thread name of a JVM (names from ``jcmd Thread.print``, digits
    folded so that pools group), for per-thread CPU from ``/proc/PID/task``."""
    try:
        out = subprocess.run(["jcmd", str(pid), "Thread.print"], capture_output=True,
                             text=True, timeout=30, check=False).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    names = {}
    for m in re.finditer(r'^"([^"]+)".*?nid=(0x[0-9a-f]+|\d+)', out, re.M):
        nid = m.group(2)
        names[int(nid, 16) if nid.startswith("0x") else int(nid)] = re.sub(r"\d+", "N", m.group(1))
    return names


def thread_cpu(pid: int, names: dict[int, str]) -> Counter[str]:
    """CPU seconds so far of a process's threads, summed by (folded) thread name."""
    by: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            fields = _stat_path(f"/proc/{pid}/task/{tid}/stat")
            if fields:
                name = names.get(int(tid)) or re.sub(r"\d+", "N", comm_path(pid, tid))
                by[name] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return by


def _stat_path(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def comm_path(pid: int, tid: str) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/comm") as f:
        return f.read().strip()
    return "?"


def jfr_top(path: Path, limit: int = 25) -> list[dict]:
    """Top frames of the JFR CPU samples (``jdk.ExecutionSample``), by self count, plus
    threads by sample count."""
    if not path.exists() or not shutil.which("jfr"):
        return []
    out = subprocess.run(["jfr", "print", "--events", "jdk.ExecutionSample", "--stack-depth",
                          "1", str(path)], capture_output=True, text=True, timeout=120,
                         check=False).stdout  # fmt: skip
    frames: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for block in out.split("jdk.ExecutionSample")[1:]:
        if m := re.search(r'sampledThread = "([^"]*)"', block):
            threads[re.sub(r"\d+", "N", m.group(1))] += 1
        if m := re.search(r"stackTrace = \[\s*\n\s*(\S[^\n]*)", block):
            frames[re.sub(r"\s+line:.*", "", m.group(1))] += 1
    total = sum(frames.values()) or 1
    return [{"function": f, "self_pct": round(100 * n / total, 1)}
            for f, n in frames.most_common(limit)] + [
        {"thread": t, "pct": round(100 * n / total, 1)} for t, n in threads.most_common(12)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------
# The run and the tables


def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_cells(cells: list[dict]) -> None:
    print(f"\n{'server':>10} {'S':>3} {'V':>4} | {'CPU %':>6} {'/stream':>7} | "
          f"{'parts':<40} | {'broker req/s':>12} | {'in->out p50':>11} {'p99':>6} | "
          f"{'TTFF p50':>8} | {'fps':>5} | {'others %':>8} {'load':>5}")  # fmt: skip
    for c in cells:
        parts = " ".join(f"{k} {v:.1f}" for k, v in c["cpu"].items())
        print(
            f"{c['server']:>10} {c['streams']:>3} {c['viewers_per_stream']:>4} | "
            f"{c['server_cpu']:>6.1f} {c['server_cpu_per_stream']:>7.2f} | {parts:<40} | "
            f"{_fmt(c['broker_requests_per_s'], 0):>12} | "
            f"{_fmt(c['latency_ms'][50], 2):>11} {_fmt(c['latency_ms'][99], 2):>6} | "
            f"{_fmt(c['ttff_ms'][50], 0):>8} | {_fmt(c['fps_mean']):>5} | "
            f"{c['other_cpu']:>8.1f} {c['load_average'][0]:>5.2f}"
        )
        if c["join_failures"]:
            print(f"{'':>20}join failures: {c['join_failures']}")


def summarize(cells: list[dict]) -> dict:
    """Median CPU per server and viewer count over repetitions; ratios to MediaMTX;
    marginal CPU-ms per viewer-second (slope over viewer counts > 0)."""
    by: dict[tuple[str, int, int], list[dict]] = defaultdict(list)
    for c in cells:
        by[(c["server"], c["streams"], c["viewers_per_stream"])].append(c)
    rows = {}
    for (server, s, v), group in by.items():
        rows[f"{server} {s}x{v}"] = {
            "server": server, "streams": s, "viewers": v,
            "cpu": statistics.median(c["server_cpu"] for c in group),
            "cpu_per_stream": statistics.median(c["server_cpu_per_stream"] for c in group),
            "runs": [c["server_cpu"] for c in group],
        }  # fmt: skip
    for row in rows.values():
        ref = rows.get(f"mediamtx {row['streams']}x{row['viewers']}")
        row["x_mediamtx"] = round(row["cpu"] / ref["cpu"], 2) if ref and ref["cpu"] else None
    marginal = {}
    for server in {r["server"] for r in rows.values()}:
        points = [(r["streams"] * r["viewers"], r["cpu"]) for r in rows.values()
                  if r["server"] == server and r["viewers"] > 0]  # fmt: skip
        if len({x for x, _ in points}) > 1:
            slope = statistics.linear_regression(*zip(*points, strict=True)).slope
            marginal[server] = round(slope * 10, 2)  # % of a core per viewer -> ms/s
    return {"rows": rows, "marginal_cpu_ms_per_viewer_s": marginal}


async def run(args) -> dict:
    info = {
        "machine": machine(),
        "command": " ".join(["python -m bench.fixed_cost", *sys.argv[1:]]),
    }
    servers = list(args.servers)
    if "mediamtx" in servers:
        binary, why = mediamtx.locate(args.mediamtx_bin, args.mediamtx_src)
        if binary is None:
            print(why)
            servers.remove("mediamtx")
        args.mediamtx_bin = binary
    with tempfile.TemporaryDirectory(prefix="whipcast-fc-") as tmp:
        print("encoding the source loop ...", flush=True)
        args.source = await asyncio.to_thread(
            write_source, Path(tmp), args.source_seconds, args.bitrate
        )
        if any(s.startswith("base") for s in servers):
            args.baseline_path = baseline_tree(args.baseline, Path(tmp))
        try:
            capture: MarkerCapture | NoCapture = MarkerCapture()
        except PermissionError:
            print("no CAP_NET_RAW: in->out latency not measured")
            capture = NoCapture()
        cells = []
        try:
            for rep in range(args.repeat):
                for v in args.viewers:
                    for name in servers:
                        print(f"[{rep + 1}/{args.repeat}] {name}: {args.streams} x {v} ...",
                              flush=True)  # fmt: skip
                        try:
                            cells.append(await cell(args, name, args.streams, v, capture))
                        except Exception as exc:
                            print(f"  failed: {type(exc).__name__}: {exc}")
                            continue
                        print_cells(cells[-1:])
        finally:
            capture.close()
    info["cells"] = cells
    info["summary"] = summarize(cells)
    return info


def _server(spec: str) -> str:
    if spec == "mediamtx" or spec.partition(":")[0] in WHIPCAST_SERVERS:
        return spec
    raise argparse.ArgumentTypeError(f"unknown server {spec!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fixed_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--servers", nargs="+", default=["mediamtx", "dev"], type=_server,
                        help="mediamtx, dev, split, base, base-split; a whipcast server may "
                        "carry node flags and environment variables: dev:--kafka-fetch-wait-ms=5, "
                        "dev:JAVA_TOOL_OPTIONS=-XX:TieredStopAtLevel=1")  # fmt: skip
    parser.add_argument("--viewers", type=int, nargs="+", default=[0, 10],
                        help="viewers per stream, one cell each")  # fmt: skip
    parser.add_argument("--streams", type=int, default=1, help="streams per cell (S x V)")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions, interleaved")
    parser.add_argument("--seconds", type=float, default=20, help="measured window")
    parser.add_argument("--settle", type=float, default=3,
                        help="seconds from publishing to the first join (the JIT of a fresh "
                        "broker is still compiling in the first minute)")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=5, help="seconds after the joins")
    parser.add_argument("--join-rate", type=float, default=10, help="viewers joining per second")
    parser.add_argument("--workers", type=int, default=0, help="viewer processes (default 1-2)")
    parser.add_argument("--bitrate", type=int, default=1500, help="video kbps")
    parser.add_argument("--source-seconds", type=float, default=10, help="pre-encoded loop")
    parser.add_argument("--baseline", default="HEAD", help="git ref the base servers run")
    parser.add_argument("--mediamtx-src", help="MediaMTX checkout to build (env MEDIAMTX_SRC)")
    parser.add_argument("--mediamtx-bin", help="MediaMTX binary (env MEDIAMTX_BIN)")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the nodes, JFR the broker")
    parser.add_argument("--json", metavar="FILE", help="also write every cell as JSON")
    parser.add_argument("--logs", metavar="DIR", help="keep each cell's server log here")
    parser.add_argument("--log-level", default="WARNING", help="of the whipcast nodes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        info = asyncio.run(run(args))
    except KeyboardInterrupt:
        sys.exit("interrupted; every process this run started has been stopped")
    m = info["machine"]
    print(f"\nmachine: {m['nproc']} x {m['cpu_model']}, load at start {m['load_average']}")
    print_cells(info["cells"])
    summary = info["summary"]
    print("\nmedian server CPU (% of one core) and ratio to MediaMTX:")
    for key, row in sorted(summary["rows"].items(), key=lambda kv: (kv[1]["viewers"], kv[0])):
        print(f"  {key:<22} {row['cpu']:6.1f}  per stream {row['cpu_per_stream']:6.2f}  "
              f"x MediaMTX {_fmt(row['x_mediamtx'], 2)}  runs {row['runs']}")  # fmt: skip
    for server, ms in summary["marginal_cpu_ms_per_viewer_s"].items():
        print(f"  marginal {server}: {ms} CPU-ms per viewer-second")
    for c in info["cells"]:
        for part, rows in c["profile"].items():
            print(f"\nprofile {c['server']} {c['streams']}x{c['viewers_per_stream']} {part}:")
            for row in rows[:15]:
                print(f"   {row}")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
