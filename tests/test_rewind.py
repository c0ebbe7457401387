"""Rewind and replay over WHEP, with a real broker and real aiortc peers.

One publisher (frames carry a counter; ``counter / FPS`` seconds after its first frame)
runs for the whole module; after ``WARMUP_S`` viewers start in its past, seek, pause and
go live. Meanwhile (first) a second stream is published, ended, replayed and
re-published.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from .peers import Publisher, Viewer, play, publish

FPS = 20
WARMUP_S = 20.0
BACK_S = 12.0
GOP_S = 3.0  # the ingest asks for a keyframe every 2 s; the publisher answers late
SWITCH_S = 2.0  # a switch must show within 500 ms; bounded generously on a busy machine


@pytest.fixture(scope="module")
async def warming(server):
    """The module's publisher, from the first test on (which needs no past of it, so the
    warm-up runs during that test), and when it went live."""
    publisher = await publish(server.url, "rewind-source", fps=FPS)
    await server.node.view.wait_for(lambda: server.node.view.get("rewind-source"), 10)
    yield publisher, time.monotonic()
    await publisher.close()


@pytest.fixture(scope="module")
async def source(warming):
    """A publisher that has been live for ``WARMUP_S``."""
    publisher, live_at = warming
    await asyncio.sleep(max(0.0, live_at + WARMUP_S - time.monotonic()))
    return publisher


def counter_at(publisher: Publisher, moment: float) -> float:
    """The counter the publisher drew at monotonic time ``moment``."""
    assert publisher.track._start is not None
    return (moment - publisher.track._start) * FPS


def capture_time(publisher: Publisher, counter: int) -> float:
    assert publisher.track._start is not None
    return publisher.track._start + counter / FPS


def record_rtp(viewer: Viewer) -> dict[str, list[tuple[float, int, int]]]:
    """(arrival, sequence number, timestamp) of every RTP packet, per kind."""
    packets: dict[str, list[tuple[float, int, int]]] = {"video": [], "audio": []}
    for transceiver in viewer.pc.getTransceivers():
        receiver, kind = transceiver.receiver, transceiver.kind
        handle = receiver._handle_rtp_packet

        async def recording(packet, arrival_time_ms, handle=handle, kind=kind):
            packets[kind].append((time.monotonic(), packet.sequence_number, packet.timestamp))
            await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = recording
    return packets


async def position(viewer: Viewer, move: dict | None = None) -> tuple[int, dict]:
    url = viewer.location + "/position"
    request = viewer.session.get(url) if move is None else viewer.session.post(url, json=move)
    async with request as response:
        return response.status, await response.json()


async def stream_stats(url: str, stream: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/stats") as response:
        return (await response.json())["streams"][stream]["egress"]


async def frames_after(viewer: Viewer, moment: float, count: int, timeout: float = 10.0):
    """The first ``count`` frames decoded after ``moment``."""
    deadline = time.monotonic() + timeout
    while True:
        after = [f for f in viewer.frames if f[0] > moment]
        if len(after) >= count:
            return after[:count]
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(after)} of {count} frames after the request")
        await asyncio.sleep(0.02)


async def landing(viewer: Viewer, asked: float, low: float, high: float) -> tuple[float, int]:
    """The first frame decoded after ``asked`` whose counter is in [low, high], and how
    long after the request it came (frames of the old source may come first)."""
    deadline = asked + 10
    while time.monotonic() < deadline:
        for arrival, counter, _ in viewer.frames:
            if arrival > asked and low <= counter <= high:
                return arrival - asked, counter
        await asyncio.sleep(0.02)
    after = [c for a, c, _ in viewer.frames if a > asked]
    raise AssertionError(f"no frame in [{low}, {high}] after the request: {after[:40]}")


def assert_continuous(packets: dict[str, list[tuple[float, int, int]]]) -> None:
    """What the player sees never jumps: sequence numbers step by one, timestamps never
    go back, across every switch."""
    for kind, seen in packets.items():
        assert len(seen) > 10, kind
        for (_, seq0, ts0), (_, seq1, ts1) in zip(seen, seen[1:], strict=False):
            assert (seq1 - seq0) & 0xFFFF == 1, (kind, seq0, seq1)
            step = ((ts1 - ts0 + 0x80000000) & 0xFFFFFFFF) - 0x80000000
            assert step >= 0, (kind, ts0, ts1)


def media_clock(seen: list[tuple[float, int, int]], rate: int, start: float, end: float) -> float:
    """Least (arrival - media time) over a span: where the track's timeline sits on the
    wall clock (the least-delayed packet is the least jittered)."""
    offsets, unwrapped, previous = [], 0, None
    for arrival, _, ts in seen:
        if previous is not None:
            unwrapped += ((ts - previous + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        previous = ts
        if start <= arrival <= end:
            offsets.append(arrival - unwrapped / rate)
    assert offsets, "no packets in the span"
    return min(offsets)


async def test_replay_of_an_ended_stream(server, stream_name, warming):
    """(First: the module's publisher warms up meanwhile.)"""
    http = aiohttp.ClientSession(base_url=server.url)
    view = server.node.view
    publisher = await publish(server.url, stream_name, fps=FPS)
    await view.wait_for(lambda: view.get(stream_name), 10)
    session = view.get(stream_name).session
    await asyncio.sleep(5)
    await publisher.close()
    last = publisher.track.counter - 1
    await view.wait_for(lambda: view.get(stream_name) is None, 5)
    # The session history is its own compacted view: until it has read the "ended"
    # record, the replay ends at the last heartbeat (up to 2 s short). Bounded wait.
    for _ in range(50):
        async with http.get("/api/streams?state=ended") as response:
            assert response.status == 200
            body = await response.json()
            replays = [r for r in body["streams"] if r["stream"] == stream_name]
        if replays and replays[0]["duration"] > 4:
            break
        await asyncio.sleep(0.1)
    assert len(replays) == 1
    replay = replays[0]
    assert replay["session"] == f"{session:08x}"
    assert replay["thumbnail"] == f"/api/streams/{stream_name}/thumbnail"
    assert 4 < replay["duration"] < 10 and replay["ended"] > replay["started"]
    assert {"title", "started", "ended"} <= set(replay)
    # A new publish of the same name: the replay must not show its frames.
    again = await publish(server.url, stream_name, fps=FPS)
    try:
        query = f"session={replay['session']}&start={int(replay['started'] * 1000)}"
        viewer = await play(server.url, stream_name, query)
        await viewer.wait_frames(2 * FPS)
        counters = [c for _, c, _ in viewer.frames]
        assert counters[0] < GOP_S * FPS
        ended = None
        for _ in range(150):
            status, now = await position(viewer)
            if status == 200 and now["ended"]:
                ended = now
                break
            await asyncio.sleep(0.1)
        assert ended is not None, "the replay reports its end"
        assert not ended["live"]
        counters = [c for _, c, _ in viewer.frames]
        assert counters == sorted(set(counters)), "in order, and no frame of the new publish"
        assert counters[-1] >= last - FPS, (counters[-1], last)
        # Then the server closes the session.
        for _ in range(100):
            async with http.get(viewer.location + "/position") as response:
                if response.status == 404:
                    break
            await asyncio.sleep(0.1)
        assert response.status == 404
        await viewer.close(delete=False)
    finally:
        await again.close()
        await http.close()


async def test_start_in_the_past_plays_from_there_in_real_time(server, source):
    rewinder = server.node.rewinder
    cursors_before = rewinder.cursors_started
    posted = time.monotonic()
    viewer, crowd = await asyncio.gather(
        play(server.url, "rewind-source", f"start=-{BACK_S:g}"),
        play(server.url, "rewind-source", f"start=-{BACK_S:g}"),
    )
    try:
        await viewer.wait_frames(3 * FPS, timeout=15)
        target = counter_at(source, posted - BACK_S)
        first = viewer.frames[0][1]
        assert target - GOP_S * FPS <= first <= target + FPS, (first, target)
        counters = [c for _, c, _ in viewer.frames]
        assert counters == sorted(set(counters)), "frames arrive in order, none twice"
        # Real time: the picture stays BACK_S behind the publisher, give or take a GOP.
        await asyncio.sleep(2)
        arrival, counter, _ = viewer.frames[-1]
        delay = arrival - capture_time(source, counter)
        assert BACK_S - 1 <= delay <= BACK_S + GOP_S, delay
        status, now = await position(viewer)
        assert status == 200 and not now["live"] and not now["paused"] and not now["ended"]
        assert now["window_start"] < now["position"] < now["live_edge"]
        assert abs((now["live_edge"] - now["position"]) / 1000 - BACK_S) < GOP_S
        # The second viewer, wanting the same moment, shares the first one's Kafka read.
        await crowd.wait_frames(FPS)
        assert rewinder.cursors_started - cursors_before == 1
        fanout = server.node.egress.fanouts.get("rewind-source")
        session = server.node.egress.viewers[viewer.location.rsplit("/", 1)[1]]
        assert fanout is None or session not in fanout.viewers, "not on the live fan-out"
    finally:
        await viewer.close()
        await crowd.close()
    await asyncio.sleep(0.5)
    live = server.node.view.get("rewind-source")
    assert not rewinder.cursors.get(("rewind-source", live.session)), "cursor stopped"


async def test_seek_pause_and_live_without_renegotiation(server, source):
    viewer = await play(server.url, "rewind-source")
    packets = record_rtp(viewer)
    try:
        await viewer.wait_frames(FPS)
        await asyncio.sleep(1.5)
        live_start = time.monotonic()
        await asyncio.sleep(1.5)
        status, now = await position(viewer)
        assert status == 200 and now["live"] and not now["paused"]

        # Back 8 s: the picture jumps there within the bound, on a keyframe.
        asked = time.monotonic()
        status, moved = await position(viewer, {"seek": -8})
        assert status == 200 and not moved["live"], moved
        assert abs((moved["live_edge"] - moved["position"]) / 1000 - 8) < GOP_S
        target = counter_at(source, asked - 8)
        took, _ = await landing(viewer, asked, target - GOP_S * FPS, target + FPS)
        assert took < SWITCH_S
        # A rewound viewer still counts as a viewer of the stream.
        egress = await stream_stats(server.url, "rewind-source")
        assert egress["viewers"] == 1 and egress["viewers_rewound"] == 1, egress
        await asyncio.sleep(2.5)
        # ... for longer than the fan-out lingers without viewers (1 s here).
        egress = await stream_stats(server.url, "rewind-source")
        assert egress["viewers"] == 1 and egress["viewers_rewound"] == 1, egress
        # Audio keeps its place next to video: each track's timeline sits on the wall
        # clock where it sat while live (within 80 ms).
        end = time.monotonic()
        for kind, kind_seen in packets.items():
            assert kind_seen[-1][0] > end - 0.5, (
                f"{kind} stopped {end - kind_seen[-1][0]:.2f} s ago"
            )
        live_gap = media_clock(packets["video"], 90000, live_start, asked) - media_clock(
            packets["audio"], 48000, live_start, asked
        )
        seek_gap = media_clock(packets["video"], 90000, asked + 1, end) - media_clock(
            packets["audio"], 48000, asked + 1, end
        )
        assert abs(seek_gap - live_gap) < 0.08, (live_gap, seek_gap)

        # Forward 4 s.
        asked = time.monotonic()
        status, moved = await position(viewer, {"seek": 4})
        assert status == 200
        target = counter_at(source, asked - 8 + 4)
        took, _ = await landing(viewer, asked, target - GOP_S * FPS, target + FPS)
        assert took < SWITCH_S

        # Pause: the picture holds, the connection stays; resume where it was.
        status, paused = await position(viewer, {"paused": True})
        assert status == 200 and paused["paused"]
        pause_answered = time.monotonic()
        await asyncio.sleep(1.5)
        sent = [p for p in packets["video"] if p[0] > pause_answered + 0.1]
        assert not sent, "no video is sent while paused"
        last_counter = viewer.frames[-1][1]
        assert viewer.pc.connectionState == "connected"
        status, still = await position(viewer)
        assert still["paused"] and still["position"] == paused["position"]
        asked = time.monotonic()
        status, resumed = await position(viewer, {"paused": False})
        assert status == 200 and not resumed["paused"]
        landed = await frames_after(viewer, asked, FPS)
        first_packet = next(p[0] for p in packets["video"] if p[0] > asked)
        assert first_packet - asked < SWITCH_S
        # (aiortc releases the last frame before the pause only now: skip it)
        assert all(last_counter - GOP_S * FPS <= c <= last_counter + 2 * FPS
                   for _, c, _ in landed[1:]), (last_counter, landed)  # fmt: skip
        await asyncio.sleep(1)
        assert viewer.frames[-1][1] > last_counter, "playing on after the pause"

        # Back to live: the publisher's newest frames.
        asked = time.monotonic()
        status, moved = await position(viewer, {"live": True})
        assert status == 200 and moved["live"]
        newest = counter_at(source, asked)
        took, _ = await landing(viewer, asked, newest - GOP_S * FPS, newest + 2 * FPS)
        assert took < SWITCH_S
        await frames_after(viewer, asked + took, FPS)
        delay = viewer.frames[-1][0] - capture_time(source, viewer.frames[-1][1])
        assert delay < 1.0, delay
        assert_continuous(packets)
    finally:
        await viewer.close()


async def _offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_bad_rewind_requests_get_a_reason(server, source):
    http = aiohttp.ClientSession(base_url=server.url)
    pc, sdp = await _offer()
    sdp_type = {"Content-Type": "application/sdp"}
    try:
        for query, status in [
            ("start=abc", 400),
            ("start=5", 400),
            ("start=nan", 400),
            ("start=2024-01-01T00:00:00", 400),  # no time zone
            ("start=-100000", 422),
            ("start=2001-01-01T00:00:00Z", 422),
            ("start=-5&session=zz", 400),
            ("start=-5&session=0badcafe", 404),
        ]:
            async with http.post(f"/whep/rewind-source?{query}", data=sdp, headers=sdp_type) as r:
                assert r.status == status, (query, r.status, await r.text())
                body = await r.json()
                assert body["detail"], query
                if status == 422:
                    assert body["window_start"] < body["live_edge"]
        async with http.post("/whep/never-published?start=-5", data=sdp, headers=sdp_type) as r:
            assert r.status == 404
        async with http.get("/api/streams?state=bogus") as r:
            assert r.status == 400
        async with http.get("/whep/rewind-source/nosuchsession/position") as r:
            assert r.status == 404
        async with http.post("/whep/rewind-source/nosuchsession/position", json={"seek": -1}) as r:
            assert r.status == 404
        # A real session: Link announces the position API; bad moves get 4xx.
        async with http.post("/whep/rewind-source", data=sdp, headers=sdp_type) as r:
            assert r.status == 201
            location = r.headers["Location"]
            assert f'<{location}/position>; rel="urn:whipcast:position"' in r.headers.getall("Link")
        url = location + "/position"
        for move, status in [
            ({"seek": "x"}, 400),
            ({"seek": True}, 400),
            ({}, 400),
            ({"seek": -1, "live": True}, 400),
            ({"live": False}, 400),
            ({"paused": "yes"}, 400),
            ({"rewind": 1}, 400),
            ({"at": 1}, 422),
            ({"seek": -100000}, 422),
            ({"seek": 60}, 422),
        ]:
            async with http.post(url, json=move) as r:
                assert r.status == status, (move, r.status, await r.text())
                body = await r.json()
                assert body["detail"]
                if status == 422:
                    assert body["window_start"] < body["live_edge"]
        async with http.post(url, data="{", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
        async with http.delete(location) as r:
            assert r.status == 200
    finally:
        await pc.close()
        await http.close()
