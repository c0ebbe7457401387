"""FFmpeg 8's WHIP muxer (as shipped in the PyAV wheel) publishes to ingest.

FFmpeg encodes H.264 constrained baseline + Opus and publishes with ``format="whip"``;
a real aiortc WHEP viewer decodes what egress sends and reads back the frame counters
drawn into the pixels.

Three things about FFmpeg as a WHIP client shape these tests:

- PyAV holds the GIL in ``avformat_write_header``, where the muxer does its whole WHIP
  POST, ICE and DTLS handshake (and in ``av_write_trailer``, where it sends DELETE). A
  publisher in a thread of this process would block the event loop that must answer
  that POST, so FFmpeg runs in a child process.
- The PyAV wheel's FFmpeg does DTLS with GnuTLS, whose self-signed certificate is
  ECDSA on secp224r1. OpenSSL (aiortc's DTLS) does not offer that curve and aborts the
  handshake with an ``illegal_parameter`` alert (FFmpeg logs "A TLS fatal alert has
  been received" / "DTLS session failed"). The muxer's ``cert_file``/``key_file``
  options give it a P-256 certificate instead.
- Once media flows, FFmpeg sends STUN binding requests every 5 s but answers none, so
  ICE consent-freshness checks (aioice, RFC 7675) from ingest would go unanswered and
  close the connection after about 30 s; ingest stops them once connected, and the long
  test guards that.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aioice.ice
import av
import numpy as np
import pytest
from whipcast.gateway.ingest import IngestStats
from whipcast.loadtest.ffmpeg_cert import write_p256_certificate

from .peers import Viewer, play

ROOT = Path(__file__).resolve().parent.parent
FPS = 30
PUBLISH_SECONDS = 6.0
CONSENT_INTERVAL_S = 1
"""aioice's consent check interval for the long test (5 s by default): it gives up after
6 unanswered checks (``CONSENT_FAILURES``), 4.8-7.2 s at 1 s instead of 24-36 s."""
LONG_PUBLISH_SECONDS = 20.0
AUDIO_RATE = 48000
AUDIO_FRAME = 960  # 20 ms of Opus
CHILD = (
    "import sys; from tests.test_ffmpeg_whip import publish_with_ffmpeg; "
    "publish_with_ffmpeg(sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4])"
)

pytestmark = pytest.mark.skipif(
    "whip" not in av.formats_available, reason="this PyAV build has no WHIP muxer"
)


def publish_with_ffmpeg(url: str, seconds: float, cert_file: str, key_file: str) -> None:
    """Child process: publish counter frames + Opus through FFmpeg's WHIP muxer at real
    time, then print one JSON line: frames sent, the error if any, FFmpeg's log."""
    from tests.peers import HEIGHT, WIDTH, draw_counter

    av.logging.set_level(av.logging.VERBOSE)
    sent, error = 0, None
    with av.logging.Capture(local=False) as logs:
        try:
            options = {
                "handshake_timeout": "10000",
                "pkt_size": "1200",
                "cert_file": cert_file,
                "key_file": key_file,
            }
            with av.open(url, mode="w", format="whip", options=options) as out:
                video = out.add_stream(
                    "libx264",
                    rate=FPS,
                    options={
                        "profile": "baseline",
                        "tune": "zerolatency",
                        "preset": "veryfast",
                        "g": str(FPS),
                        "bf": "0",
                    },
                )
                video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
                audio = out.add_stream("libopus", rate=AUDIO_RATE, layout="stereo")
                silence = np.zeros((1, AUDIO_FRAME * 2), dtype=np.int16)
                audio_pts = 0
                start = time.monotonic()
                while time.monotonic() - start < seconds:
                    frame = draw_counter(sent).reformat(format="yuv420p")
                    frame.pts, frame.time_base = sent, fractions.Fraction(1, FPS)
                    for packet in video.encode(frame):
                        out.mux(packet)
                    sent += 1
                    while audio_pts < sent * AUDIO_RATE // FPS:
                        chunk = av.AudioFrame.from_ndarray(silence, format="s16", layout="stereo")
                        chunk.sample_rate, chunk.pts = AUDIO_RATE, audio_pts
                        for packet in audio.encode(chunk):
                            out.mux(packet)
                        audio_pts += AUDIO_FRAME
                    time.sleep(max(0.0, start + sent / FPS - time.monotonic()))
                for packet in video.encode(None):
                    out.mux(packet)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    log = [[level, name, message.strip()] for level, name, message in logs]
    print(json.dumps({"sent": sent, "error": error, "log": log}), flush=True)


def ffmpeg_report(stdout: bytes, stderr: bytes) -> tuple[dict, str]:
    """The child's JSON result, and its FFmpeg log and stderr as readable text."""
    try:
        result = json.loads(stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        result = {"sent": 0, "error": "publisher printed no result", "log": []}
    lines = [
        f"  [{level}] {name}: {' | '.join(message.splitlines())[:400]}"
        for level, name, message in result["log"]
        if name not in ("libx264", "libopus", "swscaler")
    ]
    text = "\n".join(lines[-40:])
    if stderr.strip():
        text += "\n  stderr: " + stderr.decode(errors="replace")[-2000:]
    return result, text


@dataclass
class Outcome:
    result: dict
    """The publisher's report: frames sent, its error if any, FFmpeg's log."""
    log: str
    returncode: int | None
    viewer: Viewer
    stats: IngestStats
    session_lasted: float | None
    """Seconds from going live until ingest dropped the session (None: it outlived
    FFmpeg)."""


async def publish_and_watch(server, stream: str, tmp_path: Path, seconds: float) -> Outcome:
    """FFmpeg publishes for ``seconds`` in a child process while a viewer watches; the
    child is killed on any failure. Fails the test with FFmpeg's log if it never goes
    live."""
    cert, key = write_p256_certificate(tmp_path)
    url = f"{server.url}/whip/{stream}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, url, str(seconds), str(cert), str(key),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    outcome = asyncio.create_task(proc.communicate())

    async def fail(reason: str):
        if not outcome.done():
            proc.kill()
        _, log = ffmpeg_report(*await asyncio.wait_for(outcome, 10))
        pytest.fail(f"{reason}; FFmpeg said:\n{log}")

    viewer = None
    try:
        view = server.node.view
        live = asyncio.create_task(view.wait_for(lambda: view.get(stream) is not None, 20))
        await asyncio.wait({live, outcome}, timeout=25, return_when=asyncio.FIRST_COMPLETED)
        if not live.done() or not live.result():
            live.cancel()
            await fail("FFmpeg's WHIP publish never went live")
        live_at = time.monotonic()
        session = server.node.ingest.sessions.get(stream)
        try:
            viewer = await play(server.url, stream)
        except AssertionError as exc:
            await fail(f"no viewer could join ({exc})")
        if session is None or outcome.done():
            await fail("the WHIP session ended early")
        lasted = None
        deadline = live_at + seconds + 30
        while not outcome.done() and time.monotonic() < deadline:
            if lasted is None and server.node.ingest.sessions.get(stream) is not session:
                lasted = time.monotonic() - live_at
            await asyncio.sleep(0.1)
        # FFmpeg ends by itself after ``seconds`` (its trailer DELETEs the session).
        stdout, stderr = await asyncio.wait_for(asyncio.shield(outcome), 5)
        result, log = ffmpeg_report(stdout, stderr)
        await asyncio.sleep(0.3)  # the last frames' way through Kafka and egress
        return Outcome(result, log, proc.returncode, viewer, session.stats, lasted)
    finally:
        if viewer is not None:
            await viewer.close(delete=False)
        if proc.returncode is None:
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(outcome, 10)


async def test_ffmpeg_whip_publish(server, stream_name, tmp_path):
    """Counters drawn by FFmpeg arrive at a WHEP viewer in order, with audio."""
    run = await publish_and_watch(server, stream_name, tmp_path, PUBLISH_SECONDS)
    result, log = run.result, run.log
    assert run.returncode == 0 and result["error"] is None, f"FFmpeg failed:\n{log}"

    frames = run.viewer.frames
    counters = [c for _, c, _ in frames]
    assert len(counters) >= FPS * (PUBLISH_SECONDS - 2), (
        f"viewer decoded {len(counters)} frames of {result['sent']} sent:\n{log}"
    )
    assert frames[0][2], "the first decoded frame must be a keyframe"
    assert counters == sorted(counters) and len(set(counters)) == len(counters), counters
    assert max(counters) < result["sent"]
    steps = [b - a for a, b in zip(counters, counters[1:], strict=False)]
    assert sum(s == 1 for s in steps) >= 0.95 * len(steps), steps
    # Live to the end: the viewer got frames from the last second of publishing.
    assert max(counters) >= result["sent"] - FPS, (max(counters), result["sent"])
    assert run.viewer.audio_frames > 50 * (PUBLISH_SECONDS - 2), run.viewer.audio_frames

    assert run.stats.keyframes >= PUBLISH_SECONDS - 1, run.stats
    assert run.stats.frames_lost == 0 and run.stats.malformed_rtp == 0, run.stats
    # FFmpeg's trailer DELETEs its session resource, which ends the session.
    assert any("Dispose resource" in m and m.endswith("ok") for _, _, m in result["log"]), log
    assert run.session_lasted is not None, "the WHIP session outlived FFmpeg's DELETE"


async def test_ffmpeg_whip_outlives_consent_checks(
    server, stream_name, tmp_path, caplog, monkeypatch
):
    """A publish longer than ICE consent freshness allows without answers (RFC 7675:
    aioice gives up after 6 unanswered checks, about 30 s at its 5 s interval; checks
    every second here, so twice that fits in a 20 s publish) keeps going to the end."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", CONSENT_INTERVAL_S)
    assert LONG_PUBLISH_SECONDS > 2 * 1.2 * CONSENT_INTERVAL_S * aioice.ice.CONSENT_FAILURES
    caplog.set_level(logging.INFO, logger="aioice")
    caplog.set_level(logging.INFO, logger="whipcast.gateway")
    run = await publish_and_watch(server, stream_name, tmp_path, LONG_PUBLISH_SECONDS)
    if run.session_lasted is not None and run.session_lasted < LONG_PUBLISH_SECONDS - 1:
        server_log = "\n".join(
            f"  {r.name}: {r.getMessage()}"
            for r in caplog.records
            if r.name.startswith("whipcast.gateway.ingest") or "Consent" in r.getMessage()
        )
        pytest.fail(
            f"ingest dropped FFmpeg's session {run.session_lasted:.1f} s into a "
            f"{LONG_PUBLISH_SECONDS:.0f} s publish. FFmpeg's WHIP muxer answers no STUN "
            "binding requests once media flows (it sends its own every 5 s), so the ingest's "
            "ICE consent checks (aioice, RFC 7675) expire and close the connection.\n"
            f"server log:\n{server_log}\nFFmpeg said:\n{run.log}"
        )
    assert run.returncode == 0 and run.result["error"] is None, f"FFmpeg failed:\n{run.log}"
    counters = [c for _, c, _ in run.viewer.frames]
    assert counters and max(counters) >= run.result["sent"] - FPS, (
        max(counters, default=None),
        run.result["sent"],
    )
