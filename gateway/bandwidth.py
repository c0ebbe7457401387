"""Per-viewer bandwidth estimate from the feedback viewers already send.

Each viewer's estimate drives its :class:`~.rtpsend.SendBudget`, so the egress sends a
viewer no more than its link carries; what does not fit waits in the viewer's short
queue and, beyond it, the viewer's video pauses until the next keyframe it can take
(``egress.ViewerSession``). Inputs, all per viewer and never passed upstream (one slow
viewer must not lower the publisher's quality for everybody):

- **REMB** (goog-remb; the viewer's delay-based estimate, which needs the
  abs-send-time stamps :class:`~.rtpsend.FanoutSender` writes): while the viewer also
  reports loss, a REMB below 90 % of what it was sent cuts the estimate to it at once;
  it always caps how far the estimate may climb. A REMB alone cuts nothing: a
  receiver's REMB lags a rising rate and reads CPU stalls as queueing (aiortc viewers
  on a busy test machine reported half of a lossless 1.5 Mbps stream).
- **Loss**: the worse of the receiver reports' fraction lost and the share of packets
  NACKed. Over 10 % cuts the estimate to the sent rate x (1 - loss / 2); under 2 % lets
  it grow 8 % a second (mediasoup's loss rule); in between it holds.
- **Probes**: growth is capped at twice the rate actually sent, so a viewer whose video
  is paused (nothing sent tests the link) raises its estimate every few seconds
  instead (LiveKit resets its estimate after a pause for the same reason).

Work happens only when RTCP arrives (a few times a second), never per frame or per
packet: the rate sent is read off the budget's running byte count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .rtpsend import SendBudget

LOSS_HIGH = 0.10  # above: cut to the sent rate x (1 - loss / 2)
LOSS_LOW = 0.02  # below: the estimate may grow
GROWTH_PER_S = 1.08  # multiplicative climb per second without congestion
REMB_CUT = 0.9  # with loss, a REMB below this share of the sent rate means congestion
REMB_SETTLE_S = 2.0  # after a pause, REMB cuts nothing for this long
REMB_VALID_S = 5.0  # an older REMB no longer caps the climb (e.g. while video is paused)
RATE_WINDOW_S = 1.0  # shortest window over which the sent rate is measured
HEADROOM = 2.0  # never climb beyond this multiple of what was actually sent
BURST_S = 0.2  # the budget holds this many seconds at the estimated rate
PROBE_INTERVAL_S = 3.0  # while video is paused, raise the estimate this often
PROBE_STEP = 1.5  # by this factor
NACK_SET_MAX = 4096  # distinct NACKed packets counted per report interval at most


@dataclass(slots=True)
class EstimateStats:
    """Counters for ``/api/stats`` (per viewer; summed or ranged per stream)."""

    remb_reports: int = 0
    congestion_cuts: int = 0
    """Times REMB or loss cut the estimate."""
    loss_cuts: int = 0
    """Of those, the times loss did."""
    probes: int = 0
    """Times a paused viewer's estimate was raised to test the link."""


class BandwidthEstimate:
    """What one viewer's link carries, in bits per second, kept in its send budget."""

    def __init__(self, budget: SendBudget, floor: float, ceiling: float, initial: float) -> None:
        self.budget = budget
        self.floor = float(floor)
        self.ceiling = float(ceiling)
        self.bitrate = min(max(float(initial), self.floor), self.ceiling)
        self.sent_bitrate = 0.0
        self.remb: float | None = None
        self.loss = 0.0
        self.stats = EstimateStats()
        now = time.monotonic()
        self._remb_at = float("-inf")
        self._grown_at = now
        self._window_at = now
        self._window_spent = budget.spent
        self._packets_at_window = 0
        self._nacked: set[int] = set()
        self._probed_at = now
        self._paused_at: float | None = None
        self._resumed_at = now  # a join starts with a burst (the cached GOP)
        self._apply()

    # Feedback, as the viewer's RTCP arrives (FanoutSender of its video track).

    def on_remb(self, bitrate: float, now: float) -> None:
        self.stats.remb_reports += 1
        self._measure(now)
        self.remb, self._remb_at = float(bitrate), now
        steady = self._paused_at is None and now - self._resumed_at > REMB_SETTLE_S
        lossy = self.loss >= LOSS_LOW
        if steady and lossy and bitrate < REMB_CUT * self.sent_bitrate and bitrate < self.bitrate:
            self._cut(bitrate)
        else:
            self._grow(now)

    def on_receiver_report(self, fraction_lost: int, packets_sent: int, now: float) -> None:
        """``fraction_lost`` as in RFC 3550 (0-255); ``packets_sent``: video packets
        sent so far (for the NACK share)."""
        self._measure(now)
        nacked = len(self._nacked) / max(1, packets_sent - self._packets_at_window)
        self._nacked.clear()
        self._packets_at_window = packets_sent
        self.loss = max(fraction_lost / 256, min(1.0, nacked))
        if self.loss > LOSS_HIGH:
            target = self.sent_bitrate * (1 - self.loss / 2)
            if target < self.bitrate:
                self.stats.loss_cuts += 1
                self._cut(target)
        elif self.loss < LOSS_LOW:
            self._grow(now)
        else:
            self._grown_at = now  # hold: no climb for the time spent at this loss

    def on_nack(self, lost: list[int]) -> None:
        """Sequence numbers a NACK names; each counts once per report interval (players
        repeat NACKs for the same packet)."""
        if len(self._nacked) < NACK_SET_MAX:
            self._nacked.update(lost)

    def paused(self, paused: bool, now: float) -> None:
        """The viewer's video paused or resumed. A receiver's REMB is at most 1.5 x
        what it recently received, so around a pause it is low for want of traffic,
        not for congestion: it cuts nothing until the traffic has been steady again
        for ``REMB_SETTLE_S``."""
        if paused:
            self._paused_at = now
            self._probed_at = now
        else:
            self._paused_at = None
            self._resumed_at = now

    def probe(self, now: float) -> None:
        """The viewer's video is paused, so nothing it is sent tests the link: every
        ``PROBE_INTERVAL_S``, try ``PROBE_STEP`` x the estimate (congestion cuts it back)."""
        if now - self._probed_at >= PROBE_INTERVAL_S:
            self._probed_at = now
            self.stats.probes += 1
            self.bitrate = min(self.ceiling, self.bitrate * PROBE_STEP)
            self._apply()

    # Internals

    def _measure(self, now: float) -> None:
        elapsed = now - self._window_at
        if elapsed >= RATE_WINDOW_S:
            spent = self.budget.spent
            self.sent_bitrate = (spent - self._window_spent) * 8 / elapsed
            self._window_at, self._window_spent = now, spent

    def _cut(self, bitrate: float) -> None:
        self.stats.congestion_cuts += 1
        self.bitrate = max(self.floor, bitrate)
        self._apply()

    def _grow(self, now: float) -> None:
        elapsed = min(2.0, now - self._grown_at)
        self._grown_at = now
        cap = self.ceiling
        if self.remb is not None and now - self._remb_at < REMB_VALID_S:
            cap = min(cap, max(self.remb, self.floor))
        cap = min(cap, max(HEADROOM * self.sent_bitrate, self.bitrate, self.floor))
        grown = min(cap, self.bitrate * GROWTH_PER_S**elapsed)
        if grown > self.bitrate:
            self.bitrate = grown
            self._apply()

    def _apply(self) -> None:
        rate = self.bitrate / 8
        self.budget.rate = rate
        self.budget.burst = rate * BURST_S
