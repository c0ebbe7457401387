"""What travels back up, and what must not: a viewer's keyframe request is answered from
the cache (the publisher is asked only without one), a slow viewer costs the others
nothing, a lossy one cannot draw unbounded retransmissions, a vanished publisher ends
its stream."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from whipcast.gateway.frames import Track

from .conftest import start_server, until
from .peers import play, publish


@pytest.fixture(scope="module")
async def quiet_server(kafka):
    """No periodic keyframe requests (so every PLI seen is one a viewer caused), and a
    short media timeout."""
    server = await start_server(kafka, max_keyframe_interval=0.0, publisher_timeout=1.5)
    yield server
    await server.runner.cleanup()


async def wait_live(server, stream):
    assert await server.node.view.wait_for(lambda: server.node.view.get(stream), 5)


def count_keyframe_requests(publisher) -> list[float]:
    """Record when the publisher's aiortc sender is asked for a keyframe."""
    sender = next(t.sender for t in publisher.pc.getTransceivers() if t.kind == "video")
    calls: list[float] = []
    original = sender._send_keyframe

    def send_keyframe() -> None:
        calls.append(time.monotonic())
        original()

    sender._send_keyframe = send_keyframe
    return calls


def viewer_session(server, stream, viewer):
    """The gateway's side of a test viewer."""
    session = server.node.egress.find(stream, viewer.location.rsplit("/", 1)[1])
    assert session is not None
    return session


def video_receiver(viewer):
    receiver = next(t.receiver for t in viewer.pc.getTransceivers() if t.kind == "video")
    return receiver, receiver.getSynchronizationSources()[0].source


async def test_viewer_pli_is_answered_from_the_cache(quiet_server, stream_name):
    """A viewer's PLI gets that viewer the cached GOP; the publisher (and so every
    other viewer) is asked for a keyframe only when no GOP is cached."""
    server = quiet_server
    publisher = await publish(server.url, stream_name)
    calls = count_keyframe_requests(publisher)
    try:
        await wait_live(server, stream_name)
        viewer = await play(server.url, stream_name)
        await viewer.wait_frames(10)
        await asyncio.sleep(0.6)  # past the rate limit of any join-time request
        session = viewer_session(server, stream_name, viewer)
        before, answered = len(calls), session.stats.cached_keyframes
        receiver, media_ssrc = video_receiver(viewer)
        start = len(viewer.frames)
        newest = viewer.frames[-1][1]
        await receiver._send_rtcp_pli(media_ssrc)  # a real RTCP PLI over SRTCP
        # The GOP again, from its keyframe: counters go back, then on to live.
        assert await until(lambda: any(key for _, _, key in viewer.frames[start:]), 5.0), (
            "the viewer got no keyframe after its PLI"
        )
        assert min(c for _, c, _ in viewer.frames[start:]) < newest
        await viewer.wait_frames(len(viewer.frames) + 10)
        assert session.stats.cached_keyframes == answered + 1
        # A PLI storm from one viewer: rate-limited, and never reaches the publisher.
        for _ in range(20):
            await receiver._send_rtcp_pli(media_ssrc)
        await asyncio.sleep(0.3)
        assert session.stats.cached_keyframes <= answered + 2
        assert len(calls) == before, "a viewer's PLI reached the publisher despite a cache"
        # No cached keyframe (as after a GOP overflow): now the publisher is asked.
        server.node.egress.fanouts[stream_name].gop.clear()
        await asyncio.sleep(server.settings.viewer_keyframe_interval)
        await receiver._send_rtcp_pli(media_ssrc)
        assert await until(lambda: len(calls) > before, 5.0), "the publisher never got the PLI"
        assert session.stats.upstream_keyframes == 1
        await viewer.close()
    finally:
        await publisher.close()


@pytest.fixture(scope="module")
async def short_queue_server(kafka):
    """Viewers may queue only half a second of frames before being dropped."""
    server = await start_server(kafka, viewer_queue_frames=15)
    yield server
    await server.runner.cleanup()


async def test_stalled_viewer_does_not_slow_others(short_queue_server, stream_name):
    server = short_queue_server
    publisher = await publish(server.url, stream_name)
    try:
        await wait_live(server, stream_name)
        stalled = await play(server.url, stream_name)
        healthy = await play(server.url, stream_name)
        await stalled.wait_frames(5)
        await healthy.wait_frames(5)
        # The stalled viewer's path now takes 16 kbit/s, far below the stream's rate:
        # the gateway may send it only that much, the rest has to queue.
        session = viewer_session(server, stream_name, stalled)
        budget = session.senders[Track.VIDEO].budget
        rate, burst = budget.rate, budget.burst
        budget.rate = budget.burst = 2_000
        start = len(healthy.frames)
        t0 = time.monotonic()
        await asyncio.sleep(3)
        got = healthy.frames[start:]
        counters = [c for _, c, _ in got]
        assert session.stats.keyframe_drops > 0, "the slow viewer was never dropped"
        assert viewer_session(server, stream_name, healthy).stats.keyframe_drops == 0
        assert len(got) >= 0.9 * 30 * (time.monotonic() - t0) - 5, len(got)
        assert counters == list(range(counters[0], counters[0] + len(counters)))
        gaps = [b[0] - a[0] for a, b in zip(got, got[1:], strict=False)]
        # Generous bound: a 2-core CI machine also runs the publisher, broker and decoders.
        assert max(gaps) < 0.5, f"the healthy viewer froze for {max(gaps):.3f} s"
        # Once its path is fast again, the stalled viewer resumes at a keyframe.
        budget.rate, budget.burst = rate, burst
        resumed = len(stalled.frames)
        await stalled.wait_frames(resumed + 30, timeout=10)
        await stalled.close()
        await healthy.close()
    finally:
        await publisher.close()


async def test_retransmissions_to_a_lossy_viewer_are_bounded(server, stream_name):
    """A viewer losing most packets NACKs nearly everything; what it is resent stays
    within its allowance, and the rest is refused and counted."""
    publisher = await publish(server.url, stream_name, audio=False)
    try:
        await wait_live(server, stream_name)
        lossy = await play(server.url, stream_name, loss=0.7)
        session = viewer_session(server, stream_name, lossy)
        sender = session.senders[Track.VIDEO]
        policy = sender.retransmit_policy
        await asyncio.sleep(4)
        assert lossy.rtp_dropped > 100, lossy.rtp_dropped
        assert sender.nacks_received > 5, sender.nacks_received
        assert sender.retransmitted > 0
        # The allowance is earned only by media sent: resends never exceed its share.
        assert sender.retransmitted_octets <= policy.budget * sender.octets_sent
        assert sum(sender.retransmit_refused.values()) > 0
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/api/stats") as response:
                stats = (await response.json())["streams"][stream_name]["egress"]
            async with http.get(f"{server.url}/metrics") as response:
                metrics = await response.text()
        assert stats["retransmissions_refused"] > 0
        refused = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("whipcast_egress_retransmissions_refused_total{")
            and f'stream="{stream_name}"' in line
        ]
        assert sum(refused) > 0
        await lossy.close()
    finally:
        await publisher.close()


async def test_vanished_publisher_ends_stream(quiet_server, stream_name):
    """A publisher that stops sending media without a DELETE is noticed and its
    stream marked ended; so is one that closes its connection."""
    server = quiet_server
    view = server.node.view
    publisher = await publish(server.url, stream_name, audio=False)
    await wait_live(server, stream_name)

    async def never():
        await asyncio.Event().wait()

    publisher.track.recv = never  # the encoder starves: no more RTP, ICE stays up
    assert await view.wait_for(lambda: view.get(stream_name) is None, 5)
    assert stream_name not in server.node.ingest.sessions
    await publisher.close(delete=False)

    second = f"{stream_name}-2"
    publisher = await publish(server.url, second)
    await wait_live(server, second)
    await publisher.pc.close()  # no DELETE: RTCP BYE and DTLS close_notify only
    assert await view.wait_for(lambda: view.get(second) is None, 5)
    await publisher.session.close()


async def test_viewer_nack_is_retransmitted(server, stream_name):
    publisher = await publish(server.url, stream_name, audio=False)
    try:
        await wait_live(server, stream_name)
        viewer = await play(server.url, stream_name)
        await viewer.wait_frames(10)
        session = next(iter(server.node.egress.fanouts[stream_name].viewers))
        sender = next(iter(session.senders.values()))
        receiver = next(t.receiver for t in viewer.pc.getTransceivers() if t.kind == "video")
        media_ssrc = receiver.getSynchronizationSources()[0].source
        recent = (sender._seq - 5) & 0xFFFF
        before = sender.retransmitted
        await receiver._send_rtcp_nack(media_ssrc, [recent, (recent + 1) & 0xFFFF])
        for _ in range(50):
            if sender.retransmitted >= before + 2:
                break
            await asyncio.sleep(0.02)
        assert sender.retransmitted == before + 2
        # Sequence numbers the viewer never got are not invented.
        await receiver._send_rtcp_nack(media_ssrc, [(sender._seq + 1000) & 0xFFFF])
        await asyncio.sleep(0.2)
        assert sender.retransmitted == before + 2
        await viewer.close()
    finally:
        await publisher.close()


async def test_malformed_rtp_is_dropped_and_counted(server, stream_name):
    publisher = await publish(server.url, stream_name, audio=False)
    try:
        await wait_live(server, stream_name)
        sender = next(t.sender for t in publisher.pc.getTransceivers() if t.kind == "video")
        session = server.node.ingest.sessions[stream_name]
        for _ in range(100):  # until media flows, so the receiver knows its codecs
            if sum(session.stats.frames):
                break
            await asyncio.sleep(0.05)
        codecs = session._receivers[0]._codecs
        video_pt = next(pt for pt, c in codecs.items() if c.mimeType == "video/H264")
        before = session.stats.malformed_rtp
        # A valid RTP header around an H.264 payload of a NAL type RTP never carries.
        bad = (
            bytes([0x80, video_pt, 0, 1, 0, 0, 0, 1])
            + (0x5EED5EED).to_bytes(4, "big")  # own SSRC: a fresh SRTP replay window
            + b"\x1f\x00"
        )
        await sender.transport._send_rtp(bad)
        for _ in range(50):
            if session.stats.malformed_rtp > before:
                break
            await asyncio.sleep(0.02)
        assert session.stats.malformed_rtp == before + 1
        viewer = await play(server.url, stream_name)  # the stream is unharmed
        await viewer.wait_frames(10)
        await viewer.close()
    finally:
        await publisher.close()
