"""Token buckets per client, with memory bounded however many clients come and go."""

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

    def take(self, key: str) -> int:
        """Spend one token: 0 if allowed, else whole seconds until one is available."""
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) / self.interval)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) * self.interval))
        if key not in self._buckets and len(self._buckets) >= MAX_TRACKED:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing."""
        refill = self.burst * self.interval
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}
        while len(self._buckets) >= MAX_TRACKED:  # all busy: drop the oldest
            self._buckets.pop(next(iter(self._buckets)))
