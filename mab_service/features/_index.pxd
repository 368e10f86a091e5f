# The id table's C++ API, declared once (csrc/mab/id_index.hpp). Every function may run without the GIL.
from libc.stdint cimport int64_t, uint32_t, uint64_t

from mab_service._cyutil cimport IdRef


cdef extern from "mab/id_index.hpp" namespace "mab" nogil:
    enum IdStatus:
        kIdOk
        kIdNoMemory
        kIdDuplicate
        kIdTooMany

    const size_t kMaxIds
    const size_t kUniqueStackIds

    cdef cppclass IdTable:
        pass

    int build_id_table(const IdRef* ids, const double* alpha, const double* beta, size_t n, IdTable** out,
                       size_t* dup_first, size_t* dup_second) noexcept
    void destroy_id_table(IdTable* table) noexcept
    size_t id_table_size(const IdTable* table) noexcept
    size_t id_table_memory_bytes(const IdTable* table) noexcept
    int64_t find_row(const IdTable* table, IdRef id, double* alpha, double* beta) noexcept
    int gather_params_fill(const IdTable* table, const IdRef* ids, size_t n, double prior_alpha,
                           double prior_beta, double* alpha_out, double* beta_out, size_t* n_known) noexcept
    int unique_indices_fill(const IdRef* ids, size_t n, uint32_t* keep, size_t* n_keep) noexcept
    size_t first_bad_id(const IdRef* ids, size_t n, size_t max_bytes) noexcept
    uint64_t hash_id(IdRef id) noexcept


cdef class IdIndex:
    # Owned; NULL until __init__ succeeds. Immutable once built, so other Cython code may read it freely.
    cdef IdTable* table

