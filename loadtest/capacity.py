"""Capacity model: nodes, Kafka throughput and bandwidth for one event's audience.

``python -m whipcast.loadtest.capacity [--viewers 1000 100000 ...] [--egress-viewers-per-core N]``

Per-node figures default to what ``bench/gateway_bench.py`` measured on this project's
2-core machines (``docs/benchmarks.md``); pass your own from a load test of your
hardware. Assumptions are printed with the result, and ``docs/scaling.md`` explains
them. WebRTC egress serves the interactive audience up to ``--webrtc-cap`` viewers;
beyond it a CDN-delivered LL-HLS tier (packaged once from the same Kafka topic) takes
the rest, because WebRTC egress costs CPU per viewer and a CDN does not.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Assumptions:
    video_kbps: float = 1500
    audio_kbps: float = 64
    rtp_overhead: float = 0.06
    """RTP/SRTP/UDP/IP headers on top of the media bitrate, as a fraction."""
    egress_viewers_per_core: float = 235
    """Marginal, from the benchmark's per-viewer CPU slope (0.42 % of a core)."""
    cores_per_node: int = 16
    """One egress process per core; the node's NIC is the other limit."""
    nic_gbps: float = 10
    nic_utilisation: float = 0.7
    webrtc_cap: int = 1_000_000
    """Largest audience served over WebRTC; the rest watch LL-HLS from a CDN."""
    kafka_broker_read_gbps: float = 2.0
    """Sustained fetch throughput one broker serves from page cache."""
    hls_renditions: int = 1
    """HLS renditions packaged: the ``hls`` role passes the publisher's H.264 through,
    one rendition (a transcoded ladder would add one Kafka read and packager each)."""
    hls_part_s: float = 0.5
    """LL-HLS part duration: each HLS client asks for one playlist and one part per part."""
    hls_requests_per_core: float = 5000
    """Playlist answers per second one core of an ``hls`` node gives (``bench/hls_bench.py``:
    ~5,000 playlists or ~10,000 parts; the lower figure is used)."""
    cdn_edges: int = 500
    """CDN caches that each fetch every playlist and part from the origin once (shield
    and edge tiers together); the origin's load depends on them, not on the audience."""

    @property
    def viewer_mbps(self) -> float:
        return (self.video_kbps + self.audio_kbps) * (1 + self.rtp_overhead) / 1000

    @property
    def viewers_per_node(self) -> int:
        by_cpu = self.egress_viewers_per_core * self.cores_per_node
        by_nic = self.nic_gbps * 1000 * self.nic_utilisation / self.viewer_mbps
        return int(min(by_cpu, by_nic))


@dataclass(frozen=True)
class Plan:
    audience: int
    webrtc_viewers: int
    hls_viewers: int
    egress_nodes: int
    egress_bound: str
    kafka_read_gbps: float
    kafka_brokers: int
    egress_gbps: float
    cdn_gbps: float
    hls_origin_rps: float = 0.0
    """Requests per second that reach the ``hls`` origin nodes (through the CDN)."""
    hls_origin_nodes: int = 0
    """``hls`` nodes for that load (two at least, for redundancy)."""
    ingest_nodes: int = 2
    """One active ingest for the event's stream, one standby."""


def plan(audience: int, a: Assumptions) -> Plan:
    webrtc = min(audience, a.webrtc_cap)
    hls = audience - webrtc
    per_node = a.viewers_per_node
    nodes = math.ceil(webrtc / per_node)
    by_cpu = a.egress_viewers_per_core * a.cores_per_node
    # Every egress node reads the stream once; HLS packagers add one read per rendition.
    stream_mbps = (a.video_kbps + a.audio_kbps) / 1000
    kafka_gbps = (nodes + a.hls_renditions) * stream_mbps / 1000
    # Behind a CDN each cache asks the origin once per part (playlist + part): the origin
    # load stops growing with the audience once every cache has a viewer.
    origin_rps = min(hls, a.cdn_edges) * a.hls_renditions * 2 / a.hls_part_s
    per_hls_node = a.hls_requests_per_core * a.cores_per_node
    origin_nodes = max(2, math.ceil(origin_rps / per_hls_node)) if hls else 0
    return Plan(
        audience=audience,
        webrtc_viewers=webrtc,
        hls_viewers=hls,
        egress_nodes=nodes,
        egress_bound="cpu" if by_cpu <= per_node else "nic",
        kafka_read_gbps=round(kafka_gbps, 3),
        kafka_brokers=max(1, math.ceil(kafka_gbps / a.kafka_broker_read_gbps)),
        egress_gbps=round(webrtc * a.viewer_mbps / 1000, 1),
        cdn_gbps=round(hls * stream_mbps / 1000, 1),
        hls_origin_rps=round(origin_rps),
        hls_origin_nodes=origin_nodes,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m whipcast.loadtest.capacity",
        description=__doc__.replace("``", ""),  # help is plain text, not reST
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--viewers", type=int, nargs="+",
                        default=[1_000, 100_000, 10_000_000, 500_000_000])  # fmt: skip
    defaults = Assumptions()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    a = Assumptions(**{k: getattr(args, k) for k in asdict(defaults)})
    print("assumptions:", ", ".join(f"{k}={v}" for k, v in asdict(a).items()))
    print(f"per viewer {a.viewer_mbps:.2f} Mbps on the wire; {a.viewers_per_node} viewers per "
          f"egress node")  # fmt: skip
    header = (
        f"{'audience':>12} {'WebRTC':>10} {'LL-HLS':>12} {'egress nodes':>13} {'bound':>6} "
        f"{'Kafka read Gbps':>16} {'brokers':>8} {'egress Gbps':>12} {'CDN Gbps':>10} "
        f"{'HLS origin req/s':>17} {'hls nodes':>10}"
    )
    print(header)
    print("-" * len(header))
    for audience in args.viewers:
        p = plan(audience, a)
        print(
            f"{p.audience:>12,} {p.webrtc_viewers:>10,} {p.hls_viewers:>12,} "
            f"{p.egress_nodes:>13,} {p.egress_bound:>6} {p.kafka_read_gbps:>16,.3f} "
            f"{p.kafka_brokers:>8,} {p.egress_gbps:>12,.1f} {p.cdn_gbps:>10,.1f} "
            f"{p.hls_origin_rps:>17,.0f} {p.hls_origin_nodes:>10,}"
        )


if __name__ == "__main__":
    main()
