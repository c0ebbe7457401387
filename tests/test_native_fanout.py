"""The native fan-out core against the pure-Python send path it accelerates, as aiohttp
tests its C parser against the Python one: the same frame, keys, sequence numbers,
timestamp and SSRC give the same SRTP packets byte for byte, for every SRTP profile
aiortc negotiates; and real aiortc viewers decode, NACK and get resends through
either path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from aiortc.rtp import RtcpByePacket, RtcpSrPacket
from pylibsrtp import Policy, Session
from whipcast.gateway import aiortc_compat, rtpsend
from whipcast.gateway.frames import Track
from whipcast.gateway.rtpsend import Layout, PreparedFrame

from .conftest import start_server, until
from .peers import play, publish

if rtpsend._fanout is None:
    # A machine with Rust must have built it (CI does): a failed build fails here.
    if shutil.which("cargo"):
        raise AssertionError("cargo is installed but whipcast.gateway._fanout was not built")
    pytest.skip("the native core is not built (no Rust toolchain)", allow_module_level=True)
core = rtpsend._fanout

LIBSRTP = {
    "SRTP_AES128_CM_SHA1_80": (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 16 + 14),
    "SRTP_AEAD_AES_128_GCM": (Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 16 + 12),
    "SRTP_AEAD_AES_256_GCM": (Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 32 + 12),
}
SSRC = 0x1234ABCD
FIELDS = struct.Struct("!HII")


def libsrtp(profile: str, key: bytes) -> Session:
    """A sending libsrtp session set up exactly as aiortc sets up its own."""
    policy = Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=LIBSRTP[profile][0])
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return Session(policy)


def prepared(count: int, layout: Layout, rng: random.Random) -> PreparedFrame:
    payloads = [rng.randbytes(rng.randint(1, 1200)) for _ in range(count)]
    return PreparedFrame(None, payloads, True)  # type: ignore[arg-type]  # no Frame needed


def reference(
    frame: PreparedFrame,
    layout: Layout,
    seq: int,
    ts: int,
    protect,
    first: int = 0,
    end: int | None = None,
    sent_at: int | None = None,
) -> list[bytes]:
    """What the pure-Python path sends (``FanoutSender._send_python``)."""
    out = []
    stamp = struct.pack("!I", sent_at)[1:] if sent_at is not None else b""
    for head, before, after in frame.packets(layout)[first:end]:
        out.append(protect(head + FIELDS.pack(seq, ts, SSRC) + before + stamp + after))
        seq = (seq + 1) & 0xFFFF
    return out


def test_every_profile_aiortc_offers_is_supported():
    from aiortc.rtcdtlstransport import SRTP_PROFILES

    offered = {p.openssl_profile.decode() for p in SRTP_PROFILES}
    assert offered <= set(core.PROFILES)


@pytest.mark.parametrize("profile", core.PROFILES)
def test_protect_matches_libsrtp(profile):
    """Packet by packet, across a rollover, with repeats (resends) and old packets."""
    rng = random.Random(profile)
    key = rng.randbytes(LIBSRTP[profile][1])
    reference_session, track = libsrtp(profile, key), core.Track(profile, key, SSRC)
    seqs = [*range(0xFFE0, 0x10000), *range(0, 40), 3, 0xFFF0, 39, 40, 41]
    layouts = [Layout(96, None, None), Layout(102, 4, "0"), Layout(111, 9, "video-1")]
    for i, seq in enumerate(seqs):
        head = layouts[i % 3].header(i % 5 == 0)
        packet = (
            head[:2] + FIELDS.pack(seq, 90000 * i, SSRC) + head[12:] + rng.randbytes((i % 40) * 30)
        )
        assert track.protect(packet) == reference_session.protect(packet), (seq, i)
    assert track.index >> 16 == 1, "the rollover counter must have moved on"


def test_protect_refuses_what_it_must():
    track = core.Track("SRTP_AEAD_AES_128_GCM", bytes(28), SSRC)
    with pytest.raises(ValueError, match="another SSRC"):
        track.protect(bytes([0x80, 96]) + FIELDS.pack(1, 0, SSRC + 1) + b"x")
    with pytest.raises(ValueError, match="not an RTP packet"):
        track.protect(b"\x90\x60" + bytes(10))
    with pytest.raises(ValueError, match="key and salt"):
        core.Track("SRTP_AEAD_AES_128_GCM", bytes(30), SSRC)
    with pytest.raises(ValueError, match="unsupported"):
        core.Track("SRTP_NULL_SHA1_80", bytes(30), SSRC)
    with pytest.raises(ValueError, match="truncated"):
        core.Packets([(b"\x90\x60", b"\xbe\xde")])


@contextlib.contextmanager
def routed(track) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback receiver (large buffer, 5 s timeout) and a non-blocking sender whose
    descriptor ``track`` sends on, addressed to the receiver."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        tx.setblocking(False)
        track.route(tx.fileno(), "127.0.0.1", rx.getsockname()[1])
        yield rx, tx


@pytest.mark.parametrize("profile", core.PROFILES)
def test_send_matches_the_python_path(profile):
    """Whole frames through ``Track.send`` (``sendmmsg`` on a real loopback socket, more
    packets than one call takes) and ``protect_frame`` equal the Python path's bytes."""
    rng = random.Random(profile)
    key = rng.randbytes(LIBSRTP[profile][1])
    layout = Layout(102, 4, "0")
    reference_session = libsrtp(profile, key)
    track = core.Track(profile, key, SSRC)
    with routed(track) as (rx, tx):
        seq, ts = 0xFFC0, 3_000_000
        for count in (1, 7, 150, 3):  # 150: three sendmmsg calls; crosses seq 0xFFFF -> 0
            frame = prepared(count, layout, rng)
            expected = reference(frame, layout, seq, ts, reference_session.protect)
            native = frame.native_packets(layout, core)
            assert (native.count, native.octets) == (
                count,
                sum(len(b) + len(a) for _, b, a in frame.packets(layout)),
            )
            assert track.send(native, seq, ts) is None, "loopback never fills the socket"
            assert [rx.recv(2048) for _ in range(count)] == expected
            seq, ts = (seq + count) & 0xFFFF, ts + 3000
        frame = prepared(5, layout, rng)
        expected = reference(frame, layout, seq, ts, reference_session.protect)
        assert track.protect_frame(frame.native_packets(layout, core), seq, ts) == expected


@pytest.mark.parametrize("profile", core.PROFILES)
def test_abs_send_time_and_slices_match_the_python_path(profile):
    """A layout with abs-send-time: each send writes its value into every packet (the
    Python path joins it in), and a pacer's slices of a frame, sent one after another,
    equal the Python path's slices; ``octets_of`` counts what the Python path counts."""
    rng = random.Random(profile)
    key = rng.randbytes(LIBSRTP[profile][1])
    layout = Layout(102, 4, "0", abs_send_time_id=3)
    reference_session = libsrtp(profile, key)
    track = core.Track(profile, key, SSRC)
    with routed(track) as (rx, tx):
        seq, ts = 0xFFF0, 90_000
        for count, cuts in ((1, [(0, None)]), (40, [(0, 7), (7, 7), (7, 30), (30, None)])):
            frame = prepared(count, layout, rng)
            native = frame.native_packets(layout, core)
            assert native.abs_send_time_at == 12 + rtpsend._AST_AT
            for first, end in cuts:
                sent_at = rng.randrange(1 << 24)
                expected = reference(
                    frame, layout, seq, ts, reference_session.protect, first, end, sent_at
                )
                packets = frame.packets(layout)[first:end]
                assert native.octets_of(first, end) == sum(
                    len(b) + 3 + len(a) for _, b, a in packets
                )
                assert track.send(native, seq, ts, first, end, sent_at) is None
                got = [rx.recv(2048) for _ in expected]
                assert got == expected, (count, first, end)
                seq = (seq + len(expected)) & 0xFFFF
            ts += 3000
        frame = prepared(9, layout, rng)
        expected = reference(frame, layout, seq, ts, reference_session.protect, 2, 6, 0xABCDEF)
        native = frame.native_packets(layout, core)
        assert track.protect_frame(native, seq, ts, 2, 6, 0xABCDEF) == expected
        plain = frame.native_packets(Layout(102, 4, "0"), core)
        with pytest.raises(ValueError, match="abs-send-time"):
            track.protect_frame(plain, seq, ts, abs_send_time=1)


@pytest.mark.parametrize("profile", core.PROFILES)
@pytest.mark.parametrize("abs_send_time_id", [3, None], ids=["video", "audio"])
def test_transport_cc_numbers_match_the_python_path(profile, abs_send_time_id, monkeypatch):
    """A transport-cc layout (with abs-send-time, as video; without, as audio): the
    native Track numbers each packet from the viewer's native ``SendLog`` and the
    real pure-Python path (``FanoutSender._send_python``) from ``twcc.SendLog``;
    both continue one counter across frames, slices and the 16-bit wrap, give the
    same bytes, and log the same sizes."""
    from types import SimpleNamespace

    from whipcast.gateway import twcc

    rng = random.Random(profile)
    key = rng.randbytes(LIBSRTP[profile][1])
    layout = Layout(102, 4, "0", abs_send_time_id, transport_cc_id=5)
    reference_session = libsrtp(profile, key)
    monkeypatch.setattr(aiortc_compat, "srtp_protect", lambda _: reference_session.protect)
    track = core.Track(profile, key, SSRC)
    native_log, python_log = core.SendLog(), twcc.SendLog()
    native_log.next_seq = python_log.next_seq = 65530
    track.log_to(native_log)
    with routed(track) as (rx, tx):
        addr = rx.getsockname()
        python = SimpleNamespace(
            ssrc=SSRC, transport=None, _twcc_element=twcc.stamp_element(5), _seq=0
        )
        seq, ts = 0xFFF0, 90_000
        for count, cuts in ((1, [(0, None)]), (12, [(0, 5), (5, None)])):
            frame = prepared(count, layout, rng)
            native = frame.native_packets(layout, core)
            assert native.transport_cc_at is not None
            for first, end in cuts:
                sent_at = rng.randrange(1 << 24) if abs_send_time_id else None
                stamp = struct.pack("!I", sent_at)[1:] if sent_at is not None else b""
                packets = frame.packets(layout)[first:end]
                rtpsend.FanoutSender._send_python(
                    python, (tx, addr), packets, seq, ts, stamp, python_log
                )
                expected = [rx.recv(2048) for _ in packets]
                assert track.send(native, seq, ts, first, end, sent_at) is None
                assert [rx.recv(2048) for _ in packets] == expected, (count, first, end)
                seq = (seq + len(packets)) & 0xFFFF
            ts += 3000
    assert native_log.next_seq == python_log.next_seq == (65530 + 13) & 0xFFFF
    numbers = [(65530 + i) & 0xFFFF for i in range(13)]
    sizes = [s for _, s in native_log.lookup(numbers)]
    assert sizes == [s for _, s in python_log.lookup(numbers)] and all(sizes)


def test_the_fallback_is_logged(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=rtpsend.__name__)
    assert rtpsend.native_core() is core
    assert rtpsend.native_core(disabled=True) is None
    monkeypatch.setattr(rtpsend, "_fanout", None)
    monkeypatch.setattr(
        rtpsend, "_NOT_BUILT", "the native core was not built (test)", raising=False
    )
    assert rtpsend.native_core() is None
    lines = [r.getMessage() for r in caplog.records]
    assert "egress send path: native fan-out core" in lines[0]
    assert "pure-Python fan-out (native core disabled by setting)" in lines[1]
    assert "pure-Python fan-out (the native core was not built (test))" in lines[2]
    assert caplog.records[2].levelno == logging.WARNING


@pytest.fixture(scope="module", params=["native", "python"])
async def either_server(request, kafka):
    """A node sending with the native core, then one with the pure-Python path."""
    server = await start_server(kafka, no_native_fanout=request.param == "python")
    yield request.param, server
    await server.runner.cleanup()


def sessions(server, stream):
    return list(server.node.egress.fanouts[stream].viewers)


async def test_viewers_decode_through_either_path(either_server, stream_name):
    path, server = either_server
    publisher = await publish(server.url, stream_name)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewers = [await play(server.url, stream_name) for _ in range(2)]
        for viewer in viewers:
            await viewer.wait_frames(45)
            counters = [c for _, c, _ in viewer.frames]
            assert counters == list(range(counters[0], counters[0] + len(counters)))
            assert viewer.audio_frames > 0
        fanout = server.node.egress.fanouts[stream_name]
        assert bool(fanout.batches) == (path == "native")
        for session in sessions(server, stream_name):
            for sender in session.senders.values():
                assert (sender._track is not None) == (path == "native"), path
                # Natively, most frames went out in the stream's batch calls.
                assert (sender.batch_frames > 10) == (path == "native"), path
            assert session.status()["frames_sent"] >= 45
            if path == "native":
                # The key the core was given is aiortc's: same bytes for a fresh SSRC.
                dtls = session.senders[Track.VIDEO].transport
                profile, key = aiortc_compat.srtp_tx_key(dtls)
                packet = bytes([0x80, 96]) + FIELDS.pack(7, 1, 0x5EED0001) + os.urandom(64)
                expected = aiortc_compat.srtp_protect(dtls)(packet)
                assert core.Track(profile, key, 0x5EED0001).protect(packet) == expected
        for viewer in viewers:
            await viewer.close()
    finally:
        await publisher.close()


@pytest.mark.parametrize("rtx", [True, False], ids=["rtx", "no-rtx"])
async def test_nacks_are_answered_through_either_path(either_server, stream_name, rtx):
    """NACKs are answered: on the RTX SSRC (libsrtp's), or on the media SSRC (the
    native track's, where native; byte for byte libsrtp's, see the tests above).

    Only with RTX can the test viewer use the resends: its lossy link drops packets
    after SRTP, so a resend on the media SSRC is a replay to its libsrtp."""
    path, server = either_server
    publisher = await publish(server.url, stream_name, audio=False)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewer = await play(server.url, stream_name, loss=0.1, rtx=rtx)
        if rtx:
            await viewer.wait_frames(5, timeout=15)
        else:
            # Without RTX the viewer decodes only a keyframe that arrives whole (one in
            # several at 10 % loss): wait for its RTP instead of its pictures.
            assert await until(lambda: viewer.rtp_received - viewer.rtp_dropped >= 30, 15)
        sender = sessions(server, stream_name)[0].senders[Track.VIDEO]
        assert (sender._track is not None) == (path == "native")
        assert (sender._rtx_pt is not None) == rtx
        await until(lambda: sender.retransmitted > 5, 15)
        assert sender.retransmitted > 5, sender.retransmitted
        if path == "native":  # resends of frames the batch sent: from the native history
            assert sender.batch_frames > 0
        if rtx:  # resends repair the loss: frames keep coming in order
            before = len(viewer.frames)
            await viewer.wait_frames(before + 30, timeout=15)
            counters = [c for _, c, _ in viewer.frames[before:]]
            assert counters == list(range(counters[0], counters[0] + len(counters)))
        await viewer.close()
    finally:
        await publisher.close()


def plain_reference(frame, layout, seq, ts, ssrc, sent_at=None) -> list[bytes]:
    """The pure-Python path's packets before SRTP, for ``ssrc``."""
    stamp = struct.pack("!I", sent_at)[1:] if sent_at is not None else b""
    out = []
    for head, before, after in frame.packets(layout):
        out.append(head + FIELDS.pack(seq, ts, ssrc) + before + stamp + after)
        seq = (seq + 1) & 0xFFFF
    return out


@pytest.mark.parametrize("profile", core.PROFILES)
def test_send_batch_matches_the_python_path(profile):
    """One ``send_batch`` call per frame and layout sends every track what the Python
    path sends it (its own key, SSRC, sequence numbers, abs-send-time value), counts
    and keeps it for NACKs, and passes by the tracks it must leave to Python (no
    allowance, a frame too large for their pacer, no route) without touching them."""
    rng = random.Random(profile)
    layouts = [Layout(102, 4, "0"), Layout(102, 4, "0", abs_send_time_id=3)]
    sockets, tracks, sessions = [], [], []
    try:
        for n in range(4):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets += [rx, tx]
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            rx.bind(("127.0.0.1", 0))
            rx.settimeout(5)
            tx.setblocking(False)
            key = rng.randbytes(LIBSRTP[profile][1])
            track = core.Track(profile, key, SSRC + n)
            track.route(tx.fileno(), "127.0.0.1", rx.getsockname()[1])
            track.seq = 0xFFF0 + 5 * n  # some cross the 0xFFFF -> 0 rollover
            track.allowance = 1 << 40
            tracks.append(track)
            sessions.append((libsrtp(profile, key), rx))
        tracks[3].ts_offset, tracks[3].arrival_shift_us = 1000, -7
        ts, arrival = 0xFFFFFF00, 10**15
        for count in (3, 40, 1):
            frame = prepared(count, layouts[0], rng)
            for layout, group in ((layouts[0], [0, 1]), (layouts[1], [2, 3])):
                sent_at = 0xABCDEF if layout.abs_send_time_id else None
                expected = {
                    n: plain_reference(
                        frame,
                        layout,
                        tracks[n].seq,
                        (ts + 1000 * (n == 3)) & 0xFFFFFFFF,
                        SSRC + n,
                        sent_at,
                    )
                    for n in group
                }
                before = {n: (tracks[n].packets_sent, tracks[n].octets_sent) for n in group}
                packets = frame.native_packets(layout, core)
                passed, unsent = core.send_batch(
                    [tracks[n] for n in group], packets, ts, sent_at, arrival
                )
                assert (passed, unsent) == ([], [])
                for n in group:
                    session, rx = sessions[n]
                    got = [rx.recv(2048) for _ in range(count)]
                    assert got == [session.protect(p) for p in expected[n]], (n, count)
                    track = tracks[n]
                    assert track.packets_sent == before[n][0] + count
                    assert track.octets_sent == before[n][1] + packets.octets
                    assert track.seq == (FIELDS.unpack(expected[n][-1][2:12])[0] + 1) & 0xFFFF
                    assert track.last_ts == (ts + 1000 * (n == 3)) & 0xFFFFFFFF
                    assert track.last_arrival_us == arrival - 7 * (n == 3)
                    # The NACK history gives back the very packet (abs-send-time zeroed).
                    plain = expected[n][-1]
                    seq = FIELDS.unpack(plain[2:12])[0]
                    _, head, rest, found_ts, _ = track.find(seq)
                    if sent_at is not None:
                        at = rtpsend._AST_AT
                        rest = rest[:at] + plain[12 + at : 12 + at + 3] + rest[at + 3 :]
                    assert head + plain[2:12] + rest == plain
                    assert found_ts == track.last_ts
            ts, arrival = (ts + 3000) & 0xFFFFFFFF, arrival + 33_333
        assert [t.batch_frames for t in tracks] == [3, 3, 3, 3]
        # Passed by, untouched: no allowance; a frame above max_packets; no route.
        tracks[0].allowance = 0
        tracks[1].max_packets = 2
        tracks[2].unroute()
        state = [(t.seq, t.packets_sent, t.batch_frames) for t in tracks]
        frame = prepared(3, layouts[0], rng)
        passed, unsent = core.send_batch(tracks[:3], frame.native_packets(layouts[0], core), ts)
        assert (passed, unsent) == ([0, 1, 2], [])
        assert [(t.seq, t.packets_sent, t.batch_frames) for t in tracks] == state
        tracks[1].max_packets = 3
        allowance, packets = tracks[1].allowance, frame.native_packets(layouts[0], core)
        assert core.send_batch([tracks[1]], packets, ts) == ([], [])
        assert tracks[1].allowance == allowance - packets.octets
        with pytest.raises(ValueError, match="abs-send-time"):
            core.send_batch(tracks[:1], frame.native_packets(layouts[0], core), ts, 1)
    finally:
        for s in sockets:
            s.close()


def test_budget_counts_native_sends_and_takes_allowance_back():
    """A viewer's budget reads what its native tracks sent (no Python per frame), and a
    lower rate takes a batch's allowance back at once."""
    budget = rtpsend.SendBudget(rate=1000.0, burst=1000.0)
    track = core.Track("SRTP_AEAD_AES_128_GCM", bytes(28), SSRC)
    budget.attach(track)
    layout = Layout(96, None, None)
    frame = PreparedFrame(None, [bytes(700), bytes(600)], True)  # type: ignore[arg-type]
    track.protect_frame(frame.native_packets(layout, core), 1, 0)
    assert budget.spent == 1300
    assert not budget.available(budget._at)  # 1000 - 1300 < 0: in debt
    track.allowance = 5000
    budget.rate = 2000.0
    assert track.allowance == 5000, "a higher rate leaves it"
    budget.rate = 500.0
    assert track.allowance == 0


async def test_a_viewer_leaves_the_batch_when_it_needs_python(either_server, stream_name):
    """A viewer the batch sends to leaves it as soon as its frames need Python (here a
    skip to the next keyframe, as after a backlog, and a GOP burst for a PLI), gets
    them through ``deliver``, and joins again once it takes frames plainly."""
    path, server = either_server
    if path == "python":
        pytest.skip("batches are the native core's")
    publisher = await publish(server.url, stream_name)

    async def joined(batch, session) -> bool:
        for _ in range(200):
            if session in batch:
                return True
            await asyncio.sleep(0.05)
        return False

    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewer = await play(server.url, stream_name)
        await viewer.wait_frames(15)
        session = sessions(server, stream_name)[0]
        fanout = server.node.egress.fanouts[stream_name]
        video, audio = fanout.batches[(Track.VIDEO, 0)], fanout.batches[(Track.AUDIO, 0)]
        assert await joined(video, session) and await joined(audio, session)
        session._drop_to_keyframe()
        assert session not in video and session in audio, "audio keeps flowing in its batch"
        batch_frames = session.senders[Track.VIDEO].batch_frames
        assert await joined(video, session), "back after the next keyframe"
        session._keyframe_answered = float("-inf")
        session.keyframe_requested("PLI")  # answered with the cached GOP
        await asyncio.sleep(0)
        assert session not in video
        assert await joined(video, session)
        before = len(viewer.frames)
        await viewer.wait_frames(before + 30, timeout=15)
        assert session.senders[Track.VIDEO].batch_frames > batch_frames
        assert session.stats.cached_keyframes == 1
        await viewer.close()
    finally:
        await publisher.close()


async def test_sender_reports_count_what_was_sent(either_server, stream_name):
    """Sender reports carry each track's packet and octet counts, batch sends included
    (the viewer's aiortc reads them into its remote-outbound-rtp stats)."""
    path, server = either_server
    publisher = await publish(server.url, stream_name)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewer = await play(server.url, stream_name)
        await viewer.wait_frames(10)
        session = sessions(server, stream_name)[0]
        reported = {}
        for _ in range(100):  # the first report of each kind comes within 1.5 s
            report = await viewer.pc.getStats()
            reported = {s.kind: s for s in report.values() if s.type == "remote-outbound-rtp"}
            if len(reported) == 2:
                break
            await asyncio.sleep(0.1)
        assert set(reported) == {"audio", "video"}
        for kind, track in (("video", Track.VIDEO), ("audio", Track.AUDIO)):
            sender = session.senders[track]
            assert reported[kind].ssrc == sender.ssrc
            assert 0 < reported[kind].packetsSent <= sender.packets_sent
            assert 0 < reported[kind].bytesSent <= sender.octets_sent
            if path == "native":
                assert sender.batch_frames > 0, kind
        if path == "native":  # audio joins its batch after one packet: counted natively
            assert reported["audio"].packetsSent > session.senders[Track.AUDIO]._py_packets
        await viewer.close()
    finally:
        await publisher.close()


def test_runs_of_equal_packets_arrive_as_the_same_datagrams():
    """Runs of packets of one length (a frame's fragments: aiortc's FU-A splits differ
    by one byte) go out as UDP GSO messages where the kernel takes them; the viewer
    still receives each packet as its own datagram, byte for byte the Python path's."""
    profile = "SRTP_AEAD_AES_128_GCM"
    rng = random.Random(7)
    key = rng.randbytes(LIBSRTP[profile][1])
    layout = Layout(102, 4, "0")
    reference_session = libsrtp(profile, key)
    track = core.Track(profile, key, SSRC)
    with routed(track) as (rx, tx):
        seq, ts = 0xFFF0, 0
        shapes = ([1001] * 3 + [1000] * 4, [1200] * 70 + [300], [500, 500, 900, 900, 100], [7])
        for sizes in shapes:  # 70 + 1: more than one GSO message takes
            frame = PreparedFrame(None, [rng.randbytes(n) for n in sizes], True)  # type: ignore[arg-type]
            expected = reference(frame, layout, seq, ts, reference_session.protect)
            assert track.send(frame.native_packets(layout, core), seq, ts) is None
            assert [rx.recv(4096) for _ in sizes] == expected, sizes
            seq, ts = (seq + len(sizes)) & 0xFFFF, ts + 3000


def libsrtp_receiver(profile: str, key: bytes) -> Session:
    """A receiving libsrtp session for what ``key`` protects (a viewer's side)."""
    return Session(
        Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=LIBSRTP[profile][0])
    )


def sent_frame(track, rng: random.Random, seq: int = 100, ts: int = 5000) -> None:
    """Count one frame as sent by ``track`` (not sent anywhere: protected only)."""
    frame = prepared(3, Layout(96, None, None), rng)
    track.protect_frame(frame.native_packets(Layout(96, None, None), core), seq, ts)


@pytest.mark.parametrize("profile", core.PROFILES)
def test_srtcp_matches_libsrtp(profile):
    """Reports and a BYE SRTCP-protected by a track are libsrtp's bytes, index after
    index (past 255: every byte of the index used), and a viewer's libsrtp takes them;
    at the end of the 31-bit index space the track refuses, as libsrtp does."""
    rng = random.Random(profile)
    key = rng.randbytes(LIBSRTP[profile][1])
    reference_session, track = libsrtp(profile, key), core.Track(profile, key, SSRC)
    receiver = libsrtp_receiver(profile, key)
    track.cname = "{6c0ffee0-0000-4000-8000-000000000001}"
    sent_frame(track, rng)
    for i in range(300):
        plain = track.report(rng.getrandbits(64), 1_700_000_000_000_000 + i * 1000)
        if i % 50 == 49:
            plain = bytes(RtcpByePacket(sources=[SSRC]))
        protected = track.protect_rtcp(plain)
        assert protected == reference_session.protect_rtcp(plain), i
        assert receiver.unprotect_rtcp(protected) == plain, i
    assert track.rtcp_index == 300
    track.rtcp_index = 0x7FFFFFFD
    plain = track.report(1, 1)
    for index in (0x7FFFFFFE, 0x7FFFFFFF):
        assert receiver.unprotect_rtcp(track.protect_rtcp(plain)) == plain
        assert track.rtcp_index == index
    with pytest.raises(ValueError, match="SRTCP index spent"):
        track.protect_rtcp(plain)
    with pytest.raises(ValueError, match="another SSRC"):
        track.protect_rtcp(bytes(RtcpByePacket(sources=[SSRC + 1])))


@pytest.mark.parametrize("cname", ["", "a", "ab", "abc", "abcd", "{8f6ad3a1-2c1e-4b8e-9d2a}"])
def test_reports_are_aiortcs_bytes(cname):
    """The native report, the Python path's and aiortc's objects agree byte for byte;
    the RTP time is the last frame's, moved on by the wall-clock time since it arrived."""
    from aiortc.rtp import RtcpSdesPacket, RtcpSenderInfo, RtcpSourceInfo, RtcpSrPacket

    rng = random.Random(cname)
    track = core.Track("SRTP_AEAD_AES_128_GCM", rng.randbytes(28), SSRC)
    track.cname, track.clock_rate = cname, 48000
    sent_frame(track, rng, ts=0xFFFFFF00)  # the RTP time wraps below
    track.last_arrival_us = 1_700_000_000_000_000
    now_us = track.last_arrival_us + 250_000
    ntp = rtpsend.ntp_time(now_us)
    rtp_ts = (0xFFFFFF00 + 12000) & 0xFFFFFFFF  # 0.25 s at 48 kHz
    counts = (track.packets_sent, track.octets_sent)
    assert counts[0] == 3 and counts[1] > 0
    aiortc_bytes = bytes(
        RtcpSrPacket(ssrc=SSRC, sender_info=RtcpSenderInfo(ntp, rtp_ts, *counts))
    ) + bytes(RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=SSRC, items=[(1, cname.encode())])]))
    assert rtpsend.sender_report(SSRC, ntp, rtp_ts, *counts, cname.encode()) == aiortc_bytes
    assert track.report(ntp, now_us) == aiortc_bytes
    with pytest.raises(ValueError, match="255"):
        track.cname = "x" * 256


def test_ntp_time_is_aiortcs():
    from datetime import UTC, datetime

    from aiortc import clock

    now_us = 1_764_500_000_123_456
    moment = datetime.fromtimestamp(now_us // 1_000_000, UTC).replace(
        microsecond=now_us % 1_000_000
    )
    assert rtpsend.ntp_time(now_us) == clock.datetime_to_ntp(moment)


def test_send_reports_sends_what_is_due():
    """``send_reports`` sends a routed track's report when it is due, on its route,
    SRTCP-protected, and schedules the next at 0.5-1.5 intervals; a track that sent no
    frame yet or has no route sends none."""
    profile = "SRTP_AES128_CM_SHA1_80"
    rng = random.Random(11)
    key = rng.randbytes(LIBSRTP[profile][1])
    receiver = libsrtp_receiver(profile, key)
    track, silent = core.Track(profile, key, SSRC), core.Track(profile, key, SSRC + 1)
    track.cname, track.report_interval = "cn", 5.0
    sent_frame(track, rng)
    time_us = track.last_arrival_us = time.time_ns() // 1000
    with routed(track) as (rx, _), routed(silent):
        now = time.monotonic()
        assert core.send_reports([track, silent]) == (1, [])
        plain = receiver.unprotect_rtcp(rx.recv(2048))
        ssrc, ntp, rtp_ts, packets, octets = struct.unpack_from("!IQIII", plain, 4)
        assert plain[1] == 200 and ssrc == SSRC and packets == 3 and octets == track.octets_sent
        assert abs((ntp >> 32) - (time_us // 1_000_000 + rtpsend.NTP_UNIX_OFFSET)) <= 5
        assert b"\x01\x02cn" in plain  # the SDES CNAME
        assert now + 2.5 <= track.next_report <= time.monotonic() + 7.5
        assert silent.next_report > now and silent.reports_sent == 0
        assert core.send_reports([track, silent]) == (0, [])  # nothing due
        track.next_report = 0.0
        track.unroute()
        assert core.send_reports([silent, track]) == (0, [1]) and track.reports_sent == 1
        rx.settimeout(0.2)
        with pytest.raises(TimeoutError):
            rx.recv(2048)


async def test_the_report_timer_keeps_live_tracks_only():
    """``SenderReports``: a track added reports at once, then from the timer; one
    whose route is gone leaves, and with no tracks left the timer stops."""
    profile = "SRTP_AEAD_AES_256_GCM"
    rng = random.Random(12)
    key = rng.randbytes(LIBSRTP[profile][1])
    reports = rtpsend.SenderReports(core)
    tracks = [core.Track(profile, key, SSRC + i) for i in range(2)]
    with routed(tracks[0]) as (rx, _), routed(tracks[1]):
        for track in tracks:
            sent_frame(track, rng)
            track.last_arrival_us, track.report_interval = time.time_ns() // 1000, 0.2
            reports.add(track)
        assert reports.sent == 2 and len(reports) == 2
        receiver = libsrtp_receiver(profile, key)
        assert receiver.unprotect_rtcp(rx.recv(2048))[1] == 200
        tracks[1].unroute()
        assert await until(lambda: len(reports) == 1 and reports.sent >= 3, 5)
        assert receiver.unprotect_rtcp(rx.recv(2048))[1] == 200  # from the timer
        reports.remove(tracks[0])
        assert await until(lambda: reports._task is None, 5)
        await reports.close()


async def test_a_viewer_gets_sender_reports_and_the_bye_through_either_path(
    either_server, stream_name
):
    """A real viewer's aiortc takes every track's reports (SRTCP checked there, replay
    window included) with NTP time near now, RTP time moving with it, and the packet
    and octet counts sent so far; natively the node's one timer sends them. A BYE
    after them still passes the viewer's replay check: natively it is protected by
    the track that owns the SSRC's SRTCP index, not by a second context."""
    path, server = either_server
    publisher = await publish(server.url, stream_name)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewer = await play(server.url, stream_name)
        got: list = []
        for transceiver in viewer.pc.getTransceivers():
            receiver = transceiver.receiver
            handle = receiver._handle_rtcp_packet  # what the viewer's aiortc routes SRTCP to

            async def capture(packet, handle=handle) -> None:
                got.append((time.time(), packet))
                await handle(packet)

            receiver._handle_rtcp_packet = capture
        await viewer.wait_frames(10)
        session = sessions(server, stream_name)[0]
        video, audio = session.senders[Track.VIDEO], session.senders[Track.AUDIO]

        def reports(ssrc: int) -> list:
            return [(t, p) for t, p in got if isinstance(p, RtcpSrPacket) and p.ssrc == ssrc]

        assert await until(lambda: len(reports(video.ssrc)) >= 3 and reports(audio.ssrc), 15)
        for sender in (video, audio):
            seen = reports(sender.ssrc)
            for received_at, packet in seen:
                info = packet.sender_info
                ntp_s = (info.ntp_timestamp >> 32) - rtpsend.NTP_UNIX_OFFSET
                assert abs(ntp_s - received_at) < 3, "NTP time is wall-clock time"
                assert 0 < info.packet_count <= sender.packets_sent
                assert 0 < info.octet_count <= sender.octets_sent
            for (_, a), (_, b) in zip(seen, seen[1:], strict=False):
                a, b = a.sender_info, b.sender_info
                assert b.packet_count >= a.packet_count and b.ntp_timestamp > a.ntp_timestamp
                wall = (b.ntp_timestamp - a.ntp_timestamp) / 2**32
                rtp = ((b.rtp_timestamp - a.rtp_timestamp) & 0xFFFFFFFF) / sender.clock_rate
                # RTP time moves with wall-clock time (loosely: a loaded machine's
                # publisher may fall behind its frame rate, so frames arrive late).
                assert abs(rtp - wall) < 0.5 + wall / 2, (rtp, wall)
        reports_sent = server.node.egress.reports.sent if path == "native" else 0
        if path == "native":
            assert reports_sent >= 4
            for sender in (video, audio):
                assert sender._rtcp_task.done(), "handed over to the node's timer"
                assert sender._track.reports_sent >= 1
                assert sender._track.clock_rate == sender.clock_rate
        else:
            assert server.node.egress.reports is None
        await video._send_rtcp(bytes(RtcpByePacket(sources=[video.ssrc])))
        assert await until(lambda: any(isinstance(p, RtcpByePacket) for _, p in got), 5)
        await viewer.close()
    finally:
        await publisher.close()
