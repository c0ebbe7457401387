"""What travels back up, and what must not: keyframe requests reach the publisher, a
stalled viewer costs the others nothing, a vanished publisher ends its stream."""

from __future__ import annotations

import asyncio
import time

import pytest

from .conftest import start_server
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


async def test_viewer_pli_reaches_publisher(quiet_server, stream_name):
    server = quiet_server
    publisher = await publish(server.url, stream_name)
    calls = count_keyframe_requests(publisher)
    try:
        await wait_live(server, stream_name)
        viewer = await play(server.url, stream_name)
        await viewer.wait_frames(10)
        await asyncio.sleep(0.6)  # past the rate limit of any join-time request
        before = len(calls)
        receiver = next(t.receiver for t in viewer.pc.getTransceivers() if t.kind == "video")
        media_ssrc = receiver.getSynchronizationSources()[0].source
        await receiver._send_rtcp_pli(media_ssrc)  # a real RTCP PLI over SRTCP
        for _ in range(100):
            if len(calls) > before:
                break
            await asyncio.sleep(0.02)
        assert len(calls) > before, "the publisher never got the viewer's PLI"
        # A burst of PLIs from viewers is coalesced into few upstream requests.
        sent = server.node.egress.keyframes.sent
        for _ in range(20):
            await receiver._send_rtcp_pli(media_ssrc)
        await asyncio.sleep(0.3)
        assert server.node.egress.keyframes.sent - sent <= 1
        assert server.node.egress.keyframes.coalesced >= 19
        await viewer.close()
    finally:
        await publisher.close()


def _ice_socket(viewer):
    transport = next(iter(viewer.pc.getTransceivers())).receiver.transport.transport
    return transport._connection._nominated[1].protocol.transport


async def test_stalled_viewer_does_not_slow_others(server, stream_name):
    publisher = await publish(server.url, stream_name)
    try:
        await wait_live(server, stream_name)
        stalled = await play(server.url, stream_name)
        healthy = await play(server.url, stream_name)
        await stalled.wait_frames(5)
        await healthy.wait_frames(5)
        _ice_socket(stalled).pause_reading()  # its socket fills; it reads nothing more
        start = len(healthy.frames)
        t0 = time.monotonic()
        await asyncio.sleep(3)
        got = healthy.frames[start:]
        counters = [c for _, c, _ in got]
        assert len(got) >= 0.9 * 30 * (time.monotonic() - t0) - 5, len(got)
        assert counters == list(range(counters[0], counters[0] + len(counters)))
        gaps = [b[0] - a[0] for a, b in zip(got, got[1:], strict=False)]
        # Generous bound: a 2-core CI machine also runs the publisher, broker and decoders.
        assert max(gaps) < 0.5, f"the healthy viewer froze for {max(gaps):.3f} s"
        # Once it reads again, the stalled viewer recovers (NACK/PLI, keyframe).
        _ice_socket(stalled).resume_reading()
        resumed = len(stalled.frames)
        await stalled.wait_frames(resumed + 30, timeout=10)
        await stalled.close()
        await healthy.close()
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
