"""Transport-wide congestion control (transport-cc) for viewers that offer it.

A viewer that negotiates the ``transport-wide-cc-extensions-01`` header extension and
``a=rtcp-fb:* transport-cc`` (Chromium does; aiortc does not) reports, a few times a
second, when each packet it got arrived, named by the transport-wide sequence number
the egress stamped on it (one counter per viewer, across its audio, video and RTX).
With the send time and size the egress logged for that number, that gives what the
viewer's own REMB only approximates: one-way delay variation per packet (a queue
building on the path) and exact loss, both at the sender.

- :func:`parse_feedback`: RTCP RTPFB fmt 15 (draft-holmer-rmcat-transport-wide-cc-
  extensions-01 section 3.1): run-length and status-vector chunks, receive deltas.
- :class:`SendLog`: the pure-Python path's ring of (send time, size) per transport-wide
  sequence number; the native core keeps the same ring (``_fanout.SendLog``) without
  per-packet Python.
- :class:`DelayDetector`: aiortc's port of libwebrtc's delay-based detector
  (``aiortc.rate``: inter-arrival groups, Kalman offset estimate, adaptive threshold)
  fed with send/arrival times from the feedback instead of abs-send-time at a receiver.

``bandwidth.BandwidthEstimate.on_transport_feedback`` combines the detector's verdict
with the feedback's loss and received rate.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from aiortc.rate import (
    INTER_ARRIVAL_SHIFT,
    TIMESTAMP_GROUP_LENGTH_MS,
    TIMESTAMP_TO_MS,
    BandwidthUsage,
    InterArrival,
    OveruseDetector,
    OveruseEstimator,
)

URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
FEEDBACK = "transport-cc"  # the rtcp-fb type
FMT = 15  # RTPFB feedback message type

LOG_SIZE = 1 << 13  # sequence numbers a send log remembers (~8 s at 1000 packets/s)
DELTA_US = 250  # receive deltas count quarter milliseconds
REFERENCE_US = 64_000  # the reference time counts 64 ms

_HEADER = struct.Struct("!HHI")  # base sequence, status count, reference time + fb count
_RUN, _SMALL, _LARGE = 0, 1, 2  # symbols: not received, small delta, large delta


@dataclass(frozen=True, slots=True)
class Feedback:
    """One transport-cc feedback message."""

    base_seq: int
    count: int
    """Packets it reports on, from ``base_seq`` on (received or not)."""
    feedback_count: int
    """The receiver's own counter of feedback messages (wraps at 256)."""
    received: list[tuple[int, int]]
    """(transport-wide sequence number, arrival time in µs on the receiver's clock),
    for each packet received, in sequence order."""

    @property
    def lost(self) -> int:
        return self.count - len(self.received)


def parse_feedback(fci: bytes) -> Feedback:
    """Parse the FCI of a transport-cc feedback (the bytes after the two SSRCs).

    Raises ValueError for anything malformed: a short buffer, a reserved symbol, more
    statuses or deltas than the message holds.
    """
    if len(fci) < 8:
        raise ValueError("transport-cc feedback shorter than its header")
    base, count, word = _HEADER.unpack_from(fci)
    reference = word >> 8
    if reference & 0x800000:  # 24-bit signed
        reference -= 1 << 24
    symbols: list[int] = []
    at = 8
    while len(symbols) < count:
        if at + 2 > len(fci):
            raise ValueError("transport-cc feedback ends inside its status chunks")
        chunk = (fci[at] << 8) | fci[at + 1]
        at += 2
        if not chunk & 0x8000:  # run length: a symbol repeated
            symbol, run = (chunk >> 13) & 0x3, chunk & 0x1FFF
            if symbol == 3:
                raise ValueError("transport-cc feedback has a reserved status")
            symbols.extend([symbol] * min(run, count - len(symbols)))
        elif not chunk & 0x4000:  # status vector of 14 one-bit symbols
            symbols.extend((chunk >> (13 - i)) & 1 for i in range(14))
        else:  # status vector of 7 two-bit symbols
            two = [(chunk >> (12 - 2 * i)) & 0x3 for i in range(7)]
            if 3 in two[: count - len(symbols)]:
                raise ValueError("transport-cc feedback has a reserved status")
            symbols.extend(two)
    del symbols[count:]
    received = []
    arrival = reference * REFERENCE_US
    for i, symbol in enumerate(symbols):
        if symbol == _SMALL:
            if at + 1 > len(fci):
                raise ValueError("transport-cc feedback ends inside its deltas")
            arrival += fci[at] * DELTA_US
            at += 1
        elif symbol == _LARGE:
            if at + 2 > len(fci):
                raise ValueError("transport-cc feedback ends inside its deltas")
            arrival += int.from_bytes(fci[at : at + 2], "big", signed=True) * DELTA_US
            at += 2
        else:
            continue
        received.append(((base + i) & 0xFFFF, arrival))
    return Feedback(base, count, word & 0xFF, received)


def monotonic_us() -> int:
    """The send log's clock (the native core reads the same CLOCK_MONOTONIC)."""
    return time.monotonic_ns() // 1000


class SendLog:
    """One viewer's transport-wide sequence counter and a ring of what it numbered:
    (send time µs, bytes) per number, for the feedback to be matched against.

    Shared by all senders of one viewer (audio, video, RTX): the counter is
    transport-wide. The native core's ``_fanout.SendLog`` has the same interface and
    is written by its ``Track`` while it sends.
    """

    __slots__ = ("next_seq", "_times", "_sizes", "_seqs")

    def __init__(self) -> None:
        self.next_seq = 0
        self._times = [0] * LOG_SIZE
        self._sizes = [0] * LOG_SIZE
        self._seqs = [-1] * LOG_SIZE

    def take(self, size: int, now_us: int) -> int:
        """Number one packet of ``size`` bytes sent at ``now_us``: its sequence number."""
        seq = self.next_seq
        slot = seq & (LOG_SIZE - 1)
        self._times[slot], self._sizes[slot], self._seqs[slot] = now_us, size, seq
        self.next_seq = (seq + 1) & 0xFFFF
        return seq

    def lookup(self, seqs: list[int]) -> list[tuple[int, int] | None]:
        """(send time µs, size) for each sequence number, None where forgotten."""
        out: list[tuple[int, int] | None] = []
        for seq in seqs:
            slot = seq & (LOG_SIZE - 1)
            out.append((self._times[slot], self._sizes[slot]) if self._seqs[slot] == seq else None)
        return out


class DelayDetector:
    """Whether the path to one viewer is queueing (over-use), draining (under-use) or
    neither, from each packet's send and arrival time: aiortc's ``rate`` classes,
    as its ``RemoteBitrateEstimator`` drives them, with the send time in place of
    abs-send-time."""

    def __init__(self) -> None:
        self._inter_arrival = InterArrival(
            (TIMESTAMP_GROUP_LENGTH_MS << INTER_ARRIVAL_SHIFT) // 1000, TIMESTAMP_TO_MS
        )
        self._estimator = OveruseEstimator()
        self._detector = OveruseDetector()

    @property
    def state(self) -> BandwidthUsage:
        return self._detector.state()

    def add(self, sent_us: int, arrival_us: int, size: int) -> BandwidthUsage:
        # aiortc's timestamps: abs-send-time (6.18 s, 24 bits) shifted left by 8.
        timestamp = ((sent_us << 18) // 1_000_000 << 8) & 0xFFFFFFFF
        arrival_ms = arrival_us // 1000
        deltas = self._inter_arrival.compute_deltas(timestamp, arrival_ms, size)
        if deltas is not None:
            delta_ms = deltas.timestamp * TIMESTAMP_TO_MS
            detector = self._detector
            self._estimator.update(
                deltas.arrival_time, delta_ms, deltas.size, detector.state(), arrival_ms
            )
            detector.detect(
                self._estimator.offset(), delta_ms, self._estimator.num_of_deltas(), arrival_ms
            )
        return self._detector.state()


def stamp_element(ext_id: int) -> bytes:
    """The one-byte-header element's first byte for a 2-byte transport-wide number."""
    return bytes([(ext_id << 4) | 1])
