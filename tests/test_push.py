"""``whipcast push``: an FFmpeg-made MPEG-TS (encoded here with PyAV's libx264 and AAC)
published through the real CLI into a real broker, watched by an aiortc WHEP viewer."""

from __future__ import annotations

import asyncio
import fractions
import os
import sys
from pathlib import Path

import av
import numpy as np
from whipcast.gateway.push import PushError, check_token

from .peers import draw_counter, play

FPS = 30


def make_input(path: Path, seconds: float, bframes: int = 0) -> None:
    """An MPEG-TS file as ``ffmpeg -c:v libx264 -bf 0 -c:a aac -f mpegts`` makes it:
    counters in the pictures, AAC audio (push transcodes it to Opus)."""
    with av.open(str(path), "w", format="mpegts") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
        video.options = {"bf": str(bframes), "g": str(FPS), "preset": "ultrafast"}
        if not bframes:
            video.options["tune"] = "zerolatency"
        audio = out.add_stream("aac", rate=48000, layout="stereo")
        samples = 0
        for i in range(int(seconds * FPS)):
            picture = draw_counter(i).reformat(format="yuv420p")
            picture.pts, picture.time_base = i, fractions.Fraction(1, FPS)
            out.mux(video.encode(picture))
            while samples < (i + 1) * 48000 // FPS:
                tone = np.zeros((2, 1024), dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = 48000, samples
                out.mux(audio.encode(frame))
                samples += 1024
        out.mux(video.encode(None))
        out.mux(audio.encode(None))


async def run_push(server, stream: str, path: Path, *args: str, env=None):
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "whipcast.signaling.cli", "push", stream, "--input", str(path),
        "--kafka-bootstrap", server.settings.kafka_bootstrap, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )  # fmt: skip


async def test_push_mpegts_plays_to_a_whep_viewer(server, stream_name, tmp_path):
    source = tmp_path / "in.ts"
    make_input(source, 12.0)
    process = await run_push(server, stream_name, source)
    view = server.node.view
    assert await view.wait_for(lambda: view.get(stream_name), 30), "push never went live"
    info = view.get(stream_name)
    assert info.video["mimeType"] == "video/H264"
    assert info.video["parameters"]["packetization-mode"] == "1"
    assert len(info.video["parameters"]["profile-level-id"]) == 6
    assert info.audio["mimeType"] == "audio/opus"
    viewer = await play(server.url, stream_name)
    try:
        await viewer.wait_frames(60, timeout=20)
        values = [counter for _, counter, _ in viewer.frames]
        assert values == sorted(values), "frames out of order"
        assert values[-1] - values[0] >= 55
        assert viewer.audio_frames > 50, "transcoded audio reached the viewer"
    finally:
        await viewer.close()
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    # Paced at the input's timestamps: the registry says ended only after ~12 s.
    assert await view.wait_for(lambda: view.get(stream_name) is None, 10)
    assert view.records[stream_name].state == "ended"


async def test_push_refuses_b_frames_at_once(server, stream_name, tmp_path):
    source = tmp_path / "bframes.ts"
    make_input(source, 2.0, bframes=2)
    process = await run_push(server, stream_name, source)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode != 0
    assert "B-frames" in stderr.decode() and "-bf 0" in stderr.decode()
    assert server.node.view.records.get(stream_name) is None, "nothing was published"


async def test_push_needs_the_publish_token(server, stream_name, tmp_path):
    source = tmp_path / "in.ts"
    make_input(source, 1.0)
    env = {"WHIPCAST_PUBLISH_TOKEN": "s3cret"}
    process = await run_push(server, stream_name, source, "--token", "wrong", env=env)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode != 0 and "publish token" in stderr.decode()
    assert "s3cret" not in stderr.decode()
    check_token("s3cret", "s3cret")
    check_token(None, None)
    for presented in (None, "", "s3cre", "s3cret "):
        try:
            check_token("s3cret", presented)
        except PushError:
            continue
        raise AssertionError(f"{presented!r} accepted")
