"""The HTTP side of WHIP (RFC 9725) and WHEP: status codes, headers, bad input."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from .conftest import start_server
from .peers import play, post_sdp, publish


async def offer(*kinds: str, direction: str = "sendonly", video_codec: str | None = None) -> str:
    pc = RTCPeerConnection()
    for kind in kinds:
        pc.addTransceiver(kind, direction=direction)
    if video_codec:
        from .peers import prefer

        prefer(pc, "video", video_codec)
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


@pytest.fixture
async def http(server):
    async with aiohttp.ClientSession(base_url=server.url) as session:
        yield session


async def problem(response: aiohttp.ClientResponse) -> str:
    assert response.content_type == "application/problem+json"
    body = await response.json()
    assert body["status"] == response.status and body["detail"]
    return body["detail"]


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", "v=0", 415),
        ("application/sdp", "", 400),
        ("application/sdp", "this is not sdp", 400),
        ("application/sdp", "v=0\r\n" + "a=x\r\n" * 20000, 413),
    ],
)
@pytest.mark.parametrize("endpoint", ["whip", "whep"])
async def test_bad_offers(http, endpoint, content_type, body, status):
    async with http.post(
        f"/{endpoint}/bad", data=body.encode(), headers={"Content-Type": content_type}
    ) as response:
        assert response.status == status
        await problem(response)


async def test_offer_shapes_rejected(http):
    two_videos = await offer("video", "video")
    status, _, body = await post_sdp(http, "/whip/shapes", two_videos)
    assert status == 422 and "one video" in body
    recvonly = await offer("video", direction="recvonly")
    status, _, body = await post_sdp(http, "/whip/shapes", recvonly)
    assert status == 422 and "sendonly" in body
    no_media = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    status, _, body = await post_sdp(http, "/whip/shapes", no_media)
    assert status == 400 and "no audio or video" in body


async def test_bad_stream_name_and_unknown_resources(http):
    status, _, _ = await post_sdp(http, "/whip/bad%20name!", await offer("video"))
    assert status == 400
    for method in ("DELETE", "PATCH"):
        async with http.request(
            method, "/whip/nope/abc", headers={"Content-Type": "application/trickle-ice-sdpfrag"},
            data="a=end-of-candidates\r\n",
        ) as response:  # fmt: skip
            assert response.status == 404
            await problem(response)


async def test_whep_not_live_is_404(http):
    status, _, body = await post_sdp(
        http, "/whep/nobody-here", await offer("video", direction="recvonly")
    )
    assert status == 404 and "not live" in body


async def test_options_cors_and_probe(http):
    async with http.options(
        "/whip/x",
        headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"},
    ) as response:  # fmt: skip
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    async with http.options("/whep/x") as response:
        assert response.status == 204
        assert response.headers["Accept-Post"] == "application/sdp"
    async with http.head("/whep/x") as response:
        assert response.status == 200
        assert response.content_type == "application/sdp"


async def test_session_resource_lifecycle(server, http, stream_name):
    publisher = await publish(server.url, stream_name)
    try:
        status, headers, _ = await post_sdp(http, f"/whip/{stream_name}", await offer("video"))
        assert status == 409, "a second publisher on a live stream is refused"
        await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        viewer = await play(server.url, stream_name)
        other = await play(server.url, stream_name)
        await viewer.wait_frames(5)
        async with http.post(f"/whep/{stream_name}", data=b"", headers={}) as response:
            assert response.status == 415
        # Locations are distinct, unguessable; ETags strong and unique.
        sessions = list(server.node.egress.viewers.values())
        assert len({s.resource_id for s in sessions}) == len(sessions)
        assert all(len(s.resource_id) >= 32 for s in sessions)
        assert all(s.etag.startswith('"') and s.etag != '"*"' for s in sessions)
        assert viewer.location.startswith(f"/whep/{stream_name}/")
        # Trickle PATCH: 204; wrong type: 415; stale If-Match: 412; ICE restart: 422.
        fragment = "a=ice-ufrag:{}\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n"
        viewer_session = server.node.egress.viewers[viewer.location.rsplit("/", 1)[1]]
        ufrag = viewer_session.pc.remoteDescription.sdp.split("a=ice-ufrag:")[1].split()[0]
        frag_type = {"Content-Type": "application/trickle-ice-sdpfrag"}
        async with http.patch(viewer.location, data=fragment.format(ufrag), headers=frag_type) as r:
            assert r.status == 204
        async with http.patch(
            viewer.location, data="a=x", headers={"Content-Type": "text/plain"}
        ) as r:
            assert r.status == 415
        async with http.patch(viewer.location, data=fragment.format(ufrag),
                              headers={**frag_type, "If-Match": '"stale"'}) as r:  # fmt: skip
            assert r.status == 412
        async with http.patch(
            viewer.location, data=fragment.format("newufrag"), headers=frag_type
        ) as r:
            assert r.status == 422
        # DELETE frees the viewer; a second DELETE is 404.
        assert await viewer.close() == 200
        async with http.delete(viewer.location) as response:
            assert response.status == 404
        assert viewer_session.pc.connectionState == "closed"
        fanout = server.node.egress.fanouts[stream_name]
        assert viewer_session not in fanout.viewers and len(fanout.viewers) == 1
        await other.close()
    finally:
        assert await publisher.close() == 200
    # Ending the publish marks the stream ended in the Kafka registry and frees the
    # egress reader.
    view = server.node.view
    assert await view.wait_for(lambda: view.get(stream_name) is None, 5)
    assert stream_name not in server.node.ingest.sessions
    for _ in range(50):  # the egress sweep runs every 0.5 s
        if stream_name not in server.node.egress.fanouts:
            break
        await asyncio.sleep(0.1)
    assert stream_name not in server.node.egress.fanouts


async def test_viewer_without_the_publishers_codec_is_refused(server, http, stream_name):
    publisher = await publish(server.url, stream_name, codec="video/H264", audio=False)
    try:
        await server.node.view.wait_for(lambda: server.node.view.get(stream_name), 5)
        vp8_only = await offer("video", direction="recvonly", video_codec="video/VP8")
        status, _, body = await post_sdp(http, f"/whep/{stream_name}", vp8_only)
        assert status == 422 and "H.264" in body
    finally:
        await publisher.close()


async def test_publish_token(kafka):
    server = await start_server(kafka, publish_token="s3cret-token")
    try:
        async with aiohttp.ClientSession(base_url=server.url) as http:
            sdp = await offer("video")
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "s3cret-token"},
            ):
                status, _, body = await post_sdp(http, "/whip/guarded", sdp, headers)
                assert status == 401, headers
        publisher = await publish(server.url, "guarded", token="s3cret-token")
        async with (
            aiohttp.ClientSession(base_url=server.url) as http,
            http.delete(publisher.location) as response,
        ):
            assert response.status == 401, "ending a publish needs the token too"
        publisher.session.headers["Authorization"] = "Bearer s3cret-token"
        assert await publisher.close() == 200
    finally:
        await server.runner.cleanup()


async def test_ice_server_links_and_public_ip(kafka, stream_name):
    server = await start_server(
        kafka,
        ice_servers=("stun:stun.example.net:3478", "turn:alice:s%40cret@turn.example.net:3478"),
        public_ip="203.0.113.7",
    )
    try:
        async with aiohttp.ClientSession(base_url=server.url) as http:
            status, headers, answer = await post_sdp(
                http, f"/whip/{stream_name}", await offer("video")
            )
            assert status == 201
            async with http.post(
                f"/whip/{stream_name}-2", data=await offer("video"),
                headers={"Content-Type": "application/sdp"},
            ) as response:  # fmt: skip
                links = response.headers.getall("Link")
        assert '<stun:stun.example.net:3478>; rel="ice-server"' in links
        assert (
            '<turn:turn.example.net:3478>; rel="ice-server"; username="alice"; '
            'credential="s@cret"; credential-type="password"'
        ) in links
        candidates = [line for line in answer.splitlines() if line.startswith("a=candidate:")]
        assert candidates and all(" 203.0.113.7 " in line for line in candidates)
    finally:
        await server.runner.cleanup()
