"""HTTP side of the audience Q&A (:mod:`whipcast.signaling.qa`): JSON resources and SSE updates.

Viewers are told apart by a signed random client id (:mod:`.clientid`) in an HttpOnly,
SameSite cookie. Any request without a valid one, read or write, gets a new id and the
cookie with its answer, so an integration or a second tab may write first. Rotating
cookies gains nothing: every question and vote is also limited per client address (the
connection's peer, or ``X-Forwarded-For`` behind a proxy the settings say to trust).
Each node limits what it writes; the log's fold (:mod:`.qa_board`) limits what counts,
across nodes. The host proves itself with the publish token, like WHIP; ``?view=host``
reads include hidden questions and need it too.
"""

from __future__ import annotations

import ipaddress
import json
import re

from aiohttp import web
from whipcast.gateway.errors import SessionError
from whipcast.gateway.settings import Settings

from . import jsonbody, resources, sse
from .auth import require_token
from .clientid import ClientIds
from .qa import Limited, NoSuchQuestion, QAService, client_key
from .ratelimit import RateLimiter

CLIENT_COOKIE = "whipcast_client"
QUESTION_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # 16 random bytes in base64url
CLIENT_COOKIE_MAX_AGE = 365 * 24 * 3600
FLAGS = ("pinned", "answered", "hidden")


def add_routes(app: web.Application, qa: QAService, settings: Settings) -> None:
    questions_allowed = (
        RateLimiter(settings.qa_question_burst, settings.qa_question_interval),
        RateLimiter(settings.qa_address_question_burst, settings.qa_address_question_interval),
    )
    votes_allowed = (
        RateLimiter(settings.qa_vote_burst, settings.qa_vote_interval),
        RateLimiter(settings.qa_address_vote_burst, settings.qa_address_vote_interval),
    )

    def identify(request: web.Request) -> Client:
        assert qa.ids is not None, "the Q&A service is started before requests are served"
        return Client.of(request, qa.ids, settings.qa_trust_forwarded_for)

    def is_host(request: web.Request) -> bool:
        if request.query.get("view") != "host":
            return False
        require_token(request, settings.publish_token)
        return True

    async def list_questions(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        host = is_host(request)
        client = identify(request)
        board = await qa.board(stream)
        body = {
            "stream": stream,
            "open": qa.accepting(stream),
            "questions": board.listed(host, client_key(client.id)),
        }
        response = web.json_response(body, headers={"Cache-Control": "no-store"})
        client.remember(request, response)
        return response

    async def ask(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        client = identify(request)
        body = await jsonbody.read_object(request, {"name", "text"})
        _limit(questions_allowed, stream, client, "questions")
        question = await qa.ask(stream, client.id, client.address, body.get("name"),
                                body.get("text"))  # fmt: skip
        if question is None:
            response = _current(None)
        else:
            location = f"/api/streams/{stream}/questions/{question['id']}"
            response = web.json_response(question, status=201, headers={"Location": location})
        client.remember(request, response)
        return response

    async def vote(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        question_id = _question_id(request)
        client = identify(request)
        _limit(votes_allowed, stream, client, "votes")
        response = _current(await qa.vote(stream, question_id, client.id, client.address))
        client.remember(request, response)
        return response

    async def moderate(request: web.Request) -> web.Response:
        require_token(request, settings.publish_token)
        stream = resources.stream_name(request)
        question_id = _question_id(request)
        body = await jsonbody.read_object(request, set(FLAGS))
        if not body:
            raise SessionError(f"set at least one of {', '.join(FLAGS)}")
        for flag, value in body.items():
            if not isinstance(value, bool):
                raise SessionError(f"{flag} must be true or false")
        return _current(await qa.moderate(stream, question_id, body))

    async def events(request: web.Request) -> web.StreamResponse:
        stream = resources.stream_name(request)
        host = is_host(request)
        client = identify(request)
        board = await qa.board(stream)
        subscription = board.subscribe(host, settings.qa_subscriber_queue)
        try:
            response = sse.event_stream()
            client.remember(request, response)
            await response.prepare(request)
            snapshot = {
                "open": qa.accepting(stream),
                "questions": board.listed(host, client_key(client.id)),
            }
            await sse.send(response, "snapshot", json.dumps(snapshot))
            while True:
                try:
                    event = await subscription.next(settings.qa_heartbeat)
                except TimeoutError:
                    await sse.heartbeat(response)
                    continue
                if event is None:
                    break
                await sse.send(response, *event)
        except ConnectionResetError:
            pass  # the client went away; nothing to tell it
        finally:
            board.unsubscribe(subscription)
        return response

    async def end_streams(app: web.Application) -> None:
        qa.close_subscriptions()

    base = "/api/streams/{stream}/questions"
    app.router.add_get(base, list_questions)
    app.router.add_post(base, ask)
    app.router.add_get(base + "/events", events)
    app.router.add_post(base + "/{question}/vote", vote)
    app.router.add_patch(base + "/{question}", moderate)
    app.on_shutdown.append(end_streams)


class Client:
    """Who sent a request: a signed client id (new if the cookie had none) and the keyed
    hash of its address."""

    def __init__(self, client_id: str, cookie: str | None, address: str) -> None:
        self.id = client_id
        self.address = address
        self._new_cookie = cookie

    @classmethod
    def of(cls, request: web.Request, ids: ClientIds, trust_forwarded_for: bool) -> Client:
        address = ids.address_key(client_address(request, trust_forwarded_for))
        client = ids.verify(request.cookies.get(CLIENT_COOKIE, ""))
        if client is not None:
            return cls(client, None, address)
        return cls(*ids.issue(), address)

    def remember(self, request: web.Request, response: web.StreamResponse) -> None:
        """Send the cookie if this client's id is new."""
        if self._new_cookie is not None:
            response.set_cookie(
                CLIENT_COOKIE, self._new_cookie, max_age=CLIENT_COOKIE_MAX_AGE, path="/",
                httponly=True, samesite="Lax", secure=request.secure,
            )  # fmt: skip


def client_address(request: web.Request, trust_forwarded_for: bool) -> str:
    """The address limits count by: the connection's peer, unless told to trust the
    proxy's ``X-Forwarded-For`` (its last entry: the one the proxy itself added). An
    IPv6 client is counted by its /64, which one subscriber usually gets whole."""
    address = request.remote or ""
    if trust_forwarded_for:
        forwarded = request.headers.getall("X-Forwarded-For", [])
        if forwarded:
            address = forwarded[-1].split(",")[-1].strip()
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _limit(
    limiters: tuple[RateLimiter, RateLimiter], stream: str, client: Client, what: str
) -> None:
    """This node's limits on what it writes, per stream as in the log: per address, and
    per client id (every request counts, repeated votes too)."""
    by_client, by_address = limiters
    retry_after = by_address.take(f"{stream}/{client.address}")
    if retry_after:
        raise Limited(what, "address", retry_after)
    retry_after = by_client.take(f"{stream}/{client.id}")
    if retry_after:
        raise Limited(what, "client", retry_after)


def _question_id(request: web.Request) -> str:
    question_id = request.match_info["question"]
    if not QUESTION_ID.match(question_id):
        raise NoSuchQuestion(question_id)
    return question_id


def _current(question: dict | None) -> web.Response:
    """The question after a change; 202 in the rare case the change is saved in Kafka but
    this node has not read it back yet."""
    if question is None:
        return web.json_response({"accepted": True}, status=202)
    return web.json_response(question)
