"""Turn what the viewers, the publisher and /proc reported into one run's results.

Pure functions over plain data, so the numbers can be checked without a network.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

from .procs import ProcSample

G2G_P95_LIMIT_MS = 400.0
FRAME_LOSS_LIMIT = 0.01


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """p50/p95/p99 (nearest rank), max and sample count."""
    ordered = sorted(values)

    def rank(q: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)], 1)

    return {
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": round(ordered[-1], 1) if ordered else None,
        "n": len(ordered),
    }


def cdf(ordered: list[float], points: int = 21) -> list[float]:
    """The samples' quantiles at 0, 5, ..., 100 %: the whole distribution, small enough
    for the JSON and the chart."""
    if not ordered:
        return []
    last = len(ordered) - 1
    return [round(ordered[round(i * last / (points - 1))], 1) for i in range(points)]


def cpu_use(before: dict[str, ProcSample | None], after: dict[str, ProcSample | None],
            seconds: float) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per process: CPU seconds used between two samples, as % of one core, and RSS."""
    used = {}
    for name, start in before.items():
        end = after.get(name)
        if start is None or end is None:
            continue
        cpu_s = end.cpu_s - start.cpu_s
        used[name] = {
            "percent": round(100 * cpu_s / seconds, 1),
            "cpu_s": round(cpu_s, 2),
            "rss_mb": round(end.rss_mb, 1),
        }
    return used


def summarize(viewers: list[dict[str, Any]], frames_sent: int, window_s: float,
              server_cpu: dict[str, dict[str, float]]) -> dict[str, Any]:  # fmt: skip
    """The headline numbers of one run from the per-viewer results."""
    joined = [v for v in viewers if v["ttff_ms"] is not None]
    probes = [v for v in viewers if v["probe"]]
    received = sum(v["frames"] for v in joined)
    expected = frames_sent * len(joined)
    loss = max(0.0, 1 - received / expected) if expected else None
    failures = Counter(v["failure"] for v in viewers if v["failure"])
    samples = sorted(s for v in probes for s in v["g2g_ms"])
    g2g = percentiles(samples)
    viewer_seconds = len(joined) * window_s
    result: dict[str, Any] = {
        "viewers": len(viewers),
        "probes": len(probes),
        "joined": len(joined),
        "join_failures": sum(failures.values()),
        "join_failure_reasons": dict(failures.most_common(5)),
        "window_s": round(window_s, 2),
        "g2g_ms": g2g,
        "g2g_cdf_ms": cdf(samples),
        "ttff_ms": percentiles([v["ttff_ms"] for v in joined]),
        "ttff_probe_ms": percentiles([v["ttff_ms"] for v in joined if v["probe"]]),
        "ttff_breakdown_ms": {
            "answer_p50": percentiles([v["answer_ms"] for v in joined])["p50"],
            "first_packet_p50": percentiles([v["first_packet_ms"] for v in joined])["p50"],
        },
        "frames_sent": frames_sent,
        "frames_expected": expected,
        "frames_received": received,
        "frame_loss": round(loss, 5) if loss is not None else None,
        "frames_incomplete": sum(v["incomplete"] for v in joined),
        "packets_lost": sum(v["packets_lost"] for v in joined),
        "freezes": sum(v["freezes"] for v in joined),
        "freeze_ms": round(sum(v["freeze_ms"] for v in joined), 1),
        "probe_frames_decoded": sum(v["decoded"] for v in probes),
        "probe_stamps_unreadable": sum(v["unreadable"] for v in probes),
        "cpu_s_per_viewer_s": {
            role: round(use["cpu_s"] / viewer_seconds, 5) if viewer_seconds else None
            for role, use in server_cpu.items()
        },
    }
    result["verdict"] = verdict(result)
    return result


def verdict(run: dict[str, Any]) -> dict[str, Any]:
    """Whether a run stayed within the capacity limits, and if not, why."""
    reasons = []
    p95 = run["g2g_ms"]["p95"]
    if p95 is None:
        reasons.append("no glass-to-glass sample")
    elif p95 > G2G_P95_LIMIT_MS:
        reasons.append(f"g2g p95 {p95:.0f} ms > {G2G_P95_LIMIT_MS:.0f} ms")
    loss = run["frame_loss"]
    if loss is None:
        reasons.append("no viewer received frames")
    elif loss > FRAME_LOSS_LIMIT:
        reasons.append(f"frame loss {100 * loss:.1f} % > {100 * FRAME_LOSS_LIMIT:.0f} %")
    if run["join_failures"]:
        reasons.append(f"{run['join_failures']} join failures")
    return {"ok": not reasons, "reasons": reasons}


def capacity(runs: list[dict[str, Any]], egress_processes: int) -> dict[str, Any]:
    """Sweep result: the first viewer count per egress process past the limits, and the
    server's CPU-seconds per viewer-second (at each step, and egress's marginal cost)."""
    ok = list(itertools.takewhile(lambda r: r["verdict"]["ok"], runs))
    failing = next((r for r in runs if not r["verdict"]["ok"]), None)
    marginal = None
    points = [(r["joined"], r["cpu"]["egress"]["cpu_s"] / r["window_s"]) for r in runs
              if "egress" in r["cpu"] and r["joined"]]  # fmt: skip
    if len({x for x, _ in points}) > 1:
        n = len(points)
        mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        marginal = round(slope, 5)
    return {
        "limits": {"g2g_p95_ms": G2G_P95_LIMIT_MS, "frame_loss": FRAME_LOSS_LIMIT},
        "egress_processes": egress_processes,
        "max_ok_viewers_per_egress": ok[-1]["viewers"] / egress_processes if ok else 0,
        "limit_viewers_per_egress": failing["viewers"] / egress_processes if failing else None,
        "limit_reasons": failing["verdict"]["reasons"] if failing else [],
        "cpu_s_per_viewer_s": [{"viewers": r["viewers"], **r["cpu_s_per_viewer_s"]} for r in runs],
        "egress_marginal_cpu_s_per_viewer_s": marginal,
    }
