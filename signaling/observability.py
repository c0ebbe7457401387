"""Health, readiness, Prometheus metrics and the live stats behind the dashboard."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .app import Node


def add_routes(app: web.Application, node: Node) -> None:
    async def healthz(request: web.Request) -> web.Response:
        """Liveness: the process serves HTTP."""
        return web.json_response({"status": "ok", "node": node.settings.node_id})

    async def readyz(request: web.Request) -> web.Response:
        """Readiness: started, and Kafka answered within the last probe interval."""
        checks = {"started": node.ready, "kafka": node.bus.reachable}
        status = 200 if all(checks.values()) else 503
        return web.json_response(
            {"ready": status == 200, "checks": checks, "roles": list(node.roles)}, status=status
        )

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(node.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(node_stats(node))

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)

    async def nodes(request: web.Request) -> web.Response:
        """The media nodes this node knows to be up (from the node registry)."""
        alive = [n for n in node.nodes.records.values() if n.alive and n.media]
        return web.json_response({"nodes": [asdict(n) for n in alive]})

    app.router.add_get("/api/stats", stats)
    app.router.add_get("/api/nodes", nodes)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def node_stats(node: Node) -> dict:
    """One JSON snapshot of everything the dashboard charts, polled once a second."""
    streams: dict[str, dict] = {}
    if node.ingest is not None:
        for name, session in node.ingest.sessions.items():
            s = session.stats
            streams.setdefault(name, {})["ingest"] = {
                "video_bytes": s.bytes[0],
                "audio_bytes": s.bytes[1],
                "video_frames": s.frames[0],
                "audio_frames": s.frames[1],
                "keyframe_interval_s": round(s.keyframe_interval_s, 3),
                "frames_lost": s.frames_lost,
                "malformed_rtp": s.malformed_rtp,
                "rtp_packets_lost": session.rtp_packets_lost,
            }
    if node.egress is not None:
        counts = node.egress.viewer_counts()
        for name, fanout in node.egress.fanouts.items():
            latency = list(fanout.latency_ms)[-300:]
            totals = fanout.totals()
            lag_records, lag_ms = fanout.lag
            estimates = [
                v.estimate.bitrate / 1000 for v in fanout.viewers if v.estimate is not None
            ]
            streams.setdefault(name, {})["egress"] = {
                "viewers": counts[name],
                "viewers_rewound": counts[name] - len(fanout.viewers),
                "frames_sent": totals.frames_sent,
                "keyframe_drops": totals.keyframe_drops,
                "retransmissions": totals.retransmissions,
                "retransmissions_refused": totals.refused_budget
                + totals.refused_age
                + totals.refused_repeat,
                "keyframes_from_cache": totals.cached_keyframes,
                # Per-viewer adaptation, aggregated (no per-viewer series anywhere).
                "video_pauses": totals.pauses,
                "video_paused_s": round(totals.paused_s, 1),
                "viewers_paused": sum(v.video_paused for v in fanout.viewers),
                "estimate_cuts": totals.congestion_cuts,
                "estimate_kbps_min": _round(min(estimates, default=None)),
                "estimate_kbps_p50": _round(_percentile(estimates, 50)),
                # Simulcast layers: viewers on each (best first), switches summed.
                "viewers_per_layer": fanout.viewers_per_layer(),
                "layer_switches_up": totals.layer_switches_up,
                "layer_switches_down": totals.layer_switches_down,
                "layer_failed_ups": totals.layer_failed_ups,
                "latency_ms_p50": _round(_percentile(latency, 50)),
                "latency_ms_p99": _round(_percentile(latency, 99)),
                "lag_records": lag_records,
                "lag_ms": round(lag_ms, 1),
            }
    return {
        "time": time.time(),
        "node": node.settings.node_id,
        "roles": list(node.roles),
        "kafka_reachable": node.bus.reachable,
        "streams": streams,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
