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
  per-packet Python. ``SendLog.summarize`` parses a feedback and matches it against the
  ring into a :class:`Summary`, the little the estimator needs; the native log does the
  same in one call (no per-packet Python on feedback either).
- :class:`DelayTrend`: the delay-based detector: libwebrtc's trendline filter over
  the one-way delay of each feedback's last packet, judged by aiortc's port of
  libwebrtc's over-use detector (``aiortc.rate.OveruseDetector``: adaptive threshold).

``bandwidth.BandwidthEstimate.on_transport_feedback`` combines the detector's verdict
with the feedback's loss and received rate.
"""

from __future__ import annotations

import collections
import itertools
import operator
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

from aiortc.rate import BandwidthUsage, OveruseDetector

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
    runs: list[tuple[int, int]] = []  # (symbol, packets): chunks decoded
    total, at = 0, 8
    while total < count:
        if at + 2 > len(fci):
            raise ValueError("transport-cc feedback ends inside its status chunks")
        chunk = (fci[at] << 8) | fci[at + 1]
        at += 2
        if not chunk & 0x8000:  # run length: a symbol repeated
            symbol, run = (chunk >> 13) & 0x3, min(chunk & 0x1FFF, count - total)
            if symbol == 3:
                raise ValueError("transport-cc feedback has a reserved status")
            runs.append((symbol, run))
            total += run
        else:
            if not chunk & 0x4000:  # status vector of 14 one-bit symbols
                symbols = [(chunk >> (13 - i)) & 1 for i in range(14)]
            else:  # status vector of 7 two-bit symbols
                symbols = [(chunk >> (12 - 2 * i)) & 0x3 for i in range(7)]
            symbols = symbols[: count - total]
            if 3 in symbols:
                raise ValueError("transport-cc feedback has a reserved status")
            runs.extend((symbol, 1) for symbol in symbols)
            total += len(symbols)
    received: list[tuple[int, int]] = []
    arrival = reference * (REFERENCE_US // DELTA_US)  # in receive-delta units
    seq = base
    for symbol, n in runs:
        if symbol == _SMALL:  # the usual case: a run of one-byte deltas, summed in C
            deltas = fci[at : at + n]
            if len(deltas) < n:
                raise ValueError("transport-cc feedback ends inside its deltas")
            at += n
            arrivals = list(itertools.accumulate(deltas, initial=arrival))
            arrival = arrivals[-1]
            received.extend(
                zip(
                    [s & 0xFFFF for s in range(seq, seq + n)],
                    [a * DELTA_US for a in arrivals[1:]],
                    strict=True,
                )
            )
        elif symbol == _LARGE:
            if at + 2 * n > len(fci):
                raise ValueError("transport-cc feedback ends inside its deltas")
            for i in range(n):
                arrival += int.from_bytes(fci[at : at + 2], "big", signed=True)
                at += 2
                received.append(((seq + i) & 0xFFFF, arrival * DELTA_US))
        seq += n
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

    def summarize(self, fci: bytes) -> Summary:
        """A feedback's FCI parsed and matched against this log (``parse_feedback``,
        then :func:`summarize`): what the native ``_fanout.SendLog.summarize`` does in
        one call, value for value (as a plain tuple)."""
        return summarize(parse_feedback(fci), self)


class Summary(NamedTuple):
    """What the estimator takes from one feedback message, matched against the viewer's
    send log: the native core hands it over as a plain tuple of the same fields, so a
    feedback costs Python one call and no per-packet objects."""

    count: int
    """Packets the feedback reports on (received or not)."""
    lost: int
    acked_bytes: int
    """Bytes of the received packets the log still remembers."""
    first_arrival_us: int | None
    """Arrival time of the first and last packet received (the viewer's clock), None
    when none was."""
    last_arrival_us: int | None
    last_sent_us: int | None
    """Send time of the last packet received (the log's clock), None where the log
    forgot it or none was received."""


def summarize(feedback: Feedback, log) -> Summary:
    """``feedback`` matched against ``log`` (either send log's ``lookup``)."""
    received = feedback.received
    if not received:
        return Summary(feedback.count, feedback.lost, 0, None, None, None)
    sent = log.lookup([seq for seq, _ in received])
    acked = sum(map(operator.itemgetter(1), filter(None, sent)))
    last = sent[-1]
    return Summary(
        feedback.count,
        feedback.lost,
        acked,
        received[0][1],
        received[-1][1],
        None if last is None else last[0],
    )


class DelayTrend:
    """Whether the path to one viewer is queueing (over-use), draining (under-use) or
    neither: libwebrtc's trendline filter (the slope of the smoothed one-way delay
    over the last ``WINDOW`` samples, x ``GAIN``) judged by aiortc's port of
    libwebrtc's ``OveruseDetector`` (adaptive threshold, over-use only when it
    persists and grows).

    One sample per feedback message (its last received packet), not per packet
    group as in libwebrtc: a feedback covers ~100 ms, and per-packet Python work
    on every viewer's feedback would cost more than the viewer's whole send path
    (aiortc's per-packet Kalman ``OveruseEstimator`` measured ~2x it; see
    docs/benchmarks.md). The delay's unknown constant offset (clocks) drops out of
    the slope."""

    WINDOW = 20  # samples in the regression (~2 s of feedback)
    SMOOTHING = 0.9  # exponential smoothing of the delay, as libwebrtc's
    GAIN = 4.0  # libwebrtc's threshold gain
    FULL = 60  # the detector's count of deltas at which a trend counts in full

    def __init__(self) -> None:
        self._detector = OveruseDetector()
        self._xs: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._ys: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._origin: float | None = None
        self._smoothed: float | None = None
        self._last_ms: float | None = None
        self.slope = 0.0

    @property
    def state(self) -> BandwidthUsage:
        return self._detector.state()

    def add(self, sent_us: int, arrival_us: int) -> BandwidthUsage:
        """One packet's send time (the sender's clock) and arrival time (the viewer's)."""
        arrival_ms = arrival_us / 1000
        delay = (arrival_us - sent_us) / 1000
        last, self._last_ms = self._last_ms, arrival_ms
        if last is None or arrival_ms <= last:
            return self._detector.state()  # the first, or out of order: no delta
        smoothed = self._smoothed
        smoothed = (
            delay if smoothed is None else self.SMOOTHING * smoothed + (1 - self.SMOOTHING) * delay
        )
        self._smoothed = smoothed
        xs, ys = self._xs, self._ys
        if self._origin is None:
            self._origin = arrival_ms  # small x: the least-squares sums stay exact
        xs.append(arrival_ms - self._origin)
        ys.append(smoothed)
        n = len(xs)
        if n < 3:
            return self._detector.state()
        sum_x, sum_y = sum(xs), sum(ys)
        den = n * sum(map(operator.mul, xs, xs)) - sum_x * sum_x
        num = n * sum(map(operator.mul, xs, ys)) - sum_x * sum_y
        self.slope = num / den if den else 0.0
        deltas = self.FULL * n // self.WINDOW  # the trend counts in full once the window is
        return self._detector.detect(
            self.slope * self.GAIN, arrival_ms - last, deltas, int(arrival_ms)
        )


def stamp_element(ext_id: int) -> bytes:
    """The one-byte-header element's first byte for a 2-byte transport-wide number."""
    return bytes([(ext_id << 4) | 1])
