"""The operator dashboard in a real browser, charting a live stream.

A real aiortc publisher and viewer keep a stream flowing through the ``server`` fixture
(a full whipcast node with a real Kafka broker) while ``tests/browser/dashboard.mjs``
(Playwright, system Chromium) opens ``/dashboard``: it waits for the stream's bitrate and
latency, checks that the canvases hold drawn lines, drills down into the stream, and
cuts ``/api/stats`` off to see the "disconnected" state. Screenshots land in
``tests/artifacts/dashboard/``.

Setup (once):  apt-get install -y chromium && npm ci --prefix tests/browser
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from .browser_harness import ARTIFACTS, NEEDS_CHROMIUM, run_script
from .peers import play, publish

SHOTS = ARTIFACTS / "dashboard"

DATA_TIMEOUT_S = 45  # inside the script: until the stream has MIN_POINTS samples
MIN_POINTS = 5
RUN_TIMEOUT_S = 150  # the whole script: browser start, charts, drill-down, outage

pytestmark = NEEDS_CHROMIUM


async def run_dashboard(base_url: str, stream: str, shots: Path) -> tuple[int, dict | None, str]:
    """Run the Node script; return (exit code, its JSON result or None, stderr)."""
    args = [base_url, stream, str(shots)]
    args += ["--timeout", str(DATA_TIMEOUT_S), "--min-points", str(MIN_POINTS)]
    return await run_script("dashboard.mjs", *args, timeout=RUN_TIMEOUT_S)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
async def test_dashboard_charts_a_live_stream(server) -> None:
    stream = f"dash-{uuid.uuid4().hex[:8]}"
    shutil.rmtree(SHOTS, ignore_errors=True)
    publisher = await publish(server.url, stream)
    viewer = None
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream), 10)
        viewer = await play(server.url, stream)
        await viewer.wait_frames(10, timeout=20)

        code, result, stderr = await run_dashboard(server.url, stream, SHOTS)
    finally:
        if viewer is not None:
            await viewer.close()
        await publisher.close()

    assert result is not None, f"no JSON result (exit {code})\n{stderr}"
    assert code == 0 and result["ok"], f"{result.get('error')}\n{stderr}"
    assert result["withBitrate"] >= MIN_POINTS, result
    assert result["kbps"] > 0 and result["fps"] > 0, result
    assert result["p50"] > 0 and result["p99"] >= result["p50"], result
    assert result["viewers"] == 1, result
    assert stream in result["tableRow"], result
    assert {c["id"] for c in result["canvases"]} == {"audience", "bitrate", "latency", "lag"}
    assert all(c["sharp"] and c["ink"] > 0 for c in result["canvases"]), result["canvases"]
    assert result["drillDown"]["selected"] == stream, result["drillDown"]
    assert result["drillDown"]["showAll"], result["drillDown"]
    assert result["disconnected"]["badge"] == "Disconnected", result["disconnected"]
    for name in ("dashboard.png", "dashboard-dark.png", "dashboard-phone.png"):
        assert (SHOTS / name).is_file(), name
