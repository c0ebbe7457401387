"""MediaMTX as the reference server of ``bench/fixed_cost.py``: build it, configure it.

MediaMTX (github.com/bluenviron/mediamtx, Go, pion) is built from a checkout the user
points at (``--mediamtx-src`` or ``MEDIAMTX_SRC``) with the Go toolchain on ``PATH``; a
ready binary can be given instead (``--mediamtx-bin`` or ``MEDIAMTX_BIN``). No MediaMTX
source is kept in this repository. Without Go or a checkout the comparison is skipped
with a message, and the benchmark measures whipcast alone.

    python -m bench.mediamtx --src ~/src/mediamtx      # build only; prints the binary

Only its WebRTC server is on, on loopback, with every path open to 127.0.0.1:
WHIP ``POST /{stream}/whip``, WHEP ``POST /{stream}/whep``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_TIMEOUT = 1200.0


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "whipcast" / "mediamtx"


def _source_id(src: Path) -> str:
    """The checkout's commit when it is a git work tree, else a hash of go.sum."""
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        )  # fmt: skip
        return out.stdout.strip()[:12]
    except (OSError, subprocess.SubprocessError):
        return hashlib.sha256((src / "go.sum").read_bytes()).hexdigest()[:12]


def build(src: Path) -> Path:
    """``go build`` the checkout at ``src`` (once per commit) and return the binary.

    The two files ``go generate`` would normally download or write are stubbed: the
    HLS player script (unused here) and the VERSION string.
    """
    go = shutil.which("go")
    if go is None:
        raise FileNotFoundError("the Go toolchain (`go`) is not on PATH")
    if not (src / "go.mod").is_file() or not (src / "internal").is_dir():
        raise FileNotFoundError(f"{src} is not a MediaMTX checkout (no go.mod / internal/)")
    binary = _cache_dir() / f"mediamtx-{_source_id(src)}"
    if binary.is_file():
        return binary
    placeholder = src / "internal" / "servers" / "hls" / "hls.min.js"
    if not placeholder.exists():
        placeholder.write_text("// placeholder: the HLS server is off in this benchmark\n")
    version = src / "internal" / "core" / "VERSION"
    if not version.exists():
        version.write_text("v0.0.0-whipcast-bench\n")
    binary.parent.mkdir(parents=True, exist_ok=True)
    print(f"building MediaMTX from {src} (minutes, once per commit) ...", flush=True)
    result = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=src, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        binary.unlink(missing_ok=True)
        raise RuntimeError(f"go build failed:\n{(result.stdout + result.stderr)[-2000:]}")
    return binary


def locate(binary: str | None, src: str | None) -> tuple[Path | None, str]:
    """The MediaMTX binary to run, or ``None`` and why not (printed by the benchmark)."""
    binary = binary or os.environ.get("MEDIAMTX_BIN")
    if binary:
        path = Path(binary)
        return (path, "") if path.is_file() else (None, f"no MediaMTX binary at {path}")
    src = src or os.environ.get("MEDIAMTX_SRC")
    if not src:
        return None, (
            "MediaMTX skipped: give --mediamtx-src (a checkout of "
            "github.com/bluenviron/mediamtx; Go needed) or --mediamtx-bin"
        )
    try:
        return build(Path(src).expanduser().resolve()), ""
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"MediaMTX skipped: {exc}"


def write_config(directory: Path, http_port: int, udp_port: int) -> Path:
    """A config with only the WebRTC server on, on loopback, open to 127.0.0.1."""
    config = directory / "mediamtx.yml"
    config.write_text(
        f"""logLevel: warn
api: no
metrics: no
pprof: no
playback: no
rtsp: no
rtmp: no
hls: no
srt: no
moq: no
webrtc: yes
webrtcAddress: 127.0.0.1:{http_port}
webrtcLocalUDPAddress: 127.0.0.1:{udp_port}
webrtcLocalTCPAddress: ''
webrtcIPsFromInterfaces: no
webrtcAdditionalHosts: [127.0.0.1]
webrtcICEServers2: []
authMethod: internal
authInternalUsers:
  - user: any
    ips: ['127.0.0.1/32']
    permissions:
      - action: publish
      - action: read
paths:
  all_others:
"""
    )
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mediamtx",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", help="MediaMTX checkout (default: env MEDIAMTX_SRC)")
    args = parser.parse_args(argv)
    binary, why = locate(None, args.src)
    if binary is None:
        sys.exit(why)
    print(binary)


if __name__ == "__main__":
    main()
