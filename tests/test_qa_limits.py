"""Q&A client identity and limits: signed client-id cookies, a first write that needs no
prior read, the per-address backstop against rotating cookies, and limits that hold
when two signaling nodes serve one stream. Real Kafka and a real aiortc publisher."""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import asynccontextmanager

import aiohttp
import pytest
from whipcast.gateway.bus import Bus
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.settings import Settings
from yarl import URL

from .conftest import start_server
from .peers import publish
from .test_qa import TOKEN, ask, questions, viewer

COOKIE = "whipcast_client"
LONG = 1000.0  # seconds per token: nothing refills while a test runs


@asynccontextmanager
async def live_stream(server, prefix: str = "qa-lim"):
    stream = f"{prefix}-{uuid.uuid4().hex[:8]}"
    publisher = await publish(server.url, stream, token=TOKEN)
    try:
        assert await server.node.view.wait_for(lambda: server.node.view.get(stream), 10)
        yield stream
    finally:
        await publisher.close()


@asynccontextmanager
async def cookieless(server, headers: dict | None = None):
    """A client that never keeps cookies, like a bot or a one-shot integration."""
    async with aiohttp.ClientSession(
        base_url=server.url, cookie_jar=aiohttp.DummyCookieJar(), headers=headers
    ) as session:
        yield session


def jar_cookie(session: aiohttp.ClientSession, server) -> str:
    return session.cookie_jar.filter_cookies(URL(server.url))[COOKIE].value


def cookie_of(response: aiohttp.ClientResponse) -> str | None:
    morsel = response.cookies.get(COOKIE)
    return morsel.value if morsel is not None else None


@pytest.fixture(scope="module")
async def node(kafka):
    server = await start_server(kafka, publish_token=TOKEN, qa_address_question_burst=1000,
                                qa_address_vote_burst=1000)  # fmt: skip
    yield server
    await server.runner.cleanup()


def test_signed_ids_verify_only_under_their_secret():
    from whipcast.signaling.clientid import ClientIds

    ids, other = ClientIds(b"s" * 32), ClientIds(b"t" * 32)
    client, cookie = ids.issue()
    assert ids.verify(cookie) == client and len(client) == 22
    assert other.verify(cookie) is None
    forged = ("A" if client[0] != "A" else "B") + cookie[1:]  # another id, the same tag
    assert ids.verify(forged) is None
    for bad in ("", client, "A" * 22, cookie + "x", cookie.replace(".", ":"), "é" * 45):
        assert ids.verify(bad) is None, bad
    assert ids.address_key("192.0.2.1") != other.address_key("192.0.2.1")
    assert "192.0.2.1" not in ids.address_key("192.0.2.1")


def test_the_secret_setting_is_read_from_the_environment_and_never_shown():
    secret = "correct horse battery staple"
    settings = Settings.from_env(env={"WHIPCAST_QA_SECRET": secret})
    assert settings.qa_secret == secret
    assert secret not in repr(settings)


async def test_nodes_racing_to_create_the_secret_agree(kafka):
    from whipcast.signaling.clientid import ClientIds, shared_secret
    from whipcast.signaling.kafkalog import StateLog

    settings = Settings.from_env(env={}, kafka_bootstrap=kafka.bootstrap,
                                 topic_prefix=f"qasecret{uuid.uuid4().hex[:6]}")  # fmt: skip
    logs = [StateLog(settings) for _ in range(3)]
    for log in logs:
        await log.start()
    try:
        bus = Bus(settings, Metrics())
        found = await asyncio.gather(*(shared_secret(settings, bus, log) for log in logs))
        assert len(set(found)) == 1 and len(found[0]) >= 32
        assert await shared_secret(settings, bus, logs[0]) == found[0]  # read, not rewritten
        # A node that lost the race wrote its own candidate after the first: still unused.
        late = json.dumps({"secret": "a-later-candidate-secret"}).encode()
        await logs[1].write(f"{settings.topic_prefix}.qa-secret", "late", late)
        assert await shared_secret(settings, bus, logs[2]) == found[0]
        _, cookie = ClientIds(found[0]).issue()
        configured = settings.with_(qa_secret="x" * 16)
        assert ClientIds(await shared_secret(configured, bus, logs[0])).verify(cookie) is None
        with pytest.raises(ValueError, match="at least 16"):
            await shared_secret(settings.with_(qa_secret="short"), bus, logs[0])
    finally:
        for log in logs:
            await log.stop()


async def test_first_write_sets_the_cookie(node):
    async with live_stream(node) as stream, viewer(node) as integration:
        # A question before any read: accepted, and the answer carries a signed cookie.
        response = await integration.post(
            f"/api/streams/{stream}/questions", json={"text": "First thing I do"}
        )
        assert response.status == 201, await response.text()
        cookie = response.cookies[COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/"
        assert node.node.qa.ids.verify(cookie.value) is not None
        qid = (await response.json())["id"]
        async with integration.get(f"/api/streams/{stream}/questions") as r:
            assert COOKIE not in r.cookies  # kept, not replaced
            assert (await r.json())["questions"][0]["id"] == qid

    async with live_stream(node) as stream, viewer(node) as asker, viewer(node) as voter:
        qid = (await (await ask(asker, stream, "Vote first?")).json())["id"]
        # A vote before any read, from a second client: counted, and its cookie set.
        async with voter.post(f"/api/streams/{stream}/questions/{qid}/vote") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["votes"] == 1 and (await r.json())["voted"] is True
            assert node.node.qa.ids.verify(cookie_of(r)) is not None
        async with voter.post(f"/api/streams/{stream}/questions/{qid}/vote") as r:
            assert (await r.json())["votes"] == 1  # the same client: still one vote
            assert COOKIE not in r.cookies


async def test_unsigned_and_forged_cookies_count_as_none(node):
    async with live_stream(node) as stream, viewer(node) as alice:
        url = f"/api/streams/{stream}/questions"
        async with alice.get(url) as r:
            signed = cookie_of(r)
        client, tag = signed.split(".")
        forged = ("A" if client[0] != "A" else "B") + client[1:] + "." + tag
        made_up = "A" * 22  # what any 22 characters did before ids were signed
        for value in (made_up, forged, client, "x" * 4000, "a.b.c", '"quoted"'):
            async with aiohttp.ClientSession(base_url=node.url) as other:
                headers = {"Cookie": f"{COOKIE}={value}"}
                async with other.get(url, headers=headers) as r:
                    assert r.status == 200, (value, await r.text())
                    issued = cookie_of(r)
                    assert issued is not None and issued != value, value
                    assert node.node.qa.ids.verify(issued) is not None
                async with other.post(url, json={"text": f"as {value[:8]}"},
                                      headers=headers) as r:  # fmt: skip
                    assert r.status == 201, (value, await r.text())
                    assert cookie_of(r) not in (None, value)


async def test_rotating_cookies_hit_the_address_limit(kafka):
    server = await start_server(
        kafka, publish_token=TOKEN, qa_address_question_burst=3,
        qa_address_question_interval=LONG, qa_address_vote_burst=4,
        qa_address_vote_interval=LONG,
    )  # fmt: skip
    try:
        async with live_stream(server) as stream:
            url = f"/api/streams/{stream}/questions"
            statuses = []
            for i in range(5):  # a new client id every time: no cookies kept
                async with cookieless(server) as bot, bot.post(url, json={"text": f"q{i}"}) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert "address" in (await r.json())["detail"]
                        assert int(r.headers["Retry-After"]) > 0
            assert statuses == [201, 201, 201, 429, 429]

            async with cookieless(server) as reader:
                qid = (await questions(reader, stream))["questions"][0]["id"]
            votes = []
            for _ in range(6):  # one vote per client id, but the ids keep changing
                async with cookieless(server) as bot, bot.post(f"{url}/{qid}/vote") as r:
                    votes.append(r.status)
            assert votes == [200] * 4 + [429] * 2
            async with cookieless(server) as bot:
                listed = await questions(bot, stream)
            assert {q["id"]: q["votes"] for q in listed["questions"]}[qid] == 4
            assert len(listed["questions"]) == 3

            # Forwarded-For is not trusted unless configured: a new header is no new address.
            async with cookieless(server, {"X-Forwarded-For": "198.51.100.7"}) as bot:
                assert (await ask(bot, stream, "from elsewhere?")).status == 429
    finally:
        await server.runner.cleanup()


async def test_forwarded_for_is_the_address_behind_a_trusted_proxy(kafka):
    server = await start_server(
        kafka, publish_token=TOKEN, qa_trust_forwarded_for=True,
        qa_address_question_burst=1, qa_address_question_interval=LONG,
    )  # fmt: skip
    try:
        async with live_stream(server) as stream:
            for address, expected in [("198.51.100.7", 201), ("198.51.100.8", 201),
                                      ("198.51.100.7", 429),
                                      ("2001:db8:1:2::1", 201), ("2001:db8:1:2::99", 429),
                                      ("203.0.113.9, 198.51.100.8", 429)]:  # fmt: skip
                async with cookieless(server, {"X-Forwarded-For": address}) as bot:
                    response = await ask(bot, stream, f"from {address}")
                    assert response.status == expected, address
    finally:
        await server.runner.cleanup()


async def test_limits_and_votes_hold_across_two_nodes(kafka):
    """Two signaling nodes on one Kafka, starting at once with no secret configured (they
    race to create it), serve one stream; their limits count together."""
    options = {
        "publish_token": TOKEN,
        "topic_prefix": f"qa2n{uuid.uuid4().hex[:6]}",  # a Kafka of their own, in effect
        "qa_question_burst": 2, "qa_question_interval": LONG,
        "qa_address_question_burst": 7, "qa_address_question_interval": LONG,
    }  # fmt: skip
    one, two = await asyncio.gather(start_server(kafka, **options), start_server(kafka, **options))
    try:
        async with live_stream(one) as stream:
            assert await two.node.view.wait_for(lambda: two.node.view.get(stream), 10)
            url = f"/api/streams/{stream}/questions"

            # One secret: a cookie from node one is valid on node two.
            async with viewer(one) as alice:
                assert (await ask(alice, stream, "a1")).status == 201
                cookie = jar_cookie(alice, one)
            async with aiohttp.ClientSession(base_url=two.url) as alice_two:
                alice_two.cookie_jar.update_cookies({COOKIE: cookie})
                async with alice_two.get(url) as r:
                    assert COOKIE not in r.cookies, "node two did not accept node one's cookie"
                async with viewer(one) as again:
                    again.cookie_jar.update_cookies({COOKIE: cookie})
                    assert (await ask(again, stream, "a2")).status == 201
                # Alice's budget (2) is spent on node one; node two knows it from the log.
                response = await ask(alice_two, stream, "a3 on node two")
                assert response.status == 429, await response.text()
                assert "client" in (await response.json())["detail"]

                # One vote per client, even sent to both nodes at once.
                qid = (await questions(alice_two, stream))["questions"][0]["id"]
                async with viewer(one) as bob:
                    await questions(bob, stream)
                    bob_cookie = jar_cookie(bob, one)
                    async with aiohttp.ClientSession(base_url=two.url) as bob_two:
                        bob_two.cookie_jar.update_cookies({COOKIE: bob_cookie})
                        answers = await asyncio.gather(
                            *(s.post(f"{url}/{qid}/vote") for s in (bob, bob_two, bob, bob_two))
                        )
                        for r in answers:
                            assert r.status in (200, 202), await r.text()
                            r.release()

                    # Carol sends her questions to both nodes at once: her budget (2) holds.
                    async with viewer(one) as carol:
                        await questions(carol, stream)
                        carol_cookie = jar_cookie(carol, one)
                        async with aiohttp.ClientSession(base_url=two.url) as carol_two:
                            carol_two.cookie_jar.update_cookies({COOKIE: carol_cookie})
                            sent = [ask(s, stream, f"c{i}")
                                    for i, s in enumerate((carol, carol_two) * 2)]  # fmt: skip
                            statuses = sorted(r.status for r in await asyncio.gather(*sent))
                    assert statuses.count(201) <= 2 and set(statuses) <= {201, 202, 429}

            # Rotating cookies on node two: the address (7 in all) is counted across nodes.
            rotated = []
            for i in range(6):
                async with cookieless(two) as bot:
                    rotated.append((await ask(bot, stream, f"r{i}")).status)
            assert rotated == [201] * 3 + [429] * 3, rotated

            # Both nodes fold the log to the same questions and votes.
            async with cookieless(one) as a, cookieless(two) as b:
                seen_one = (await questions(a, stream, host=True))["questions"]
                seen_two = (await questions(b, stream, host=True))["questions"]
            assert seen_one == seen_two
            texts = [q["text"] for q in seen_one]
            assert len(texts) == 7, texts  # the address's whole budget, no more
            assert sum(t.startswith("c") for t in texts) == 2, texts
            assert {q["id"]: q["votes"] for q in seen_one}[qid] == 1
    finally:
        await asyncio.gather(one.runner.cleanup(), two.runner.cleanup())
