"""The rewind timeline, question markers and thumbnails in a real browser.

Drives ``tests/browser/rewind.mjs`` (Playwright, system Chromium, fake camera) against
its own whipcast node with a real Kafka broker: the studio broadcasts, the watch page
seeks back with "−10 s" and the seek bar's arrow key while video keeps decoding, a
question becomes a marker that seeks to its moment, "L" returns to live, and the
directory shows the stream's thumbnail. Screenshots land in ``tests/artifacts/rewind/``.
"""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from .browser_harness import ARTIFACTS, NEEDS_CHROMIUM, run_script
from .conftest import start_server

SHOTS = ARTIFACTS / "rewind"
RUN_TIMEOUT_S = 170  # the script's own hard limit is 150 s

pytestmark = NEEDS_CHROMIUM


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
async def test_seek_bar_markers_and_thumbnails_in_chromium(kafka) -> None:
    shutil.rmtree(SHOTS, ignore_errors=True)
    server = await start_server(kafka, thumbnail_interval=1.0)
    try:
        stream = f"rewind-{uuid.uuid4().hex[:8]}"
        code, result, stderr = await run_script(
            "rewind.mjs", server.url, stream, str(SHOTS), timeout=RUN_TIMEOUT_S
        )
    finally:
        await server.runner.cleanup()

    assert result is not None, f"no JSON result (exit {code})\n{stderr}"
    (SHOTS / "result.json").write_text(json.dumps(result, indent=1))
    assert code == 0 and result["ok"], f"{result.get('error')}\n{stderr}"
    assert "behind live" in result["valueText"], result
    assert result["thumbnail"]["width"] > 0, result
    for name in ("watch", "watch-phone", "studio", "directory", "directory-phone"):
        assert (SHOTS / f"{name}.png").is_file(), name
