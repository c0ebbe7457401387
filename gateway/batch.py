"""One native call per frame for the viewers of a stream that need nothing else.

Most viewers of a live stream, most of the time, take each frame as it comes: no queue,
no GOP burst, no pacing, budget to spare. For them ``egress.ViewerSession.deliver`` and
``rtpsend.FanoutSender.send_frame`` would only repeat the same checks and bookkeeping
per viewer and frame in Python; a :class:`Batch` sends such a frame to all of them in
one ``_fanout.send_batch`` call per header layout instead. Each native track counts its
sends, keeps its NACK history and sequence number itself (``gateway/native/``), so
RTCP sender reports, resends, the send budget and ``/api/stats`` read the same numbers
either way.

A viewer joins after a frame its Python path sent it plainly (``ViewerSession.deliver``
asks) and leaves as soon as anything needs Python: the batch passes a track by when its
allowance (the budget it had on joining) is spent, a frame is larger than its pacer lets
go at once, or it lost its route, and hands the frame back; a socket with no room leaves
the rest of the frame queued on its transport and the viewer on the Python path until
the backlog clears; the viewer itself leaves on a GOP burst, a skip to a keyframe, a
rewind or on closing. Without the native core there are no batches: every frame takes
the pure-Python path.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import TYPE_CHECKING

from .rtpsend import Layout, PreparedFrame, abs_send_time

if TYPE_CHECKING:
    from .egress import ViewerSession
    from .frames import Track


class Batch:
    """The viewers of one stream and track kind whose frames ``send_batch`` sends."""

    def __init__(self, core: ModuleType, track: Track) -> None:
        self._core = core
        self._track = track
        # Per header layout: the native tracks and, at the same index, their viewers.
        self._groups: dict[Layout, tuple[list, list[ViewerSession]]] = {}
        self.members: dict[ViewerSession, Layout] = {}

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, viewer: ViewerSession) -> bool:
        return viewer in self.members

    def add(self, viewer: ViewerSession, layout: Layout, native_track) -> None:
        if viewer in self.members:
            return
        tracks, viewers = self._groups.setdefault(layout, ([], []))
        tracks.append(native_track)
        viewers.append(viewer)
        self.members[viewer] = layout

    def remove(self, viewer: ViewerSession) -> None:
        layout = self.members.pop(viewer, None)
        if layout is None:
            return
        tracks, viewers = self._groups[layout]
        i = viewers.index(viewer)
        del tracks[i], viewers[i]
        if not viewers:
            del self._groups[layout]

    def send(self, prepared: PreparedFrame) -> list[ViewerSession]:
        """Send ``prepared`` to every member; returns the members it passed by, which
        leave: the frame is the caller's to deliver to them. Members whose socket was
        full leave too, their frame sent or queued."""
        frame = prepared.frame
        ts = frame.rtp_timestamp & 0xFFFFFFFF
        passed_by: list[ViewerSession] = []
        leaving = []
        for layout, (tracks, viewers) in self._groups.items():
            packets = prepared.native_packets(layout, self._core)
            stamped = layout.abs_send_time_id is not None
            sent_at = abs_send_time(time.monotonic()) if stamped else None
            passed, unsent = self._core.send_batch(tracks, packets, ts, sent_at, frame.arrival_us)
            passed_by.extend(viewers[i] for i in passed)
            for i, left in unsent:  # its socket is full: the rest waits on the transport
                viewer = viewers[i]
                viewer.senders[self._track].queue_unsent(left)
                leaving.append(viewer)
        for viewer in (*passed_by, *leaving):
            self.remove(viewer)
        return passed_by
