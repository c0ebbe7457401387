"""Recording files on disk: their names, the small JSON note beside a finished one, and
the listing ``GET /api/recordings`` serves.

Layout: ``{dir}/{stream}/{stream}_{session}_{UTC start}_{part}.{mp4|webm}``, one file set
per publish session; a session gets a new part when a file is rolled (size or
duration), when the stream stalls, or when another recorder takes the stream over.
The UTC start is the arrival time of the part's first keyframe. A part that was closed
cleanly has ``{name}.json`` beside it (end, duration, frames); a part without one is
being written, or its recorder crashed (it still plays up to its last fragment). The
directory is the index: recorders on several machines sharing it need no other
coordination.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from .bus import STREAM_NAME

FILE_NAME = re.compile(
    r"^(?P<stream>[A-Za-z0-9_-]{1,64})_(?P<session>[0-9a-f]{8})_"
    r"(?P<start>\d{8}T\d{6}\d{3}Z)_(?P<part>\d{3,})\.(?P<ext>mp4|webm)$"
)
CONTENT_TYPES = {"mp4": "video/mp4", "webm": "video/webm"}
_TIME_FORMAT = "%Y%m%dT%H%M%S"


def part_name(stream: str, session: int, start_us: int, part: int, ext: str) -> str:
    start = datetime.fromtimestamp(start_us / 1e6, UTC)
    stamp = f"{start.strftime(_TIME_FORMAT)}{start.microsecond // 1000:03d}Z"
    return f"{stream}_{session:08x}_{stamp}_{part:03d}.{ext}"


def _start_time(stamp: str) -> float:
    start = datetime.strptime(stamp[:15], _TIME_FORMAT).replace(tzinfo=UTC)
    return start.timestamp() + int(stamp[15:18]) / 1000


def next_part(folder: Path, stream: str, session: int) -> int:
    """One more than the highest part of this session already in ``folder`` (a recorder
    taking a stream over continues the set its predecessor began)."""
    prefix = f"{stream}_{session:08x}_"
    parts = [
        int(match["part"])
        for name in _names(folder)
        if name.startswith(prefix) and (match := FILE_NAME.match(name))
    ]
    return max(parts, default=0) + 1


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


@dataclass(frozen=True, slots=True)
class PartNote:
    """Written beside a part when it is closed cleanly."""

    end: float
    duration: float
    frames: int

    def write(self, media: Path) -> None:
        note = media.with_name(media.name + ".json")
        note.write_text(json.dumps(asdict(self)))


@dataclass(frozen=True, slots=True)
class Recording:
    stream: str
    session: str
    part: int
    start: float
    """Unix time of the part's first keyframe."""
    size: int
    file: str
    content_type: str
    end: float | None
    duration: float | None
    """Known once the part is finished; ``None`` while it is written (or if its
    recorder crashed)."""
    complete: bool

    def to_json(self, base: str) -> dict:
        data = asdict(self)
        data["url"] = f"{base}/api/recordings/{self.stream}/{self.file}"
        return data


def list_recordings(root: Path, stream: str | None = None) -> list[Recording]:
    """Every part under ``root`` (of one stream if given), newest first."""
    streams = [stream] if stream else [n for n in _names(root) if STREAM_NAME.match(n)]
    found = []
    for name in streams:
        folder = root / name
        for file in _names(folder):
            match = FILE_NAME.match(file)
            if match is None or match["stream"] != name:
                continue
            try:
                size = (folder / file).stat().st_size
            except OSError:
                continue
            end = duration = None
            try:
                note = json.loads((folder / f"{file}.json").read_text())
                end, duration = float(note["end"]), float(note["duration"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
            found.append(
                Recording(
                    stream=name,
                    session=match["session"],
                    part=int(match["part"]),
                    start=_start_time(match["start"]),
                    size=size,
                    file=file,
                    content_type=CONTENT_TYPES[match["ext"]],
                    end=end,
                    duration=duration,
                    complete=end is not None,
                )
            )
    return sorted(found, key=lambda r: (r.start, r.part), reverse=True)


def recording_path(root: Path, stream: str, file: str) -> Path | None:
    """The file behind a recording URL, or ``None``: only names the recorder writes,
    inside ``root`` (no other path can be asked for)."""
    match = FILE_NAME.match(file)
    if not STREAM_NAME.match(stream) or match is None or match["stream"] != stream:
        return None
    path = root / stream / file
    return path if path.is_file() else None
