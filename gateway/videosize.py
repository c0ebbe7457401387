"""The picture size of a keyframe, read from its headers without decoding.

Ingest orders simulcast layers by the size their keyframes announce (an H.264 SPS, the
VP8 key frame header) rather than trusting the order a publisher lists them in.
"""

from __future__ import annotations

from .frames import Codec

# H.264 profiles whose SPS carries chroma format, bit depths and scaling lists.
_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def video_size(codec: Codec, frame: bytes) -> tuple[int, int] | None:
    """(width, height) of a keyframe; ``None`` when the frame does not say."""
    try:
        if codec is Codec.VP8:
            return _vp8_size(frame)
        if codec is Codec.H264:
            return _h264_size(frame)
    except (IndexError, ValueError):
        return None
    return None


def _vp8_size(frame: bytes) -> tuple[int, int] | None:
    # RFC 6386 9.1: 3-byte frame tag (bit 0 clear on key frames), start code, then
    # 14-bit width and height (2 scaling bits above each), little endian.
    if len(frame) < 10 or frame[0] & 0x01 or frame[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(frame[6:8], "little") & 0x3FFF
    height = int.from_bytes(frame[8:10], "little") & 0x3FFF
    return width, height


def _h264_size(access_unit: bytes) -> tuple[int, int] | None:
    start = access_unit.find(b"\x00\x00\x01")
    while start != -1 and start + 3 < len(access_unit):
        end = access_unit.find(b"\x00\x00\x01", start + 3)
        if access_unit[start + 3] & 0x1F == 7:
            return _sps_size(access_unit[start + 4 : end if end != -1 else len(access_unit)])
        start = end
    return None


class _Bits:
    """An RBSP bit reader (emulation prevention bytes removed)."""

    def __init__(self, data: bytes) -> None:
        self._data = data.replace(b"\x00\x00\x03", b"\x00\x00")
        self._pos = 0

    def bit(self) -> int:
        value = (self._data[self._pos >> 3] >> (7 - (self._pos & 7))) & 1
        self._pos += 1
        return value

    def bits(self, count: int) -> int:
        value = 0
        for _ in range(count):
            value = value << 1 | self.bit()
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("exp-Golomb code too long")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        value = self.ue()
        return (value + 1) // 2 if value & 1 else -(value // 2)


def _sps_size(rbsp: bytes) -> tuple[int, int]:
    """ITU-T H.264 7.3.2.1.1, as far as the cropped picture size."""
    bits = _Bits(rbsp)
    profile = bits.bits(8)
    bits.bits(16)  # constraint flags, level_idc
    bits.ue()  # seq_parameter_set_id
    chroma_format = 1
    if profile in _HIGH_PROFILES:
        chroma_format = bits.ue()
        if chroma_format == 3:
            bits.bit()  # separate_colour_plane_flag
        bits.ue()  # bit_depth_luma_minus8
        bits.ue()  # bit_depth_chroma_minus8
        bits.bit()  # qpprime_y_zero_transform_bypass_flag
        if bits.bit():  # seq_scaling_matrix_present_flag
            for index in range(8 if chroma_format != 3 else 12):
                if bits.bit():
                    _skip_scaling_list(bits, 16 if index < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()
    elif poc_type == 1:
        bits.bit()
        bits.se()
        bits.se()
        for _ in range(bits.ue()):
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.bit()  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_units = bits.ue() + 1
    frame_mbs_only = bits.bit()
    if not frame_mbs_only:
        bits.bit()  # mb_adaptive_frame_field_flag
    bits.bit()  # direct_8x8_inference_flag
    width, height = width_mbs * 16, height_units * 16 * (2 - frame_mbs_only)
    if bits.bit():  # frame_cropping_flag
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
        crop_x = 1 if chroma_format in (0, 3) else 2
        crop_y = (1 if chroma_format in (0, 3) else (2 if chroma_format == 1 else 1)) * (
            2 - frame_mbs_only
        )
        width -= crop_x * (left + right)
        height -= crop_y * (top + bottom)
    return width, height


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last = next_scale = 8
    for _ in range(size):
        if next_scale:
            next_scale = (last + bits.se() + 256) % 256
        last = next_scale or last
