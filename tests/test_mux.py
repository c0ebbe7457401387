"""The shared muxer: frames as Kafka holds them (encoded here with FFmpeg's encoders
from PyAV) into every container, read back with FFmpeg's demuxers and decoders."""

from __future__ import annotations

import fractions
import io

import av
import numpy as np
import pytest
from whipcast.gateway.frames import Codec, Frame, Track, is_keyframe
from whipcast.gateway.mux import (
    Muxer,
    MuxError,
    avcc_parameter_sets,
    avcc_to_annexb,
    check_format,
    parameter_sets,
)

from .peers import draw_counter, read_counter

FPS = 30
T0_US = 1_700_000_000_000_000


def encode_video(codec: Codec, count: int, first: int = 0) -> list[bytes]:
    name = "libx264" if codec is Codec.H264 else "libvpx"
    encoder = av.CodecContext.create(name, "w")
    encoder.width, encoder.height, encoder.pix_fmt = 320, 240, "yuv420p"
    encoder.time_base = fractions.Fraction(1, FPS)
    encoder.options = {"tune": "zerolatency", "bf": "0", "g": "30"} if name == "libx264" else {
        "g": "30", "deadline": "realtime"}  # fmt: skip
    out = []
    for i in range(first, first + count):
        picture = draw_counter(i).reformat(format="yuv420p")
        picture.pts = i
        out += [bytes(p) for p in encoder.encode(picture)]
    return out + [bytes(p) for p in encoder.encode(None)]


def encode_opus(count: int) -> list[bytes]:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "stereo", "s16"
    out = []
    for i in range(count):
        samples = av.AudioFrame.from_ndarray(
            np.zeros((1, 960 * 2), dtype=np.int16), format="s16", layout="stereo"
        )
        samples.sample_rate, samples.pts = 48000, i * 960
        out += [bytes(p) for p in encoder.encode(samples)]
    return out


def frames(codec: Codec, seconds: float = 3.0) -> list[Frame]:
    """Video and audio as ingest writes them: RTP clocks with random origins (video
    wraps past 2^32), audio arriving from 250 ms after the first keyframe."""
    video = [
        Frame(
            Track.VIDEO,
            codec,
            is_keyframe(codec, p),
            (2**32 - 4000 + i * 3000) % 2**32,
            7,
            i,
            T0_US + i * 1_000_000 // FPS,
            p,
        )  # fmt: skip
        for i, p in enumerate(encode_video(codec, int(seconds * FPS)))
    ]
    audio = [
        Frame(Track.AUDIO, Codec.OPUS, True, 123 + i * 960, 7, i, T0_US + 250_000 + i * 20_000, p)
        for i, p in enumerate(encode_opus(int(seconds * 50)))
    ]
    return sorted(video + audio, key=lambda f: f.arrival_us)


@pytest.mark.parametrize(
    "codec, fmt",
    [
        (Codec.H264, "mpegts"),
        (Codec.H264, "fmp4"),
        (Codec.H264, "mp4"),
        (Codec.VP8, "webm"),
    ],  # fmt: skip
)
def test_every_container_decodes_in_order_and_in_sync(codec, fmt, tmp_path):
    target = tmp_path / "out" if fmt == "mp4" else io.BytesIO()
    muxer = Muxer(str(target) if fmt == "mp4" else target, fmt, codec, Codec.OPUS)
    for frame in frames(codec):
        muxer.write(frame)
    muxer.close()
    data = target.read_bytes() if fmt == "mp4" else target.getvalue()
    with av.open(io.BytesIO(data)) as container:
        video = container.streams.video[0]
        assert (video.codec_context.width, video.codec_context.height) == (320, 240)
        counters, first = [], {}
        for packet in container.demux():
            if packet.pts is not None:
                first.setdefault(packet.stream.type, float(packet.pts * packet.time_base))
            if packet.stream is video:
                counters += [read_counter(p) for p in packet.decode()]
    assert counters == list(range(3 * FPS))
    # Each track's first frame is placed by its arrival: A/V stay as they arrived.
    assert 0.2 < first["audio"] - first["video"] < 0.3
    assert abs(muxer.duration_s() - 3.23) < 0.1  # audio runs 250 ms past the video


def test_output_starts_on_a_keyframe():
    muxer = Muxer(io.BytesIO(), "mpegts", Codec.H264, None)
    video = [f for f in frames(Codec.H264) if f.track is Track.VIDEO]
    assert not muxer.write(video[1]) and not muxer.started
    assert muxer.write(video[0]) and muxer.started
    muxer.close()


def test_containers_refuse_codecs_they_cannot_carry():
    with pytest.raises(MuxError, match="use webm"):
        check_format("mpegts", Codec.VP8, Codec.OPUS)
    with pytest.raises(MuxError, match="use mpegts or fmp4 or mp4"):
        check_format("webm", Codec.H264, Codec.OPUS)
    with pytest.raises(MuxError, match="path"):
        Muxer(io.BytesIO(), "mp4", Codec.H264, Codec.OPUS)


def test_avcc_round_trip():
    keyframe = encode_video(Codec.H264, 1)[0]
    sets = parameter_sets(keyframe)
    units = [u for u in keyframe.split(b"\x00\x00\x00\x01") if u]
    avcc = b"".join(len(u).to_bytes(4, "big") + u for u in units)
    assert avcc_to_annexb(avcc) == b"".join(b"\x00\x00\x00\x01" + u for u in units)
    sps, pps = [u for u in sets.split(b"\x00\x00\x00\x01") if u]
    record = bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]) + len(sps).to_bytes(2, "big") + sps
    record += b"\x01" + len(pps).to_bytes(2, "big") + pps
    assert avcc_parameter_sets(record) == (4, sets)
