"""The frame envelope in Kafka (``docs/wire-format.md``): its fixed 24-byte header, round
trip, refusal of what is not a frame, and keyframe detection without decoding."""

from __future__ import annotations

import struct

import pytest
from whipcast.gateway.frames import (
    FORMAT_VERSION,
    HEADER_SIZE,
    Codec,
    Frame,
    FrameFormatError,
    Track,
    h264_nal_types,
    is_keyframe,
)

FRAME = Frame(
    track=Track.AUDIO,
    codec=Codec.OPUS,
    keyframe=True,
    rtp_timestamp=0xFFFFFFFF,
    session=0x89ABCDEF,
    sequence=42,
    arrival_us=1_764_000_000_123_456,
    payload=b"\xfc\x01\x02",
)


def test_header_layout_is_the_documented_one() -> None:
    record = FRAME.encode()
    assert HEADER_SIZE == 24 and len(record) == 24 + 3
    # docs/wire-format.md: version, flags, track, codec, rtp ts, session, sequence, arrival
    assert struct.unpack(">BBBBIIIQ", record[:24]) == (
        FORMAT_VERSION, 0x01, 1, 3, 0xFFFFFFFF, 0x89ABCDEF, 42, 1_764_000_000_123_456,
    )  # fmt: skip
    assert record[24:] == b"\xfc\x01\x02"


@pytest.mark.parametrize("keyframe", [True, False])
def test_round_trip(keyframe: bool) -> None:
    frame = Frame(Track.VIDEO, Codec.VP8, keyframe, 3000, 7, 0, 1, b"\x00" * 1000)
    assert Frame.decode(frame.encode()) == frame
    assert Frame.decode(FRAME.encode()) == FRAME


def test_empty_payload_round_trips() -> None:
    frame = Frame(Track.VIDEO, Codec.H264, False, 1, 2, 3, 4, b"")
    assert Frame.decode(frame.encode()) == frame


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"", "shorter than a header"),
        (FRAME.encode()[:23], "shorter than a header"),
        (bytes([2]) + FRAME.encode()[1:], "unknown frame format version 2"),
        (FRAME.encode()[:2] + bytes([9]) + FRAME.encode()[3:], "9 is not a valid Track"),
        (FRAME.encode()[:3] + bytes([0]) + FRAME.encode()[4:], "0 is not a valid Codec"),
    ],
    ids=["empty", "23 bytes", "version", "track", "codec"],
)
def test_what_is_not_a_frame_is_refused(record: bytes, reason: str) -> None:
    with pytest.raises(FrameFormatError, match=reason):
        Frame.decode(record)


def test_codec_from_mime_type_ignores_case_and_refuses_others() -> None:
    assert Codec.from_mime_type("video/h264") is Codec.H264
    assert Codec.from_mime_type("VIDEO/VP8") is Codec.VP8
    assert Codec.from_mime_type("audio/OPUS") is Codec.OPUS
    assert [c.clock_rate for c in Codec] == [90000, 90000, 48000]
    with pytest.raises(ValueError, match="unsupported codec video/VP9"):
        Codec.from_mime_type("video/VP9")


def test_h264_nal_types_with_3_and_4_byte_start_codes() -> None:
    au = b"\x00\x00\x00\x01\x09\xf0" + b"\x00\x00\x01\x67\x42" + b"\x00\x00\x01\x68\xce"
    au += b"\x00\x00\x00\x01\x65\x88\x80"
    assert h264_nal_types(au) == [9, 7, 8, 5]
    assert h264_nal_types(b"") == [] and h264_nal_types(b"\x00\x00\x01") == []


@pytest.mark.parametrize(
    ("codec", "payload", "keyframe"),
    [
        (
            Codec.H264,
            b"\x00\x00\x00\x01\x67\x42\x00\x00\x00\x01\x68\xce\x00\x00\x00\x01\x65\x88",
            True,
        ),
        (Codec.H264, b"\x00\x00\x00\x01\x65\x88", True),  # IDR without in-band SPS
        (Codec.H264, b"\x00\x00\x00\x01\x09\xf0\x00\x00\x00\x01\x41\x9a", False),
        (Codec.H264, b"\x00\x00\x00\x01\x41\x9a\x00\x00\x01\x21\x9a", False),  # 2 slices
        (Codec.VP8, b"\x10\x02\x9d", True),  # frame tag bit 0 = 0: key frame
        (Codec.VP8, b"\x11\x02\x9d", False),
        (Codec.VP8, b"", False),
        (Codec.OPUS, b"\xfc", True),
    ],
)
def test_keyframes_are_told_without_decoding(codec: Codec, payload: bytes, keyframe: bool) -> None:
    assert is_keyframe(codec, payload) is keyframe


def test_video_layers_map_to_partitions_around_audio():
    from whipcast.gateway.frames import partition_layer, video_partition

    assert [video_partition(layer) for layer in range(3)] == [0, 2, 3]
    assert [partition_layer(p) for p in range(4)] == [0, None, 1, 2]
    with pytest.raises(ValueError):
        video_partition(3)
