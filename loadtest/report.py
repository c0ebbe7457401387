"""What a person reads: the live progress line, the results table, the JSON file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

SCHEMA_VERSION = 1
"""Of the JSON report; raised when a field changes meaning or goes away."""


class ProgressLine:
    """One line rewritten in place on a terminal; elsewhere (CI logs) a line every few
    seconds, so a log stays readable."""

    def __init__(self, stream: TextIO = sys.stderr, every_s: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._width = 0

    def __call__(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif time.monotonic() - self._last >= self.every_s or text.endswith(("done", "...")):
            self.stream.write(text + "\n")
            self._last = time.monotonic()
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0


def runs_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A sweep's runs, or a single run's report as its one run."""
    return report.get("runs") or [report]


def merge(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One report per codec and picture format: single runs saved apart join as one."""
    merged: dict[tuple, dict[str, Any]] = {}
    for report in reports:
        fmt = report["config"]["fmt"]
        key = (fmt["codec"], fmt["width"], fmt["height"], fmt["fps"], fmt["bitrate_kbps"])
        if key in merged:
            merged[key].pop("sweep", None)  # a sweep's verdict covers its own runs only
        entry = merged.setdefault(key, {**report, "runs": []})
        entry["runs"] = sorted(entry["runs"] + runs_of(report), key=lambda r: r["viewers"])
    return list(merged.values())


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _cpu(run: dict[str, Any]) -> str:
    roles = " ".join(f"{role} {use['percent']:.0f}" for role, use in run["cpu"].items())
    return roles or "not sampled"


def table(report: dict[str, Any]) -> str:
    """The results, one row per run, widths fixed so rows line up across a sweep."""
    runs = runs_of(report)
    fmt = report["config"]["fmt"]
    lines = [
        f"{fmt['codec']} {fmt['width']}x{fmt['height']} {fmt['fps']} fps "
        f"{fmt['bitrate_kbps']} kbps, {report['config']['streams']} stream(s), "
        f"target {report['target']['kind']}, window {runs[0]['window_s']:.0f} s",
        "",
        f"{'viewers':>7} {'probes':>6} | {'g2g p50':>7} {'p95':>5} {'p99':>5} | "
        f"{'TTFF p50':>8} {'p95':>5} | {'frames rx/expected':>18} {'loss':>6} | "
        f"{'freezes':>7} {'kf drops':>8} {'join fail':>9} | {'server CPU % of a core':<28} | "
        f"generator % | other %",
    ]
    lines.append("-" * len(lines[-1]))
    for run in runs:
        g2g, ttff = run["g2g_ms"], run["ttff_ms"]
        loss = "-" if run["frame_loss"] is None else f"{100 * run['frame_loss']:.2f}%"
        generator = run["generator"]
        publisher = generator["publisher"]["percent"] if generator["publisher"] else 0
        drops = "-" if run["keyframe_drops"] is None else run["keyframe_drops"]
        lines.append(
            f"{run['viewers']:>7} {run['probes']:>6} | {_ms(g2g['p50']):>7} "
            f"{_ms(g2g['p95']):>5} {_ms(g2g['p99']):>5} | {_ms(ttff['p50']):>8} "
            f"{_ms(ttff['p95']):>5} | "
            f"{run['frames_received']:>8}/{run['frames_expected']:<9} {loss:>6} | "
            f"{run['freezes']:>7} {drops:>8} {run['join_failures']:>9} | "
            f"{_cpu(run):<28} | pub {publisher:.0f} viewers {generator['viewers']['percent']:.0f}"
            f"{' SATURATED' if generator['saturated'] else ''} | "
            f"{run['other_processes_percent']:.0f}"
        )
    lines += [
        "",
        "g2g: capture time painted in the pixels -> decoded by a probe viewer (ms);",
        "TTFF: WHEP POST -> first decoded frame (probes) or first complete frame (others);",
        "CPU in % of one core; other: what else kept this machine busy meanwhile.",
    ]
    if report.get("sweep"):
        lines.append(_sweep_lines(report["sweep"]))
    for run in runs:
        if run["join_failure_reasons"]:
            lines.append(
                f"join failures at {run['viewers']} viewers: {run['join_failure_reasons']}"
            )
    return "\n".join(lines)


def _sweep_lines(sweep: dict[str, Any]) -> str:
    limit = sweep["limit_viewers_per_egress"]
    if limit is None:
        text = f"capacity: within limits up to {sweep['max_ok_viewers_per_egress']:.0f} viewers"
    else:
        text = (f"capacity: limit reached at {limit:.0f} viewers per egress process "
                f"({'; '.join(sweep['limit_reasons'])}); "
                f"last good: {sweep['max_ok_viewers_per_egress']:.0f}")  # fmt: skip
    per_viewer = "; ".join(
        f"{row['viewers']} viewers: "
        + ", ".join(
            f"{role} {value * 1000:.2f}"
            for role, value in row.items()
            if role != "viewers" and value is not None
        )  # fmt: skip
        for row in sweep["cpu_s_per_viewer_s"]
    )
    marginal = sweep["egress_marginal_cpu_s_per_viewer_s"]
    return (f"\n{text}\nCPU-ms per viewer-second: {per_viewer}"
            + (f"\negress marginal: {marginal * 1000:.2f} CPU-ms per viewer-second"
               if marginal is not None else ""))  # fmt: skip


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A saved report, refused when it is of another schema version."""
    report = json.loads(path.read_text())
    if report.get("schema_version") != SCHEMA_VERSION:
        raise SystemExit(f"{path}: schema_version {report.get('schema_version')!r}, "
                         f"this whipcast reads {SCHEMA_VERSION}")  # fmt: skip
    return report
