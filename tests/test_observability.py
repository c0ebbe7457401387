"""Metrics, readiness and alert rules, checked against live nodes with media flowing."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from pathlib import Path

import aiohttp
import yaml
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from whipcast.gateway.broker import EmbeddedKafka
from whipcast.gateway.nodes import NodeInfo
from whipcast.gateway.settings import Settings
from whipcast.signaling.logs import JsonFormatter

from .conftest import free_port, start_server
from .peers import play, post_sdp, publish
from .test_whip_whep import offer

ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"


async def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_metrics_move_with_media(server, stream_name):
    publisher = await publish(server.url, stream_name)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewer = await play(server.url, stream_name)
        await viewer.wait_frames(20)
        first = await scrape(server.url)
        await asyncio.sleep(1.5)
        second = await scrape(server.url)
        s = stream_name
        for name in ("whipcast_ingest_frames_total", "whipcast_egress_frames_sent_total"):
            assert value(second, name, stream=s) > value(first, name, stream=s) > 0, name
        assert value(second, "whipcast_ingest_frames_total", stream=s, track="audio") > 0
        assert value(second, "whipcast_egress_viewers", stream=s) == 1
        assert value(second, "whipcast_gateway_latency_seconds_count") > 0
        assert value(second, "whipcast_egress_time_to_first_frame_seconds_count") >= 1
        assert value(second, "whipcast_kafka_produce_latency_seconds_count") > 0
        assert value(second, "whipcast_kafka_up") == 1
        assert value(second, "whipcast_process_resident_memory_bytes") > 0
        # The reader keeps up: lag returns to about zero.
        assert value(second, "whipcast_egress_consumer_lag_records", stream=s) <= 5
        assert value(second, "whipcast_egress_consumer_lag_seconds", stream=s) < 1
        # No per-viewer label anywhere.
        assert not any("viewer" in dict(labels) or "resource" in dict(labels)
                       for _, labels in second)  # fmt: skip
        await viewer.close()
    finally:
        await publisher.close()


async def test_status_codes_are_counted(server):
    route = {"route": "/whip/{stream}", "method": "POST", "status": "415"}
    before = value(await scrape(server.url), "whipcast_http_requests_total", **route)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(f"{server.url}/whip/x", data="v=0") as response:
                assert response.status == 415
    after = value(await scrape(server.url), "whipcast_http_requests_total", **route)
    assert after == before + 3


async def test_stats_api(server, stream_name):
    publisher = await publish(server.url, stream_name)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewer = await play(server.url, stream_name)
        await viewer.wait_frames(10)
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/api/stats") as r:
            stats = await r.json()
        stream = stats["streams"][stream_name]
        assert stream["ingest"]["video_frames"] > 0 and stream["ingest"]["video_bytes"] > 0
        assert stream["egress"]["viewers"] == 1
        assert stream["egress"]["latency_ms_p50"] is not None
        await viewer.close()
    finally:
        await publisher.close()


async def test_nodes_api_lists_only_media_nodes(server):
    """Nodes that only read the log (thumbnails, hls, record) or only route (signaling)
    take no WebRTC sessions: /api/nodes leaves them out, whatever else they run."""
    tag = uuid.uuid4().hex[:6]
    roles = {
        "thumbnails": ["thumbnails"],
        "hls": ["hls"],
        "record": ["record"],
        "signaling": ["signaling"],
        "readers": ["signaling", "thumbnails", "hls", "record"],
        "ingest": ["ingest"],
        "edge": ["egress", "hls"],
    }
    names = {f"{tag}-{key}": value for key, value in roles.items()}
    producer = AIOKafkaProducer(bootstrap_servers=server.settings.kafka_bootstrap)
    await producer.start()
    nodes = server.node.nodes
    try:
        for _ in range(20):  # heartbeats until all are seen alive, bounded
            for name, node_roles in names.items():
                info = NodeInfo(name, node_roles, "http://127.0.0.1:9")
                await producer.send(server.node.bus.nodes_topic, info.encode(), key=name.encode())
            await producer.flush()
            if await nodes.wait_for(
                lambda: all(n in nodes.records and nodes.records[n].alive for n in names), 0.5
            ):
                break
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/api/nodes") as r:
            listed = {n["node"] for n in (await r.json())["nodes"]} & set(names)
        assert listed == {f"{tag}-ingest", f"{tag}-edge"}
    finally:
        for name in names:  # tombstones: leave the shared registry as it was
            await producer.send(server.node.bus.nodes_topic, None, key=name.encode())
        await producer.stop()


async def readiness(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as response:
        return response.status


async def wait_status(url: str, status: int, timeout: float) -> bool:
    for _ in range(int(timeout / 0.25)):
        if await readiness(url) == status:
            return True
        await asyncio.sleep(0.25)
    return False


async def test_readiness_follows_the_broker(tmp_path):
    """/readyz turns 503 while Kafka is down and 200 when it is back; /healthz stays 200."""
    settings = Settings.from_env()
    port = free_port()
    broker = EmbeddedKafka(settings, data_dir=tmp_path / "kafka", port=port)
    await broker.start()
    server = await start_server(broker)
    try:
        assert await readiness(server.url) == 200
        await broker.stop()
        assert await wait_status(server.url, 503, 15), "readyz stayed 200 without Kafka"
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/healthz") as r:
            assert r.status == 200
        # New sessions are refused with a retry hint instead of hanging or failing.
        async with aiohttp.ClientSession(base_url=server.url) as http:
            for endpoint in ("whip", "whep"):
                direction = "sendonly" if endpoint == "whip" else "recvonly"
                status, headers, _ = await post_sdp(
                    http, f"/{endpoint}/down", await offer("video", direction=direction)
                )
                assert status == 503 and headers["Retry-After"] == "5", endpoint
        broker = EmbeddedKafka(settings, data_dir=tmp_path / "kafka", port=port)
        await broker.start()
        assert await wait_status(server.url, 200, 30), "readyz did not recover with Kafka"
    finally:
        await server.runner.cleanup()
        await broker.stop()


async def test_alert_rules_name_real_metrics(server, stream_name):
    """Every metric an alert uses exists on a live node with a stream and a viewer."""
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert len(rules) >= 5
    publisher = await publish(server.url, stream_name)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewer = await play(server.url, stream_name)
        await viewer.wait_frames(5)
        async with aiohttp.ClientSession() as http:
            await http.post(f"{server.url}/whip/x", data="v=0")
        names = {name for name, _ in await scrape(server.url)}
        await viewer.close()
    finally:
        await publisher.close()
    for rule in rules:
        used = set(re.findall(r"\b(whipcast_[a-z_]+)", rule["expr"]))
        assert used, rule["alert"]
        missing = used - names
        assert not missing, f"{rule['alert']} uses metrics no node exports: {missing}"


async def test_media_events_are_logged_with_context(server, stream_name, caplog):
    """Publish and view events name their stream and resource; JSON lines carry them,
    and no SDP reaches the log."""
    caplog.set_level(logging.INFO, logger="whipcast.gateway")
    publisher = await publish(server.url, stream_name)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewer = await play(server.url, stream_name)
        await viewer.wait_frames(3)
        await viewer.close()
    finally:
        await publisher.close()
    events = [r for r in caplog.records if getattr(r, "stream", None) == stream_name]
    messages = [r.getMessage() for r in events]
    assert any(m.startswith("publish started") for m in messages), messages
    assert any(m == "viewer joined" for m in messages), messages
    assert all(len(getattr(r, "resource", "")) >= 32 for r in events)
    entry = json.loads(JsonFormatter().format(events[0]))
    assert entry["stream"] == stream_name and entry["resource"] == events[0].resource
    assert not any("a=fingerprint" in r.getMessage() or "v=0" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
