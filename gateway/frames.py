"""The frame record: one complete encoded frame, as stored in Kafka.

Every Kafka record on a stream topic is a fixed 24-byte header followed by the encoded
frame exactly as the publisher's encoder produced it (H.264 in Annex B, a VP8 frame, an
Opus packet). The layout is documented in ``docs/wire-format.md``; any Kafka consumer can
read it with one ``struct.unpack``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

FORMAT_VERSION = 1

# version, flags, track, codec, rtp timestamp, session, sequence, arrival time (µs)
_HEADER = struct.Struct(">BBBBIIIQ")
HEADER_SIZE = _HEADER.size

FLAG_KEYFRAME = 0x01


class Track(enum.IntEnum):
    """Which track a frame belongs to; also the Kafka partition it is written to."""

    VIDEO = 0
    AUDIO = 1


MAX_VIDEO_LAYERS = 3
"""Simulcast layers a stream may carry (layer 0 the best, then ½ and ¼ resolution)."""


def video_partition(layer: int) -> int:
    """The stream-topic partition of video ``layer``: layer 0 keeps partition 0 (so
    single-layer readers see the top layer unchanged), audio keeps 1, and further
    layers follow from 2."""
    if not 0 <= layer < MAX_VIDEO_LAYERS:
        raise ValueError(f"video layer {layer} out of range")
    return 0 if layer == 0 else layer + 1


def partition_layer(partition: int) -> int | None:
    """The video layer a stream-topic partition carries; ``None`` for audio."""
    if partition == Track.AUDIO:
        return None
    return 0 if partition == 0 else partition - 1


class Codec(enum.IntEnum):
    H264 = 1
    VP8 = 2
    OPUS = 3

    @property
    def mime_type(self) -> str:
        return _MIME[self]

    @property
    def clock_rate(self) -> int:
        return 48000 if self is Codec.OPUS else 90000

    @classmethod
    def from_mime_type(cls, mime_type: str) -> Codec:
        try:
            return _BY_MIME[mime_type.lower()]
        except KeyError:
            raise ValueError(f"unsupported codec {mime_type}") from None


_MIME = {Codec.H264: "video/H264", Codec.VP8: "video/VP8", Codec.OPUS: "audio/opus"}
_BY_MIME = {v.lower(): k for k, v in _MIME.items()}


class FrameFormatError(ValueError):
    """A record that is not a frame of a format version this code understands."""


@dataclass(slots=True)
class Frame:
    track: Track
    codec: Codec
    keyframe: bool
    rtp_timestamp: int
    session: int
    """Random id of the publishing session: a new one starts on every WHIP publish."""
    sequence: int
    """Frame counter per track within a session; a gap means frames were lost."""
    arrival_us: int
    """Wall-clock time (µs since the epoch) the frame's last packet reached ingest."""
    payload: bytes

    def encode(self) -> bytes:
        header = _HEADER.pack(
            FORMAT_VERSION,
            FLAG_KEYFRAME if self.keyframe else 0,
            self.track,
            self.codec,
            self.rtp_timestamp,
            self.session,
            self.sequence,
            self.arrival_us,
        )
        return header + self.payload

    @classmethod
    def decode(cls, record: bytes) -> Frame:
        if len(record) < HEADER_SIZE:
            raise FrameFormatError(f"record of {len(record)} bytes is shorter than a header")
        version, flags, track, codec, ts, session, seq, arrival = _HEADER.unpack_from(record)
        if version != FORMAT_VERSION:
            raise FrameFormatError(f"unknown frame format version {version}")
        try:
            return cls(
                Track(track),
                Codec(codec),
                bool(flags & FLAG_KEYFRAME),
                ts,
                session,
                seq,
                arrival,
                record[HEADER_SIZE:],
            )
        except ValueError as exc:
            raise FrameFormatError(str(exc)) from None


def is_keyframe(codec: Codec, payload: bytes) -> bool:
    """Whether an encoded frame can be decoded on its own (no decoding needed to tell)."""
    if codec is Codec.OPUS:
        return True
    if codec is Codec.VP8:
        # RFC 6386 section 9.1: bit 0 of the frame tag is 0 for key frames.
        return len(payload) > 0 and not payload[0] & 0x01
    return any(nal_type in (5, 7) for nal_type in h264_nal_types(payload))


def h264_nal_types(payload: bytes) -> list[int]:
    """NAL unit types of an Annex B access unit, in order."""
    types = []
    start = payload.find(b"\x00\x00\x01")
    while start != -1 and start + 3 < len(payload):
        types.append(payload[start + 3] & 0x1F)
        start = payload.find(b"\x00\x00\x01", start + 3)
    return types
