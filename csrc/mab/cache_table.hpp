// The feature cache's table: a bounded, mutable id -> (alpha, beta) map with expiry stamps, for the request path.
//
// Plain C++, no Python: ids arrive as IdRef views (id_index.hpp), outputs go into caller-owned buffers, nothing
// throws, and every entry point that can fail returns an IdStatus. Times are seconds on one monotonic clock that
// the caller chooses (time.monotonic() in the service); the table only compares them.
//
// An entry is either positive (the store knows the id: alpha, beta as stored) or negative (the store answered
// that it does not: lookups give the prior). It is
//   fresh       while now < expires_at,
//   stale       while expires_at <= now < expires_at + stale_s: still served, and reported once per
//               retry_s for a background refresh,
//   expired     after that: a miss, as if absent.
// Size is bounded by max_entries; a full table evicts by CLOCK (second chance): a lookup that serves an entry
// marks it referenced, and the eviction hand passes over referenced entries once, clearing the mark.
//
// Preconditions (checked by the caller, not here):
//   - every IdRef points at `size` readable bytes and stays valid for the duration of the call;
//   - output buffers have room for n elements and do not alias the inputs;
//   - alpha and beta of positive entries are finite and > 0;
//   - a table is used by one thread at a time (the Cython layer holds the GIL for every call).
#pragma once

#include <cstddef>
#include <cstdint>

#include "mab/id_index.hpp"

namespace mab {

struct CacheTable;

// What one lookup found, per id. Counts are written by lookup_fill.
struct CacheLookupCounts {
    std::size_t n_fresh;    // served from fresh entries (positive or negative)
    std::size_t n_stale;    // served from stale entries, whether reported for refresh or not
    std::size_t n_miss;     // absent or expired: positions written to miss_pos
    std::size_t n_refresh;  // stale entries due for refresh: positions written to refresh_pos
    std::size_t n_known;    // served from positive entries (fresh or stale)
};

// A table for up to max_entries ids (>= 1, <= kMaxIds). *out is nullptr on error.
int create_cache_table(std::size_t max_entries, CacheTable** out) noexcept;

void destroy_cache_table(CacheTable* table) noexcept;

std::size_t cache_table_size(const CacheTable* table) noexcept;

std::size_t cache_table_capacity(const CacheTable* table) noexcept;

// Bytes held: entries, index slots and the heap copies of ids longer than kCacheInlineKey.
std::size_t cache_table_memory_bytes(const CacheTable* table) noexcept;

// Bytes one entry costs besides a long id's heap copy: its record plus its share of the index.
std::size_t cache_table_entry_bytes() noexcept;

// Entries evicted to make room since the table was created.
uint64_t cache_table_evictions(const CacheTable* table) noexcept;

// Ids of up to this many bytes live inside their entry; longer ones get a heap copy.
constexpr std::size_t kCacheInlineKey = 16;

// For i < n: writes the parameters of ids[i] into alpha_out[i], beta_out[i] when a fresh or stale entry holds it
// (the prior for a negative entry), else the prior and its position into miss_pos. Stale entries whose refresh is
// due get their position written into refresh_pos and their next refresh pushed to now + retry_s, so concurrent
// lookups report each stale id once per retry_s. Served entries are marked referenced for CLOCK.
int cache_lookup_fill(CacheTable* table, const IdRef* ids, std::size_t n, double now, double stale_s,
                      double retry_s, double prior_alpha, double prior_beta, double* alpha_out, double* beta_out,
                      uint32_t* miss_pos, uint32_t* refresh_pos, CacheLookupCounts* counts) noexcept;

// Inserts or overwrites n entries: ids[i] -> (alpha[i], beta[i]), positive when found[i] != 0, fresh until
// expires_at[i]. A full table evicts (CLOCK) for each new id. Duplicates in ids: the last one wins.
int cache_insert(CacheTable* table, const IdRef* ids, const double* alpha, const double* beta, const uint8_t* found,
                 const double* expires_at, std::size_t n) noexcept;

// Removes every entry.
void cache_clear(CacheTable* table) noexcept;

}  // namespace mab
