"""The journal: one worker's durable record of the events it answered and the rewards it accepted.

A reward goes into the file with one ``write`` as soon as it is accepted, from the event loop, and its future resolves
once an ``fdatasync`` that began after that write has returned: ``/reward`` answers 202 only then (group commit: the
thread waits ``commit_delay_s`` after the first pending reward, so that the rewards arriving meanwhile share one
``fdatasync``). Events are queued in memory (no system call on the /predict path) and written in one ``write`` by
the thread, then synced, within ``sync_s`` of the oldest, or before the next reward's sync, whichever comes first: a
worker killed with ``kill -9`` loses at most the events of its last ``sync_s`` that no reward followed, and nothing
it answered 202 for (what was written is in the kernel's page cache; the sync covers a machine that loses power).

Records: a 4-byte little-endian payload length, the payload's CRC-32, the payload (JSON): ``["e", t, event_id, ids]``
for an answered event, ``["r", t, event_id, id, reward]`` for an accepted reward; an event ranked within a segment and
its rewards carry the segment as one more item (``["e", t, event_id, ids, segment]``, ``["r", t, event_id, id,
reward, segment]``), so that replay counts each for the segment too, and earlier records read as before. A torn or
damaged record ends a file's replay (the only place one can be is the end of a file whose writer died).

When the disk refuses (full, read-only, I/O error), the file is cut back to its last synced length, so that a
reward answered 503 cannot reappear at the next start; the cut events are kept in memory and written again
when the disk takes them (``journal_buffer_max_bytes`` at most; past it they are dropped and counted). While
the disk refuses, rewards fail with ``JournalUnavailable`` (503) at once. If the cut itself fails, the file is set
aside and writing goes on in a new one; rewards stay refused until the tail is cut off after all or, failing that, a
sidecar ``{file}.limit`` holding the synced length is written (``read_records`` stops there), so a reward answered
503 is never replayed as accepted.

The disk budget (``Budget``): the node's journal files together stay under ``max_bytes`` and the volume keeps
``min_free_bytes`` free. Each writer looks at the directory at every rotation and every ``BUDGET_CHECK_S`` (never per
write) and counts its own bytes in between; a write that would pass the budget is refused like a full disk (events
held, rewards 503), and the journal takes writes again once the checkpoint's fold has deleted old files.

A file's writer appends ``CLOSED`` when it closes cleanly: the fold (``node.fold``) then knows no one will append
to it; a file followed by a newer one of the same writer is closed too (files are never reopened).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from mab_service.errors import MabError

logger = logging.getLogger("mab_service.learning")

_HEADER = struct.Struct("<II")
#: Queued event bytes past which the thread is woken at once instead of at its timer.
WAKE_BYTES = 1 << 20
SUFFIX = ".jnl"
#: Beside a file whose refused tail could not be cut off: the length (ASCII digits) its replay stops at.
LIMIT_SUFFIX = ".limit"
#: Seconds between two looks at the journal directory's size and the volume's free space, per writer.
BUDGET_CHECK_S = 1.0
#: The largest share of the volume ``Budget.min_free_bytes`` keeps free.
RESERVE_SHARE = 0.05


class JournalUnavailable(MabError):
    """The journal cannot record durably now (full, read-only or failing disk); the client should retry."""

    status_code = 503
    code = "journal_unavailable"


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


#: The last record of a file its writer closed cleanly (a fixed 13 bytes: its header cannot occur inside JSON text).
CLOSED = frame(b'["c"]')


def segment_of(path: Path) -> tuple[str, int]:
    """A journal or decision log file's writer and sequence number (``{writer}-{seq}{suffix}``); seq 0 if none."""
    writer, _, seq = path.stem.rpartition("-")
    if not writer or not seq.isdigit():
        return path.stem, 0
    return writer, int(seq)


def closed(path: Path) -> bool:
    """Whether the file ends with ``CLOSED``: its writer closed it and will not append to it."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - len(CLOSED)))
            return f.read() == CLOSED
    except OSError:
        return False


def _limit_path(path: Path) -> Path:
    return path.with_name(path.name + LIMIT_SUFFIX)


def limit_of(path: Path) -> int | None:
    """The length the replay of ``path`` stops at, if its refused tail could not be cut off."""
    try:
        return int(_limit_path(path).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # written atomically, so not torn; damaged all the same: trust nothing past the start
        logger.warning("journal %s: unreadable %s; the file is ignored", path, LIMIT_SUFFIX)
        return 0


def remove(path: Path) -> None:
    """Delete a journal file and its limit sidecar, if any."""
    path.unlink(missing_ok=True)
    _limit_path(path).unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: a temporary file, fsynced, renamed, the directory fsynced."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written == 0:
                raise OSError(28, "short write (disk full)")
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_records(path: Path) -> Iterator[list[Any]]:
    """The records of one journal file, in order, up to the first torn or damaged one (or its limit)."""
    data = path.read_bytes()
    limit = limit_of(path)
    if limit is not None:
        data = data[:limit]
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


@dataclass(frozen=True)
class Budget:
    """The disk the node's journal may take: past either bound, rewards are refused before the volume fills."""

    max_bytes: int
    """Most bytes the journal files of the node (every writer's) hold together."""
    min_free_bytes: int
    """Bytes the journal's volume keeps free (at most ``RESERVE_SHARE`` of its size)."""


class _Segment:
    """One journal file being written: its length, the part of it known to be on disk, and the events past that."""

    __slots__ = ("fd", "path", "size", "synced", "unsynced_events")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = 0  # bytes written
        self.synced = 0  # bytes known to be on disk
        # (offset, framed events) written past ``synced``: written again if the file is cut back to ``synced``.
        self.unsynced_events: list[tuple[int, bytes]] = []

    def drop_synced_events(self) -> None:
        self.unsynced_events = [(at, chunk) for at, chunk in self.unsynced_events if at >= self.synced]


class Journal:
    """One worker's journal files in ``directory``, written from its event loop and fsynced by one thread.

    Args:
        directory: Where the files go; made if missing.
        name: This writer's unique prefix (files are ``{name}-{seq}.jnl``).
        commit_delay_s: Group commit: seconds to wait after the first pending reward before syncing.
        sync_s: Most seconds written impressions stay unsynced.
        segment_bytes: A file is closed and a new one begun past this size.
        segment_age_s: ... or once it is this old.
        buffer_max_bytes: Most bytes of events held in memory while the disk refuses them.
        budget: The node's disk budget for journal files; None for no bound.
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
        budget: Budget | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.commit_delay_s = commit_delay_s
        self.sync_s = sync_s
        self.segment_bytes = segment_bytes
        self.segment_age_s = segment_age_s
        self.buffer_max_bytes = buffer_max_bytes
        self.budget = budget
        # Counters, read by metrics and /loop.
        self.events_written = 0
        self.rewards_written = 0
        self.syncs = 0
        self.dropped_events = 0
        self.failures = 0
        self.over_budget = 0
        """Writes refused because the disk budget was reached."""
        self.error: str | None = None
        """Why the journal refuses, while it does; None when it takes writes."""

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._seq = 0
        self._segment: _Segment | None = None
        self._opened_at = 0.0
        self._unsynced_since: float | None = None
        self._held: list[bytes] = []  # framed events the disk refused, to write again
        self._held_bytes = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._retired: list[_Segment] = []  # files rotated away, to sync and close
        # Files whose cut-back failed: their tails hold records answered 503. Rewards are refused until each is cut
        # back or has a sidecar that stops its replay at its synced length (``_repair``).
        self._damaged: list[_Segment] = []
        self._cuts = 0  # times a file was cut back: a sync that began before a cut proves nothing
        self._last_retry = 0.0
        self._held_since = 0.0  # when the oldest queued event was queued
        self._woken = False  # the thread was told the queue is long, and has not taken it yet
        # The budget: journal bytes and free bytes at the last look at the directory, and bytes written since.
        self._used = 0
        self._free = 0
        self._reserve = 0  # min_free_bytes, at most RESERVE_SHARE of the volume: a small volume is not refused outright
        self._since_scan = 0
        self._scanned_at = 0.0

    # -- event loop side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._open_segment()
            self._scan()
        self._thread = threading.Thread(target=self._run, name=f"mab-journal-{self.name}", daemon=True)
        self._thread.start()

    def event(self, t: float, event_id: str, ids: list[str], segment: str | None = None) -> None:
        """Queue an answered event (its returned ids are its impressions) for the thread to write and sync within
        ``sync_s`` (or with the next reward's sync, which writes it first). No system call here."""
        fields = ("e", t, event_id, ids) if segment is None else ("e", t, event_id, ids, segment)
        self.event_record(frame(orjson.dumps(fields)))

    def event_record(self, record: bytes) -> None:
        """``event`` for a record framed already (``frame`` of the same JSON array): the native answer's."""
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

    def rewards(
        self, t: float, accepted: list[tuple[str, str, float]], segments: list[str | None] | None = None
    ) -> asyncio.Future[None]:
        """Write accepted rewards ``(event_id, id, reward)`` in one ``write``, each with its event's segment from
        ``segments`` (aligned; None: none has one); the future resolves once all are on disk, or fails with
        JournalUnavailable (then none of them is: a failed write leaves the file as it was)."""
        assert self._loop is not None, "reward before start"
        if segments is None:
            record = b"".join(
                frame(orjson.dumps(("r", t, event_id, arm_id, value))) for event_id, arm_id, value in accepted
            )
        else:
            record = b"".join(
                frame(
                    orjson.dumps(
                        ("r", t, event_id, arm_id, value)
                        if segment is None
                        else ("r", t, event_id, arm_id, value, segment)
                    )
                )
                for (event_id, arm_id, value), segment in zip(accepted, segments)
            )
        with self._lock:
            if self.error is not None or not self._write(record):
                raise JournalUnavailable(f"the journal cannot write: {self.error}")
            self.rewards_written += len(accepted)
            future = self._loop.create_future()
            self._waiters.append(future)
            if len(self._waiters) == 1:
                self._wake.notify()
            return future

    async def close(self) -> None:
        """Sync what was written, stop the thread, mark the file closed, close the files."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        with self._lock:
            segment, self._segment = self._segment, None
            if segment is not None:
                if self.error is None and segment.size == segment.synced:
                    # The fold may take this file at once: no writer will append to it.
                    with contextlib.suppress(OSError):
                        os.write(segment.fd, CLOSED)
                        os.fdatasync(segment.fd)
                os.close(segment.fd)
            for damaged in self._damaged:
                os.close(damaged.fd)
            self._damaged = []

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    # -- under the lock ----------------------------------------------------------------------------------------

    def _open_segment(self) -> None:
        path = self.directory / f"{self.name}-{self._seq + 1:06d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._seq += 1
        if self._segment is not None:
            self._retired.append(self._segment)
        self._segment = _Segment(path, fd)
        self._opened_at = time.monotonic()
        self._unsynced_since = None

    def _write(self, record: bytes) -> bool:
        """Append one record; False (and the file as it was) if the disk or the budget refused it."""
        segment = self._segment
        if (
            segment is None
            or segment.size >= self.segment_bytes
            or time.monotonic() - self._opened_at >= self.segment_age_s
        ):
            try:
                self._open_segment()
            except OSError as exc:
                self._fail(exc)
                return False
            self._scan()  # at every rotation, besides the thread's timer
            segment = self._segment
            assert segment is not None
        reason = self._over_budget(len(record))
        if reason is not None:
            self._refuse(reason)
            return False
        try:
            written = os.write(segment.fd, record)
        except OSError as exc:
            self._fail(exc)
            return False
        segment.size += written
        self._since_scan += written
        if written != len(record):  # a short write: the disk filled up in the middle of the record
            self._fail(OSError(28, "short write (disk full)"))
            self._cut(segment)
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

    def _refuse(self, reason: str) -> None:
        if self.error is None:
            logger.warning("journal %s refuses writes: %s", self.name, reason)
        self.over_budget += 1
        self.error = reason

    def _over_budget(self, extra: int) -> str | None:
        """Why writing ``extra`` more bytes would pass the budget, or None. Other writers' bytes since the last scan
        are not seen: the scan every ``BUDGET_CHECK_S`` bounds what the node can pass the budget by."""
        budget = self.budget
        if budget is None:
            return None
        used = self._used + self._since_scan + extra
        if used > budget.max_bytes:
            return (
                f"the disk budget is reached: the node's journal files would hold {used} bytes, over "
                f"--journal-max-bytes {budget.max_bytes}; rewards are taken again once the checkpoint folds old files"
            )
        free = self._free - self._since_scan - extra
        if free < self._reserve:
            return (
                f"the disk budget is reached: {max(free, 0)} bytes would be free on the journal's volume, under the "
                f"{self._reserve} it keeps (--journal-min-free-bytes)"
            )
        return None

    def _scan(self) -> None:
        """Measure the journal files and the volume's free space now (a directory listing: never per write)."""
        measured = self._measure()
        if measured is not None:
            self._used, self._free, self._reserve = measured
            self._since_scan = 0
        self._scanned_at = time.monotonic()

    def _measure(self) -> tuple[int, int, int] | None:
        """The journal files' bytes, the volume's free bytes, and the bytes the volume keeps free."""
        if self.budget is None:
            return None
        try:
            used = 0
            for path in self.directory.glob(f"*{SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):  # folded meanwhile
                    used += path.stat().st_size
            volume = shutil.disk_usage(self.directory)
            return used, volume.free, min(self.budget.min_free_bytes, int(volume.total * RESERVE_SHARE))
        except OSError as exc:
            logger.warning("journal %s cannot measure its directory: %s", self.name, exc.strerror or exc)
            return None

    def _cut(self, segment: _Segment) -> None:
        """Cut a file back to its synced length: its unsynced events go back to the held list, and the rewards
        waiting fail (their records are gone, so they must not be answered 202). If the cut fails, the file's tail
        keeps records answered 503: the file is set aside as damaged, writing goes on in a new file, and rewards
        are refused until ``_repair`` made that tail unreadable."""
        self._cuts += 1
        current = segment is self._segment
        try:
            os.ftruncate(segment.fd, segment.synced)
            segment.size = segment.synced
        except OSError as exc:
            logger.error("journal %s cannot cut %s back: %s", self.name, segment.path.name, exc.strerror or exc)
            self.failures += 1
            self.error = f"cannot cut {segment.path.name} back after a failed write: {exc.strerror or exc}"
            self._damaged.append(segment)
            if current:
                self._segment = None  # the next write opens a new file: nothing may follow the damaged tail
                with contextlib.suppress(OSError):
                    self._open_segment()
        else:
            if not current:  # a retired file whose sync failed: nothing more goes into it
                os.close(segment.fd)
        for at, chunk in segment.unsynced_events:
            if at >= segment.synced:
                self._hold(chunk)
        segment.unsynced_events = []
        if current:
            self._unsynced_since = None
        failed, self._waiters = self._waiters, []
        self._settle(failed, f"the journal cannot write: {self.error}")

    def _repair(self) -> bool:
        """Make the tails of the damaged files unreadable: cut each back again or, failing that, write beside it the
        length its replay stops at (``read_records`` honours it). True once no damaged file is left."""
        for segment in list(self._damaged):
            try:
                os.ftruncate(segment.fd, segment.synced)
            except OSError:
                try:
                    write_atomically(_limit_path(segment.path), b"%d\n" % segment.synced)
                except OSError as exc:
                    self.error = f"cannot cut {segment.path.name} back after a failed write: {exc.strerror or exc}"
                    continue
            os.close(segment.fd)
            self._damaged.remove(segment)
            logger.warning("journal %s: the refused tail of %s is cut off", self.name, segment.path.name)
        return not self._damaged

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
                while not self._stopping and not self._due() and not self._scan_due():
                    self._wake.wait(self._wait_s())
                stopping = self._stopping
                due = stopping or self._due()
            if self._scan_due():
                self._rescan()
            if not due:
                continue
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

    def _scan_due(self) -> bool:
        return self.budget is not None and time.monotonic() - self._scanned_at >= BUDGET_CHECK_S

    def _wait_s(self) -> float:
        now = time.monotonic()
        waits = [self.sync_s]
        if self._held:
            waits.append(self.sync_s - (now - self._held_since))
        if self._unsynced_since is not None:
            waits.append(self.sync_s - (now - self._unsynced_since))
        if self.budget is not None:
            waits.append(BUDGET_CHECK_S - (now - self._scanned_at))
        return max(0.0, min(waits))

    def _rescan(self) -> None:
        """The budget's timer: measure outside the lock, and count the bytes written meanwhile once."""
        with self._lock:
            before = self._since_scan
        measured = self._measure()
        with self._lock:
            if measured is not None:
                self._used, self._free, self._reserve = measured
                # A rotation may have measured meanwhile (and zeroed the count): never count below nothing.
                self._since_scan = max(0, self._since_scan - before)
            self._scanned_at = time.monotonic()

    def _sync_once(self) -> None:
        with self._lock:
            if self._held or self.error is not None:
                self._retry_held()
            waiters, self._waiters = self._waiters, []
            retired, self._retired = self._retired, []
            segment, cuts = self._segment, self._cuts
            size = segment.size if segment is not None else 0
        error: OSError | None = None
        failed: list[_Segment] = []
        synced = False
        for old in retired:
            try:
                os.fdatasync(old.fd)
            except OSError as exc:
                error = exc
                failed.append(old)
            else:
                os.close(old.fd)
            synced = True
        if segment is not None and (size > segment.synced or waiters):
            try:
                os.fdatasync(segment.fd)
            except OSError as exc:
                error = exc
                failed.append(segment)
            synced = True
        with self._lock:
            if error is not None:
                self._fail(error)
                for old in failed:
                    if old in self._damaged:
                        continue
                    if old in self._retired:  # rotated away since: its tail is cut all the same
                        self._retired.remove(old)
                    self._cut(old)
                failure: str | None = f"the journal cannot sync: {self.error}"
            elif cuts != self._cuts:  # a file was cut meanwhile, and these records with it
                failure = f"the journal cannot write: {self.error}"
            else:
                failure = None
                self.syncs += int(synced)
                if segment is not None:
                    segment.synced = max(segment.synced, size)
                    segment.drop_synced_events()
                    if segment is self._segment and segment.size == segment.synced:
                        self._unsynced_since = None
            self._settle(waiters, failure)

    def _retry_held(self) -> None:
        """Write the queued events in one system call (after a refusal: repair, check the budget, try the disk
        again; the journal takes rewards again once they are in)."""
        self._last_retry = time.monotonic()
        self._woken = False
        was = self.error
        if self._damaged and not self._repair():
            return
        if was is not None and self.budget is not None:
            self._scan()  # while refused, look again at every retry: take rewards as soon as there is room
        reason = self._over_budget(self._held_bytes)
        if reason is not None:
            self._refuse(reason)
            return
        self.error = None
        if self._held:
            chunk = b"".join(self._held)
            held, self._held, self._held_bytes = self._held, [], 0
            if not self._write(chunk):
                for record in held:
                    self._hold(record)
                return
            segment = self._segment
            assert segment is not None
            segment.unsynced_events.append((segment.size - len(chunk), chunk))
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
