"""Real-browser end to end: headless Chromium publishes over WHIP and watches over WHEP.

Drives ``tests/browser/publish_and_watch.mjs`` (Playwright, system Chromium, fake camera
and microphone; then "Clip the last 30 s" on the watch and studio pages) against the
``server`` fixture: a full whipcast node with a real Kafka broker. Screenshots of both
pages and the clips land in ``tests/artifacts/browser-<codec>/``.

Setup (once):  apt-get install -y chromium && npm ci --prefix tests/browser
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from .browser_harness import ARTIFACTS, NEEDS_CHROMIUM, run_script

FRAME_TIMEOUT_S = 20  # how long the viewer may take to play, inside the script
MIN_FRAMES = 30
RUN_TIMEOUT_S = 130  # the whole script: browser start, publish, watch, clips, screenshots

pytestmark = NEEDS_CHROMIUM


async def run_publish_and_watch(
    base_url: str, stream: str, codec: str, shots: Path, token: str | None
) -> tuple[int, dict | None, str]:
    """Run the Node script; return (exit code, its JSON result or None, stderr)."""
    args = [base_url, stream, str(shots), "--codec", codec]
    args += ["--timeout", str(FRAME_TIMEOUT_S), "--min-frames", str(MIN_FRAMES)]
    if token:
        args += ["--token", token]
    return await run_script("publish_and_watch.mjs", *args, timeout=RUN_TIMEOUT_S)


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
@pytest.mark.parametrize("codec", ["h264", "vp8"])
async def test_publish_and_watch_in_chromium(server, codec: str) -> None:
    stream = f"browser-{codec}-{uuid.uuid4().hex[:8]}"
    shots = ARTIFACTS / f"browser-{codec}"
    shutil.rmtree(shots, ignore_errors=True)
    token = server.settings.publish_token

    code, result, stderr = await run_publish_and_watch(server.url, stream, codec, shots, token)

    assert result is not None, f"no JSON result (exit {code})\n{stderr}"
    assert code == 0 and result["ok"], f"{result.get('error')}\n{stderr}"
    assert result["framesDecoded"] >= MIN_FRAMES, result
    assert result["presentedFrames"] > 0, result
    assert result["videoWidth"] > 0 and result["videoHeight"] > 0, result
    # whipcast never transcodes: the viewer decodes what the publisher encoded.
    assert result["publisher"]["codec"].lower() == codec, result
    assert result["codec"].lower() == codec, result
    container = "webm" if codec == "vp8" else "mp4"
    for page in ("watch", "studio"):
        clip = result["clips"][page]
        assert clip["container"] == container and clip["bytes"] > 10_000, result
        assert clip["name"].startswith(stream) and clip["name"].endswith("." + container)
    assert (shots / "publish.png").is_file() and (shots / "watch.png").is_file()
