"""``whipcast loadtest``: the capture-time stamp through real codecs, and a short real
run (1 publisher, 3 viewers, one of them a decoding probe) against a test node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from whipcast.loadtest import chart, report
from whipcast.loadtest import cli as loadtest_cli
from whipcast.loadtest.procs import parse_cpus, pin, unavailable_cpus
from whipcast.loadtest.report import SCHEMA_VERSION
from whipcast.loadtest.runner import LoadConfig, execute
from whipcast.loadtest.source import StampedSource, VideoFormat
from whipcast.loadtest.stamp import StampLayout, age_ms
from whipcast.loadtest.viewer import FREEZE_NS
from whipcast.signaling.cli import build_parser

DECODERS = {"h264": "h264", "vp8": "vp8"}


@pytest.mark.parametrize("codec", ["h264", "vp8"])
@pytest.mark.parametrize("size", [(1280, 720), (320, 240)])
def test_stamp_survives_encoder_and_decoder(codec: str, size: tuple[int, int]) -> None:
    """Every frame's stamp reads back exactly after a real encode at the target bitrate
    and a real decode, and it is the wall-clock time the frame was made."""
    width, height = size
    source = StampedSource(VideoFormat(codec, width, height, 30, 1500 if width > 320 else 300))
    decoder = av.CodecContext.create(DECODERS[codec], "r")
    ages = []
    for _ in range(20):
        packet = source.next_packet()
        for frame in decoder.decode(av.Packet(bytes(packet))):
            plane = frame.planes[0]
            luma = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
            stamp = StampLayout(frame.width, frame.height).read(luma)
            assert stamp is not None
            ages.append(age_ms(stamp, time.time_ns() // 1_000_000))
    assert len(ages) == 20
    assert all(0 <= age < 1000 for age in ages)


def test_stamp_rejects_a_corrupted_band() -> None:
    layout = StampLayout(640, 360)
    luma = np.full((360, 640), 128, np.uint8)
    layout.paint(luma, 1_700_000_000_123)
    assert layout.read(luma) == 1_700_000_000_123 & ((1 << 40) - 1)
    cell = layout.cell
    luma[:cell, :cell] = 255 - luma[:cell, :cell]  # flip the first cell
    assert layout.read(luma) is None


def test_loadtest_is_a_whipcast_command() -> None:
    args = build_parser().parse_args(
        ["loadtest", "--sweep", "viewers=1,10,25", "--codec", "vp8", "--probes", "1"]
    )
    assert args.command == "loadtest" and args.sweep == [1, 10, 25] and args.codec == "vp8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadtest", "--sweep", "viewers=10,1"])


async def test_smoke_run_measures_glass_to_glass_from_pixels(server, tmp_path) -> None:
    config = LoadConfig(
        fmt=VideoFormat("h264", 640, 360, 30, 800),
        viewers=3,
        probes=1,
        duration=3,
        warmup=1,
        ramp=20,
        url=server.url,
        stream_prefix="smoke",
    )
    result = await execute(config, None, lambda line: None)

    assert result["schema_version"] == SCHEMA_VERSION and result["mode"] == "single"
    for key in ("g2g_ms", "ttff_ms"):
        assert set(result[key]) >= {"p50", "p95", "p99"}
    assert result["viewers"] == 3 and result["probes"] == 1
    assert result["join_failures"] == 0 and result["joined"] == 3
    # Frames flowed to every viewer (loose bounds: CI machines are shared and small).
    assert result["frames_sent"] > 30
    assert result["frames_received"] > 0.5 * 3 * result["frames_sent"]
    # Freezes are gaps longer than FREEZE_NS, within the window the viewers watched.
    window_ms = 3 * result["window_s"] * 1000
    assert result["freezes"] * FREEZE_NS / 1e6 <= result["freeze_ms"] <= window_ms
    assert (result["freezes"] == 0) == (result["freeze_ms"] == 0)
    assert isinstance(result["keyframe_drops"], int)  # read from the node's /metrics
    # Latency comes from stamps decoded out of the probe's pictures, one per frame.
    assert result["g2g_ms"]["n"] == result["probe_frames_decoded"] > 30
    assert 0 < result["g2g_ms"]["p50"] <= result["g2g_ms"]["p95"] < 5000
    assert 0 < result["ttff_ms"]["p50"] < 15_000
    assert result["cpu"] == {}  # the node runs inside this test process: not sampled
    assert result["generator"]["publisher"]["cpu_s"] > 0
    assert result["generator"]["viewers"]["workers"] == 1

    report.write_json(result, tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["g2g_ms"] == result["g2g_ms"]
    chart.draw([result], tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert "viewers probes" in report.table(result)


def test_cpu_lists_pin_every_thread_of_a_process() -> None:
    """``--server-cpus`` / ``--load-cpus``: a taskset-style list, checked against the CPUs
    this process may use, pins every thread a child already has (as ``taskset -a``)."""
    allowed = sorted(os.sched_getaffinity(0))
    one = allowed[-1]
    assert parse_cpus("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpus(f"{one},{one}") == {one}
    for bad in ("", "a-b"):
        with pytest.raises(ValueError):
            parse_cpus(bad)
    assert unavailable_cpus(frozenset(allowed)) is None
    assert "not available here" in unavailable_cpus(frozenset({100_000}))
    args = build_parser().parse_args(["loadtest", "--server-cpus", str(one)])
    assert args.server_cpus == {one} and args.load_cpus is None
    with pytest.raises(SystemExit, match="--load-cpus: CPUs \\[100000\\]"):
        loadtest_cli._check(build_parser().parse_args(["loadtest", "--load-cpus", "100000"]))
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); "
    code += "print(flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # its second thread is running
        pin(child.pid, frozenset({one}))
        tasks = os.listdir(f"/proc/{child.pid}/task")
        assert len(tasks) >= 2
        assert all(os.sched_getaffinity(int(t)) == {one} for t in tasks)
    finally:
        child.kill()
        child.wait(10)
