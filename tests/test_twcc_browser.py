"""transport-cc with a real Chromium viewer (issue 14): Chromium offers the
transport-wide-cc extension and feedback, the gateway (with ``viewer_adapt``) answers
with both, stamps a transport-wide number on every packet, parses Chromium's feedback
and its estimate follows it; an aiortc viewer on the same stream (which offers
neither) keeps REMB and receiver reports.

Drives ``tests/browser/watch_twcc.mjs`` against a node with an aiortc publisher.
"""

from __future__ import annotations

import asyncio

import pytest
from whipcast.gateway.frames import Track

from .browser_harness import NEEDS_CHROMIUM, run_script
from .conftest import start_server, until
from .peers import play, publish
from .test_feedback import wait_live

WATCH_S = 14
pytestmark = NEEDS_CHROMIUM


@pytest.fixture(scope="module")
async def adapt_server(kafka):
    server = await start_server(kafka, viewer_adapt=True)
    yield server
    await server.runner.cleanup()


@pytest.mark.timeout(WATCH_S + 90)
async def test_chromium_viewer_negotiates_transport_cc(adapt_server, stream_name):
    server = adapt_server
    publisher = await publish(server.url, stream_name, noise=True)
    try:
        await wait_live(server, stream_name)
        aiortc_viewer = await play(server.url, stream_name)
        script = asyncio.ensure_future(
            run_script(
                "watch_twcc.mjs",
                server.url,
                stream_name,
                "-",
                "--seconds",
                str(WATCH_S),
                timeout=WATCH_S + 60,
            )
        )
        egress = server.node.egress

        def chromium_session():
            found = [
                v
                for v in egress.viewers.values()
                if v.stream == stream_name and v.send_log is not None
            ]
            return found[0] if found else None

        assert await until(lambda: chromium_session() is not None, 30), "no transport-cc viewer"
        session = chromium_session()
        estimate = session.estimate
        # Every one of its senders numbers packets from one transport-wide log.
        assert await until(lambda: all(s.layout for s in session.senders.values()), 15)
        for sender in session.senders.values():
            assert sender.layout.transport_cc_id is not None
            assert sender.send_log is session.send_log
        assert await until(lambda: estimate.stats.transport_feedbacks >= 20, 20), estimate.stats
        # Its feedback matches what was sent: the received rate measured from
        # Chromium's arrival times and the logged sizes is about the sent rate.
        assert await until(lambda: estimate.acked_bitrate > 0, 10)
        await asyncio.sleep(2)
        sent = session.senders[Track.VIDEO].octets_sent
        assert 0.3 * estimate.sent_bitrate < estimate.acked_bitrate < 3 * estimate.sent_bitrate, (
            estimate.acked_bitrate,
            estimate.sent_bitrate,
        )
        # The estimate moves on that feedback alone (REMB and RR no longer drive it):
        # set low but above the stream, it climbs while the link shows no queue.
        low = 1.2 * estimate.sent_bitrate
        estimate.bitrate = low
        estimate._apply()
        # (Bounds for a loaded machine, whose stalls read as queueing: one full-suite run
        # climbed 8 % in 8 s.)
        assert await until(lambda: estimate.bitrate > 1.05 * low, 15), (estimate.bitrate, low)
        assert session.senders[Track.VIDEO].octets_sent > sent
        # The aiortc viewer offered no transport-cc: none negotiated, REMB/RR as before.
        plain = next(
            v for v in egress.viewers.values() if v.stream == stream_name and v is not session
        )
        assert plain.send_log is None
        assert all(s.layout.transport_cc_id is None for s in plain.senders.values())
        assert plain.estimate.stats.transport_feedbacks == 0

        code, result, stderr = await script
        assert result is not None and code == 0 and result["ok"], f"{result}\n{stderr}"
        assert result["framesDecoded"] > 30, result
        assert result["transportCc"] and "transport-wide-cc" in result["transportCc"], result
        await aiortc_viewer.close()
    finally:
        await publisher.close()
