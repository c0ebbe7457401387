"""The frame assembler, packet by packet: real RTP packets (aiortc's ``RtpPacket``,
serialized and parsed back) of real H.264 and VP8 packetizations, fed the way ingest's
receiver feeds them, with reordering, loss, duplicates and sequence-number wrap. No
network, no clock: time is an argument."""

from __future__ import annotations

import random

import pytest
from aiortc.rtp import RtpPacket
from whipcast.gateway.assembler import FrameAssembler
from whipcast.gateway.codecs import Packetizer, depayload
from whipcast.gateway.frames import Codec
from whipcast.gateway.receiver import _starts_frame

MAX_WAIT = 0.2
START = b"\x00\x00\x00\x01"


def _slice(index: int, size: int, first_mb: bool) -> bytes:
    """Slice data: first_mb_in_slice 0 (a leading 1 bit) or 1 (``010``), then bytes that
    differ per frame and hold no start code."""
    return bytes([0x88 if first_mb else 0x48]) + bytes(
        (index * 31 + i * 7) % 251 + 1 for i in range(size)
    )


def h264_frame(index: int, size: int = 3000) -> bytes:
    """An Annex B access unit. Frame 0: SPS and PPS (aggregated into one STAP-A) and an
    IDR slice; others: one non-IDR slice. Slices are split into FU-A fragments."""
    if index == 0:
        params = START + b"\x67\x42\xe0\x1f" + START + b"\x68\xce\x3c\x80"
        return params + START + b"\x65" + _slice(index, size, True)
    return START + b"\x41" + _slice(index, size, True)


def h264_two_slices(index: int, size: int = 1500) -> bytes:
    """A picture in two slices, each its own FU-A run."""
    return (
        START + b"\x41" + _slice(index, size, True) + START + b"\x41" + _slice(index, size, False)
    )


def vp8_frame(index: int, size: int = 2500) -> bytes:
    return b"\x10\x02\x9d" + bytes((index * 13 + i) % 256 for i in range(size))


class Sender:
    """Packetizes frames into RTP as a publisher does: consecutive sequence numbers
    (16-bit, wrapping), one timestamp per frame, the marker on its last packet."""

    def __init__(self, codec: Codec, first_seq: int = 1000) -> None:
        self.codec = codec
        self.packetizer = Packetizer(codec)
        self.seq = first_seq
        self.timestamp = 90000

    def send(self, payload: bytes) -> list[RtpPacket]:
        payloads = self.packetizer.packetize(payload)
        packets = []
        for i, data in enumerate(payloads):
            packet = RtpPacket(
                payload_type=96,
                marker=int(i == len(payloads) - 1),
                sequence_number=self.seq,
                timestamp=self.timestamp,
                ssrc=0x1234,
                payload=data,
            )
            packets.append(RtpPacket.parse(packet.serialize()))
            self.seq = (self.seq + 1) & 0xFFFF
        self.timestamp = (self.timestamp + 3000) & 0xFFFFFFFF
        return packets


class Receiver:
    """Feeds packets to a :class:`FrameAssembler` exactly as ingest's receiver does."""

    def __init__(self, codec: Codec, **kwargs) -> None:
        self.codec = codec
        self.assembler = FrameAssembler(max_wait=MAX_WAIT, **kwargs)
        self.frames: list[tuple[int, bytes]] = []
        self.losses = 0

    def feed(self, packets: list[RtpPacket], now: float = 0.0) -> None:
        for packet in packets:
            frames, lost = self.assembler.add(
                packet.sequence_number,
                packet.timestamp,
                bool(packet.marker),
                depayload(self.codec, packet.payload),
                _starts_frame(self.codec, packet.payload),
                now,
            )
            self.losses += lost
            self.frames += [(f.timestamp, f.payload) for f in frames]


def test_h264_frame_uses_stap_a_and_fu_a_and_comes_out_whole() -> None:
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    frame = h264_frame(0)
    packets = sender.send(frame)
    assert [p.payload[0] & 0x1F for p in packets] == [24, 28, 28, 28]  # STAP-A, FU-A x3
    assert [p.payload[3] & 0x1F for p in packets[:1]] == [7]  # SPS first in the STAP-A

    receiver.feed(packets[:-1])
    assert receiver.frames == []  # nothing before the marker packet
    receiver.feed(packets[-1:])
    assert receiver.frames == [(packets[0].timestamp, frame)]


def test_frames_come_out_the_moment_they_are_complete_in_order() -> None:
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    frames = [h264_frame(i) for i in range(5)]
    for i, frame in enumerate(frames):
        receiver.feed(sender.send(frame))
        assert [payload for _, payload in receiver.frames] == frames[: i + 1]
    assert receiver.losses == 0 and receiver.assembler.dropped == 0


def test_reordered_packets_within_and_across_frames() -> None:
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    frames = [h264_frame(i) for i in range(6)]
    packets = [p for f in frames for p in sender.send(f)]
    # Each packet up to 3 places late: frames overlap, none overtakes a whole frame.
    jitter = random.Random(7)
    packets = [p for _, p in sorted((i + jitter.uniform(0, 3), p) for i, p in enumerate(packets))]
    assert [p.sequence_number for p in packets] != sorted(p.sequence_number for p in packets)

    receiver.feed(packets)

    assert [payload for _, payload in receiver.frames] == frames
    assert receiver.losses == 0


def test_a_later_frame_waits_for_an_earlier_incomplete_one() -> None:
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    first, second = sender.send(h264_frame(1)), sender.send(h264_frame(2))
    receiver.feed(first[:2] + second)
    assert receiver.frames == []
    receiver.feed(first[2:])
    assert [payload for _, payload in receiver.frames] == [h264_frame(1), h264_frame(2)]


@pytest.mark.parametrize("lost", [0, 1, 3], ids=["first (STAP-A)", "middle", "marker"])
def test_a_lost_packet_drops_its_frame_after_max_wait_and_the_next_frame_passes(
    lost: int,
) -> None:
    """Also when the SPS/PPS packet of a keyframe is lost: what remains (an IDR slice
    without its parameter sets) is no frame a new viewer could start from."""
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    packets = sender.send(h264_frame(0))
    del packets[lost]
    receiver.feed(packets, now=0.0)
    assert receiver.frames == [] and receiver.losses == 0  # still waiting for NACK/RTX

    receiver.feed(sender.send(h264_frame(2)), now=MAX_WAIT + 0.01)

    assert receiver.losses == 1 and receiver.assembler.dropped == 1
    assert [payload for _, payload in receiver.frames] == [h264_frame(2)]


def test_a_retransmission_in_time_completes_the_frame() -> None:
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    packets = sender.send(h264_frame(1))
    receiver.feed(packets[:1] + packets[2:], now=0.0)
    receiver.feed(packets[1:2], now=MAX_WAIT / 2)
    assert [payload for _, payload in receiver.frames] == [h264_frame(1)]
    assert receiver.losses == 0


def test_a_frame_whose_start_is_lost_is_never_emitted_truncated() -> None:
    """The first packet after a loss gap is an FU-A middle fragment: no start flag, so
    the frame cannot be known complete even though marker and the rest are in."""
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    receiver.feed(sender.send(h264_frame(1)))
    packets = sender.send(h264_frame(2))
    receiver.feed(packets[1:], now=0.0)
    receiver.feed(sender.send(h264_frame(3)), now=MAX_WAIT + 0.01)
    assert [payload for _, payload in receiver.frames] == [h264_frame(1), h264_frame(3)]
    assert receiver.losses == 1


def test_the_marker_of_a_dropped_frame_arriving_late_is_not_a_frame() -> None:
    """The marker packet (last FU-A fragment) of an already dropped frame comes in by
    retransmission: it must not be emitted on its own as a frame."""
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    receiver.feed(sender.send(h264_frame(1)))
    packets = sender.send(h264_frame(2))
    receiver.feed(packets[:-1], now=0.0)
    receiver.feed(sender.send(h264_frame(3))[:1], now=MAX_WAIT + 0.01)  # frame 2 dropped
    assert receiver.losses == 1

    receiver.feed(packets[-1:], now=MAX_WAIT + 0.02)
    assert [payload for _, payload in receiver.frames] == [h264_frame(1)]

    # Discarded at once, not left pending until max_wait to count as a second loss.
    assert receiver.assembler.duplicates == 1 and receiver.losses == 1


def test_a_picture_whose_first_slice_is_lost_is_not_emitted() -> None:
    """The second slice begins a NAL unit (FU-A start) but not the picture
    (first_mb_in_slice is not 0)."""
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    receiver.feed(sender.send(h264_frame(1)))
    packets = sender.send(h264_two_slices(2))
    assert len(packets) == 4 and packets[2].payload[1] & 0x80  # slice 2 starts at [2]
    receiver.feed(packets[2:], now=0.0)
    receiver.feed(sender.send(h264_frame(3)), now=MAX_WAIT + 0.01)
    assert [payload for _, payload in receiver.frames] == [h264_frame(1), h264_frame(3)]


def test_a_picture_in_two_slices_after_a_gap_is_emitted_whole() -> None:
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    sender.send(h264_frame(1))  # never arrives: the packet before the next is unknown
    receiver.feed(sender.send(h264_two_slices(2)))
    assert [payload for _, payload in receiver.frames] == [h264_two_slices(2)]


def test_first_frame_starting_mid_frame_is_not_emitted() -> None:
    """Joining a stream in the middle of a frame: its tail alone is no frame."""
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    packets = sender.send(h264_frame(1))
    receiver.feed(packets[2:], now=0.0)
    receiver.feed(sender.send(h264_frame(2)), now=MAX_WAIT + 0.01)
    assert [payload for _, payload in receiver.frames] == [h264_frame(2)]


@pytest.mark.parametrize("first_seq", [65533, 65535, 0xFFFF - 20])
def test_sequence_numbers_wrapping_inside_and_between_frames(first_seq: int) -> None:
    sender, receiver = Sender(Codec.H264, first_seq=first_seq), Receiver(Codec.H264)
    frames = [h264_frame(i) for i in range(8)]
    packets = [p for f in frames for p in sender.send(f)]
    assert any(p.sequence_number == 0 for p in packets)
    # Swap neighbours so that packets around the wrap arrive out of order too.
    for i in range(0, len(packets) - 1, 2):
        packets[i], packets[i + 1] = packets[i + 1], packets[i]

    receiver.feed(packets)

    assert [payload for _, payload in receiver.frames] == frames
    assert receiver.losses == 0 and receiver.assembler.duplicates == 0


def test_duplicates_and_late_copies_are_counted_not_emitted() -> None:
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264)
    packets = sender.send(h264_frame(1))
    receiver.feed([packets[0], packets[0], *packets[1:]])
    receiver.feed(packets[1:3])  # copies after the frame went out
    assert [payload for _, payload in receiver.frames] == [h264_frame(1)]
    assert receiver.assembler.duplicates == 3
    receiver.feed(sender.send(h264_frame(2)), now=MAX_WAIT + 0.01)
    assert [payload for _, payload in receiver.frames] == [h264_frame(1), h264_frame(2)]
    assert receiver.losses == 0  # the late copies left nothing pending


def test_max_pending_drops_the_oldest_frames_without_waiting() -> None:
    sender, receiver = Sender(Codec.H264), Receiver(Codec.H264, max_pending=4)
    markers = []
    for i in range(6):  # each missing its marker
        packets = sender.send(h264_frame(i))
        receiver.feed(packets[:-1], now=0.0)
        markers += packets[-1:]
    assert receiver.assembler.dropped == 2  # 6 pending, 4 allowed: the 2 oldest went
    assert receiver.frames == []

    receiver.feed(markers, now=0.0)  # the 4 kept complete; the 2 dropped stay dropped
    assert [payload for _, payload in receiver.frames] == [h264_frame(i) for i in range(2, 6)]
    assert receiver.losses == 2


def test_vp8_frame_round_trip() -> None:
    sender, receiver = Sender(Codec.VP8), Receiver(Codec.VP8)
    frames = [vp8_frame(i) for i in range(3)]
    packets = [p for f in frames for p in sender.send(f)]
    assert len(packets) == 6  # two per frame
    assert [bool(p.payload[0] & 0x10) for p in packets] == [True, False] * 3
    random.Random(3).shuffle(packets)
    receiver.feed(packets)
    assert [payload for _, payload in receiver.frames] == frames


def _vp8_packet(seq: int, descriptor: int, data: bytes, marker: bool) -> RtpPacket:
    packet = RtpPacket(
        payload_type=96, marker=int(marker), sequence_number=seq, timestamp=3000, ssrc=1,
        payload=bytes([descriptor]) + data,
    )  # fmt: skip
    return RtpPacket.parse(packet.serialize())


def test_vp8_start_of_a_later_partition_does_not_start_a_frame() -> None:
    """RFC 7741: S=1 with partition index 1 begins partition 1, not the frame. A frame
    whose first packet (partition 0) is lost must not be emitted from partition 1 on."""
    start_p0, start_p1, more_p1 = 0x10, 0x11, 0x01
    whole = [
        _vp8_packet(10, start_p0, b"\x10\x02\x9dAAAA", False),
        _vp8_packet(11, start_p1, b"BBBB", False),
        _vp8_packet(12, more_p1, b"CCCC", True),
    ]
    receiver = Receiver(Codec.VP8)
    receiver.feed(whole)
    assert receiver.frames == [(3000, b"\x10\x02\x9dAAAABBBBCCCC")]

    receiver = Receiver(Codec.VP8)
    receiver.feed(whole[1:], now=0.0)
    next_frame = _vp8_packet(13, start_p0, b"\x10\x02\x9dDDDD", True)
    next_frame.timestamp = 6000
    receiver.feed([next_frame], now=MAX_WAIT + 0.01)
    assert receiver.frames == [(6000, b"\x10\x02\x9dDDDD")]
    assert receiver.losses == 1


def test_unwrap_is_monotonic_across_wrap_and_tolerates_reordering() -> None:
    assembler = FrameAssembler()
    assert [assembler.unwrap(s) for s in (65534, 65535, 0, 65533, 1)] == [
        0x1FFFE, 0x1FFFF, 0x20000, 0x1FFFD, 0x20001,
    ]  # fmt: skip
