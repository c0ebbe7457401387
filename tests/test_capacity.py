"""The capacity model's arithmetic holds together."""

from whipcast.loadtest.capacity import Assumptions, main, plan


def test_plan_scales_and_spills_to_hls(capsys):
    a = Assumptions()
    small, large = plan(1_000, a), plan(500_000_000, a)
    assert small.egress_nodes == 1 and small.hls_viewers == 0
    assert large.webrtc_viewers == a.webrtc_cap
    assert large.hls_viewers == 500_000_000 - a.webrtc_cap
    assert plan(100_000, a).egress_nodes == -(-100_000 // a.viewers_per_node)
    # One Kafka read per egress node (not per viewer): reads grow with nodes only.
    assert large.kafka_read_gbps < 1
    # The HLS origin's load is set by the CDN's caches, not by the audience.
    assert large.hls_origin_rps == plan(100_000_000, a).hls_origin_rps
    assert large.hls_origin_rps == a.cdn_edges * 2 / a.hls_part_s
    assert large.hls_origin_nodes == 2 and small.hls_origin_nodes == 0
    main(["--viewers", "1000", "--cores-per-node", "4"])
    assert "940 viewers per egress node" in capsys.readouterr().out


def test_nic_bound_nodes():
    a = Assumptions(cores_per_node=64, nic_gbps=1)
    assert plan(10_000, a).egress_bound == "nic"
