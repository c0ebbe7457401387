"""Clips cut from Kafka: a live aiortc publisher's counters (H.264 and VP8) come back
in the file, from the keyframe at or before ``from`` to ``to``; bad requests get 4xx."""

from __future__ import annotations

import asyncio
import io
import json
import time

import aiohttp
import av

from .peers import publish, read_counter

FPS = 30
GOP_S = 3.0  # ingest asks for a keyframe every 2 s; the publisher answers late


def decode(data: bytes) -> tuple[str, list[int], float]:
    with av.open(io.BytesIO(data)) as container:
        values = [read_counter(f) for f in container.decode(video=0)]
        return container.format.name, values, container.duration / 1e6


async def get(server, path: str) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as http, http.get(server.url + path) as response:
        return response.status, dict(response.headers), await response.read()


async def test_clip_of_a_known_range(server, stream_name):
    publisher = await publish(server.url, stream_name, codec="video/H264", fps=FPS)
    try:
        await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 10)
        await asyncio.sleep(12.0)
        now_ms, now = time.time() * 1000, time.monotonic()
        start = publisher.track._start
        expect_first, expect_last = (now - 8 - start) * FPS, (now - 3 - start) * FPS
        status, headers, body = await get(
            server,
            f"/api/streams/{stream_name}/clip?from={now_ms - 8000:.0f}&to={now_ms - 3000:.0f}",
        )
        assert status == 200, body
        assert headers["Content-Type"] == "video/mp4"
        assert f'filename="{stream_name}-' in headers["Content-Disposition"]
        fmt, values, duration = decode(body)
        assert "mp4" in fmt
        assert values == sorted(values) and len(values) > 4 * FPS
        assert expect_first - GOP_S * FPS - 3 <= values[0] <= expect_first + 3
        assert abs(values[-1] - expect_last) <= 0.5 * FPS
        assert 5.0 - 0.5 <= duration <= 5.0 + GOP_S + 0.5
        assert abs(float(headers["X-Clip-Duration"]) - duration) < 0.5
    finally:
        await publisher.close()


async def test_clip_vp8_webm_of_an_ended_stream(server, stream_name):
    publisher = await publish(server.url, stream_name, codec="video/VP8", fps=FPS)
    await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 10)
    await asyncio.sleep(6.0)
    last = publisher.track.counter
    await publisher.close()
    await server.node.view.wait_for(lambda: server.node.view.get(stream_name) is None, 10)
    status, headers, body = await get(server, f"/api/streams/{stream_name}/clip?from=-3&to=0")
    assert status == 200, body
    assert headers["Content-Type"] == "video/webm"
    fmt, values, _ = decode(body)
    assert "webm" in fmt or "matroska" in fmt
    assert values == sorted(values) and abs(values[-1] - last) <= FPS


async def test_bad_clip_requests_get_4xx(server, stream_name):
    publisher = await publish(server.url, stream_name, codec="video/H264", fps=FPS)
    try:
        await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 10)
        await asyncio.sleep(2.0)
        base = f"/api/streams/{stream_name}/clip"
        now_ms = time.time() * 1000
        cases = {
            f"{base}?from=-1&to=-2": (400, '"to" must be after "from"'),
            f"{base}?from={now_ms - 3600_000:.0f}&to={now_ms - 3590_000:.0f}": (422, "window"),
            f"/api/streams/nope-{stream_name[:40]}/clip?from=-2&to=0": (404, "not live"),
            f"{base}?from=-700&to=0": (400, "at most 600 s"),
            f"{base}?from=soon&to=0": (400, "from must be"),
            f"{base}?to=0": (400, '"from" and "to"'),
        }
        for path, (status, reason) in cases.items():
            got, headers, body = await get(server, path)
            assert (got, reason in json.loads(body)["detail"]) == (status, True), (path, body)
            assert headers["Content-Type"].startswith("application/problem+json")
        clipper = server.node.clipper
        clipper.running = server.settings.clip_max_jobs  # as if that many were being cut
        try:
            got, headers, body = await get(server, f"{base}?from=-1&to=0")
        finally:
            clipper.running = 0
        assert got == 429 and "Retry-After" in headers and "clips" in body.decode()
    finally:
        await publisher.close()
