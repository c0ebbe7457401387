"""LL-HLS packager benchmark: CPU per stream and playlist/part answers per core.

    python -m bench.hls_bench [--seconds 20] [--json FILE]

In one process, without Kafka or HTTP (so the numbers are the packager's own work):

- segmenting: ``--seconds`` of 720p30 H.264 at 1.5 Mbit/s plus 20 ms Opus packets,
  encoded once with PyAV, are pushed as frame records through
  :class:`~whipcast.gateway.hls.segmenter.Segmenter`; CPU time over media time is the
  packager's CPU per stream (% of one core), the Kafka consumer excluded (egress pays the
  same per stream topic: see ``gateway_bench``);
- rendering: the media playlist rendered as of its last part (what a blocking reload
  returns), in a loop: renders per second per core, before HTTP;
- HTTP: a child process serves that session through :mod:`whipcast.signaling.hls_api`
  (the node's real routes and middlewares, with the package filled in place of Kafka) and
  this process asks it for playlists (as of a part, as a blocking reload that is
  already satisfied) and parts over 32 keep-alive connections; answers per second over
  the server's CPU seconds (``/proc/PID/stat``) are answers per second per core.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import multiprocessing
import os
import time

import av
import numpy as np
from whipcast.gateway.frames import Codec, Frame, Track, is_keyframe
from whipcast.gateway.hls import playlist
from whipcast.gateway.hls.segmenter import Segmenter

HTTP_SECONDS = 8.0
CONNECTIONS = 32


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


def serve(records: list[Frame], port: int, ready) -> None:
    """The child process: one packaged session behind the real HLS routes."""
    from aiohttp import web
    from whipcast.gateway.hls.packager import HlsPackager, SessionPackage
    from whipcast.gateway.registry import StreamInfo
    from whipcast.gateway.settings import Settings
    from whipcast.signaling import hls_api
    from whipcast.signaling.app import make_app

    async def run() -> None:
        settings = Settings.from_env(env={}, kafka_bootstrap="127.0.0.1:1")
        info = StreamInfo("bench", 7, "n", audio={"mimeType": "audio/opus"},
                          video={"mimeType": "video/H264"})  # fmt: skip
        packager = HlsPackager(settings, None, None, None)  # type: ignore[arg-type]
        package = SessionPackage(settings, None, packager.finder, info)  # type: ignore[arg-type]
        for record in records:
            package.segmenter.push(record)
        packager.packages[("bench", 7)] = package
        app = web.Application(middlewares=make_app(settings).middlewares)
        hls_api.add_routes(app, packager, settings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.sleep(3600)

    asyncio.run(run())


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, paths: list[str], seconds: float) -> int:
    import aiohttp

    done = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:

        async def worker(offset: int) -> None:
            nonlocal done
            i = offset
            while time.monotonic() < deadline:
                async with http.get(paths[i % len(paths)]) as response:
                    await response.read()
                    assert response.status == 200, response.status
                done += 1
                i += 1

        await asyncio.gather(*(worker(i) for i in range(CONNECTIONS)))
    return done


def http_rate(records: list[Frame], segmenter: Segmenter, paths_for) -> dict:
    port = 18000 + os.getpid() % 1000
    ready = multiprocessing.Event()
    child = multiprocessing.Process(target=serve, args=(records, port, ready), daemon=True)
    child.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the HLS server did not start")
        rates = {}
        for name, paths in paths_for(segmenter).items():
            before = cpu_seconds(child.pid)
            answered = asyncio.run(load(port, paths, HTTP_SECONDS))
            cpu = cpu_seconds(child.pid) - before
            rates[name] = {"per_s": round(answered / HTTP_SECONDS),
                           "per_core_s": round(answered / max(cpu, 1e-3))}  # fmt: skip
        return rates
    finally:
        child.kill()
        child.join(5)


def paths_for(segmenter: Segmenter) -> dict[str, list[str]]:
    base = "/hls/bench/00000007"
    parts = [p for s in segmenter.segments[-3:] for p in s.parts]
    return {
        "playlist_as_of_part": [
            f"{base}/media.m3u8?_HLS_msn={p.msn}&_HLS_part={i}"
            for s in segmenter.segments[-3:]
            for i, p in enumerate(s.parts)
        ],
        "part": [f"{base}/part{p.index}.mp4" for p in parts],
    }


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
        "http": http_rate(records, segmenter, paths_for),
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
