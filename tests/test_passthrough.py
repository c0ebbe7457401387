"""Frames go publisher -> ingest -> Kafka -> egress -> viewer unchanged and in order."""

from __future__ import annotations

import asyncio

import pytest

from .peers import play, publish


async def wait_live(server, stream: str, timeout: float = 5.0) -> None:
    ok = await server.node.view.wait_for(lambda: server.node.view.get(stream) is not None, timeout)
    assert ok, f"{stream} never became live"


@pytest.mark.parametrize("codec", ["video/H264", "video/VP8"])
async def test_frames_arrive_in_order(server, stream_name, codec):
    publisher = await publish(server.url, stream_name, codec=codec)
    try:
        await wait_live(server, stream_name)
        viewer = await play(server.url, stream_name)
        try:
            await viewer.wait_frames(60, timeout=15)
            counters = [c for _, c, _ in viewer.frames]
            # Every decoded frame is one the publisher drew, in the order it drew them.
            assert counters == sorted(counters), counters
            assert len(set(counters)) == len(counters)
            assert max(counters) <= publisher.track.counter
            # Consecutive once started: nothing lost or reordered on loopback.
            steps = [b - a for a, b in zip(counters, counters[1:], strict=False)]
            assert sum(s == 1 for s in steps) >= 0.95 * len(steps), steps
            if codec == "video/H264":  # aiortc's VP8 decoder does not report key frames
                assert viewer.frames[0][2], "the first decoded frame must be a keyframe"
            await asyncio.sleep(0.5)
            assert viewer.audio_frames > 10
        finally:
            assert await viewer.close() == 200
    finally:
        assert await publisher.close() == 200


async def test_join_mid_gop_starts_at_once(server, stream_name):
    """A late viewer gets the cached GOP (keyframe first) and is near live at once."""
    publisher = await publish(server.url, stream_name, codec="video/H264")
    try:
        await wait_live(server, stream_name)
        await asyncio.sleep(1.3)  # well into the publisher's GOP
        live_at_join = publisher.track.counter
        viewer = await play(server.url, stream_name)
        try:
            await viewer.wait_frames(1, timeout=5)
            first_at, _, first_is_key = viewer.frames[0]
            assert first_is_key
            assert first_at - viewer.posted_at < 0.5, first_at - viewer.posted_at
            # The GOP burst brings the viewer up to the frame live when it joined.
            for _ in range(100):
                caught_up = [t for t, c, _ in viewer.frames if c >= live_at_join]
                if caught_up:
                    break
                await asyncio.sleep(0.02)
            assert caught_up and caught_up[0] - viewer.posted_at < 1.0
            fanout = server.node.egress.fanouts[stream_name]
            assert fanout.frames > 0
            viewer_session = next(iter(fanout.viewers))
            assert viewer_session.stats.first_frame_s < 0.5
        finally:
            await viewer.close()
    finally:
        await publisher.close()
