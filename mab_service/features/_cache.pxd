# The cache table's C++ API, declared once (csrc/mab/cache_table.hpp). Every function may run without the GIL,
# but the table is mutable: callers hold the GIL (or another lock) around every call.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from mab_service._cyutil cimport IdRef


cdef extern from "mab/cache_table.hpp" namespace "mab" nogil:
    const size_t kCacheInlineKey

    ctypedef struct CacheLookupCounts:
        size_t n_fresh
        size_t n_stale
        size_t n_miss
        size_t n_refresh
        size_t n_known

    cdef cppclass CTable "mab::CacheTable":
        pass

    int create_cache_table(size_t max_entries, CTable** out) noexcept
    void destroy_cache_table(CTable* table) noexcept
    size_t cache_table_size(const CTable* table) noexcept
    size_t cache_table_capacity(const CTable* table) noexcept
    size_t cache_table_memory_bytes(const CTable* table) noexcept
    size_t cache_table_entry_bytes() noexcept
    uint64_t cache_table_evictions(const CTable* table) noexcept
    int cache_lookup_fill(CTable* table, const IdRef* ids, size_t n, double now, double stale_s, double retry_s,
                          double prior_alpha, double prior_beta, double* alpha_out, double* beta_out,
                          uint32_t* miss_pos, uint32_t* refresh_pos, CacheLookupCounts* counts) noexcept
    int cache_insert(CTable* table, const IdRef* ids, const double* alpha, const double* beta,
                     const uint8_t* found, const double* expires_at, size_t n) noexcept
    void cache_clear(CTable* table) noexcept


cdef class CacheTable:
    # Owned; never NULL once __cinit__ returns. Mutable: every call holds the GIL.
    cdef CTable* table
