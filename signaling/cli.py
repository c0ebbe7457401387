"""The ``whipcast`` command: ``dev``, one role per process, and the embedded broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web
from whipcast.gateway import broker
from whipcast.gateway.settings import Settings
from whipcast.loadtest import cli as loadtest_cli

from . import logs
from .app import ROLES, make_app

logger = logging.getLogger("whipcast")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="HTTP and media bind address")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port")
    parser.add_argument("--publish-token", help="require this bearer token to publish "
                        "(env WHIPCAST_PUBLISH_TOKEN)")  # fmt: skip
    parser.add_argument("--kafka-bootstrap", help="use this Kafka cluster, HOST:PORT[,...] "
                        "(env WHIPCAST_KAFKA_BOOTSTRAP)")  # fmt: skip
    parser.add_argument("--kafka-security-protocol",
                        choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])  # fmt: skip
    parser.add_argument("--kafka-sasl-mechanism", help="e.g. PLAIN, SCRAM-SHA-512")
    parser.add_argument("--kafka-sasl-username")
    parser.add_argument("--kafka-ssl-cafile")
    parser.add_argument("--kafka-fetch-wait-ms", type=int, help="longest wait of a frame "
                        "reader's fetch at the broker (default 500; lower only for brokers "
                        "that do not answer a waiting fetch when data arrives)")  # fmt: skip
    parser.add_argument("--kafka-audio-hold-ms", type=float, help="longest an ingest holds "
                        "audio to send it with the next video frame in one produce request "
                        "(default 40; 0: send audio at once)")  # fmt: skip
    parser.add_argument("--media-address", action="append", dest="media_addresses",
                        help="local address for ICE host candidates (repeatable)")  # fmt: skip
    parser.add_argument("--public-ip", help="address announced in ICE candidates (1:1 NAT)")
    parser.add_argument("--ice-server", action="append", dest="ice_servers",
                        help="STUN/TURN URL for clients' Link headers (repeatable)")  # fmt: skip
    parser.add_argument("--retention-minutes", type=float, help="how long frames stay in Kafka")
    parser.add_argument("--rewind-search-seconds", type=float, dest="rewind_search_s",
                        help="keyframe search span before a rewind target")  # fmt: skip
    parser.add_argument("--node-id", help="this node's name in the registry")
    parser.add_argument("--advertise-url", help="base URL clients are redirected to, "
                        "e.g. http://10.0.0.5:8081 (env WHIPCAST_ADVERTISE_URL)")  # fmt: skip
    parser.add_argument("--max-viewers", type=int, help="viewers this egress node takes")
    parser.add_argument("--max-publishers", type=int, help="publishers this ingest node takes")
    parser.add_argument("--max-cpu", type=float, dest="max_cpu_percent",
                        help="%% of one core above which a node gets no new sessions")  # fmt: skip
    parser.add_argument("--qa-secret", help="key that signs Q&A client cookies, the same on "
                        "every signaling node (env WHIPCAST_QA_SECRET, which keeps it out of "
                        "ps; default: one kept in Kafka)")  # fmt: skip
    parser.add_argument("--qa-trust-forwarded-for", action="store_true", default=None,
                        help="limit Q&A by X-Forwarded-For's last entry (only behind a proxy "
                        "that sets it)")  # fmt: skip
    parser.add_argument("--viewer-max-bitrate", type=int,
                        help="bits/s one viewer may be sent (default 50000000)")  # fmt: skip
    parser.add_argument("--retransmit-budget", type=float, help="NACK resends may add at "
                        "most this fraction to a viewer's bytes (default 0.25)")  # fmt: skip
    parser.add_argument("--viewer-adapt", dest="viewer_adapt", action="store_true",
                        default=None, help="experimental: send each viewer what its "
                        "bandwidth estimate says its link carries (off by default)")  # fmt: skip
    parser.add_argument("--viewer-min-bitrate", type=int, help="floor of a viewer's "
                        "bandwidth estimate, bits/s (default 100000)")  # fmt: skip
    parser.add_argument("--viewer-max-queue-delay", type=float, help="seconds a viewer may "
                        "fall behind before its video pauses to the next keyframe "
                        "(default 0.5)")  # fmt: skip
    parser.add_argument("--no-viewer-layers", dest="viewer_layers", action="store_false",
                        default=None, help="give every viewer of a simulcast stream its top "
                        "layer, whatever its link carries (default: the best layer its "
                        "bandwidth estimate carries)")  # fmt: skip
    parser.add_argument("--thumbnail-interval", type=float,
                        help="seconds between pictures of a stream (thumbnails role)")  # fmt: skip
    parser.add_argument("--no-native-fanout", action="store_true", default=None,
                        help="send to viewers with the pure-Python path, not the native "
                        "core (env WHIPCAST_NO_NATIVE=1)")  # fmt: skip
    parser.add_argument("--hls-part-target", type=float,
                        help="seconds per LL-HLS part (hls role; default 0.5)")  # fmt: skip
    parser.add_argument("--hls-window", type=float, dest="hls_window_s",
                        help="seconds of DVR window in HLS playlists (default 60)")  # fmt: skip
    parser.add_argument("--hls-always-package", action="store_true", default=None,
                        help="package every live H.264 stream as HLS from its start, even "
                        "unwatched (default: from a player's first request)")  # fmt: skip
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["human", "json"], default="human",
                        help="human-readable lines or JSON lines")  # fmt: skip


def _recording(parser: argparse.ArgumentParser, flag: str, required: bool) -> None:
    parser.add_argument(
        flag,
        type=Path,
        dest="record_dir",
        required=required,
        help="write every stream session to files here (record role)",
    )
    parser.add_argument(
        "--streams",
        dest="record_streams",
        help="record only stream names matching this glob (default: all)",
    )
    parser.add_argument("--record-max-bytes", type=int, help="roll a file past this size")
    parser.add_argument("--record-max-seconds", type=float,
                        help="roll a file past this duration")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    # The docstring is reST; --help is plain text.
    parser = argparse.ArgumentParser(prog="whipcast", description=__doc__.replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser("dev", help="embedded Kafka + every role in one process")
    _common(dev)
    _recording(dev, "--record-dir", required=False)
    for role in ROLES:
        command = commands.add_parser(role, help=f"run the {role} role against a Kafka cluster")
        _common(command)
        if role == "record":
            _recording(command, "--dir", required=True)
    kafka = commands.add_parser("kafka", help="the embedded Apache Kafka broker")
    kafka_commands = kafka.add_subparsers(dest="kafka_command", required=True)
    kafka_commands.add_parser("fetch", help="resolve and cache the broker's jars (Maven)")
    start = kafka_commands.add_parser("start", help="run the broker alone until Ctrl-C")
    start.add_argument("--data-dir", type=Path, help="keep the broker's data here")
    start.add_argument("--brokers", type=int, default=1, choices=range(1, 10), metavar="N",
                       help="run a KRaft cluster of N brokers (1-9), e.g. 3 to try "
                       "broker failures as production sees them")  # fmt: skip
    loadtest_cli.add_parser(commands)
    _tools(commands)
    return parser


def _tools(commands) -> None:
    """``tap`` and ``push``: a stream out to, and in from, standard tools (FFmpeg)."""
    tap = commands.add_parser("tap", help="write a live stream to stdout (MPEG-TS, "
                              "fragmented MP4 or WebM) for ffplay/ffmpeg")  # fmt: skip
    tap.add_argument("stream")
    tap.add_argument("--start", metavar="-S", help="start S seconds before the live edge "
                     "(e.g. --start=-30), on the keyframe at or before it")  # fmt: skip
    tap.add_argument("--format", choices=["mpegts", "mp4", "webm"],
                     help="container (default: mpegts for H.264, webm for VP8, which "
                     "MPEG-TS cannot carry)")  # fmt: skip
    push = commands.add_parser("push", help="publish an MPEG-TS (or any FFmpeg-readable) "
                               "input as a live stream")  # fmt: skip
    push.add_argument("stream")
    push.add_argument("--input", default="-", help="file to read, or - for stdin (default)")
    push.add_argument("--token", dest="push_token", help="the publish token, when one is "
                      "configured (env WHIPCAST_TOKEN)")  # fmt: skip
    push.add_argument("--publish-token", help="the deployment's publish token (env "
                      "WHIPCAST_PUBLISH_TOKEN); --token must then match it")  # fmt: skip
    for parser in (tap, push):
        parser.add_argument("--kafka-bootstrap", help="the Kafka cluster, HOST:PORT[,...] "
                            "(env WHIPCAST_KAFKA_BOOTSTRAP; default: the broker of a "
                            "whipcast dev running on this machine)")  # fmt: skip
        parser.add_argument("--log-level", default="WARNING")


async def _run_tool(args: argparse.Namespace, settings: Settings) -> None:
    """Run tap or push until it ends or SIGINT/SIGTERM; say why it stopped on stderr."""
    from whipcast.gateway import errors, mux, push, tap

    if settings.kafka_bootstrap is None:
        found = broker.announced_bootstrap(settings)
        if found is None:
            raise SystemExit(f"whipcast {args.command}: no --kafka-bootstrap given and no "
                             "whipcast dev running on this machine")  # fmt: skip
        settings = settings.with_(kafka_bootstrap=found)
    if args.command == "tap":
        job = tap.Tap(settings, args.stream, sys.stdout.buffer, args.format, args.start)
    else:
        # FFmpeg's own pipe: protocol hands on what the pipe has; a Python file object
        # would block each read until its whole buffer filled (seconds at low bitrates).
        source = "pipe:0" if args.input == "-" else args.input
        job = push.Push(settings, args.stream, source, settings.push_token)
    task = asyncio.ensure_future(job.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        stats = await task
    except asyncio.CancelledError:
        stats = job.stats
        stats_reason = "interrupted"
    except (errors.SessionError, mux.MuxError, push.PushError) as exc:
        raise SystemExit(f"whipcast {args.command}: {exc}") from None
    else:
        stats_reason = getattr(stats, "reason", "") or "the input ended"
    print(f"whipcast {args.command}: {stats_reason}; {stats}", file=sys.stderr)


def settings_from(args: argparse.Namespace) -> Settings:
    retention = getattr(args, "retention_minutes", None)
    return Settings.from_env(
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        publish_token=getattr(args, "publish_token", None),
        kafka_bootstrap=getattr(args, "kafka_bootstrap", None),
        kafka_security_protocol=getattr(args, "kafka_security_protocol", None),
        kafka_sasl_mechanism=getattr(args, "kafka_sasl_mechanism", None),
        kafka_sasl_username=getattr(args, "kafka_sasl_username", None),
        kafka_ssl_cafile=getattr(args, "kafka_ssl_cafile", None),
        kafka_fetch_wait_ms=getattr(args, "kafka_fetch_wait_ms", None),
        kafka_audio_hold_ms=getattr(args, "kafka_audio_hold_ms", None),
        media_addresses=tuple(args.media_addresses) if getattr(args, "media_addresses", None)
        else None,
        public_ip=getattr(args, "public_ip", None),
        ice_servers=tuple(args.ice_servers) if getattr(args, "ice_servers", None) else None,
        stream_retention_ms=int(retention * 60_000) if retention else None,
        rewind_search_s=getattr(args, "rewind_search_s", None),
        node_id=getattr(args, "node_id", None),
        advertise_url=getattr(args, "advertise_url", None),
        max_viewers=getattr(args, "max_viewers", None),
        max_publishers=getattr(args, "max_publishers", None),
        max_cpu_percent=getattr(args, "max_cpu_percent", None),
        qa_secret=getattr(args, "qa_secret", None),
        qa_trust_forwarded_for=getattr(args, "qa_trust_forwarded_for", None),
        viewer_max_bitrate=getattr(args, "viewer_max_bitrate", None),
        retransmit_budget=getattr(args, "retransmit_budget", None),
        viewer_adapt=getattr(args, "viewer_adapt", None),
        viewer_min_bitrate=getattr(args, "viewer_min_bitrate", None),
        viewer_max_queue_delay=getattr(args, "viewer_max_queue_delay", None),
        viewer_layers=getattr(args, "viewer_layers", None),
        thumbnail_interval=getattr(args, "thumbnail_interval", None),
        no_native_fanout=getattr(args, "no_native_fanout", None),
        push_token=getattr(args, "push_token", None),
        record_dir=getattr(args, "record_dir", None),
        record_streams=getattr(args, "record_streams", None),
        record_max_bytes=getattr(args, "record_max_bytes", None),
        record_max_seconds=getattr(args, "record_max_seconds", None),
        hls_part_target=getattr(args, "hls_part_target", None),
        hls_window_s=getattr(args, "hls_window_s", None),
        hls_always_package=getattr(args, "hls_always_package", None),
        log_level=getattr(args, "log_level", None),
    )  # fmt: skip


async def serve(settings: Settings, roles: tuple[str, ...]) -> None:
    """Run a node until SIGINT/SIGTERM, with an embedded broker when none is given."""
    async with contextlib.AsyncExitStack() as stack:
        if settings.kafka_bootstrap is None and roles != ROLES:
            found = broker.announced_bootstrap(settings)
            if found is None:
                raise SystemExit("--kafka-bootstrap is required for a single role (or a "
                                 "whipcast dev running on this machine)")  # fmt: skip
            settings = settings.with_(kafka_bootstrap=found)
        if settings.kafka_bootstrap is None:
            kafka = await stack.enter_async_context(broker.EmbeddedKafka(settings))
            stack.enter_context(broker.announced(settings, kafka.bootstrap))
            settings = settings.with_(kafka_bootstrap=kafka.bootstrap)
            logger.info("embedded Kafka at %s", kafka.bootstrap)
        runner = web.AppRunner(make_app(settings, roles), access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        logger.info("whipcast %s listening on http://%s:%d", ",".join(roles), settings.host,
                    settings.port)  # fmt: skip
        await _until_signalled()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    logs.configure(settings.log_level, getattr(args, "log_format", "human"), settings.node_id)
    if args.command == "loadtest":
        loadtest_cli.run(args)
        return
    try:
        if args.command in ("tap", "push"):
            _run(_run_tool(args, settings))
            return
        if args.command == "kafka":
            if args.kafka_command == "fetch":
                print(broker.fetch(settings))
            else:
                broker.run_broker_forever(settings, data_dir=args.data_dir, brokers=args.brokers)
            return
        roles = ROLES if args.command == "dev" else (args.command,)
        _run(serve(settings, roles))
    except broker.BrokerUnavailable as exc:
        sys.exit(f"whipcast: {exc}")


if __name__ == "__main__":
    main()
