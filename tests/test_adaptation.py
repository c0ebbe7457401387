"""Viewers on slow links: each gets what its link carries, without hurting the others
or the publisher (issue 14). Links are simulated in the test viewer itself
(``peers.Link``: a bottleneck with a 100 ms queue, then drops), since kernel traffic
shaping is not available on test machines."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from .conftest import start_server
from .peers import Link, play, publish
from .test_feedback import count_keyframe_requests, viewer_session, wait_live


@pytest.fixture(scope="module")
async def adapt_server(kafka):
    server = await start_server(kafka, viewer_adapt=True)
    yield server
    await server.runner.cleanup()


def max_gap(times: list[float], since: float) -> float:
    times = [t for t in times if t >= since]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("inf"))


@pytest.mark.parametrize("loss", [0.0, 0.02], ids=["clean", "loss2pct"])
async def test_single_layer_viewer_on_a_slow_link(adapt_server, stream_name, loss):
    """One publisher layer (~1.5 Mbps), one viewer behind an 800 kbps link: its
    estimate falls below the stream, its video pauses to keyframes it can take (the
    session resource says so) while audio flows without gaps, the unconstrained viewer
    on the same node is untouched, keyframe requests to the publisher stay within the
    rate limit, and once the link is fast again the viewer gets live video back within
    ~15 s (bounded at 20 s for a loaded machine). With 2 % random loss on both links:
    that loss alone never pauses the unconstrained viewer, nor keeps the slow one
    paused once its link is fast. Both viewers decode the first whole keyframe after a
    gap NACKs could not fill, as browsers do (``resync``): aiortc alone waits for 512
    newer packets, which kept a recovered viewer frozen for seconds and made this
    test fail about one run in two under load while the gateway had it live."""
    server = adapt_server
    publisher = await publish(server.url, stream_name, noise=True)
    calls = count_keyframe_requests(publisher)
    try:
        await wait_live(server, stream_name)
        link = Link(bitrate=800_000, queue_s=0.1, loss=loss)
        slow = await play(server.url, stream_name, link=link, resync=True)
        fast = await play(server.url, stream_name, link=Link(loss=loss), resync=True)
        slow_session = viewer_session(server, stream_name, slow)
        fast_session = viewer_session(server, stream_name, fast)
        states: list[tuple[float, str]] = []
        async with aiohttp.ClientSession(base_url=server.url) as http:

            async def poll(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    async with http.get(slow.location) as response:
                        assert response.status == 200
                        states.append((time.monotonic(), (await response.json())["video"]))
                    await asyncio.sleep(0.25)

            await poll(4)  # settle
            settled = time.monotonic()
            fast_start = len(fast.frames)
            drops_at_settle, packets_at_settle = link.queue_drops, link.packets
            probes_at_settle = slow_session.estimate.stats.probes
            await poll(6)
            estimate = slow_session.estimate
            # (unless a probe of the link is under way: it sets the estimate above the stream)
            assert estimate is not None, "no estimate"
            probing = estimate.probing(time.monotonic())
            assert estimate.bitrate < 1_000_000 or probing, estimate.bitrate
            assert slow_session.stats.pauses > 0
            assert any(state == "paused" for at, state in states if at >= settled)
            # Audio is never paused: no gap a listener would hear as a dropout. (0.8 s:
            # this harness alone shows gaps up to 0.42 s on a loaded 2-core machine with
            # the video paused and no probe at all; audio paused with the video would
            # leave gaps of seconds.)
            assert max_gap(slow.audio_times, settled) < 0.8
            # What the slow viewer shows is whole frames, in order, never garbage.
            shown = [c for at, c, _ in slow.frames if at >= settled]
            assert shown == sorted(shown), "the slow viewer decoded broken frames"
            # The link's queue seldom overflows once the estimate has settled, but
            # for probes of whether the link got faster (each a short burst).
            dropped = link.queue_drops - drops_at_settle
            probes = estimate.stats.probes - probes_at_settle
            assert dropped <= 0.05 * (link.packets - packets_at_settle) + 100 * (probes + 1)
            # The unconstrained viewer keeps the full stream.
            assert fast_session.stats.pauses == 0 and fast_session.stats.keyframe_drops == 0
            got = fast.frames[fast_start:]
            assert len(got) > 10 * (time.monotonic() - settled), len(got)
            # (1.5 s: with two cores oversubscribed 2.5 times, the harness decoding both
            # viewers in Python stalled 1.08 s once, with no pause or drop by the gateway.)
            assert max_gap([at for at, _, _ in got], settled) < 1.5
            # Operators see it, aggregated per stream.
            async with http.get("/api/stats") as response:
                stats = (await response.json())["streams"][stream_name]["egress"]
            assert stats["video_pauses"] >= 1 and stats["estimate_kbps_min"] < 1000

            # The link is fast again: within ~15 s the viewer is back to live video.
            link.bitrate = None
            lifted = time.monotonic()
            deadline = lifted + 20
            while time.monotonic() < deadline:
                await poll(1)
                recent = [at for at, _, _ in slow.frames if at > time.monotonic() - 1]
                if states[-1][1] == "live" and len(recent) > 10:
                    break
            else:
                raise AssertionError(f"no live video 20 s after the link recovered: {states[-5:]}")
            # Still live a few seconds on (a probe that held, not one that failed).
            await poll(3)
            assert states[-1][1] == "live", states[-8:]
            assert fast_session.stats.pauses == 0
        # Keyframe requests reaching the publisher stay within the rate limit.
        gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
        # (0.75: the publisher sees them after an asyncio hop on a loaded machine,
        # which brought two sent 0.5 s apart to 0.45 s in one run)
        assert all(g >= server.settings.keyframe_request_interval * 0.75 for g in gaps), gaps
        await slow.close()
        await fast.close()
    finally:
        await publisher.close()
