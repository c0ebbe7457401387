"""Codec negotiation (which codec a publisher is answered with, which entry of a viewer's
offer matches it) and the packetize/depayload round trip, from real SDP offers parsed by
aiortc. Pure functions: no network."""

from __future__ import annotations

import pytest
from aiortc import codecs as aiortc_codecs
from aiortc.sdp import SessionDescription
from whipcast.gateway.codecs import (
    NegotiationError,
    Packetizer,
    choose_publish_codec,
    depayload,
    install_passthrough_codecs,
    match_viewer_codec,
)
from whipcast.gateway.frames import Codec

H264_CB = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"


def offer(*rtpmaps: tuple[int, str, str | None], feedback: str = "") -> list:
    """The video codecs of an SDP offer listing ``(payload type, rtpmap, fmtp)``."""
    lines = [
        "v=0",
        "o=- 1 1 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        f"m=video 9 UDP/TLS/RTP/SAVPF {' '.join(str(pt) for pt, _, _ in rtpmaps)}",
        "c=IN IP4 0.0.0.0",
        "a=mid:0",
        "a=sendonly",
        "a=rtcp-mux",
    ]
    for pt, rtpmap, fmtp in rtpmaps:
        lines.append(f"a=rtpmap:{pt} {rtpmap}")
        if fmtp:
            lines.append(f"a=fmtp:{pt} {fmtp}")
        if not rtpmap.startswith("rtx"):
            for fb in ["nack", "nack pli", "ccm fir", "goog-remb", "transport-cc"]:
                lines.append(f"a=rtcp-fb:{pt} {fb}")
    return SessionDescription.parse("\r\n".join(lines) + "\r\n").media[0].rtp.codecs


def test_publisher_gets_its_first_supported_codec_with_its_rtx() -> None:
    offered = offer(
        (96, "VP8/90000", None),
        (97, "rtx/90000", "apt=96"),
        (102, "H264/90000", H264_CB),
        (103, "rtx/90000", "apt=102"),
    )
    chosen = choose_publish_codec(offered, "video")
    assert [(c.mimeType, c.payloadType) for c in chosen] == [("video/VP8", 96), ("video/rtx", 97)]
    # Only the feedback whipcast acts on is answered (no transport-cc).
    assert {(f.type, f.parameter) for f in chosen[0].rtcpFeedback} == {
        ("nack", None), ("nack", "pli"), ("ccm", "fir"), ("goog-remb", None),
    }  # fmt: skip
    assert offered[0].rtcpFeedback[-1].type == "transport-cc"  # the offer was not changed


def test_h264_without_packetization_mode_1_is_skipped() -> None:
    offered = offer(
        (100, "H264/90000", "packetization-mode=0;profile-level-id=42e01f"),
        (102, "H264/90000", H264_CB),
    )
    chosen = choose_publish_codec(offered, "video")
    assert [c.payloadType for c in chosen] == [102]  # no RTX offered, none answered


def test_no_supported_codec_is_a_clear_error() -> None:
    offered = offer((98, "VP9/90000", None), (45, "AV1/90000", None))
    with pytest.raises(NegotiationError, match=r"AV1.*VP9.*H\.264 \(packetization-mode=1\)"):
        choose_publish_codec(offered, "video")


def test_viewer_entry_is_matched_and_described_with_the_publishers_parameters() -> None:
    source = choose_publish_codec(
        offer((102, "H264/90000", H264_CB + ";x-google-max-bitrate=1000")), "video"
    )[0]
    viewer = offer(
        (96, "VP8/90000", None),
        (108, "H264/90000", "packetization-mode=1;profile-level-id=42e034"),
        (109, "rtx/90000", "apt=108"),
    )
    chosen = match_viewer_codec(viewer, source, "video")
    assert [(c.mimeType, c.payloadType) for c in chosen] == [
        ("video/H264", 108),
        ("video/rtx", 109),
    ]
    # Same profile at another level: matched, and answered as what will be sent.
    assert chosen[0].parameters == source.parameters


def test_viewer_without_the_stream_profile_is_refused() -> None:
    source = choose_publish_codec(
        offer((102, "H264/90000", "packetization-mode=1;profile-level-id=64001f")), "video"
    )[0]
    viewer = offer((108, "H264/90000", H264_CB), (96, "VP8/90000", None))
    with pytest.raises(NegotiationError, match="profile-level-id=64001f"):
        match_viewer_codec(viewer, source, "video")


def test_viewer_without_the_stream_codec_is_refused() -> None:
    source = choose_publish_codec(offer((96, "VP8/90000", None)), "video")[0]
    with pytest.raises(NegotiationError, match="VP8, which the viewer did not offer"):
        match_viewer_codec(offer((102, "H264/90000", H264_CB)), source, "video")


def test_passthrough_profiles_are_installed_once() -> None:
    install_passthrough_codecs()
    video = list(aiortc_codecs.CODECS["video"])
    install_passthrough_codecs()
    assert aiortc_codecs.CODECS["video"] == video
    profiles = {c.parameters.get("profile-level-id") for c in video}
    assert {"4d001f", "64001f"} <= profiles
    payload_types = [c.payloadType for c in video]
    assert len(payload_types) == len(set(payload_types))


def test_h264_packetize_and_depayload_round_trip() -> None:
    start = b"\x00\x00\x00\x01"
    frame = (start + b"\x67\x42\xe0\x1f" + start + b"\x68\xce\x3c\x80"
             + start + b"\x65\x88" + bytes(i % 250 + 1 for i in range(5000)))  # fmt: skip
    payloads = Packetizer(Codec.H264).packetize(frame)
    assert len(payloads) > 3 and max(map(len, payloads)) <= 1300
    assert b"".join(depayload(Codec.H264, p) for p in payloads) == frame


def test_vp8_packetizer_numbers_pictures_and_wraps() -> None:
    packetizer = Packetizer(Codec.VP8)
    ids = []
    for _ in range(0x8001):
        first = packetizer.packetize(b"\x10\x02\x9d" + bytes(10))[0]
        assert first[0] & 0x90 == 0x90 and first[1] & 0x80  # X and S bits, I bit
        ids.append((first[2] & 0x7F) << 8 | first[3])  # 15-bit PictureID
    assert ids[:3] == [1, 2, 3] and ids[0x7FFE:] == [0x7FFF, 0, 1]


def test_malformed_payloads_raise_value_error() -> None:
    for codec, payload in [(Codec.H264, b""), (Codec.H264, b"\x1c"), (Codec.VP8, b"")]:
        with pytest.raises(ValueError):
            depayload(codec, payload)
