"""Recording: every publish session of every stream written to files, by a group of
recorder processes that share the streams and take over each other's.

A reader of the log beside egress, never on the live path. Recorders form one Kafka
consumer group (``{prefix}.recorders``) subscribed by pattern to the stream topics,
so a new stream is picked up within ``metadata_max_age_ms`` and each stream is recorded
by exactly one member. :class:`TopicAssignor` keeps a topic's partitions (video, audio)
on one member and moves a topic only when its member leaves (rendezvous hashing).

Each session becomes a file set (:mod:`whipcast.gateway.recordings` names them) muxed
by :mod:`whipcast.gateway.mux`: fragmented MP4 (WebM for VP8), a fragment at least every
``record_flush_s`` (1 s), written and fsync'ed as soon as it is complete. Offsets are
committed only for what is durably on disk: after each fsync'ed fragment, the video
offset of the last keyframe the fragment surely holds (and the audio from that time),
so a recorder that takes over after a crash resumes at a keyframe, in a new part of
the same set, overlapping the last part by at most a GOP and a fragment and never
leaving a gap. A clean hand-over (rebalance, shutdown) closes the part and commits
everything. Muxing and fsync run in one worker thread: the event loop, which in
``whipcast dev`` also carries the media path, never waits for the disk.

A directory that cannot be written or a full disk is logged and counted, the part in
progress is abandoned (what it holds stays playable), frames are skipped and the next
part is tried after :data:`RETRY_S`; the recorder itself keeps running.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import heapq
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import FileIO
from pathlib import Path

import av
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from .bus import MAX_RECORD_BYTES, Bus
from .frames import Codec, Frame, FrameFormatError, Track
from .mux import Muxer, MuxError
from .nodes import rendezvous
from .recordings import PartNote, next_part, part_name
from .registry import RegistryView
from .sessions import SessionsView
from .settings import Settings

logger = logging.getLogger(__name__)

RETRY_S = 5.0
"""After a write error, frames are skipped this long before a new part is tried."""
IDLE_CLOSE_S = 10.0
"""A part with no frames for this long is closed (the stream stalled or its ingest died)."""
ENDED_CLOSE_S = 2.0
"""A part of a session the registry says has ended is closed after this much quiet."""
DURABLE_MARGIN_US = 1_500_000
"""How far behind the frame whose write completed a fragment the fragment surely
reaches: FFmpeg holds up to 0.5 s of one track to interleave the other, and arrival
times (by which frames are compared here) jitter against media times."""
FETCH_WAIT_MS = 250
"""Recorders are not latency-bound: fewer, larger fetches cost less CPU."""


def stream_pattern(prefix: str, streams: str) -> str:
    """The topic regex for stream names matching the glob ``streams``."""
    return re.escape(f"{prefix}.stream.") + fnmatch.translate(streams)


class TopicAssignor(AbstractPartitionAssignor):
    """Whole topics to members: a stream's video and audio go to one recorder.

    Rendezvous hashing: each topic goes to the subscribed member with the highest
    hash of (topic, member), so a member joining or leaving moves only the topics it
    gains or had, and every member computes the same answer."""

    name = "whipcast-topic"
    version = 0

    @classmethod
    def assign(
        cls, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = sorted({topic for meta in members.values() for topic in meta.subscription})
        assignment: dict[str, dict[str, list[int]]] = {member: {} for member in members}
        for topic in topics:
            partitions = cluster.partitions_for_topic(topic)
            candidates = [m for m, meta in members.items() if topic in meta.subscription]
            if not partitions or not candidates:
                continue
            assignment[rendezvous(topic, candidates)][topic] = sorted(partitions)
        return {
            member: ConsumerProtocolMemberAssignment(cls.version, sorted(topics.items()), b"")
            for member, topics in assignment.items()
        }

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(cls.version, list(topics), b"")

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass


@dataclass
class _Part:
    """One file being written."""

    path: Path
    muxer: Muxer
    file: FileIO
    video: Codec | None
    opened: float = field(default_factory=time.monotonic)

    def starts(self, frame: Frame) -> bool:
        """Whether a part could begin with this frame (a video keyframe; any frame of
        an audio-only stream)."""
        return frame.keyframe if frame.track is Track.VIDEO else self.video is None


@dataclass
class _StreamRecording:
    """One stream's recording on this recorder; touched only by the worker thread."""

    stream: str
    topic: str
    part: _Part | None = None
    session: int | None = None
    pending: deque = field(default_factory=deque)
    """(arrival µs, partition, offset, starts a part) of records read whose frames may
    not be on disk yet, in the order they were written."""
    commit: dict[int, int] = field(default_factory=dict)
    """Offsets to commit (next record per partition), durable and not committed yet."""
    position: dict[int, int] = field(default_factory=dict)
    """Next record to read per partition (where to resume after a rebalance)."""
    last_frame: float = field(default_factory=time.monotonic)
    last_arrival_us: int = 0
    retry_at: float = 0.0


class Recorder:
    """The ``record`` role: this process's member of the recorder group."""

    def __init__(
        self, settings: Settings, bus: Bus, view: RegistryView, sessions: SessionsView
    ) -> None:
        assert settings.record_dir is not None
        self.settings = settings
        self.root: Path = settings.record_dir
        self._bus = bus
        self._view = view
        self._sessions = sessions
        self._consumer: AIOKafkaConsumer | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="recorder")
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._streams: dict[str, _StreamRecording] = {}
        self._last_error_log = 0.0
        self.frames_read = 0
        self.bytes_read = 0
        self.frames_written = 0
        self.frames_skipped = 0
        self.files = 0
        self.errors = 0
        self.last_error = ""

    async def start(self) -> None:
        settings = self.settings
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._failed(None, exc)  # reported; parts are tried again as frames come
        self._consumer = AIOKafkaConsumer(
            **settings.kafka_client_options(),
            group_id=f"{settings.topic_prefix}.recorders",
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a new stream from its first frame
            partition_assignment_strategy=(TopicAssignor,),
            metadata_max_age_ms=settings.record_discovery_ms,
            session_timeout_ms=settings.record_session_timeout_ms,
            heartbeat_interval_ms=max(100, settings.record_session_timeout_ms // 6),
            fetch_max_wait_ms=FETCH_WAIT_MS,
            max_partition_fetch_bytes=MAX_RECORD_BYTES,
            fetch_max_bytes=4 * MAX_RECORD_BYTES,
        )
        await self._consumer.start()
        pattern = stream_pattern(settings.topic_prefix, settings.record_streams)
        self._consumer.subscribe(pattern=pattern, listener=_Handover(self))
        self._task = asyncio.create_task(self._run(), name="recorder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._commit(await self.release(set(self._streams)))
            await self._consumer.stop()
        self._worker.shutdown(wait=True)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=1000, max_records=2000)
            async with self._lock:
                assigned = self._consumer.assignment()
                batches = {tp: records for tp, records in batches.items() if tp in assigned}
                loop = asyncio.get_running_loop()
                commits = await loop.run_in_executor(self._worker, self._store, batches)
                commits.update(await loop.run_in_executor(self._worker, self._close_quiet))
            await self._commit(commits)

    async def release(self, topics: set[str]) -> dict[TopicPartition, int]:
        """Close the parts of these streams; the offsets of everything read from them."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._worker, self._release, topics)

    async def commit_durable(self) -> None:
        async with self._lock:
            commits = self._offsets()
        await self._commit(commits)

    async def reassigned(self, assigned: set[TopicPartition]) -> None:
        """After a rebalance: finish the streams that moved away (their new owner
        resumes at the last committed keyframe) and continue the others where this
        recorder was, not at the older committed offsets."""
        assert self._consumer is not None
        topics = {tp.topic for tp in assigned}
        await self.release(set(self._streams) - topics)
        for tp in assigned:
            recording = self._streams.get(tp.topic)
            if recording is not None and tp.partition in recording.position:
                self._consumer.seek(tp, recording.position[tp.partition])

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance: the next owner re-reads a little
            logger.info("recorder could not commit offsets: %s", exc)

    # Everything below runs in the worker thread.

    def _store(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> dict:
        topics: dict[str, list[list[ConsumerRecord]]] = {}
        for tp, records in batches.items():
            topics.setdefault(tp.topic, []).append(records)
            self.frames_read += len(records)
            self.bytes_read += sum(len(r.value) for r in records if r.value)
        for topic, partitions in topics.items():
            recording = self._recording(topic)
            # Both tracks in arrival order (each keeps its own order), so the muxer
            # interleaves them without holding one back.
            merged = heapq.merge(*partitions, key=lambda r: r.timestamp)
            for record in merged:
                self._write(recording, record)
                recording.position[record.partition] = record.offset + 1
        return self._offsets()

    def _recording(self, topic: str) -> _StreamRecording:
        recording = self._streams.get(topic)
        if recording is None:
            stream = topic[len(f"{self.settings.topic_prefix}.stream.") :]
            recording = self._streams[topic] = _StreamRecording(stream, topic)
        return recording

    def _write(self, recording: _StreamRecording, record: ConsumerRecord) -> None:
        try:
            frame = Frame.decode(record.value or b"")
        except FrameFormatError:
            self._skip(recording, record)
            return
        recording.last_frame = time.monotonic()
        recording.last_arrival_us = frame.arrival_us
        if recording.session != frame.session:
            self._close(recording)  # the previous session's set is complete
            recording.session = frame.session
        part = recording.part
        if part is not None and part.starts(frame) and self._full(part):
            self._close(recording)  # rolled at a keyframe: every part plays on its own
            part = None
        if part is None:
            part = self._open(recording, frame)
            if part is None:
                self._skip(recording, record)
                return
        size = part.file.tell()
        try:
            written = part.muxer.write(frame)
            if part.file.tell() != size:  # a fragment is complete: make it durable
                os.fsync(part.file.fileno())
                self._durable(recording, frame.arrival_us - DURABLE_MARGIN_US)
        except (OSError, av.FFmpegError, MuxError) as exc:
            self._failed(recording, exc)
            self._abandon(recording)
            self._skip(recording, record)
            return
        starts = written and part.starts(frame)
        recording.pending.append((frame.arrival_us, record.partition, record.offset, starts))
        if written:
            self.frames_written += 1
        else:
            self.frames_skipped += 1

    def _full(self, part: _Part) -> bool:
        settings = self.settings
        return (
            part.file.tell() >= settings.record_max_bytes
            or time.monotonic() - part.opened >= settings.record_max_seconds
        )

    def _open(self, recording: _StreamRecording, frame: Frame) -> _Part | None:
        """A new part starting with this frame, or ``None`` (not a start, or no disk)."""
        video, audio = self._codecs(recording, frame)
        if (video is not None and not (frame.track is Track.VIDEO and frame.keyframe)) or (
            video is None and audio is None
        ):
            return None
        if time.monotonic() < recording.retry_at:
            return None
        fmt = "webm" if video is Codec.VP8 else "fmp4"
        folder = self.root / recording.stream
        try:
            folder.mkdir(parents=True, exist_ok=True)
            number = next_part(folder, recording.stream, frame.session)
            name = part_name(
                recording.stream, frame.session, frame.arrival_us, number,
                "webm" if fmt == "webm" else "mp4",
            )  # fmt: skip
            path = folder / name
            file = FileIO(path, "xb")  # unbuffered: a fragment FFmpeg wrote is in the file
        except OSError as exc:
            self._failed(recording, exc)
            recording.retry_at = time.monotonic() + RETRY_S
            return None
        muxer = Muxer(file, fmt, video, audio, flush_s=self.settings.record_flush_s)
        recording.part = _Part(path, muxer, file, video)
        self.files += 1
        logger.info("recording %s to %s", recording.stream, path)
        return recording.part

    def _codecs(
        self, recording: _StreamRecording, frame: Frame
    ) -> tuple[Codec | None, Codec | None]:
        """The session's tracks, from the session history; before its record is in,
        a video keyframe is taken to mean video plus Opus (what WHIP negotiates)."""
        info = self._sessions.find(recording.stream, frame.session)
        if info is None:
            return (frame.codec, Codec.OPUS) if frame.track is Track.VIDEO else (None, None)
        codecs = []
        for data in (info.video, info.audio):
            codecs.append(Codec.from_mime_type(data["mimeType"]) if data else None)
        return codecs[0], codecs[1]

    def _durable(self, recording: _StreamRecording, horizon_us: int) -> None:
        """Frames up to ``horizon_us`` are on disk: commit up to the last part start
        (keyframe) before it, so a successor resumes on a keyframe without a gap."""
        pending = recording.pending
        cut = None
        for index, (arrival_us, _, _, starts) in enumerate(pending):
            if arrival_us > horizon_us:
                break
            if starts:
                cut = index
        if not cut:
            return
        for _ in range(cut):
            _, partition, offset, _ = pending.popleft()
            recording.commit[partition] = offset + 1
        keyframe = pending[0]
        recording.commit[keyframe[1]] = keyframe[2]

    def _skip(self, recording: _StreamRecording, record: ConsumerRecord) -> None:
        """A record that is not recorded: done as soon as nothing before it waits."""
        self.frames_skipped += 1
        if recording.pending:
            recording.pending.append((0, record.partition, record.offset, False))
        else:
            recording.commit[record.partition] = record.offset + 1

    def _close(self, recording: _StreamRecording) -> None:
        """Finish the part: everything read so far is on disk."""
        part, recording.part = recording.part, None
        if part is None:
            return
        try:
            part.muxer.close()
            os.fsync(part.file.fileno())
            part.file.close()
            last = part.muxer.last_us or 0
            PartNote(last / 1e6, part.muxer.duration_s(), part.muxer.frames).write(part.path)
        except (OSError, av.FFmpegError) as exc:
            self._failed(recording, exc)
        self._all_done(recording)

    def _abandon(self, recording: _StreamRecording) -> None:
        """Give up a part that failed; what reached the disk stays playable."""
        part, recording.part = recording.part, None
        recording.retry_at = time.monotonic() + RETRY_S
        if part is not None:
            for finish in (part.muxer.close, part.file.close):
                try:
                    finish()
                except (OSError, av.FFmpegError):
                    pass
        self._all_done(recording)  # skipped, not retried: the stream has moved on

    def _all_done(self, recording: _StreamRecording) -> None:
        while recording.pending:
            _, partition, offset, _ = recording.pending.popleft()
            recording.commit[partition] = offset + 1

    def _close_quiet(self) -> dict:
        """Close parts of streams that stalled or whose session ended."""
        now = time.monotonic()
        for recording in self._streams.values():
            if recording.part is None:
                continue
            quiet = now - recording.last_frame
            live = self._view.get(recording.stream)
            ended = live is None or live.session != recording.session
            if quiet > IDLE_CLOSE_S or (ended and quiet > ENDED_CLOSE_S):
                self._close(recording)
        return self._offsets()

    def _release(self, topics: set[str]) -> dict:
        for topic in topics:
            recording = self._streams.get(topic)
            if recording is not None:
                self._close(recording)
        offsets = self._offsets()
        for topic in topics:
            self._streams.pop(topic, None)
        return offsets

    def _offsets(self) -> dict[TopicPartition, int]:
        offsets = {}
        for recording in self._streams.values():
            for partition, offset in recording.commit.items():
                offsets[TopicPartition(recording.topic, partition)] = offset
            recording.commit.clear()
        return offsets

    def _failed(self, recording: _StreamRecording | None, exc: BaseException) -> None:
        """Count a write error; log it clearly, at most every few seconds."""
        self.errors += 1
        reason = {errno.ENOSPC: "disk full", errno.EACCES: "permission denied"}.get(
            getattr(exc, "errno", None), "write failed"
        )
        self.last_error = f"{reason}: {exc}"
        now = time.monotonic()
        if now - self._last_error_log > 5:
            self._last_error_log = now
            where = recording.stream if recording else str(self.root)
            logger.error(
                "recorder cannot write %s in %s (%s); frames are skipped and writing is "
                "retried every %.0f s (%d errors so far)",
                where, self.root, self.last_error, RETRY_S, self.errors,
            )  # fmt: skip

    def lag_s(self) -> float:
        """How far the recording furthest behind live is (recordings in progress)."""
        now_us = time.time() * 1e6
        lags = [
            (now_us - r.last_arrival_us) / 1e6
            for r in list(self._streams.values())
            if r.part is not None and r.last_arrival_us
        ]
        return max(lags, default=0.0)

    def snapshot_metrics(self) -> dict:
        """Counters for ``/metrics`` (read at scrape time)."""
        recording = lambda: sum(1 for r in list(self._streams.values()) if r.part)  # noqa: E731
        return {
            "whipcast_recorder_frames_read": (
                "counter", "Stream records the recorder read", lambda: self.frames_read,
            ),
            "whipcast_recorder_bytes_read": (
                "counter", "Bytes of stream records the recorder read", lambda: self.bytes_read,
            ),
            "whipcast_recorder_frames_written": (
                "counter", "Frames written to recordings", lambda: self.frames_written,
            ),
            "whipcast_recorder_frames_skipped": (
                "counter", "Frames not recorded (before a keyframe, malformed, or while the "
                "disk failed)", lambda: self.frames_skipped,
            ),
            "whipcast_recorder_files": (
                "counter", "Recording files (parts) started", lambda: self.files,
            ),
            "whipcast_recorder_errors": (
                "counter", "Recording write errors (unwritable directory, disk full)",
                lambda: self.errors,
            ),
            "whipcast_recorder_streams": (
                "gauge", "Streams this recorder is writing now", recording,
            ),
            "whipcast_recorder_lag_seconds": (
                "gauge", "Arrival at ingest until read, of the recording furthest behind "
                "(one clock only where ingest and recorder share a machine)", self.lag_s,
            ),
        }  # fmt: skip


class _Handover(ConsumerRebalanceListener):
    """Rebalances (Kafka's eager protocol revokes every partition each time any
    stream appears) must not cut recordings: commit what is durable before, keep the
    streams that stay, finish only those that moved."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._recorder.commit_durable()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._recorder.reassigned(set(assigned))
