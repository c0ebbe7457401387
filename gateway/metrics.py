"""Prometheus metrics of one node (``/metrics``), all named ``whipcast_*``.

Counters that the media path keeps anyway (per-session stats dataclasses) are read
when Prometheus scrapes, by :class:`GatewayCollector`, so the per-packet and
per-viewer paths pay nothing for them; only latency histograms are observed as events
happen. Each node owns its registry, so several nodes in one process never mix
numbers. Label cardinality is bounded: no per-viewer labels, and at most
:data:`MAX_STREAM_LABELS` stream names per node; further streams are summed under
``stream="_other"``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

MAX_STREAM_LABELS = 100
OTHER = "_other"

# Fine steps where gateway latency lives (a few ms), coarse ones for trouble.
_LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.04, 0.08, 0.16, 0.32, 0.64,
)  # fmt: skip
_JOIN_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class Metrics:
    """The node's registry and the few metrics observed as events happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(namespace="whipcast", registry=r)
        self.produce_latency = Histogram(
            "whipcast_kafka_produce_latency_seconds", "Frame handed to the producer until acked",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.gateway_latency = Histogram(
            "whipcast_gateway_latency_seconds",
            "Gateway-added latency: frame complete at ingest until egress sent it to viewers;"
            " observed only where ingest and egress share a process (one clock for both ends)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_to_first_frame = Histogram(
            "whipcast_egress_time_to_first_frame_seconds",
            "WHEP request until the viewer's first video frame was sent",
            buckets=_JOIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.keyframe_wait = Histogram(
            "whipcast_egress_join_keyframe_wait_seconds",
            "Viewer connected (DTLS up) until its first keyframe was sent",
            buckets=_JOIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.http_requests = Counter(
            "whipcast_http_requests", "HTTP requests by route and status",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip


class StreamSeries:
    """Collects per-stream samples for one scrape, enforcing the cardinality cap."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], dict[tuple[str, ...], float]] = defaultdict(
            lambda: defaultdict(float)
        )
        self.meta: dict[str, tuple[str, str, tuple[str, ...]]] = {}

    def add(self, kind: str, name: str, doc: str, stream: str, value: float, **labels: str) -> None:
        self.meta[name] = (kind, doc, ("stream", *labels))
        self.values[(kind, name)][(stream, *labels.values())] += value

    def families(self) -> Iterator[Any]:
        streams = sorted({key[0] for series in self.values.values() for key in series})
        kept = set(streams[:MAX_STREAM_LABELS])
        for (kind, name), series in self.values.items():
            _, doc, labels = self.meta[name]
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, doc, labels=list(labels))
            capped: dict[tuple[str, ...], float] = defaultdict(float)
            for key, value in series.items():
                stream = key[0] if key[0] in kept else OTHER
                capped[(stream, *key[1:])] += value
            for key, value in capped.items():
                family.add_metric(list(key), value)
            yield family


class GatewayCollector:
    """Reads the node's media state at scrape time; ``sources`` yield per-stream dicts
    (see ``IngestNode.snapshot`` and ``EgressNode.snapshot``)."""

    def __init__(self, sources: list[Callable[[StreamSeries], None]], node: dict) -> None:
        self._sources = sources
        self._node = node

    def collect(self) -> Iterator[Any]:
        series = StreamSeries()
        for source in self._sources:
            source(series)
        yield from series.families()
        for name, (kind, doc, value) in self._node.items():
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family_type(name, doc, value=value() if callable(value) else value)
