"""Reassembles complete encoded video frames from RTP packets, without decoding.

A frame is every packet sharing one RTP timestamp. It is complete, and handed on at
once, when its marker packet is in and every sequence number from its first packet to
the marker is present. Its first packet is known because the packet before it belongs
to another frame (or, at the very start, because the codec says a frame starts there).
A frame still incomplete after ``max_wait`` (NACK/RTX had their chance) is dropped and
reported as a loss, so the caller can wait for a keyframe; nothing waits for the next
frame to arrive, which is the delay stock jitter buffers add.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HISTORY = 2048


@dataclass
class _Pending:
    timestamp: int
    first_seen: float
    packets: dict[int, bytes] = field(default_factory=dict)
    marker: int | None = None
    starts: bool = False
    """Whether its lowest packet carries the codec's start-of-frame flag."""


@dataclass(slots=True)
class AssembledFrame:
    timestamp: int
    payload: bytes


class FrameAssembler:
    def __init__(self, max_wait: float = 0.2, max_pending: int = 32) -> None:
        self.max_wait = max_wait
        self.max_pending = max_pending
        self._highest: int | None = None
        self._done: int | None = None  # highest sequence number already emitted or dropped
        self._seen: dict[int, int] = {}  # sequence number -> RTP timestamp
        self._pending: dict[int, _Pending] = {}  # RTP timestamp -> frame in progress
        self.duplicates = 0
        self.dropped = 0

    def unwrap(self, seq: int) -> int:
        """16-bit RTP sequence number to a monotonic extended one."""
        if self._highest is None:
            ext = seq + 0x10000
        else:
            delta = ((seq - self._highest + 0x8000) & 0xFFFF) - 0x8000
            ext = self._highest + delta
        if self._highest is None or ext > self._highest:
            self._highest = ext
        return ext

    def add(
        self, seq: int, timestamp: int, marker: bool, data: bytes, starts: bool, now: float
    ) -> tuple[list[AssembledFrame], bool]:
        """Add one depayloaded packet; returns the frames now complete, and whether a
        frame was dropped as lost since the last call."""
        ext = self.unwrap(seq)
        if (self._done is not None and ext <= self._done) or ext in self._seen:
            self.duplicates += 1
            return [], False
        self._seen[ext] = timestamp
        if len(self._seen) > HISTORY:
            for old in [s for s in self._seen if s < ext - HISTORY // 2]:
                del self._seen[old]

        pending = self._pending.get(timestamp)
        if pending is None:
            pending = self._pending[timestamp] = _Pending(timestamp, now)
        if not pending.packets or ext < min(pending.packets):
            pending.starts = starts
        pending.packets[ext] = data
        if marker:
            pending.marker = ext
        return self._drain(now)

    def _drain(self, now: float) -> tuple[list[AssembledFrame], bool]:
        out: list[AssembledFrame] = []
        lost = False
        while self._pending:
            oldest = min(self._pending.values(), key=lambda p: min(p.packets))
            if self._complete(oldest):
                first = min(oldest.packets)
                payload = b"".join(oldest.packets[s] for s in range(first, oldest.marker + 1))
                out.append(AssembledFrame(oldest.timestamp, payload))
                self._finish(oldest, oldest.marker)
            elif self._late_tail(oldest):
                self.duplicates += len(oldest.packets)
                self._finish(oldest, max(oldest.packets))
            elif now - oldest.first_seen > self.max_wait or len(self._pending) > self.max_pending:
                self.dropped += 1
                lost = True
                self._finish(oldest, max(oldest.packets))
            else:
                break
        return out, lost

    def _finish(self, pending: _Pending, last: int) -> None:
        del self._pending[pending.timestamp]
        self._done = last if self._done is None else max(self._done, last)

    def _late_tail(self, pending: _Pending) -> bool:
        """Whether these are the last packets of a frame already dropped (e.g. its marker,
        retransmitted too late): the packet before them is of the same frame and done."""
        before = min(pending.packets) - 1
        return (
            self._done is not None
            and before <= self._done
            and self._seen.get(before) == pending.timestamp
        )

    def _complete(self, pending: _Pending) -> bool:
        if pending.marker is None:
            return False
        first = min(pending.packets)
        if len(pending.packets) != pending.marker - first + 1:
            return False
        before = first - 1
        previous = self._seen.get(before)
        if previous is not None:
            return previous != pending.timestamp
        if self._done is not None and before == self._done:
            return True
        # The packet before is unknown (lost, or this is the first frame): trust the
        # codec's start flag.
        return pending.starts
