"""Split py-spy raw (collapsed) stacks of a whipcast node by subsystem.

    python -m bench.profile_split PROFILE.txt [...]

Each sample goes to the first subsystem found walking its stack from the leaf up, so
library work lands where it is done (aiokafka's producer, aiortc's DTLS/SRTP ...) and
what is left is the event loop itself. Used for the breakdown in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

# (marker in a frame's file, subsystem), checked in this order from the leaf up.
SUBSYSTEMS = [
    ("aiokafka/producer", "Kafka producer"),
    ("aiokafka/consumer", "Kafka fetch (consumer)"),
    ("aiokafka/record", "Kafka record parsing"),
    ("aiokafka/protocol", "Kafka protocol encode/decode"),
    ("aiokafka/conn", "Kafka connection I/O"),
    ("aiokafka/client", "Kafka client (metadata)"),
    ("aiokafka", "Kafka other"),
    ("gateway/frames", "frame envelope"),
    ("gateway/aiortc_compat", "direct receive (aiortc_compat)"),
    ("rtcdtlstransport", "DTLS/SRTP (aiortc)"),
    ("pylibsrtp", "DTLS/SRTP (aiortc)"),
    ("gateway/receiver", "RTP receive (receiver.py)"),
    ("gateway/assembler", "frame assembly"),
    ("gateway/ingest", "ingest session"),
    ("rtcrtpreceiver", "RTP receive (aiortc)"),
    ("aiortc/rtp", "RTP parse (aiortc)"),
    ("aiortc", "aiortc other"),
    ("aioice", "ICE (aioice)"),
    ("gateway/rtpsend", "fan-out send"),
    ("gateway/egress", "fan-out"),
    ("gateway/nodes", "heartbeats/registry"),
    ("gateway/registry", "heartbeats/registry"),
    ("gateway/compacted", "heartbeats/registry"),
    ("gateway/control", "control"),
    ("gateway/bus", "bus"),
    ("aiohttp", "HTTP"),
    ("prometheus", "metrics"),
]


def split(path: str) -> tuple[Counter[str], int]:
    by: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            for frame in reversed(frames):
                hit = next((name for marker, name in SUBSYSTEMS if marker in frame), None)
                if hit:
                    by[hit] += n
                    break
            else:
                by["event loop / asyncio"] += n
    return by, total


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_split", description=__doc__)
    parser.add_argument("profiles", nargs="+", metavar="PROFILE.txt",
                        help="py-spy raw (collapsed) output")  # fmt: skip
    for path in parser.parse_args(argv).profiles:
        by, total = split(path)
        print(f"{path}: {total} samples")
        for name, n in by.most_common():
            print(f"  {100 * n / total:5.1f} %  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
