"""A replay's switch of source keeps every track's RTP time going forward.

``Playback._rebase`` moves a viewer's timeline from one source (the live fan-out or a
cursor in the past) to another. Kafka orders a stream's audio and video only within
their own partitions, so when the switch comes, the new source's next audio may sit
before the last audio the old one sent even though its video does not (ingest sends
the audio that queued since the last video frame with the next one, so live audio
trails live video by up to a frame interval). Here the sources' timing is set by
hand; tests/test_rewind.py plays the same switches end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

from whipcast.gateway.frames import Codec, Frame, Track
from whipcast.gateway.playback import Playback
from whipcast.gateway.rtpsend import PreparedFrame

MASK = 0xFFFFFFFF
T_US = 1_800_000_000_000_000  # the moment of the switch (wall µs)
SHIFT_US = 5_000_000  # the cursor plays 5 s behind
RTP_BASE = {Track.VIDEO: 0xFFFF0000, Track.AUDIO: 0x7FFFF000}  # one wraps meanwhile
RATE = {Track.VIDEO: 90000, Track.AUDIO: 48000}


def frame(track: Track, arrival_us: int, sequence: int = 0) -> Frame:
    """A frame whose RTP time runs with its arrival time (no jitter)."""
    rtp = (RTP_BASE[track] + arrival_us * RATE[track] // 1_000_000) & MASK
    return Frame(track, Codec.OPUS if track is Track.AUDIO else Codec.VP8, sequence == 0,
                 rtp, 1, sequence, arrival_us, b"x")  # fmt: skip


@dataclass
class Sender:
    """What ``_rebase`` reads and sets on a viewer's ``FanoutSender``."""

    clock_rate: int
    ts_offset: int = 0
    clock_shift_us: int = 0
    packets_sent: int = 0
    last_timestamp: int | None = None

    def sent(self, f: Frame) -> None:
        self.last_timestamp = (f.rtp_timestamp + self.ts_offset) & MASK
        self.packets_sent += 1

    def timestamp(self, f: Frame) -> int:
        return (f.rtp_timestamp + self.ts_offset) & MASK


class Viewer:
    def __init__(self) -> None:
        self.senders = {track: Sender(RATE[track]) for track in Track}
        self.fanout = None

    def spawn(self, coroutine) -> None:
        coroutine.close()

    def drop_pending_video(self) -> None:
        pass


def step(before: int, after: int) -> int:
    return ((after - before + 0x80000000) & MASK) - 0x80000000


def on_cursor(viewer: Viewer) -> Playback:
    """A playback whose viewer plays a cursor ``SHIFT_US`` behind, up to ``T_US``:
    its last video frame was due 30 ms before the switch, its last audio 5 ms."""
    playback = Playback.__new__(Playback)
    playback.viewer, playback._shift_us = viewer, 0
    playback._rebase(SHIFT_US, [], None)
    viewer.senders[Track.VIDEO].sent(frame(Track.VIDEO, T_US - SHIFT_US - 30_000))
    viewer.senders[Track.AUDIO].sent(frame(Track.AUDIO, T_US - SHIFT_US - 5_000))
    return playback


def test_back_to_live_with_audio_trailing_video():
    """Live video read 10 ms after it arrived, live audio 45 ms (it waited for the next
    video frame at ingest): the first live audio must still follow the cursor's last."""
    viewer = Viewer()
    playback = on_cursor(viewer)
    video, audio = viewer.senders[Track.VIDEO], viewer.senders[Track.AUDIO]
    last_video, last_audio = video.last_timestamp, audio.last_timestamp
    gop = [PreparedFrame(frame(Track.VIDEO, T_US - 10_000 - i * 50_000, 9 - i), [b"x"], True)
           for i in reversed(range(10))]  # fmt: skip
    handed_out = frame(Track.AUDIO, T_US - 45_000)  # the fan-out's last audio frame
    next_audio = frame(Track.AUDIO, T_US - 25_000)  # the first the viewer gets live

    playback._rebase(0, gop, handed_out.rtp_timestamp)

    assert step(last_audio, audio.timestamp(next_audio)) > 0, "audio went back"
    assert step(last_video, video.timestamp(gop[-1].frame)) >= len(gop)
    # Both tracks moved alike: the publisher's sync holds (within a tick's rounding).
    moved_us = [sender.ts_offset * 1_000_000 / sender.clock_rate for sender in (video, audio)]
    assert abs(moved_us[0] - moved_us[1]) < 50, moved_us


def test_into_the_past_with_audio_fetched_behind_video():
    """A cursor whose next audio frame is older (in its own clock) than its burst's
    video, joined by a viewer whose live audio ran ahead of its live video."""
    viewer = Viewer()
    playback = Playback.__new__(Playback)
    playback.viewer, playback._shift_us = viewer, 0
    video, audio = viewer.senders[Track.VIDEO], viewer.senders[Track.AUDIO]
    video.sent(frame(Track.VIDEO, T_US - 40_000))
    audio.sent(frame(Track.AUDIO, T_US - 2_000))
    last_audio = audio.last_timestamp
    # The cursor started 8 s back: its burst ends at the anchor (due now), its buffered
    # audio starts 30 ms before the anchor (it was read after the video).
    anchor_us = T_US - 8_000_000
    gop = [PreparedFrame(frame(Track.VIDEO, anchor_us, 0), [b"x"], True)]
    next_audio = frame(Track.AUDIO, anchor_us - 30_000)

    playback._rebase(T_US - anchor_us, gop, (next_audio.rtp_timestamp - 1) & MASK)

    assert step(last_audio, audio.timestamp(next_audio)) > 0, "audio went back"


def test_no_audio_known_changes_nothing_more():
    """Without an audio reference (a source that has read none yet) the switch is the
    plain re-base: nothing is shifted beyond the video's own need."""
    viewer = Viewer()
    playback = on_cursor(viewer)
    offsets = {t: s.ts_offset for t, s in viewer.senders.items()}
    gop = [PreparedFrame(frame(Track.VIDEO, T_US, 0), [b"x"], True)]
    playback._rebase(0, gop, None)
    for track, sender in viewer.senders.items():
        expected = offsets[track] - SHIFT_US * sender.clock_rate // 1_000_000
        assert sender.ts_offset == expected, track
