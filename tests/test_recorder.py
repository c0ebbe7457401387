"""Recording: real publishers' sessions become files a recorder group writes, that
decode with PyAV while and after they are written, survive a recorder's SIGKILL (a
second recorder continues the session) and are listed and served by signaling."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import av
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from whipcast.gateway.recorder import TopicAssignor, stream_pattern
from whipcast.gateway.recordings import FILE_NAME, part_name, recording_path

from .conftest import free_port, start_server
from .peers import publish, read_counter

WAIT_S = 40  # topic discovery, group joins and a busy machine add seconds


@pytest.fixture(scope="module")
async def recording_server(kafka, tmp_path_factory):
    root = tmp_path_factory.mktemp("recordings")
    server = await start_server(
        kafka, record_dir=root, record_streams="rec-*", record_discovery_ms=1000
    )
    yield server
    await server.runner.cleanup()


def counters(path: Path) -> list[int]:
    """The publisher's frame counters, as decoded from a recording (PyAV)."""
    with av.open(str(path)) as container:
        return [read_counter(frame) for frame in container.decode(video=0)]


async def listing(http: aiohttp.ClientSession, stream: str) -> list[dict]:
    async with http.get("/api/recordings", params={"stream": stream}) as response:
        assert response.status == 200
        return (await response.json())["recordings"]


async def wait_for(check, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.25)
    raise AssertionError(f"{what} within {timeout} s")


async def metric(http: aiohttp.ClientSession, name: str) -> float:
    async with http.get("/metrics") as response:
        text = await response.text()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} missing from /metrics"
    return values[0]


@pytest.mark.parametrize("codec", ["video/H264", "video/VP8"])
async def test_session_is_recorded_playable_while_written_and_served(recording_server, codec):
    stream = f"rec-{codec[6:].lower()}-{uuid.uuid4().hex[:6]}"
    ext = "mp4" if codec == "video/H264" else "webm"
    root = recording_server.settings.record_dir
    async with aiohttp.ClientSession(base_url=recording_server.url) as http:
        publisher = await publish(recording_server.url, stream, codec=codec)
        try:

            async def growing():
                files = await listing(http, stream)
                return files if files and files[0]["size"] > 20_000 else None

            files = await wait_for(growing, "no recording grew")
            live = files[0]
            assert live["complete"] is False and live["end"] is None
            assert live["content_type"] == f"video/{ext}"
            # Playable while it is written: what is on disk decodes now, and never
            # lags the publisher by more than 2 s (a crash loses at most that much).
            lags = []
            for _ in range(10):  # over several GOPs and fragments
                await asyncio.sleep(0.4)
                sent = publisher.track.counter
                so_far = await asyncio.to_thread(counters, root / stream / live["file"])
                lags.append((sent - so_far[-1]) / 30)
            assert len(so_far) >= 30, len(so_far)
            assert max(lags) <= 2.0, lags
            sent = publisher.track.counter
        finally:
            await publisher.close()

        async def finished():
            files = await listing(http, stream)
            return files if files and files[0]["complete"] else None

        files = await wait_for(finished, "the recording was not finished after the session")
        assert len(files) == 1, files
        recording = files[0]
        match = FILE_NAME.match(recording["file"])
        assert match and match["stream"] == stream and match["ext"] == ext
        assert match["session"] == recording["session"] and recording["part"] == 1
        assert recording["duration"] > 2 and recording["end"] > recording["start"]

        # Served with ranges, from the URL the listing gives.
        url = recording["url"]
        async with http.get(url, headers={"Range": "bytes=0-99"}) as response:
            assert response.status == 206 and len(await response.read()) == 100
        async with http.get(url) as response:
            assert response.status == 200
            assert response.content_type == f"video/{ext}"
            body = await response.read()
        assert len(body) == recording["size"]

        # Every frame from the first keyframe on, in order, audio too.
        decoded = counters(root / stream / recording["file"])
        assert decoded == list(range(decoded[0], decoded[0] + len(decoded))), "gaps or reorders"
        assert decoded[0] < 30 and decoded[-1] >= sent - 5, (decoded[0], decoded[-1], sent)
        with av.open(str(root / stream / recording["file"])) as container:
            assert container.streams.audio, "the Opus track is recorded"
            assert sum(1 for _ in container.demux(audio=0)) > 50

        assert await metric(http, "whipcast_recorder_files_total") >= 1
        assert await metric(http, "whipcast_recorder_frames_written_total") >= len(decoded)
        assert await metric(http, "whipcast_recorder_bytes_read_total") > recording["size"] / 2
        assert await metric(http, "whipcast_recorder_errors_total") == 0


async def test_bad_recording_requests(recording_server, server) -> None:
    async with aiohttp.ClientSession(base_url=recording_server.url) as http:
        for path in (
            "/api/recordings/x/..%2F..%2Fetc%2Fpasswd",
            "/api/recordings/x/x_0000000a_20260101T000000000Z_001.mp4",
            "/api/recordings/bad%20name/a.mp4",
        ):
            async with http.get(path) as response:
                assert response.status == 404, path
                assert response.content_type == "application/problem+json"
        async with http.get("/api/recordings", params={"stream": "../x"}) as response:
            assert response.status == 400
    async with (
        aiohttp.ClientSession(base_url=server.url) as http,
        http.get("/api/recordings") as response,
    ):
        assert response.status == 404, "a node without a recording directory says so"
        assert "--record-dir" in (await response.json())["detail"]


def test_names_round_trip_and_stay_inside_the_directory(tmp_path) -> None:
    name = part_name("a_b-c", 0xDEADBEEF, 1_767_225_600_123_000, 2, "mp4")
    assert name == "a_b-c_deadbeef_20260101T000000123Z_002.mp4"
    match = FILE_NAME.match(name)
    assert match and match["stream"] == "a_b-c" and match["part"] == "002"
    (tmp_path / "a_b-c").mkdir()
    (tmp_path / "a_b-c" / name).write_bytes(b"x")
    assert recording_path(tmp_path, "a_b-c", name) == tmp_path / "a_b-c" / name
    assert recording_path(tmp_path, "other", name) is None
    assert recording_path(tmp_path, "..", name) is None
    assert recording_path(tmp_path, "a_b-c", "../" + name) is None


def test_assignor_keeps_a_streams_partitions_together_and_moves_only_a_leavers() -> None:
    topics = [f"w.stream.s{i}" for i in range(40)]
    cluster = ClusterMetadata()
    cluster._partitions = {t: {0: None, 1: None} for t in topics}  # what metadata fills
    members = {m: ConsumerProtocolMemberMetadata(0, topics, b"") for m in ("a", "b", "c")}

    def owners(assignment) -> dict[str, str]:
        found = {}
        for member, value in assignment.items():
            for topic, partitions in value.assignment:
                assert sorted(partitions) == [0, 1], "video and audio together"
                assert topic not in found, "one owner per stream"
                found[topic] = member
        return found

    before = owners(TopicAssignor.assign(cluster, members))
    assert set(before) == set(topics) and set(before.values()) == {"a", "b", "c"}
    del members["b"]
    after = owners(TopicAssignor.assign(cluster, members))
    assert set(after) == set(topics)
    assert all(after[t] == before[t] for t in topics if before[t] != "b"), "only b's moved"
    pattern = stream_pattern("w", "kill-*")
    import re

    assert re.match(pattern, "w.stream.kill-1") and not re.match(pattern, "w.stream.other")
    assert not re.match(stream_pattern("w", "*"), "w.streams")


async def test_unwritable_directory_is_reported_and_does_not_stop_media(kafka, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the recording directory should be")
    server = await start_server(kafka, record_dir=blocker / "recordings", record_streams="err-*",
                                record_discovery_ms=1000)  # fmt: skip
    stream = f"err-{uuid.uuid4().hex[:6]}"
    try:
        async with aiohttp.ClientSession(base_url=server.url) as http:
            publisher = await publish(server.url, stream)
            try:
                from .peers import play

                viewer = await play(server.url, stream)
                await viewer.wait_frames(30, timeout=20)  # the media path is unaffected

                async def failing():
                    return await metric(http, "whipcast_recorder_errors_total") >= 2

                await wait_for(failing, "write errors were not counted")
                assert await metric(http, "whipcast_recorder_frames_skipped_total") > 0
                # Fixed while running: the next retry records.
                blocker.unlink()

                async def recording():
                    return await listing(http, stream)

                files = await wait_for(recording, "recording did not resume")
                assert files[0]["part"] == 1
                await viewer.close()
            finally:
                await publisher.close()
    finally:
        await server.runner.cleanup()


async def _recorder_process(kafka, root: Path, port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "whipcast.signaling.cli", "record", "--dir", str(root),
        "--streams", "kill-*", "--kafka-bootstrap", kafka.bootstrap,
        "--host", "127.0.0.1", "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


async def test_sigkilled_recorder_loses_at_most_2_s_and_another_continues(kafka, tmp_path):
    """Two ``whipcast record`` processes share the stream topics; the one recording
    the stream is SIGKILLed mid-stream. Its file decodes up to at most 2 s before the
    kill, and the other recorder continues the session in part 2 without a gap."""
    server = await start_server(kafka)  # ingest; no recorder
    stream = f"kill-{uuid.uuid4().hex[:6]}"
    ports = [free_port(), free_port()]
    recorders = [await _recorder_process(kafka, tmp_path, port) for port in ports]
    try:
        async with aiohttp.ClientSession() as http:

            async def both_ready():
                for port in ports:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                            if response.status != 200:
                                return False
                    except aiohttp.ClientConnectionError:
                        return False
                return True

            await wait_for(both_ready, "recorders did not start", timeout=90)
            # Both in the consumer group before the stream comes: a recorder joining
            # later would take the stream over (rendezvous) and finish part 1 itself.
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
            await admin.start()
            try:

                async def both_members():
                    (response,) = await admin.describe_consumer_groups(["whipcast.recorders"])
                    _, _, state, _, _, members, *_ = response.groups[0]
                    return state == "Stable" and len(members) >= 2

                await wait_for(both_members, "recorders did not both join their group")
            finally:
                await admin.close()
            publisher = await publish(server.url, stream)
            try:

                async def owner():
                    for index, port in enumerate(ports):
                        url = f"http://127.0.0.1:{port}"
                        async with http.get(f"{url}/metrics") as response:
                            text = await response.text()
                        if "whipcast_recorder_streams 1.0" in text:
                            return index + 1
                    return None

                index = await wait_for(owner, "no recorder took the stream") - 1
                await asyncio.sleep(4)  # a few fragments
                recorders[index].send_signal(signal.SIGKILL)
                killed_at = publisher.track.counter  # 30 fps
                await recorders[index].wait()

                async def second_part():
                    files = list((tmp_path / stream).glob("*_002.mp4"))
                    return files if files and files[0].stat().st_size > 20_000 else None

                await wait_for(second_part, "the other recorder did not continue", timeout=60)
                await asyncio.sleep(2)
                sent = publisher.track.counter
            finally:
                await publisher.close()
            survivor = f"http://127.0.0.1:{ports[1 - index]}"

            async def finished():
                async with http.get(f"{survivor}/api/recordings") as response:
                    files = (await response.json())["recordings"]
                mine = [f for f in files if f["stream"] == stream]
                return mine if any(f["part"] == 2 and f["complete"] for f in mine) else None

            files = await wait_for(finished, "the continued part was not finished")
    finally:
        for process in recorders:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.wait(), 30)
        await server.runner.cleanup()

    parts = {f["part"]: f for f in files}
    assert set(parts) == {1, 2}, files
    assert parts[1]["complete"] is False, "the killed recorder could not finish its part"
    first = counters(tmp_path / stream / parts[1]["file"])
    second = counters(tmp_path / stream / parts[2]["file"])
    assert first == list(range(first[0], first[-1] + 1)), "part 1 plays without gaps"
    assert first[-1] >= killed_at - 2 * 30, f"lost more than 2 s: {first[-1]} vs {killed_at}"
    assert second[0] <= first[-1] + 1, f"gap between parts: {first[-1]} -> {second[0]}"
    assert second == list(range(second[0], second[-1] + 1)), "part 2 plays without gaps"
    assert second[-1] >= sent - 10
