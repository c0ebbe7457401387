"""Audience Q&A: questions, votes and moderation for a stream, kept in Kafka.

Each stream has a topic ``{prefix}.qa.{stream}`` (one partition, so one order) holding
JSON events keyed by question id:

- ``{"type": "question", "id", "name", "text", "created_at", "stream_time", "session",
  "client", "addr"}``: ``stream_time`` is seconds since the broadcast started (``None``
  if it was not live), so a replay can show the question at the moment it was asked.
- ``{"type": "vote", "id", "client", "addr", "at"}``: at most one vote per client counts.
- ``{"type": "moderate", "id", "pinned"?, "answered"?, "hidden"?, "at"}``: by the host;
  pinning a question unpins the one pinned before.

``client`` is a hash of the viewer's signed client id (:mod:`.clientid`), never the id
itself, and ``addr`` a keyed hash of its address, never the address. No node owns the
state: every node folds the same log into a :class:`Board`, which also decides which
questions and votes count (one vote per client, rates per client and per address), so
a restarted node, or another one, shows the same questions and the limits hold however
many nodes serve a stream. A write is acknowledged to the client only after Kafka has
it (``acks=all``) and this node has read it back and seen it counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import unicodedata

from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError
from whipcast.gateway.bus import Bus
from whipcast.gateway.errors import NotLive, SessionError, Unavailable
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.registry import RegistryView
from whipcast.gateway.settings import Settings
from whipcast.gateway.topic_reader import TopicReader

from .clientid import ClientIds, shared_secret
from .kafkalog import StateLog
from .qa_board import Board, BoardMetrics, Question

MAX_TEXT = 500
MAX_NAME = 40
DEFAULT_NAME = "Anonymous"
READ_BACK_TIMEOUT_S = 5.0
# Bidirectional overrides and isolates make text display differently from what it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class QuestionsClosed(SessionError):
    status = 409


class Limited(SessionError):
    """Too many questions or votes from one client or address (429)."""

    status = 429

    def __init__(self, what: str, who: str, retry_after: int) -> None:
        super().__init__(f"too many {what} from this {who}; try again in {retry_after} s")
        self.headers = {"Retry-After": str(retry_after)}


class NoSuchQuestion(SessionError):
    status = 404

    def __init__(self, question_id: str) -> None:
        super().__init__(f"no question {question_id!r} on this stream")


def clean_text(value: object, what: str, limit: int, multiline: bool = False) -> str:
    """User text as stored: NFC, trimmed, no control characters, at most ``limit`` long.

    Raises :class:`SessionError` (400) saying what is wrong with it.
    """
    if not isinstance(value, str):
        raise SessionError(f"{what} must be a string")
    text = unicodedata.normalize("NFC", value.replace("\r\n", "\n")).strip()
    for char in text:
        if char == "\n" and multiline:
            continue
        if char in _BIDI_CONTROLS or unicodedata.category(char) in ("Cc", "Cs"):
            raise SessionError(f"{what} must not contain control characters")
    if len(text) > limit:
        raise SessionError(f"{what} is longer than {limit} characters")
    return text


def client_key(client_id: str) -> str:
    """What the log stores about a client: enough to count one vote, useless to forge."""
    return hashlib.sha256(client_id.encode()).hexdigest()[:32]


class QAService:
    """The node's Q&A: opens a stream's board on first use and closes it when idle."""

    def __init__(
        self, settings: Settings, bus: Bus, view: RegistryView, log: StateLog, metrics: Metrics
    ) -> None:
        self.settings = settings
        self._bus = bus
        self._view = view
        self._log = log
        self._metrics = BoardMetrics(metrics)
        self._boards: dict[str, asyncio.Task[Board]] = {}
        self._sweeper: asyncio.Task | None = None
        self.ids: ClientIds | None = None
        """Signs and checks client ids; set by :meth:`start`."""

    def topic(self, stream: str) -> str:
        return f"{self.settings.topic_prefix}.qa.{stream}"

    def accepting(self, stream: str) -> bool:
        """Whether the stream takes new questions now: only while it is live."""
        return self._view.get(stream) is not None

    async def start(self) -> None:
        try:
            self.ids = ClientIds(await shared_secret(self.settings, self._bus, self._log))
        except KafkaError as exc:
            raise Unavailable(f"the Q&A secret could not be set up: {exc}") from exc
        self._sweeper = asyncio.create_task(self._sweep(), name="qa-sweeper")

    def close_subscriptions(self) -> None:
        """End every live-update stream (before the HTTP server waits for handlers)."""
        for task in self._boards.values():
            board = _opened(task)
            if board is not None:
                for subscription in list(board.subscribers):
                    subscription.close()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for stream in list(self._boards):
            await self._close(stream)

    async def board(self, stream: str) -> Board:
        """The stream's board, read from Kafka on first use.

        A live stream's topic is created if needed; for a stream that is not live the
        topic must already exist, so reading a name nobody used creates nothing.
        """
        task = self._boards.get(stream)
        if task is not None and task.done():
            opened = _opened(task)
            if opened is None or opened.failed:
                await self._close(stream)
                task = None
        if task is None:
            task = self._boards[stream] = asyncio.ensure_future(self._open(stream))
        try:
            board = await asyncio.shield(task)
        except Exception:
            if self._boards.get(stream) is task:
                del self._boards[stream]
            raise
        board.last_used = time.monotonic()
        return board

    async def _open(self, stream: str) -> Board:
        topic = self.topic(stream)
        try:
            if self._view.get(stream) is not None:
                await self._log.ensure(
                    NewTopic(topic, 1, self.settings.topic_replication_factor,
                             topic_configs={"retention.ms": str(self.settings.qa_retention_ms),
                                            # one clock for the limits the fold applies
                                            "message.timestamp.type": "LogAppendTime"})
                )  # fmt: skip
            elif not await self._log.exists(topic):
                raise NotLive(f"stream {stream!r} has no questions: it is not live")
            board = Board(stream, topic, TopicReader.of(self._bus),
                          self._metrics, self.settings)  # fmt: skip
            try:
                await board.start()
            except BaseException:
                await board.stop()
                raise
        except KafkaError as exc:
            raise Unavailable(f"questions are unavailable: Kafka did not answer ({exc})") from exc
        return board

    async def _close(self, stream: str) -> None:
        task = self._boards.pop(stream, None)
        if task is None:
            return
        if not task.done():
            task.cancel()
        board = (await asyncio.gather(task, return_exceptions=True))[0]
        if isinstance(board, Board):
            await board.stop()

    async def _sweep(self) -> None:
        """Stop following the logs of streams nobody asked about for a while."""
        linger = self.settings.qa_board_linger
        while True:
            await asyncio.sleep(min(linger, 30.0))
            now = time.monotonic()
            for stream, task in list(self._boards.items()):
                board = _opened(task)
                if board is not None and not board.subscribers and now - board.last_used > linger:
                    await self._close(stream)

    async def ask(
        self, stream: str, client_id: str, address: str, name: object, text: object
    ) -> dict | None:
        """Record a question; returns it once Kafka has it and it counted here, or None
        if it is saved but not yet read back."""
        text = clean_text(text, "text", MAX_TEXT, multiline=True)
        if not text:
            raise SessionError("text must not be empty")
        name = clean_text(name if name is not None else "", "name", MAX_NAME) or DEFAULT_NAME
        info = self._view.get(stream)
        if info is None:
            raise QuestionsClosed(f"stream {stream!r} is not live; questions open when it is")
        board = await self.board(stream)
        author = client_key(client_id)
        self._check(board, "question", author, address)
        now = time.time()
        event = {
            "type": "question",
            "id": secrets.token_urlsafe(16),
            "name": name,
            "text": text,
            "created_at": round(now, 3),
            "stream_time": round(max(0.0, now - info.started_at), 3),
            "session": info.session,
            "client": author,
            "addr": address,
        }
        offset = await self._write(stream, event)
        if not await board.wait_applied(offset, READ_BACK_TIMEOUT_S):
            return None
        question = board.questions.get(event["id"])
        if question is None:  # another node's writes used the budget first
            self._check(board, "question", author, address)
            raise Limited("questions", "client or address", 1)
        self._metrics.questions.inc()
        return question.view(author)

    async def vote(
        self, stream: str, question_id: str, client_id: str, address: str
    ) -> dict | None:
        """Count the client's vote (once); the question as it is now, or None if the
        vote is saved but not yet visible here."""
        board = await self.board(stream)
        voter = client_key(client_id)
        question = _visible(board, question_id)
        if voter not in question.voters:
            self._check(board, "vote", voter, address)
            event = {"type": "vote", "id": question_id, "client": voter, "addr": address,
                     "at": time.time()}  # fmt: skip
            offset = await self._write(stream, event)
            if not await board.wait_applied(offset, READ_BACK_TIMEOUT_S):
                return None
            if voter not in question.voters:  # another node's writes used the budget first
                self._check(board, "vote", voter, address)
                raise Limited("votes", "client or address", 1)
            self._metrics.votes.inc()
        return question.view(voter)

    def _check(self, board: Board, kind: str, client: str, address: str) -> None:
        """Refuse before writing what the log would not count (it counts per stream)."""
        if kind == "question" and board.full:
            raise QuestionsClosed("this stream has reached its limit of questions")
        wait, who = board.retry_after(kind, client, address, time.time())
        if wait:
            raise Limited(f"{kind}s", who, wait)

    async def moderate(
        self, stream: str, question_id: str, changes: dict[str, bool]
    ) -> dict | None:
        """Apply the host's flags; the question as it is now, or None as for votes."""
        board = await self.board(stream)
        question = board.questions.get(question_id)
        if question is None:
            raise NoSuchQuestion(question_id)
        offset = await self._write(
            stream, {"type": "moderate", "id": question_id, **changes, "at": time.time()}
        )
        if not await board.wait_applied(offset, READ_BACK_TIMEOUT_S):
            return None
        return question.view()

    async def _write(self, stream: str, event: dict) -> int:
        try:
            return await self._log.write(
                self.topic(stream), event["id"], json.dumps(event).encode()
            )
        except KafkaError as exc:
            raise Unavailable(f"not saved: Kafka did not acknowledge it ({exc})") from exc


def _visible(board: Board, question_id: str) -> Question:
    question = board.questions.get(question_id)
    if question is None or question.hidden:
        raise NoSuchQuestion(question_id)
    return question


def _opened(task: asyncio.Task[Board]) -> Board | None:
    """The board if opening it has succeeded."""
    if not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()
