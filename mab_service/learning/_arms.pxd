# The arm table's C++ API, declared once (csrc/mab/arm_table.hpp). Every function may run without the GIL; the
# table is safe to share between threads and processes (its header comment says how).
from cpython.buffer cimport Py_buffer
from libc.stdint cimport int32_t, int64_t, intptr_t, uint32_t, uint64_t

from mab_service._cyutil cimport IdRef


cdef extern from "mab/arm_table.hpp" namespace "mab" nogil:
    enum ArmStatus:
        kArmOk
        kArmNoMemory
        kArmDuplicate
        kArmTooBig
        kArmRowsFull
        kArmArenaFull
        kArmBadLayout
        kArmCsvEmpty
        kArmCsvBadHeader

    enum ArmCsvProblem:
        kCsvTooFewFields
        kCsvEmptyId
        kCsvDuplicate
        kCsvBadAlpha
        kCsvBadBeta
        kCsvBadUtf8
        kCsvUnterminated

    const size_t kArmInlineId
    const size_t kArmMaxRows
    const double kArmEpochHalfLives
    const size_t kCsvErrorText
    const uint32_t kArmCatalogue
    const uint32_t kArmRuntime
    const uint32_t kArmWasted
    const uint32_t kArmSegment

    ctypedef struct ArmRecord:
        uint64_t hash
        double alpha0
        double beta0
        uint64_t impressions
        uint64_t rewards
        uint64_t id_offset
        uint32_t id_size
        uint32_t flags

    cdef cppclass CArmTable "mab::ArmTable":
        pass

    ctypedef struct ArmCsvError:
        int problem
        uint64_t line
        uint64_t count
        uint64_t expected
        uint64_t first_line
        size_t text_size
        char text[1]  # kCsvErrorText bytes; only the address is used here

    ctypedef struct ArmCsvCounts:
        uint64_t rows
        uint64_t id_bytes
        uint64_t problems
        uint64_t reported
        uint64_t line
        uint64_t failed_line

    cdef cppclass ArmCsvLoad:
        pass

    size_t arm_table_bytes(size_t capacity, size_t id_bytes, size_t segment_rows) noexcept
    int arm_table_create(void* buffer, size_t size, size_t capacity, size_t id_bytes, size_t segment_rows,
                         size_t segment_id_bytes, double half_life_s, double landmark, CArmTable** out) noexcept
    int arm_table_attach(void* buffer, size_t size, CArmTable** out) noexcept
    size_t arm_table_capacity(const CArmTable* table) noexcept
    size_t arm_table_id_bytes(const CArmTable* table) noexcept
    size_t arm_table_memory_bytes(const CArmTable* table) noexcept
    size_t arm_table_rows(const CArmTable* table) noexcept
    uint64_t arm_table_rows_wasted(const CArmTable* table) noexcept
    size_t arm_table_arena_used(const CArmTable* table) noexcept
    size_t arm_table_segment_rows(const CArmTable* table) noexcept
    size_t arm_table_segment_rows_used(const CArmTable* table) noexcept
    double arm_table_half_life(const CArmTable* table) noexcept
    double arm_table_landmark(const CArmTable* table) noexcept
    const ArmRecord* arm_table_records(const CArmTable* table) noexcept
    IdRef arm_id_at(const CArmTable* table, size_t row) noexcept
    int arm_table_load(CArmTable* table, const IdRef* ids, const double* alpha0, const double* beta0, size_t n,
                       size_t* done, int64_t* dup_row) noexcept
    int arm_gather_fill(const CArmTable* table, const IdRef* ids, size_t n, double prior_alpha, double prior_beta,
                        double now, double* alpha_out, double* beta_out, int32_t* rows_out, size_t* n_known) noexcept
    size_t segment_keys_bytes(IdRef segment, const IdRef* ids, size_t n) noexcept
    void segment_keys_fill(IdRef segment, const IdRef* ids, size_t n, char* buffer, IdRef* keys) noexcept
    int arm_gather_segment_fill(const CArmTable* table, const IdRef* ids, const IdRef* keys, size_t n, double weight,
                                double prior_alpha, double prior_beta, double now, double* alpha_out,
                                double* beta_out, int32_t* rows_out, int32_t* pair_rows_out, double* pair_counts,
                                size_t* n_known) noexcept
    int64_t arm_find(const CArmTable* table, IdRef id) noexcept
    int arm_find_or_insert(CArmTable* table, IdRef id, double alpha0, double beta0, uint32_t flags,
                           int64_t* row) noexcept
    int arm_add_impressions(CArmTable* table, const IdRef* ids, const int32_t* rows, const intptr_t* picks,
                            size_t n_picks, double prior_alpha, double prior_beta, uint32_t flags, double now,
                            size_t* n_failed) noexcept
    void arm_add_counts(CArmTable* table, size_t row, double impressions, double rewards, double when) noexcept
    void arm_read_counts(const CArmTable* table, size_t row, double now, double* impressions,
                         double* rewards) noexcept
    void arm_counts_fill(const CArmTable* table, size_t n, double now, double* impressions, double* rewards) noexcept
    int arm_table_rebase(CArmTable* table, double now) noexcept
    int arm_raise_counts(CArmTable* table, const IdRef* ids, const uint64_t* impressions, const double* rewards,
                         size_t n, double prior_alpha, double prior_beta, size_t* n_failed) noexcept
    int arm_raise_decayed(CArmTable* table, const IdRef* ids, const double* impressions, const double* rewards,
                          const double* landmarks, size_t n, double prior_alpha, double prior_beta,
                          size_t* n_failed) noexcept

    int arm_csv_begin(CArmTable* table, size_t errors_max, ArmCsvLoad** out) noexcept
    void arm_csv_destroy(ArmCsvLoad* load) noexcept
    int arm_csv_feed(ArmCsvLoad* load, const char* data, size_t n, bint eof, size_t* consumed) noexcept
    void arm_csv_counts(const ArmCsvLoad* load, ArmCsvCounts* counts) noexcept
    const ArmCsvError* arm_csv_errors(const ArmCsvLoad* load) noexcept


cdef class ArmTable:
    # Points into the caller's buffer, which `view` keeps exported (so an mmap cannot be closed under it);
    # NULL until create() or attach() succeeds.
    cdef CArmTable* table
    cdef Py_buffer view
    cdef bint has_view
    cdef object buffer

    cdef int _export(self, object buffer) except -1
    cdef int _check(self) except -1
