"""Gateway benchmark: one 720p30 H.264 stream through ingest, Kafka and egress to N viewers.

    python -m bench.gateway_bench --viewers 1 10 25 50 --seconds 20 [--json FILE]

Every part is real and on loopback: an embedded Apache Kafka broker, ``whipcast ingest``
and ``whipcast egress`` as separate processes (so each role's CPU can be read from
``/proc/PID/stat``), a publisher process that sends ~10 s of pre-encoded H.264 + Opus in
a loop at real time (an aiortc peer whose tracks hand out ``av.Packet``s, or FFmpeg's WHIP
muxer in stream copy), and viewer worker processes whose aiortc peers do full
WHEP/ICE/DTLS/SRTP but count RTP packets instead of decoding.

What is measured, per viewer count, over a window after a warm-up:

- latency: a frame's ingest arrival time (``Frame.arrival_us``, read back from Kafka) to
  the moment egress sends the frame's last RTP packet to each viewer, over every (frame,
  viewer) pair; "last viewer" takes per frame the last viewer's send, which is what
  ``StreamFanout.latency_ms`` measures inside egress. Send times are kernel timestamps
  of the packets on ``lo`` (an ``AF_PACKET`` socket with a BPF filter for RTP packets
  with the marker bit; SRTP leaves the RTP header in the clear), told apart by the
  egress and ingest processes' UDP ports. "in->out" starts instead when the frame's last
  packet reaches the ingest socket; "viewer rx" ends when the viewer process reads it.
- time to first frame: WHEP POST sent to the first complete video frame received.
- CPU % of the ingest and egress processes (utime + stime over the window; 100 % is one
  core), egress per viewer, and viewers per core = 100 / (egress % per viewer); with
  several counts, also the marginal egress cost per viewer (slope over the runs).

The publisher, the broker, the viewers and this process are not the gateway: their CPU
is reported apart, with whatever else kept the machine busy. On a machine with many cores,
``--server-cpus`` and ``--load-cpus`` (CPU lists as ``taskset -c`` takes them) pin the
broker, ingest and egress to some cores and the publisher and viewer workers (``--workers``
of them) to others, so the load generator never competes with what it measures.
Every wait has a time limit;
child processes are stopped on exit and on Ctrl-C, and die with this process if it is
killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fractions
import io
import json
import math
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from whipcast.loadtest.ffmpeg_cert import write_p256_certificate
from whipcast.loadtest.procs import (
    CLK_TCK,
    WHIPCAST_BOOTSTRAP,
    die_with_parent,
    free_port,
    machine,
    parse_cpus,
    pin,
    unavailable_cpus,
)

ROOT = Path(__file__).resolve().parent.parent
STREAM = "bench"
FPS = 30
WIDTH, HEIGHT = 1280, 720
VIDEO_CLOCK = 90000
AUDIO_RATE = 48000
START_TIMEOUT = 90.0
READY_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------------
# Processes


def cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(utime, stime) of a process (all its threads), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]), int(fields[12])


def system_busy_ticks() -> int:
    """CPU time (all cores) the whole machine spent busy, in clock ticks."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def udp_ports(pid: int) -> set[int]:
    """Local UDP ports of the sockets a process has open."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if int(parts[9]) in inodes:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


# ---------------------------------------------------------------------------------------
# Publisher: pre-encoded media through FFmpeg's WHIP muxer, in its own process


def preencode(seconds: float, bitrate_kbps: int):
    """``seconds`` of 720p30 H.264 (constrained baseline, keyframe every 2 s) and stereo
    Opus, encoded once; returns the two demuxers (stream templates) and their packets."""
    import av
    import numpy as np

    frames = int(seconds * FPS)
    video_buf = io.BytesIO()
    with (
        av.open(f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS}", format="lavfi") as src,
        av.open(video_buf, "w", format="h264") as out,
    ):
        stream = out.add_stream(
            "libx264",
            rate=FPS,
            options={
                "profile": "baseline",
                "tune": "zerolatency",
                "preset": "veryfast",
                "threads": "1",  # one slice per frame, as WebRTC encoders send
                "g": str(2 * FPS),
                "keyint_min": str(2 * FPS),
                "sc_threshold": "0",
                "b": f"{bitrate_kbps}k",
                "maxrate": f"{bitrate_kbps}k",
                "bufsize": f"{bitrate_kbps}k",
            },
        )
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i, frame in enumerate(src.decode(video=0)):
            if i == frames:
                break
            frame = frame.reformat(format="yuv420p")
            frame.pict_type = av.video.frame.PictureType.NONE  # let x264 place keyframes
            frame.pts, frame.time_base = i, fractions.Fraction(1, FPS)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)

    audio_buf = io.BytesIO()
    with av.open(audio_buf, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=AUDIO_RATE, layout="stereo")
        stream.bit_rate = 64000
        t = np.arange(960) / AUDIO_RATE
        for i in range(int(seconds * 50)):
            tone = (np.sin(2 * np.pi * 440 * (t + i * 0.02)) * 3000).astype(np.int16)
            chunk = av.AudioFrame.from_ndarray(
                np.repeat(tone, 2).reshape(1, -1), format="s16", layout="stereo"
            )
            chunk.sample_rate, chunk.pts = AUDIO_RATE, i * 960
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)

    video_in = av.open(io.BytesIO(video_buf.getvalue()), format="h264")
    audio_in = av.open(io.BytesIO(audio_buf.getvalue()), format="ogg")
    video = [(bytes(p), p.is_keyframe) for p in video_in.demux(video_in.streams.video[0]) if p.size]
    audio = [bytes(p) for p in audio_in.demux(audio_in.streams.audio[0]) if p.size]
    return video_in, audio_in, video[:frames], audio[: int(seconds * 50)]


def publisher_main(
    kind: str, url: str, cert: str, key: str, seconds: float, bitrate: int, conn
) -> None:
    """Publish the pre-encoded loop at real time until told to stop (then DELETE)."""
    die_with_parent()
    if kind == "ffmpeg":
        _publish_ffmpeg(url, cert, key, seconds, bitrate, conn)
        return
    try:
        import uvloop

        uvloop.run(_publish_aiortc(url, seconds, bitrate, conn))
    except ImportError:
        asyncio.run(_publish_aiortc(url, seconds, bitrate, conn))


def mux_loop(out, vs, aus, video: list, audio: list, conn, live: tuple) -> None:
    """Write the pre-encoded loop (``video``: (data, keyframe) pairs at FPS, ``audio``:
    20 ms Opus packets) into ``out`` in real time until ``conn`` has a message; ``live``
    is sent on ``conn`` after the first packet."""
    import av

    period = len(video) / FPS
    events = sorted(
        [(i / FPS, 0, i) for i in range(len(video))] + [(i * 0.02, 1, i) for i in range(len(audio))]
    )
    start, loop, first = time.monotonic(), 0, True
    while not conn.poll():
        for at, track, i in events:
            delay = start + loop * period + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if track == 0:
                packet = av.Packet(video[i][0])
                packet.stream, packet.is_keyframe = vs, video[i][1]
                packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
                packet.pts = packet.dts = (loop * len(video) + i) * VIDEO_CLOCK // FPS
            else:
                packet = av.Packet(audio[i])
                packet.stream = aus
                packet.time_base = fractions.Fraction(1, AUDIO_RATE)
                packet.pts = packet.dts = (loop * len(audio) + i) * 960
            out.mux(packet)
            if first:
                first = False
                conn.send(live)
        loop += 1


def _publish_ffmpeg(url: str, cert: str, key: str, seconds: float, bitrate: int, conn) -> None:
    """Through FFmpeg's WHIP muxer (stream copy): cheaper than aiortc, but it answers no
    ICE consent checks (ingest must not require them) and ignores keyframe requests."""
    import av

    av.logging.set_level(av.logging.WARNING)
    with av.logging.Capture(local=False) as logs:
        try:
            video_in, audio_in, video, audio = preencode(seconds, bitrate)
            size = sum(len(data) for data, _ in video)
            options = {"handshake_timeout": "10000", "cert_file": cert, "key_file": key}
            with av.open(url, mode="w", format="whip", options=options) as out:
                vs = out.add_stream_from_template(video_in.streams.video[0])
                aus = out.add_stream_from_template(audio_in.streams.audio[0])
                live = ("live", {"video_kbps": size * 8 / (len(video) / FPS) / 1000})
                mux_loop(out, vs, aus, video, audio, conn, live)
        except Exception as exc:
            tail = [f"{name}: {message.strip()}" for _, name, message in logs[-15:]]
            conn.send(("error", f"{type(exc).__name__}: {exc}", tail))
            return
    conn.send(("stopped",))


async def _publish_aiortc(url: str, seconds: float, bitrate: int, conn) -> None:
    """Through an aiortc peer whose tracks hand out the pre-encoded packets: aiortc
    packetizes them without encoding, and does ICE consent, NACK and RTCP itself."""
    import av
    from aiortc import (
        MediaStreamTrack,
        RTCConfiguration,
        RTCPeerConnection,
        RTCRtpSender,
        RTCSessionDescription,
    )
    from whipcast.gateway.peer import use_host_addresses

    use_host_addresses(("127.0.0.1",))
    _, _, video, audio = preencode(seconds, bitrate)
    start = time.monotonic() + 0.5

    class PacketTrack(MediaStreamTrack):
        def __init__(self, kind: str, packets: list, rate: float, clock: int) -> None:
            super().__init__()
            self.kind = kind
            self._packets, self._rate, self._clock, self._i = packets, rate, clock, 0

        async def recv(self):
            i, self._i = self._i, self._i + 1
            await asyncio.sleep(max(0.0, start + i / self._rate - time.monotonic()))
            data = self._packets[i % len(self._packets)]
            packet = av.Packet(data[0] if isinstance(data, tuple) else data)
            packet.time_base = fractions.Fraction(1, self._clock)
            packet.pts = packet.dts = round(i * self._clock / self._rate)
            return packet

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(PacketTrack("video", video, FPS, VIDEO_CLOCK), direction="sendonly")
    pc.addTransceiver(PacketTrack("audio", audio, 50, AUDIO_RATE), direction="sendonly")
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "video":
            codecs = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences(
                [c for c in codecs if c.mimeType == "video/H264"]
                + [c for c in codecs if c.mimeType == "video/rtx"][:1]
            )
    connected = asyncio.Event()
    pc.on("connectionstatechange", lambda: pc.connectionState == "connected" and connected.set())
    location = None
    async with aiohttp.ClientSession() as http:
        try:
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(
                url, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
            ) as response:
                answer = await response.text()
                if response.status != 201:
                    raise RuntimeError(f"WHIP POST answered {response.status}: {answer[:200]}")
                location = response.headers["Location"]
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            await asyncio.wait_for(connected.wait(), 20)
            size = sum(len(data) for data, _ in video)
            conn.send(("live", {"video_kbps": size * 8 / (len(video) / FPS) / 1000}))
            while not await asyncio.to_thread(conn.poll, 0.5):
                if pc.connectionState in ("failed", "closed"):
                    raise RuntimeError(f"publisher connection {pc.connectionState}")
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}", []))
            return
        finally:
            if location is not None:
                with contextlib.suppress(Exception):
                    async with http.delete(url.rsplit("/whip/", 1)[0] + location) as response:
                        await response.read()
            await pc.close()
    conn.send(("stopped",))


# ---------------------------------------------------------------------------------------
# Viewers: real aiortc peers that count RTP instead of decoding, in worker processes


@dataclass
class TrackCounters:
    packets: int = 0
    bytes: int = 0
    frames: int = 0
    lost: int = 0
    other: int = 0
    """Packets of another payload type (RTX) or SSRC."""
    audio: bool = False
    first_ns: int = 0
    first_frame_ns: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    samples: list = field(default_factory=list)
    recording: bool = False
    _pt: int | None = None
    _seq: int | None = None

    def reset(self, recording: bool) -> None:
        self.packets = self.bytes = self.frames = self.lost = self.other = 0
        self.samples = []
        self.recording = recording


async def _count_rtp_packet(self, packet, arrival_time_ms: int) -> None:
    """Stands in for RTCRtpReceiver._handle_rtp_packet: count, keep marker times."""
    counters: TrackCounters | None = getattr(self, "_bench", None)
    if counters is None:
        return
    now = time.time_ns()
    if counters._pt is None:
        counters._pt = packet.payload_type
    elif packet.payload_type != counters._pt:
        counters.other += 1
        return
    counters.packets += 1
    counters.bytes += len(packet.payload)
    if not counters.first_ns:
        counters.first_ns = now
    seq = packet.sequence_number
    if counters._seq is not None:
        step = (seq - counters._seq) & 0xFFFF
        if step >= 0x8000:
            return  # late or repeated
        counters.lost += step - 1
    counters._seq = seq
    if packet.marker or counters.audio:
        counters.frames += 1
        if not counters.first_frame_ns:
            counters.first_frame_ns = now
            counters.started.set()
        if counters.recording and packet.marker:
            counters.samples.append((packet.timestamp, now))


@dataclass
class BenchViewer:
    pc: object
    video: TrackCounters
    audio: TrackCounters
    posted_ns: int = 0
    location: str | None = None


async def _connect_viewer(http: aiohttp.ClientSession, base: str) -> BenchViewer:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    viewer = BenchViewer(pc, TrackCounters(), TrackCounters(audio=True))
    pc.addTransceiver("video", direction="recvonly").receiver._bench = viewer.video
    pc.addTransceiver("audio", direction="recvonly").receiver._bench = viewer.audio
    await pc.setLocalDescription(await pc.createOffer())
    viewer.posted_ns = time.time_ns()
    async with http.post(
        f"{base}/whep/{STREAM}",
        data=pc.localDescription.sdp,
        headers={"Content-Type": "application/sdp"},
    ) as response:
        body = await response.text()
        if response.status != 201:
            await pc.close()
            raise RuntimeError(f"WHEP POST answered {response.status}: {body[:200]}")
        viewer.location = response.headers.get("Location")
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return viewer


async def _close_viewer(http: aiohttp.ClientSession, base: str, viewer: BenchViewer) -> None:
    with contextlib.suppress(Exception):
        if viewer.location:
            async with http.delete(base + viewer.location) as response:
                await response.read()
    with contextlib.suppress(Exception):
        await viewer.pc.close()


async def _worker(conn) -> None:
    from aiortc.rtcrtpreceiver import RTCRtpReceiver
    from whipcast.gateway.peer import use_host_addresses

    use_host_addresses(("127.0.0.1",))
    RTCRtpReceiver._handle_rtp_packet = _count_rtp_packet
    viewers: list[BenchViewer] = []
    failures: list[str] = []
    async with aiohttp.ClientSession() as http:
        base = ""
        while True:
            command, *args = await asyncio.to_thread(conn.recv)
            if command == "start":
                base, count, rate = args
                for _ in range(count):
                    try:
                        viewers.append(await asyncio.wait_for(_connect_viewer(http, base), 20))
                    except Exception as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(max(0.0, 1 / rate))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(*(v.video.started.wait() for v in viewers)), READY_TIMEOUT
                    )
                ttff = [
                    {
                        "first_packet_ms": (v.video.first_ns - v.posted_ns) / 1e6,
                        "first_frame_ms": (v.video.first_frame_ns - v.posted_ns) / 1e6,
                    }
                    for v in viewers
                    if v.video.first_frame_ns
                ]
                conn.send(("ready", {"ttff": ttff, "failures": failures}))
            elif command == "mark":
                for v in viewers:
                    v.video.reset(recording=True)
                    v.audio.reset(recording=False)
                conn.send(("marked",))
            elif command == "collect":
                stats = []
                for v in viewers:
                    v.video.recording = False
                    stats.append(
                        {
                            "video_packets": v.video.packets,
                            "video_bytes": v.video.bytes,
                            "video_frames": v.video.frames,
                            "video_lost": v.video.lost,
                            "rtx": v.video.other,
                            "audio_packets": v.audio.packets,
                            "samples": v.video.samples,
                        }
                    )
                conn.send(("stats", stats))
            elif command == "stop":
                await asyncio.wait_for(
                    asyncio.gather(*(_close_viewer(http, base, v) for v in viewers)), 20
                )
                conn.send(("stopped",))
                return


def worker_main(conn) -> None:
    die_with_parent()
    try:
        import uvloop

        uvloop.run(_worker(conn))
    except ImportError:
        asyncio.run(_worker(conn))


# ---------------------------------------------------------------------------------------
# Loopback capture of RTP marker packets, with kernel timestamps

SO_TIMESTAMPNS = 35
SO_ATTACH_FILTER = 26
SOL_PACKET = 263
PACKET_STATISTICS = 6
ETH_P_IP = 0x0800

# "IPv4, UDP, not a fragment, RTP version 2 with the marker bit": keep 96 bytes of it.
_FILTER = [
    (0x28, 0, 0, 12),  # ldh [12]            ethertype
    (0x15, 0, 11, ETH_P_IP),  # jeq IPv4
    (0x30, 0, 0, 23),  # ldb [23]            IP protocol
    (0x15, 0, 9, 17),  # jeq UDP
    (0x28, 0, 0, 20),  # ldh [20]            fragment offset
    (0x45, 7, 0, 0x1FFF),  # jset -> drop
    (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf)   IP header length
    (0x50, 0, 0, 23),  # ldb [x+23]          RTP byte 1
    (0x45, 0, 4, 0x80),  # jset marker
    (0x50, 0, 0, 22),  # ldb [x+22]          RTP byte 0
    (0x54, 0, 0, 0xC0),  # and #0xc0
    (0x15, 0, 1, 0x80),  # jeq version 2
    (0x06, 0, 0, 96),  # ret #96
    (0x06, 0, 0, 0),  # ret #0
]


class NoCapture:
    """Stands in without CAP_NET_RAW: only the viewers' receive latency is measured."""

    records: list = []
    recording = False

    def drops(self) -> int:
        return 0

    def close(self) -> None:
        pass


class MarkerCapture:
    """Sees every RTP packet with the marker bit sent on ``lo`` (the last packet of each
    video frame), stamped by the kernel as loopback hands it over: still inside the
    sender's ``sendto``, before the receiving process runs. Needs CAP_NET_RAW."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        program = b"".join(struct.pack("HBBI", *op) for op in _FILTER)
        self._program = ctypes.create_string_buffer(program)
        fprog = struct.pack("HL", len(_FILTER), ctypes.addressof(self._program))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
        sock.bind(("lo", 0))
        sock.settimeout(0.2)
        self._sock = sock
        self.records: list[tuple[int, int, int, int]] = []
        """(send time ns, UDP source port, UDP destination port, RTP timestamp)"""
        self.recording = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock, records = self._sock, self.records
        while not self._stop:
            try:
                data, ancdata, _, _ = sock.recvmsg(96, 64)
            except (TimeoutError, InterruptedError):
                continue
            except OSError:
                return
            if not self.recording:
                continue
            udp = 14 + (data[14] & 0x0F) * 4
            rtp = udp + 8
            if len(data) < rtp + 12 or 72 <= data[rtp + 1] & 0x7F <= 79:
                continue  # RTCP
            sport, dport = struct.unpack_from("!HH", data, udp)
            (ts,) = struct.unpack_from("!I", data, rtp + 4)
            ns = time.time_ns()
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    ns = sec * 1_000_000_000 + nsec
            records.append((ns, sport, dport, ts))

    def drops(self) -> int:
        """Packets the kernel dropped for this socket (reading resets the count)."""
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        return struct.unpack("II", raw)[1]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._sock.close()


# ---------------------------------------------------------------------------------------
# Frame arrival times, read back from Kafka


class ArrivalIndex:
    """RTP timestamp -> ingest arrival time (µs) of the stream's video frames."""

    def __init__(self, settings) -> None:
        from whipcast.gateway.bus import stream_topic

        self._settings = settings
        self._topic = stream_topic(settings.topic_prefix, STREAM)
        self.arrival_us: dict[int, int] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        self._consumer = AIOKafkaConsumer(
            **self._settings.kafka_client_options(),
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await self._consumer.start()
        self._consumer.assign([TopicPartition(self._topic, 0)])
        await self._consumer.seek_to_end()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        from whipcast.gateway.frames import Frame, FrameFormatError

        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    with contextlib.suppress(FrameFormatError):
                        frame = Frame.decode(record.value)
                        self.arrival_us[frame.rtp_timestamp] = frame.arrival_us

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()


# ---------------------------------------------------------------------------------------
# Statistics and reporting


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summary(values: list[float]) -> dict:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "n": len(values),
    }


def profile_top(path: Path, limit: int = 20) -> list[dict]:
    """Self time by function from py-spy's raw (collapsed stacks) output."""
    own: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            leaf = stack.split(";")[-1]
            name, _, where = leaf.partition(" (")
            where = where.rstrip(")").rsplit(":", 1)[0]
            own[f"{name} ({where})" if where else name] += int(count)
            total += int(count)
    return [
        {"function": name, "self_pct": round(100 * n / total, 1), "samples": n}
        for name, n in own.most_common(limit)
    ]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: list[dict]) -> None:
    header = (
        f"{'viewers':>7} | {'latency p50':>11} {'p99':>6} | {'last viewer':>11} {'p99':>6} | "
        f"{'in->out p50':>11} {'p99':>6} | {'viewer rx':>9} {'p99':>6} | "
        f"{'TTFF p50':>8} {'p95':>5} | {'ingest%':>7} | {'egress%':>7} {'/viewer':>7} | "
        f"{'viewers/core':>12} | {'fps min':>7} {'lost':>4}"
    )
    print(
        "\nms and % of one core. latency: ingest arrival (Frame.arrival_us) -> egress send, all"
        "\n(frame, viewer) pairs; last viewer: per frame, the last viewer's send; in->out: the"
        "\nframe's last packet reaching ingest -> egress send; viewer rx: -> viewer process;"
        "\nTTFF: WHEP POST -> first complete video frame at the viewer."
    )
    print(header)
    print("-" * len(header))
    for r in results:
        lat, last, wire = r["latency_ms"], r["fanout_latency_ms"], r["wire_to_wire_ms"]
        rx = r["viewer_receive_ms"]
        print(
            f"{r['viewers']:>7} | {_fmt(lat['p50'], 2):>11} {_fmt(lat['p99'], 2):>6} | "
            f"{_fmt(last['p50'], 2):>11} {_fmt(last['p99'], 2):>6} | "
            f"{_fmt(wire['p50'], 2):>11} {_fmt(wire['p99'], 2):>6} | "
            f"{_fmt(rx['p50'], 2):>9} {_fmt(rx['p99'], 2):>6} | "
            f"{_fmt(r['ttff_ms']['p50'], 0):>8} {_fmt(r['ttff_ms']['p95'], 0):>5} | "
            f"{_fmt(r['cpu']['ingest']):>7} | {_fmt(r['cpu']['egress']):>7} "
            f"{_fmt(r['egress_cpu_per_viewer'], 2):>7} | {_fmt(r['viewers_per_core'], 0):>12} | "
            f"{_fmt(r['viewer_fps_min']):>7} {r['video_packets_lost']:>4}"
        )


# ---------------------------------------------------------------------------------------
# The run


@dataclass
class Children:
    """Every process this run started: stopped (TERM, then KILL) in one place."""

    procs: list = field(default_factory=list)
    logs: list = field(default_factory=list)

    async def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                if isinstance(proc, asyncio.subprocess.Process) or proc.is_alive():
                    proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(Exception):
                if isinstance(proc, asyncio.subprocess.Process):
                    try:
                        await asyncio.wait_for(proc.wait(), 10)
                    except TimeoutError:
                        proc.kill()
                        await asyncio.wait_for(proc.wait(), 5)
                else:
                    await asyncio.to_thread(proc.join, 10)
                    if proc.is_alive():
                        proc.kill()
                        await asyncio.to_thread(proc.join, 5)
        self.procs.clear()
        for log in self.logs:
            log.close()


async def _http_ok(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return True
            await asyncio.sleep(0.25)
    return False


async def _recv(conn, timeout: float, what: str):
    if not await asyncio.to_thread(conn.poll, timeout):
        raise TimeoutError(f"no answer from {what} in {timeout:.0f} s")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"{what} exited") from None


async def measure(
    args, n: int, urls: dict, pids: dict, capture, index, children, ctx, out_dir
) -> dict:
    workers = args.workers or (1 if n <= 10 else 2)
    workers = max(1, min(workers, n))
    shares = [n // workers + (i < n % workers) for i in range(workers)]
    conns, procs = [], []
    for share in shares:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(child,), daemon=True)
        proc.start()
        pin(proc.pid, args.load_cpus)
        child.close()  # so that a dead worker reads as EOF here
        children.procs.append(proc)
        procs.append(proc)
        conns.append(parent)
        parent.send(("start", urls["egress"], share, args.join_rate / workers))
    try:
        ttff, failures = [], []
        for conn in conns:
            _, ready = await _recv(conn, n / args.join_rate + 60 + READY_TIMEOUT, "viewers")
            ttff += ready["ttff"]
            failures += ready["failures"]
        if failures:
            print(f"  {len(failures)} viewers failed to join, e.g. {failures[0]}")
        print(f"  {len(ttff)}/{n} viewers receiving; warming up {args.warmup:.0f} s")
        await asyncio.sleep(args.warmup)

        egress_ports = udp_ports(pids["egress"])
        ingest_ports = udp_ports(pids["ingest"])
        capture.records.clear()
        capture.drops()  # resets the kernel's count
        for conn in conns:
            conn.send(("mark",))
        for conn in conns:
            await _recv(conn, 10, "viewers")
        profiler = None
        if args.profile_egress:
            out = out_dir / f"egress-{n}.txt"
            command = ["py-spy", "record", "--pid", str(pids["egress"]), "--rate", "200",
                       "--duration", str(int(args.seconds)), "--format", "raw",
                       "-o", str(out)]  # fmt: skip
            # Native stacks need the process paused while sampled (adds latency then).
            command.append("--native" if args.profile_native else "--nonblocking")
            profile_log = await asyncio.to_thread(open, out_dir / f"egress-{n}.log", "w")
            children.logs.append(profile_log)
            profiler = await asyncio.create_subprocess_exec(
                *command, stdout=profile_log, stderr=asyncio.subprocess.STDOUT
            )
        all_pids = {**pids, **{f"viewers{i}": p.pid for i, p in enumerate(procs)}}
        all_pids["bench"] = os.getpid()
        ticks0 = {name: cpu_ticks(pid) for name, pid in all_pids.items()}
        busy0 = system_busy_ticks()
        capture.recording = True
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        capture.recording = False
        elapsed = time.monotonic() - t0
        ticks1 = {name: cpu_ticks(pid) for name, pid in all_pids.items()}
        busy1 = system_busy_ticks()
        for conn in conns:
            conn.send(("collect",))
        stats = []
        for conn in conns:
            _, part = await _recv(conn, 30, "viewers")
            stats += part
        await asyncio.sleep(0.5)  # the window's last frames reach the arrival index
        capture_drops = capture.drops()
        profile = []
        if profiler is not None:
            try:
                await asyncio.wait_for(profiler.wait(), 30)
            except TimeoutError:
                profiler.kill()
            profile = profile_top(out_dir / f"egress-{n}.txt")
    finally:
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.send(("stop",))
        for conn in conns:
            with contextlib.suppress(Exception):
                await _recv(conn, 30, "viewers")
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
            children.procs.remove(proc)

    cpu, kernel = {}, {}
    for name in all_pids:
        if ticks0[name] is not None and ticks1[name] is not None:
            user, system = (b - a for a, b in zip(ticks0[name], ticks1[name], strict=True))
            cpu[name] = 100 * (user + system) / CLK_TCK / elapsed
            if name in ("ingest", "egress"):
                kernel[name] = 100 * system / CLK_TCK / elapsed
    cpu["viewers"] = sum(v for k, v in cpu.items() if k.startswith("viewers"))
    for k in [k for k in cpu if k.startswith("viewers") and k != "viewers"]:
        del cpu[k]
    # Whatever else ran on the machine meanwhile (other jobs skew latency, not CPU %).
    machine_busy = 100 * (busy1 - busy0) / CLK_TCK / elapsed
    cpu["other_processes"] = max(0.0, machine_busy - sum(cpu.values()))

    arrivals = index.arrival_us
    sends, per_frame, ingest_path, wire = [], defaultdict(float), [], []
    received_at = {ts: ns for ns, _, dport, ts in capture.records if dport in ingest_ports}
    for ns, sport, dport, ts in capture.records:
        arrival = arrivals.get(ts)
        if arrival is None:
            continue
        ms = (ns / 1000 - arrival) / 1000
        if sport in egress_ports:
            sends.append(ms)
            per_frame[ts] = max(per_frame[ts], ms)
            if ts in received_at:
                wire.append((ns - received_at[ts]) / 1e6)
        elif dport in ingest_ports:
            ingest_path.append(-ms)
    received = [
        (ns / 1000 - arrivals[ts]) / 1000
        for viewer in stats
        for ts, ns in viewer["samples"]
        if ts in arrivals
    ]
    fps = [v["video_frames"] / elapsed for v in stats]
    receiving = len(stats)
    per_viewer = cpu.get("egress", 0) / receiving if receiving else None
    return {
        "viewers": n,
        "viewers_receiving": receiving,
        "viewer_workers": workers,
        "window_s": round(elapsed, 2),
        "latency_ms": summary(sends),
        "fanout_latency_ms": summary(list(per_frame.values())),
        "viewer_receive_ms": summary(received),
        "ingest_path_ms": summary(ingest_path),
        "wire_to_wire_ms": summary(wire),
        "ttff_ms": summary([t["first_frame_ms"] for t in ttff]),
        "ttff_first_packet_ms": summary([t["first_packet_ms"] for t in ttff]),
        "cpu": {k: round(v, 2) for k, v in cpu.items()},
        # The roles' CPU spent in the kernel: on loopback, egress's sendto also runs the
        # receiving side of the network stack.
        "cpu_in_kernel": {k: round(v, 2) for k, v in kernel.items()},
        "egress_cpu_per_viewer": per_viewer,
        "viewers_per_core": 100 / per_viewer if per_viewer else None,
        "viewer_fps_min": min(fps) if fps else None,
        "viewer_fps_mean": statistics.fmean(fps) if fps else None,
        "viewer_video_mbps_mean": (
            statistics.fmean(v["video_bytes"] for v in stats) * 8 / elapsed / 1e6 if stats else None
        ),
        "video_packets_lost": sum(v["video_lost"] for v in stats),
        "rtx_packets": sum(v["rtx"] for v in stats),
        "capture_drops": capture_drops,
        "egress_profile_top": profile,
    }


async def run(args) -> dict:
    from whipcast.gateway.broker import EmbeddedKafka
    from whipcast.gateway.settings import Settings

    command = " ".join(["python -m bench.gateway_bench", *sys.argv[1:]])
    info = {"machine": machine(), "command": command}
    ctx = multiprocessing.get_context("spawn")
    children = Children()
    results: list[dict] = []
    out_dir = Path(args.profile_egress) if args.profile_egress else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="whipcast-bench-") as tmp:
        tmp_path = Path(tmp)
        settings = Settings.from_env()
        print("starting Kafka ...")
        async with EmbeddedKafka(settings) as kafka:
            settings = settings.with_(kafka_bootstrap=kafka.bootstrap)
            try:
                capture: MarkerCapture | NoCapture = MarkerCapture()
            except PermissionError:
                print("no CAP_NET_RAW: egress send times unknown, only viewer rx latency")
                capture = NoCapture()
            index = ArrivalIndex(settings)
            try:
                ports = {"ingest": free_port(), "egress": free_port()}
                pids = {"kafka": kafka.pid}
                for role, port in ports.items():
                    log = await asyncio.to_thread(open, tmp_path / f"{role}.log", "w")
                    children.logs.append(log)
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", WHIPCAST_BOOTSTRAP, role, "--port", str(port),
                        "--kafka-bootstrap", kafka.bootstrap, "--node-id", f"bench-{role}",
                        "--log-level", args.log_level,
                        cwd=ROOT, stdout=log, stderr=asyncio.subprocess.STDOUT,
                    )  # fmt: skip
                    children.procs.append(proc)
                    pids[role] = proc.pid
                for pid in pids.values():
                    pin(pid, args.server_cpus)
                urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
                for role, url in urls.items():
                    if not await _http_ok(f"{url}/healthz", START_TIMEOUT):
                        raise RuntimeError(f"{role} did not start: see {tmp_path}/{role}.log")
                cert, key = write_p256_certificate(tmp_path)
                pub_conn, pub_child = ctx.Pipe()
                publisher = ctx.Process(
                    target=publisher_main,
                    args=(args.publisher, f"{urls['ingest']}/whip/{STREAM}", str(cert),
                          str(key), args.source_seconds, args.bitrate, pub_child),
                    daemon=True,
                )  # fmt: skip
                print("pre-encoding and publishing ...")
                publisher.start()
                pin(publisher.pid, args.load_cpus)
                pub_child.close()
                children.procs.append(publisher)
                pids["publisher"] = publisher.pid
                message = await _recv(pub_conn, START_TIMEOUT, "the publisher")
                if message[0] != "live":
                    raise RuntimeError(f"publisher failed: {message[1:]}")
                info["source"] = {
                    "publisher": args.publisher,
                    "video": f"{WIDTH}x{HEIGHT} {FPS} fps H.264 constrained baseline, keyframe "
                    "every 2 s, testsrc2",
                    "video_kbps": round(message[1]["video_kbps"]),
                    "audio": "Opus 48 kHz stereo 64 kbps",
                }
                if not await _http_ok(f"{urls['egress']}/api/streams/{STREAM}", START_TIMEOUT):
                    raise RuntimeError("the egress node never saw the stream in the registry")
                await index.start()
                for n in args.viewers:
                    print(f"{n} viewers ...")
                    result = await measure(
                        args, n, urls, pids, capture, index, children, ctx, out_dir
                    )
                    results.append(result)
                    if pub_conn.poll():
                        raise RuntimeError(f"publisher stopped: {pub_conn.recv()}")
                    await asyncio.sleep(1)
                pub_conn.send("stop")
                with contextlib.suppress(TimeoutError):
                    await _recv(pub_conn, 10, "the publisher")
            finally:
                with contextlib.suppress(Exception):
                    await index.stop()
                capture.close()
                await children.stop()
    info["runs"] = results
    info["settings"] = {
        "seconds": args.seconds,
        "warmup": args.warmup,
        "join_rate": args.join_rate,
        "bitrate_kbps": args.bitrate,
        "server_cpus": sorted(args.server_cpus) if args.server_cpus else None,
        "load_cpus": sorted(args.load_cpus) if args.load_cpus else None,
    }
    if len(results) >= 2:
        xs = [r["viewers_receiving"] for r in results]
        ys = [r["cpu"].get("egress", 0) for r in results]
        slope = statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else None
        info["egress_marginal_cpu_per_viewer"] = slope
        info["viewers_per_core_marginal"] = 100 / slope if slope and slope > 0 else None
    return info


def _cpus(text: str) -> frozenset[int]:
    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--viewers", type=int, nargs="+", default=[1, 10, 25, 50],
                        help="viewer counts to measure, one after the other")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=20, help="measured window per count")
    parser.add_argument("--warmup", type=float, default=5, help="seconds before each window")
    parser.add_argument("--workers", type=int, default=0,
                        help="viewer processes (default: 1 up to 10 viewers, else 2)")  # fmt: skip
    parser.add_argument("--server-cpus", metavar="LIST", type=_cpus,
                        help="pin broker, ingest and egress to these CPUs (0-3,8)")  # fmt: skip
    parser.add_argument("--load-cpus", metavar="LIST", type=_cpus,
                        help="pin the publisher and viewer workers to these CPUs")  # fmt: skip
    parser.add_argument("--join-rate", type=float, default=10, help="viewers joining per second")
    parser.add_argument("--bitrate", type=int, default=1500, help="video kbps")
    parser.add_argument(
        "--publisher",
        choices=["aiortc", "ffmpeg"],
        default="aiortc",
        help="WHIP client of the pre-encoded loop: an aiortc peer (NACK, RTCP, consent like "
        "a browser) or FFmpeg's WHIP muxer (cheaper)",
    )
    parser.add_argument("--source-seconds", type=float, default=10,
                        help="length of the pre-encoded loop")  # fmt: skip
    parser.add_argument("--profile-egress", metavar="DIR",
                        help="py-spy the egress in each window; raw stacks to DIR")  # fmt: skip
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile-egress: include native (C) frames")  # fmt: skip
    parser.add_argument("--log-level", default="WARNING", help="of the ingest/egress nodes")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for flag, cpus in (("--server-cpus", args.server_cpus), ("--load-cpus", args.load_cpus)):
        if (why := unavailable_cpus(cpus)) is not None:
            sys.exit(f"{flag}: {why}")
    try:
        info = asyncio.run(run(args))
    except KeyboardInterrupt:
        sys.exit("interrupted; every process this run started has been stopped")
    m = info["machine"]
    print(f"\nmachine: {m['nproc']} x {m['cpu_model']}, {m['memory_gib']} GiB, "
          f"Linux {m['kernel']}, Python {m['python']}")  # fmt: skip
    print(f"source: {info['source']['video']}, {info['source']['video_kbps']} kbps; "
          f"{info['source']['audio']}")  # fmt: skip
    print_table(info["runs"])
    if info.get("egress_marginal_cpu_per_viewer") is not None:
        print(
            f"\negress marginal CPU per viewer (slope over runs): "
            f"{info['egress_marginal_cpu_per_viewer']:.2f} % -> "
            f"{_fmt(info['viewers_per_core_marginal'], 0)} viewers per core"
        )
    for r in info["runs"]:
        others = ", ".join(
            f"{k} {v:.1f} %" for k, v in r["cpu"].items() if k not in ("ingest", "egress")
        )
        kernel = ", ".join(f"{k} {v:.1f} %" for k, v in r["cpu_in_kernel"].items())
        print(f"  {r['viewers']} viewers: in kernel: {kernel}; not gateway: {others}; "
              f"capture drops {r['capture_drops']}; RTX {r['rtx_packets']}")  # fmt: skip
        for row in r["egress_profile_top"][:12]:
            print(f"      {row['self_pct']:5.1f} %  {row['function']}")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
