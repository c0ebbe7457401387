"""Cutting one publish session's frames into LL-HLS segments and parts, deterministically.

Every decision is a function of the frame records alone (RTP timestamps, keyframe flags,
arrival times written by ingest, the session id), never of this node's clock or of the
order in which the two partitions' records happen to be read, so every packager node
that reads the session from its first keyframe cuts the same parts into the same bytes:

- Media time starts at the session's first video keyframe (its RTP timestamp is video
  time 0); audio is placed on that timeline by the ingest arrival times of the first
  keyframe and the first audio frame.
- A segment starts at a keyframe once the current one lasts ``min_segment_s`` (so a
  segment is one GOP, about the 2 s the ingest enforces), at once on new SPS/PPS (a
  resolution change: new init segment and a discontinuity), and at a part boundary when
  a GOP runs past the target duration (that segment is then not independent).
- A part ends before the first video frame at least ``0.9 × part_target`` after the
  part's start (or at a segment start). It is written once the audio up to that point is
  known too: an audio frame at or past its end was read, or video went on a further
  second while no audio record was left unread (audio stalled), so a late audio frame
  never changes a written part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import av

from ..frames import Codec, Frame, Track, h264_nal_types
from ..mux import split_nal_units
from . import cmaf

AUDIO_WAIT_S = 1.0
"""Video media time after a part's end at which it is written without waiting for audio."""
MAX_EARLY_AUDIO = 500  # audio frames kept until the first keyframe is read (10 s)
_WRAP = 1 << 32
_PARAMETER_SETS = (7, 8, 9)  # SPS, PPS, access unit delimiter: kept out of the samples


def etag(data: bytes) -> str:
    """A strong validator from the bytes alone: the same on every node."""
    return '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'


@dataclass(slots=True)
class Part:
    index: int
    """Counts parts in the session from 0: the part's URL is named by it."""
    msn: int
    duration: float
    independent: bool
    data: bytes
    etag: str
    last_arrival_us: int
    """Ingest arrival of the part's last video frame (for latency measurements)."""


@dataclass(slots=True)
class Segment:
    msn: int
    init: int
    """Index of the init segment (``EXT-X-MAP``) its parts need."""
    discontinuity: bool
    start: float
    """Media time in seconds since the session's first keyframe."""
    date_us: int
    """Ingest wall clock at ``start`` (``EXT-X-PROGRAM-DATE-TIME``)."""
    independent: bool
    parts: list[Part] = field(default_factory=list)
    complete: bool = False
    _etag: str | None = None

    @property
    def duration(self) -> float:
        return sum(part.duration for part in self.parts)

    @property
    def data(self) -> bytes:
        """The parts back to back (joined per request: not kept twice in memory)."""
        return b"".join(part.data for part in self.parts)

    @property
    def etag(self) -> str:
        if self._etag is None:
            self._etag = etag(self.data)
        return self._etag


@dataclass(slots=True)
class _Video:
    time: int  # 90 kHz since the first keyframe
    keyframe: bool
    data: bytes
    arrival_us: int


@dataclass(slots=True)
class _Cut:
    """A part whose video is known, waiting for its audio."""

    video: list[_Video]
    end: int  # 90 kHz, exclusive
    new_segment: bool
    new_init: bool
    independent_segment: bool
    init: int


class _Unwrapper:
    """32-bit RTP timestamps as a 64-bit count from the first one."""

    def __init__(self, first: int) -> None:
        self._last_raw = first
        self.value = 0

    def __call__(self, raw: int) -> int:
        delta = (raw - self._last_raw) % _WRAP
        if delta >= _WRAP // 2:  # backwards: never expected from one encoder
            delta -= _WRAP
        self._last_raw = raw
        self.value += delta
        return self.value


def parameter_sets(payload: bytes) -> tuple[bytes, bytes] | None:
    """The SPS and PPS an access unit carries, if it carries both."""
    nals = split_nal_units(payload)
    sps = next((n for n in nals if n[0] & 0x1F == 7), None)
    pps = next((n for n in nals if n[0] & 0x1F == 8), None)
    if sps is None or pps is None or len(sps) < 4:
        return None
    return sps, pps


def h264_config(payload: bytes) -> cmaf.H264Config | None:
    """SPS, PPS and picture size of a keyframe that carries them, else ``None``
    (decodes the picture: called only when the parameter sets change)."""
    found = parameter_sets(payload)
    if found is None:
        return None
    sps, pps = found
    decoder = av.CodecContext.create("h264", "r")
    try:
        pictures = decoder.decode(av.Packet(payload)) + decoder.decode(None)
    except av.FFmpegError:
        return None
    if not pictures:
        return None
    return cmaf.H264Config(sps, pps, pictures[-1].width, pictures[-1].height)


class Segmenter:
    """Frames of one session in, parts and segments out (``on_part`` is told of each)."""

    def __init__(
        self,
        *,
        part_target_s: float,
        target_duration_s: int,
        min_segment_s: float,
        with_audio: bool,
        on_part: Callable[[Segment, Part], None] = lambda segment, part: None,
    ) -> None:
        self.part_target = round(part_target_s * cmaf.VIDEO_TIMESCALE)
        self.target_duration = target_duration_s * cmaf.VIDEO_TIMESCALE
        self.min_segment = round(min_segment_s * cmaf.VIDEO_TIMESCALE)
        self.with_audio = with_audio
        self.on_part = on_part
        self.audio_behind: Callable[[], bool] = lambda: False
        """Whether audio records are in Kafka but not read yet (then parts wait for
        them even when audio lags a second: a stall, not a slow read, skips audio)."""
        self.inits: list[bytes] = []
        self.codecs = ""
        self.segments: list[Segment] = []
        """Segments in order; the packager drops those that left the DVR window."""
        self.parts_made = 0
        self.dropped = 0
        """Frames left out: before the first keyframe, undecodable, or audio too late."""
        self.ended = False
        self._config: cmaf.H264Config | None = None
        self._video_clock: _Unwrapper | None = None
        self._anchor_us = 0
        self._audio_clock: _Unwrapper | None = None
        self._audio_offset = 0  # 48 kHz position of the first audio frame
        self._early_audio: list[Frame] = []
        self._audio: list[tuple[int, bytes]] = []  # (48 kHz time, packet), in order
        self._audio_written = 0  # 48 kHz time up to which parts were written
        self._audio_done = not with_audio
        self._open: list[_Video] = []
        self._open_new_segment = True
        self._open_new_init = True
        self._open_independent = True
        self._open_init = 0
        self._next_msn = 0
        self._segment_start = 0
        self._cuts: list[_Cut] = []
        self._video_time = 0

    # Input
    def push(self, frame: Frame) -> None:
        if self.ended:
            return
        if frame.track is Track.VIDEO:
            self._push_video(frame)
        elif self.with_audio and frame.codec is Codec.OPUS:
            self._push_audio(frame)
        self._write_ready()

    def finish(self) -> None:
        """The session ended: write what is left and mark the last segment complete."""
        if self.ended:
            return
        if self._open:
            step = self._typical_step()
            self._cut(self._open[-1].time + step, new_segment=False, new_init=False)
        self._audio_done = True
        self._write_ready(final=True)
        if self.segments:
            self.segments[-1].complete = True
        self.ended = True

    def _push_video(self, frame: Frame) -> None:
        if frame.codec is not Codec.H264:
            self.dropped += 1
            return
        new_init = False
        if frame.keyframe and 7 in h264_nal_types(frame.payload):
            current = (self._config.sps, self._config.pps) if self._config else None
            sets = parameter_sets(frame.payload)
            config = h264_config(frame.payload) if sets and sets != current else None
            if config is not None:
                new_init = True
                self._config = config
                audio = cmaf.OpusConfig() if self.with_audio else None
                self.inits.append(cmaf.init_segment(config, audio))
                self.codecs = config.codec + (",opus" if self.with_audio else "")
        if self._video_clock is None:
            if not new_init:
                self.dropped += 1  # nothing is decodable before the first keyframe
                return
            self._video_clock = _Unwrapper(frame.rtp_timestamp)
            self._anchor_us = frame.arrival_us
            early, self._early_audio = self._early_audio, []
            for audio in early:
                self._push_audio(audio)
        time = self._video_clock(frame.rtp_timestamp)
        self._video_time = time
        data = b"".join(
            len(nal).to_bytes(4, "big") + nal
            for nal in split_nal_units(frame.payload)
            if nal[0] & 0x1F not in _PARAMETER_SETS
        )
        if self._open:
            segment_age = time - self._segment_start
            new_segment = new_init or (frame.keyframe and segment_age >= self.min_segment)
            long_part = time - self._open[0].time >= self.part_target * 9 // 10
            if new_segment or long_part:
                forced = not new_segment and segment_age >= self.target_duration - self.part_target
                self._cut(time, new_segment=new_segment or forced, new_init=new_init)
                if new_segment or forced:
                    self._open_independent = frame.keyframe
        self._open.append(_Video(time, frame.keyframe, data, frame.arrival_us))

    def _push_audio(self, frame: Frame) -> None:
        if self._video_clock is None:  # read before the first keyframe: keep for it
            self._early_audio.append(frame)
            if len(self._early_audio) > MAX_EARLY_AUDIO:
                self._early_audio.pop(0)
                self.dropped += 1
            return
        if frame.arrival_us < self._anchor_us:
            self.dropped += 1
            return
        if self._audio_clock is None:
            self._audio_clock = _Unwrapper(frame.rtp_timestamp)
            offset_us = frame.arrival_us - self._anchor_us
            self._audio_offset = offset_us * cmaf.AUDIO_TIMESCALE // 1_000_000
        time = self._audio_offset + self._audio_clock(frame.rtp_timestamp)
        if time < self._audio_written:
            self.dropped += 1
            return
        self._audio.append((time, frame.payload))

    # Cutting
    def _typical_step(self) -> int:
        if len(self._open) >= 2:
            return self._open[-1].time - self._open[-2].time
        return cmaf.VIDEO_TIMESCALE // 30

    def _cut(self, end: int, *, new_segment: bool, new_init: bool) -> None:
        self._cuts.append(
            _Cut(
                self._open,
                end,
                self._open_new_segment,
                self._open_new_init,
                self._open_independent,
                self._open_init,
            )
        )
        self._open = []
        self._open_init = len(self.inits) - 1
        self._open_new_segment = new_segment
        self._open_new_init = new_init
        if new_segment:
            self._segment_start = end

    def _write_ready(self, final: bool = False) -> None:
        while self._cuts:
            cut = self._cuts[0]
            end_audio = cut.end * cmaf.AUDIO_TIMESCALE // cmaf.VIDEO_TIMESCALE
            audio_known = (
                self._audio_done
                or final
                or (self._audio and self._audio[-1][0] >= end_audio)
                or (
                    self._video_time - cut.end >= AUDIO_WAIT_S * cmaf.VIDEO_TIMESCALE
                    and not self.audio_behind()
                )
            )
            if not audio_known:
                return
            self._cuts.pop(0)
            self._write(cut, end_audio, final)

    def _write(self, cut: _Cut, end_audio: int, final: bool) -> None:
        video = cut.video
        samples = [
            cmaf.Sample(v.data, nxt - v.time, v.keyframe)
            for v, nxt in zip(video, [v.time for v in video[1:]] + [cut.end], strict=True)
        ]
        runs = [cmaf.Run(cmaf.VIDEO_TRACK_ID, video[0].time, samples)]
        taken = [a for a in self._audio if a[0] < end_audio or (final and not self._cuts)]
        if taken:
            rest = self._audio[len(taken) :]
            times = [t for t, _ in taken] + [rest[0][0] if rest else taken[-1][0] + 960]
            audio = [cmaf.Sample(data, times[i + 1] - t) for i, (t, data) in enumerate(taken)]
            runs.append(cmaf.Run(cmaf.AUDIO_TRACK_ID, taken[0][0], audio))
            self._audio = rest
        self._audio_written = max(self._audio_written, end_audio)
        if cut.new_segment or self._next_msn == 0:
            start = video[0].time
            self.segments.append(
                Segment(
                    msn=self._next_msn,
                    init=cut.init,
                    discontinuity=cut.new_init and self._next_msn > 0,
                    start=start / cmaf.VIDEO_TIMESCALE,
                    date_us=self._anchor_us + start * 1_000_000 // cmaf.VIDEO_TIMESCALE,
                    independent=cut.independent_segment,
                )
            )
            self._next_msn += 1
        segment = self.segments[-1]
        data = cmaf.fragment(self.parts_made + 1, runs)
        part = Part(
            index=self.parts_made,
            msn=segment.msn,
            duration=(cut.end - video[0].time) / cmaf.VIDEO_TIMESCALE,
            independent=video[0].keyframe,
            data=data,
            etag=etag(data),
            last_arrival_us=video[-1].arrival_us,
        )
        self.parts_made += 1
        segment.parts.append(part)
        # The segment is complete with this part if the next one starts a new segment
        # (known once that part's first frame was cut): EXTINF is listed at once.
        following = self._cuts[0].new_segment if self._cuts else self._open_new_segment
        segment.complete = following and bool(self._cuts or self._open)
        self.on_part(segment, part)
