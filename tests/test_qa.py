"""Audience Q&A over a real Kafka broker: questions, votes, moderation, live updates
(SSE), limits and input checks, and a second node rebuilding the same state from the
log. A real aiortc publisher keeps the stream live."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

import aiohttp
import pytest

from .conftest import start_server
from .peers import publish

TOKEN = "qa-host-token"
HOST = {"Authorization": f"Bearer {TOKEN}"}
LIVE_WITHIN_S = 1.0  # the goal for answered/pinned state to reach everyone
# Every client here comes from 127.0.0.1: the per-address backstop is raised so that
# only the per-client limits are under test (tests/test_qa_limits.py tests it). Nodes
# that share a stream's log must fold it with the same limits.
SHARED_ADDRESS = {"qa_address_question_burst": 1000, "qa_address_vote_burst": 1000}


@pytest.fixture(scope="module")
async def qa_server(kafka):
    server = await start_server(kafka, publish_token=TOKEN, qa_heartbeat=0.5, **SHARED_ADDRESS)
    yield server
    await server.runner.cleanup()


@pytest.fixture(scope="module")
async def live(qa_server):
    """A stream with a real publisher for the whole module."""
    stream = f"qa-{uuid.uuid4().hex[:8]}"
    publisher = await publish(qa_server.url, stream, token=TOKEN)
    assert await qa_server.node.view.wait_for(lambda: qa_server.node.view.get(stream), 10)
    yield stream
    await publisher.close()


@asynccontextmanager
async def viewer(server):
    """A client with its own cookie jar (aiohttp refuses IP-address cookies by default)."""
    async with aiohttp.ClientSession(
        base_url=server.url, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as session:
        yield session


async def questions(session, stream: str, host: bool = False) -> dict:
    params, headers = ({"view": "host"}, HOST) if host else ({}, {})
    async with session.get(f"/api/streams/{stream}/questions", params=params, headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def ask(session, stream: str, text: str, name: str = "Ada") -> aiohttp.ClientResponse:
    response = await session.post(
        f"/api/streams/{stream}/questions", json={"name": name, "text": text}
    )
    await response.read()
    return response


async def moderate(session, stream: str, qid: str, headers=HOST, **flags):
    response = await session.patch(
        f"/api/streams/{stream}/questions/{qid}", json=flags, headers=headers
    )
    await response.read()
    return response


class Events:
    """Reads one SSE connection: ``next()`` returns (event, data) with a deadline."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments = 0

    async def next(self, timeout: float = 5.0) -> tuple[str, dict]:
        async with asyncio.timeout(timeout):
            event, data = "message", None
            while True:
                line = (await self.response.content.readline()).decode()
                if not line:
                    raise EOFError("event stream closed")
                line = line.rstrip("\n")
                if line.startswith(":"):
                    self.comments += 1
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                elif line == "" and data is not None:
                    return event, data

    async def until(self, predicate, timeout: float = 5.0) -> tuple[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            event, data = await self.next(max(0.01, deadline - time.monotonic()))
            if predicate(event, data):
                return event, data


@asynccontextmanager
async def events(session, stream: str, **kwargs):
    response = await session.get(f"/api/streams/{stream}/questions/events", **kwargs)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    try:
        yield Events(response)
    finally:
        response.close()


async def test_ask_vote_and_list(qa_server, live):
    async with viewer(qa_server) as alice, viewer(qa_server) as bob:
        async with alice.get(f"/api/streams/{live}/questions") as response:
            assert (await response.json())["open"] is True
            cookie = response.cookies["whipcast_client"]
        assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/"
        async with alice.get(f"/api/streams/{live}/questions") as response:
            assert "whipcast_client" not in response.cookies  # set once, then kept

        response = await ask(alice, live, "  What codec is this?  ", name="")
        assert response.status == 201
        question = await response.json()
        assert response.headers["Location"] == f"/api/streams/{live}/questions/{question['id']}"
        assert question["text"] == "What codec is this?" and question["name"] == "Anonymous"
        assert len(question["id"]) == 22 and question["votes"] == 0
        assert 0 <= question["stream_time"] < 120  # seconds since the publish started
        assert abs(question["created_at"] - time.time()) < 5

        await questions(bob, live)  # gets Bob his cookie
        vote = f"/api/streams/{live}/questions/{question['id']}/vote"
        for _ in range(2):  # the second vote changes nothing
            async with bob.post(vote) as r:
                assert r.status == 200
                assert (await r.json())["votes"] == 1 and (await r.json())["voted"]
        async with alice.post(vote) as r:
            assert (await r.json())["votes"] == 2

        seen = {q["id"]: q for q in (await questions(bob, live))["questions"]}
        assert seen[question["id"]]["votes"] == 2 and seen[question["id"]]["voted"] is True


async def test_host_moderates_and_everyone_sees_it_live(qa_server, live):
    async with viewer(qa_server) as alice, viewer(qa_server) as bob, viewer(qa_server) as host:
        await questions(alice, live)
        async with (
            events(bob, live) as bob_events,
            events(host, live, params={"view": "host"}, headers=HOST) as host_events,
        ):
            assert (await bob_events.next())[0] == "snapshot"
            assert (await host_events.next())[0] == "snapshot"

            posted = time.monotonic()
            question = await (await ask(alice, live, "Seen by all?")).json()
            qid = question["id"]
            for stream_events in (bob_events, host_events):
                event, data = await stream_events.until(lambda e, d: d.get("id") == qid)
                assert event == "question" and data["text"] == "Seen by all?"
            assert time.monotonic() - posted < LIVE_WITHIN_S + 1  # includes the Kafka ack

            changed = time.monotonic()
            response = await moderate(host, live, qid, answered=True, pinned=True)
            assert response.status == 200, await response.text()
            for stream_events in (bob_events, host_events):
                _, data = await stream_events.until(
                    lambda e, d: d.get("id") == qid and d["answered"], LIVE_WITHIN_S
                )
                assert data["pinned"] is True
            assert time.monotonic() - changed < LIVE_WITHIN_S

            # Pinning another question unpins this one, for everyone.
            other = await (await ask(alice, live, "Pin me instead")).json()
            assert (await moderate(host, live, other["id"], pinned=True)).status == 200
            await bob_events.until(lambda e, d: d.get("id") == qid and not d["pinned"])

            # Hidden: viewers are told to remove it and never see its text again.
            assert (await moderate(host, live, qid, hidden=True)).status == 200
            event, data = await bob_events.until(lambda e, d: d.get("id") == qid)
            assert event == "removed" and data == {"id": qid}
            _, data = await host_events.until(lambda e, d: d.get("id") == qid and d["hidden"])
            assert data["text"] == "Seen by all?"  # the host still sees what it said

        assert qid not in {q["id"] for q in (await questions(alice, live))["questions"]}
        host_view = await questions(host, live, host=True)
        assert qid in {q["id"] for q in host_view["questions"]}
        async with alice.post(f"/api/streams/{live}/questions/{qid}/vote") as r:
            assert r.status == 404  # hidden questions cannot be voted on either

        # Pinned first in the listing.
        assert (await questions(alice, live))["questions"][0]["id"] == other["id"]


async def test_host_needs_the_publish_token(qa_server, live):
    async with viewer(qa_server) as alice:
        await questions(alice, live)
        qid = (await (await ask(alice, live, "Can I moderate?")).json())["id"]
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = await moderate(alice, live, qid, headers=headers, answered=True)
            assert response.status == 401
            assert response.content_type == "application/problem+json"
        async with alice.get(f"/api/streams/{live}/questions", params={"view": "host"}) as response:
            assert response.status == 401
        bad = [({}, 400), ({"answered": "yes"}, 400), ({"starred": True}, 400)]
        for body, status in bad:
            async with alice.patch(
                f"/api/streams/{live}/questions/{qid}", json=body, headers=HOST
            ) as response:
                assert response.status == status, body
        assert (await moderate(alice, live, "A" * 22, answered=True)).status == 404


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"text": ""}, "empty"),
        ({"text": "   \n  "}, "empty"),
        ({"text": "x" * 501}, "longer than 500"),
        ({"text": "bell\x07"}, "control characters"),
        ({"text": "evil \u202egnp.exe"}, "control characters"),
        ({"text": "ok", "name": "n" * 41}, "longer than 40"),
        ({"text": "ok", "name": "two\nlines"}, "control characters"),
        ({"text": 42}, "must be a string"),
        ({"text": "ok", "admin": True}, "unknown field"),
        (["not", "an", "object"], "JSON object"),
    ],
)
async def test_bad_questions_are_rejected_with_a_reason(qa_server, live, body, reason):
    async with viewer(qa_server) as alice:
        await questions(alice, live)
        async with alice.post(f"/api/streams/{live}/questions", json=body) as response:
            assert response.status == 400
            assert response.content_type == "application/problem+json"
            assert reason in (await response.json())["detail"]


async def test_bad_requests(qa_server, live):
    url = f"/api/streams/{live}/questions"
    async with viewer(qa_server) as anonymous:
        async with anonymous.post(url, data="text=hi") as response:
            assert response.status == 415
        async with anonymous.post(
            url, data="{not json", headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400
        async with anonymous.post(url, json={"text": "x" * 5000}) as response:
            assert response.status == 413
        text = "Exactly 500: " + "x" * 487
        assert (await ask(anonymous, live, text)).status == 201
        async with anonymous.get("/api/streams/never-used-stream/questions") as response:
            assert response.status == 404  # and no topic was created for it
        assert not await qa_server.node.state_log.exists(
            qa_server.node.qa.topic("never-used-stream")
        )
        async with anonymous.get("/api/streams/bad%20name/questions") as response:
            assert response.status == 400


async def test_rate_limits_per_client(qa_server, live):
    settings = qa_server.settings
    async with viewer(qa_server) as alice, viewer(qa_server) as bob:
        await questions(alice, live)
        await questions(bob, live)
        statuses = [
            (await ask(alice, live, f"burst {i}")).status
            for i in range(settings.qa_question_burst + 1)
        ]
        assert statuses == [201] * settings.qa_question_burst + [429]
        response = await ask(alice, live, "one more")
        assert response.status == 429
        assert 0 < int(response.headers["Retry-After"]) <= settings.qa_question_interval
        assert response.content_type == "application/problem+json"
        assert (await ask(bob, live, "Bob is not limited by Alice")).status == 201

        qid = (await questions(bob, live))["questions"][0]["id"]
        vote = f"/api/streams/{live}/questions/{qid}/vote"
        codes = []
        for _ in range(settings.qa_vote_burst + 1):
            async with bob.post(vote) as r:
                codes.append(r.status)
        assert codes[:-1] == [200] * settings.qa_vote_burst and codes[-1] == 429


async def test_questions_need_a_live_stream(qa_server):
    async with viewer(qa_server) as alice:
        stream = f"qa-ended-{uuid.uuid4().hex[:6]}"
        publisher = await publish(qa_server.url, stream, token=TOKEN)
        view = qa_server.node.view
        assert await view.wait_for(lambda: view.get(stream), 10)
        await questions(alice, stream)
        assert (await ask(alice, stream, "Before the end")).status == 201
        await publisher.close()
        assert await view.wait_for(lambda: view.get(stream) is None, 10)
        response = await ask(alice, stream, "After the end")
        assert response.status == 409
        listed = await questions(alice, stream)  # still readable, for a replay
        assert listed["open"] is False
        assert [q["text"] for q in listed["questions"]] == ["Before the end"]


async def test_slow_subscriber_is_disconnected_not_buffered(kafka):
    server = await start_server(kafka, publish_token=TOKEN, qa_subscriber_queue=2)
    stream = f"qa-slow-{uuid.uuid4().hex[:6]}"
    publisher = await publish(server.url, stream, token=TOKEN)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream), 10)
        board = await server.node.qa.board(stream)
        subscription = board.subscribe(host=False, maxsize=2)
        async with viewer(server) as alice:
            await questions(alice, stream)
            for i in range(3):  # nobody reads the subscription
                assert (await ask(alice, stream, f"flood {i}")).status == 201
        assert subscription.closed and subscription.overflowed
        board.unsubscribe(subscription)
        assert subscription not in board.subscribers
        async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as r:
            metrics = await r.text()
        assert "whipcast_qa_slow_subscribers_total 1.0" in metrics
        assert "whipcast_qa_questions_total 3.0" in metrics
    finally:
        await publisher.close()
        await server.runner.cleanup()


async def test_a_second_node_rebuilds_the_same_questions_from_kafka(kafka, qa_server, live):
    async with viewer(qa_server) as alice:
        await questions(alice, live)
        qid = (await (await ask(alice, live, "Survive a restart?")).json())["id"]
        async with alice.post(f"/api/streams/{live}/questions/{qid}/vote") as r:
            assert r.status == 200
        assert (await moderate(alice, live, qid, answered=True)).status == 200
        before = await questions(alice, live, host=True)

    second = await start_server(kafka, publish_token=TOKEN, **SHARED_ADDRESS)
    try:
        async with viewer(second) as carol:
            after = await questions(carol, live, host=True)
            strip = [{k: v for k, v in q.items() if k != "voted"} for q in before["questions"]]
            assert [{k: v for k, v in q.items() if k != "voted"} for q in after["questions"]] == (
                strip
            )
            mine = next(q for q in after["questions"] if q["id"] == qid)
            assert mine["answered"] and mine["votes"] == 1

            # Live across nodes: written on the first, pushed by the second.
            async with events(carol, live) as carol_events, viewer(qa_server) as dave:
                await carol_events.next()
                await questions(dave, live)
                new = await (await ask(dave, live, "Asked on node one")).json()
                _, data = await carol_events.until(
                    lambda e, d: d.get("id") == new["id"], LIVE_WITHIN_S + 1
                )
                assert data["text"] == "Asked on node one"
    finally:
        await second.runner.cleanup()


async def test_event_stream_heartbeats_and_ends_with_the_server(kafka):
    server = await start_server(kafka, publish_token=TOKEN, qa_heartbeat=0.2)
    stream = f"qa-beat-{uuid.uuid4().hex[:6]}"
    publisher = await publish(server.url, stream, token=TOKEN)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream), 10)
        async with viewer(server) as alice, events(alice, stream) as stream_events:
            assert (await stream_events.next())[0] == "snapshot"
            await asyncio.sleep(0.7)
            line = await asyncio.wait_for(stream_events.response.content.readline(), 1)
            assert line.startswith(b":")  # a heartbeat comment

            # A client that goes away is noticed by the next heartbeat and unsubscribed.
            board = await server.node.qa.board(stream)
            async with events(alice, stream) as gone:
                await gone.next()
                assert len(board.subscribers) == 2
            for _ in range(40):  # at most 2 s; the heartbeat is every 0.2 s
                if len(board.subscribers) == 1:
                    break
                await asyncio.sleep(0.05)
            assert len(board.subscribers) == 1
            await publisher.close()
            publisher = None
            # The open event stream must not hold the shutdown up.
            await asyncio.wait_for(server.runner.cleanup(), 10)
            with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
                await stream_events.next(2)
    finally:
        if publisher is not None:
            await publisher.close()


async def test_directory_shows_title_viewers_and_resolution(qa_server, live):
    async with viewer(qa_server) as alice:
        url = f"/api/streams/{live}"
        async with alice.patch(url, json={"title": "Launch <b>day</b>"}) as r:
            assert r.status == 401
        async with alice.patch(
            url, json={"title": "  Launch <b>day</b> ", "width": 1280, "height": 720}, headers=HOST
        ) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"title": "Launch <b>day</b>", "width": 1280, "height": 720}
        for bad in ({"title": "x" * 101}, {"width": 0}, {"height": "720"}, {"fps": 30}, {}):
            async with alice.patch(url, json=bad, headers=HOST) as r:
                assert r.status == 400, bad
        async with alice.get("/api/streams") as r:
            listed = {s["stream"]: s for s in (await r.json())["streams"]}
        entry = listed[live]
        assert entry["title"] == "Launch <b>day</b>" and entry["width"] == 1280
        assert entry["viewers"] == 0 and entry["uptime_s"] >= 0
        assert entry["video"]["mimeType"] == "video/H264"
