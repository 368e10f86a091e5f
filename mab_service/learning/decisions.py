"""The decision log: every answer, with what is needed to draw it again exactly.

A record holds the event id, the time, the user, the request body as it arrived, the (alpha, beta) of every
distinct candidate as the sampler saw them, the seed and the ranking. Decoding the body again gives the same
candidates in the same order (``schemas.decode_predict`` is deterministic), and ``sample_top_k(alpha, beta, k,
seed=seed)`` gives the same ranking on every CPU, so any answer can be redrawn; drawing again with other seeds
estimates the probability of each arm at each position (the propensities off-policy evaluation needs).
``python -m mab_service.learning.replay`` does both.

Records are buffered in memory and written by one thread every ``FLUSH_S`` (never fsynced: the log is for
analysis, the journal is what must survive). Each worker writes its own files, ``{name}-{seq}.dlog``; a file is
closed past ``file_bytes`` and the oldest of this worker's files are deleted to keep them within ``max_bytes``;
the node's owner prunes the files replaced workers and earlier runs left (``node.prune_decisions``), by name: a
writer is ``{hex time}-{pid}``, so its newest file, the one it may have open, is spared while its process runs.
While the disk refuses writes, records are dropped and counted.

Record layout (little-endian): magic ``MABD``, then five u32 — meta length, body length, candidates n, ranked k,
CRC-32 of the meta (not of the arrays: at W400 that would cost more than the rest of the record) — then the meta (a
JSON array: event_id, t, user_id, seed, top_k, and the segment when the answer was ranked within one; the posteriors
logged are then the segment's, so an answer is drawn again the same way), then the body, alpha (n float64), beta (n
float64), the ranking (k int64 indices into the candidates).
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
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

logger = logging.getLogger("mab_service.learning")

MAGIC = b"MABD"
_HEADER = struct.Struct("<4sIIIII")
SUFFIX = ".dlog"
FLUSH_S = 0.5
#: Past this many buffered bytes the writer thread is woken at once.
WAKE_BYTES = 4 * 1024 * 1024
#: Most buffers one writev takes (Linux's IOV_MAX).
IOV_MAX = 1024
#: Pieces of a record (``encode``): head, body, alpha, beta, ranking.
PIECES = 5
#: Records one writev takes whole.
RECORDS_PER_WRITE = IOV_MAX // PIECES


@dataclass(frozen=True, slots=True)
class Decision:
    event_id: str
    t: float
    user_id: str
    seed: int
    top_k: int | None
    body: bytes
    alpha: npt.NDArray[np.float64]
    beta: npt.NDArray[np.float64]
    ranking: npt.NDArray[np.int64]
    segment: str | None = None
    """The segment the answer was ranked within, if any."""


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
) -> tuple[int, tuple[bytes | npt.NDArray[Any], ...]]:
    """One record: its size, and its pieces in order (the arrays by reference, copied once, by the kernel)."""
    fields = (event_id, t, user_id, seed, top_k) if segment is None else (event_id, t, user_id, seed, top_k, segment)
    meta = orjson.dumps(fields)
    n, k = len(alpha), len(ranking)
    head = _HEADER.pack(MAGIC, len(meta), len(body), n, k, zlib.crc32(meta)) + meta
    return len(head) + len(body) + 16 * n + 8 * k, (head, body, alpha, beta, ranking)


def read_file(path: Path) -> Iterator[Decision]:
    """The decisions of one file, up to the first torn or damaged record."""
    data = path.read_bytes()
    at = 0
    while at + _HEADER.size <= len(data):
        magic, meta_len, body_len, n, k, crc = _HEADER.unpack_from(data, at)
        start = at + _HEADER.size
        end = start + meta_len + body_len + 16 * n + 8 * k
        meta_bytes = data[start : start + meta_len]
        if magic != MAGIC or end > len(data) or zlib.crc32(meta_bytes) != crc:
            return
        event_id, t, user_id, seed, top_k, *rest = orjson.loads(meta_bytes)
        at = start + meta_len
        body = data[at : at + body_len]
        at += body_len
        alpha = np.frombuffer(data, np.float64, n, at)
        beta = np.frombuffer(data, np.float64, n, at + 8 * n)
        ranking = np.frombuffer(data, np.int64, k, at + 16 * n)
        at = end
        yield Decision(event_id, t, user_id, seed, top_k, body, alpha, beta, ranking, rest[0] if rest else None)


def files(directory: Path) -> list[Path]:
    """The decision log files in ``directory``, oldest first."""
    return sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: (p.stat().st_mtime, p.name))


class DecisionLog:
    """One worker's decision log files in ``directory``."""

    def __init__(self, directory: Path, name: str, *, file_bytes: int, max_bytes: int) -> None:
        self.directory = directory
        self.name = name
        self.file_bytes = file_bytes
        self.max_bytes = max_bytes
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

    def append(self, record: tuple[int, tuple[bytes | npt.NDArray[Any], ...]]) -> None:
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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
            for first in range(0, count, RECORDS_PER_WRITE):  # the kernel copies the pieces: no copy in Python
                last = first + RECORDS_PER_WRITE
                written = os.writev(self._fd, pieces[first * PIECES : last * PIECES])
                if written != sum(sizes[first:last]):
                    raise OSError(28, "short write (disk full)")
        except OSError as exc:
            self.dropped += count
            logger.warning("decision log %s dropped %d records: %s", self.name, count, exc.strerror or exc)
            return
        self._size += size
        self._mine[-1] = (self._mine[-1][0], self._size)
        self.written += count

    def _rotate(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._seq += 1
        path = self.directory / f"{self.name}-{self._seq:06d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._size = 0
        self._mine.append((path, 0))
        while len(self._mine) > 1 and sum(size for _, size in self._mine) > self.max_bytes - self.file_bytes:
            oldest, _ = self._mine.pop(0)
            oldest.unlink(missing_ok=True)
