"""Token buckets per key, with memory bounded however many keys come and go.

The clock is a parameter so the same buckets can run on a node's monotonic clock (what
one node lets through) or on the timestamps of a Kafka log (what counts on every node:
folding the same records gives every node the same answer).
"""

from __future__ import annotations

import math
import time

MAX_TRACKED = 100_000


class RateLimiter:
    """``burst`` actions at once, then one per ``interval`` seconds, per key."""

    def __init__(self, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float | None = None) -> int:
        """Spend one token: 0 if allowed, else whole seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, at = self._state(key, now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, at)
            return self._wait(tokens)
        if key not in self._buckets and len(self._buckets) >= MAX_TRACKED:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, at)
        return 0

    def retry_after(self, key: str, now: float | None = None) -> int:
        """Like :meth:`take` but spends nothing: 0 if a token is available now."""
        tokens, _ = self._state(key, time.monotonic() if now is None else now)
        return 0 if tokens >= 1.0 else self._wait(tokens)

    def _state(self, key: str, now: float) -> tuple[float, float]:
        """(tokens, as of when) at ``now``; a clock that steps back refills nothing."""
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        if now <= at:
            return tokens, at
        return min(float(self.burst), tokens + (now - at) / self.interval), now

    def _wait(self, tokens: float) -> int:
        return max(1, math.ceil((1.0 - tokens) * self.interval))

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing."""
        refill = self.burst * self.interval
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}
        while len(self._buckets) >= MAX_TRACKED:  # all busy: drop the oldest
            self._buckets.pop(next(iter(self._buckets)))
