"""Simulcast layers per viewer (issue 14): each viewer of a layered stream gets the best
layer its link carries, switching at keyframes, as one continuous stream. The publisher
is :class:`LayeredSource` (three H.264 layers written into Kafka as a simulcast ingest
writes them); the slow link is the test viewer's own (``peers.Link``). Layer choice is
on without ``--viewer-adapt``: the server here has the defaults."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from .conftest import start_server, until
from .layered_source import LAYERS, LayeredSource
from .peers import Link, play, publish_simulcast
from .test_adaptation import max_gap
from .test_feedback import viewer_session, wait_live
from .test_observability import scrape, value


@pytest.fixture(scope="module")
async def layers_server(kafka):
    server = await start_server(kafka)
    yield server
    await server.runner.cleanup()


def decoded_share(frames: list[tuple[float, int, bool]], since: float, until_: float) -> float:
    """Share of the source's frames in a window that the viewer decoded."""
    counters = sorted({c for at, c, _ in frames if since <= at <= until_})
    if len(counters) < 2:
        return 0.0
    return len(counters) / (counters[-1] - counters[0] + 1)


def monotonic_pts(pts: list[int]) -> bool:
    """RTP timestamps only move forward (mod 2^32), by less than 10 s a step."""
    steps = [(b - a) & 0xFFFFFFFF for a, b in zip(pts, pts[1:], strict=False)]
    return all(0 < step < 10 * 90000 for step in steps)


@pytest.mark.timeout(240)  # ~50 s; its waits add up to ~75 s at their bounds, plus a loaded machine
async def test_each_viewer_gets_the_layer_its_link_carries(layers_server, stream_name):
    """Three layers (~1.6 Mbps, 430 and 130 kbps). A viewer behind an 800 kbps link with
    a 100 ms queue leaves the top layer within a few seconds for one that fits, then
    decodes over 98 % of the frames with no freeze over 0.5 s, its RTP timestamps
    continuous across the switch; an unconstrained viewer on the same node keeps the
    top layer; the session resource, /api/stats and keyframe requests (per layer,
    within the rate limit) say so. A try of the top layer while the link is still slow
    fails and returns the viewer to its layer at once; once the link is fast again
    (just after such a failed try: the longest wait) the slow viewer is back on the top
    layer within 20 s and stays there."""
    server = layers_server
    source = LayeredSource(server.node.bus, stream_name)
    await source.start()
    try:
        await wait_live(server, stream_name)
        link = Link(bitrate=800_000, queue_s=0.1)
        slow = await play(server.url, stream_name, link=link, resync=True)
        fast = await play(server.url, stream_name, link=Link(), resync=True)
        slow_session = viewer_session(server, stream_name, slow)
        fast_session = viewer_session(server, stream_name, fast)
        started = time.monotonic()
        assert await until(lambda: slow_session.layer > 0, 10), "never left the top layer"
        settle_s = time.monotonic() - started
        assert await until(lambda: len(slow.frames) > 0 and slow_session.layer > 0, 5)
        # Settled: the switch's keyframe has arrived; now measure a window.
        await asyncio.sleep(1.5)
        window_from = time.monotonic()
        switches_before = slow_session.selector.switches_down
        async with aiohttp.ClientSession(base_url=server.url) as http:
            states = []
            while time.monotonic() < window_from + 6:
                async with http.get(slow.location) as response:
                    assert response.status == 200
                    states.append(await response.json())
                await asyncio.sleep(0.5)
            window_to = time.monotonic()
            assert all(s["layer"] in (1, 2) for s in states), states
            last = states[-1]
            assert last["video"] == "reduced" and last["layers"] == 3, last
            assert last["estimate_kbps"] is not None and last["estimate_kbps"] < 1600, last
            assert last["layer_width"] < 320, last
            # What fits is watched whole: few frames lost, no freeze.
            share = decoded_share(slow.frames, window_from, window_to)
            assert share > 0.98, (share, settle_s)
            assert max_gap([at for at, _, _ in slow.frames], window_from) < 0.5
            shown = [c for at, c, _ in slow.frames if at >= started]
            assert shown == sorted(shown), "old frames after a switch"
            assert monotonic_pts(slow.video_pts), "RTP timestamps broke across a switch"
            assert slow_session.selector.switches_down == switches_before, "flapped"
            assert all(size[0] < 320 for size in slow.video_sizes[-30:])
            # The unconstrained viewer keeps the top layer and the full frame rate.
            assert fast_session.layer == 0 and fast_session.selector.switches_down == 0
            assert decoded_share(fast.frames, window_from, window_to) > 0.98
            assert fast.video_sizes[-1] == (320, 240)
            # Operators see it, aggregated per stream.
            async with http.get("/api/stats") as response:
                stats = (await response.json())["streams"][stream_name]["egress"]
            assert stats["layer_switches_down"] >= 1, stats
            assert stats["viewers_per_layer"][0] == 1 and sum(stats["viewers_per_layer"]) == 2
            # ... and in Prometheus (per stream, no per-viewer labels).
            samples = await scrape(server.url)
            on_layer = [
                value(samples, "whipcast_egress_layer_viewers", stream=stream_name, layer=str(k))
                for k in range(3)
            ]
            assert on_layer[0] == 1 and sum(on_layer) == 2, on_layer
            down = {"stream": stream_name, "direction": "down"}
            switched = value(samples, "whipcast_egress_layer_switches_total", **down)
            assert switched >= 1, switched

            # Still slow: the viewer tries the top layer once the hold is over, the link
            # drops the try, and the viewer is back on the layer it came from at once.
            selector = slow_session.selector
            assert await until(lambda: selector.failed_ups >= 1, 20), "never tried to go up"
            failed_at = time.monotonic()
            assert slow_session.layer == 1, slow_session.layer
            await asyncio.sleep(2)
            assert slow_session.layer == 1 and selector.failed_ups == 1
            samples = await scrape(server.url)
            assert value(samples, "whipcast_egress_layer_failed_ups_total", stream=stream_name) >= 1
            up = {"stream": stream_name, "direction": "up"}
            assert value(samples, "whipcast_egress_layer_switches_total", **up) >= 1
            times = [at for at, _, _ in slow.frames]
            # The try costs a short freeze (about 1 s: the top layer's keyframe does not
            # get through whole, and the old layer's keyframe is asked for again), then
            # the picture flows again.
            assert max_gap([t for t in times if t < failed_at + 1.5], failed_at - 2) < 2.5
            assert max_gap(times, failed_at + 1.5) < 0.5

            # The link is fast again, right after a failed try (the longest wait): the
            # viewer tries again after the doubled hold and keeps the top layer.
            link.bitrate = None
            lifted = time.monotonic()
            assert await until(lambda: slow_session.layer == 0, 25), (
                "not back on the top layer 25 s after the link recovered"
            )
            recovered_s = time.monotonic() - lifted
            await asyncio.sleep(3)
            assert slow_session.layer == 0 and selector.failed_ups == 1
            async with http.get(slow.location) as response:
                assert (await response.json())["video"] == "live"
            assert slow.video_sizes[-1] == (320, 240)
            assert monotonic_pts(slow.video_pts), "RTP timestamps broke across a switch"
            assert recovered_s < 20, recovered_s
        # Keyframe requests reach the publisher per layer, within the rate limit.
        interval = server.settings.keyframe_request_interval
        for layer in range(3):
            times = [at for at, k in source.requests if k == layer]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            assert all(g >= interval * 0.9 for g in gaps), (layer, gaps)
        assert all(k is not None for _, k in source.requests), source.requests
        await slow.close()
        await fast.close()
    finally:
        await source.stop()


async def test_a_viewer_below_the_top_layer_rewinds_and_returns(layers_server, stream_name):
    """A viewer on a lower layer that seeks into the past gets the top layer (the past
    is read from partition 0), and back live it carries on; its RTP timestamps never
    go back across either move."""
    server = layers_server
    source = LayeredSource(server.node.bus, stream_name)
    await source.start()
    try:
        await wait_live(server, stream_name)
        link = Link(bitrate=800_000, queue_s=0.1)
        viewer = await play(server.url, stream_name, link=link, resync=True)
        session = viewer_session(server, stream_name, viewer)
        assert await until(lambda: session.layer > 0 and len(viewer.frames) > 30, 15)
        await asyncio.sleep(1)
        link.bitrate = None
        await asyncio.sleep(1)
        async with viewer.session.post(viewer.location + "/position", json={"seek": -3}) as r:
            assert r.status == 200 and not (await r.json())["live"]
        asked = time.monotonic()
        assert session.layer == 0 and not session.fanout.viewers_per_layer()[1]
        await asyncio.sleep(2.5)
        # The past is shown (top layer). How smoothly depends on the estimate, held to
        # the lower layer's rate until now: a probe raises it unless one ran lately.
        newest = max(c for at, c, _ in viewer.frames if at < asked)
        assert any(c < newest - 45 for at, c, _ in viewer.frames if at > asked), "no past"
        after = [i for i, (at, _, _) in enumerate(viewer.frames) if at > asked]
        assert any(viewer.video_sizes[i] == (320, 240) for i in after), "not the top layer"
        async with viewer.session.post(viewer.location + "/position", json={"live": True}) as r:
            assert r.status == 200 and (await r.json())["live"]
        back = time.monotonic()
        await asyncio.sleep(2)
        assert max_gap([at for at, _, _ in viewer.frames], back + 1) < 0.5
        assert session in session.fanout.viewers and session.layer == 0
        assert monotonic_pts(viewer.video_pts), "RTP timestamps went back"
        await viewer.close()
    finally:
        await source.stop()


async def test_layers_listed_but_not_in_the_topic(layers_server, stream_name):
    """A registry record listing layers whose partitions the stream's topic lacks (an
    ingest that wrote one layer) still plays: its top layer, without adaptation."""
    server = layers_server
    source = LayeredSource(server.node.bus, stream_name, layers=LAYERS[:1])
    source.info.layers = [{"layer": k, "rid": x.rid, "width": x.width, "height": x.height,
                           "bitrate": x.bitrate} for k, x in enumerate(LAYERS)]  # fmt: skip
    await source.start()
    try:
        await wait_live(server, stream_name)
        viewer = await play(server.url, stream_name, resync=True)
        await viewer.wait_frames(30)
        async with viewer.session.get(viewer.location) as response:
            state = await response.json()
        assert state["layer"] is None and state["layers"] == 1, state
        assert viewer_session(server, stream_name, viewer).estimate is None
        await viewer.close()
    finally:
        await source.stop()


@pytest.mark.timeout(180)
async def test_simulcast_publish_through_ingest_to_a_slow_viewer(layers_server, stream_name):
    """End to end: a WHIP simulcast publisher (three VP8 layers through the real
    ingest), a viewer behind a link too slow for the top layer and one without limit.
    The slow viewer moves to a lower layer the ingest wrote and keeps getting pictures
    of that layer's size; the fast one stays on the top layer's."""
    server = layers_server
    publisher = await publish_simulcast(server.url, stream_name)
    try:
        await wait_live(server, stream_name)
        view = server.node.view

        def layered() -> bool:
            info = view.get(stream_name)
            layers = (info.layers or []) if info is not None else []
            return len(layers) == 3 and all(x.get("bitrate") for x in layers)

        assert await until(layered, 20), view.get(stream_name)
        layers = view.get(stream_name).layers
        top, middle = layers[0]["bitrate"], layers[1]["bitrate"]
        assert top > 1.5 * middle, layers  # room for a link between them
        link = Link(bitrate=int((top + middle) / 2 * 1.2), queue_s=0.1)
        slow = await play(server.url, stream_name, link=link, resync=True)
        fast = await play(server.url, stream_name, link=Link(), resync=True)
        slow_session = viewer_session(server, stream_name, slow)
        fast_session = viewer_session(server, stream_name, fast)
        assert await until(lambda: slow_session.layer > 0, 20), (layers, link.bitrate)
        await asyncio.sleep(3)
        assert slow_session.layer > 0, "went back up on a slow link"

        def lower_pictures() -> bool:  # a loaded machine decodes the new layer late
            recent = slow.video_sizes[-15:]
            return len(recent) == 15 and all(size[0] < layers[0]["width"] for size in recent)

        assert await until(lower_pictures, 10), (
            slow.video_sizes[-15:],
            slow_session.status(),
            layers,
        )
        assert slow_session.layer > 0, "went back up on a slow link"
        assert fast_session.layer == 0, (
            fast_session.selector.switches_down,
            fast_session.estimate.stats,
            fast_session.estimate.bitrate,
            fast_session.fanout.layer_state(),
        )
        assert fast.video_sizes[-1] == (layers[0]["width"], layers[0]["height"])
        await slow.close()
        await fast.close()
    finally:
        await publisher.close()
