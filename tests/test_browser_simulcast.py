"""Simulcast ingest with a real browser: Chromium's studio page sends three encodings over
WHIP to a real node; each lands on its own partition of the stream topic, the registry
lists the layers, a keyframe request naming a layer reaches that layer's encoder only,
and a viewer of the existing egress still plays the top layer.

Drives ``tests/browser/simulcast.mjs`` step by step over its stdin/stdout.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid

import pytest
from aiokafka.structs import TopicPartition
from whipcast.gateway.control import KeyframeRequester
from whipcast.gateway.frames import Codec, Frame, Track, video_partition
from whipcast.gateway.videosize import video_size

from .browser_harness import ARTIFACTS, BROWSER_DIR, NEEDS_CHROMIUM
from .conftest import start_server

pytestmark = NEEDS_CHROMIUM

STEP_TIMEOUT_S = 100  # one step of the script (browser start and the climb to 3 layers:
# the publisher's bandwidth estimate climbs ~8 %/s on REMB, the top layer comes at ~1 Mbit/s)
SAMPLE_FRAMES = 20  # frames read back from each layer's partition


class Script:
    """``simulcast.mjs`` as a child process: one command in, one JSON line out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str) -> Script:
        node = shutil.which("node")
        assert node, "node is not on PATH (needed for the browser test)"
        proc = await asyncio.create_subprocess_exec(
            node,
            str(BROWSER_DIR / "simulcast.mjs"),
            *args,
            cwd=BROWSER_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def read(self) -> dict:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), STEP_TIMEOUT_S)
        if not line:
            await self.proc.wait()
            err = await self.proc.stderr.read() if self.proc.stderr else b""
            pytest.fail(f"simulcast.mjs ended early:\n{err.decode(errors='replace')}")
        result = json.loads(line)
        assert "phase" in result, result  # the final line: a failed check
        return result

    async def ask(self, command: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        await self.proc.stdin.drain()
        return await self.read()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.stdin.write(b"stop\n")
                await asyncio.wait_for(self.proc.wait(), 30)
            except (TimeoutError, ConnectionError):
                self.proc.kill()
                await self.proc.wait()


async def read_layers(bus, stream: str, session: int, start: bool = True) -> dict[int, list[Frame]]:
    """The first frames (``start``) or the next ones of each video layer's partition
    written by ``session``, by layer."""
    topic = bus.stream_topic(stream)
    partitions = {video_partition(layer): layer for layer in range(3)}
    consumer = bus.consumer()
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        if start:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        found: dict[int, list[Frame]] = {layer: [] for layer in range(3)}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and min(map(len, found.values())) < SAMPLE_FRAMES:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    frame = Frame.decode(record.value)
                    if frame.session == session:
                        found[partitions[tp.partition]].append(frame)
        return found
    finally:
        await consumer.stop()


@pytest.fixture
async def server(kafka):
    """A node that forces no keyframes of its own (``max_keyframe_interval`` 0), so that
    the PLIs a layer's encoder counts are the ones the test asks for."""
    node = await start_server(kafka, max_keyframe_interval=0.0)
    yield node
    await node.runner.cleanup()


@pytest.mark.timeout(6 * STEP_TIMEOUT_S)
@pytest.mark.parametrize("codec", ["h264", "vp8"])
async def test_chromium_simulcast_layers_partitions_and_keyframe_requests(
    server, codec: str
) -> None:
    stream = f"simulcast-{codec}-{uuid.uuid4().hex[:8]}"
    shots = ARTIFACTS / f"browser-simulcast-{codec}"
    shutil.rmtree(shots, ignore_errors=True)
    args = [server.url, stream, str(shots), "--codec", codec]
    args += ["--timeout", str(STEP_TIMEOUT_S - 10)]
    if server.settings.publish_token:
        args += ["--token", server.settings.publish_token]
    script = await Script.start(*args)
    try:
        sending = await script.read()
        assert sending["codec"].lower() == codec, sending
        widths = [e["frameWidth"] for e in sending["encodings"]]
        assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1], sending

        node = server.node
        session = node.ingest.sessions[stream]
        assert session.layers == 3

        # Each partition starts with a keyframe and counts its frames from 0.
        layers = await read_layers(node.bus, stream, session.session_id)
        for layer, frames in layers.items():
            assert len(frames) >= SAMPLE_FRAMES, {k: len(v) for k, v in layers.items()}
            assert frames[0].keyframe, f"layer {layer} does not start with a keyframe"
            assert all(f.track is Track.VIDEO for f in frames)
            assert [f.sequence for f in frames] == list(range(len(frames))), layer

        # Browsers pause layers their bandwidth estimate cannot carry (this loaded machine
        # makes it move), and ingest then moves them behind the others; the checks below
        # run while all three send, best first, and are retried when that changed meanwhile.
        def order() -> list[str]:
            return [x.rid if x.active else None for x in session.video_layers]

        async def steady() -> list[str]:
            deadline = time.monotonic() + STEP_TIMEOUT_S
            while order() != rids:
                assert time.monotonic() < deadline, order()
                await asyncio.sleep(0.2)
            return order()

        rids = [e["rid"] for e in sending["encodings"]]
        requester = KeyframeRequester(node.bus, 0.0)
        for _attempt in range(5):
            # Every layer's keyframe lands on its own partition, with its own size.
            await steady()
            moves = session.stats.layer_moves
            reading = asyncio.ensure_future(
                read_layers(node.bus, stream, session.session_id, False)
            )
            await asyncio.sleep(1.0)  # the reader is at the end of each partition
            requester.request(stream, session.session_id, "test")
            layers = await reading
            if session.stats.layer_moves == moves:
                break
        sizes = []
        for layer, frames in layers.items():
            keyframes = [f for f in frames if f.keyframe]
            assert keyframes, f"no keyframe on layer {layer} after the request"
            width = sending["encodings"][layer]["frameWidth"]
            assert {video_size(Codec(f.codec), f.payload)[0] for f in keyframes} == {width}
            sizes.append(sum(len(f.payload) for f in frames) / len(frames))
        # Frame sizes fall from the best layer to the lowest; the middle one is not
        # compared: the browser gives the top layer its share only as its bandwidth
        # estimate climbs, for half a minute on this loaded machine.
        assert sizes[0] > sizes[2] and sizes[1] > sizes[2], sizes

        # The registry lists the layers best first, with sizes and measured bitrates
        # (refreshed with each heartbeat).
        deadline = time.monotonic() + 10
        while True:
            info = node.view.get(stream)
            listed = info.layers if info is not None else None
            if listed and [x["rid"] for x in listed] == rids and all(x["bitrate"] for x in listed):
                break
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.5)
        assert [x["layer"] for x in listed] == [0, 1, 2], listed
        assert [x["width"] for x in listed] == widths, (listed, sending)

        # A keyframe request naming the lowest layer sends a PLI for its SSRC only.
        lowest = rids[-1]
        for _attempt in range(5):
            await steady()
            before = {e["rid"]: e["pliCount"] for e in (await script.ask("stats"))["encodings"]}
            plis, moves = session.stats.plis_sent, session.stats.layer_moves
            requester.request(stream, session.session_id, "test", layer=2)
            await asyncio.sleep(2.5)
            after = {e["rid"]: e["pliCount"] for e in (await script.ask("stats"))["encodings"]}
            if session.stats.plis_sent == plis + 1 and session.stats.layer_moves == moves:
                break  # no PLI of ingest's own (a lost frame, a moved layer) meanwhile
        delta = {rid: after[rid] - before[rid] for rid in after}
        assert session.stats.plis_sent == plis + 1, "ingest sent PLIs of its own throughout"
        assert delta[lowest] >= 1, delta
        assert all(v == 0 for rid, v in delta.items() if rid != lowest), delta

        # A viewer of the existing egress plays the top layer (partition 0).
        await steady()
        moves = session.stats.layer_moves
        watched = await script.ask("watch")
        if session.stats.layer_moves == moves:
            assert watched["videoWidth"] == widths[0], (watched, widths)
        else:  # the browser paused the top layer meanwhile: the next best played on
            assert watched["videoWidth"] in widths, (watched, widths)
        assert watched["codec"].lower() == codec, watched
    finally:
        await script.stop()


@pytest.mark.timeout(3 * STEP_TIMEOUT_S)
async def test_studio_without_simulcast_publishes_one_layer(server) -> None:
    """``?simulcast=0`` (the studio's checkbox off) publishes a single layer, as before."""
    stream = f"single-{uuid.uuid4().hex[:8]}"
    shots = ARTIFACTS / "browser-simulcast-off"
    shutil.rmtree(shots, ignore_errors=True)
    args = [server.url, stream, str(shots), "--single", "--timeout", str(STEP_TIMEOUT_S - 10)]
    if server.settings.publish_token:
        args += ["--token", server.settings.publish_token]
    script = await Script.start(*args)
    try:
        sending = await script.read()
        assert sending["encodings"] == [], sending  # no RIDs: one encoding
        session = server.node.ingest.sessions[stream]
        assert session.layers == 1
        deadline = time.monotonic() + 10
        while (info := server.node.view.get(stream)) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert info.layers is None
        watched = await script.ask("watch")
        assert watched["videoWidth"] > 0, watched
    finally:
        await script.stop()
