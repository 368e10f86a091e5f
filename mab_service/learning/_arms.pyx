# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The Cython boundary of the shared arm table (csrc/mab/arm_table.hpp).

The table lives in a buffer the caller owns (in the service, an ``mmap`` of a file in /dev/shm that every worker
maps), so that all workers on a node read and update one copy. This module holds the buffer exported for as
long as the table object lives: an ``mmap`` cannot be closed, nor a ``bytearray`` resized, under it.

Request calls (gather, add_impressions, add, get) keep the GIL, as IdIndex.gather does: the work is a few
microseconds and the id views borrow from list items. Bulk loads release it: ``load`` works on its own copy of
the list, ``load_csv`` on its own block buffer.
"""
import contextlib
import csv
import io
import mmap
import sys
import time

import numpy as np

cimport numpy as cnp
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.float cimport FLT_MAX
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t, intptr_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memmove

from mab_service._cyutil cimport (
    IdRef, STACK_IDS, empty, free_scratch, id_view, id_views, list_item, list_size, parameters, positive, scratch,
)
from mab_service.features._index cimport first_bad_id

from mab_service.ids import MAX_ID_BYTES, id_message, id_problem

cnp.import_array()

# Read once: catalogue ids are checked in C++ against this number.
cdef size_t _max_id_bytes = MAX_ID_BYTES
# What the C++ parser strips from ids (ASCII whitespace only), for the Python pass that finds a bad id's line.
cdef str _ASCII_SPACE = " \t\n\r\v\f"


cdef extern from "Python.h":
    object decode_utf8 "PyUnicode_DecodeUTF8"(const char* data, Py_ssize_t size, const char* errors)


# Bytes read from a CSV file per block: big enough that the GIL changes hands rarely, small enough to stay
# out of the way of the table's own memory.
CSV_BLOCK_BYTES = 4 << 20

FLAG_CATALOGUE = kArmCatalogue
FLAG_RUNTIME = kArmRuntime
FLAG_WASTED = kArmWasted
FLAG_SEGMENT = kArmSegment
EPOCH_HALF_LIVES = kArmEpochHalfLives

# The fields of ArmRecord that records() shows, at their C++ offsets (filled in below from a real record).
cdef ArmRecord _layout
cdef Py_ssize_t _offset(void* field):
    return <char*>field - <char*>&_layout

# The counts are as stored: forward-decayed sums relative to their epoch's landmark (the sign bit its parity) when
# the table decays, plain sums otherwise. ``counts()`` reads them as of a time.
RECORD_DTYPE = np.dtype({
    "names": ["hash", "alpha0", "beta0", "impressions", "rewards", "id_size", "flags"],
    "formats": ["<u8", "<f8", "<f8", "<f8", "<f8", "<u4", "<u4"],
    "offsets": [
        _offset(&_layout.hash), _offset(&_layout.alpha0), _offset(&_layout.beta0),
        _offset(&_layout.impressions), _offset(&_layout.rewards), _offset(&_layout.id_size),
        _offset(&_layout.flags),
    ],
    "itemsize": sizeof(ArmRecord),
})


cdef void* _heap(size_t size) except NULL:
    """``size`` bytes from the heap (free with free_scratch)."""
    cdef void* p = PyMem_Malloc(max(size, 1))
    if p == NULL:
        raise MemoryError()
    return p


cdef double _now(const CArmTable* table, object now) except? -1.0:
    """The time counts are read or added at: ``now``, or the time of the call when it is None. Checked finite,
    as the decay's exponent takes it."""
    cdef double t = time.time() if now is None else now
    if not (-INFINITY < t < INFINITY):
        raise ValueError(f"now must be finite (got {now!r})")
    return t


cdef int _raise_on_status(int status, str where="the arm table") except -1:
    # Status codes become Python exceptions here and only here.
    if status == kArmOk:
        return 0
    if status == kArmNoMemory:
        raise MemoryError(f"{where} could not allocate memory")
    if status == kArmTooBig:
        raise ValueError(f"capacity must be at most {kArmMaxRows} rows")
    if status == kArmBadLayout:
        raise ValueError("the buffer does not hold an arm table of this layout version and size")
    if status == kArmRowsFull:
        raise ValueError(f"{where}: every row of the arm table is taken")
    if status == kArmArenaFull:
        raise ValueError(f"{where}: the arm table has no room left for id bytes")
    raise RuntimeError(f"the arm table returned unknown status {status}")


cdef str _csv_text(const ArmCsvError* e):
    cdef size_t kept = min(e.text_size, kCsvErrorText)
    cdef str text = decode_utf8(<const char*>e.text, <Py_ssize_t>kept, "replace")
    if kept < e.text_size:
        return f"{text!r}... ({e.text_size} bytes)"
    return repr(text)


cdef str _csv_problem(const ArmCsvError* e):
    cdef uint64_t line = e.line
    if e.problem == kCsvTooFewFields:
        return f"line {line}: expected {e.expected} fields, got {e.count}"
    if e.problem == kCsvEmptyId:
        return f"line {line}: entity_id is empty"
    if e.problem == kCsvDuplicate:
        first = f"first on line {e.first_line}" if e.first_line else "already in the table"
        return f"line {line}: duplicate entity_id {_csv_text(e)} ({first})"
    if e.problem == kCsvBadAlpha:
        return f"line {line}: alpha must be a finite number > 0 (got {_csv_text(e)})"
    if e.problem == kCsvBadBeta:
        return f"line {line}: beta must be a finite number > 0 (got {_csv_text(e)})"
    if e.problem == kCsvBadUtf8:
        return f"line {line}: entity_id is not valid UTF-8"
    if e.problem == kCsvUnterminated:
        return f"line {line}: a quoted field runs to the end of the file"
    return f"line {line}: unknown problem {e.problem}"


def _csv_records(source):
    """(line, record) of the CSV `source` read as text, bad UTF-8 replaced, each with the line it ends on (the
    parser's numbering). For the rare reports that need Python's view of the file. The parser takes fields of
    any length, so csv's limit is lifted meanwhile (it is per process: loads run at start, one at a time)."""
    limit = csv.field_size_limit(sys.maxsize)
    try:
        yield from _csv_records_limitless(source)
    finally:
        csv.field_size_limit(limit)


def _csv_records_limitless(source):
    if hasattr(source, "readinto"):
        source.seek(0)
        text = io.TextIOWrapper(source, encoding="utf-8", errors="replace", newline="")
        try:
            reader = csv.reader(text)
            for row in reader:
                yield reader.line_num, row
        finally:
            text.detach()  # the caller's file stays open
    else:
        with open(source, encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                yield reader.line_num, row


cdef _header_error(object source, str where, int status):
    """The message for a file whose first record is missing or lacks a column."""
    if status == kArmCsvEmpty:
        return ValueError(f"{where}: the file is empty (expected the header entity_id,alpha,beta)")
    records = _csv_records(source)
    header = [h.strip() for h in next(records, (1, []))[1]]
    records.close()
    missing = [c for c in ("entity_id", "alpha", "beta") if c not in header]
    return ValueError(f"{where}: line 1: the header lacks {', '.join(missing)} (got {','.join(header)})")


cdef Py_ssize_t _next_bad_row(const CArmTable* table, size_t row, size_t end) noexcept nogil:
    """The first row in [row, end) whose id breaks the id rule (mab_service/ids.py), or -1."""
    cdef IdRef ref
    while row < end:
        ref = arm_id_at(table, row)
        if ref.data != NULL and first_bad_id(&ref, 1, _max_id_bytes) == 0:
            return <Py_ssize_t>row
        row += 1
    return -1


cdef list _id_rule_problems(object source, dict bad):
    """(line, message) for each id of `bad` (loaded, so each on its first line), found by a pass in Python: the
    table does not keep lines, and bad ids are rare."""
    cdef list out = []
    records = _csv_records(source)
    header = [h.strip() for h in next(records, (1, []))[1]]
    col = header.index("entity_id")
    for line, row in records:
        if len(row) > col:
            entity = row[col].strip(_ASCII_SPACE)
            if bad.get(entity, 0) is None:
                bad[entity] = line
                out.append((line, f"line {line}: " + id_message("entity_id", id_problem(entity))))
    records.close()
    return out


cdef object _open_binary(object source):
    """`source` rewound, if it is a binary file, else the file at the path `source`, unbuffered."""
    if hasattr(source, "readinto"):
        source.seek(0)
        return contextlib.nullcontext(source)  # the caller's file stays open
    return open(source, "rb", buffering=0)


cdef int _feed_file(ArmCsvLoad* load, object source) except -1:
    """Feeds `source` (a path or a binary file) to the parser in blocks, the GIL released while each is parsed.
    Returns the parser's status. A record longer than the block doubles the block."""
    cdef cnp.ndarray block = empty(CSV_BLOCK_BYTES, cnp.NPY_UINT8)
    cdef cnp.ndarray bigger
    cdef Py_ssize_t have = 0, got
    cdef size_t consumed = 0
    cdef char* data
    cdef bint eof
    cdef int status
    with _open_binary(source) as f:
        while True:
            got = f.readinto(block[have:])
            eof = got == 0
            have += got
            data = <char*>cnp.PyArray_DATA(block)
            with nogil:
                status = arm_csv_feed(load, data, <size_t>have, eof, &consumed)
            if status != kArmOk or eof:
                return status
            memmove(data, data + consumed, <size_t>have - consumed)
            have -= <Py_ssize_t>consumed
            if have == block.shape[0]:
                bigger = empty(2 * have, cnp.NPY_UINT8)
                bigger[:have] = block
                block = bigger


cdef object _load_csv(CArmTable* table, object source, str where, object errors_max):
    """The catalogue loader: parses `source` into `table` (NULL: only count), checks every row, and raises one
    ValueError listing the bad lines by number (at most errors_max of them, all counted), the messages prefixed
    with `where`. Returns the parser's counts as (rows, id_bytes)."""
    if errors_max < 0:
        raise ValueError(f"errors_max must be >= 0 (got {errors_max})")
    cdef ArmCsvLoad* load = NULL
    cdef ArmCsvCounts counts
    cdef const ArmCsvError* errors
    cdef uint64_t i
    cdef size_t start = 0, end = 0
    cdef Py_ssize_t bad = -1
    cdef IdRef ref
    if table != NULL:
        start = arm_table_rows(table)
    _raise_on_status(arm_csv_begin(table, <size_t>errors_max if table != NULL else 0, &load))
    try:
        status = _feed_file(load, source)
        arm_csv_counts(load, &counts)
        if status == kArmCsvEmpty or status == kArmCsvBadHeader:
            raise _header_error(source, where, status)
        if table == NULL:
            _raise_on_status(status)
            return counts.rows, counts.id_bytes
        _raise_on_status(status, f"{where}: line {counts.failed_line}")
        # The id rule, on the rows this file added: the parser checks only that an id is non-empty UTF-8.
        end = arm_table_rows(table)
        with nogil:
            bad = _next_bad_row(table, start, end)
        if counts.problems == 0 and bad < 0:
            return counts.rows, counts.id_bytes
        errors = arm_csv_errors(load)
        problems = [(errors[i].line, _csv_problem(&errors[i])) for i in range(counts.reported)]
        total = counts.problems
        if bad >= 0:
            bad_ids = {}
            while bad >= 0:
                ref = arm_id_at(table, <size_t>bad)
                bad_ids[decode_utf8(ref.data, <Py_ssize_t>ref.size, "strict")] = None
                with nogil:
                    bad = _next_bad_row(table, <size_t>bad + 1, end)
            total += len(bad_ids)
            problems += _id_rule_problems(source, bad_ids)
            problems.sort(key=lambda p: p[0])
        shown = [text for _, text in problems[:errors_max]]
        more = total - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise ValueError(f"{where}: {total} bad rows:\n  " + "\n  ".join(shown) + tail)
    finally:
        arm_csv_destroy(load)


def read_catalogue(source, where, errors_max=20):
    """The rows of an ``entity_id,alpha,beta`` catalogue CSV, read and checked as ``ArmTable.load_csv`` reads
    and checks them (one parser, one set of messages), for tables other than the arm table.

    Args:
        source: A path, or a seekable binary file (it is read twice: once to size, once to load).
        where: What the messages call the file.
        errors_max: How many bad rows the report lists (all are counted).

    Returns:
        ``(ids, alpha, beta)``: the ids in file order and two float64 arrays aligned with them.

    Raises:
        OSError: If the file cannot be read.
        ValueError: Listing the bad rows, or if the file is empty or its header lacks a column.
    """
    rows, id_bytes = _load_csv(NULL, source, where, 0)
    buffer = mmap.mmap(-1, ArmTable.bytes_needed(rows, id_bytes))
    cdef ArmTable table = ArmTable.create(buffer, rows, id_bytes)
    _load_csv(table.table, source, where, errors_max)
    cdef size_t n = arm_table_rows(table.table), row
    cdef IdRef ref
    cdef list ids = []
    for row in range(n):
        ref = arm_id_at(table.table, row)
        ids.append(decode_utf8(ref.data, <Py_ssize_t>ref.size, "strict"))
    records = table.records()
    return ids, np.array(records["alpha0"]), np.array(records["beta0"])



def unnamed(rows, list ids):
    """The ids whose row is -1 (the table holds none for them), in order, in UTF-8 with a NUL between two (ids hold
    no control character); b"" when every id has a row. The decision log names these in its record and the others
    by row: one pass here instead of numpy's three calls (a mask, its nonzero, a list) and a list comprehension.

    Args:
        rows: The rows ``gather`` returned for ``ids`` (int32, -1 where the table has none).
        ids: The ids, as given to ``gather``.

    Raises:
        ValueError: If ``rows`` is not one-dimensional with one row per id.
    """
    cdef cnp.ndarray r = np.ascontiguousarray(rows, dtype=np.int32)
    cdef Py_ssize_t n = list_size(ids), i
    if r.ndim != 1 or r.shape[0] != n:
        raise ValueError(f"rows must be one-dimensional with one row per id (got shape {(<object>r).shape} "
                         f"for {n} ids)")
    cdef const int32_t* pr = <const int32_t*>cnp.PyArray_DATA(r)
    cdef list named = None
    for i in range(n):
        if pr[i] < 0:
            if named is None:
                named = []
            named.append(<object>list_item(ids, i))
    if named is None:
        return b""
    return "\0".join(named).encode()


def narrowed(alpha, beta):
    """``alpha`` and ``beta`` as float32, the rows of one (2, n) array, when every value is exactly a float32 (widening
    then gives each back bit for bit), else None. Posteriors are often whole numbers (integer priors plus counts,
    without a half-life): the decision log then writes half the bytes for them and a replay still draws exactly.

    Args:
        alpha, beta: Contiguous one-dimensional float64 arrays of one length.

    Raises:
        ValueError: If they are not.
    """
    cdef cnp.ndarray a = alpha, b = beta
    if (cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT64 or cnp.PyArray_TYPE(b) != cnp.NPY_FLOAT64 or a.ndim != 1
            or b.ndim != 1 or a.shape[0] != b.shape[0] or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or not cnp.PyArray_IS_C_CONTIGUOUS(b)):
        raise ValueError("alpha and beta must be contiguous one-dimensional float64 arrays of one length")
    cdef Py_ssize_t n = a.shape[0], i
    cdef const double* pa = <const double*>cnp.PyArray_DATA(a)
    cdef const double* pb = <const double*>cnp.PyArray_DATA(b)
    if n and not (_fits_float(pa[0]) and _fits_float(pb[0])):
        return None  # the common way out for fractional posteriors: before allocating anything
    cdef cnp.ndarray out = np.empty((2, n), dtype=np.float32)
    cdef float* po = <float*>cnp.PyArray_DATA(out)
    for i in range(n):
        if not (_fits_float(pa[i]) and _fits_float(pb[i])):
            return None
        po[i] = <float>pa[i]
        po[n + i] = <float>pb[i]
    return out


cdef inline bint _fits_float(double x) noexcept nogil:
    """Whether ``x`` is exactly a float32: within its range first (converting past it is undefined), and NaN never."""
    return -FLT_MAX <= x <= FLT_MAX and <double><float>x == x

def first_seen(list arrays, cnp.ndarray seen):
    """The rows in ``arrays`` that ``seen`` does not mark yet, each once, in order of first appearance; marks them
    (rows -1 are skipped). The decision log's writer names each row once per file with it: one pass over a write's
    rows, where numpy takes five passes (join, mask, gather, invert, compress) and a sort.

    Args:
        arrays: int32 arrays of rows, as ``gather`` returns them.
        seen: One bool per row of the table, contiguous and writable; marked in place.

    Raises:
        ValueError: If ``seen`` or an array is not as above, or a row is past the end of ``seen``.
    """
    if seen.dtype != np.bool_ or seen.ndim != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(seen) or not seen.flags.writeable:
        raise ValueError("seen must be a contiguous, writable, one-dimensional bool array")
    cdef Py_ssize_t size = seen.shape[0], i
    cdef char* marks = <char*>cnp.PyArray_DATA(seen)
    cdef cnp.ndarray a
    cdef const int32_t* pr
    cdef int32_t row
    cdef list fresh = []
    for item in arrays:
        a = item
        if cnp.PyArray_TYPE(a) != cnp.NPY_INT32 or a.ndim != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(a):
            raise ValueError(f"rows must be contiguous one-dimensional int32 arrays (got {a.dtype}, shape {(<object>a).shape})")
        pr = <const int32_t*>cnp.PyArray_DATA(a)
        for i in range(a.shape[0]):
            row = pr[i]
            if row < 0:
                continue
            if row >= size:
                raise ValueError(f"row {row} is past the end of seen ({size} rows)")
            if marks[row]:
                continue
            marks[row] = 1
            fresh.append(row)
    return fresh

cdef class ArmTable:
    """Every arm's catalogue prior and running counts, in a buffer that several processes can share.

    Make one with ``ArmTable.create`` on a zeroed buffer of ``ArmTable.bytes_needed(...)`` bytes, and open
    it elsewhere (another process mapping the same file) with ``ArmTable.attach``. Rows are never deleted
    and the table never grows; when it is full, inserts fail (and say so) while lookups go on.
    """

    def __cinit__(self):
        self.table = NULL
        self.has_view = False

    def __init__(self):
        raise TypeError("use ArmTable.create(buffer, capacity, id_bytes) or ArmTable.attach(buffer)")

    def __dealloc__(self):
        if self.has_view:
            PyBuffer_Release(&self.view)

    cdef int _export(self, object buffer) except -1:
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE)
        self.has_view = True
        self.buffer = buffer
        if <uintptr_t>self.view.buf % 64 != 0:
            raise ValueError("buffer must start on a 64-byte boundary (an mmap does)")
        return 0

    @staticmethod
    def bytes_needed(capacity, id_bytes, segment_rows=0):
        """Bytes a table of ``capacity`` rows (``segment_rows`` of them for segment keys) and ``id_bytes`` bytes for
        ids needs.

        Ids of up to 8 UTF-8 bytes live in their row; only longer ones use the ``id_bytes``.

        Raises:
            ValueError: If capacity or id_bytes is negative, or capacity is above 2**30.
        """
        if capacity < 0 or id_bytes < 0:
            raise ValueError(f"capacity and id_bytes must be >= 0 (got {capacity} and {id_bytes})")
        if not 0 <= segment_rows <= capacity:
            raise ValueError(f"segment_rows must be in [0, capacity] (got {segment_rows})")
        cdef size_t need = arm_table_bytes(<size_t>capacity, <size_t>id_bytes, <size_t>segment_rows)
        if need == 0:
            raise ValueError(f"capacity must be at most {kArmMaxRows} rows (got {capacity})")
        return need

    @staticmethod
    def create(buffer, capacity, id_bytes, segment_rows=0, segment_id_bytes=0, half_life_s=0.0, landmark=None):
        """A new, empty table in ``buffer``, which must be writable, zeroed, 64-byte aligned (an ``mmap`` of a
        new file is all three) and at least ``bytes_needed(capacity, id_bytes, segment_rows)`` long. Draws the hash key
        every process attached to the table will use.

        Args:
            segment_rows: Of ``capacity``, the rows segment keys may take (and arms may not).
            segment_id_bytes: Of ``id_bytes``, the bytes segment keys may take (and arms may not).
            half_life_s: The counts' half-life; 0 for counts that never decay.
            landmark: The decay's first landmark (unix time; default now).

        Raises:
            ValueError: If the buffer is too small or misaligned, or a size is out of range.
            TypeError, BufferError: If ``buffer`` does not export a writable buffer.
        """
        if not 0 <= segment_rows <= capacity or not 0 <= segment_id_bytes <= id_bytes:
            raise ValueError(f"segment_rows and segment_id_bytes must be in [0, capacity] and [0, id_bytes] (got "
                             f"{segment_rows} and {segment_id_bytes})")
        cdef double half_life = half_life_s
        if not (half_life >= 0.0 and half_life < INFINITY):
            raise ValueError(f"half_life_s must be finite and >= 0 (got {half_life_s!r})")
        cdef double mark = time.time() if landmark is None else landmark
        cdef size_t need = ArmTable.bytes_needed(capacity, id_bytes, segment_rows)
        cdef ArmTable self = ArmTable.__new__(ArmTable)
        self._export(buffer)
        if <size_t>self.view.len < need:
            raise ValueError(f"buffer must hold at least {need} bytes (got {self.view.len})")
        _raise_on_status(arm_table_create(self.view.buf, <size_t>self.view.len, <size_t>capacity,
                                          <size_t>id_bytes, <size_t>segment_rows, <size_t>segment_id_bytes,
                                          half_life, mark, &self.table))
        return self

    @staticmethod
    def attach(buffer):
        """The table that ``create`` made in ``buffer`` (perhaps in another process, over the same file).

        Raises:
            ValueError: If the buffer does not start with a table of this layout version, or is shorter
                than the table's header says.
            TypeError, BufferError: If ``buffer`` does not export a writable buffer.
        """
        cdef ArmTable self = ArmTable.__new__(ArmTable)
        self._export(buffer)
        _raise_on_status(arm_table_attach(self.view.buf, <size_t>self.view.len, &self.table))
        return self

    cdef int _check(self) except -1:
        if self.table == NULL:
            raise ValueError("this ArmTable was not made by create() or attach()")
        return 0

    def __len__(self):
        """Rows taken: arms plus rows_wasted (rows that lost a race to publish an id)."""
        self._check()
        return arm_table_rows(self.table)

    def __repr__(self):
        if self.table == NULL:
            return "ArmTable(<unbound>)"
        return f"ArmTable(<{arm_table_rows(self.table)} of {arm_table_capacity(self.table)} rows>)"

    @property
    def capacity(self):
        """Rows the table can hold."""
        self._check()
        return arm_table_capacity(self.table)

    @property
    def id_bytes(self):
        """Bytes the table has for ids longer than 8 bytes (``id_bytes`` of create, rounded up to 64)."""
        self._check()
        return arm_table_id_bytes(self.table)

    @property
    def id_bytes_used(self):
        """Of ``id_bytes``, how many are taken."""
        self._check()
        return arm_table_arena_used(self.table)

    @property
    def memory_bytes(self):
        """Bytes of the buffer the table spans: header, hash slots, rows and id bytes."""
        self._check()
        return arm_table_memory_bytes(self.table)

    @property
    def rows_wasted(self):
        """Rows given up because another process published the same id first (one per lost race)."""
        self._check()
        return arm_table_rows_wasted(self.table)

    @property
    def segment_rows(self):
        """Of ``capacity``, the rows kept for segment keys."""
        self._check()
        return arm_table_segment_rows(self.table)

    @property
    def segment_rows_used(self):
        """Of ``segment_rows``, how many are taken."""
        self._check()
        return arm_table_segment_rows_used(self.table)

    @property
    def half_life_s(self):
        """The counts' half-life in seconds; 0 when they do not decay."""
        self._check()
        return arm_table_half_life(self.table)

    @property
    def landmark(self):
        """The landmark of the decay's current epoch (unix time)."""
        self._check()
        return arm_table_landmark(self.table)

    def rebase(self, now=None):
        """Move the decay's landmark on if ``now`` is half an epoch past it (``EPOCH_HALF_LIVES`` half-lives),
        rescaling every count; True if it moved. Safe at any time, from any process."""
        self._check()
        cdef double t = time.time() if now is None else now
        cdef int moved
        with nogil:
            moved = arm_table_rebase(self.table, t)
        return moved == 1

    def load(self, ids, alpha0, beta0):
        """Appends catalogue rows: ``ids[i]`` with prior ``(alpha0[i], beta0[i])``.

        For loading at start, before the table serves: on an error the rows before the bad one stay.

        Raises:
            TypeError: If ``ids`` is not a sequence of str.
            ValueError: If an id is already in the table or repeats (naming both positions), a parameter
                is not finite and > 0 (naming its index), the lengths differ, or the table is full.
        """
        self._check()
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"ids must be a sequence of str (got {type(ids).__name__})")
        # Our own list: nobody else can drop its items while the rows are loaded without the GIL.
        cdef list own = list(ids)
        cdef Py_ssize_t n = len(own)
        cdef cnp.ndarray a = parameters(alpha0, "alpha0", "index")
        cdef cnp.ndarray b = parameters(beta0, "beta0", "index")
        if a.shape[0] != n or b.shape[0] != n:
            raise ValueError(
                f"ids, alpha0 and beta0 must have the same length (got {n}, {a.shape[0]} and {b.shape[0]})"
            )
        cdef IdRef* refs = <IdRef*>PyMem_Malloc(<size_t>max(n, 1) * sizeof(IdRef))
        if refs == NULL:
            raise MemoryError()
        cdef size_t start = arm_table_rows(self.table)
        cdef size_t done = 0
        cdef int64_t dup = -1
        cdef int status = kArmOk
        cdef const double* pa = <const double*>cnp.PyArray_DATA(a)
        cdef const double* pb = <const double*>cnp.PyArray_DATA(b)
        try:
            id_views(own, n, refs, "ids")
            with nogil:
                status = arm_table_load(self.table, refs, pa, pb, <size_t>n, &done, &dup)
        finally:
            PyMem_Free(refs)
        if status == kArmDuplicate:
            if dup >= <int64_t>start:
                raise ValueError(f"duplicate id {own[done]!r} at positions {dup - <int64_t>start} and {done}")
            raise ValueError(f"id {own[done]!r} at position {done} is already in the table (row {dup})")
        _raise_on_status(status, f"ids[{done}]")

    def load_csv(self, path, errors_max=20):
        """Appends the catalogue rows of an ``entity_id,alpha,beta`` CSV file, parsed in C++ in blocks.

        The header names the three columns in any order; other columns are ignored, blank lines skipped,
        fields may be double-quoted with ``""`` for a quote. Every bad row is reported with its line
        number (the one loader of catalogue files; ``read_catalogue`` gives its rows to other tables): an
        empty id, an id that breaks the id rule (``mab_service.ids``), an id seen before (naming the first
        line), alpha or beta not a finite number > 0, too few fields. Ids and numbers are stripped of ASCII
        whitespace; numbers with digit separators ("1_000") count as bad.

        For loading at start, before the table serves: on an error the table keeps the good rows read so
        far (discard it).

        Args:
            path: The file.
            errors_max: How many bad rows the report lists (all are counted).

        Returns:
            The number of rows loaded.

        Raises:
            OSError: If the file cannot be read.
            ValueError: Listing the bad rows, or if the header lacks a column or the table is full.
        """
        self._check()
        return _load_csv(self.table, path, f"{path}", errors_max)[0]

    @staticmethod
    def csv_rows_upper_bound(path):
        """From one quick pass over a catalogue CSV, upper bounds on the rows ``load_csv`` would load and on
        the bytes its ids need (so that the caller can size the table first).

        Returns:
            ``(rows, id_bytes)``.

        Raises:
            OSError: If the file cannot be read.
            ValueError: If the file is empty or its header lacks a column.
        """
        return _load_csv(NULL, path, f"{path}", 0)

    def gather(self, ids, prior_alpha, prior_beta, now=None):
        """The posterior of every id, with the prior for ids the table does not hold.

        For a row, alpha = alpha0 + rewards and beta = beta0 + max(impressions - rewards, 0), counts as read at
        ``now`` (default: the time of the call).

        Args:
            ids: Candidate ids; duplicates are looked up each time.
            prior_alpha: Finite and > 0.
            prior_beta: Finite and > 0.

        Returns:
            ``(alpha, beta, known, rows)``: float64 arrays aligned with ``ids``, how many ids were found, and
            an int32 array of their rows (-1 for ids not in the table).

        Raises:
            TypeError: If ``ids`` is not a list or an item is not a str.
            ValueError: If a prior is not finite and > 0, or an id holds a lone surrogate.
        """
        if not isinstance(ids, list):
            raise TypeError(f"ids must be a list (got {type(ids).__name__})")
        self._check()
        cdef double pa = positive(prior_alpha, "prior_alpha")
        cdef double pb = positive(prior_beta, "prior_beta")
        cdef double t = _now(self.table, now)
        cdef Py_ssize_t n = list_size(ids)
        cdef cnp.ndarray alpha = empty(n, cnp.NPY_FLOAT64)
        cdef cnp.ndarray beta = empty(n, cnp.NPY_FLOAT64)
        cdef cnp.ndarray rows = empty(n, cnp.NPY_INT32)
        cdef IdRef on_stack[STACK_IDS]
        cdef IdRef* refs = <IdRef*>scratch(on_stack, n, sizeof(IdRef))
        cdef size_t known = 0
        try:
            id_views(ids, n, refs, "candidates")
            arm_gather_fill(self.table, refs, <size_t>n, pa, pb, t, <double*>cnp.PyArray_DATA(alpha),
                            <double*>cnp.PyArray_DATA(beta), <int32_t*>cnp.PyArray_DATA(rows), &known)
        finally:
            free_scratch(refs, on_stack)
        return alpha, beta, known, rows

    def gather_segment(self, ids, segment, weight, prior_alpha, prior_beta, now=None):
        """The posterior of every id within ``segment``, backed off to its global posterior, in one batched
        lookup of the arms' rows and their segment keys' rows.

        With mu the mean of the id's global posterior (as ``gather`` gives it) and n_sa, r_sa the counts of the id
        within the segment (0 if none), alpha = weight * mu + r_sa and beta = weight * (1 - mu) + max(n_sa - r_sa,
        0): a segment starts at the global estimate, worth ``weight`` impressions, and moves with its own data.

        Args:
            ids: Candidate ids.
            segment: The segment (the caller checked it against the id rule).
            weight: Pseudo-impressions of the global mean; finite and > 0.
            prior_alpha, prior_beta: The prior of ids the table does not hold; finite and > 0.
            now: When the counts are read (default: the time of the call).

        Returns:
            ``(alpha, beta, known, rows, pair_rows)``: as ``gather``, and the rows of the segment keys (int32, -1
            where absent) for ``add_impressions(..., segment=...)``.

        Raises:
            TypeError: If ``ids`` is not a list or an item or the segment is not a str.
            ValueError: If a prior or the weight is not finite and > 0, or an id holds a lone surrogate.
        """
        if not isinstance(ids, list):
            raise TypeError(f"ids must be a list (got {type(ids).__name__})")
        self._check()
        cdef double pa = positive(prior_alpha, "prior_alpha")
        cdef double pb = positive(prior_beta, "prior_beta")
        cdef double m = positive(weight, "weight")
        cdef double t = _now(self.table, now)
        cdef IdRef seg
        id_view(<PyObject*>segment, &seg, "segment", -1)
        cdef Py_ssize_t n = list_size(ids)
        cdef cnp.ndarray alpha = empty(n, cnp.NPY_FLOAT64)
        cdef cnp.ndarray beta = empty(n, cnp.NPY_FLOAT64)
        cdef cnp.ndarray rows = empty(n, cnp.NPY_INT32)
        cdef cnp.ndarray pair_rows = empty(n, cnp.NPY_INT32)
        cdef IdRef on_stack[2 * STACK_IDS]
        cdef double counts_on_stack[2 * STACK_IDS]
        cdef char keys_on_stack[64 * STACK_IDS]
        cdef IdRef* refs = NULL
        cdef double* counts = NULL
        cdef char* key_bytes = NULL
        cdef size_t need
        cdef size_t known = 0
        try:
            # Arms and keys side by side: the stack holds both for up to STACK_IDS candidates.
            refs = &on_stack[0] if n <= STACK_IDS else <IdRef*>_heap(2 * n * sizeof(IdRef))
            counts = &counts_on_stack[0] if n <= STACK_IDS else <double*>_heap(2 * n * sizeof(double))
            id_views(ids, n, refs, "candidates")
            need = segment_keys_bytes(seg, refs, <size_t>n)
            key_bytes = &keys_on_stack[0] if need <= sizeof(keys_on_stack) else <char*>_heap(need)
            segment_keys_fill(seg, refs, <size_t>n, key_bytes, refs + n)
            arm_gather_segment_fill(self.table, refs, refs + n, <size_t>n, m, pa, pb, t,
                                    <double*>cnp.PyArray_DATA(alpha), <double*>cnp.PyArray_DATA(beta),
                                    <int32_t*>cnp.PyArray_DATA(rows), <int32_t*>cnp.PyArray_DATA(pair_rows), counts,
                                    &known)
        finally:
            free_scratch(refs, on_stack)
            free_scratch(counts, counts_on_stack)
            free_scratch(key_bytes, keys_on_stack)
        return alpha, beta, known, rows, pair_rows

    def add_impressions(self, ids, rows, picks, prior_alpha, prior_beta, now=None, segment=None):
        """Counts one impression made at ``now`` for each picked id; ids not in the table yet are inserted with the
        prior.

        Args:
            ids: The candidates, as given to ``gather``.
            rows: The rows ``gather`` returned for them (a row is trusted to hold its id); with ``segment``, the
                ``pair_rows`` of ``gather_segment``.
            picks: Positions in ``ids`` of the arms shown.
            prior_alpha: alpha0 of inserted arms; finite and > 0.
            prior_beta: beta0 of inserted arms; finite and > 0.
            now: When the impressions were made (default: the time of the call).
            segment: None to count the arms, or a segment to count the arms' keys within it (segment rows, in
                the segments' budget).

        Returns:
            How many picks were not recorded because the table (or its segment budget) was full.

        Raises:
            TypeError: If ``ids`` is not a list or a picked item is not a str.
            ValueError: If a prior is bad, the lengths differ, or a pick or row is out of range.
        """
        if not isinstance(ids, list):
            raise TypeError(f"ids must be a list (got {type(ids).__name__})")
        self._check()
        cdef double pa = positive(prior_alpha, "prior_alpha")
        cdef double pb = positive(prior_beta, "prior_beta")
        cdef double t = _now(self.table, now)
        cdef IdRef seg
        if segment is not None:
            id_view(<PyObject*>segment, &seg, "segment", -1)
        cdef cnp.ndarray r = np.ascontiguousarray(rows, dtype=np.int32)
        cdef cnp.ndarray p = np.ascontiguousarray(picks, dtype=np.intp)
        cdef Py_ssize_t n = list_size(ids)
        if r.ndim != 1 or r.shape[0] != n:
            raise ValueError(f"rows must be one-dimensional with one row per id (got shape {(<object>r).shape} "
                             f"for {n} ids)")
        if p.ndim != 1:
            raise ValueError(f"picks must be one-dimensional (got shape {(<object>p).shape})")
        cdef const int32_t* pr = <const int32_t*>cnp.PyArray_DATA(r)
        cdef const intptr_t* pp = <const intptr_t*>cnp.PyArray_DATA(p)
        cdef Py_ssize_t n_picks = p.shape[0], k, m = 0
        cdef int64_t taken = <int64_t>arm_table_rows(self.table)
        cdef IdRef on_stack[STACK_IDS]
        cdef IdRef* refs = <IdRef*>scratch(on_stack, n_picks, sizeof(IdRef))
        cdef char keys_on_stack[64 * STACK_IDS]
        cdef char* key_bytes = NULL
        cdef size_t failed = 0
        cdef size_t need
        try:
            for k in range(n_picks):
                if not 0 <= pp[k] < n:
                    raise ValueError(f"picks[{k}] must be in [0, {n}) (got {pp[k]})")
                if pr[pp[k]] < 0:
                    if pr[pp[k]] != -1:
                        raise ValueError(f"rows[{pp[k]}] must be -1 or a row (got {pr[pp[k]]})")
                    id_view(list_item(ids, pp[k]), &refs[m], "ids", pp[k])
                    m += 1
                elif pr[pp[k]] >= taken:
                    raise ValueError(f"rows[{pp[k]}] must be below {taken} (got {pr[pp[k]]})")
            if segment is not None and m:
                # The keys of the ids to insert, in place of the ids.
                need = segment_keys_bytes(seg, refs, <size_t>m)
                key_bytes = &keys_on_stack[0] if need <= sizeof(keys_on_stack) else <char*>_heap(need)
                segment_keys_fill(seg, refs, <size_t>m, key_bytes, refs)
            arm_add_impressions(self.table, refs, pr, pp, <size_t>n_picks, pa, pb, kArmRuntime, t, &failed)
        finally:
            free_scratch(refs, on_stack)
            free_scratch(key_bytes, keys_on_stack)
        return failed

    def add(self, id, impressions, rewards, prior_alpha, prior_beta, now=None):
        """Adds impressions and rewards made at ``now`` to one row, inserting it with the prior if it is not in the
        table.

        Used for rewards as they arrive and to replay a log at start (with the weighted sums of its records, as
        of the landmark, for ``now``).

        A segment key (``mab_service.ids.segment_key``, ``pair_key``) is inserted in the segments' budget.

        Returns:
            False if the row is not in the table and the table is full (nothing is added), else True.

        Raises:
            TypeError: If ``id`` is not a str.
            ValueError: If impressions or rewards is not finite and >= 0, or a prior is bad.
        """
        self._check()
        cdef IdRef ref
        id_view(<PyObject*>id, &ref, "id", -1)
        cdef double count = impressions
        cdef double amount = rewards
        if not count >= 0.0:
            raise ValueError(f"impressions must be >= 0 (got {impressions!r})")
        if count == INFINITY:
            raise ValueError("impressions must be finite (got inf)")
        if not (amount >= 0.0 and amount < INFINITY):
            raise ValueError(f"rewards must be finite and >= 0 (got {amount!r})")
        cdef double pa = positive(prior_alpha, "prior_alpha")
        cdef double pb = positive(prior_beta, "prior_beta")
        cdef double t = _now(self.table, now)
        cdef int64_t row = -1
        if arm_find_or_insert(self.table, ref, pa, pb, kArmRuntime, &row) != kArmOk:
            return False
        arm_add_counts(self.table, <size_t>row, count, amount, t)
        return True

    def find_or_insert(self, id, prior_alpha, prior_beta):
        """The row of one id, inserting it with the prior if the table does not hold it (a segment key in the
        segments' budget); -1 if it cannot be inserted (the table or the budget is full).

        Raises:
            TypeError: If ``id`` is not a str.
            ValueError: If a prior is bad.
        """
        self._check()
        cdef IdRef ref
        id_view(<PyObject*>id, &ref, "id", -1)
        cdef double pa = positive(prior_alpha, "prior_alpha")
        cdef double pb = positive(prior_beta, "prior_beta")
        cdef int64_t row = -1
        arm_find_or_insert(self.table, ref, pa, pb, kArmRuntime, &row)
        return row

    def raise_counts(self, ids, impressions, rewards, prior_alpha, prior_beta):
        """Raises each id's counts to at least the given ones (an atomic max per count), inserting ids the table does
        not hold with the prior.

        For absolute counts read from a store where they only grow (the fleet's Bigtable table): the larger reading
        is the newer, so readings may be applied in any order and any number of times.

        Args:
            ids: The arms, distinct or not (a repeated id keeps its largest counts).
            impressions: One count per id, integers >= 0.
            rewards: One reward sum per id, finite and >= 0.
            prior_alpha: alpha0 of inserted arms; finite and > 0.
            prior_beta: beta0 of inserted arms; finite and > 0.

        Returns:
            How many ids were not recorded because the table was full.

        Raises:
            TypeError: If ``ids`` is not a list or an item is not a str.
            ValueError: If a prior is bad, the lengths differ, or a count is negative or not finite.
        """
        if not isinstance(ids, list):
            raise TypeError(f"ids must be a list (got {type(ids).__name__})")
        self._check()
        cdef double pa = positive(prior_alpha, "prior_alpha")
        cdef double pb = positive(prior_beta, "prior_beta")
        cdef cnp.ndarray shown = np.ascontiguousarray(impressions, dtype=np.int64)
        cdef cnp.ndarray got = np.ascontiguousarray(rewards, dtype=np.float64)
        cdef Py_ssize_t n = list_size(ids), i
        if shown.ndim != 1 or shown.shape[0] != n or got.ndim != 1 or got.shape[0] != n:
            raise ValueError(f"impressions and rewards must be one-dimensional with one value per id (got shapes "
                             f"{(<object>shown).shape} and {(<object>got).shape} for {n} ids)")
        if n and ((<object>shown).min() < 0 or not np.all(((<object>got) >= 0.0) & ((<object>got) < np.inf))):
            raise ValueError("impressions must be >= 0 and rewards finite and >= 0")
        cdef const uint64_t* ps = <const uint64_t*>cnp.PyArray_DATA(shown)
        cdef const double* pg = <const double*>cnp.PyArray_DATA(got)
        cdef IdRef on_stack[STACK_IDS]
        cdef IdRef* refs = <IdRef*>scratch(on_stack, n, sizeof(IdRef))
        cdef size_t failed = 0
        try:
            id_views(ids, n, refs, "ids")
            arm_raise_counts(self.table, refs, ps, pg, <size_t>n, pa, pb, &failed)
        finally:
            free_scratch(refs, on_stack)
        return failed

    def raise_decayed(self, ids, impressions, rewards, landmarks, prior_alpha, prior_beta):
        """Raises each id's counts to at least the given forward-decayed sums (an atomic max per count, in the count's
        own frame), inserting ids the table does not hold with the prior. For a table with a half-life.

        For the fleet's decayed sums (``fleet.schema``): impressions[i] and rewards[i] are sums of weights
        2 ** ((t - landmarks[i]) / H); they only grow, so readings may be applied in any order and more than once.

        Args:
            ids: The arms, distinct or not.
            impressions, rewards: One sum per id, finite and >= 0.
            landmarks: The landmark (unix time) each id's sums are relative to; finite.
            prior_alpha, prior_beta: The prior of inserted arms; finite and > 0.

        Returns:
            How many ids were not recorded because the table was full.

        Raises:
            TypeError: If ``ids`` is not a list or an item is not a str.
            ValueError: If the table has no half-life, a prior is bad, the lengths differ, or a sum is negative or
                not finite, or a landmark not finite.
        """
        if not isinstance(ids, list):
            raise TypeError(f"ids must be a list (got {type(ids).__name__})")
        self._check()
        if not arm_table_half_life(self.table) > 0.0:
            raise ValueError("raise_decayed needs a table with a half-life (raise_counts is for one without)")
        cdef double pa = positive(prior_alpha, "prior_alpha")
        cdef double pb = positive(prior_beta, "prior_beta")
        cdef cnp.ndarray shown = np.ascontiguousarray(impressions, dtype=np.float64)
        cdef cnp.ndarray got = np.ascontiguousarray(rewards, dtype=np.float64)
        cdef cnp.ndarray marks = np.ascontiguousarray(landmarks, dtype=np.float64)
        cdef Py_ssize_t n = list_size(ids)
        if not all(a.ndim == 1 and a.shape[0] == n for a in (shown, got, marks)):
            raise ValueError(f"impressions, rewards and landmarks must be one-dimensional with one value per id (got "
                             f"shapes {(<object>shown).shape}, {(<object>got).shape} and {(<object>marks).shape} for "
                             f"{n} ids)")
        if n and not (np.all(((<object>shown) >= 0.0) & ((<object>shown) < np.inf))
                      and np.all(((<object>got) >= 0.0) & ((<object>got) < np.inf))
                      and np.all(np.isfinite(<object>marks))):
            raise ValueError("impressions and rewards must be finite and >= 0, landmarks finite")
        cdef IdRef on_stack[STACK_IDS]
        cdef IdRef* refs = <IdRef*>scratch(on_stack, n, sizeof(IdRef))
        cdef size_t failed = 0
        try:
            id_views(ids, n, refs, "ids")
            arm_raise_decayed(self.table, refs, <const double*>cnp.PyArray_DATA(shown),
                              <const double*>cnp.PyArray_DATA(got), <const double*>cnp.PyArray_DATA(marks),
                              <size_t>n, pa, pb, &failed)
        finally:
            free_scratch(refs, on_stack)
        return failed

    def get(self, id, now=None):
        """``(alpha0, beta0, impressions, rewards, from_catalogue)`` of one row, counts as read at ``now`` (default:
        the time of the call), or None if the table does not hold it.

        Raises:
            TypeError: If ``id`` is not a str.
        """
        self._check()
        cdef IdRef ref
        id_view(<PyObject*>id, &ref, "id", -1)
        cdef double t = _now(self.table, now)
        cdef int64_t row = arm_find(self.table, ref)
        if row < 0:
            return None
        cdef const ArmRecord* r = &arm_table_records(self.table)[row]
        # The counts may change under us (aligned 8-byte reads are whole); any recent value will do.
        cdef double shown, got
        arm_read_counts(self.table, <size_t>row, t, &shown, &got)
        return (r.alpha0, r.beta0, shown, got, (r.flags & kArmCatalogue) != 0)

    def counts(self, now=None):
        """``(impressions, rewards)`` of rows [0, len) as read at ``now`` (default: the time of the call): float64
        arrays aligned with ``records()``.
        """
        self._check()
        cdef double t = _now(self.table, now)
        cdef size_t rows = arm_table_rows(self.table)
        cdef cnp.ndarray shown = empty(<Py_ssize_t>rows, cnp.NPY_FLOAT64)
        cdef cnp.ndarray got = empty(<Py_ssize_t>rows, cnp.NPY_FLOAT64)
        with nogil:
            arm_counts_fill(self.table, rows, t, <double*>cnp.PyArray_DATA(shown), <double*>cnp.PyArray_DATA(got))
        return shown, got

    def records(self):
        """A read-only, zero-copy structured array over rows [0, len): fields ``hash``, ``alpha0``, ``beta0``,
        ``impressions``, ``rewards``, ``id_size`` and ``flags``.

        Rows whose flags hold neither FLAG_CATALOGUE nor FLAG_RUNTIME are not arms (lost races, or rows being
        written). The counts are live: they change as other processes add to them.
        """
        self._check()
        cdef Py_ssize_t offset = <char*>arm_table_records(self.table) - <char*>self.view.buf
        cdef Py_ssize_t rows = <Py_ssize_t>arm_table_rows(self.table)
        view = np.frombuffer(self.buffer, dtype=RECORD_DTYPE, count=rows, offset=offset)
        view.flags.writeable = False
        return view

    def names(self, rows):
        """The decision log's names of ``rows`` (decisions.py, magic ``MABR``, after its count and CRC): the rows as
        u32, their ids' lengths as u32, then the ids' UTF-8 bytes back to back. One pass in C: a new log file names
        every row its records use, up to the whole table.

        Raises:
            IndexError: If a row is not in [0, len).
            ValueError: If a row holds no arm.
        """
        self._check()
        cdef size_t taken = arm_table_rows(self.table)
        cdef Py_ssize_t m = len(rows), i, bytes_ = 0
        cdef cnp.ndarray r = np.asarray(rows, dtype=np.int64).reshape(-1)
        cdef const int64_t* pr = <const int64_t*>cnp.PyArray_DATA(r)
        cdef IdRef ref
        for i in range(m):
            if not 0 <= pr[i] < <int64_t>taken:
                raise IndexError(f"row must be in [0, {taken}) (got {pr[i]})")
            ref = arm_id_at(self.table, <size_t>pr[i])
            if ref.data == NULL:
                raise ValueError(f"row {pr[i]} holds no arm")
            bytes_ += <Py_ssize_t>ref.size
        cdef bytes out = PyBytes_FromStringAndSize(NULL, 8 * m + bytes_)
        cdef char* at = PyBytes_AS_STRING(out)
        cdef uint32_t* head = <uint32_t*>at
        at += 8 * m
        for i in range(m):
            ref = arm_id_at(self.table, <size_t>pr[i])
            head[i] = <uint32_t>pr[i]
            head[m + i] = <uint32_t>ref.size
            memcpy(at, ref.data, ref.size)
            at += ref.size
        return out

    def id_at(self, row):
        """The id of a row.

        Raises:
            IndexError: If ``row`` is not in [0, len).
            ValueError: If the row holds no arm (a lost race, or a row still being written).
        """
        self._check()
        cdef size_t rows = arm_table_rows(self.table)
        if not 0 <= row < rows:
            raise IndexError(f"row must be in [0, {rows}) (got {row})")
        cdef IdRef ref = arm_id_at(self.table, <size_t>row)
        if ref.data == NULL:
            raise ValueError(f"row {row} holds no arm")
        return decode_utf8(ref.data, <Py_ssize_t>ref.size, "strict")
