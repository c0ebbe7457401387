"""HTTP side of the audience Q&A (:mod:`whipcast.signaling.qa`): JSON resources and SSE updates.

Viewers are told apart by a random client id in an HttpOnly, SameSite cookie that the
first read sets; writes need it, and rate limits and the one-vote rule count per id.
The host proves itself with the publish token, like WHIP; ``?view=host`` reads include
hidden questions and need it too.
"""

from __future__ import annotations

import json
import re
import secrets

from aiohttp import web
from whipcast.gateway.errors import SessionError
from whipcast.gateway.settings import Settings

from . import jsonbody, resources, sse
from .auth import require_token
from .qa import NoSuchQuestion, QAService, client_key
from .ratelimit import RateLimiter

CLIENT_COOKIE = "whipcast_client"
CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")
QUESTION_ID = CLIENT_ID  # both are 16 random bytes in base64url
CLIENT_COOKIE_MAX_AGE = 365 * 24 * 3600
FLAGS = ("pinned", "answered", "hidden")


def add_routes(app: web.Application, qa: QAService, settings: Settings) -> None:
    questions_allowed = RateLimiter(settings.qa_question_burst, settings.qa_question_interval)
    votes_allowed = RateLimiter(settings.qa_vote_burst, settings.qa_vote_interval)

    def is_host(request: web.Request) -> bool:
        if request.query.get("view") != "host":
            return False
        require_token(request, settings.publish_token)
        return True

    async def list_questions(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        host = is_host(request)
        client = _client_id(request)
        board = await qa.board(stream)
        body = {
            "stream": stream,
            "open": qa.accepting(stream),
            "questions": board.listed(host, client_key(client)),
        }
        response = web.json_response(body, headers={"Cache-Control": "no-store"})
        _remember(request, response, client)
        return response

    async def ask(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        client = _known_client(request)
        body = await jsonbody.read_object(request, {"name", "text"})
        _limit(questions_allowed, client, "questions")
        question = await qa.ask(stream, client, body.get("name"), body.get("text"))
        location = f"/api/streams/{stream}/questions/{question['id']}"
        return web.json_response(question, status=201, headers={"Location": location})

    async def vote(request: web.Request) -> web.Response:
        stream = resources.stream_name(request)
        question_id = _question_id(request)
        client = _known_client(request)
        _limit(votes_allowed, client, "votes")
        return _current(await qa.vote(stream, question_id, client))

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
        client = _client_id(request)
        board = await qa.board(stream)
        subscription = board.subscribe(host, settings.qa_subscriber_queue)
        try:
            response = sse.event_stream()
            _remember(request, response, client)
            await response.prepare(request)
            snapshot = {
                "open": qa.accepting(stream),
                "questions": board.listed(host, client_key(client)),
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


def _client_id(request: web.Request) -> str:
    """The client's id from its cookie, or a new one (sent back by :func:`_remember`)."""
    value = request.cookies.get(CLIENT_COOKIE, "")
    return value if CLIENT_ID.match(value) else secrets.token_urlsafe(16)


def _known_client(request: web.Request) -> str:
    """Writes need an id the server handed out, so limits cannot be skipped by omission."""
    value = request.cookies.get(CLIENT_COOKIE, "")
    if not CLIENT_ID.match(value):
        raise SessionError(
            f"no {CLIENT_COOKIE} cookie: read the questions first (GET), which sets it"
        )
    return value


def _remember(request: web.Request, response: web.StreamResponse, client: str) -> None:
    if request.cookies.get(CLIENT_COOKIE) != client:
        response.set_cookie(
            CLIENT_COOKIE, client, max_age=CLIENT_COOKIE_MAX_AGE, path="/",
            httponly=True, samesite="Lax", secure=request.secure,
        )  # fmt: skip


def _limit(limiter: RateLimiter, client: str, what: str) -> None:
    retry_after = limiter.take(client)
    if retry_after:
        raise web.HTTPTooManyRequests(
            reason=f"too many {what} from this client; try again in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


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
