"""Spreads a slow viewer's frames over time, so a keyframe reaches it whole.

A frame leaves :class:`~.rtpsend.FanoutSender` as one burst. A fast link absorbs it;
a slow one with a short queue (a 1 Mbps link whose router holds 100 ms) drops the tail
of any frame larger than that queue, and a keyframe usually is. The pacer sends at
once what fits in a few milliseconds at ``PACE_FACTOR`` x the viewer's estimate and
the rest of the frame in slices from a timer. For a viewer whose estimate is high, a
whole frame always fits: no timer runs and the cost is one comparison per frame.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from .rtpsend import FanoutSender, PreparedFrame, SendBudget

PACE_FACTOR = 1.2  # pace a little above the estimate: the estimate must be able to rise
SLICE_S = 0.01  # send this many seconds' worth of the pacing rate per timer tick
MTU = 1200  # bytes a packet carries at most (aiortc's packetizers stay below)


class Pacer:
    """One viewer's video: frames go out whole when they fit, in slices otherwise."""

    def __init__(
        self, sender: FanoutSender, budget: SendBudget, on_idle: Callable[[], None]
    ) -> None:
        self._sender = sender
        self._budget = budget
        self._on_idle = on_idle
        # (frame, timestamp override, index of the next packet to send)
        self._waiting: collections.deque[tuple[PreparedFrame, int | None, int]]
        self._waiting = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        return bool(self._waiting)

    def send(self, prepared: PreparedFrame, timestamp: int | None = None) -> None:
        if not self._waiting and self._fits(prepared):
            self._sender.send_frame(prepared, timestamp)
            return
        if timestamp is None:  # fixed now: a replay may re-base the sender meanwhile
            timestamp = (prepared.frame.rtp_timestamp + self._sender.ts_offset) & 0xFFFFFFFF
        self._waiting.append((prepared, timestamp, 0))
        if self._timer is None:
            self._tick()

    def clear(self) -> None:
        """Forget waiting frames (the viewer skips to a keyframe); a frame cut short
        is simply incomplete for the player, like a lost one."""
        self._waiting.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def max_packets(self) -> int:
        """Most packets a frame may have to go out whole, at once (see ``_fits``)."""
        return int(self._slice_bytes() // MTU)

    def drop_unstarted(self) -> None:
        """Forget waiting frames not begun yet; the one being sent finishes (cut
        short, it would reach the player as a broken picture, not a missing one)."""
        waiting = self._waiting
        while len(waiting) > 1:
            waiting.pop()
        if waiting and waiting[0][2] == 0:
            self.clear()

    def _slice_bytes(self) -> float:
        return max(MTU, self._budget.rate * PACE_FACTOR * SLICE_S)

    def _fits(self, prepared: PreparedFrame) -> bool:
        return len(prepared.payloads) * MTU <= self._slice_bytes()

    def _tick(self) -> None:
        self._timer = None
        allowance = self._slice_bytes()
        waiting, sender = self._waiting, self._sender
        while waiting and allowance > 0:
            prepared, timestamp, first = waiting[0]
            payloads = prepared.payloads
            end = first
            while end < len(payloads) and allowance > 0:
                allowance -= len(payloads[end])
                end += 1
            sender.send_frame(prepared, timestamp, first, end)
            if end < len(payloads):
                waiting[0] = (prepared, timestamp, end)
            else:
                waiting.popleft()
        if waiting:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + SLICE_S, self._tick)
        else:
            self._on_idle()
