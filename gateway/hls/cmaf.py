"""CMAF (fragmented MP4, ISO/IEC 14496-12 and 23000-19) boxes for LL-HLS: an init
segment per codec configuration and one ``moof``+``mdat`` fragment per part.

Written by hand rather than through PyAV's mp4 muxer because LL-HLS needs what that
muxer cannot give: a fragment cut exactly where the segmenter decides, at once (FFmpeg
emits a fragment only when the next packet arrives, and PyAV has no flush), and bytes
that depend on nothing but the frames, so that every packager node produces identical
files (no encoder version string, no creation time). The subset is small: one H.264
track and an optional Opus track, no edit lists, no composition offsets (WebRTC
encoders send no B-frames).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VIDEO_TIMESCALE = 90000
AUDIO_TIMESCALE = 48000
VIDEO_TRACK_ID = 1
AUDIO_TRACK_ID = 2
_SYNC = 0x02000000  # sample_depends_on = 2 (independent)
_NON_SYNC = 0x01010000  # depends on others, sample_is_non_sync_sample
_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", version << 24 | flags), *payload)


@dataclass(frozen=True, slots=True)
class H264Config:
    sps: bytes
    pps: bytes
    width: int
    height: int

    @property
    def codec(self) -> str:
        """The RFC 6381 ``CODECS`` value, e.g. ``avc1.42e01f``."""
        return "avc1." + self.sps[1:4].hex()


@dataclass(frozen=True, slots=True)
class OpusConfig:
    channels: int = 2

    codec = "opus"  # lowercase: what Chromium's MSE accepts


def _video_entry(config: H264Config) -> bytes:
    avcc = box(
        b"avcC",
        bytes([1, config.sps[1], config.sps[2], config.sps[3], 0xFF, 0xE1]),
        struct.pack(">H", len(config.sps)),
        config.sps,
        b"\x01",
        struct.pack(">H", len(config.pps)),
        config.pps,
    )
    return box(
        b"avc1",
        bytes(6),
        struct.pack(">H", 1),  # data_reference_index
        bytes(16),
        struct.pack(">HHIIIH", config.width, config.height, 0x480000, 0x480000, 0, 1),
        bytes(32),  # compressorname
        struct.pack(">Hh", 0x18, -1),
        avcc,
    )


def _audio_entry(config: OpusConfig) -> bytes:
    dops = box(b"dOps", struct.pack(">BBHIhB", 0, config.channels, 0, AUDIO_TIMESCALE, 0, 0))
    return box(
        b"Opus",
        bytes(6),
        struct.pack(">H", 1),
        bytes(8),
        struct.pack(">HHHHI", config.channels, 16, 0, 0, AUDIO_TIMESCALE << 16),
        dops,
    )


def _trak(track_id: int, timescale: int, entry: bytes, video: H264Config | None) -> bytes:
    width, height = (video.width, video.height) if video else (0, 0)
    tkhd = full_box(
        b"tkhd",
        0,
        3,  # enabled, in movie
        struct.pack(">IIIII", 0, 0, track_id, 0, 0),
        bytes(8),
        struct.pack(">hhhH", 0, 0, 0 if video else 0x100, 0),
        _MATRIX,
        struct.pack(">II", width << 16, height << 16),
    )
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))
    handler, name = (b"vide", b"VideoHandler\x00") if video else (b"soun", b"SoundHandler\x00")
    hdlr = full_box(b"hdlr", 0, 0, bytes(4), handler, bytes(12), name)
    header = full_box(b"vmhd", 0, 1, bytes(8)) if video else full_box(b"smhd", 0, 0, bytes(4))
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(
        b"stbl",
        full_box(b"stsd", 0, 0, struct.pack(">I", 1), entry),
        full_box(b"stts", 0, 0, bytes(4)),
        full_box(b"stsc", 0, 0, bytes(4)),
        full_box(b"stsz", 0, 0, bytes(8)),
        full_box(b"stco", 0, 0, bytes(4)),
    )
    return box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", header, dinf, stbl)))


def init_segment(video: H264Config, audio: OpusConfig | None) -> bytes:
    """``ftyp`` + ``moov`` describing the tracks; no samples."""
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6cmfcisommp41avc1")
    tracks = [_trak(VIDEO_TRACK_ID, VIDEO_TIMESCALE, _video_entry(video), video)]
    trexes = [full_box(b"trex", 0, 0, struct.pack(">IIIII", VIDEO_TRACK_ID, 1, 0, 0, 0))]
    if audio is not None:
        tracks.append(_trak(AUDIO_TRACK_ID, AUDIO_TIMESCALE, _audio_entry(audio), None))
        trexes.append(full_box(b"trex", 0, 0, struct.pack(">IIIII", AUDIO_TRACK_ID, 1, 0, 0, 0)))
    next_id = AUDIO_TRACK_ID + 1 if audio else VIDEO_TRACK_ID + 1
    mvhd = full_box(
        b"mvhd",
        0,
        0,
        struct.pack(">IIII", 0, 0, 1000, 0),
        struct.pack(">IH", 0x10000, 0x100),
        bytes(10),
        _MATRIX,
        bytes(24),
        struct.pack(">I", next_id),
    )
    return ftyp + box(b"moov", mvhd, *tracks, box(b"mvex", *trexes))


@dataclass(slots=True)
class Sample:
    data: bytes
    duration: int
    """In the track's timescale."""
    sync: bool = True


@dataclass(slots=True)
class Run:
    """One track's samples in a fragment, starting at ``decode_time``."""

    track_id: int
    decode_time: int
    samples: list[Sample]


def fragment(sequence: int, runs: list[Run]) -> bytes:
    """One ``moof`` + ``mdat``: a CMAF chunk, which is what an LL-HLS part is."""
    runs = [run for run in runs if run.samples]

    def moof(offsets: list[int]) -> bytes:
        trafs = []
        for run, offset in zip(runs, offsets, strict=True):
            entries = b"".join(
                struct.pack(">III", s.duration, len(s.data), _SYNC if s.sync else _NON_SYNC)
                for s in run.samples
            )
            trafs.append(
                box(
                    b"traf",
                    full_box(b"tfhd", 0, 0x020000, struct.pack(">I", run.track_id)),
                    full_box(b"tfdt", 1, 0, struct.pack(">Q", run.decode_time)),
                    full_box(
                        b"trun", 0, 0x000701, struct.pack(">Ii", len(run.samples), offset), entries
                    ),
                )
            )
        return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)

    size = len(moof([0] * len(runs)))  # offsets do not change the size
    offsets, position = [], size + 8
    for run in runs:
        offsets.append(position)
        position += sum(len(s.data) for s in run.samples)
    payload = b"".join(s.data for run in runs for s in run.samples)
    return moof(offsets) + box(b"mdat", payload)
