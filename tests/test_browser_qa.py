"""The studio, watch, embed and directory pages with live Q&A, in a real browser.

Drives ``tests/browser/studio_qa.mjs`` (Playwright, system Chromium, fake camera and
microphone) against its own whipcast node with a publish token and a real Kafka broker:
the studio goes live, two viewers and an embed play, a question reaches the other
viewer and the studio within 1 s, the host's "answered" reaches both viewers within
1 s, an HTML-injection attempt shows as text, and a viewer reconnects by itself after
the publisher restarts. Screenshots land in ``tests/artifacts/pages/``.

Setup (once):  apt-get install -y chromium && npm ci --prefix tests/browser
"""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from .browser_harness import ARTIFACTS, NEEDS_CHROMIUM, run_script
from .conftest import start_server

SHOTS = ARTIFACTS / "pages"
TOKEN = "studio-test-token"
MIN_FRAMES = 30
RUN_TIMEOUT_S = 170  # the script's own hard limit is 150 s

pytestmark = NEEDS_CHROMIUM


async def run_studio_qa(base_url: str, stream: str) -> tuple[int, dict | None, str]:
    """Run the Node script; return (exit code, its JSON result or None, stderr)."""
    args = [base_url, stream, str(SHOTS), "--token", TOKEN, "--min-frames", str(MIN_FRAMES)]
    return await run_script("studio_qa.mjs", *args, timeout=RUN_TIMEOUT_S)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
async def test_studio_watch_and_live_questions_in_chromium(kafka) -> None:
    shutil.rmtree(SHOTS, ignore_errors=True)
    server = await start_server(kafka, publish_token=TOKEN)
    try:
        stream = f"studio-{uuid.uuid4().hex[:8]}"
        code, result, stderr = await run_studio_qa(server.url, stream)
    finally:
        await server.runner.cleanup()

    assert result is not None, f"no JSON result (exit {code})\n{stderr}"
    (SHOTS / "result.json").write_text(json.dumps(result, indent=1))
    assert code == 0 and result["ok"], f"{result.get('error')}\n{stderr}"
    for viewer in ("viewerA", "viewerB"):
        assert result[viewer]["framesDecoded"] >= MIN_FRAMES, result
        assert result[viewer]["presentedFrames"] >= MIN_FRAMES, result
        assert result[viewer]["codec"].lower() == "h264", result
    assert result["questionArrivalMs"] <= 1000 and result["answeredArrivalMs"] <= 1000, result
    assert result["injectionShownAsText"] and result["reconnected"], result
    for name in ("directory", "studio", "watch", "embed", "watch-phone"):
        assert (SHOTS / f"{name}.png").is_file(), name
