"""The publisher process: one stamped source, encoded once, published to every stream.

Each stream gets its own WHIP session (a real aiortc peer: ICE consent, DTLS, SRTP,
NACK answers, RTCP) fed the same encoded frames, so S streams cost one encoder. A
keyframe request (PLI/FIR) on any stream makes the next frame of all of them a keyframe:
aiortc would honour it only for frames it encodes itself, so the request is routed to
:class:`StampedSource`. The process reports its own frame counts and how often the
encoder fell behind the frame clock, which is how a saturated generator shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.connection
import time
from typing import Any

import aiohttp
import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from yarl import URL

from .procs import die_with_parent, run_event_loop
from .source import MIME, StampedSource, VideoFormat

CONNECT_TIMEOUT = 20.0
QUEUE_FRAMES = 30


class EncodedTrack(MediaStreamTrack):
    """A video track whose ``recv`` hands out already encoded ``av.Packet``s."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[av.Packet] = asyncio.Queue(QUEUE_FRAMES)
        self.dropped = 0

    def offer(self, packet: av.Packet) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(packet)

    async def recv(self) -> av.Packet:  # type: ignore[override]
        return await self.queue.get()


class Publisher:
    def __init__(self, fmt: VideoFormat, token: str | None) -> None:
        self.source = StampedSource(fmt)
        self.fps = fmt.fps
        self.mime = MIME[fmt.codec]
        self.headers = {"Content-Type": "application/sdp"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.tracks: list[EncodedTrack] = []
        self.sessions: list[tuple[RTCPeerConnection, str]] = []
        self.late_frames = 0
        """Frames made more than one frame period behind the clock."""

    async def publish(self, http: aiohttp.ClientSession, url: str) -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        track = EncodedTrack()
        transceiver = pc.addTransceiver(track, direction="sendonly")
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences(
            [c for c in codecs if c.mimeType == self.mime]
            + [c for c in codecs if c.mimeType == "video/rtx"][:1]
        )
        transceiver.sender._send_keyframe = self.source.request_keyframe  # type: ignore[method-assign]
        connected = asyncio.Event()

        @pc.on("connectionstatechange")
        def _changed() -> None:
            if pc.connectionState == "connected":
                connected.set()

        try:
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(url, data=pc.localDescription.sdp, headers=self.headers) as r:
                answer = await r.text()
                if r.status != 201:
                    raise RuntimeError(f"WHIP POST {url} answered {r.status}: {answer[:200]}")
                self.sessions.append((pc, str(URL(url).join(URL(r.headers["Location"])))))
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            self.tracks.append(track)
            await asyncio.wait_for(connected.wait(), CONNECT_TIMEOUT)
        except BaseException:
            await pc.close()
            raise

    async def run(self) -> None:
        """Make a frame every 1/fps seconds, on the wall clock, for every stream."""
        start = time.monotonic()
        while True:
            i = self.source.frames
            delay = start + i / self.fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > 1 / self.fps:
                self.late_frames += 1
            packet = await asyncio.to_thread(self.source.next_packet)
            for track in self.tracks:
                track.offer(packet)

    def check_connected(self) -> None:
        """Raise once a session is lost, so the run stops with the reason instead of
        measuring a stream that no longer exists."""
        for pc, location in self.sessions:
            if pc.connectionState in ("failed", "closed"):
                raise RuntimeError(f"the WHIP session {location} is {pc.connectionState}")

    def stats(self) -> dict[str, Any]:
        return {
            "frames": self.source.frames,
            "keyframes": self.source.keyframes,
            "late_frames": self.late_frames,
            "dropped": sum(t.dropped for t in self.tracks),
            "encode_ms_mean": 1000 * self.source.encode_seconds / max(1, self.source.frames),
        }

    async def close(self, http: aiohttp.ClientSession) -> None:
        for pc, location in self.sessions:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.delete(location) as response:
                    await response.read()
            await pc.close()


async def _serve(conn: multiprocessing.connection.Connection, urls: list[str],
                 fmt: VideoFormat, token: str | None, lifetime_s: float,
                 loopback: bool) -> None:  # fmt: skip
    if loopback:
        from whipcast.gateway.peer import use_host_addresses

        use_host_addresses(("127.0.0.1",))
    publisher = Publisher(fmt, token)
    frames: asyncio.Task | None = None
    deadline = time.monotonic() + lifetime_s
    timeout = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            frames = asyncio.create_task(publisher.run())
            await asyncio.gather(*(publisher.publish(http, url) for url in urls))
            conn.send(("live", publisher.stats()))
            while time.monotonic() < deadline and not frames.done():
                publisher.check_connected()
                if not await asyncio.to_thread(conn.poll, 0.5):
                    continue
                if conn.recv()[0] == "stop":
                    break
                conn.send(("stats", publisher.stats()))
            if frames.done():
                frames.result()
        except EOFError:
            pass  # the controller is gone
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        finally:
            if frames is not None:
                frames.cancel()
            await publisher.close(http)
    with contextlib.suppress(OSError):
        conn.send(("stopped", publisher.stats()))


def publisher_main(conn: multiprocessing.connection.Connection, urls: list[str],
                   fmt: VideoFormat, token: str | None, lifetime_s: float,
                   loopback: bool) -> None:  # fmt: skip
    """Process entry point (spawned by :class:`whipcast.loadtest.procs.Children`)."""
    die_with_parent()
    run_event_loop(_serve(conn, urls, fmt, token, lifetime_s, loopback))
