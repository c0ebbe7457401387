"""Thumbnails: a real publisher's keyframes become JPEG pictures served by signaling,
through the compacted Kafka topic, and stay after the stream ends."""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import aiohttp
import av
import pytest
from whipcast.gateway.frames import Codec, Frame, Track
from whipcast.gateway.thumbnails import Thumbnail, picture

from .conftest import start_server
from .peers import HEIGHT, WIDTH, draw_counter, publish, read_counter

THUMBNAIL_WIDTH = 160
OTHER_WIDTH = 96
WAIT_S = 30  # the role pictures every 0.5 s here; Kafka and a busy machine add seconds


@pytest.fixture(scope="module")
async def thumbnail_server(kafka):
    # Its own topics: the session's shared node would otherwise own some streams.
    server = await start_server(
        kafka,
        thumbnail_interval=0.5,
        thumbnail_width=THUMBNAIL_WIDTH,
        topic_prefix=f"thumbs{uuid.uuid4().hex[:6]}",
    )
    yield server
    await server.runner.cleanup()


async def wait_for_picture(http: aiohttp.ClientSession, path: str, newer_than: str = "") -> tuple:
    """Poll until the thumbnail answers 200 (with another ETag than ``newer_than``)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        async with http.get(path) as response:
            if response.status == 200 and response.headers["ETag"] != newer_than:
                return response.headers.copy(), await response.read()
            assert response.status in (200, 404), response.status
        await asyncio.sleep(0.25)
    raise AssertionError(f"no thumbnail at {path} within {WAIT_S} s")


def decode_jpeg(data: bytes) -> av.VideoFrame:
    with av.open(io.BytesIO(data), format="image2pipe") as container:
        return next(container.decode(video=0))


def looks_like_a_frame_of_the_stream(image: av.VideoFrame) -> bool:
    """The publisher's frame with the counter the picture shows, scaled alike, matches it."""
    expected = draw_counter(read_counter(image)).reformat(width=image.width, height=image.height)
    gray = image.to_ndarray(format="gray").astype(int)
    difference = abs(gray - expected.to_ndarray(format="gray").astype(int)).mean()
    return difference < 16


@pytest.mark.parametrize("codec", ["video/H264", "video/VP8"])
async def test_live_stream_gets_a_thumbnail_that_outlives_it(thumbnail_server, codec) -> None:
    stream = f"thumb-{codec[6:].lower()}-{uuid.uuid4().hex[:6]}"
    path = f"/api/streams/{stream}/thumbnail"
    async with aiohttp.ClientSession(base_url=thumbnail_server.url) as http:
        async with http.get(path) as response:
            assert response.status == 404
            assert response.content_type == "application/problem+json"
            assert "no picture" in (await response.json())["detail"]

        publisher = await publish(thumbnail_server.url, stream, codec=codec)
        try:
            headers, data = await wait_for_picture(http, path)
            assert headers["Content-Type"] == "image/jpeg"
            assert "max-age" in headers["Cache-Control"]
            image = decode_jpeg(data)
            assert image.width == THUMBNAIL_WIDTH
            assert image.height == THUMBNAIL_WIDTH * HEIGHT // WIDTH, "aspect ratio kept"
            assert looks_like_a_frame_of_the_stream(image)

            async with http.get(path, headers={"If-None-Match": headers["ETag"]}) as response:
                assert response.status in (200, 304)  # 200 only if a newer picture came
                if response.status == 304:
                    assert not await response.read()
            # Keyframes come every 2 s (ingest asks for them), so the picture moves on.
            newer, _ = await wait_for_picture(http, path, newer_than=headers["ETag"])
            assert newer["ETag"] != headers["ETag"]
        finally:
            await publisher.close()

        # The stream ended; its last picture stays for the replay list.
        await asyncio.sleep(1.0)
        async with http.get(path) as response:
            assert response.status == 200 and response.content_type == "image/jpeg"

        async with http.get("/metrics") as response:
            metrics = await response.text()
        written = [
            line for line in metrics.splitlines() if line.startswith("whipcast_thumbnails_written")
        ]
        assert written and float(written[0].split()[-1]) >= 2, written


async def test_nodes_share_the_streams_and_take_over(kafka, thumbnail_server) -> None:
    """Each stream is pictured by one node of the role; when it stops, another takes over."""
    maker = thumbnail_server.node.thumbnail_maker
    other = await start_server(
        kafka,
        thumbnail_interval=0.5,
        thumbnail_width=OTHER_WIDTH,
        topic_prefix=thumbnail_server.settings.topic_prefix,
    )
    other_maker = other.node.thumbnail_maker
    try:
        deadline = time.monotonic() + WAIT_S
        while len({n.node for n in thumbnail_server.node.nodes.alive("thumbnails")}) < 2:
            assert time.monotonic() < deadline, "the nodes never saw each other"
            await asyncio.sleep(0.1)
        names = [f"share-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
        owned = [name for name in names if other_maker.owns(name)]
        assert all(maker.owns(name) != other_maker.owns(name) for name in names)
        assert 5 < len(owned) < 35, "streams are spread over the nodes"

        pictures_before = maker.pictures
        path = f"/api/streams/{owned[0]}/thumbnail"
        publisher = await publish(thumbnail_server.url, owned[0])
        try:
            async with aiohttp.ClientSession(base_url=thumbnail_server.url) as http:
                _, data = await wait_for_picture(http, path)
                assert decode_jpeg(data).width == OTHER_WIDTH, "pictured by its owner"
                assert maker.pictures == pictures_before, "and by no other node"
                await other.runner.cleanup()  # the owner leaves (its tombstone says so)
                deadline = time.monotonic() + WAIT_S
                while True:
                    _, data = await wait_for_picture(http, path)
                    if decode_jpeg(data).width == THUMBNAIL_WIDTH:
                        break
                    assert time.monotonic() < deadline, "no other node took the stream over"
                    await asyncio.sleep(0.5)
        finally:
            await publisher.close()
    finally:
        await other.runner.cleanup()


async def test_bad_names_and_broken_keyframes(thumbnail_server) -> None:
    async with (
        aiohttp.ClientSession(base_url=thumbnail_server.url) as http,
        http.get("/api/streams/bad%20name/thumbnail") as response,
    ):
        assert response.status == 400
        assert response.content_type == "application/problem+json"
    broken = Frame(Track.VIDEO, Codec.H264, True, 0, 1, 1, 0, b"\x00\x00\x00\x01\x65garbage")
    with pytest.raises(ValueError):
        picture(broken, THUMBNAIL_WIDTH)
    with pytest.raises(ValueError):
        Thumbnail.decode(b"\x09" + bytes(20))


def test_record_round_trip() -> None:
    thumbnail = Thumbnail(160, 90, 1_700_000_000_123, b"\xff\xd8jpeg")
    assert Thumbnail.decode(thumbnail.encode()) == thumbnail
