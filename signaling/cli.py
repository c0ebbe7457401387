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
    parser.add_argument("--media-address", action="append", dest="media_addresses",
                        help="local address for ICE host candidates (repeatable)")  # fmt: skip
    parser.add_argument("--public-ip", help="address announced in ICE candidates (1:1 NAT)")
    parser.add_argument("--ice-server", action="append", dest="ice_servers",
                        help="STUN/TURN URL for clients' Link headers (repeatable)")  # fmt: skip
    parser.add_argument("--retention-minutes", type=float, help="how long frames stay in Kafka")
    parser.add_argument("--node-id", help="this node's name in the registry")
    parser.add_argument("--advertise-url", help="base URL clients are redirected to, "
                        "e.g. http://10.0.0.5:8081 (env WHIPCAST_ADVERTISE_URL)")  # fmt: skip
    parser.add_argument("--max-viewers", type=int, help="viewers this egress node takes")
    parser.add_argument("--max-publishers", type=int, help="publishers this ingest node takes")
    parser.add_argument("--max-cpu", type=float, dest="max_cpu_percent",
                        help="%% of one core above which a node gets no new sessions")  # fmt: skip
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["human", "json"], default="human",
                        help="human-readable lines or JSON lines")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whipcast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser("dev", help="embedded Kafka + every role in one process")
    _common(dev)
    for role in ROLES:
        _common(commands.add_parser(role, help=f"run the {role} role against a Kafka cluster"))
    kafka = commands.add_parser("kafka", help="the embedded Apache Kafka broker")
    kafka_commands = kafka.add_subparsers(dest="kafka_command", required=True)
    kafka_commands.add_parser("fetch", help="resolve and cache the broker's jars (Maven)")
    start = kafka_commands.add_parser("start", help="run the broker alone until Ctrl-C")
    start.add_argument("--data-dir", type=Path, help="keep the broker's data here")
    loadtest_cli.add_parser(commands)
    return parser


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
        media_addresses=tuple(args.media_addresses) if getattr(args, "media_addresses", None)
        else None,
        public_ip=getattr(args, "public_ip", None),
        ice_servers=tuple(args.ice_servers) if getattr(args, "ice_servers", None) else None,
        stream_retention_ms=int(retention * 60_000) if retention else None,
        node_id=getattr(args, "node_id", None),
        advertise_url=getattr(args, "advertise_url", None),
        max_viewers=getattr(args, "max_viewers", None),
        max_publishers=getattr(args, "max_publishers", None),
        max_cpu_percent=getattr(args, "max_cpu_percent", None),
        log_level=getattr(args, "log_level", None),
    )  # fmt: skip


async def serve(settings: Settings, roles: tuple[str, ...]) -> None:
    """Run a node until SIGINT/SIGTERM, with an embedded broker when none is given."""
    async with contextlib.AsyncExitStack() as stack:
        if settings.kafka_bootstrap is None:
            if roles != ROLES:
                raise SystemExit("--kafka-bootstrap is required for a single role")
            kafka = await stack.enter_async_context(broker.EmbeddedKafka(settings))
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
        if args.command == "kafka":
            if args.kafka_command == "fetch":
                print(broker.fetch(settings))
            else:
                broker.run_broker_forever(settings, data_dir=args.data_dir)
            return
        roles = ROLES if args.command == "dev" else (args.command,)
        _run(serve(settings, roles))
    except broker.BrokerUnavailable as exc:
        sys.exit(f"whipcast: {exc}")


if __name__ == "__main__":
    main()
