"""Per-viewer bandwidth estimate from the feedback viewers already send.

Each viewer's estimate drives its :class:`~.rtpsend.SendBudget`, so the egress sends a
viewer no more than its link carries; what does not fit waits in the viewer's short
queue and, beyond it, the viewer's video pauses until the next keyframe it can take
(``egress.ViewerSession``). Inputs, all per viewer and never passed upstream (one slow
viewer must not lower the publisher's quality for everybody):

- **transport-cc** (``gateway/twcc.py``), where the viewer negotiated it (Chromium):
  its feedback says when each packet arrived, matched against the send log. A delay
  trend (over-use: a queue building on the path) cuts the estimate to ``DELAY_CUT`` x
  the rate that got through, at most every ``DELAY_CUT_GAP_S``; loss over 10 % (exact,
  counted over ``ACKED_WINDOW_S`` of arrivals) in two windows in a row cuts to the rate
  that got through;
  otherwise it grows as below. Once feedback arrives, REMB and receiver-report loss no
  longer drive the estimate (Chromium stops sending REMB under transport-cc anyway).
- **REMB** (goog-remb; the viewer's delay-based estimate, which needs the
  abs-send-time stamps :class:`~.rtpsend.FanoutSender` writes): while the viewer also
  reports loss over 10 %, a REMB below 90 % of what it was sent cuts the estimate to
  it at once, but never below 0.85 x what got through (sent x (1 - loss), as
  transport-cc's delay cut): aiortc viewers on
  an 800 kbps link with 2 % loss reported REMBs near 200 kbps, which starved them. It
  always caps how far the estimate may climb. A REMB alone cuts
  nothing: a receiver's REMB lags a rising rate and reads CPU stalls as queueing
  (aiortc viewers on a busy test machine reported half of a lossless 1.5 Mbps
  stream), and neither does one with the few percent a lossy but adequate link drops
  at random (viewers on a 2 % loss link reported 2-6 % in single reports and REMBs
  of 0.6 of their rate, which paused them when 2 % loss let the REMB cut).
- **Loss**: the receiver reports' fraction lost, alone (GCC's loss rule): over 10 %
  in ``LOSS_CONFIRM`` (2) reports in a row cuts the estimate to the sent rate x
  (1 - loss / 2); under 2 % lets it grow 8 % a second; in between, or over 10 % in one
  report only, it holds (one report is no trend: a busy receiver's CPU stall loses a
  burst once, which cut an unconstrained viewer a simulcast layer down for 10 s).
  The same two reports in a row are needed before loss lets a REMB cut, and for
  transport-cc's loss cut (two windows). NACKs are not added: they name the same lost packets
  again, and counting both made 2 % random loss plus a queue's drops read as > 10 %,
  driving a lossy but adequate link's estimate to the floor. Reports that arrive just
  after a failed probe describe the probe: they cut nothing (a report of a probe's
  loss once cut the estimate to a third of the link).
- **Probes**: growth is capped at twice the rate actually sent, so a viewer whose video
  is paused (nothing sent tests the link) cannot climb back by itself. Instead, at a
  keyframe after ``probe_interval`` s of pause, the estimate is set to what the stream
  needs (x ``PROBE_STEP``) and the viewer resumes: a link that carries it keeps the
  estimate; one that does not drops the probe's packets. The viewer's NACKs for over
  ``PROBE_LOSS`` of them, a receiver report over 10 % loss, or a pause within
  ``PROBE_FAILED_S`` (with transport-cc also over-use) fail the probe: the estimate
  goes back to its value before it, the probe's video stops at once
  (``probe_failed``: while a link too slow for it carries it, its queue drops audio
  too), and the next probe waits twice as long (up to ``PROBE_MAX_S``). While a probe runs,
  a backlog at the gateway is the estimate's doing, not the link's: it rises
  (``raise_probe``) rather than pausing the viewer.

Work happens only when RTCP arrives (a few times a second), never per frame or per
packet: the rate sent is read off the budget's running byte count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import twcc
from .rtpsend import SendBudget

LOSS_HIGH = 0.10  # above: cut to the sent rate x (1 - loss / 2)
LOSS_LOW = 0.02  # below: the estimate may grow
LOSS_CONFIRM = 2  # loss cuts only once this many reports in a row were over LOSS_HIGH
GROWTH_PER_S = 1.08  # multiplicative climb per second without congestion
REMB_CUT = 0.9  # with loss, a REMB below this share of the sent rate means congestion
REMB_SETTLE_S = 2.0  # after a pause, neither REMB nor loss cuts for this long
REMB_VALID_S = 5.0  # an older REMB no longer caps the climb (e.g. while video is paused)
RATE_WINDOW_S = 1.0  # shortest window over which the sent rate is measured
HEADROOM = 2.0  # never climb beyond this multiple of what was actually sent
BURST_S = 0.2  # the budget holds this many seconds at the estimated rate
PROBE_INTERVAL_S = 2.0  # a paused viewer first probes after this long
PROBE_MAX_S = 8.0  # failed probes double the wait, up to this
PROBE_STEP = 1.25  # a probe sets the estimate to this x the stream's bitrate
PROBE_FAILED_S = 5.0  # a pause this soon after a probe means the probe failed
PROBE_LOSS = 0.15  # NACKed share of a probe's packets that fails it at once
PROBE_MIN_PACKETS = 15  # ... once it has sent this many (random loss stays far below)
DELAY_CUT = 0.85  # over-use (a queue building) cuts to this x the rate that got through
DELAY_CUT_GAP_S = 0.5  # ... at most this often (the queue needs a round trip to drain)
ACKED_WINDOW_S = 0.5  # transport-cc: received rate and loss over at least this long


@dataclass(slots=True)
class EstimateStats:
    """Counters for ``/api/stats`` (per viewer; summed or ranged per stream)."""

    remb_reports: int = 0
    congestion_cuts: int = 0
    """Times REMB or loss cut the estimate."""
    loss_cuts: int = 0
    """Of those, the times loss did."""
    probes: int = 0
    """Times a paused viewer's video was resumed to test the link."""
    transport_feedbacks: int = 0
    """transport-cc feedback messages received."""
    delay_cuts: int = 0
    """Of the cuts, the times transport-cc's delay-based detector saw over-use."""


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
        self.probe_failed = False
        """Set when a probe fails: the viewer stops the probe's video at once (a link
        that cannot carry it drops audio too while it flows); the viewer clears it."""
        now = time.monotonic()
        self._remb_at = float("-inf")
        self._grown_at = now
        self._window_at = now
        self._window_spent = budget.spent
        self._probed_at = now
        self._probe_interval = PROBE_INTERVAL_S
        self._before_probe = self.bitrate
        self._probe_open = False  # a probe's video flows and has not failed yet
        self._probe_seq = 0  # the RTP sequence number of its first packet
        self._probe_lost: set[int] = set()  # its packets the viewer NACKed
        self._paused_at: float | None = None
        self._resumed_at = now  # a join starts with a burst (the cached GOP)
        # transport-cc (set up by the first feedback; REMB and RR loss then no longer
        # drive the estimate: the feedback measures delay and loss at the sender)
        self._delay: twcc.DelayTrend | None = None
        self.acked_bitrate = 0.0
        """transport-cc: the rate that reached the viewer, over the last window."""
        self._acked_bytes = 0
        self._acked_from_us: int | None = None
        self._acked_to_us = 0
        self._reported = 0
        self._reported_lost = 0
        self._delay_cut_at = float("-inf")
        self._rr_highest: int | None = None  # the last receiver report's highest seq
        self._lossy = 0  # reports in a row (or transport-cc windows) over LOSS_HIGH
        self._apply()

    # Feedback, as the viewer's RTCP arrives (FanoutSender of its video track).

    def on_remb(self, bitrate: float, now: float) -> None:
        self.stats.remb_reports += 1
        self._measure(now)
        self.remb, self._remb_at = float(bitrate), now
        low = bitrate < REMB_CUT * self.sent_bitrate and bitrate < self.bitrate
        if self._delay is None and self._steady(now) and self._loss_persists() and low:
            # never below what the link delivered: a receiver's REMB can read far
            # lower than its link (CPU stalls look like queueing to it)
            self._cut(max(bitrate, DELAY_CUT * self.sent_bitrate * (1 - self.loss)))
        elif self._delay is None:
            self._grow(now)

    def on_receiver_report(
        self, fraction_lost: int, now: float, highest_seq: int | None = None
    ) -> None:
        """``fraction_lost`` as in RFC 3550 (0-255); ``highest_seq``: the report's
        extended highest sequence number received.

        A report whose interval began before the probe's first packet does not judge
        the probe: a receiver counts the packets lost at the tail of the last burst
        before a pause (an earlier probe's keyframe the link dropped) only once newer
        packets arrive, i.e. in the first report after the next probe starts, which
        then failed that probe on a link that had become fast."""
        self._measure(now)
        if self._delay is not None:
            return  # transport-cc's own loss count is exact and more recent
        self._count_loss(fraction_lost / 256)
        previous, self._rr_highest = self._rr_highest, highest_seq
        judges_probe = (
            previous is None or not 0 < (self._probe_seq - previous - 1) & 0xFFFF < 0x8000
        )
        if (
            self.loss > LOSS_HIGH
            and self._probe_open
            and now - self._probed_at < PROBE_FAILED_S
            and judges_probe
        ):
            self._fail_probe()  # the link dropped the probe: no need to wait for a pause
        elif self._loss_persists() and self._steady(now):
            target = self.sent_bitrate * (1 - self.loss / 2)
            if target < self.bitrate:
                self.stats.loss_cuts += 1
                self._cut(target)
        elif self.loss < LOSS_LOW:
            self._grow(now)
        else:
            self._grown_at = now  # hold: no climb for the time spent at this loss

    def on_transport_feedback(self, feedback: twcc.Summary, now: float) -> None:
        """A transport-cc feedback, matched against the viewer's send log
        (``SendLog.summarize``; the native log hands over a plain tuple of the same
        fields): its last packet's send and arrival time go to the delay-based
        detector (``twcc.DelayTrend``); over a window of ``ACKED_WINDOW_S`` of arrivals, the
        received rate and exact loss. Over-use cuts to ``DELAY_CUT`` x the received
        rate; loss over ``LOSS_HIGH`` cuts to the received rate (what the link
        carried, never far below it: random loss of a few percent cuts nothing);
        neither lets the estimate grow."""
        self.stats.transport_feedbacks += 1
        self._measure(now)
        if self._delay is None:
            self._delay = twcc.DelayTrend()
        count, lost, acked, first_us, last_us, last_sent_us = feedback
        if last_us is None:
            self._reported += count
            self._reported_lost += lost
            return
        state = self._delay.state
        if last_sent_us is not None:
            state = self._delay.add(last_sent_us, last_us)
            self._acked_bytes += acked
            if self._acked_from_us is None:
                self._acked_from_us = first_us
            self._acked_to_us = max(self._acked_to_us, last_us)
        self._reported += count
        self._reported_lost += lost
        if (
            self._acked_from_us is not None
            and self._acked_to_us - self._acked_from_us >= ACKED_WINDOW_S * 1e6
        ):
            span = (self._acked_to_us - self._acked_from_us) / 1e6
            self.acked_bitrate = self._acked_bytes * 8 / span
            self._count_loss(self._reported_lost / max(1, self._reported))
            self._acked_bytes, self._acked_from_us = 0, None
            self._reported = self._reported_lost = 0
            if (
                self.loss > LOSS_HIGH
                and self._probe_open
                and now - self._probed_at < PROBE_FAILED_S
            ):
                self._fail_probe()
            elif self._loss_persists() and self._steady(now):
                target = max(self.acked_bitrate, self.sent_bitrate * (1 - self.loss))
                if target < self.bitrate:
                    self.stats.loss_cuts += 1
                    self._cut(target)
        if state is twcc.BandwidthUsage.OVERUSING:
            if self._probe_open and now - self._probed_at < PROBE_FAILED_S:
                self._fail_probe()
            elif (
                self._steady(now)
                and self.acked_bitrate
                and now - self._delay_cut_at >= DELAY_CUT_GAP_S
                and DELAY_CUT * self.acked_bitrate < self.bitrate
            ):
                self._delay_cut_at = now
                self.stats.delay_cuts += 1
                self._cut(DELAY_CUT * self.acked_bitrate)
        elif state is twcc.BandwidthUsage.NORMAL and self.loss <= LOSS_HIGH:
            self._grow(now)
        else:
            self._grown_at = now  # under-use (a queue draining) or heavy loss: hold

    def paused(self, paused: bool, now: float) -> None:
        """The viewer's video paused or resumed. A receiver's REMB is at most 1.5 x
        what it recently received, so around a pause it is low for want of traffic,
        not for congestion: it cuts nothing until the traffic has been steady again
        for ``REMB_SETTLE_S``."""
        if paused:
            if now - self._probed_at >= PROBE_FAILED_S:
                self._probe_interval = PROBE_INTERVAL_S
            elif self._probe_open:
                self._fail_probe()
            self._probe_open = False
            self._paused_at = now
            self._probed_at = now
        else:
            self._paused_at = None
            self._resumed_at = now

    def on_nack(self, lost: list[int], next_seq: int, now: float) -> None:
        """A NACK naming ``lost`` (RTP sequence numbers; ``next_seq`` is the next one
        the video sender uses). A link that cannot take a probe drops much of its
        first keyframe: its NACKs fail the probe within a round trip, before the
        burst costs the viewer its audio too. Only packets the probe sent count (a
        receiver repeats its whole list of missing packets in every NACK)."""
        if not self._probe_open or now - self._probed_at >= PROBE_FAILED_S:
            return
        sent = (next_seq - self._probe_seq) & 0xFFFF
        self._probe_lost.update(s for s in lost if (s - self._probe_seq) & 0xFFFF < sent)
        if sent >= PROBE_MIN_PACKETS and len(self._probe_lost) > PROBE_LOSS * sent:
            self._fail_probe()

    def probe(self, need: float, now: float, next_seq: int) -> bool:
        """At a keyframe while the viewer's video is paused for an estimate below
        ``need`` (the stream's recent bitrate), the video sender's next RTP sequence
        number ``next_seq``: whether to resume it as a probe, which
        sets the estimate to ``PROBE_STEP`` x ``need``. Paused video tests nothing, so
        this tries the stream itself (loss cuts it back if the link cannot take it)."""
        if now - self._probed_at < self._probe_interval:
            return False
        self._probed_at = now
        self._before_probe = self.bitrate
        self._probe_open = True
        self._probe_seq = next_seq
        self._probe_lost.clear()
        self.stats.probes += 1
        self.bitrate = min(self.ceiling, max(self.bitrate, need * PROBE_STEP))
        self._apply()
        self.budget.refill(now)  # debt run up at the old rate would stall the probe
        return True

    def probing(self, now: float) -> bool:
        """Whether a probe's video flows and the link has not dropped it yet."""
        return self._probe_open and now - self._probed_at < PROBE_FAILED_S

    def raise_probe(self, need: float) -> None:
        """The probe's estimate, not the link, held the stream back: raise it."""
        self.bitrate = min(self.ceiling, max(self.bitrate, need) * PROBE_STEP)
        self._apply()

    # Internals

    def _steady(self, now: float) -> bool:
        """Video has flowed for ``REMB_SETTLE_S``: only then do the sent rate and the
        feedback describe the link (around a pause they describe the pause)."""
        return self._paused_at is None and now - self._resumed_at > REMB_SETTLE_S

    def _measure(self, now: float) -> None:
        elapsed = now - self._window_at
        if elapsed >= RATE_WINDOW_S:
            spent = self.budget.spent
            self.sent_bitrate = (spent - self._window_spent) * 8 / elapsed
            self._window_at, self._window_spent = now, spent

    def _fail_probe(self) -> None:
        """Back to the estimate before the probe; the next one waits twice as long."""
        self.probe_failed = True
        self._probe_open = False
        self._probe_lost.clear()
        self._probe_interval = min(PROBE_MAX_S, 2 * self._probe_interval)
        self.bitrate = min(self.bitrate, self._before_probe)
        # The feedback still to come describes the probe, which the estimate has just
        # undone: it cuts nothing more until the traffic has been steady again (a
        # receiver report of the probe's loss cut it to a third of the link).
        self._resumed_at = time.monotonic()
        self._apply()

    def _count_loss(self, loss: float) -> None:
        """One report's (or transport-cc window's) loss, 0-1."""
        self.loss = loss
        self._lossy = self._lossy + 1 if loss > LOSS_HIGH else 0

    def _loss_persists(self) -> bool:
        """Loss over ``LOSS_HIGH`` in ``LOSS_CONFIRM`` reports in a row: congestion.
        One report is no trend: a busy receiver's CPU stall overflows its socket
        buffer once (its REMB then reads low too), and a cut to 3/4 of the rate took an
        unconstrained viewer down a simulcast layer for the 10 s hold."""
        return self.loss > LOSS_HIGH and self._lossy >= LOSS_CONFIRM

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
