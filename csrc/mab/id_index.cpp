// The id table, the request-local dedupe set and their hash. See id_index.hpp.
#include "mab/id_index.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>
#endif

namespace mab {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Hash (the function is hash_id_keyed in the header, where the reasons for its design are)
//
// The per-process secret is drawn from the OS once. A forked worker shares its parent's secret, which is
// fine: it is never revealed.

using hash_detail::read4;
using hash_detail::read8;

struct HashSecret {
    uint64_t key[kHashKeyWords];
};

inline uint64_t hash_bytes(const char* p, std::size_t n, const HashSecret& s) noexcept {
    return hash_id_keyed(IdRef{p, n}, s.key);
}

inline uint64_t splitmix64(uint64_t& x) noexcept {
    uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Fills words[0..n) with OS entropy: getrandom, else /dev/urandom. Returns false if neither works.
bool os_entropy(uint64_t* words, std::size_t n) noexcept {
    const std::size_t bytes = n * sizeof(uint64_t);
#if defined(__linux__)
    if (getrandom(words, bytes, 0) == static_cast<ssize_t>(bytes)) return true;
    const int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        const bool ok = read(fd, words, bytes) == static_cast<ssize_t>(bytes);
        close(fd);
        if (ok) return true;
    }
#else
    (void)words;
    (void)bytes;
#endif
    return false;
}

void fill_key(uint64_t key[kHashKeyWords]) noexcept {
    uint64_t w[kHashKeyWords];
    if (!os_entropy(w, kHashKeyWords)) {
        // No OS entropy (not Linux, or a sandbox without getrandom and /dev): the clock and an address
        // (randomised by ASLR) are weak but still unknown to a remote client.
        int local = 0;
        uint64_t x = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                     static_cast<uint64_t>(reinterpret_cast<std::uintptr_t>(&local));
        for (uint64_t& word : w) word = splitmix64(x);
    }
    // Multiplier words must be odd and have balanced bits: a word with few set bits mixes poorly. Redraw
    // (deterministically from the word) until it has.
    auto odd_balanced = [](uint64_t x) noexcept {
        for (;;) {
            const uint64_t k = splitmix64(x) | 1;
            const int bits = __builtin_popcountll(k);
            if (bits >= 24 && bits <= 40) return k;
        }
    };
    key[0] = w[0];
    key[1] = odd_balanced(w[1]);
    key[2] = odd_balanced(w[2]);
}

HashSecret make_secret() noexcept {
    HashSecret s;
    fill_key(s.key);
    return s;
}

const HashSecret& process_secret() noexcept {
    static const HashSecret secret = make_secret();  // thread-safe one-time initialisation (C++11)
    return secret;
}

// Byte equality, inline for ids up to 16 bytes (almost all of them): a call to memcmp costs more than the
// compare. Overlapping reads from both ends, as in hash_bytes.
inline bool same_bytes(const char* a, std::size_t na, const char* b, std::size_t nb) noexcept {
    if (na != nb) return false;
    if (na >= 8) {
        if (na > 16) return std::memcmp(a, b, na) == 0;
        return read8(a) == read8(b) && read8(a + na - 8) == read8(b + na - 8);
    }
    if (na >= 4) return read4(a) == read4(b) && read4(a + na - 4) == read4(b + na - 4);
    for (std::size_t i = 0; i < na; ++i) {
        if (a[i] != b[i]) return false;
    }
    return true;
}

// ---------------------------------------------------------------------------------------------------------
// Table
//
// Memory layout, one allocation, chosen so that a found lookup reads two cache lines, in two rounds:
//   slots   open addressing with linear probing; capacity a power of two >= 2 n (load factor <= 0.5);
//           8 bytes each: the high half of the id's hash as a tag (the low bits choose the slot) and the
//           offset of its record in 16-byte units. Small slots keep the whole array (2 MB for 100,000
//           ids) more often in cache between requests.
//   arena   one record per id: alpha, beta, row and length (24 bytes), then the id's bytes. A record of
//           up to 32 bytes (ids up to 8 bytes) is aligned to 32, one of up to 64 bytes (ids up to 40
//           bytes, UUIDs included) to 64, so that it never straddles a cache line: the parameters and
//           the bytes to compare arrive together.
// A probe compares bytes only when the 32-bit tags match, which in practice happens only for the id
// itself; an unknown id usually costs one slot line.

constexpr uint32_t kEmpty = 0xFFFFFFFFu;
constexpr std::size_t kUnit = 16;  // record offsets count 16-byte units
constexpr std::size_t kMaxArenaBytes = std::size_t{kEmpty - 1} * kUnit;

struct Slot {
    uint32_t tag;
    uint32_t record;  // offset in kUnit units; kEmpty marks an empty slot
};
static_assert(sizeof(Slot) == 8, "eight slots per cache line");

struct RecordHeader {
    double alpha;
    double beta;
    uint32_t row;
    uint32_t size;  // of the id, in bytes; the bytes follow the header
};
static_assert(sizeof(RecordHeader) == 24, "the id's bytes start 24 bytes into a record");

std::size_t round_up(std::size_t bytes, std::size_t to) noexcept { return (bytes + to - 1) / to * to; }

// Alignment (and size granule) of the record of an id of `id_size` bytes; see the layout above.
std::size_t record_align(std::size_t id_size) noexcept { return sizeof(RecordHeader) + id_size <= 32 ? 32 : 64; }

std::size_t record_bytes(std::size_t id_size) noexcept {
    return round_up(sizeof(RecordHeader) + id_size, record_align(id_size));
}

inline uint32_t tag_of(uint64_t h) noexcept { return static_cast<uint32_t>(h >> 32); }

}  // namespace

struct IdTable {
    void* block = nullptr;  // slots, then the arena, in one allocation
    std::size_t bytes = 0;
    Slot* slots = nullptr;
    std::size_t mask = 0;  // capacity - 1
    std::size_t n = 0;
    char* arena = nullptr;
    HashSecret secret{};  // a copy, so lookups do not go through the static's guard

    ~IdTable() { std::free(block); }

    const char* record(const Slot& s) const noexcept { return arena + std::size_t{s.record} * kUnit; }

    static RecordHeader header(const char* record) noexcept {
        RecordHeader h;
        std::memcpy(&h, record, sizeof h);
        return h;
    }

    bool holds(const Slot& s, const char* p, std::size_t size) const noexcept {
        const char* r = record(s);
        return same_bytes(r + sizeof(RecordHeader), header(r).size, p, size);
    }

    // Linear probing from slot j: the index of the slot holding the id, or of the empty slot ending its run.
    std::size_t probe(uint64_t h, std::size_t j, const char* p, std::size_t size) const noexcept {
        const uint32_t tag = tag_of(h);
        for (;; j = (j + 1) & mask) {
            const Slot& s = slots[j];
            if (s.record == kEmpty || (s.tag == tag && holds(s, p, size))) return j;
        }
    }
};

int build_id_table(const IdRef* ids, const double* alpha, const double* beta, std::size_t n, IdTable** out,
                   std::size_t* dup_first, std::size_t* dup_second) noexcept {
    *out = nullptr;
    if (n > kMaxIds) return kIdTooMany;
    std::size_t arena_bytes = 0;
    for (std::size_t i = 0; i < n; ++i) {
        if (ids[i].size > kMaxArenaBytes) return kIdTooMany;
        arena_bytes = round_up(arena_bytes, record_align(ids[i].size)) + record_bytes(ids[i].size);
        if (arena_bytes > kMaxArenaBytes) return kIdTooMany;
    }
    std::size_t capacity = 16;
    while (capacity < 2 * n) capacity <<= 1;
    const std::size_t slot_bytes = capacity * sizeof(Slot);  // a multiple of 128: the arena stays aligned
    IdTable* t = new (std::nothrow) IdTable;
    if (t == nullptr) return kIdNoMemory;
    // Tables of 2 MB and more sit in transparent huge pages where the kernel allows it: lookups are random
    // over the whole table, and with 4 KB pages a request's lookups also miss the TLB.
    constexpr std::size_t kHugePage = std::size_t{2} << 20;
    const std::size_t raw = slot_bytes + std::max<std::size_t>(arena_bytes, 1);
    const std::size_t align = raw >= kHugePage ? kHugePage : 64;
    t->bytes = round_up(raw, align);
    t->block = std::aligned_alloc(align, t->bytes);
    if (t->block == nullptr) {
        delete t;
        return kIdNoMemory;
    }
#if defined(MADV_HUGEPAGE)
    if (align == kHugePage) madvise(t->block, t->bytes, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    char* base = static_cast<char*>(t->block);
    t->slots = reinterpret_cast<Slot*>(base);
    t->arena = base + slot_bytes;
    t->mask = capacity - 1;
    t->n = n;
    t->secret = process_secret();
    for (std::size_t j = 0; j < capacity; ++j) t->slots[j] = Slot{0, kEmpty};

    std::size_t offset = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const IdRef id = ids[i];
        offset = round_up(offset, record_align(id.size));
        const RecordHeader head{alpha[i], beta[i], static_cast<uint32_t>(i), static_cast<uint32_t>(id.size)};
        std::memcpy(t->arena + offset, &head, sizeof head);
        if (id.size != 0) std::memcpy(t->arena + offset + sizeof head, id.data, id.size);
        const uint64_t h = hash_bytes(id.data, id.size, t->secret);
        Slot& s = t->slots[t->probe(h, h & t->mask, id.data, id.size)];
        if (s.record != kEmpty) {
            *dup_first = IdTable::header(t->record(s)).row;
            *dup_second = i;
            delete t;
            return kIdDuplicate;
        }
        s = Slot{tag_of(h), static_cast<uint32_t>(offset / kUnit)};
        offset += record_bytes(id.size);
    }
    *out = t;
    return kIdOk;
}

void destroy_id_table(IdTable* table) noexcept { delete table; }

std::size_t id_table_size(const IdTable* table) noexcept { return table->n; }

std::size_t id_table_memory_bytes(const IdTable* table) noexcept { return sizeof(IdTable) + table->bytes; }

int64_t find_row(const IdTable* t, IdRef id, double* alpha, double* beta) noexcept {
    const uint64_t h = hash_bytes(id.data, id.size, t->secret);
    const Slot& s = t->slots[t->probe(h, h & t->mask, id.data, id.size)];
    if (s.record == kEmpty) return -1;
    const RecordHeader head = IdTable::header(t->record(s));
    *alpha = head.alpha;
    *beta = head.beta;
    return head.row;
}

int gather_params_fill(const IdTable* t, const IdRef* ids, std::size_t n, double prior_alpha, double prior_beta,
                       double* alpha_out, double* beta_out, std::size_t* n_known) noexcept {
    // Between requests the service evicts much of the table, so a lookup waits on two levels of misses:
    // its slot, then its record. Ids go in groups, one pass per level, each pass prefetching the next
    // level for the whole group, so that the misses of a group overlap instead of queueing.
    constexpr std::size_t kGroup = 32;
    uint64_t hash[kGroup];
    std::size_t slot[kGroup];
    std::size_t known = 0;
    for (std::size_t base = 0; base < n; base += kGroup) {
        const std::size_t m = std::min(kGroup, n - base);
        const IdRef* g = ids + base;
        for (std::size_t i = 0; i < m; ++i) {
            hash[i] = hash_bytes(g[i].data, g[i].size, t->secret);
            slot[i] = hash[i] & t->mask;
            __builtin_prefetch(&t->slots[slot[i]]);
        }
        // The first slot with this tag, or the empty slot that ends the run.
        for (std::size_t i = 0; i < m; ++i) {
            const uint32_t tag = tag_of(hash[i]);
            std::size_t j = slot[i];
            while (t->slots[j].record != kEmpty && t->slots[j].tag != tag) j = (j + 1) & t->mask;
            slot[i] = j;
            if (t->slots[j].record != kEmpty) __builtin_prefetch(t->record(t->slots[j]));
        }
        for (std::size_t i = 0; i < m; ++i) {
            const Slot* s = &t->slots[slot[i]];
            // Equal tags but other bytes: a 32-bit tag collision, so probe on past it.
            if (s->record != kEmpty && !t->holds(*s, g[i].data, g[i].size)) {
                s = &t->slots[t->probe(hash[i], (slot[i] + 1) & t->mask, g[i].data, g[i].size)];
            }
            if (s->record != kEmpty) {
                const RecordHeader head = IdTable::header(t->record(*s));
                alpha_out[base + i] = head.alpha;
                beta_out[base + i] = head.beta;
                ++known;
            } else {
                alpha_out[base + i] = prior_alpha;
                beta_out[base + i] = prior_beta;
            }
        }
    }
    *n_known = known;
    return kIdOk;
}

// ---------------------------------------------------------------------------------------------------------
// Request-local dedupe

namespace {

// 8 bytes: the high half of the hash as a tag (the low bits choose the slot) and the position plus one
// (0 marks an empty slot). Bytes are compared only when the tags match.
struct SetSlot {
    uint32_t tag;
    uint32_t pos1;
};

}  // namespace

int unique_indices_fill(const IdRef* ids, std::size_t n, uint32_t* keep, std::size_t* n_keep) noexcept {
    *n_keep = 0;
    if (n > kMaxIds) return kIdTooMany;
    // Load factor <= 0.25, not 0.5: with fresh ids every probe branch is a coin toss, and a mispredicted
    // branch costs more than the extra memory (measured: about 30% faster for 400 and 2,000 ids).
    std::size_t capacity = 16;
    while (capacity < 4 * n) capacity <<= 1;
    // 64 KB: well inside a thread's stack (8 MB on Linux), and enough for 2,000-candidate requests.
    SetSlot on_stack[4 * kUniqueStackIds];
    SetSlot* set = on_stack;
    if (capacity > 4 * kUniqueStackIds) {
        set = static_cast<SetSlot*>(std::calloc(capacity, sizeof(SetSlot)));
        if (set == nullptr) return kIdNoMemory;
    } else {
        std::memset(set, 0, capacity * sizeof(SetSlot));
    }
    const HashSecret& secret = process_secret();
    const std::size_t mask = capacity - 1;
    std::size_t kept = 0;
    // Hash a chunk and prefetch its slots first: beyond a few hundred ids the set outgrows L1.
    constexpr std::size_t kChunk = 32;
    uint64_t hash[kChunk];
    for (std::size_t base = 0; base < n; base += kChunk) {
        const std::size_t m = std::min(kChunk, n - base);
        for (std::size_t i = 0; i < m; ++i) {
            hash[i] = hash_bytes(ids[base + i].data, ids[base + i].size, secret);
            __builtin_prefetch(&set[hash[i] & mask], 1);
        }
        for (std::size_t c = 0; c < m; ++c) {
            const std::size_t i = base + c;
            const IdRef id = ids[i];
            const uint32_t tag = static_cast<uint32_t>(hash[c] >> 32);
            std::size_t j = hash[c] & mask;
            bool seen = false;
            for (; set[j].pos1 != 0; j = (j + 1) & mask) {
                if (set[j].tag == tag) {
                    const IdRef& other = ids[set[j].pos1 - 1];
                    if (same_bytes(other.data, other.size, id.data, id.size)) {
                        seen = true;
                        break;
                    }
                }
            }
            if (!seen) {
                set[j] = SetSlot{tag, static_cast<uint32_t>(i + 1)};
                keep[kept++] = static_cast<uint32_t>(i);
            }
        }
    }
    if (set != on_stack) std::free(set);
    *n_keep = kept;
    return kIdOk;
}

namespace {

// Whether any byte of w is a control byte (< 0x20 or 0x7F). Exact: the two classic "has a byte < n" and "has a zero
// byte" tests (Hacker's Delight 6-1) can only miss or invent a byte above the first one that matches, never decide
// the answer for the word.
inline bool has_control_byte(uint64_t w) noexcept {
    constexpr uint64_t kOnes = 0x0101010101010101ull;
    constexpr uint64_t kHigh = 0x8080808080808080ull;
    const uint64_t below_space = (w - kOnes * 0x20) & ~w & kHigh;
    const uint64_t del = w ^ (kOnes * 0x7F);
    const uint64_t is_del = (del - kOnes) & ~del & kHigh;
    return (below_space | is_del) != 0;
}

}  // namespace

std::size_t first_bad_id(const IdRef* ids, std::size_t n, std::size_t max_bytes) noexcept {
    using hash_detail::read8;
    for (std::size_t i = 0; i < n; ++i) {
        const IdRef id = ids[i];
        const std::size_t size = id.size;
        if (size == 0 || size > max_bytes) return i;
        const char* p = id.data;
        if (size >= 8) {
            // Eight bytes at a time; the last word overlaps the one before it when size is not a multiple of 8.
            uint64_t bad = 0;
            std::size_t j = 0;
            for (; j + 8 <= size; j += 8) bad |= static_cast<uint64_t>(has_control_byte(read8(p + j)));
            if (j < size) bad |= static_cast<uint64_t>(has_control_byte(read8(p + size - 8)));
            if (bad != 0) return i;
        } else {
            for (std::size_t j = 0; j < size; ++j) {
                const unsigned c = static_cast<unsigned char>(p[j]);
                if (c < 0x20u || c == 0x7Fu) return i;
            }
        }
    }
    return n;
}

uint64_t hash_id(IdRef id) noexcept { return hash_bytes(id.data, id.size, process_secret()); }

void draw_hash_key(uint64_t key[kHashKeyWords]) noexcept { fill_key(key); }

}  // namespace mab
