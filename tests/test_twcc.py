"""transport-cc (gateway/twcc.py): the feedback parser against hand-built messages
(every chunk kind, wrap-around, negative deltas, malformed input), the send logs of
both send paths, and the delay-based estimate on feedback from a simulated link."""

from __future__ import annotations

import random
import struct
import time

import pytest
from aiortc.rtp import RtcpPacket
from whipcast.gateway import aiortc_compat, rtpsend, twcc
from whipcast.gateway.bandwidth import BandwidthEstimate
from whipcast.gateway.layers import LayerSelector
from whipcast.gateway.rtpsend import SendBudget

LOGS = [twcc.SendLog] + ([rtpsend._fanout.SendLog] if rtpsend._fanout is not None else [])


def fci(base: int, count: int, reference: int, fb_count: int, chunks: list[int], deltas: bytes):
    body = struct.pack("!HHI", base, count, ((reference & 0xFFFFFF) << 8) | fb_count)
    body += b"".join(struct.pack("!H", c) for c in chunks) + deltas
    return body + b"\x00" * (-len(body) % 4)


def two_bit_vector(symbols: list[int]) -> int:
    chunk = 0xC000
    for i, s in enumerate(symbols):
        chunk |= s << (12 - 2 * i)
    return chunk


def test_parse_two_bit_vector_then_run_length_across_wrap():
    # 10 packets from 65534: received, received, lost, received with a negative
    # (large) delta, received, lost, lost, then a run of 3 received with small deltas.
    chunks = [two_bit_vector([1, 1, 0, 2, 1, 0, 0]), (1 << 13) | 3]
    deltas = bytes([4, 8]) + struct.pack("!h", -12) + bytes([1, 2, 3, 4])
    feedback = twcc.parse_feedback(fci(65534, 10, 1000, 7, chunks, deltas))
    start = 1000 * 64_000
    arrivals = [
        start + 1000,
        start + 3000,
        start,
        start + 250,
        start + 750,
        start + 1500,
        start + 2500,
    ]
    assert feedback.base_seq == 65534 and feedback.count == 10 and feedback.feedback_count == 7
    assert feedback.received == list(zip([65534, 65535, 1, 2, 5, 6, 7], arrivals, strict=True))
    assert feedback.lost == 3


def test_parse_one_bit_vector_negative_reference():
    # 14 one-bit symbols: every other packet received; a count of 13 ignores the last.
    chunk = 0x8000 | int("10101010101010", 2)
    feedback = twcc.parse_feedback(fci(100, 13, -2, 0, [chunk], bytes([1] * 7)))
    assert [s for s, _ in feedback.received] == [100, 102, 104, 106, 108, 110, 112]
    assert feedback.received[0][1] == -2 * 64_000 + 250
    assert feedback.lost == 6


def test_parse_long_run_of_losses():
    feedback = twcc.parse_feedback(fci(5, 300, 0, 1, [(0 << 13) | 299, (1 << 13) | 1], bytes([4])))
    assert feedback.received == [(304, 1000)] and feedback.lost == 299


def test_parse_feedback_chromium_sent():
    """Feedback Chromium 156 sent a viewer of this gateway (captured from
    ``tests/test_twcc_browser.py``): runs of small deltas, and a two-bit status
    vector whose first symbol is a large delta (64 ms, 256 quarter-ms: over a byte)."""
    body = bytes.fromhex(
        "03780019027ac222200ce55520063b00000000000000000000000100000000000000000000000000"
    )
    feedback = twcc.parse_feedback(body)
    start = 0x027AC2 * 64_000
    assert (feedback.base_seq, feedback.count, feedback.feedback_count) == (888, 25, 34)
    assert feedback.received == [
        (888 + i, start + 59 * 250 + (64_000 if i >= 12 else 0)) for i in range(25)
    ]
    feedback = twcc.parse_feedback(bytes.fromhex("006300010277c8012001b0"))
    assert feedback.received == [(99, 0x0277C8 * 64_000 + 0xB0 * 250)]
    feedback = twcc.parse_feedback(
        bytes.fromhex("006400120277c90220125a0100000000005700000022002b00000000")
    )
    deltas = [0x5A, 1, 0, 0, 0, 0, 0, 0x57, 0, 0, 0, 0x22, 0, 0x2B, 0, 0, 0, 0]
    arrivals = [0x0277C9 * 64_000 + 250 * sum(deltas[: i + 1]) for i in range(18)]
    assert feedback.received == list(zip(range(100, 118), arrivals, strict=True))


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x01",  # shorter than the header
        fci(0, 3, 0, 0, [], b"")[:8],  # no chunk for 3 statuses
        fci(0, 2, 0, 0, [(3 << 13) | 2], b""),  # reserved symbol in a run
        fci(0, 2, 0, 0, [two_bit_vector([3, 1])], b"\x01"),  # reserved symbol in a vector
        fci(0, 2, 0, 0, [(2 << 13) | 2], b"\x00\x01")[:12],  # deltas cut short
    ],
)
def test_malformed_feedback_is_a_value_error(body):
    with pytest.raises(ValueError):
        twcc.parse_feedback(body)
    for make in LOGS:  # both send logs' summaries refuse it for the same reason
        with pytest.raises(ValueError, match="transport-cc feedback"):
            make().summarize(body)


def test_aiortc_keeps_the_feedback_instead_of_reading_a_nack():
    """aiortc 1.16 reads fmt 15's FCI as NACK pairs; aiortc_compat keeps the bytes,
    and it still routes the packet by its media SSRC."""
    body = fci(7, 1, 3, 9, [(1 << 13) | 1], b"\x04")
    packet = struct.pack("!BBH", 0x80 | 15, 205, (8 + len(body)) // 4) + struct.pack("!LL", 1, 2)
    (parsed,) = RtcpPacket.parse(packet + body)
    assert parsed.media_ssrc == 2 and parsed.lost == []
    assert aiortc_compat.transport_feedback_fci(parsed) == body
    assert twcc.parse_feedback(body).received == [(7, 3 * 64_000 + 1000)]


@pytest.mark.parametrize("make", LOGS, ids=lambda m: m.__module__)
def test_send_log_numbers_wrap_and_forget(make):
    log = make()
    log.next_seq = 65534
    assert [log.take(100 + i, 10 + i) for i in range(3)] == [65534, 65535, 0]
    assert log.lookup([65534, 0, 1]) == [(10, 100), (12, 102), None]
    for _ in range(twcc.LOG_SIZE):
        log.take(1, 20)
    assert log.lookup([65534]) == [None]


def link_feedback(log, sent: list[tuple[int, int]], bitrate: float, base_us: int):
    """What a viewer behind a ``bitrate`` bottleneck (no queue limit) reports for
    packets (transport seq, size) all sent at once: arrivals spaced by their size."""
    received, at = [], base_us
    for seq, size in sent:
        at += int(size * 8 / bitrate * 1e6)
        received.append((seq, at))
    return twcc.Feedback(sent[0][0], len(sent), 0, received)


@pytest.mark.parametrize("make", LOGS, ids=lambda m: m.__module__)
def test_delay_based_estimate_falls_to_the_link_and_random_loss_cuts_nothing(make):
    """Sending 2 Mbps into a 700 kbps bottleneck: the delay detector sees the queue
    grow and the estimate falls to about what got through. Then at 500 kbps on a
    link with 3 % random loss: no cut (loss alone below 10 % is no congestion)."""
    budget = SendBudget(250_000, 250_000)
    estimate = BandwidthEstimate(budget, floor=100_000, ceiling=5_000_000, initial=2_000_000)
    estimate._resumed_at = -10.0  # steady: video has flowed for a while
    log = make()
    now = 100.0
    link_free_us = 0
    for _ in range(60):  # 3 s of 20 frames/s of 12.5 kB (2 Mbps) into a 700 kbps link
        now += 0.05
        sent_us = int(now * 1e6)
        packets = [(log.take(1250, sent_us), 1250) for _ in range(10)]
        budget.spend(12_500)
        start = max(sent_us, link_free_us)
        feedback = link_feedback(log, packets, 700_000, start)
        link_free_us = feedback.received[-1][1]
        estimate.on_transport_feedback(twcc.summarize(feedback, log), now)
    assert estimate.stats.delay_cuts >= 1
    assert 300_000 < estimate.bitrate < 800_000, estimate.bitrate

    estimate = BandwidthEstimate(budget, floor=100_000, ceiling=5_000_000, initial=600_000)
    estimate._resumed_at = -10.0
    for i in range(60):  # 3 s at 500 kbps on a fast link, 3 % of packets lost
        now += 0.05
        sent_us = int(now * 1e6)
        packets = [(log.take(625, sent_us), 625) for _ in range(5)]
        budget.spend(3125)
        feedback = link_feedback(log, packets, 10_000_000, sent_us + 20_000)
        if i % 7 == 0:
            feedback = twcc.Feedback(feedback.base_seq, feedback.count, 0, feedback.received[1:])
        estimate.on_transport_feedback(twcc.summarize(feedback, log), now)
    assert estimate.stats.congestion_cuts == 0 and estimate.bitrate >= 600_000


def test_a_report_of_losses_before_a_probe_does_not_fail_it():
    """REMB/RR viewers: a receiver counts the lost tail of the last burst before a
    pause only in the first report after newer packets arrive, i.e. after the next
    probe starts; that report must not fail the probe, a later one may."""
    budget = SendBudget(100_000, 100_000)
    estimate = BandwidthEstimate(budget, floor=100_000, ceiling=5_000_000, initial=700_000)
    now = 100.0
    estimate.on_receiver_report(0, now, highest_seq=70_900)  # extended: cycles + seq
    estimate.paused(True, now)
    # the burst before the pause went up to 70_950; its last 50 packets were lost
    assert estimate.probe(1_500_000, now + 3, next_seq=70_951 & 0xFFFF)
    probed = estimate.bitrate
    estimate.on_receiver_report(128, now + 3.5, highest_seq=71_010)  # began at 70_901
    assert estimate.probing(now + 3.5) and estimate.bitrate == probed
    estimate.on_receiver_report(128, now + 4.5, highest_seq=71_040)  # the probe's own
    assert not estimate.probing(now + 4.5) and estimate.bitrate == 700_000


def encode(base: int, statuses: list[int], deltas: list[int], rng: random.Random) -> bytes:
    """A feedback FCI for ``statuses`` (0 lost, 1 small delta, 2 large) from ``base``,
    its chunks of every kind chosen at random (runs, one- and two-bit vectors)."""
    chunks, i = [], 0
    while i < len(statuses):
        kind, rest = rng.randrange(3), statuses[i:]
        if kind == 0:  # run length
            n = 1
            while n < len(rest) and rest[n] == rest[0] and n < rng.choice((3, 200, 8191)):
                n += 1
            chunks.append((rest[0] << 13) | n)
        elif kind == 1 and all(s < 2 for s in rest[:14]):
            n = min(14, len(rest))
            chunks.append(0x8000 | sum(s << (13 - k) for k, s in enumerate(rest[:n])))
        else:
            n = min(7, len(rest))
            chunks.append(two_bit_vector(rest[:n]))
        i += n
    body = b"".join(
        bytes([d]) if s == 1 else struct.pack("!h", d)
        for s, d in zip([s for s in statuses if s], deltas, strict=True)
    )
    return fci(base, len(statuses), rng.randrange(-(1 << 23), 1 << 23), 0, chunks, body)


def random_feedback(rng: random.Random, next_seq: int) -> bytes:
    """A well-formed feedback near the log's newest numbers (some forgotten, some not
    yet sent), or such a message cut short, with bytes flipped, or garbage."""
    count = rng.choice((1, 2, 7, 14, 15, 40, 300))
    statuses = [rng.choice((0, 1, 1, 1, 2)) for _ in range(count)]
    deltas = [rng.randrange(256) if s == 1 else rng.randrange(-32768, 32768) for s in statuses if s]
    base = (next_seq - rng.choice((count, 50, 9000, 0))) & 0xFFFF
    body = encode(base, statuses, deltas, rng)
    damage = rng.randrange(5)
    if damage == 1:
        body = body[: rng.randrange(len(body))]
    elif damage == 2:
        body = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        body = bytes(body)
    elif damage == 3:
        body = rng.randbytes(rng.randrange(40))
    return body


@pytest.mark.skipif(rtpsend._fanout is None, reason="native core not built")
def test_native_summary_matches_python_value_for_value():
    """The native ``SendLog.summarize`` against the pure-Python parser and log, fed the
    same sends (across the 16-bit wrap, long enough to forget the oldest) and the same
    feedback: every well-formed message of every chunk kind, the hand-built and
    Chromium ones above, and damaged ones, where both must refuse with the same reason
    (never a crash)."""
    rng = random.Random(14)
    native, python = rtpsend._fanout.SendLog(), twcc.SendLog()
    native.next_seq = python.next_seq = 60_000
    bodies = [
        fci(65534, 10, 1000, 7, [two_bit_vector([1, 1, 0, 2, 1, 0, 0]), (1 << 13) | 3],
            bytes([4, 8]) + struct.pack("!h", -12) + bytes([1, 2, 3, 4])),
        fci(100, 13, -2, 0, [0x8000 | int("10101010101010", 2)], bytes([1] * 7)),
        fci(5, 300, 0, 1, [(0 << 13) | 299, (1 << 13) | 1], bytes([4])),
        bytes.fromhex("03780019027ac222200ce55520063b00000000000000000000000100000000000000"),
        fci(0, 2, 0, 0, [two_bit_vector([1, 0, 3])], b"\x01"),  # reserved, but past count
        fci(0, 0, 0, 0, [], b""),
        fci(0, 5, 0, 0, [0, (1 << 13) | 5], bytes(5)),  # an empty run first
        fci(9, 65535, 0, 0, [(1 << 13) | 8191] * 8 + [(2 << 13) | 7], bytes(65535)),
        fci(9, 65535, 0, 0, [(1 << 13) | 8191] * 8 + [(1 << 13) | 7], bytes(65535)),  # the most
    ]  # fmt: skip
    outcomes = {"summary": 0, "refused": 0}
    for round_ in range(40):
        for _ in range(rng.choice((5, 50, 400))):
            size, at = rng.randrange(60, 1300), rng.randrange(1 << 40)
            assert native.take(size, at) == python.take(size, at)
        messages = [random_feedback(rng, python.next_seq) for _ in range(60)]
        for body in (bodies if round_ % 10 == 0 else []) + messages:
            try:
                expected = tuple(python.summarize(body))
            except ValueError as exc:
                with pytest.raises(ValueError) as refused:
                    native.summarize(body)
                assert str(refused.value) == str(exc), body.hex()
                outcomes["refused"] += 1
            else:
                assert native.summarize(body) == expected, body.hex()
                outcomes["summary"] += 1
    assert outcomes["summary"] > 800 and outcomes["refused"] > 400, outcomes


TOP = [1_600_000, 430_000, 130_000]  # a simulcast stream's layers (bits/s)


def watch_top_layer(report, seconds: list[tuple[float, float | None]]):
    """An unconstrained viewer of ``TOP`` (sent the top layer's 1.6 Mbps) for one
    second per entry of ``seconds``: its layer asked every 0.25 s as the fan-out asks,
    then ``report(estimate, loss, now)`` once. Returns the estimate and the selector."""
    budget = SendBudget(250_000, 250_000)
    estimate = BandwidthEstimate(budget, floor=100_000, ceiling=5_000_000, initial=2_000_000)
    now = time.monotonic()
    estimate._resumed_at = now - 10  # steady: video has flowed for a while
    selector = LayerSelector(10.0, 40.0, now)
    for loss, remb in seconds:
        for _ in range(4):
            now += 0.25
            budget.spend(50_000)
            selector.switched(selector.choose(estimate.bitrate, TOP, [True] * 3, now), now)
        report(estimate, loss, remb, now)
    return estimate, selector


def receiver_report(estimate: BandwidthEstimate, loss: float, remb: float | None, now: float):
    estimate.on_receiver_report(int(loss * 256), now)
    if remb is not None:  # after the report: its loss lets a low REMB cut
        estimate.on_remb(remb, now)


def transport_feedback(estimate: BandwidthEstimate, loss, remb: float | None, now: float):
    """A second of transport-cc feedback: 10 messages of 13 packets (1.6 Mbps) at a
    constant one-way delay (no over-use), a share ``loss`` of each one's packets lost
    (a float, or one per message)."""
    losses = loss if isinstance(loss, tuple) else (loss,) * 10
    for i, share in enumerate(losses):
        at = now - 1 + (i + 1) / 10
        sent_us, lost = int(at * 1e6), round(13 * share)
        summary = (13, lost, 1538 * (13 - lost), sent_us + 5000, sent_us + 20_000, sent_us)
        estimate.on_transport_feedback(summary, at)


@pytest.mark.parametrize("report", [receiver_report, transport_feedback])
def test_one_lossy_report_moves_no_layer_two_in_a_row_do(report):
    """A busy receiver's CPU stall loses a burst once: one report (or transport-cc
    window) of 30 % loss, with a REMB that reads low too, cuts nothing, and the
    unconstrained viewer keeps the top layer. The same loss in two reports in a row is
    congestion: the estimate is cut and the viewer goes down a layer within seconds."""
    clean, stall = (0.0, 3_000_000), (0.3, 700_000)
    if report is transport_feedback:  # 0.3 s of it: over 10 % in one 0.5 s window only
        stall = ((0.3,) * 3 + (0.0,) * 7, None)
    estimate, selector = watch_top_layer(report, [clean] * 5 + [stall] + [clean] * 12)
    assert estimate.stats.congestion_cuts == 0 and estimate.bitrate >= TOP[0]
    assert selector.layer == 0 and selector.switches_down == 0
    lossy = (0.3, 700_000) if report is receiver_report else (0.3, None)
    estimate, selector = watch_top_layer(report, [clean] * 5 + [lossy] * 2 + [clean] * 3)
    assert estimate.stats.loss_cuts >= 1 and selector.switches_down >= 1
