"""``whipcast tap``: the real CLI reads a live aiortc publisher's stream from a real
broker and writes a container that FFmpeg (PyAV) decodes, counters in order."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys

import av

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
    """What the tap wrote within ``seconds``."""
    chunks: list[bytes] = []

    async def pump() -> None:
        while chunk := await process.stdout.read(65536):
            chunks.append(chunk)

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
        data = await read_for(process, READ_S + 3)  # the process starts in ~2 s
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
        data = await read_for(process, READ_S + 2)
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
