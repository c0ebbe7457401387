"""Real-browser end to end: headless Chromium publishes over WHIP and watches over WHEP.

Drives ``tests/browser/publish_and_watch.mjs`` (Playwright, system Chromium, fake camera
and microphone) against the ``server`` fixture: a full whipcast node with a real Kafka
broker. Screenshots of both pages land in ``tests/artifacts/browser-<codec>/``.

Setup (once):  apt-get install -y chromium && npm ci --prefix tests/browser
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
BROWSER_DIR = TESTS / "browser"
SCRIPT = BROWSER_DIR / "publish_and_watch.mjs"
ARTIFACTS = TESTS / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")

FRAME_TIMEOUT_S = 20  # how long the viewer may take to play, inside the script
MIN_FRAMES = 30
RUN_TIMEOUT_S = 90  # the whole script: browser start, publish, watch, screenshots

# Skipping is for a developer's machine without a browser; CI installs both and must
# run these tests, so there a missing piece fails loudly instead.
IN_CI = bool(os.environ.get("CI"))

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists() and not IN_CI,
        reason=f"{CHROMIUM} not found (apt-get install -y chromium)",
    ),
    pytest.mark.skipif(
        not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir() and not IN_CI,
        reason="tests/browser/node_modules missing (npm ci --prefix tests/browser)",
    ),
]


async def run_publish_and_watch(
    base_url: str, stream: str, codec: str, shots: Path, token: str | None
) -> tuple[int, dict | None, str]:
    """Run the Node script; return (exit code, its JSON result or None, stderr)."""
    node = shutil.which("node")
    assert node, "node is not on PATH (needed for the browser test)"
    args = [node, str(SCRIPT), base_url, stream, str(shots), "--codec", codec]
    args += ["--timeout", str(FRAME_TIMEOUT_S), "--min-frames", str(MIN_FRAMES)]
    if token:
        args += ["--token", token]
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=BROWSER_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(
            f"publish_and_watch.mjs ran past {RUN_TIMEOUT_S} s\n"
            f"stdout:\n{out.decode(errors='replace')}\nstderr:\n{err.decode(errors='replace')}"
        )
    result = None
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    return proc.returncode, result, err.decode(errors="replace")


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
    assert (shots / "publish.png").is_file() and (shots / "watch.png").is_file()
