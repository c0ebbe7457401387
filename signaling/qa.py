"""Audience Q&A: questions, votes and moderation for a stream, kept in Kafka.

Each stream has a topic ``{prefix}.qa.{stream}`` (one partition, so one order) holding
JSON events keyed by question id:

- ``{"type": "question", "id", "name", "text", "created_at", "stream_time", "session",
  "client"}``: ``stream_time`` is seconds since the broadcast started (``None`` if it
  was not live), so a replay can show the question at the moment it was asked.
- ``{"type": "vote", "id", "client", "at"}``: at most one vote per client counts.
- ``{"type": "moderate", "id", "pinned"?, "answered"?, "hidden"?, "at"}``: by the host;
  pinning a question unpins the one pinned before.

``client`` is a hash of the viewer's client-id cookie, never the cookie itself. No node
owns the state: every node folds the same log into a :class:`Board`, so a restarted
node, or another one, shows the same questions. A write is acknowledged to the client
only after Kafka has it (``acks=all``) and this node has read it back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
import unicodedata
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from prometheus_client import Counter, Gauge

from gateway.bus import CONTROL_FETCH_MAX_WAIT_MS, Bus
from gateway.errors import NotLive, SessionError
from gateway.metrics import Metrics
from gateway.registry import RegistryView
from gateway.settings import Settings

from .kafkalog import Topics, durable_producer, read_to_end

logger = logging.getLogger(__name__)

MAX_TEXT = 500
MAX_NAME = 40
DEFAULT_NAME = "Anonymous"
LOAD_TIMEOUT_S = 10.0
READ_BACK_TIMEOUT_S = 5.0
# Bidirectional overrides and isolates make text display differently from what it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class QuestionsClosed(SessionError):
    status = 409


class Unavailable(SessionError):
    status = 503


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


@dataclass
class Question:
    id: str
    name: str
    text: str
    created_at: float
    stream_time: float | None
    session: int | None
    author: str
    voters: set[str] = field(default_factory=set)
    pinned: bool = False
    answered: bool = False
    hidden: bool = False

    def view(self, voter: str | None = None) -> dict:
        """The question as clients see it; ``voted`` only when asked for one client."""
        shown = {
            "id": self.id,
            "name": self.name,
            "text": self.text,
            "created_at": self.created_at,
            "stream_time": self.stream_time,
            "votes": len(self.voters),
            "pinned": self.pinned,
            "answered": self.answered,
            "hidden": self.hidden,
        }
        if voter is not None:
            shown["voted"] = voter in self.voters
        return shown


class Subscription:
    """One live-updates client: a bounded queue of (event, JSON data) pairs.

    A client that falls ``maxsize`` events behind is closed rather than buffered for
    without end; it reconnects and starts again from a snapshot.
    """

    def __init__(self, host: bool, maxsize: int) -> None:
        self.host = host
        self.closed = False
        self.overflowed = False
        self._queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize)

    def offer(self, event: tuple[str, str]) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self.close()

    def close(self) -> None:
        """End the stream: whatever is still queued is dropped, the reader sees None."""
        if self.closed:
            return
        self.closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def next(self, timeout: float) -> tuple[str, str] | None:
        """The next event; raises TimeoutError after ``timeout`` s, None once closed."""
        return await asyncio.wait_for(self._queue.get(), timeout)


class Board:
    """One stream's questions on this node, folded from its topic and followed live."""

    def __init__(self, stream: str, topic: str, consumer: AIOKafkaConsumer, metrics: _Metrics):
        self.stream = stream
        self.questions: dict[str, Question] = {}
        self.subscribers: set[Subscription] = set()
        self.last_used = time.monotonic()
        self.next_offset = 0
        """Offset of the first record not yet applied."""
        self._tp = TopicPartition(topic, 0)
        self._consumer = consumer
        self._metrics = metrics
        self._applied = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign([self._tp])
        if not await read_to_end(self._consumer, self._tp, self._apply, LOAD_TIMEOUT_S):
            raise Unavailable("the question log could not be read in time; try again")
        self._task = asyncio.create_task(self._follow(), name=f"qa-{self.stream}")

    async def stop(self) -> None:
        for subscription in list(self.subscribers):
            subscription.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    @property
    def failed(self) -> bool:
        return self._task is not None and self._task.done()

    async def _follow(self) -> None:
        try:
            while True:
                for records in (await self._consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        self._apply(record)
        except KafkaError:
            logger.exception("stopped following the questions of %s", self.stream)
            for subscription in list(self.subscribers):
                subscription.close()

    async def wait_applied(self, offset: int, timeout: float) -> bool:
        """Wait (bounded) until the record at ``offset`` has been applied here."""
        deadline = time.monotonic() + timeout
        while self.next_offset <= offset:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._applied.wait(), remaining)
            except TimeoutError:
                return self.next_offset > offset
        return True

    def subscribe(self, host: bool, maxsize: int) -> Subscription:
        subscription = Subscription(host, maxsize)
        self.subscribers.add(subscription)
        self._metrics.subscribers.inc()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self.subscribers:
            self.subscribers.discard(subscription)
            self._metrics.subscribers.dec()
            if subscription.overflowed:
                self._metrics.slow_subscribers.inc()
        self.last_used = time.monotonic()

    def listed(self, host: bool, voter: str | None = None) -> list[dict]:
        """Questions in the order clients show them: pinned, open by votes, answered."""
        shown = [q for q in self.questions.values() if host or not q.hidden]
        shown.sort(key=lambda q: (not q.pinned, q.answered, -len(q.voters), q.created_at))
        return [q.view(voter) for q in shown]

    def _apply(self, record: ConsumerRecord) -> None:
        self.next_offset = record.offset + 1
        try:
            event = json.loads(record.value)
            changed = self._fold(event)
        except (ValueError, TypeError, KeyError, AttributeError):
            self._metrics.malformed.inc()
            changed = []
        for question in changed:
            self._announce(question)
        self._applied.set()
        self._applied = asyncio.Event()

    def _fold(self, event: dict) -> list[Question]:
        kind = event["type"]
        if kind == "question":
            question = Question(
                id=str(event["id"]),
                name=str(event["name"]),
                text=str(event["text"]),
                created_at=float(event["created_at"]),
                stream_time=event.get("stream_time"),
                session=event.get("session"),
                author=str(event["client"]),
            )
            if question.id in self.questions:
                return []
            self.questions[question.id] = question
            return [question]
        question = self.questions.get(str(event["id"]))
        if question is None:
            return []
        if kind == "vote":
            voter = str(event["client"])
            if voter in question.voters:
                return []
            question.voters.add(voter)
            return [question]
        if kind != "moderate":
            return []
        changed = [question]
        if event.get("pinned") is True:
            for other in self.questions.values():
                if other.pinned and other is not question:
                    other.pinned = False
                    changed.append(other)
        for flag in ("pinned", "answered", "hidden"):
            if isinstance(event.get(flag), bool):
                setattr(question, flag, event[flag])
        return changed

    def _announce(self, question: Question) -> None:
        """Tell every live client; viewers never learn what a hidden question says."""
        if not self.subscribers:
            return
        for_host = ("question", json.dumps(question.view()))
        for_viewers = ("removed", json.dumps({"id": question.id})) if question.hidden else for_host
        for subscription in list(self.subscribers):
            subscription.offer(for_host if subscription.host else for_viewers)


class _Metrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.questions = Counter("whipcast_qa_questions", "Questions accepted", registry=r)
        self.votes = Counter("whipcast_qa_votes", "Votes accepted", registry=r)
        self.malformed = Counter(
            "whipcast_qa_malformed_records", "Q&A log records that could not be applied",
            registry=r,
        )  # fmt: skip
        self.slow_subscribers = Counter(
            "whipcast_qa_slow_subscribers",
            "Live-update clients disconnected because they fell too far behind", registry=r,
        )  # fmt: skip
        self.subscribers = Gauge(
            "whipcast_qa_subscribers", "Open live-update connections", registry=r
        )


class QAService:
    """The node's Q&A: opens a stream's board on first use and closes it when idle."""

    def __init__(self, settings: Settings, bus: Bus, view: RegistryView, metrics: Metrics):
        self.settings = settings
        self._bus = bus
        self._view = view
        self._metrics = _Metrics(metrics)
        self._topics = Topics(settings)
        self._producer: AIOKafkaProducer | None = None
        self._boards: dict[str, asyncio.Task[Board]] = {}
        self._sweeper: asyncio.Task | None = None

    def topic(self, stream: str) -> str:
        return f"{self.settings.topic_prefix}.qa.{stream}"

    async def start(self) -> None:
        await self._topics.start()
        self._producer = durable_producer(self.settings)
        await self._producer.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="qa-sweeper")

    def close_subscriptions(self) -> None:
        """End every live-update stream (before the HTTP server waits for handlers)."""
        for task in self._boards.values():
            if task.done() and not task.exception():
                for subscription in list(task.result().subscribers):
                    subscription.close()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for stream in list(self._boards):
            await self._close(stream)
        if self._producer is not None:
            await self._producer.stop()
        await self._topics.stop()

    async def board(self, stream: str) -> Board:
        """The stream's board, read from Kafka on first use.

        A live stream's topic is created if needed; for a stream that is not live the
        topic must already exist, so reading a name nobody used creates nothing.
        """
        task = self._boards.get(stream)
        if task is None or (task.done() and (task.exception() or task.result().failed)):
            if task is not None:
                await self._close(stream)
            task = self._boards[stream] = asyncio.ensure_future(self._open(stream))
        try:
            board = await asyncio.shield(task)
        except SessionError:
            self._boards.pop(stream, None)
            raise
        board.last_used = time.monotonic()
        return board

    async def _open(self, stream: str) -> Board:
        topic = self.topic(stream)
        try:
            if self._view.get(stream) is not None:
                await self._topics.ensure(
                    NewTopic(topic, 1, self.settings.topic_replication_factor,
                             topic_configs={"retention.ms": str(self.settings.qa_retention_ms)})
                )  # fmt: skip
            elif not await self._topics.exists(topic):
                raise NotLive(f"stream {stream!r} has no questions: it is not live")
            board = Board(stream, topic, self._bus.consumer(CONTROL_FETCH_MAX_WAIT_MS),
                          self._metrics)  # fmt: skip
            await board.start()
        except KafkaError as exc:
            raise Unavailable(f"questions are unavailable: Kafka did not answer ({exc})") from exc
        return board

    async def _close(self, stream: str) -> None:
        task = self._boards.pop(stream, None)
        if task is None:
            return
        if not task.done():
            task.cancel()
        try:
            board = await task
        except (asyncio.CancelledError, Exception):
            return
        await board.stop()

    async def _sweep(self) -> None:
        """Stop following the logs of streams nobody asked about for a while."""
        linger = self.settings.qa_board_linger
        while True:
            await asyncio.sleep(min(linger, 30.0))
            now = time.monotonic()
            for stream, task in list(self._boards.items()):
                if not task.done():
                    continue
                if task.exception() is not None:
                    self._boards.pop(stream, None)
                    continue
                board = task.result()
                if not board.subscribers and now - board.last_used > linger:
                    await self._close(stream)

    async def ask(self, stream: str, client_id: str, name: object, text: object) -> dict:
        """Record a question; returns it once Kafka acknowledged it."""
        text = clean_text(text, "text", MAX_TEXT, multiline=True)
        if not text:
            raise SessionError("text must not be empty")
        name = clean_text(name if name is not None else "", "name", MAX_NAME) or DEFAULT_NAME
        info = self._view.get(stream)
        if info is None:
            raise QuestionsClosed(f"stream {stream!r} is not live; questions open when it is")
        board = await self.board(stream)
        if len(board.questions) >= self.settings.qa_max_questions:
            raise QuestionsClosed("this stream has reached its limit of questions")
        now = time.time()
        event = {
            "type": "question",
            "id": secrets.token_urlsafe(16),
            "name": name,
            "text": text,
            "created_at": round(now, 3),
            "stream_time": round(max(0.0, now - info.started_at), 3),
            "session": info.session,
            "client": client_key(client_id),
        }
        offset = await self._write(stream, event)
        self._metrics.questions.inc()
        await board.wait_applied(offset, READ_BACK_TIMEOUT_S)
        question = board.questions.get(event["id"])
        return question.view(event["client"]) if question else {**event, "votes": 0}

    async def vote(self, stream: str, question_id: str, client_id: str) -> dict | None:
        """Count the client's vote (once); the question as it is now, or None if the
        vote is saved but not yet visible here."""
        board = await self.board(stream)
        voter = client_key(client_id)
        question = _visible(board, question_id)
        if voter not in question.voters:
            event = {"type": "vote", "id": question_id, "client": voter, "at": time.time()}
            offset = await self._write(stream, event)
            self._metrics.votes.inc()
            if not await board.wait_applied(offset, READ_BACK_TIMEOUT_S):
                return None
        return question.view(voter)

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
        assert self._producer is not None
        try:
            metadata = await self._producer.send_and_wait(
                self.topic(stream), json.dumps(event).encode(), key=event["id"].encode()
            )
        except KafkaError as exc:
            raise Unavailable(f"not saved: Kafka did not acknowledge it ({exc})") from exc
        return metadata.offset


def _visible(board: Board, question_id: str) -> Question:
    question = board.questions.get(question_id)
    if question is None or question.hidden:
        raise NoSuchQuestion(question_id)
    return question
