// The feature cache's table. See cache_table.hpp.
#include "mab/cache_table.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

namespace mab {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Layout
//
// entries  max_entries records of 64 bytes, one cache line each, allocated once: the table never grows. A
//          record holds the id's full hash, its parameters, both time stamps, flags and the id's bytes (inline up
//          to 16 bytes, else a pointer to a heap copy), so a found lookup touches one index line and one record.
// slots    the index: open addressing with linear probing over 8-byte slots, capacity a power of two >= 2 x
//          max_entries (load factor <= 0.5). A slot holds the record's position plus one (0: empty) and the high
//          half of the hash as a tag, so most non-matching slots are skipped without reading a record.
// Deletion (only on eviction) shifts later members of the probe run back (no tombstones), so lookups stay short
// however long the table churns.

constexpr uint8_t kFound = 1;       // positive entry: alpha and beta hold the stored parameters
constexpr uint8_t kReferenced = 2;  // served since the CLOCK hand last passed

struct Entry {
    uint64_t hash;
    double alpha;
    double beta;
    double expires_at;  // fresh until
    double refresh_at;  // a stale entry is reported for refresh once now >= refresh_at
    uint32_t key_size;
    uint8_t flags;
    uint8_t pad[3];
    union {
        char inline_key[kCacheInlineKey];
        char* heap_key;
    };

    const char* key() const noexcept { return key_size <= kCacheInlineKey ? inline_key : heap_key; }
};
static_assert(sizeof(Entry) == 64, "one entry per cache line");

struct Slot {
    uint32_t pos1;  // entry position + 1; 0 marks an empty slot
    uint32_t tag;   // high half of the hash
};
static_assert(sizeof(Slot) == 8, "eight slots per cache line");

inline uint32_t tag_of(uint64_t h) noexcept { return static_cast<uint32_t>(h >> 32); }

}  // namespace

struct CacheTable {
    Entry* entries = nullptr;
    Slot* slots = nullptr;
    std::size_t max_entries = 0;
    std::size_t mask = 0;  // slot capacity - 1
    std::size_t n_used = 0;
    std::size_t hand = 0;  // CLOCK hand over entries[0, n_used)
    std::size_t heap_key_bytes = 0;
    uint64_t evictions = 0;

    ~CacheTable() {
        release_keys();
        std::free(entries);
        std::free(slots);
    }

    void release_keys() noexcept {
        for (std::size_t i = 0; i < n_used; ++i) {
            if (entries[i].key_size > kCacheInlineKey) std::free(entries[i].heap_key);
        }
        heap_key_bytes = 0;
    }

    std::size_t home(uint64_t h) const noexcept { return static_cast<std::size_t>(h) & mask; }

    bool holds(const Entry& e, uint64_t h, IdRef id) const noexcept {
        return e.hash == h && e.key_size == id.size && (id.size == 0 || std::memcmp(e.key(), id.data, id.size) == 0);
    }

    // The slot holding id, or the empty slot that ends its probe run.
    std::size_t probe(uint64_t h, IdRef id) const noexcept {
        const uint32_t tag = tag_of(h);
        for (std::size_t j = home(h);; j = (j + 1) & mask) {
            const Slot s = slots[j];
            if (s.pos1 == 0 || (s.tag == tag && holds(entries[s.pos1 - 1], h, id))) return j;
        }
    }

    // Removes the index slot of entry `pos` by backward shift: later members of the run that may live closer to
    // their home slot move back, so no probe run is ever broken.
    void unlink(std::size_t pos) noexcept {
        std::size_t i = home(entries[pos].hash);
        while (slots[i].pos1 != pos + 1) i = (i + 1) & mask;
        for (std::size_t j = (i + 1) & mask; slots[j].pos1 != 0; j = (j + 1) & mask) {
            const std::size_t k = home(entries[slots[j].pos1 - 1].hash);
            // The member at j may move to i unless its home k lies cyclically in (i, j].
            const bool stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
            if (!stays) {
                slots[i] = slots[j];
                i = j;
            }
        }
        slots[i] = Slot{0, 0};
    }

    // A record for a new id: an unused one while the table fills, then the CLOCK victim (unlinked, key freed).
    std::size_t claim() noexcept {
        if (n_used < max_entries) return n_used++;
        // Every pass clears the referenced bits it passes over, so the second pass finds a victim.
        for (;;) {
            Entry& e = entries[hand];
            const std::size_t pos = hand;
            hand = (hand + 1) % max_entries;
            if (e.flags & kReferenced) {
                e.flags = static_cast<uint8_t>(e.flags & ~kReferenced);
                continue;
            }
            unlink(pos);
            if (e.key_size > kCacheInlineKey) {
                std::free(e.heap_key);
                heap_key_bytes -= e.key_size;
            }
            ++evictions;
            return pos;
        }
    }
};

int create_cache_table(std::size_t max_entries, CacheTable** out) noexcept {
    *out = nullptr;
    if (max_entries == 0 || max_entries > kMaxIds) return kIdTooMany;
    std::size_t capacity = 16;
    while (capacity < 2 * max_entries) capacity <<= 1;
    CacheTable* t = new (std::nothrow) CacheTable;
    if (t == nullptr) return kIdNoMemory;
    // Records are written before they are read (n_used bounds them), so only the index needs zeroing.
    t->entries = static_cast<Entry*>(std::aligned_alloc(64, max_entries * sizeof(Entry)));
    t->slots = static_cast<Slot*>(std::calloc(capacity, sizeof(Slot)));
    if (t->entries == nullptr || t->slots == nullptr) {
        delete t;
        return kIdNoMemory;
    }
    t->max_entries = max_entries;
    t->mask = capacity - 1;
    *out = t;
    return kIdOk;
}

void destroy_cache_table(CacheTable* table) noexcept { delete table; }

std::size_t cache_table_size(const CacheTable* table) noexcept { return table->n_used; }

std::size_t cache_table_capacity(const CacheTable* table) noexcept { return table->max_entries; }

std::size_t cache_table_memory_bytes(const CacheTable* t) noexcept {
    return sizeof(CacheTable) + t->max_entries * sizeof(Entry) + (t->mask + 1) * sizeof(Slot) + t->heap_key_bytes;
}

// The index has at most 4 slots per entry (capacity < 4 x max_entries once max_entries > 8), 2 on average over
// sizes; the figure is the record plus the worst case, so that max_entries x entry_bytes bounds the table.
std::size_t cache_table_entry_bytes() noexcept { return sizeof(Entry) + 4 * sizeof(Slot); }

uint64_t cache_table_evictions(const CacheTable* table) noexcept { return table->evictions; }

int cache_lookup_fill(CacheTable* t, const IdRef* ids, std::size_t n, double now, double stale_s, double retry_s,
                      double prior_alpha, double prior_beta, double* alpha_out, double* beta_out, uint32_t* miss_pos,
                      uint32_t* refresh_pos, CacheLookupCounts* counts) noexcept {
    *counts = CacheLookupCounts{0, 0, 0, 0, 0};
    if (n > kMaxIds) return kIdTooMany;
    // As in gather_params_fill: hash a group and prefetch its home slots, then probe and prefetch the records,
    // then compare and fill, so the cache misses of a group overlap. A million-entry table is 80 MB.
    constexpr std::size_t kGroup = 32;
    uint64_t hash[kGroup];
    std::size_t slot[kGroup];
    CacheLookupCounts c{0, 0, 0, 0, 0};
    for (std::size_t base = 0; base < n; base += kGroup) {
        const std::size_t m = std::min(kGroup, n - base);
        const IdRef* g = ids + base;
        for (std::size_t i = 0; i < m; ++i) {
            hash[i] = hash_id(g[i]);
            slot[i] = t->home(hash[i]);
            __builtin_prefetch(&t->slots[slot[i]]);
        }
        for (std::size_t i = 0; i < m; ++i) {
            // The first slot with a matching tag (or the run's end); the full compare comes in the last pass.
            const uint32_t tag = tag_of(hash[i]);
            std::size_t j = slot[i];
            while (t->slots[j].pos1 != 0 && t->slots[j].tag != tag) j = (j + 1) & t->mask;
            slot[i] = j;
            if (t->slots[j].pos1 != 0) __builtin_prefetch(&t->entries[t->slots[j].pos1 - 1]);
        }
        for (std::size_t i = 0; i < m; ++i) {
            const std::size_t at = base + i;
            std::size_t j = slot[i];
            if (t->slots[j].pos1 != 0 && !t->holds(t->entries[t->slots[j].pos1 - 1], hash[i], g[i])) {
                j = t->probe(hash[i], g[i]);  // a tag collision: probe on properly
            }
            Entry* e = t->slots[j].pos1 != 0 ? &t->entries[t->slots[j].pos1 - 1] : nullptr;
            // Written so that a NaN time counts as expired: every comparison with NaN is false.
            if (e == nullptr || !(now < e->expires_at + stale_s)) {
                alpha_out[at] = prior_alpha;
                beta_out[at] = prior_beta;
                miss_pos[c.n_miss++] = static_cast<uint32_t>(at);
                continue;
            }
            if (e->flags & kFound) {
                alpha_out[at] = e->alpha;
                beta_out[at] = e->beta;
                ++c.n_known;
            } else {
                alpha_out[at] = prior_alpha;
                beta_out[at] = prior_beta;
            }
            if (!(e->flags & kReferenced)) e->flags = static_cast<uint8_t>(e->flags | kReferenced);
            if (now < e->expires_at) {
                ++c.n_fresh;
                continue;
            }
            ++c.n_stale;
            if (now >= e->refresh_at) {
                e->refresh_at = now + retry_s;
                refresh_pos[c.n_refresh++] = static_cast<uint32_t>(at);
            }
        }
    }
    *counts = c;
    return kIdOk;
}

int cache_insert(CacheTable* t, const IdRef* ids, const double* alpha, const double* beta, const uint8_t* found,
                 const double* expires_at, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) {
        const IdRef id = ids[i];
        if (id.size > 0xFFFFFFFFu) return kIdTooMany;
        const uint64_t h = hash_id(id);
        std::size_t j = t->probe(h, id);
        Entry* e;
        if (t->slots[j].pos1 != 0) {
            e = &t->entries[t->slots[j].pos1 - 1];
        } else {
            char* heap = nullptr;
            if (id.size > kCacheInlineKey) {
                heap = static_cast<char*>(std::malloc(id.size));
                if (heap == nullptr) return kIdNoMemory;
                std::memcpy(heap, id.data, id.size);
            }
            const std::size_t pos = t->claim();
            // Eviction may have shifted slots of this probe run: find the insertion point again.
            j = t->probe(h, id);
            e = &t->entries[pos];
            e->hash = h;
            e->key_size = static_cast<uint32_t>(id.size);
            if (heap != nullptr) {
                e->heap_key = heap;
                t->heap_key_bytes += id.size;
            } else if (id.size != 0) {
                std::memcpy(e->inline_key, id.data, id.size);
            }
            // A new entry was just asked for: it starts referenced, so the hand passes it once before evicting it.
            e->flags = kReferenced;
            t->slots[j] = Slot{static_cast<uint32_t>(pos + 1), tag_of(h)};
        }
        e->alpha = alpha[i];
        e->beta = beta[i];
        e->expires_at = expires_at[i];
        e->refresh_at = expires_at[i];
        // A new value keeps the referenced bit it had: being refreshed is not being used.
        e->flags = static_cast<uint8_t>((e->flags & kReferenced) | (found[i] ? kFound : 0));
    }
    return kIdOk;
}

void cache_clear(CacheTable* t) noexcept {
    t->release_keys();
    std::memset(static_cast<void*>(t->slots), 0, (t->mask + 1) * sizeof(Slot));
    t->n_used = 0;
    t->hand = 0;
}

}  // namespace mab
