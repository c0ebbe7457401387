"""``whipcast loadtest``: drive a whipcast deployment with headless WebRTC peers.

whipcast loadtest --viewers 25 --duration 20 --json out.json --chart out.png
whipcast loadtest --sweep viewers=1,10,25,50,100 --server split --chart sweep.png
whipcast loadtest --url http://127.0.0.1:8080 --streams 2 --viewers 10 --codec vp8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yarl import URL

# Only the standard library and yarl here: the ``whipcast`` parser imports this module
# for every command, so the others do not pay for the load test's imports (and
# matplotlib, for --chart, is the optional ``loadtest`` extra).
CODECS = ("h264", "vp8")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``loadtest`` subcommand to the ``whipcast`` parser."""
    p = commands.add_parser("loadtest", help="load test with headless WHIP/WHEP peers",
                            description=__doc__.replace("``", ""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--url", help="whipcast base URL to test (default: start a private "
                   "`whipcast dev` on a free loopback port)")  # fmt: skip
    p.add_argument("--server", choices=["dev", "split"], default="dev",
                   help="private target: one dev node, or broker + ingest + egress "
                   "processes so each role's CPU is reported apart")  # fmt: skip
    p.add_argument("--streams", type=int, default=1, help="publishers, one stream each")
    p.add_argument("--viewers", type=int, default=3, help="viewers per stream")
    p.add_argument("--probes", type=int, default=1,
                   help="of the viewers per stream, how many decode and read the "
                   "capture-time stamp (glass-to-glass)")  # fmt: skip
    p.add_argument("--duration", type=float, default=20, help="seconds measured per run")
    p.add_argument("--ramp", type=float, default=10, help="viewers joining per second")
    p.add_argument("--codec", choices=CODECS, default="h264")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--bitrate", type=int, default=1500, help="video kbps")
    p.add_argument("--workers", type=int, default=0,
                   help="viewer processes (default: 1 up to 10 viewers, else one per "
                   "core, 2 to 4)")  # fmt: skip
    p.add_argument("--server-cpus", metavar="LIST", type=_cpus,
                   help="CPUs for the private target (node or roles and the broker), as "
                   "taskset -c takes them: 0-3,8")  # fmt: skip
    p.add_argument("--load-cpus", metavar="LIST", type=_cpus,
                   help="CPUs for the publisher and viewer workers (apart from the "
                   "server's on a machine with many cores)")  # fmt: skip
    p.add_argument("--sweep", metavar="viewers=N,N,...", type=_sweep,
                   help="one run per viewer count (per stream); reports where p95 "
                   "glass-to-glass passes 400 ms or frame loss 1 %%")  # fmt: skip
    p.add_argument("--publish-token", help="bearer token for WHIP (also given to a "
                   "private server)")  # fmt: skip
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --url that is not on loopback")  # fmt: skip
    p.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    p.add_argument("--chart", type=Path, metavar="FILE.png", help="draw the report")
    p.add_argument("--compare", type=Path, nargs="+", metavar="REPORT.json",
                   help="run nothing: print and chart saved reports together (runs of "
                   "the same codec and size join into one line)")  # fmt: skip


def _cpus(text: str) -> frozenset[int]:
    from .procs import parse_cpus

    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sweep(text: str) -> list[int]:
    name, _, values = text.partition("=")
    if name != "viewers" or not values:
        raise argparse.ArgumentTypeError("expected viewers=N,N,...")
    try:
        counts = [int(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("viewer counts must be integers") from None
    if any(c < 1 for c in counts) or counts != sorted(counts):
        raise argparse.ArgumentTypeError("viewer counts must be positive and increasing")
    return counts


def _check(args: argparse.Namespace) -> None:
    from .procs import unavailable_cpus

    for flag, cpus in (("--server-cpus", args.server_cpus), ("--load-cpus", args.load_cpus)):
        if (why := unavailable_cpus(cpus)) is not None:
            sys.exit(f"whipcast loadtest: {flag}: {why}")
    if args.url and URL(args.url).host not in LOOPBACK_HOSTS and not args.allow_remote:
        sys.exit("whipcast loadtest: --url is not on loopback; add --allow-remote to load "
                 "a host you run")  # fmt: skip
    counts = args.sweep or [args.viewers]
    if args.probes < 0 or args.probes > counts[0]:
        sys.exit("whipcast loadtest: --probes must be between 0 and the viewers per stream")
    if min(args.streams, args.duration, args.ramp, args.fps, args.bitrate) <= 0:
        sys.exit("whipcast loadtest: --streams, --duration, --ramp, --fps and --bitrate "
                 "must be positive")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Run the load test the parsed ``args`` describe (or compare saved reports); print
    and write the report."""
    from . import report

    chart = _chart_module() if args.chart else None
    if args.compare:
        reports = report.merge([report.read_json(path) for path in args.compare])
        print("\n\n".join(report.table(r) for r in reports))
    else:
        reports = [_load_test(args)]
    if chart is not None:
        chart.draw(reports, args.chart)
        print(f"wrote {args.chart}")


def _chart_module():
    """The chart module, checked before a run rather than after it: matplotlib is the
    ``loadtest`` extra, needed only for ``--chart``."""
    try:
        from . import chart
    except ImportError as exc:
        sys.exit(f"whipcast loadtest: --chart needs {exc.name}: pip install 'whipcast[loadtest]'")
    return chart


def _load_test(args: argparse.Namespace) -> dict:
    from . import report
    from .procs import run_event_loop
    from .runner import LoadConfig, execute
    from .source import VideoFormat

    _check(args)

    fmt = VideoFormat(args.codec, args.width, args.height, args.fps, args.bitrate)
    config = LoadConfig(
        fmt=fmt, streams=args.streams, viewers=args.viewers, probes=args.probes,
        duration=args.duration, ramp=args.ramp, workers=args.workers, url=args.url,
        server=args.server, publish_token=args.publish_token,
        server_cpus=args.server_cpus, load_cpus=args.load_cpus,
    )  # fmt: skip
    progress = report.ProgressLine()
    result: dict = {}

    async def main() -> None:
        result.update(await execute(config, args.sweep, progress))

    try:
        run_event_loop(main())
    except KeyboardInterrupt:
        progress.end()
        sys.exit("interrupted: every process this run started has been stopped")
    except (RuntimeError, TimeoutError) as exc:
        progress.end()
        sys.exit(f"whipcast loadtest: {exc}")
    progress.end()
    result["command"] = " ".join(["whipcast", *sys.argv[1:]])
    print(report.table(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if any(r["generator"]["saturated"] for r in report.runs_of(result)):
        print("warning: the load generator was saturated; numbers show its limit too",
              file=sys.stderr)  # fmt: skip
    return result
