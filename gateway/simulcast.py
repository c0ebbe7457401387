"""Simulcast in WHIP SDP: the offer's ``a=rid`` / ``a=simulcast`` lines and the answer's.

A simulcasting publisher (RFC 8853, RFC 8851) offers one video section with an
``a=rid:<id> send`` line per encoding, ``a=simulcast:send h;m;l`` and the RID and
repaired-RID header extensions; its packets carry no ``a=ssrc`` binding, only the RID
in a header extension until the first receiver report. aiortc's SDP parser drops the
rid and simulcast attributes, so this module reads them from the offer text and writes
the answer's ``a=rid:<id> recv`` / ``a=simulcast:recv`` lines itself; without them the
browser sends a single encoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters
from aiortc.sdp import MediaDescription

from .errors import SessionError
from .frames import MAX_VIDEO_LAYERS

RID_URI = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
REPAIRED_RID_URI = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"

# RFC 8851 rid-id: 1*(alpha-numeric / "-" / "_"); bounded here to keep logs and
# registry records small.
_RID_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


@dataclass(frozen=True, slots=True)
class Rid:
    """One offered encoding: its RID and the size limits the offer gives for it."""

    rid: str
    max_width: int | None = None
    max_height: int | None = None


@dataclass(frozen=True, slots=True)
class SimulcastOffer:
    """The layers a publisher offered, as accepted (at most :data:`MAX_VIDEO_LAYERS`)."""

    rids: tuple[Rid, ...]
    """In the offer's ``a=simulcast`` order (the publisher's preference)."""
    extensions: tuple[RTCRtpHeaderExtensionParameters, ...]
    """The RID and repaired-RID header extensions, with the offer's ids."""

    def best_first(self) -> list[str]:
        """The RIDs ordered best first: by the offer's size limits when every
        encoding has one, else in the offer's order (browsers list the full-size
        encoding first). Ingest corrects this order from the keyframes' sizes."""
        if all(r.max_width or r.max_height for r in self.rids):
            ranked = sorted(self.rids, key=lambda r: -(r.max_width or r.max_height or 0))
            return [r.rid for r in ranked]  # sorted() keeps the offer's order on ties
        return [r.rid for r in self.rids]


def _video_lines(sdp: str) -> list[str]:
    lines, inside = [], False
    for line in sdp.splitlines():
        if line.startswith("m="):
            inside = line.startswith("m=video")
        elif inside:
            lines.append(line.strip())
    return lines


def _restrictions(text: str) -> dict[str, int]:
    """``max-width=1280;max-height=720`` (other restrictions are ignored)."""
    found = {}
    for item in text.split(";"):
        key, _, value = item.partition("=")
        if key.strip() in ("max-width", "max-height") and value.strip().isdigit():
            found[key.strip()] = int(value)
    return found


def parse_offer(sdp: str, media: MediaDescription) -> SimulcastOffer | None:
    """The simulcast layers of a WHIP offer's video section ``media``; ``None`` when it
    does not simulcast (fewer than two send RIDs, or no RID header extension to tell
    the layers' packets apart). Raises :class:`SessionError` on a malformed rid list."""
    rid_lines: dict[str, Rid] = {}
    send: list[str] = []
    for line in _video_lines(sdp):
        if line.startswith("a=rid:"):
            parts = line[len("a=rid:") :].split(None, 2)
            if len(parts) < 2 or not _RID_ID.fullmatch(parts[0]):
                raise SessionError(f"malformed a=rid line in the video section: {line[:80]!r}")
            if parts[1] == "send":
                limits = _restrictions(parts[2]) if len(parts) > 2 else {}
                rid_lines[parts[0]] = Rid(
                    parts[0], limits.get("max-width"), limits.get("max-height")
                )
        elif line.startswith("a=simulcast:"):
            tokens = line[len("a=simulcast:") :].split()
            for direction, streams in zip(tokens[::2], tokens[1::2], strict=False):
                if direction != "send":
                    continue
                for alternatives in streams.split(";"):
                    # "h,x" lists alternatives (the first is taken); "~h" starts paused.
                    rid = alternatives.split(",")[0].lstrip("~")
                    if not _RID_ID.fullmatch(rid):
                        raise SessionError(f"malformed a=simulcast line: {line[:80]!r}")
                    send.append(rid)
    rids = [rid_lines[rid] for rid in dict.fromkeys(send) if rid in rid_lines]
    rids = rids[:MAX_VIDEO_LAYERS]
    extensions = tuple(
        e for e in media.rtp.headerExtensions if e.uri in (RID_URI, REPAIRED_RID_URI)
    )
    if len(rids) < 2 or not any(e.uri == RID_URI for e in extensions):
        return None
    return SimulcastOffer(tuple(rids), extensions)


def write_answer(sdp: str, offer: SimulcastOffer) -> str:
    """The answer with the accepted RIDs (``a=rid:<id> recv``, ``a=simulcast:recv``)
    added to its video section."""
    added = [f"a=rid:{r.rid} recv" for r in offer.rids]
    added.append("a=simulcast:recv " + ";".join(r.rid for r in offer.rids))
    out, inside = [], False
    for line in sdp.splitlines():
        if line.startswith("m="):
            if inside:
                out.extend(added)
            inside = line.startswith("m=video")
        out.append(line)
    if inside:
        out.extend(added)
    return "\r\n".join(out) + "\r\n"
