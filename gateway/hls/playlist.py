"""LL-HLS playlists (draft-pantos-hls-rfc8216bis): the multivariant playlist and a
session's media playlist, as text.

A media playlist is rendered *as of* one part: the playlist that existed right after
that part was written. A blocking request for a part therefore gets the same bytes from
every node and at any later time, which lets a CDN cache it under its query string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from .segmenter import Part, Segment


@dataclass(frozen=True, slots=True)
class Timing:
    part_target_s: float
    target_duration_s: int
    window_s: float
    """The DVR window: how much media the playlist keeps (at least the hold-back)."""

    @property
    def part_hold_back_s(self) -> float:
        return 3 * self.part_target_s

    @property
    def hold_back_s(self) -> float:
        return 3 * self.target_duration_s

    @property
    def skip_until_s(self) -> float:
        return 6 * self.target_duration_s

    @property
    def advance_part_limit(self) -> int:
        """Highest ``_HLS_part`` accepted: the parts one segment can have."""
        return math.ceil(self.target_duration_s / (0.9 * self.part_target_s)) + 1


def _date(us: int) -> str:
    moment = datetime.fromtimestamp(us / 1_000_000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def multivariant(media_uri: str, codecs: str, bandwidth: int, query: str = "") -> str:
    return (
        "#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n"
        f'#EXT-X-STREAM-INF:BANDWIDTH={bandwidth},CODECS="{codecs}"\n{media_uri}{query}\n'
    )


def media(
    segments: list[Segment],
    timing: Timing,
    upto: Part,
    *,
    ended: bool,
    skip: bool = False,
    discontinuities_before: int = 0,
    query: str = "",
) -> str:
    """The media playlist as it was when part ``upto`` was written (``ended``: and
    it was the session's last). ``discontinuities_before`` counts the discontinuities
    of segments already dropped from the window. ``query`` is appended to every URI
    (signed URLs)."""
    shown: list[tuple[Segment, list[Part], bool]] = []
    for segment in segments:
        if segment.msn > upto.msn:
            break
        parts = [p for p in segment.parts if p.index <= upto.index]
        complete = segment.complete and segment.parts[-1].index <= upto.index
        shown.append((segment, parts, complete))
    if not shown:
        raise ValueError("no segment holds the part")
    end = shown[-1][0].start + sum(p.duration for p in shown[-1][1])
    while len(shown) > 1 and end - shown[1][0].start >= timing.window_s:
        if shown[0][0].discontinuity:
            discontinuities_before += 1
        shown.pop(0)
    td = timing.target_duration_s
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:9",
        f"#EXT-X-TARGETDURATION:{td}",
        f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL={timing.skip_until_s:.1f},"
        f"PART-HOLD-BACK={timing.part_hold_back_s:.3f},HOLD-BACK={timing.hold_back_s:.1f}",
        f"#EXT-X-PART-INF:PART-TARGET={timing.part_target_s:.3f}",
        f"#EXT-X-MEDIA-SEQUENCE:{shown[0][0].msn}",
        f"#EXT-X-DISCONTINUITY-SEQUENCE:{discontinuities_before}",
    ]
    skipped = 0
    if skip:
        while (
            skipped < len(shown) - 1
            and shown[skipped][2]
            and end - shown[skipped + 1][0].start > timing.skip_until_s
        ):
            skipped += 1
        if skipped:
            lines.append(f"#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}")
    init = shown[skipped - 1][0].init if skipped else None
    for segment, parts, complete in shown[skipped:]:
        if segment.discontinuity:
            lines.append("#EXT-X-DISCONTINUITY")
        if segment.init != init:
            lines.append(f'#EXT-X-MAP:URI="init{segment.init}.mp4{query}"')
            init = segment.init
        lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date(segment.date_us)}")
        if end - segment.start <= 3 * td or not complete:
            for part in parts:
                independent = ",INDEPENDENT=YES" if part.independent else ""
                lines.append(
                    f'#EXT-X-PART:DURATION={part.duration:.5f},URI="part{part.index}.mp4{query}"'
                    + independent
                )
        if complete:
            lines.append(f"#EXTINF:{sum(p.duration for p in parts):.5f},")
            lines.append(f"seg{segment.msn}.mp4{query}")
    if ended and upto is shown[-1][1][-1] and shown[-1][2]:
        lines.append("#EXT-X-ENDLIST")
    else:
        lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part{upto.index + 1}.mp4{query}"')
    return "\n".join(lines) + "\n"
