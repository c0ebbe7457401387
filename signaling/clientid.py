"""Signed client ids for the audience Q&A, and the secret every signaling node shares.

A viewer's cookie is ``{id}.{tag}``: ``id`` is 16 random bytes and ``tag`` the first
16 bytes of HMAC-SHA256(secret, id), both base64url. Only a node holding the secret can
mint one, so a client cannot make up ids to get around the one-vote rule or the rate
limits; any other cookie value counts as no cookie and a new id is issued.

The secret is ``--qa-secret`` (env ``WHIPCAST_QA_SECRET``) when set. Otherwise the
first node to start writes a random one to the topic ``{prefix}.qa-secret`` and every
node uses the record at the lowest offset, so nodes racing at start-up agree: each
writes under a key of its own, so compaction never removes that first record. The
secret is never logged; anyone who can read that topic can mint ids, so a cluster whose
Kafka is readable by others should set ``--qa-secret``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets

from aiokafka.admin import NewTopic
from aiokafka.structs import ConsumerRecord, TopicPartition
from whipcast.gateway.bus import CONTROL_FETCH_MAX_WAIT_MS, Bus
from whipcast.gateway.errors import Unavailable
from whipcast.gateway.settings import Settings

from .kafkalog import StateLog, read_to_end

MIN_SECRET = 16
READ_TIMEOUT_S = 10.0
_SIGNED = re.compile(r"^([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{22})$")


class ClientIds:
    """Mints and checks signed client ids; keys client addresses with the same secret."""

    def __init__(self, secret: bytes) -> None:
        self._ids = hmac.new(secret, b"whipcast client id", hashlib.sha256).digest()
        self._addresses = hmac.new(secret, b"whipcast address", hashlib.sha256).digest()

    def issue(self) -> tuple[str, str]:
        """A new client id and the cookie value that carries it."""
        client = secrets.token_urlsafe(16)
        return client, f"{client}.{self._tag(client)}"

    def verify(self, value: str) -> str | None:
        """The client id in a cookie value, or None unless this secret signed it."""
        match = _SIGNED.match(value)
        if match is None or not hmac.compare_digest(match[2], self._tag(match[1])):
            return None
        return match[1]

    def address_key(self, address: str) -> str:
        """What the log stores about a client address: a keyed hash, so it cannot be
        turned back into the address by trying all of them."""
        return hmac.new(self._addresses, address.encode(), hashlib.sha256).hexdigest()[:32]

    def _tag(self, client: str) -> str:
        digest = hmac.new(self._ids, client.encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def shared_secret(settings: Settings, bus: Bus, log: StateLog) -> bytes:
    """The configured secret, or the one kept in Kafka (written first if there is none)."""
    if settings.qa_secret is not None:
        if len(settings.qa_secret) < MIN_SECRET:
            raise ValueError(f"the Q&A secret must be at least {MIN_SECRET} characters")
        return settings.qa_secret.encode()
    topic = f"{settings.topic_prefix}.qa-secret"
    await log.ensure(
        NewTopic(topic, 1, settings.topic_replication_factor,
                 topic_configs={"cleanup.policy": "compact"})
    )  # fmt: skip
    consumer = bus.consumer(CONTROL_FETCH_MAX_WAIT_MS)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        found = await _first_secret(consumer, partition)
        if found is None:
            value = json.dumps({"secret": secrets.token_urlsafe(32)}).encode()
            await log.write(topic, secrets.token_hex(8), value)
            # Everything up to and including this write is readable now (acks=all), so
            # whichever record is first is the same for every node that wrote one.
            found = await _first_secret(consumer, partition)
        if found is None:
            raise Unavailable("the Q&A secret could not be read back from Kafka")
        return found
    finally:
        await consumer.stop()


async def _first_secret(consumer, partition: TopicPartition) -> bytes | None:
    found: list[bytes] = []

    def apply(record: ConsumerRecord) -> None:
        if found or record.value is None:
            return
        try:
            secret = json.loads(record.value)["secret"]
        except (ValueError, TypeError, KeyError):
            return
        if isinstance(secret, str) and len(secret) >= MIN_SECRET:
            found.append(secret.encode())

    if not await read_to_end(consumer, partition, apply, READ_TIMEOUT_S):
        raise Unavailable("the Q&A secret could not be read from Kafka in time")
    return found[0] if found else None
