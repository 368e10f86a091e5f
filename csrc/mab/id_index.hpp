// Entity-id lookup for the request path: an immutable id -> (alpha, beta) table, and request-local dedupe.
//
// Plain C++, no Python: ids arrive as (pointer, length) views of UTF-8 bytes owned by the caller, outputs go
// into caller-owned buffers, nothing throws, and every entry point that can fail returns an IdStatus. The only
// global state is the per-process hash secret, drawn once from the OS on first use and never changed after.
//
// Preconditions (checked by the caller, not here):
//   - every IdRef points at `size` readable bytes (any bytes: NUL, invalid UTF-8 and the empty id are fine),
//     and stays valid for the duration of the call;
//   - for build_id_table: alpha[i] and beta[i] are finite and > 0 (stored as given, never checked);
//   - output buffers have room for n elements and do not alias the inputs;
//   - an IdTable is immutable once built: any number of threads may read it at the same time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mab {

enum IdStatus : int {
    kIdOk = 0,
    kIdNoMemory = 1,   // same value as kernel.hpp's kNoMemory
    kIdDuplicate = 2,  // build_id_table: the same id twice; *dup_first < *dup_second name the positions
    kIdTooMany = 3,    // more than kMaxIds ids, or more than 4 GiB of id bytes
};

// Rows and request-local positions are 32-bit so that a table slot is 16 bytes and a dedupe slot 8.
constexpr std::size_t kMaxIds = 0xFFFFFFFEu;

// A borrowed view of one id's bytes.
struct IdRef {
    const char* data;
    std::size_t size;
};

// The table: opaque to callers, who hold it by pointer (build_id_table / destroy_id_table).
struct IdTable;

// Builds a table of n ids with their Beta parameters; row i holds ids[i], alpha[i], beta[i]. On success
// *out owns a new table (free it with destroy_id_table); on any error *out is nullptr. Copies the id bytes:
// the views need to live only for the call. O(n) expected.
int build_id_table(const IdRef* ids, const double* alpha, const double* beta, std::size_t n, IdTable** out,
                   std::size_t* dup_first, std::size_t* dup_second) noexcept;

void destroy_id_table(IdTable* table) noexcept;

std::size_t id_table_size(const IdTable* table) noexcept;

// Bytes held by the table: slots, row records and the id arena.
std::size_t id_table_memory_bytes(const IdTable* table) noexcept;

// The row of one id, or -1 if the table does not hold it. Writes its parameters when found.
int64_t find_row(const IdTable* table, IdRef id, double* alpha, double* beta) noexcept;

// For i < n writes the parameters of ids[i] into alpha_out[i], beta_out[i], or the prior when the table
// does not hold it, and the number of ids found into *n_known. Duplicates in ids are looked up each time.
int gather_params_fill(const IdTable* table, const IdRef* ids, std::size_t n, double prior_alpha,
                       double prior_beta, double* alpha_out, double* beta_out, std::size_t* n_known) noexcept;

// Request-local dedupe: writes into keep[0..*n_keep) the positions of the first occurrence of each distinct
// id, in increasing order. The scratch set (8 bytes x 4 per id) lives on the stack up to kUniqueStackIds
// ids, 64 KB, and on the heap beyond. O(n) expected.
constexpr std::size_t kUniqueStackIds = 2048;
int unique_indices_fill(const IdRef* ids, std::size_t n, uint32_t* keep, std::size_t* n_keep) noexcept;

// The seeded hash both structures use, exposed for tests and benchmarks.
uint64_t hash_id(IdRef id) noexcept;

// The same hash under a caller's key instead of the process secret, so that processes sharing a key hash
// alike. key[1] and key[2] are multipliers: they should be odd with about half their bits set.
uint64_t hash_id_keyed(IdRef id, const uint64_t key[3]) noexcept;

}  // namespace mab
