"""The decision log: every answer, with what is needed to draw it again exactly.

A record holds the event id, the time, the user, the candidates, the (alpha, beta) of every distinct candidate as
the sampler saw them, the seed and the ranking. Where the node's arm table ranked the answer (the embedded sources),
the candidates are their rows in it, as the posteriors' gather found them, and the ids of those it does not hold yet
(-1) are written out; elsewhere (a store ranked) the record keeps the request body as it arrived: decoding it again
gives the same candidates in the same order (``schemas.decode_predict`` is deterministic). ``sample_top_k(alpha,
beta, k, seed=seed)`` gives the same ranking on every CPU, so any answer can be redrawn; drawing again with other
seeds estimates the probability of each arm at each position (the propensities off-policy evaluation needs).
``python -m mab_service.learning.replay`` does both.

A fraction of the answers may be logged (``decision_log_sample``): an answer is logged when the CRC-32 of its event
id falls below the rate times 2**32, a choice made before and apart from the draw, so the logged answers are an
unbiased sample; each record carries the rate, and an inverse-propensity weight divides by it too.

Rows are not ids: a row names its id for the life of the node's table, which every start builds anew (the catalogue,
then the checkpoint's arms, then new arms in order of arrival, racing across workers), so the same row may name
another id after a restart. Each file therefore names its own rows: before the records of a write that use rows the
file has not named yet, the writer thread adds a names record (row -> id) for them, read from the table. A file is
self-contained, whichever of its elders were deleted, and the request side never looks an id up for the log.

Records are buffered in memory and written by one thread every ``FLUSH_S`` (never fsynced: the log is for
analysis, the journal is what must survive). Each worker writes its own files, ``{name}-{seq}.dlog``; a file is
closed past ``file_bytes`` and the oldest of this worker's files are deleted to keep them within ``max_bytes``;
the node's owner prunes the files replaced workers and earlier runs left (``node.prune_decisions``), by name: a
writer is ``{hex time}-{pid}``, so its newest file, the one it may have open, is spared while its process runs.
While the disk refuses writes, records are dropped and counted, and the next write begins a new file.

Layouts, little-endian, fixed, so that a native encoder can write them. The CRC-32 covers the head and the strings,
not the arrays (at W400 that would cost more than the rest of the record).

Version 2, magic ``MAB2``: a 60-byte head — u32 CRC-32 (of the head after it and the three strings), u32 candidates
n, u32 ranked k, u32 blob length, u16 lengths of the event id, the user id and the segment, u16 flags (``ROWS``: the
candidates as rows; ``SEGMENT``: ranked within a segment, whose posteriors are the ones logged; ``WIDE``: the ranking
as u32, else u16; ``NARROW``: alpha and beta as f32), f64 time, u64 seed, u64 top_k (0: none; a request's is >= 1),
f64 sample rate — then the event id, user id and segment (UTF-8), then the blob: the request body, or with ``ROWS``
the ids of the candidates whose row is -1, in order, in UTF-8 with a NUL between two (ids hold no control
character), then with ``ROWS`` the rows (n i32), then alpha (n f64, or f32), beta (the same) and the ranking (k u16
or u32 indices into the candidates). Alpha and beta are f32 only when every one of them is exactly a float32
(posteriors that are integer priors plus counts, without a half-life, are): widened again they are the same
doubles, so the redraw stays bit for bit with half the bytes for them.

Names, magic ``MABR``: u32 count m, u32 CRC-32 of what follows, then rows (m u32), id lengths (m u32), the ids'
UTF-8 bytes back to back.

Version 1, magic ``MABD`` (read, no longer written): five u32 — meta length, body length, candidates n, ranked k,
CRC-32 of the meta — then the meta (a JSON array: event_id, t, user_id, seed, top_k, and the segment when there is
one), the body, alpha (n f64), beta (n f64), the ranking (k i64).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from mab_service.learning._arms import first_seen, narrowed, unnamed

logger = logging.getLogger("mab_service.learning")

MAGIC = b"MAB2"
MAGIC_NAMES = b"MABR"
MAGIC_V1 = b"MABD"
#: Version 2: magic and CRC-32, then what the CRC covers with the strings after it.
PREFIX = struct.Struct("<4sI")
FIELDS = struct.Struct("<IIIHHHHdQQd")
_NAMES = struct.Struct("<4sII")
_HEADER_V1 = struct.Struct("<4sIIIII")
#: Flags of a version 2 record.
ROWS = 1
SEGMENT = 2
WIDE = 4
NARROW = 8
#: Most candidates whose indices fit a u16 ranking.
NARROW_MAX = 1 << 16
SUFFIX = ".dlog"
FLUSH_S = 0.5
#: Past this many buffered bytes the writer thread is woken at once.
WAKE_BYTES = 4 * 1024 * 1024
#: Most buffers one writev takes (Linux's IOV_MAX).
IOV_MAX = 1024
#: Pieces of a record (``encode``): head, rows or body, alpha, beta, ranking.
PIECES = 5
#: Records one writev takes whole.
RECORDS_PER_WRITE = IOV_MAX // PIECES

#: A record as ``encode`` gives it: its size, and its pieces (bytes, and arrays by reference).
Record = tuple[int, tuple[bytes | npt.NDArray[Any], ...]]


class RowNames(Protocol):
    """What the writer needs of the node's arm table to name rows: the rows taken, and the id of one."""

    def __len__(self) -> int: ...

    def id_at(self, row: int) -> str: ...

    def names(self, rows: list[int]) -> bytes:
        """The names of ``rows`` as a names record holds them after its head (``names_tail``)."""
        ...


def names_tail(rows: list[int], ids: list[str]) -> bytes:
    """What a names record holds after its head: ``rows`` (u32), the lengths of their ``ids`` (u32) and the ids' UTF-8
    bytes back to back (``ArmTable.names`` writes the same in one pass)."""
    encoded = [i.encode() for i in ids]
    lengths = np.array([len(i) for i in encoded], dtype="<u4")
    return np.array(rows, dtype="<u4").tobytes() + lengths.tobytes() + b"".join(encoded)


@dataclass(frozen=True, slots=True)
class Decision:
    event_id: str
    t: float
    user_id: str
    seed: int
    top_k: int | None
    body: bytes
    """The request body; empty when the record named the candidates by rows (``ids``)."""
    alpha: npt.NDArray[np.float64]
    beta: npt.NDArray[np.float64]
    ranking: npt.NDArray[np.int64]
    segment: str | None = None
    """The segment the answer was ranked within, if any."""
    ids: list[str] | None = None
    """The distinct candidates in the sampler's order, named from the file's rows; None: decode ``body``."""
    sample_rate: float = 1.0
    """The share of answers the log kept when this one was logged (``decision_log_sample``)."""


def encode(
    event_id: str,
    t: float,
    user_id: str,
    seed: int,
    top_k: int | None,
    body: bytes,
    alpha: npt.NDArray[np.float64],
    beta: npt.NDArray[np.float64],
    ranking: npt.NDArray[np.int64],
    segment: str | None = None,
    *,
    candidates: list[str] | None = None,
    rows: npt.NDArray[np.int32] | None = None,
    sample_rate: float = 1.0,
) -> Record:
    """One version 2 record: its size, and its pieces in order (the arrays by reference, copied once, by the kernel).

    ``rows``: the rows of ``candidates`` in the node's arm table (-1 where it has none), as the gather gave them;
    the record carries them, and the ids of the candidates without one, instead of ``body``. Rows are written as
    they are (int32, contiguous, the gather's own array).
    """
    n, k = len(alpha), len(ranking)
    flags = 0
    payload: bytes | npt.NDArray[Any] = body
    inline = b""
    if rows is not None and candidates is not None:
        flags, payload = ROWS, rows
        inline = unnamed(rows, candidates)  # the candidates the table does not hold yet, named here
    if n > NARROW_MAX:
        flags |= WIDE
        order = ranking.astype(np.uint32)
    else:
        order = ranking.astype(np.uint16)
    event, user = event_id.encode(), user_id.encode()
    place = b""
    if segment is not None:
        flags |= SEGMENT
        place = segment.encode()
    pair: npt.NDArray[Any] | None = narrowed(alpha, beta)
    if pair is None:
        first, second, each = alpha, beta, 8
    else:  # every value exactly a float32: half the bytes, and widening gives them back bit for bit
        flags |= NARROW
        first, second, each = pair[0], pair[1], 4
    blob_len = len(inline) if flags & ROWS else len(body)
    fields = FIELDS.pack(n, k, blob_len, len(event), len(user), len(place), flags, t, seed, top_k or 0, sample_rate)
    fields += event + user + place
    head = PREFIX.pack(MAGIC, zlib.crc32(fields)) + fields + inline
    size = len(head) + (4 * n if flags & ROWS else blob_len) + 2 * each * n + order.nbytes
    return size, (head, payload, first, second, order)


def read_file(path: Path) -> Iterator[Decision]:
    """The decisions of one file (either version), up to the first torn or damaged record."""
    data = path.read_bytes()
    names: dict[int, str] = {}
    at = 0
    while at + 4 <= len(data):
        magic = data[at : at + 4]
        if magic == MAGIC:
            read = _read(data, at, names)
        elif magic == MAGIC_NAMES:
            at = _read_names(data, at, names)
            if at < 0:
                return
            continue
        elif magic == MAGIC_V1:
            read = _read_v1(data, at)
        else:
            return
        if read is None:
            return
        decision, at = read
        yield decision


def _read(data: bytes, at: int, names: dict[int, str]) -> tuple[Decision, int] | None:
    """The version 2 record at ``at`` and where the next begins; None if torn or damaged."""
    start = at + PREFIX.size
    if start + FIELDS.size > len(data):
        return None
    _, crc = PREFIX.unpack_from(data, at)
    n, k, blob_len, event_len, user_len, place_len, flags, t, seed, top_k, rate = FIELDS.unpack_from(data, start)
    at = start + FIELDS.size
    strings_end = at + event_len + user_len + place_len
    width = 4 if flags & WIDE else 2
    each = 4 if flags & NARROW else 8
    end = strings_end + blob_len + (4 * n if flags & ROWS else 0) + 2 * each * n + width * k
    if end > len(data) or zlib.crc32(data[start:strings_end]) != crc:
        return None
    event_id = data[at : at + event_len].decode()
    at += event_len
    user_id = data[at : at + user_len].decode()
    at += user_len
    segment = data[at : at + place_len].decode() if flags & SEGMENT else None
    at = strings_end
    ids = None
    body = data[at : at + blob_len]
    at += blob_len
    if flags & ROWS:
        ids = _candidates(np.frombuffer(data, "<i4", n, at).tolist(), body, names)
        if ids is None:
            return None
        body = b""
        at += 4 * n
    values = "<f4" if flags & NARROW else "<f8"
    alpha = np.frombuffer(data, values, n, at).astype(np.float64)
    beta = np.frombuffer(data, values, n, at + each * n).astype(np.float64)
    ranking = np.frombuffer(data, "<u4" if flags & WIDE else "<u2", k, at + 2 * each * n).astype(np.int64)
    top = top_k or None
    return Decision(event_id, t, user_id, seed, top, body, alpha, beta, ranking, segment, ids, rate), end


def _candidates(rows: list[int], inline: bytes, names: dict[int, str]) -> list[str] | None:
    """The ids of ``rows``, by the file's names and, for -1, in turn from ``inline``; None if one cannot be named
    (the blob is not under the CRC: a damaged one is found here)."""
    try:
        named = inline.decode().split("\0") if inline else []
    except UnicodeDecodeError:
        return None
    if rows.count(-1) != len(named):
        return None
    own = iter(named)
    ids = []
    for row in rows:
        name = next(own) if row == -1 else names.get(row)
        if name is None:  # a names record lost, or a row damaged: the file ends here for a reader
            return None
        ids.append(name)
    return ids


def _read_names(data: bytes, at: int, names: dict[int, str]) -> int:
    """Add the names record at ``at`` to ``names``; where the next record begins, -1 if torn or damaged."""
    if at + _NAMES.size > len(data):
        return -1
    m: int
    _, m, crc = _NAMES.unpack_from(data, at)
    at += _NAMES.size
    if at + 8 * m > len(data):
        return -1
    rows = np.frombuffer(data, "<u4", m, at).tolist()
    lengths = np.frombuffer(data, "<u4", m, at + 4 * m).tolist()
    end = at + 8 * m + int(sum(lengths))
    if end > len(data) or zlib.crc32(data[at:end]) != crc:
        return -1
    at += 8 * m
    for row, length in zip(rows, lengths):
        names[row] = data[at : at + length].decode()
        at += length
    return end


def _read_v1(data: bytes, at: int) -> tuple[Decision, int] | None:
    """The version 1 record at ``at`` and where the next begins; None if torn or damaged."""
    if at + _HEADER_V1.size > len(data):
        return None
    magic, meta_len, body_len, n, k, crc = _HEADER_V1.unpack_from(data, at)
    start = at + _HEADER_V1.size
    end = start + meta_len + body_len + 16 * n + 8 * k
    meta_bytes = data[start : start + meta_len]
    if end > len(data) or zlib.crc32(meta_bytes) != crc:
        return None
    event_id, t, user_id, seed, top_k, *rest = orjson.loads(meta_bytes)
    at = start + meta_len
    body = data[at : at + body_len]
    at += body_len
    alpha = np.frombuffer(data, np.float64, n, at)
    beta = np.frombuffer(data, np.float64, n, at + 8 * n)
    ranking = np.frombuffer(data, np.int64, k, at + 16 * n)
    return Decision(event_id, t, user_id, seed, top_k, body, alpha, beta, ranking, rest[0] if rest else None), end


def files(directory: Path) -> list[Path]:
    """The decision log files in ``directory``, oldest first."""
    return sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: (p.stat().st_mtime, p.name))


class DecisionLog:
    """One worker's decision log files in ``directory``.

    ``sample_rate``: the share of answers logged (``takes``); ``table``: the node's arm table, that names the rows
    records carry (rows are trusted to be the ones its gather returned).
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        file_bytes: int,
        max_bytes: int,
        sample_rate: float = 1.0,
        table: RowNames | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.file_bytes = file_bytes
        self.max_bytes = max_bytes
        self.sample_rate = sample_rate
        # An event id is taken when its CRC-32 is below this: never at 0, always at 1 (a CRC is below 2**32).
        self._below = round(sample_rate * 2**32)
        self._table = table
        self._named = np.zeros(0, dtype=bool)  # rows the open file has named, by row
        self.written = 0
        self.dropped = 0
        # Records as their pieces (bytes and arrays), by reference: the thread hands them to writev.
        self._pieces: list[Any] = []
        self._sizes: list[int] = []  # of each queued record, so that a write is checked without a look at its pieces
        self._bytes = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._fd = -1
        self._size = 0
        self._mine: list[tuple[Path, int]] = []  # this writer's files and their sizes, oldest first

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"mab-decisions-{self.name}", daemon=True)
        self._thread.start()

    def takes(self, event_id: str) -> bool:
        """Whether the answer of ``event_id`` is logged: the same answer always is or is not, whichever worker."""
        return zlib.crc32(event_id.encode()) < self._below

    def append(self, record: Record) -> None:
        """Queue one record (as ``encode`` gives it); never waits on the disk."""
        size, pieces = record
        with self._lock:
            if self._bytes > self.max_bytes:  # the disk has refused for a while: do not grow without bound
                self.dropped += 1
                return
            self._pieces += pieces
            self._sizes.append(size)
            self._bytes += size
            if self._bytes > WAKE_BYTES:
                self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._close_file()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            self._flush()
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            pieces, self._pieces = self._pieces, []
            sizes, self._sizes = self._sizes, []
            size, self._bytes = self._bytes, 0
        count = len(sizes)
        if not count:
            return
        try:
            if self._fd < 0 or self._size >= self.file_bytes:
                self._rotate()
            names = self._names(pieces)
            if names:
                if os.write(self._fd, names) != len(names):
                    raise OSError(28, "short write (disk full)")
                size += len(names)
            for first in range(0, count, RECORDS_PER_WRITE):  # the kernel copies the pieces: no copy in Python
                last = first + RECORDS_PER_WRITE
                written = os.writev(self._fd, pieces[first * PIECES : last * PIECES])
                if written != sum(sizes[first:last]):
                    raise OSError(28, "short write (disk full)")
        except OSError as exc:
            self.dropped += count
            logger.warning("decision log %s dropped %d records: %s", self.name, count, exc.strerror or exc)
            # A reader stops at a torn record, and the file may name rows this write did not: begin a new one.
            self._close_file()
            return
        self._size += size
        self._mine[-1] = (self._mine[-1][0], self._size)
        self.written += count

    def _names(self, pieces: list[Any]) -> bytes:
        """The names record for the rows these records use that the open file has not named yet (b"": none)."""
        used = [piece for piece in pieces[1::PIECES] if isinstance(piece, np.ndarray)]
        if not used:
            return b""
        assert self._table is not None, "records carry rows: the log needs the arm table"
        rows = len(self._table)  # every row a gather returned is below it: rows are never taken back
        if len(self._named) < rows:
            self._named = np.concatenate([self._named, np.zeros(rows - len(self._named), dtype=bool)])
        new = first_seen(used, self._named)
        if not new:
            return b""
        tail = self._table.names(new)
        return _NAMES.pack(MAGIC_NAMES, len(new), zlib.crc32(tail)) + tail

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> None:
        self._close_file()
        self._named = np.zeros(0, dtype=bool)
        self._seq += 1
        path = self.directory / f"{self.name}-{self._seq:06d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._size = 0
        self._mine.append((path, 0))
        while len(self._mine) > 1 and sum(size for _, size in self._mine) > self.max_bytes - self.file_bytes:
            oldest, _ = self._mine.pop(0)
            oldest.unlink(missing_ok=True)
