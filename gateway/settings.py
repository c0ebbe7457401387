"""One settings object for every role, built once from CLI flags and the environment.

Nothing else in the code base reads ``os.environ``: a module that needs a knob takes it
from :class:`Settings`, so a reader finds every option and its default in this file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

# Environment variables understood by whipcast, and the setting each one fills.
ENV_VARS = {
    "WHIPCAST_PUBLISH_TOKEN": "publish_token",
    "WHIPCAST_KAFKA_BOOTSTRAP": "kafka_bootstrap",
    "WHIPCAST_KAFKA_SECURITY_PROTOCOL": "kafka_security_protocol",
    "WHIPCAST_KAFKA_SASL_MECHANISM": "kafka_sasl_mechanism",
    "WHIPCAST_KAFKA_SASL_USERNAME": "kafka_sasl_username",
    "WHIPCAST_KAFKA_SASL_PASSWORD": "kafka_sasl_password",
    "WHIPCAST_KAFKA_SSL_CAFILE": "kafka_ssl_cafile",
    "WHIPCAST_KAFKA_CACHE": "kafka_cache_dir",
    "KAFKA_HOME": "kafka_home",
    "WHIPCAST_PUBLIC_IP": "public_ip",
    "WHIPCAST_NODE_ID": "node_id",
    "WHIPCAST_ADVERTISE_URL": "advertise_url",
    "WHIPCAST_WEB_ROOT": "web_root",
}


def package_dir(package: str) -> Path:
    """The folder of an installed package's data (pages, the Kafka pom): wheels and
    editable installs both unpack to a real folder, which aiohttp and Maven need."""
    return Path(str(resources.files(package)))


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "whipcast"


@dataclass(frozen=True)
class Settings:
    # HTTP control plane
    host: str = "127.0.0.1"
    port: int = 8080
    publish_token: str | None = None
    web_root: Path = field(default_factory=lambda: package_dir("whipcast.web"))
    max_sdp_bytes: int = 64 * 1024
    advertise_url: str | None = None
    """Base URL other nodes send clients to (``http://host:port``); default from host/port."""
    ice_servers: tuple[str, ...] = ()
    """STUN/TURN URLs offered to clients in ``Link`` headers (``turn:`` entries may carry
    ``user:pass@`` credentials)."""

    # Media plane
    media_addresses: tuple[str, ...] = ()
    """Local addresses ICE gathers host candidates on; empty means the HTTP host."""
    public_ip: str | None = None
    """Address written into ICE candidates instead of the bound one (1:1 NAT)."""
    node_id: str = field(default_factory=lambda: "node-" + secrets.token_hex(4))
    publisher_timeout: float = 10.0
    """Seconds without media after which a publisher is considered gone."""
    max_keyframe_interval: float = 2.0
    """Ingest asks the publisher for a keyframe when none came for this long (0: never)."""
    keyframe_request_interval: float = 0.5
    """Least time between two keyframe requests sent to one publisher."""
    viewer_queue_frames: int = 120
    """Frames a viewer may have waiting before it is dropped to the next keyframe."""
    gop_cache_frames: int = 300
    """Longest GOP kept for instant joins; a longer one is dropped and a keyframe asked for."""
    max_viewers: int = 500
    """Viewers an egress node takes before signaling places new ones elsewhere."""
    max_publishers: int = 50
    max_cpu_percent: float = 85.0
    """A node above this CPU (% of one core) gets no new sessions while others have room."""
    fanout_linger: float = 10.0
    """Seconds a stream's Kafka reader stays open on a node after its last viewer left."""

    # Audience Q&A (signaling/qa.py)
    qa_retention_ms: int = 7 * 24 * 3600 * 1000
    """How long questions stay in Kafka: long enough to show them again with a replay."""
    qa_max_questions: int = 5000
    """Questions one stream accepts; bounds every node's memory per stream."""
    qa_question_burst: int = 3
    qa_question_interval: float = 20.0
    """Each client may ask ``qa_question_burst`` questions at once, then one per interval."""
    qa_vote_burst: int = 20
    qa_vote_interval: float = 1.0
    qa_heartbeat: float = 15.0
    """Seconds between SSE comment lines; also how fast a vanished client is noticed."""
    qa_subscriber_queue: int = 256
    """Events one SSE client may have unsent; a client further behind is disconnected."""
    qa_board_linger: float = 120.0
    """Seconds a stream's Q&A log stays followed on a node after its last use."""

    # Kafka
    kafka_bootstrap: str | None = None
    """Existing cluster to use; ``None`` in dev mode starts an embedded broker."""
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None
    topic_prefix: str = "whipcast"
    topic_replication_factor: int = 1
    stream_retention_ms: int = 5 * 60 * 1000
    kafka_home: Path | None = None
    kafka_cache_dir: Path = field(default_factory=_default_cache_dir)
    kafka_heap: str = "512m"

    # Kafka client tuning (docs/benchmarks.md, "What a stream costs")
    kafka_fetch_wait_ms: int = 500
    """How long a frame reader's fetch may wait at the broker while no record is there.
    Apache Kafka (and Redpanda) answer a waiting fetch as soon as a record arrives, so a
    long wait costs no latency and saves an empty fetch every few ms; lower it only for a
    Kafka-compatible broker that holds every fetch to the end."""

    # Logging
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then environment variables, then explicit overrides (CLI flags)."""
        env = os.environ if env is None else env
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for var, name in ENV_VARS.items():
            if env.get(var):
                values[name] = Path(env[var]) if "Path" in str(types[name]) else env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)

    @property
    def url(self) -> str:
        """Where clients reach this node's HTTP endpoints."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def ice_host_addresses(self) -> tuple[str, ...]:
        if self.media_addresses:
            return self.media_addresses
        if self.host in ("0.0.0.0", "::", ""):
            return ()
        return (self.host,)

    def kafka_client_options(self) -> dict[str, object]:
        """Connection options shared by every aiokafka client (security passed through)."""
        options: dict[str, object] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = self.kafka_sasl_password
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(cafile=self.kafka_ssl_cafile)
        return options
