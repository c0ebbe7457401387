"""What WHIP and WHEP sessions share: offer checks, ICE set-up, the answer, lifecycle.

Errors in a client's offer raise :class:`SessionError` subclasses carrying the HTTP
status the signaling layer answers with, and a message meant for the client.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.sdp import SessionDescription, candidate_from_sdp

from . import aiortc_compat
from .errors import SessionError, UnprocessableOffer
from .settings import Settings

aiortc_compat.drop_empty_datagrams()

logger = logging.getLogger(__name__)


class UnsupportedPatch(SessionError):
    status = 422


def use_host_addresses(addresses: tuple[str, ...]) -> None:
    """Gather ICE host candidates on these addresses only (empty: aioice's default).

    aioice always leaves loopback out, so a gateway bound to 127.0.0.1 would offer no
    usable candidate. The choice is per process (one media interface per node), and
    aioice reads it from a module-level function, which is replaced.
    """
    if addresses:
        aiortc_compat.use_host_addresses(addresses)


def parse_offer(sdp: str, direction: str) -> SessionDescription:
    """Validate a client's offer: one audio and/or one video section that ``direction``
    (the client's side: ``sendonly`` for WHIP, ``recvonly`` for WHEP) allows."""
    try:
        offer = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc raises assorted errors on garbage input
        raise SessionError(
            f"the body is not a valid SDP offer ({exc.__class__.__name__})"
        ) from None
    media = [m for m in offer.media if m.kind in ("audio", "video")]
    if not media:
        raise SessionError("the offer has no audio or video section")
    if len(media) != len(offer.media):
        raise UnprocessableOffer("only audio and video sections are supported")
    for kind in ("audio", "video"):
        if sum(m.kind == kind for m in media) > 1:
            raise UnprocessableOffer(f"at most one {kind} track per session is supported")
    allowed = {"sendonly": ("sendonly", "sendrecv"), "recvonly": ("recvonly", "sendrecv")}
    for m in media:
        if m.direction not in allowed[direction]:
            raise UnprocessableOffer(
                f"the {m.kind} section is {m.direction}; a {direction} offer is needed"
            )
        if not m.ice.usernameFragment or not m.dtls or not m.dtls.fingerprints:
            raise SessionError(f"the {m.kind} section lacks ICE credentials or a DTLS fingerprint")
    return offer


async def answer_offer(pc: RTCPeerConnection, settings: Settings) -> str:
    """Create the answer with every server candidate gathered (no server trickle)."""
    await pc.setLocalDescription(await pc.createAnswer())
    sdp = pc.localDescription.sdp
    if settings.public_ip:
        sdp = _announce(sdp, settings.public_ip)
    return sdp


def _announce(sdp: str, public_ip: str) -> str:
    """Write the public address into host candidates (a 1:1 NAT in front of the node)."""
    lines = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:") and " typ host" in line:
            parts = line.split(" ")
            parts[4] = public_ip
            line = " ".join(parts)
        elif line.startswith("c=IN IP4 "):
            line = f"c=IN IP4 {public_ip}"
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


class PeerSession:
    """A WHIP or WHEP session resource: one peer connection and the tasks it owns."""

    def __init__(self, settings: Settings, stream: str, kind: str) -> None:
        self.settings = settings
        self.stream = stream
        self.kind = kind
        self.resource_id = secrets.token_urlsafe(24)
        self.etag = f'"{secrets.token_urlsafe(12)}"'
        self.pc: RTCPeerConnection | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def log(self, level: int, message: str, *args: object) -> None:
        """Log a media event with the stream and resource it concerns."""
        logger.log(
            level, message, *args, extra={"stream": self.stream, "resource": self.resource_id}
        )

    def create_peer_connection(self) -> RTCPeerConnection:
        # An explicit empty list: aiortc otherwise asks a public STUN server, which
        # stalls gathering for seconds on a machine without Internet access.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list[RTCIceServer]()))
        pc.on("connectionstatechange", lambda: self.on_connection_state(pc.connectionState))
        pc.on("connectionstatechange", lambda: self._receive_directly(pc))
        return pc

    @staticmethod
    def _receive_directly(pc: RTCPeerConnection) -> None:
        """Once DTLS is up, media datagrams skip aiortc's queue and receive task.

        aiortc reports "connected" from inside the DTLS transport's own switch to
        connected, after SRTP is keyed and before its receive task starts, so the switch
        comes before it reads any SRTP; media that arrived earlier is still in aioice's
        queue, and ``aiortc_compat.DirectReceive`` lets aiortc deliver that first.
        """
        if pc.connectionState == "connected":
            for transceiver in pc.getTransceivers():
                aiortc_compat.receive_directly(transceiver.receiver.transport)

    def on_connection_state(self, state: str) -> None:
        if state in ("failed", "closed"):
            self.spawn(self.close())

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run a task owned by this session: cancelled when it closes."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "%s session task failed",
                self.kind,
                exc_info=task.exception(),
                extra={"stream": self.stream, "resource": self.resource_id},
            )

    async def add_candidates(self, fragment: str) -> None:
        """Apply a trickle-ICE SDP fragment (RFC 8840) from the client."""
        assert self.pc is not None
        ufrag = None
        candidates = []
        for line in fragment.splitlines():
            line = line.strip()
            if line.startswith("a=ice-ufrag:"):
                ufrag = line.split(":", 1)[1]
            elif line.startswith("a=candidate:"):
                try:
                    candidates.append(candidate_from_sdp(line[2:].split(":", 1)[1]))
                except (ValueError, IndexError):
                    continue  # unusable candidates are ignored, as RFC 9725 allows
        remote = self.pc.remoteDescription
        current = SessionDescription.parse(remote.sdp).media[0].ice.usernameFragment
        if ufrag is not None and ufrag != current:
            raise UnsupportedPatch("ICE restart is not supported; start a new session")
        for candidate in candidates:
            candidate.sdpMLineIndex = 0
            await self.pc.addIceCandidate(candidate)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self.pc is not None:
            await self.pc.close()
