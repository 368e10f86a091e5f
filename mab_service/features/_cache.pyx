# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The Cython boundary of the feature cache's table (csrc/mab/cache_table.hpp).

Every call keeps the GIL: the table is mutable, and the GIL is what serialises the event loop's calls. A lookup
takes views of the ids' UTF-8 bytes (no copy), makes one C++ call for all of them and returns the parameters
plus, only when there are any, the positions that missed or are due for refresh, so that a request whose ids are
all cached runs no Python code per id.
"""
import numpy as np

cimport numpy as cnp
from libc.math cimport INFINITY
from libc.stdint cimport uint8_t, uint32_t

from mab_service._cyutil cimport STACK_IDS, empty, free_scratch, id_views, list_size, positive, scratch
from mab_service.features._index cimport kIdNoMemory, kIdOk, kIdTooMany, kMaxIds

cnp.import_array()


cdef int _raise_on_status(int status) except -1:
    # Status codes become Python exceptions here and only here.
    if status == kIdOk:
        return 0
    if status == kIdNoMemory:
        raise MemoryError("the cache table could not allocate memory")
    if status == kIdTooMany:
        raise ValueError(f"at most {kMaxIds} ids of at most 4 GiB each are supported")
    raise RuntimeError(f"the cache table returned unknown status {status}")


cdef double _non_negative(object value, str name) except? -1.0:
    cdef double x = value
    if not (x >= 0.0 and x < INFINITY):
        raise ValueError(f"{name} must be finite and >= 0 (got {x!r})")
    return x


cdef object _positions(const uint32_t* pos, size_t n):
    """An intp array of n positions, or None when there are none (the hot path allocates nothing)."""
    if n == 0:
        return None
    cdef cnp.npy_intp dims = <cnp.npy_intp>n
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &dims, cnp.NPY_INTP, 0)
    cdef cnp.npy_intp* p = <cnp.npy_intp*>cnp.PyArray_DATA(out)
    cdef size_t i
    for i in range(n):
        p[i] = pos[i]
    return out


cdef class CacheTable:
    """A bounded, mutable map from entity id to Beta parameters with expiry stamps, held in C++.

    An entry is positive (``alpha``, ``beta`` as stored) or negative (the store does not know the id: lookups
    give the prior). It is fresh until its ``expires_at``, then stale for ``stale_s`` more seconds (served, and
    reported for a background refresh once per ``retry_s``), then a miss. A full table evicts by CLOCK.

    Args:
        max_entries: The most ids the table holds, >= 1.

    Raises:
        ValueError: If ``max_entries`` is < 1 or too large.
        MemoryError: If the table cannot be allocated.
    """

    def __cinit__(self, max_entries):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1 (got {max_entries!r})")
        self.table = NULL
        _raise_on_status(create_cache_table(<size_t>max_entries, &self.table))

    def __dealloc__(self):
        if self.table != NULL:
            destroy_cache_table(self.table)

    def __len__(self):
        return cache_table_size(self.table)

    def __repr__(self):
        return f"CacheTable(<{cache_table_size(self.table)} of {cache_table_capacity(self.table)} ids>)"

    def lookup(self, list ids, now, stale_s, retry_s, prior_alpha, prior_beta):
        """The cached parameters of every id, the prior where the table has none.

        Args:
            ids: Candidate ids.
            now: The current time on the clock the expiry stamps use.
            stale_s: How long past expiry an entry is still served (>= 0).
            retry_s: How long a stale entry reported for refresh waits before it is reported again (>= 0).
            prior_alpha: Finite and > 0; given for misses and negative entries.
            prior_beta: Finite and > 0.

        Returns:
            ``(alpha, beta, known, stale, misses, refresh)``: float64 arrays aligned with ``ids``; how many ids
            were served from positive entries; how many from stale entries; the positions of ids that missed
            and of stale ids now due for refresh, as intp arrays, or None when there are none.

        Raises:
            TypeError: If an id is not a str.
            ValueError: If a time or prior is out of range, or an id holds a lone surrogate.
        """
        cdef double t = now
        cdef double s = _non_negative(stale_s, "stale_s")
        cdef double r = _non_negative(retry_s, "retry_s")
        cdef double pa = positive(prior_alpha, "prior_alpha")
        cdef double pb = positive(prior_beta, "prior_beta")
        cdef Py_ssize_t n = list_size(ids)
        cdef cnp.ndarray alpha = empty(n, cnp.NPY_FLOAT64)
        cdef cnp.ndarray beta = empty(n, cnp.NPY_FLOAT64)
        cdef IdRef refs_on_stack[STACK_IDS]
        cdef uint32_t miss_on_stack[STACK_IDS]
        cdef uint32_t refresh_on_stack[STACK_IDS]
        cdef IdRef* refs = NULL
        cdef uint32_t* miss = NULL
        cdef uint32_t* refresh = NULL
        cdef CacheLookupCounts c
        try:
            refs = <IdRef*>scratch(refs_on_stack, n, sizeof(IdRef))
            miss = <uint32_t*>scratch(miss_on_stack, n, sizeof(uint32_t))
            refresh = <uint32_t*>scratch(refresh_on_stack, n, sizeof(uint32_t))
            id_views(ids, n, refs, "ids")
            _raise_on_status(cache_lookup_fill(
                self.table, refs, <size_t>n, t, s, r, pa, pb,
                <double*>cnp.PyArray_DATA(alpha), <double*>cnp.PyArray_DATA(beta), miss, refresh, &c))
            return alpha, beta, c.n_known, c.n_stale, _positions(miss, c.n_miss), _positions(refresh, c.n_refresh)
        finally:
            free_scratch(refs, refs_on_stack)
            free_scratch(miss, miss_on_stack)
            free_scratch(refresh, refresh_on_stack)

    def insert(self, list ids, alpha, beta, found, expires_at):
        """Insert or overwrite entries: ``ids[i]`` -> ``(alpha[i], beta[i])``, fresh until ``expires_at[i]``.

        Args:
            ids: Entity ids; if one occurs twice, the last wins.
            alpha: float64 values, one per id (ignored where ``found`` is false).
            beta: float64 values, one per id.
            found: Booleans, one per id: false makes a negative entry.
            expires_at: float64 times, one per id, or one number for all.

        Raises:
            TypeError: If an id is not a str.
            ValueError: If the lengths differ, or an id holds a lone surrogate.
        """
        cdef Py_ssize_t n = list_size(ids)
        cdef cnp.ndarray a = np.ascontiguousarray(alpha, dtype=np.float64)
        cdef cnp.ndarray b = np.ascontiguousarray(beta, dtype=np.float64)
        cdef cnp.ndarray f = np.ascontiguousarray(found, dtype=np.uint8)
        cdef cnp.ndarray e = np.ascontiguousarray(np.broadcast_to(expires_at, (n,)), dtype=np.float64)
        if a.ndim != 1 or b.ndim != 1 or f.ndim != 1 or a.shape[0] != n or b.shape[0] != n or f.shape[0] != n:
            raise ValueError(
                f"ids, alpha, beta and found must be 1-D of one length (got {n}, {(<object>a).shape}, "
                f"{(<object>b).shape} and {(<object>f).shape})"
            )
        cdef IdRef on_stack[STACK_IDS]
        cdef IdRef* refs = <IdRef*>scratch(on_stack, n, sizeof(IdRef))
        try:
            id_views(ids, n, refs, "ids")
            _raise_on_status(cache_insert(
                self.table, refs, <const double*>cnp.PyArray_DATA(a), <const double*>cnp.PyArray_DATA(b),
                <const uint8_t*>cnp.PyArray_DATA(f), <const double*>cnp.PyArray_DATA(e), <size_t>n))
        finally:
            free_scratch(refs, on_stack)

    def clear(self):
        """Remove every entry."""
        cache_clear(self.table)

    @property
    def capacity(self):
        """The most ids the table holds."""
        return cache_table_capacity(self.table)

    @property
    def memory_bytes(self):
        """Bytes held by the C++ table: records, index slots and heap copies of long ids."""
        return cache_table_memory_bytes(self.table)

    @property
    def evictions(self):
        """Entries evicted to make room since the table was created."""
        return cache_table_evictions(self.table)

    @staticmethod
    def entry_bytes():
        """Bytes one entry costs at most, besides the heap copy of an id longer than ``inline_key_bytes``."""
        return cache_table_entry_bytes()

    @staticmethod
    def inline_key_bytes():
        """Ids of up to this many UTF-8 bytes are stored inside their entry."""
        return kCacheInlineKey
