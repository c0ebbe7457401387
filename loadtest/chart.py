"""The PNG chart: latency percentiles and CPU against viewer count.

Left: glass-to-glass p50/p95/p99 against viewer count, with the 400 ms capacity limit
and the p50/p95 goals drawn in, so a point above a line is read at a glance. Middle: the
latency distribution of each run (its CDF), which shows a tail a percentile hides.
Right: CPU per server role and of the viewer processes (dashed) in % of one core, so it
shows which side ran out. Several reports (e.g. H.264 solid, VP8 dotted) share the axes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import merge, runs_of  # noqa: E402
from .stats import G2G_P95_LIMIT_MS  # noqa: E402

GOAL_P50_MS, GOAL_P95_MS = 150, 300
MIN_SCALE_MS = 50
MARKERS = ("o", "s", "^", "D")
QUANTILE_COLORS = {"p50": "#1b9e77", "p95": "#d95f02", "p99": "#7570b3"}


ROLE_COLORS = {
    "egress": "#1f77b4",
    "ingest": "#ff7f0e",
    "node": "#1f77b4",
    "kafka": "#2ca02c",
    "publisher": "#8c564b",
    "viewers": "#7f7f7f",
    "other processes": "#d62728",
}
SERVER_ROLES = ("egress", "ingest", "node", "kafka")


def _label(report: dict[str, Any]) -> str:
    fmt = report["config"]["fmt"]
    return f"{fmt['codec'].upper()} {fmt['height']}p{fmt['fps']}"


def _style(k: int) -> dict[str, str]:
    """First report solid with circles, the next dotted with squares, ..."""
    return {"linestyle": ("-", ":", "-.", "--")[k % 4], "marker": MARKERS[k % len(MARKERS)]}


def _once(k: int, label: str) -> str:
    """Series are labelled for the first report only; :func:`_keys` tells reports apart."""
    return label if k == 0 else "_nolegend_"


def _keys(ax: plt.Axes, reports: list[dict[str, Any]]) -> None:
    if len(reports) > 1:
        for k, report in enumerate(reports):
            ax.plot([], [], color="black", label=_label(report), **_style(k))


def draw(reports: list[dict[str, Any]], path: Path, title: str | None = None) -> None:
    """Write the three panels for one or more reports to ``path`` (PNG)."""
    reports = merge(reports)
    fig, (lat, dist, cpu) = plt.subplots(1, 3, figsize=(15, 4.6), dpi=90)
    counts = sorted({r["viewers"] for report in reports for r in runs_of(report)})
    _latency(lat, reports)
    _distribution(dist, reports, counts)
    _cpu(cpu, reports)
    for ax in (lat, cpu):
        ax.set_xticks(counts)
        ax.set_xlim(min(counts) - max(1, counts[-1] * 0.05), counts[-1] * 1.05 + 1)
    for ax in (lat, dist, cpu):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if ax is dist else "best")
    fig.suptitle(title or _title(reports[0]), fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _title(report: dict[str, Any]) -> str:
    fmt, machine = report["config"]["fmt"], report["machine"]
    return (f"whipcast loadtest: {report['config']['streams']} stream(s), "
            f"{fmt['width']}x{fmt['height']} {fmt['fps']} fps {fmt['bitrate_kbps']} kbps, "
            f"target {report['target']['kind']}, {machine['nproc']} cores "
            f"({machine['cpu_model']})")  # fmt: skip


def _latency(ax: plt.Axes, reports: list[dict[str, Any]]) -> None:
    for k, report in enumerate(reports):
        runs = runs_of(report)
        xs = [r["viewers"] for r in runs]
        for q, color in QUANTILE_COLORS.items():
            ys = [r["g2g_ms"][q] for r in runs]
            ax.plot(xs, ys, color=color, label=_once(k, q), **_style(k))
    _keys(ax, reports)
    p99s = [r["g2g_ms"]["p99"] or 0 for report in reports for r in runs_of(report)]
    top = max([MIN_SCALE_MS, *p99s]) * 1.3
    ax.set_ylim(0, top)
    note = _thresholds(ax.axhline, top)
    ax.set(xlabel="viewers" + note, ylabel="ms", title="Glass-to-glass latency (decoded pixels)")


def _thresholds(line: Any, top: float) -> str:
    """The goals and the capacity limit, drawn where they fall on the scale; a note for
    the axis label names the others: the data, not the empty space under a far-away
    line, gets the axis."""
    off_scale = []
    for value, label, color, style in (
        (GOAL_P50_MS, "p50 goal", QUANTILE_COLORS["p50"], ":"),
        (GOAL_P95_MS, "p95 goal", QUANTILE_COLORS["p95"], "--"),
        (G2G_P95_LIMIT_MS, "capacity limit (p95)", "red", "-"),
    ):
        if value <= top:
            line(value, color=color, linewidth=1, linestyle=style, label=label)
        else:
            off_scale.append(f"{label.split(' (')[0]} {value:.0f}")
    return "\n(off scale: " + ", ".join(off_scale) + " ms)" if off_scale else ""


def _distribution(ax: plt.Axes, reports: list[dict[str, Any]], counts: list[int]) -> None:
    shades = plt.get_cmap("viridis")
    for k, report in enumerate(reports):
        for r in runs_of(report):
            quantiles = r["g2g_cdf_ms"]
            if not quantiles:
                continue
            shade = shades(counts.index(r["viewers"]) / max(1, len(counts) - 1) * 0.85)
            fractions = [i / (len(quantiles) - 1) for i in range(len(quantiles))]
            ax.plot(quantiles, fractions, color=shade, linestyle=_style(k)["linestyle"],
                    label=f"{_label(report)}, {r['viewers']} viewers")  # fmt: skip
    right = max([MIN_SCALE_MS] + [max(r["g2g_cdf_ms"], default=0) for report in reports
                                  for r in runs_of(report)]) * 1.1  # fmt: skip
    ax.set_xlim(0, right)
    note = _thresholds(ax.axvline, right)
    ax.set(xlabel="glass-to-glass latency (ms)" + note, ylabel="fraction of frames",
           title="Latency distribution per run", ylim=(0, 1.02))  # fmt: skip


def _cpu(ax: plt.Axes, reports: list[dict[str, Any]]) -> None:
    for k, report in enumerate(reports):
        runs = runs_of(report)
        xs = [r["viewers"] for r in runs]
        series = {role: [r["cpu"].get(role, {}).get("percent") for r in runs]
                  for role in sorted({role for r in runs for role in r["cpu"]})}  # fmt: skip
        series["publisher"] = [(r["generator"]["publisher"] or {}).get("percent") for r in runs]
        series["viewers"] = [r["generator"]["viewers"]["percent"] for r in runs]
        series["other processes"] = [r["other_processes_percent"] for r in runs]
        for role, ys in series.items():
            server = role in SERVER_ROLES
            label = role if server or role.startswith("other") else f"{role} (load generator)"
            ax.plot(xs, ys, color=ROLE_COLORS[role], alpha=1 if server else 0.5,
                    label=_once(k, label), **_style(k))  # fmt: skip
    _keys(ax, reports)
    ax.set(xlabel="viewers", ylabel="% of one core", title="CPU per process")
    ax.set_ylim(bottom=0)
