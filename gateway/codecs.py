"""Codec negotiation and RTP (de)packetization for encoded passthrough.

whipcast never decodes: the publisher's codec is the viewer's codec. This module picks
that one codec from a publisher's offer, finds the matching entry in a viewer's offer
(H.264 profile and packetization-mode must agree), and turns frames into RTP payloads
and back, using aiortc's own depayloaders and packetizers.
"""

from __future__ import annotations

import copy

from aiortc.codecs.h264 import h264_depayload
from aiortc.codecs.vpx import vp8_depayload
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters
from aiortc.sdp import parse_h264_profile_level_id

from . import aiortc_compat
from .errors import UnprocessableOffer
from .frames import Codec

# Feedback whipcast acts on: NACK (retransmission), PLI/FIR (keyframes), REMB
# (publisher bandwidth estimation).
_FEEDBACK = {("nack", None), ("nack", "pli"), ("ccm", "fir"), ("goog-remb", None)}

# H.264 profiles accepted from publishers besides aiortc's two baseline ones: since the
# frames are never decoded here, any profile a viewer can decode may pass through.
_EXTRA_H264_PROFILES = ("4d001f", "64001f")


class NegotiationError(UnprocessableOffer):
    """An offer whose media whipcast cannot take; the message says why."""


def install_passthrough_codecs() -> None:
    """Let aiortc accept H.264 Main and High profile offers (it knows only baseline).

    aiortc matches offered codecs against its module-level list before whipcast can
    choose one, so the extra profiles are appended there, once per process.
    """
    video = aiortc_compat.codec_table("video")
    known = {c.parameters.get("profile-level-id") for c in video}
    next_pt = max(c.payloadType or 0 for c in video) + 1
    for profile in _EXTRA_H264_PROFILES:
        if profile in known:
            continue
        video.append(
            RTCRtpCodecParameters(
                mimeType="video/H264",
                clockRate=90000,
                payloadType=next_pt,
                rtcpFeedback=[
                    RTCRtcpFeedback(type="nack"),
                    RTCRtcpFeedback(type="nack", parameter="pli"),
                    RTCRtcpFeedback(type="goog-remb"),
                ],
                parameters={
                    "level-asymmetry-allowed": "1",
                    "packetization-mode": "1",
                    "profile-level-id": profile,
                },
            )
        )
        video.append(
            RTCRtpCodecParameters(
                mimeType="video/rtx",
                clockRate=90000,
                payloadType=next_pt + 1,
                parameters={"apt": next_pt},
            )
        )
        next_pt += 2


def _is_rtx(codec: RTCRtpCodecParameters) -> bool:
    return codec.mimeType.lower().endswith("/rtx")


def _supported(codec: RTCRtpCodecParameters) -> bool:
    try:
        Codec.from_mime_type(codec.mimeType)
    except ValueError:
        return False
    if codec.mimeType.lower() == "video/h264":
        return str(codec.parameters.get("packetization-mode", "0")) == "1"
    return True


# A viewer's transport-wide congestion control feedback (gateway/twcc.py), kept where
# the egress adapts to the viewer's link.
TRANSPORT_CC = ("transport-cc", None)


def _with_feedback(
    codec: RTCRtpCodecParameters, extra: frozenset = frozenset()
) -> RTCRtpCodecParameters:
    codec = copy.deepcopy(codec)
    wanted = _FEEDBACK | extra
    codec.rtcpFeedback = [f for f in codec.rtcpFeedback if (f.type, f.parameter) in wanted]
    return codec


def offers_transport_cc(codecs: list[RTCRtpCodecParameters]) -> bool:
    """Whether a viewer's chosen codec asks for transport-cc feedback."""
    return any((f.type, f.parameter) == TRANSPORT_CC for f in codecs[0].rtcpFeedback)


def _rtx_for(offered: list[RTCRtpCodecParameters], payload_type: int) -> list:
    return [
        copy.deepcopy(c) for c in offered if _is_rtx(c) and c.parameters.get("apt") == payload_type
    ][:1]


def choose_publish_codec(offered: list[RTCRtpCodecParameters], kind: str) -> list:
    """The publisher's first supported codec (its preference), plus its RTX if offered.

    Answering with a single codec pins down what the publisher sends, so the stream has
    one codec that every viewer is then matched against.
    """
    for codec in offered:
        if not _is_rtx(codec) and _supported(codec):
            return [_with_feedback(codec), *_rtx_for(offered, codec.payloadType)]
    names = sorted({c.mimeType for c in offered if not _is_rtx(c)})
    wanted = "H.264 (packetization-mode=1) or VP8" if kind == "video" else "Opus"
    raise NegotiationError(f"no supported {kind} codec offered ({', '.join(names)}); use {wanted}")


def _h264_profile(codec: RTCRtpCodecParameters) -> object:
    return parse_h264_profile_level_id(str(codec.parameters.get("profile-level-id", "42e01f")))[0]


def _same_format(a: RTCRtpCodecParameters, b: RTCRtpCodecParameters) -> bool:
    if a.mimeType.lower() != b.mimeType.lower() or a.clockRate != b.clockRate:
        return False
    if a.mimeType.lower() != "video/h264":
        return True
    try:
        return _h264_profile(a) == _h264_profile(b) and str(
            a.parameters.get("packetization-mode", "0")
        ) == str(b.parameters.get("packetization-mode", "0"))
    except ValueError:
        return False


def match_viewer_codec(
    offered: list[RTCRtpCodecParameters],
    source: RTCRtpCodecParameters,
    kind: str,
    transport_cc: bool = False,
) -> list:
    """The viewer's entry for the publisher's codec, described with the publisher's
    parameters (so the answer states exactly what will be sent), plus RTX if offered;
    with ``transport_cc``, the viewer's transport-cc feedback is kept if it offers it."""
    extra = frozenset({TRANSPORT_CC}) if transport_cc else frozenset()
    for codec in offered:
        if not _is_rtx(codec) and _same_format(codec, source):
            chosen = _with_feedback(codec, extra)
            chosen.parameters = dict(source.parameters)
            return [chosen, *_rtx_for(offered, codec.payloadType)]
    raise NegotiationError(
        f"this stream's {kind} is {describe(source)}, which the viewer did not offer"
    )


def describe(codec: RTCRtpCodecParameters) -> str:
    if codec.mimeType.lower() == "video/h264":
        return (
            f"H.264 profile-level-id={codec.parameters.get('profile-level-id', '42e01f')} "
            f"packetization-mode={codec.parameters.get('packetization-mode', '0')}"
        )
    return codec.mimeType.split("/")[1]


def depayload(codec: Codec, payload: bytes) -> bytes:
    """One RTP payload's share of an encoded frame (raises ValueError when malformed)."""
    if codec is Codec.H264:
        return h264_depayload(payload)
    if codec is Codec.VP8:
        return vp8_depayload(payload)
    return payload


class Packetizer:
    """Splits encoded frames into RTP payloads, once per stream for all its viewers."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._picture_id = 0

    def packetize(self, payload: bytes) -> list[bytes]:
        if self.codec is Codec.H264:
            return aiortc_compat.packetize_h264(payload)
        if self.codec is Codec.VP8:
            self._picture_id = (self._picture_id + 1) & 0x7FFF
            return aiortc_compat.packetize_vp8(payload, self._picture_id)
        return [payload]
