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
    "WHIPCAST_QA_SECRET": "qa_secret",
    "WHIPCAST_NO_NATIVE": "no_native_fanout",
    "WHIPCAST_TOKEN": "push_token",
    "WHIPCAST_HLS_URL_SECRET": "hls_url_secret",
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

    # What one viewer may cost (gateway/egress.py, gateway/rtpsend.py)
    viewer_max_bitrate: int = 50_000_000
    """Bits/s one viewer may be sent, with 1 s of burst; beyond it its frames queue."""
    viewer_keyframe_interval: float = 1.0
    """Least time between two answers to one viewer's PLI/FIR (each resends the GOP)."""
    retransmit_budget: float = 0.25
    """Bytes resent on a viewer's NACKs: at most this fraction of the bytes it was sent."""
    retransmit_max_age: float = 1.0
    """Seconds after which a packet is not resent (less once the viewer's RTT is known)."""
    retransmit_max_resends: int = 3
    """Resends of one packet to one viewer at most."""

    # Per-viewer adaptation to the viewer's link (gateway/bandwidth.py, gateway/egress.py)
    viewer_adapt: bool = False
    """Drive each viewer's send budget by its bandwidth estimate (REMB, RR loss).
    Opt-in while experimental: with moderate random loss the estimate still pauses
    viewers whose link carries the stream (docs/architecture.md). Off: every viewer may
    be sent up to ``viewer_max_bitrate``."""
    viewer_min_bitrate: int = 100_000
    """The estimate never goes below this (bits/s); audio always fits."""
    viewer_max_queue_delay: float = 0.5
    """Seconds of frames a viewer whose estimate limits it may be behind before its
    video pauses until the next keyframe its link can take."""

    # Simulcast layer choice per viewer (gateway/layers.py, gateway/egress.py)
    viewer_layers: bool = True
    """For streams with simulcast layers: give each viewer the best layer its bandwidth
    estimate carries (on whatever ``viewer_adapt`` says: a viewer leaves the top layer
    only when its own estimate says so). Off: every viewer gets the top layer."""
    layer_up_hold_s: float = 10.0
    """Seconds a viewer's link must carry its layer with room to spare, after a switch
    down, before it tries the next better one; doubled after each failed try."""
    layer_up_max_hold_s: float = 15.0
    """The most a viewer waits between two tries of a better layer."""
    # Rewind and replay (gateway/playback.py, gateway/keyframes.py); the window itself
    # is the stream topics' retention (``stream_retention_ms``)
    rewind_search_s: float = 5.0
    """How far before a target the keyframe search starts: longer than any GOP the
    ingest lets through (``max_keyframe_interval`` plus the publisher's reaction)."""
    rewind_ahead_s: float = 1.0
    """How far a replay reads ahead of what it has sent (bounds its memory)."""
    replay_end_grace_s: float = 3.0
    """Seconds a replay session stays open after its recording ended, reporting
    ``"ended": true``, before it is closed (RTCP BYE)."""

    # Egress send path (gateway/rtpsend.py, gateway/native/)
    no_native_fanout: bool = False
    """Send with the pure-Python path even where the native fan-out core is built (it is
    the reference the native core is tested against, and the fallback)."""

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

    # Q&A client identity and per-address limits (signaling/clientid.py, qa_board.py).
    # Every signaling node must run with the same values: each one folds the Q&A log
    # with them, and nodes agree on what counts only if they fold alike.
    qa_secret: str | None = field(default=None, repr=False)
    """Key that signs client-id cookies (16+ characters); ``None``: one kept in Kafka."""
    qa_address_question_burst: int = 20
    qa_address_question_interval: float = 3.0
    """Backstop per client address (IPv6: per /64), whatever cookies it sends."""
    qa_address_vote_burst: int = 200
    qa_address_vote_interval: float = 0.1
    qa_trust_forwarded_for: bool = False
    """Take the client address from the last ``X-Forwarded-For`` entry (only behind a
    proxy that sets it); otherwise the connection's peer address is used."""

    # Thumbnails (gateway/thumbnails.py, the ``thumbnails`` role)
    thumbnail_interval: float = 5.0
    """Seconds between two pictures of one stream; each costs one keyframe decode."""
    thumbnail_width: int = 320
    """Width of a thumbnail in pixels (never wider than the stream)."""

    # Tap, push and clips: readers and a writer of the log for standard tools
    # (gateway/tap.py, gateway/push.py, gateway/clips.py)
    push_token: str | None = field(default=None, repr=False)
    """Token ``whipcast push`` presents; must equal ``publish_token`` when that is set."""
    clip_max_s: float = 600.0
    """Longest clip ``/api/streams/{stream}/clip`` cuts."""
    clip_max_jobs: int = 2
    """Clips one node cuts at once; more are refused (503) rather than queued."""

    # Recording (gateway/recorder.py, the ``record`` role; off without a directory)
    record_dir: Path | None = None
    """Where recordings are written (and served from by ``/api/recordings``)."""
    record_streams: str = "*"
    """Glob of the stream names this recorder group records."""
    record_max_bytes: int = 1024**3
    record_max_seconds: float = 3600.0
    """A part is rolled at its first keyframe past either limit."""
    record_flush_s: float = 1.0
    """A fragment reaches the disk (fsync) at least this often: what a crash may lose."""
    record_discovery_ms: int = 2000
    """How often recorders look for new stream topics (Kafka metadata refresh)."""
    record_session_timeout_ms: int = 6000
    """How long the group waits for a silent recorder before others take its streams
    (Kafka's broker-side minimum is 6 s by default)."""

    # LL-HLS (gateway/hls/, the ``hls`` role; signaling/hls_api.py)
    hls_part_target: float = 0.5
    """Seconds of media per LL-HLS part; players hold back three parts."""
    hls_target_duration: int = 3
    """Longest segment in whole seconds; a segment is one GOP (about the 2 s the ingest
    enforces) and is cut here if a GOP runs longer."""
    hls_min_segment: float = 1.0
    """A keyframe starts a new segment only after this much of the current one."""
    hls_window_s: float = 60.0
    """The DVR window of a media playlist in seconds (delta updates keep long ones cheap)."""
    hls_url_secret: str | None = field(default=None, repr=False)
    """If set, every ``/hls/`` request needs ``exp`` and ``sig`` (HMAC-SHA256 of
    ``{stream}:{exp}``), so a CDN can sit in front of private streams."""

    # LL-HLS on demand (gateway/hls/packager.py)
    hls_always_package: bool = False
    """Package every live H.264 session from its start, asked for or not (CDN origins
    that want every node warm); by default a live session is packaged from the first
    request for it and stopped after ``hls_idle_stop_s`` without one, as MediaMTX does."""
    hls_idle_stop_s: float = 30.0
    """A live session's package stops after this long without a request (on demand)."""

    # Kafka
    kafka_bootstrap: str | None = None
    """Existing cluster to use; ``None`` in dev mode starts an embedded broker."""
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None
    topic_prefix: str = "whipcast"
    topic_replication_factor: int | None = None
    """Replicas per new topic; ``None``: min(3, brokers in the cluster)."""
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
    kafka_audio_hold_ms: float = 40.0
    """Longest an ingest holds an audio frame of a stream that also has video, so that
    it rides in the same produce request as the next video frame (one request per
    video frame instead of one per frame and per audio packet). Video is never held;
    0 sends every audio frame at once."""

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
                kind = str(types[name])
                if kind == "bool":
                    values[name] = env[var].lower() not in ("0", "false", "no")
                else:
                    values[name] = Path(env[var]) if "Path" in kind else env[var]
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
