"""Simulcast ingest: the offer's RIDs and the answer, picture sizes from keyframe headers,
and a simulcasting aiortc publisher (tests/peers.py) against a real node and broker:
layers demultiplexed by RID onto their partitions, ordered by size, RTX by repaired RID,
keyframe requests per layer, a single-layer topic grown for a simulcast publish."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from aiortc.sdp import SessionDescription
from whipcast.gateway import simulcast
from whipcast.gateway.control import KeyframeRequester
from whipcast.gateway.errors import SessionError
from whipcast.gateway.frames import Codec, Frame, is_keyframe, video_partition
from whipcast.gateway.videosize import video_size

from .conftest import start_server
from .peers import RID_PACKETS, publish, publish_simulcast

# The video section of a Chromium simulcast offer, as Chromium 14x writes it.
CHROME_VIDEO = """\
m=video 9 UDP/TLS/RTP/SAVPF 96 97
c=IN IP4 0.0.0.0
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuvwx
a=fingerprint:sha-256 {fingerprint}
a=setup:actpass
a=mid:1
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id
a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id
a=sendonly
a=rtcp-mux
a=rtpmap:96 VP8/90000
a=rtcp-fb:96 nack pli
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
{rids}"""
RIDS = "a=rid:h send\na=rid:m send\na=rid:l send\na=simulcast:send h;m;l\n"


def offer_with(rids: str, extmaps: bool = True) -> tuple[str, object]:
    text = "v=0\no=- 1 2 IN IP4 127.0.0.1\ns=-\nt=0 0\na=group:BUNDLE 1\n"
    text += CHROME_VIDEO.format(rids=rids, fingerprint=":".join(["AB"] * 32))
    if not extmaps:
        text = "\n".join(line for line in text.split("\n") if "stream-id" not in line)
    text = text.replace("\n", "\r\n")
    return text, SessionDescription.parse(text).media[0]


def test_offer_rids_in_simulcast_order_with_extensions() -> None:
    offered = simulcast.parse_offer(*offer_with(RIDS))
    assert offered is not None
    assert [r.rid for r in offered.rids] == ["h", "m", "l"]
    assert offered.best_first() == ["h", "m", "l"]
    assert {(e.id, e.uri) for e in offered.extensions} == {
        (10, simulcast.RID_URI),
        (11, simulcast.REPAIRED_RID_URI),
    }


def test_offer_variants() -> None:
    # Size limits order the layers; "~" (paused) and alternatives are understood;
    # more than three layers are cut to three; recv RIDs are not layers.
    rids = (
        "a=rid:q send max-width=320;max-height=180\na=rid:f send max-width=1280\n"
        "a=rid:x send max-width=640\na=rid:z send\na=rid:in recv\n"
        "a=simulcast:send q;~f,y;x;z recv in\n"
    )
    offered = simulcast.parse_offer(*offer_with(rids))
    assert [r.rid for r in offered.rids] == ["q", "f", "x"]
    assert offered.rids[0].max_width == 320 and offered.rids[0].max_height == 180
    assert offered.best_first() == ["f", "x", "q"]


@pytest.mark.parametrize(
    "rids",
    [
        "",  # no simulcast at all
        "a=rid:h send\na=simulcast:send h\n",  # one layer
        "a=rid:h send\na=rid:m send\n",  # RIDs without a=simulcast
        "a=simulcast:send h;m\n",  # a=simulcast without a=rid lines
    ],
)
def test_not_simulcast(rids: str) -> None:
    assert simulcast.parse_offer(*offer_with(rids)) is None


def test_simulcast_without_rid_extension_is_one_layer() -> None:
    assert simulcast.parse_offer(*offer_with(RIDS, extmaps=False)) is None


@pytest.mark.parametrize(
    "rids", ["a=rid:h!x send\n" + RIDS, RIDS.replace("h;m;l", "h;m;l<script>"), "a=rid:\n"]
)
def test_malformed_rids_are_a_client_error(rids: str) -> None:
    with pytest.raises(SessionError):
        simulcast.parse_offer(*offer_with(rids))


def test_answer_lists_the_accepted_rids_in_the_video_section_only() -> None:
    offered = simulcast.parse_offer(*offer_with(RIDS))
    answer = "v=0\r\nm=audio 9 X 111\r\na=mid:0\r\nm=video 9 X 96\r\na=mid:1\r\n"
    written = simulcast.write_answer(answer, offered)
    audio, video = written.split("m=video")
    assert "a=rid" not in audio and "simulcast" not in audio
    assert video.split("\r\n")[2:] == [
        "a=rid:h recv",
        "a=rid:m recv",
        "a=rid:l recv",
        "a=simulcast:recv h;m;l",
        "",
    ]


def _encode(codec: str, width: int, height: int, **options) -> bytes:
    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = fractions.Fraction(1, 30)
    encoder.options = options
    image = np.random.default_rng(1).integers(0, 256, (height, width, 3), np.uint8)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
    frame.pts = 0
    packets = encoder.encode(frame) + encoder.encode(None)
    return bytes(packets[0])


@pytest.mark.parametrize("size", [(1280, 720), (640, 360), (320, 180), (176, 144)])
@pytest.mark.parametrize(
    "codec,options",
    [("libx264", {"profile": "high"}), ("libx264", {"profile": "baseline"}), ("libvpx", {})],
)
def test_keyframe_sizes(codec: str, options: dict, size: tuple[int, int]) -> None:
    frame = _encode(codec, *size, **options)
    kind = Codec.H264 if codec == "libx264" else Codec.VP8
    assert is_keyframe(kind, frame)
    assert video_size(kind, frame) == size


def test_no_size_from_garbage() -> None:
    assert video_size(Codec.VP8, b"\x00\x00\x00\x00") is None
    assert video_size(Codec.VP8, b"\x01" * 20) is None  # an interframe
    assert video_size(Codec.H264, b"\x00\x00\x00\x01\x67") is None  # truncated SPS
    assert video_size(Codec.H264, b"\x00\x00\x00\x01\x65\x88") is None  # no SPS


async def read_partitions(bus, stream: str, session: int, count: int, partitions) -> dict:
    """The first ``count`` frames of ``session`` on each of ``partitions``."""
    consumer = bus.consumer()
    await consumer.start()
    try:
        tps = [TopicPartition(bus.stream_topic(stream), p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        found: dict[int, list[Frame]] = {p: [] for p in partitions}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and min(map(len, found.values())) < count:
            for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                for record in records:
                    frame = Frame.decode(record.value)
                    if frame.session == session:
                        found[tp.partition].append(frame)
        return found
    finally:
        await consumer.stop()


async def wait_for(check, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        await asyncio.sleep(0.05)
    return value


@pytest.fixture
async def quiet_server(kafka):
    """A node that forces no keyframes of its own, so every PLI is one a test caused."""
    node = await start_server(kafka, max_keyframe_interval=0.0)
    yield node
    await node.runner.cleanup()


async def test_layers_land_on_their_partitions(quiet_server, stream_name) -> None:
    server = quiet_server
    publisher = await publish_simulcast(server.url, stream_name)
    try:
        answer = publisher.answer
        assert "a=simulcast:recv h;m;l" in answer
        for rid in "hml":
            assert f"a=rid:{rid} recv" in answer
        assert f"a=extmap:10 {simulcast.RID_URI}" in answer
        session = await wait_for(lambda: server.node.ingest.sessions.get(stream_name))
        # Once receiver reports acknowledge an SSRC its packets carry no RID: the
        # binding learnt from the first ones carries each layer on.
        await wait_for(
            lambda: all(x.acked and x.sent > RID_PACKETS + 40 for x in publisher.layers),
            what="acknowledged layers",
        )
        rids = ["h", "m", "l"]
        partitions = [video_partition(layer) for layer in range(3)]
        frames = await read_partitions(
            server.node.bus, stream_name, session.session_id, 60, partitions
        )
        for rid, partition in zip(rids, partitions, strict=True):
            got = frames[partition]
            assert len(got) >= 60, (rid, {p: len(f) for p, f in frames.items()})
            assert got[0].keyframe, rid
            assert [f.sequence for f in got] == list(range(len(got))), rid
            width, height = publisher.layer(rid).width, publisher.layer(rid).height
            assert video_size(Codec.VP8, got[0].payload) == (width, height), rid
        assert session.stats.malformed_rtp == 0 and session.stats.frames_lost == 0

        info = await wait_for(
            lambda: (
                (i := server.node.view.get(stream_name))
                and i.layers
                and i.layers[0]["bitrate"]
                and i
            ),
            what="layers with bitrates in the registry",
        )
        assert [(x["layer"], x["rid"], x["width"], x["height"]) for x in info.layers] == [
            (0, "h", 320, 240),
            (1, "m", 160, 120),
            (2, "l", 80, 60),
        ]
        assert all(x["bitrate"] > 0 for x in info.layers), info.layers

        # A keyframe request for layer 1 reaches the "m" encoder only; one without a
        # layer reaches all three.
        plis = {x.rid: x.plis for x in publisher.layers}
        keyframes = {x.rid: x.keyframes for x in publisher.layers}
        requester = KeyframeRequester(server.node.bus, 0.0)
        requester.request(stream_name, session.session_id, "test", layer=1)
        await wait_for(lambda: publisher.layer("m").plis > plis["m"], what="PLI on layer m")
        await asyncio.sleep(1.0)
        assert publisher.layer("m").keyframes > keyframes["m"]
        assert {x.rid: x.plis - plis[x.rid] for x in publisher.layers} == {"h": 0, "m": 1, "l": 0}
        requester.request(stream_name, session.session_id, "test")
        await wait_for(
            lambda: all(x.plis > plis[x.rid] + (x.rid == "m") for x in publisher.layers),
            what="PLIs on every layer",
        )
    finally:
        await publisher.close()


async def test_layers_ordered_by_keyframe_size(server, stream_name) -> None:
    # Offered smallest first: ingest still puts the biggest picture on partition 0.
    sizes = (("l", 80, 60), ("h", 320, 240), ("m", 160, 120))
    publisher = await publish_simulcast(server.url, stream_name, sizes=sizes)
    try:
        session = await wait_for(lambda: server.node.ingest.sessions.get(stream_name))
        info = await wait_for(
            lambda: (
                (i := server.node.view.get(stream_name)) and i.layers and i.layers[0]["width"] and i
            ),
            what="layer sizes in the registry",
        )
        assert [x["rid"] for x in info.layers] == ["h", "m", "l"], info.layers
        partitions = [video_partition(layer) for layer in range(3)]
        frames = await read_partitions(
            server.node.bus, stream_name, session.session_id, 40, partitions
        )
        for partition, size in zip(partitions, [(320, 240), (160, 120), (80, 60)], strict=True):
            got = frames[partition]
            keyframes = [f for f in got if f.keyframe]
            assert keyframes and got[0].keyframe, partition
            # A partition never mixes two layers: every keyframe on it has one size.
            assert {video_size(Codec.VP8, f.payload) for f in keyframes} == {size}
            assert [f.sequence for f in got] == list(range(len(got)))
    finally:
        await publisher.close()


async def test_retransmissions_by_repaired_rid(server, stream_name) -> None:
    publisher = await publish_simulcast(server.url, stream_name, codec="video/H264")
    publisher.layer("m").drop = {70, 71, 90}  # lost once, resent over RTX on request
    try:
        session = await wait_for(lambda: server.node.ingest.sessions.get(stream_name))
        await wait_for(lambda: publisher.layer("m").sent > 150, what="packets on layer m")
        layer = publisher.layer("m")
        assert layer.nacked >= 3 and layer.retransmitted >= 3
        assert session.stats.nacks_sent >= 1
        assert session.stats.frames_lost == 0 and session.stats.malformed_rtp == 0
        partition = video_partition(1)
        frames = await read_partitions(
            server.node.bus, stream_name, session.session_id, 60, [partition]
        )
        assert [f.sequence for f in frames[partition]][:60] == list(range(60))
    finally:
        await publisher.close()


async def test_simulcast_grows_a_single_layer_topic(server, stream_name) -> None:
    single = await publish(server.url, stream_name, codec="video/VP8", audio=False)
    try:
        info = await wait_for(lambda: server.node.view.get(stream_name), what="registry entry")
        assert info.layers is None
        session = server.node.ingest.sessions[stream_name]
        assert session.layers == 1
        await wait_for(lambda: session.stats.frames[0] > 10, what="single-layer frames")
    finally:
        await single.close()
    await wait_for(lambda: server.node.view.get(stream_name) is None, what="publish end")

    admin = AIOKafkaAdminClient(**server.settings.kafka_client_options())
    await admin.start()
    try:
        topic = server.node.bus.stream_topic(stream_name)
        [described] = await admin.describe_topics([topic])
        assert len(described["partitions"]) == 2
        publisher = await publish_simulcast(server.url, stream_name)
        try:
            session = await wait_for(lambda: server.node.ingest.sessions.get(stream_name))
            [described] = await admin.describe_topics([topic])
            assert len(described["partitions"]) == 4
            frames = await read_partitions(
                server.node.bus, stream_name, session.session_id, 10, [0, 2, 3]
            )
            assert all(len(f) >= 10 and f[0].keyframe for f in frames.values())
        finally:
            await publisher.close()
    finally:
        await admin.close()


async def test_keyframe_interval_forced_per_layer(kafka, stream_name) -> None:
    server = await start_server(kafka, max_keyframe_interval=1.0)
    try:
        publisher = await publish_simulcast(server.url, stream_name, audio=False)
        try:
            # The publisher sends keyframes only when asked: ingest asks every layer.
            await wait_for(
                lambda: all(x.keyframes >= 3 for x in publisher.layers),
                timeout=15,
                what="forced keyframes on every layer",
            )
        finally:
            await publisher.close()
    finally:
        await server.runner.cleanup()


async def test_paused_layer_gives_up_partition_0_and_takes_it_back(server, stream_name) -> None:
    publisher = await publish_simulcast(server.url, stream_name, audio=False)
    try:
        session = await wait_for(lambda: server.node.ingest.sessions.get(stream_name))
        await wait_for(lambda: session.stats.frames[0] > 60, what="frames of every layer")

        def order() -> list[str] | None:
            info = server.node.view.get(stream_name)
            return [x["rid"] for x in info.layers] if info and info.layers else None

        assert order() == ["h", "m", "l"]
        publisher.layer("h").paused = True
        await wait_for(lambda: order() == ["m", "l", "h"], what="h moved behind", timeout=10)
        await asyncio.sleep(1.0)
        publisher.layer("h").paused = False
        await wait_for(lambda: order() == ["h", "m", "l"], what="h back in front", timeout=10)
        await asyncio.sleep(1.0)

        frames = (
            await read_partitions(server.node.bus, stream_name, session.session_id, 10_000, [0])
        )[0]
        # Partition 0 went on with the best layer still sending, from a keyframe of it,
        # on one RTP timeline although each layer's timestamps start elsewhere.
        sizes = [video_size(Codec.VP8, f.payload) for f in frames if f.keyframe]
        runs = [size for i, size in enumerate(sizes) if i == 0 or size != sizes[i - 1]]
        assert runs == [(320, 240), (160, 120), (320, 240)], sizes
        assert [f.sequence for f in frames] == list(range(len(frames)))
        # Each step of the timeline is the time that passed: a frame interval, or the
        # wait until a paused layer was given up (give or take a loaded machine's stalls;
        # the layers' own timestamps are random 32-bit values apart).
        for a, b in zip(frames, frames[1:], strict=False):
            step = ((b.rtp_timestamp - a.rtp_timestamp) & 0xFFFFFFFF) / 90000
            assert 0 < step < 5 and abs(step - (b.arrival_us - a.arrival_us) / 1e6) < 1.5, (
                a.sequence,
                step,
            )
    finally:
        await publisher.close()
