"""One stream's questions on one node: folded from the stream's Q&A log (the event
format is in :mod:`whipcast.signaling.qa`), and the live-update subscriptions fed from it.

The fold is also where the Q&A's limits are enforced for every node at once: a vote
from a client already counted, and a question or vote beyond its client's or address's
rate (timed by the records' Kafka timestamps: the broker's append time on topics
whipcast creates) or beyond the stream's question limit, is in the log but does not
count. Every node folds the same records with the same settings in the same order, so
every node leaves out the same ones, however many nodes took the writes; the node that
wrote a record reads it back to learn whether it counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter, Gauge
from whipcast.gateway.errors import Unavailable
from whipcast.gateway.metrics import Metrics
from whipcast.gateway.settings import Settings
from whipcast.gateway.topic_reader import Following, TopicReader

from .ratelimit import RateLimiter

LOAD_TIMEOUT_S = 10.0


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

    @classmethod
    def from_event(cls, event: dict) -> Question:
        """A new question from its ``question`` event (see :mod:`whipcast.signaling.qa`)."""
        return cls(
            id=str(event["id"]),
            name=str(event["name"]),
            text=str(event["text"]),
            created_at=float(event["created_at"]),
            stream_time=event.get("stream_time"),
            session=event.get("session"),
            author=str(event["client"]),
        )

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

    def __init__(
        self, stream: str, topic: str, reader: TopicReader, metrics: BoardMetrics,
        settings: Settings,
    ) -> None:  # fmt: skip
        self.stream = stream
        self.questions: dict[str, Question] = {}
        self.subscribers: set[Subscription] = set()
        self.last_used = time.monotonic()
        self.next_offset = 0
        """Offset of the first record not yet applied."""
        self._topic = topic
        self._reader = reader
        self._following: Following | None = None
        self._metrics = metrics
        self._applied = asyncio.Event()
        self._max_questions = settings.qa_max_questions
        self._limits = {
            "question": (
                RateLimiter(settings.qa_question_burst, settings.qa_question_interval),
                RateLimiter(settings.qa_address_question_burst,
                            settings.qa_address_question_interval),
            ),
            "vote": (
                RateLimiter(settings.qa_vote_burst, settings.qa_vote_interval),
                RateLimiter(settings.qa_address_vote_burst, settings.qa_address_vote_interval),
            ),
        }  # fmt: skip

    async def start(self) -> None:
        """Fold the log up to its current end, then follow it (through the node's one
        :class:`~whipcast.gateway.topic_reader.TopicReader`)."""
        try:
            self._following = await asyncio.wait_for(
                self._reader.follow(self._topic, self._receive, history=True), LOAD_TIMEOUT_S
            )
        except TimeoutError:
            raise Unavailable("the question log could not be read in time; try again") from None

    async def stop(self) -> None:
        for subscription in list(self.subscribers):
            subscription.close()
        if self._following is not None:
            await self._reader.unfollow(self._following)
            self._following = None

    @property
    def failed(self) -> bool:
        """Its fold raised (a bug): it is reopened on next use."""
        return self._following is not None and self._following.failed

    def _receive(self, record: ConsumerRecord, live: bool) -> None:
        try:
            self._apply(record)
        except Exception:  # the reader drops this board, reopened on next use
            for subscription in list(self.subscribers):
                subscription.close()
            raise

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

    @property
    def full(self) -> bool:
        return len(self.questions) >= self._max_questions

    def retry_after(self, kind: str, client: str, address: str, now: float) -> tuple[int, str]:
        """Seconds until the log would count another ``kind`` ("question" or "vote") from
        this client and address, and which of the two is limited; (0, "") if it would now."""
        by_client, by_address = self._limits[kind]
        wait = by_client.retry_after(client, now)
        if wait:
            return wait, "client"
        wait = by_address.retry_after(address, now)
        return (wait, "address") if wait else (0, "")

    def _apply(self, record: ConsumerRecord) -> None:
        self.next_offset = record.offset + 1
        try:
            event = json.loads(record.value)
            changed = self._fold(event, record.timestamp / 1000)
        except (ValueError, TypeError, KeyError, AttributeError):
            self._metrics.malformed.inc()
            changed = []
        for question in changed:
            self._announce(question)
        self._applied.set()
        self._applied = asyncio.Event()

    def _counts(self, kind: str, event: dict, at: float) -> bool:
        """Whether the event's client and address may still do ``kind`` at ``at``; if so,
        it is charged to both. Records from before addresses were logged have none."""
        client, address = str(event["client"]), event.get("addr")
        by_client, by_address = self._limits[kind]
        if by_client.retry_after(client, at):
            return False
        if address is not None and by_address.retry_after(str(address), at):
            return False
        by_client.take(client, at)
        if address is not None:
            by_address.take(str(address), at)
        return True

    def _fold(self, event: dict, at: float) -> list[Question]:
        kind = event["type"]
        if kind == "question":
            question = Question.from_event(event)
            if question.id in self.questions or self.full:
                return []
            if not self._counts("question", event, at):
                return []
            self.questions[question.id] = question
            return [question]
        question = self.questions.get(str(event["id"]))
        if question is None:
            return []
        if kind == "vote":
            voter = str(event["client"])
            if voter in question.voters or not self._counts("vote", event, at):
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


class BoardMetrics:
    """Q&A figures on the node's /metrics; a slow subscriber dropped is counted."""

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
