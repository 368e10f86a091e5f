// Entity-id lookup for the request path: an immutable id -> (alpha, beta) table, and request-local dedupe.
//
// Plain C++, no Python: ids arrive as (pointer, length) views of UTF-8 bytes owned by the caller, outputs go
// into caller-owned buffers, nothing throws, and every entry point that can fail returns an IdStatus. The only
// global state is the per-process hash secret, drawn once from the OS on first use and never changed after.
// The hash is in this header (hash_id_keyed) so that other tables can share it, keyed as they need.
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
#include <cstring>

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

// The id rule (mab_service/ids.py): an id is 1 to max_bytes bytes with no control byte (0x00-0x1F, 0x7F). In UTF-8
// every byte of a multi-byte character is >= 0x80, so the control bytes are exactly the control characters.
// Returns the position of the first id that breaks the rule, or n if every id keeps it. One pass over the bytes.
std::size_t first_bad_id(const IdRef* ids, std::size_t n, std::size_t max_bytes) noexcept;

// The seeded hash both structures use, exposed for tests and benchmarks.
uint64_t hash_id(IdRef id) noexcept;

// Keyed hashing, for tables that several processes share and so must hash alike: the key is drawn once
// (draw_hash_key) and stored with the table; hash_id is hash_id_keyed with this process's own key.
// key[0] is a seed, key[1] and key[2] are odd multipliers with balanced bits, as draw_hash_key makes them.
constexpr std::size_t kHashKeyWords = 3;
void draw_hash_key(uint64_t key[kHashKeyWords]) noexcept;
inline uint64_t hash_id_keyed(IdRef id, const uint64_t key[kHashKeyWords]) noexcept;

// ---------------------------------------------------------------------------------------------------------
// The hash itself, inline so that lookup loops in other files hash without a call.
//
// Ids come from clients, so a hash anyone can compute lets a hostile client send ids that all land in one
// probe run and turn each request's dedupe into O(n^2) work (hash flooding). Every hash is therefore keyed
// by a secret drawn from the OS, as CPython keys str hashing. We do not use CPython's own SipHash-1-3: for
// ids of 5-20 bytes it costs several times more than the function below, and we hash every candidate on
// every request. The function follows wyhash: the id's bytes are folded into two 64-bit words, each is
// xor-ed with a secret word, and the two are multiplied to a 128-bit product whose halves are xor-ed (the
// "mum" mix). It is not a cryptographic PRF; its known weakness is that an attacker who can make one factor
// zero collides everything, and that needs the secret. Worst case without the secret is bounded anyway: a
// request carries at most a few thousand ids, and the big tables hold only our own ids.

namespace hash_detail {

inline uint64_t read8(const char* p) noexcept {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}

inline uint64_t read4(const char* p) noexcept {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

inline uint64_t mum(uint64_t a, uint64_t b) noexcept {
    const __uint128_t r = static_cast<__uint128_t>(a) * b;
    return static_cast<uint64_t>(r) ^ static_cast<uint64_t>(r >> 64);
}

}  // namespace hash_detail

inline uint64_t hash_id_keyed(IdRef id, const uint64_t key[kHashKeyWords]) noexcept {
    using hash_detail::mum;
    using hash_detail::read4;
    using hash_detail::read8;
    const char* p = id.data;
    const std::size_t n = id.size;
    const uint64_t k1 = key[1], k2 = key[2];
    uint64_t seed = key[0];
    uint64_t a, b;
    if (n <= 16) {
        if (n >= 4) {
            // Two overlapping 4-byte reads from each end cover every byte of 4..16 bytes: 4..7 bytes read
            // [0, 4) and [n-4, n) twice; 8..16 bytes read [0, 8) and [n-8, n).
            const std::size_t q = (n >> 3) << 2;
            a = (read4(p) << 32) | read4(p + q);
            b = (read4(p + n - 4) << 32) | read4(p + n - 4 - q);
        } else if (n > 0) {
            // First, middle and last byte: all of them for 1..3 bytes, so equal lengths never collide here.
            a = (uint64_t{static_cast<unsigned char>(p[0])} << 16) |
                (uint64_t{static_cast<unsigned char>(p[n >> 1])} << 8) | static_cast<unsigned char>(p[n - 1]);
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        // Long ids: fold 16-byte blocks into the seed, then mix the last 16 bytes (which may overlap the
        // last block) as above. One lane is enough; ids longer than a few dozen bytes are rare.
        const char* q = p;
        std::size_t left = n;
        while (left > 16) {
            seed = mum(read8(q) ^ k1, read8(q + 8) ^ seed);
            q += 16;
            left -= 16;
        }
        a = read8(p + n - 16);
        b = read8(p + n - 8);
    }
    // The length enters the final mix, so ids that fold to the same words at different lengths differ.
    const __uint128_t r = static_cast<__uint128_t>(a ^ k1) * (b ^ seed);
    return mum(static_cast<uint64_t>(r) ^ k2 ^ static_cast<uint64_t>(n), static_cast<uint64_t>(r >> 64) ^ k1);
}

}  // namespace mab
