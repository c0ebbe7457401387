"""``whipcast tap``: the real CLI reads a live aiortc publisher's stream from a real
broker and writes a container that FFmpeg (PyAV) decodes, counters in order."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import signal
import sys

import av
from whipcast.gateway import mux
from whipcast.gateway.bus import FrameReader
from whipcast.gateway.frames import Track
from whipcast.gateway.tap import Tap

from .peers import publish, read_counter

READ_S = 4.0


async def start_tap(server, stream: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "whipcast.signaling.cli", "tap", stream,
        "--kafka-bootstrap", server.settings.kafka_bootstrap, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


async def read_for(process: asyncio.subprocess.Process, seconds: float) -> bytes:
    """What the tap wrote within ``seconds`` of its first output (a new Python process
    takes seconds to import and connect, more on a busy machine: up to 60 s)."""
    first = await asyncio.wait_for(process.stdout.read(65536), 60)
    chunks: list[bytes] = [first]

    async def pump() -> None:
        while chunk := await process.stdout.read(65536):
            chunks.append(chunk)

    if first:
        try:
            await asyncio.wait_for(pump(), seconds)
        except TimeoutError:
            pass
    return b"".join(chunks)


def counters(data: bytes) -> tuple[str, list[int], int]:
    """Container format, decoded video counters, audio packets."""
    with av.open(io.BytesIO(data)) as container:
        name = container.format.name
        audio = sum(1 for p in container.demux(audio=0) if p.size)
    with av.open(io.BytesIO(data)) as container:
        return name, [read_counter(f) for f in container.decode(video=0)], audio


def assert_in_order(values: list[int], at_least: int) -> None:
    assert len(values) >= at_least, f"only {len(values)} frames decoded"
    assert values == sorted(values), "counters out of order"
    gaps = sum(1 for a, b in zip(values, values[1:], strict=False) if b != a + 1)
    assert gaps <= 2, f"{gaps} gaps in {values}"


async def test_tap_h264_mpegts_until_the_stream_ends(server, stream_name):
    publisher = await publish(server.url, stream_name, codec="video/H264")
    try:
        await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 10)
        await asyncio.sleep(1.0)
        process = await start_tap(server, stream_name)
        data = await read_for(process, READ_S)
    finally:
        await publisher.close()
    # The publisher left: the tap finishes by itself, with what was left to read.
    data += await asyncio.wait_for(process.stdout.read(), 30)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr.decode()
    assert "the stream ended" in stderr.decode()
    fmt, values, audio = counters(data)
    assert fmt == "mpegts"
    assert_in_order(values, 60)
    assert audio > 50


async def test_tap_vp8_webm_from_the_past_until_ctrl_c(server, stream_name):
    publisher = await publish(server.url, stream_name, codec="video/VP8")
    try:
        await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 10)
        await asyncio.sleep(4.0)
        refused = await start_tap(server, stream_name, "--format", "mpegts")
        _, stderr = await asyncio.wait_for(refused.communicate(), 30)
        assert refused.returncode != 0 and "use webm" in stderr.decode()
        process = await start_tap(server, stream_name, "--start=-3")
        data = await read_for(process, READ_S)
        process.send_signal(signal.SIGINT)
        data += await asyncio.wait_for(process.stdout.read(), 20)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
    finally:
        await publisher.close()
    assert process.returncode == 0, stderr.decode()
    fmt, values, _ = counters(data)
    assert "webm" in fmt or "matroska" in fmt
    assert_in_order(values, 60)
    # Started about 3 s back, on the keyframe at or before that (GOPs are <= ~3 s).
    assert publisher.track.counter - values[0] > 3 * 30 * 0.8


async def test_tap_keeps_frames_that_arrive_after_the_end_is_announced(
    server, stream_name, tmp_path, monkeypatch
):
    """Ingest marks a session ended while its receivers still hand over frames: frames
    that reach Kafka just after the tap first finds the session ended and everything
    read still get written. (Here the first such check itself sends them, and returns
    before they land, so a tap that stopped at once would miss every one.)"""
    late = 5
    written: list = []
    real_write, real_reader = mux.write_in_thread, Tap._reader
    sent: list[asyncio.Task] = []
    expected: list[int] = []  # sequence numbers of the late frames

    async def write_spy(muxer, frames):
        written.extend(frames)
        await real_write(muxer, frames)

    async def send_late(last) -> None:
        bus = server.node.bus
        expected.extend(last.sequence + k for k in range(1, late + 1))
        for k in range(1, late + 1):
            frame = dataclasses.replace(
                last, sequence=last.sequence + k, rtp_timestamp=last.rtp_timestamp + 960 * k,
                arrival_us=last.arrival_us + 20_000 * k,
            )  # fmt: skip
            await bus.send_frame(bus.stream_topic(stream_name), frame)
        await bus.producer.flush()

    async def reader_spy(tap, info) -> FrameReader:
        """The tap's reader, its at_end() watched (other readers in the node call it too)."""
        reader = await real_reader(tap, info)
        real_at_end = reader.at_end

        async def at_end_spy() -> bool:
            done = await real_at_end()
            if done and not sent and not server.node.view.get(stream_name):
                last = next(f for f in reversed(written) if f.track is Track.AUDIO)
                sent.append(asyncio.create_task(send_late(last)))
            return done

        reader.at_end = at_end_spy
        return reader

    monkeypatch.setattr(mux, "write_in_thread", write_spy)
    monkeypatch.setattr(Tap, "_reader", reader_spy)
    publisher = await publish(server.url, stream_name, codec="video/H264")
    try:
        await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 10)
        tap = Tap(server.settings, stream_name, str(tmp_path / "out.ts"), fmt="mpegts")
        running = asyncio.create_task(tap.run())
        for _ in range(200):  # until the tap writes audio as it comes (its start takes ~2 s)
            if sum(f.track is Track.AUDIO for f in written) >= 50:
                break
            await asyncio.sleep(0.1)
    finally:
        await publisher.close()
    stats = await asyncio.wait_for(running, 30)
    await asyncio.gather(*sent)
    assert sent, "the tap never found the session ended and read"
    assert stats.reason == "the stream ended"
    extra = [f.sequence for f in written if f.track is Track.AUDIO][-late:]
    assert extra == expected, f"late audio frames {expected} not written; the last: {extra}"
