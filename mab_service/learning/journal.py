"""The journal: one worker's durable record of the events it answered and the rewards it accepted.

A reward goes into the file with one ``write`` as soon as it is accepted, from the event loop, and its future resolves
once an ``fdatasync`` that began after that write has returned: ``/reward`` answers 202 only then (group commit: the
thread waits ``commit_delay_s`` after the first pending reward, so that the rewards arriving meanwhile share one
``fdatasync``). Events are queued in memory (no system call on the /predict path) and written in one ``write`` by
the thread, then synced, within ``sync_s`` of the oldest, or before the next reward's sync, whichever comes first: a
worker killed with ``kill -9`` loses at most the events of its last ``sync_s`` that no reward followed, and nothing
it answered 202 for (what was written is in the kernel's page cache; the sync covers a machine that loses power).

Records: a 4-byte little-endian payload length, the payload's CRC-32, the payload (JSON): ``["e", t, event_id, ids]``
for an answered event, ``["r", t, event_id, id, reward]`` for an accepted reward. A torn or damaged record ends a
file's replay (the only place one can be is the end of a file whose writer died).

When the disk refuses (full, read-only, I/O error), the file is cut back to its last synced length, so that a
reward answered 503 cannot reappear at the next start; the cut events are kept in memory and written again
when the disk takes them (``journal_buffer_max_bytes`` at most; past it they are dropped and counted). While
the disk refuses, rewards fail with ``JournalUnavailable`` (503) at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from mab_service.errors import MabError

logger = logging.getLogger("mab_service.learning")

_HEADER = struct.Struct("<II")
#: Queued event bytes past which the thread is woken at once instead of at its timer.
WAKE_BYTES = 1 << 20
SUFFIX = ".jnl"


class JournalUnavailable(MabError):
    """The journal cannot record durably now (full, read-only or failing disk); the client should retry."""

    status_code = 503
    code = "journal_unavailable"


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_records(path: Path) -> Iterator[list[Any]]:
    """The records of one journal file, in order, up to the first torn or damaged one."""
    data = path.read_bytes()
    at, end = 0, len(data)
    while at + _HEADER.size <= end:
        size, crc = _HEADER.unpack_from(data, at)
        start = at + _HEADER.size
        payload = data[start : start + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            logger.warning("journal %s: damaged record at byte %d; the rest of the file is ignored", path, at)
            return
        record = orjson.loads(payload)
        if type(record) is list:
            yield record
        at = start + size


class Journal:
    """One worker's journal files in ``directory``, written from its event loop and fsynced by one thread.

    Args:
        directory: Where the files go; made if missing.
        name: This writer's unique prefix (files are ``{name}-{seq}.jnl``).
        commit_delay_s: Group commit: seconds to wait after the first pending reward before syncing.
        sync_s: Most seconds written impressions stay unsynced.
        segment_bytes: A file is closed and a new one begun past this size.
        segment_age_s: ... or once it is this old (the checkpoint folds only files nobody writes to any more).
        buffer_max_bytes: Most bytes of events held in memory while the disk refuses them.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        commit_delay_s: float,
        sync_s: float,
        segment_bytes: int,
        segment_age_s: float,
        buffer_max_bytes: int,
    ) -> None:
        self.directory = directory
        self.name = name
        self.commit_delay_s = commit_delay_s
        self.sync_s = sync_s
        self.segment_bytes = segment_bytes
        self.segment_age_s = segment_age_s
        self.buffer_max_bytes = buffer_max_bytes
        # Counters, read by metrics and /loop.
        self.events_written = 0
        self.rewards_written = 0
        self.syncs = 0
        self.dropped_events = 0
        self.failures = 0
        self.error: str | None = None
        """Why the disk refuses, while it does; None when it takes writes."""

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._seq = 0
        self._fd = -1
        self._opened_at = 0.0
        self._size = 0  # bytes written to the current file
        self._synced = 0  # bytes of the current file known to be on disk
        self._unsynced_since: float | None = None
        self._unsynced_events: list[bytes] = []  # framed events written but not yet synced (rewritten after a cut)
        self._held: list[bytes] = []  # framed events the disk refused, to write again
        self._held_bytes = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._retired: list[int] = []  # files rotated away, to sync and close
        self._cuts = 0  # times the current file was cut back: a sync that began before a cut proves nothing
        self._last_retry = 0.0
        self._held_since = 0.0  # when the oldest queued event was queued
        self._woken = False  # the thread was told the queue is long, and has not taken it yet

    # -- event loop side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._open_segment()
        self._thread = threading.Thread(target=self._run, name=f"mab-journal-{self.name}", daemon=True)
        self._thread.start()

    def event(self, t: float, event_id: str, ids: list[str]) -> None:
        """Queue an answered event (its returned ids are its impressions) for the thread to write and sync within
        ``sync_s`` (or with the next reward's sync, which writes it first). No system call here."""
        record = frame(orjson.dumps(("e", t, event_id, ids)))
        with self._lock:
            if not self._held:
                self._held_since = time.monotonic()
            self._hold(record)
            self.events_written += 1
            if self._held_bytes > WAKE_BYTES and not self._woken:
                self._woken = True  # once: notify() costs microseconds, and the thread may take a while to run
                self._wake.notify()

    def reward(self, t: float, event_id: str, arm_id: str, reward: float) -> asyncio.Future[None]:
        """Write an accepted reward; the future resolves once it is on disk, or fails with JournalUnavailable."""
        return self.rewards(t, [(event_id, arm_id, reward)])

    def rewards(self, t: float, accepted: list[tuple[str, str, float]]) -> asyncio.Future[None]:
        """Write accepted rewards ``(event_id, id, reward)`` in one ``write``; the future resolves once all are on
        disk, or fails with JournalUnavailable (then none of them is: a failed write leaves the file as it was)."""
        assert self._loop is not None, "reward before start"
        record = b"".join(
            frame(orjson.dumps(("r", t, event_id, arm_id, value))) for event_id, arm_id, value in accepted
        )
        with self._lock:
            if self.error is not None:
                raise JournalUnavailable(f"the journal cannot write: {self.error}")
            if not self._write(record):
                raise JournalUnavailable(f"the journal cannot write: {self.error}")
            self.rewards_written += len(accepted)
            future = self._loop.create_future()
            self._waiters.append(future)
            if len(self._waiters) == 1:
                self._wake.notify()
            return future

    async def close(self) -> None:
        """Sync what was written, stop the thread, close the files."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    # -- under the lock ----------------------------------------------------------------------------------------

    def _open_segment(self) -> None:
        if self._fd >= 0:
            self._retired.append(self._fd)
        self._seq += 1
        path = self.directory / f"{self.name}-{self._seq:06d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._opened_at = time.monotonic()
        self._size = self._synced = 0
        self._unsynced_events = []

    def _write(self, record: bytes) -> bool:
        """Append one record; False (and the file as it was) if the disk refused it."""
        if self._size >= self.segment_bytes or time.monotonic() - self._opened_at >= self.segment_age_s:
            try:
                self._open_segment()
            except OSError as exc:
                self._fail(exc)
                return False
        try:
            written = os.write(self._fd, record)
        except OSError as exc:
            self._fail(exc)
            return False
        self._size += written
        if written != len(record):  # a short write: the disk filled up in the middle of the record
            self._cut()
            self._fail(OSError(28, "short write (disk full)"))
            return False
        if self._unsynced_since is None:
            self._unsynced_since = time.monotonic()
        return True

    def _hold(self, record: bytes) -> None:
        if self._held_bytes + len(record) > self.buffer_max_bytes:
            self.dropped_events += 1
            return
        self._held.append(record)
        self._held_bytes += len(record)

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            logger.error("journal %s cannot write: %s", self.name, exc.strerror or exc)
        self.failures += 1
        self.error = exc.strerror or str(exc)

    def _cut(self) -> None:
        """Cut the current file back to its synced length: its unsynced events go back to the held list, and the
        rewards waiting on it fail (their records are gone, so they must not be answered 202)."""
        self._cuts += 1
        try:
            os.ftruncate(self._fd, self._synced)
            self._size = self._synced
        except OSError as exc:
            # The unsynced tail stays; rewards in it were answered 503. Start a new file so nothing follows it.
            logger.error("journal %s cannot cut its file back: %s", self.name, exc.strerror or exc)
            try:
                self._open_segment()
            except OSError:
                pass
        events, self._unsynced_events = self._unsynced_events, []
        for record in events:
            self._hold(record)
        self._unsynced_since = None
        failed, self._waiters = self._waiters, []
        self._settle(failed, f"the journal cannot write: {self.error}")

    def _settle(self, waiters: list[asyncio.Future[None]], failure: str | None) -> None:
        if not waiters:
            return
        assert self._loop is not None
        exc = None if failure is None else JournalUnavailable(failure)
        try:
            self._loop.call_soon_threadsafe(_settle, waiters, exc)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # -- the sync thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._due():
                    self._wake.wait(self._wait_s())
                stopping = self._stopping
            if not stopping and self.commit_delay_s > 0 and self._waiters:
                time.sleep(self.commit_delay_s)  # let more rewards join this sync
            self._sync_once()
            if stopping:
                return

    def _due(self) -> bool:
        if self._waiters or self._retired:
            return True
        now = time.monotonic()
        if self.error is not None:  # try the disk again every sync_s
            return now - self._last_retry >= self.sync_s
        if self._held and (self._woken or now - self._held_since >= self.sync_s):
            return True
        since = self._unsynced_since
        return since is not None and now - since >= self.sync_s

    def _wait_s(self) -> float:
        now = time.monotonic()
        waits = [self.sync_s]
        if self._held:
            waits.append(self.sync_s - (now - self._held_since))
        if self._unsynced_since is not None:
            waits.append(self.sync_s - (now - self._unsynced_since))
        return max(0.0, min(waits))

    def _sync_once(self) -> None:
        with self._lock:
            if self._held or self.error is not None:
                self._retry_held()
            waiters, self._waiters = self._waiters, []
            retired, self._retired = self._retired, []
            fd, size, cuts = self._fd, self._size, self._cuts
        error: OSError | None = None
        for old in retired:
            try:
                os.fdatasync(old)
            except OSError as exc:
                error = exc
            finally:
                os.close(old)
        if fd >= 0 and (size > self._synced or waiters):
            try:
                os.fdatasync(fd)
            except OSError as exc:
                error = exc
        with self._lock:
            if error is not None:
                self._fail(error)
                if fd == self._fd:
                    self._cut()
                failure: str | None = f"the journal cannot sync: {self.error}"
            elif cuts != self._cuts:  # the file was cut meanwhile, and these records with it
                failure = f"the journal cannot write: {self.error}"
            else:
                failure = None
                self.syncs += 1
                if fd == self._fd:
                    self._synced = max(self._synced, size)
                    if self._size == self._synced:
                        self._unsynced_since = None
                        self._unsynced_events = []
            self._settle(waiters, failure)

    def _retry_held(self) -> None:
        """Write the queued events in one system call (after a refusal: try the disk again; the journal takes
        rewards again once they are in)."""
        self._last_retry = time.monotonic()
        self._woken = False
        was = self.error
        self.error = None
        if self._held:
            chunk = b"".join(self._held)
            held, self._held, self._held_bytes = self._held, [], 0
            if not self._write(chunk):
                for record in held:
                    self._hold(record)
                return
            self._unsynced_events.append(chunk)
        if was is not None:
            logger.warning("journal %s writes again", self.name)


def _settle(waiters: list[asyncio.Future[None]], failure: JournalUnavailable | None) -> None:
    for future in waiters:
        if future.done():
            continue
        if failure is None:
            future.set_result(None)
        else:
            future.set_exception(failure)
