// The shared arm table and its CSV loader. See arm_table.hpp.
#include "mab/arm_table.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace mab {

// The header at the start of the buffer. Fields before `rows_used` are written once by arm_table_create;
// the counters sit on their own cache line, so that inserts bouncing it between cores do not slow down the
// lookups that read the sizes and the key.
struct ArmTable {
    uint64_t magic;
    uint32_t version;
    uint32_t record_bytes;
    uint64_t total_bytes;
    uint64_t capacity;
    uint64_t arena_bytes;
    uint64_t slot_count;          // the arms' slots
    uint64_t segment_slot_count;  // the segment keys' slots, after the arms'
    uint64_t key[kHashKeyWords];
    uint64_t segment_rows;        // of capacity, the segment rows' budget
    uint64_t segment_arena;       // of arena_bytes, the segment rows' part (at its end)
    double half_life_s;           // 0: no decay
    double landmark0;             // the landmark of epoch 0 (unix time)
    alignas(64) uint64_t rows_used;  // atomic: rows reserved, <= capacity
    uint64_t arena_used;             // atomic: arms' arena bytes reserved, <= arena_bytes - segment_arena
    uint64_t rows_wasted;            // atomic
    uint64_t arm_rows_used;          // atomic: rows reserved for arms, <= capacity - segment_rows
    uint64_t segment_rows_used;      // atomic: rows reserved for segment keys, <= segment_rows
    uint64_t segment_arena_used;     // atomic: segment arena bytes reserved, <= segment_arena
    uint64_t epoch;                  // atomic: the decay's epoch; its landmark is landmark0 + epoch * span
};
static_assert(sizeof(ArmTable) % 64 == 0, "the slots start on a cache line");

namespace {

// ---------------------------------------------------------------------------------------------------------
// Layout
//
// Atomics on the shared buffer use the GCC builtins on plain words (C++17 has no atomic_ref): on every
// platform we build for, 8-byte aligned words are lock-free, which is what makes them work across processes.

constexpr std::size_t kLine = 64;

std::size_t round_up(std::size_t bytes, std::size_t to) noexcept { return (bytes + to - 1) / to * to; }

// 3 slots per row (see the header), a multiple of 8 (one cache line) and at least 8: always more slots than rows.
std::size_t slot_count_for(std::size_t capacity) noexcept { return round_up(3 * capacity + 1, 8); }

uint64_t* slots_of(const ArmTable* t) noexcept {
    return reinterpret_cast<uint64_t*>(reinterpret_cast<char*>(const_cast<ArmTable*>(t)) + sizeof(ArmTable));
}

ArmRecord* records_of(const ArmTable* t) noexcept {
    return reinterpret_cast<ArmRecord*>(
        reinterpret_cast<char*>(slots_of(t)) + (t->slot_count + t->segment_slot_count) * sizeof(uint64_t));
}

// The slots one kind of key is probed in. Arms and segment keys have slots of their own, each sized for its own
// rows: the arms' lookups stay within slots as few as the arms need (a segment budget of 200,000 rows would
// otherwise spread 2,000 arms over 4.8 MB of slots), and segment keys never lengthen an arm's probe.
struct SlotSpan {
    uint64_t* base;
    std::size_t count;
};

inline SlotSpan arm_slots(const ArmTable* t) noexcept { return SlotSpan{slots_of(t), t->slot_count}; }

inline SlotSpan segment_slots(const ArmTable* t) noexcept {
    return SlotSpan{slots_of(t) + t->slot_count, t->segment_slot_count};
}

// A key whose first byte is NUL is a segment key (no id may hold a control character, mab_service/ids.py), in a
// table with a segment budget; a table without one holds any key as an arm's (the table itself takes any bytes).
inline bool is_segment_key(const ArmTable* t, IdRef id) noexcept {
    return t->segment_rows != 0 && id.size != 0 && id.data[0] == '\0';
}

// Where segment keys are: their own slots, or the arms' in a table without a segment budget.
inline SlotSpan key_slots(const ArmTable* t) noexcept { return t->segment_rows != 0 ? segment_slots(t) : arm_slots(t); }

inline SlotSpan slots_for(const ArmTable* t, IdRef id) noexcept {
    return is_segment_key(t, id) ? segment_slots(t) : arm_slots(t);
}

char* arena_of(const ArmTable* t) noexcept { return reinterpret_cast<char*>(records_of(t) + t->capacity); }

inline uint32_t tag_of(uint64_t h) noexcept { return static_cast<uint32_t>(h >> 32); }

// The home slot: the low half of the hash scaled to [0, slot_count) by a multiply (the slot count is not a
// power of two, so that memory follows capacity closely). The tag is the high half, independent of it.
inline std::size_t home_of(const SlotSpan& sp, uint64_t h) noexcept {
    return static_cast<std::size_t>(((h & 0xFFFFFFFFu) * sp.count) >> 32);
}

inline std::size_t next_slot(const SlotSpan& sp, std::size_t j) noexcept { return j + 1 == sp.count ? 0 : j + 1; }

inline uint64_t load_slot(const uint64_t* s) noexcept { return __atomic_load_n(s, __ATOMIC_ACQUIRE); }

inline uint32_t slot_tag(uint64_t s) noexcept { return static_cast<uint32_t>(s >> 32); }

inline std::size_t slot_row(uint64_t s) noexcept { return static_cast<std::size_t>(s & 0xFFFFFFFFu) - 1; }

inline uint64_t make_slot(uint32_t tag, std::size_t row) noexcept { return (uint64_t{tag} << 32) | (row + 1); }

inline const char* id_bytes_of(const ArmTable* t, const ArmRecord& r) noexcept {
    return r.id_size <= kArmInlineId ? r.id_inline : arena_of(t) + r.id_offset;
}

// Byte equality of two ids of n bytes, inline for up to 16 bytes (almost all ids): a call to memcmp costs
// more than the compare. Overlapping reads from both ends, as in id_index.cpp.
inline bool same_bytes(const char* a, const char* b, std::size_t n) noexcept {
    using hash_detail::read4;
    using hash_detail::read8;
    if (n >= 8) {
        if (n > 16) return std::memcmp(a, b, n) == 0;
        return read8(a) == read8(b) && read8(a + n - 8) == read8(b + n - 8);
    }
    if (n >= 4) return read4(a) == read4(b) && read4(a + n - 4) == read4(b + n - 4);
    for (std::size_t i = 0; i < n; ++i) {
        if (a[i] != b[i]) return false;
    }
    return true;
}

// Whether record r holds the id of hash h. The full hash is compared first: it sits in the record's line,
// so a tag collision costs no visit to the arena.
inline bool holds(const ArmTable* t, const ArmRecord& r, uint64_t h, IdRef id) noexcept {
    return r.hash == h && r.id_size == id.size && same_bytes(id_bytes_of(t, r), id.data, id.size);
}

// Probes from slot j for the id: its slot value, or 0 if the run ends first. *end is the slot where it
// stopped (the empty slot ending the run when not found).
uint64_t probe(const ArmTable* t, const SlotSpan& sp, uint64_t h, IdRef id, std::size_t j, std::size_t* end) noexcept {
    const uint64_t* slots = sp.base;
    const ArmRecord* rec = records_of(t);
    const uint32_t tag = tag_of(h);
    for (;; j = next_slot(sp, j)) {
        const uint64_t s = load_slot(&slots[j]);
        if (s == 0 || (slot_tag(s) == tag && holds(t, rec[slot_row(s)], h, id))) {
            *end = j;
            return s;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Counts and their decay
//
// A count word is the bits of a double >= 0 with the parity of its epoch in the sign bit. Without decay the epoch
// stays 0, so the word is the plain double.

constexpr uint64_t kParity = uint64_t{1} << 63;

inline double value_of(uint64_t word) noexcept {
    const uint64_t bits = word & ~kParity;
    double x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}

inline uint64_t word_of(double x, uint64_t parity) noexcept {
    uint64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return bits | parity;
}

inline uint64_t parity_of(uint64_t epoch) noexcept { return (epoch & 1) << 63; }

inline double span_of(const ArmTable* t) noexcept { return t->half_life_s * kArmEpochHalfLives; }

// The landmark of an epoch. Epoch 0 is landmark0 itself, so that a table without decay never computes one.
inline double landmark_of(const ArmTable* t, uint64_t epoch) noexcept {
    return t->landmark0 + static_cast<double>(epoch) * span_of(t);
}

// Read scales at `now` for a count of the current epoch and of the one before: 2**((landmark - now) / H). The one
// before is exactly 2**-kArmEpochHalfLives times the other (a power of two: no rounding). Without decay both are 1.
struct Scales {
    uint64_t epoch;
    double current, previous;
};

inline Scales scales_at(const ArmTable* t, double now) noexcept {
    const uint64_t epoch = __atomic_load_n(&t->epoch, __ATOMIC_ACQUIRE);
    if (t->half_life_s == 0.0) return Scales{epoch, 1.0, 1.0};
    const double current = std::exp2((landmark_of(t, epoch) - now) / t->half_life_s);
    return Scales{epoch, current, std::ldexp(current, -static_cast<int>(kArmEpochHalfLives))};
}

// A count read at the scales' time. The word was loaded before the epoch (see the header): a word of the other
// parity is of the epoch before.
inline double read_count(uint64_t word, const Scales& s) noexcept {
    return value_of(word) * ((word & kParity) == parity_of(s.epoch) ? s.current : s.previous);
}

inline void posterior(const ArmRecord& r, const Scales& s, double* alpha, double* beta) noexcept {
    const double rewards = read_count(__atomic_load_n(&r.rewards, __ATOMIC_ACQUIRE), s);
    const double impressions = read_count(__atomic_load_n(&r.impressions, __ATOMIC_ACQUIRE), s);
    *alpha = r.alpha0 + rewards;
    *beta = r.beta0 + std::max(impressions - rewards, 0.0);
}

// Adds `amount` made at `when` to one count: amount * 2**((when - landmark) / H) for the landmark of the count's
// own epoch (the current one or the one before), with a compare-and-swap so that neither another addition nor the
// sweep's rescale is lost. The epoch is read after the word (see the header).
void add_count(const ArmTable* t, uint64_t* word, double amount, double when) noexcept {
    if (amount == 0.0) return;
    uint64_t old = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    for (;;) {
        double add = amount;
        if (t->half_life_s != 0.0) {
            const uint64_t epoch = __atomic_load_n(&t->epoch, __ATOMIC_ACQUIRE);
            const uint64_t own = (old & kParity) == parity_of(epoch) || epoch == 0 ? epoch : epoch - 1;
            add = amount * std::exp2((when - landmark_of(t, own)) / t->half_life_s);
        }
        const uint64_t next = word_of(value_of(old) + add, old & kParity);
        if (__atomic_compare_exchange_n(word, &old, next, true, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
    }
}

// Brings one count of the epoch before into `epoch`: its value times 2**-kArmEpochHalfLives (exact but for
// subnormals), with the new parity. A count already in `epoch` is left alone.
void sweep_count(uint64_t* word, uint64_t epoch) noexcept {
    const uint64_t parity = parity_of(epoch);
    uint64_t old = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    while ((old & kParity) != parity) {
        const uint64_t next = word_of(std::ldexp(value_of(old), -static_cast<int>(kArmEpochHalfLives)), parity);
        if (__atomic_compare_exchange_n(word, &old, next, true, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
    }
}

// Reserves `amount` units of a counter without passing `limit`: a compare-and-swap loop, so that a failed
// reservation leaves the counter as it was and smaller ones may still fit.
bool reserve(uint64_t* counter, uint64_t amount, uint64_t limit, uint64_t* start) noexcept {
    uint64_t cur = __atomic_load_n(counter, __ATOMIC_RELAXED);
    do {
        if (amount > limit || cur > limit - amount) return false;
    } while (!__atomic_compare_exchange_n(counter, &cur, cur + amount, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    *start = cur;
    return true;
}

// Finds id (hash h) or inserts it. *existed tells which. The slot where the probe for a new id ended is
// where publication is tried first; a failed compare-and-swap there means another insert took the slot,
// perhaps for this very id, so the probe goes on from it.
int find_or_insert(ArmTable* t, IdRef id, uint64_t h, double alpha0, double beta0, uint32_t flags, int64_t* row,
                   bool* existed) noexcept {
    std::size_t j;
    const SlotSpan sp = slots_for(t, id);
    uint64_t s = probe(t, sp, h, id, home_of(sp, h), &j);
    if (s != 0) {
        *row = static_cast<int64_t>(slot_row(s));
        *existed = true;
        return kArmOk;
    }
    *existed = false;
    *row = -1;
    // Arms and segment keys each have their own budget of rows and arena bytes, so segments never take an arm's
    // room. The budgets add up to the table, so a row reserved in one always finds a row of the table.
    const bool segment = is_segment_key(t, id);
    flags = segment ? flags | kArmSegment : flags & ~kArmSegment;
    uint64_t* kind_rows = segment ? &t->segment_rows_used : &t->arm_rows_used;
    const uint64_t kind_capacity = segment ? t->segment_rows : t->capacity - t->segment_rows;
    uint64_t* kind_arena = segment ? &t->segment_arena_used : &t->arena_used;
    const uint64_t kind_arena_bytes = segment ? t->segment_arena : t->arena_bytes - t->segment_arena;
    const uint64_t arena_base = segment ? t->arena_bytes - t->segment_arena : 0;
    // Cheap early outs, so that a full table does not reserve (and lose) arena bytes for nothing.
    if (__atomic_load_n(kind_rows, __ATOMIC_RELAXED) >= kind_capacity) return kArmRowsFull;
    uint64_t offset = 0;
    if (id.size > kArmInlineId && !reserve(kind_arena, id.size, kind_arena_bytes, &offset)) return kArmArenaFull;
    offset += arena_base;
    uint64_t r, kind_row;
    // Losing this race wastes the arena bytes just reserved; rows fill up only once, so that is bounded.
    if (!reserve(kind_rows, 1, kind_capacity, &kind_row)) return kArmRowsFull;
    if (!reserve(&t->rows_used, 1, t->capacity, &r)) return kArmRowsFull;  // not reached: the budgets add up

    ArmRecord& rec = records_of(t)[r];
    rec.hash = h;
    rec.alpha0 = alpha0;
    rec.beta0 = beta0;
    rec.id_size = static_cast<uint32_t>(id.size);
    if (id.size > kArmInlineId) {
        rec.id_offset = offset;
        std::memcpy(arena_of(t) + offset, id.data, id.size);
    } else if (id.size != 0) {
        std::memcpy(rec.id_inline, id.data, id.size);
    }
    // Flags are set before publication, so a published row always has them (a reader of the raw records
    // sees flags 0 only on rows not yet published, or never to be). Release: a reader that sees them
    // (arm_id_at, with acquire) sees the id written above.
    __atomic_store_n(&rec.flags, flags, __ATOMIC_RELEASE);

    uint64_t* slots = sp.base;
    const uint32_t tag = tag_of(h);
    const uint64_t mine = make_slot(tag, r);
    const ArmRecord* recs = records_of(t);
    for (;;) {
        uint64_t expected = 0;
        // Release: whoever acquires this slot sees the record written above.
        if (__atomic_compare_exchange_n(&slots[j], &expected, mine, false, __ATOMIC_RELEASE, __ATOMIC_ACQUIRE)) {
            *row = static_cast<int64_t>(r);
            return kArmOk;
        }
        if (slot_tag(expected) == tag && holds(t, recs[slot_row(expected)], h, id)) {
            // Another process published this id first: use its row, give up ours.
            __atomic_store_n(&rec.flags, kArmWasted, __ATOMIC_RELAXED);
            __atomic_fetch_add(&t->rows_wasted, 1, __ATOMIC_RELAXED);
            *row = static_cast<int64_t>(slot_row(expected));
            *existed = true;
            return kArmOk;
        }
        s = probe(t, sp, h, id, next_slot(sp, j), &j);
        if (s != 0) {
            __atomic_store_n(&rec.flags, kArmWasted, __ATOMIC_RELAXED);
            __atomic_fetch_add(&t->rows_wasted, 1, __ATOMIC_RELAXED);
            *row = static_cast<int64_t>(slot_row(s));
            *existed = true;
            return kArmOk;
        }
    }
}

// Raises the counts of one row to at least the given ones. Counts only grow, so the larger of two readings is the
// newer one: applying readings in any order, and any of them twice, leaves the same values (a max is idempotent and
// commutative). Non-negative doubles order as their bit patterns do, but the loop compares values to stay obvious.
// Counts without decay are plain doubles (parity 0).
void raise_count(uint64_t* word, double value) noexcept {
    uint64_t old = __atomic_load_n(word, __ATOMIC_RELAXED);
    while (value_of(old) < value) {
        if (__atomic_compare_exchange_n(word, &old, word_of(value, 0), true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            return;
        }
    }
}

// Raises one forward-decayed count to at least `value`, a sum relative to `landmark`: converted to the landmark of
// the count's own epoch (read after the word, as add_count does) before the max; the parity is kept, so a sweep
// and this never lose one another.
void raise_decayed_count(const ArmTable* t, uint64_t* word, double value, double landmark) noexcept {
    uint64_t old = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    for (;;) {
        const uint64_t epoch = __atomic_load_n(&t->epoch, __ATOMIC_ACQUIRE);
        const uint64_t own = (old & kParity) == parity_of(epoch) || epoch == 0 ? epoch : epoch - 1;
        const double converted = value * std::exp2((landmark - landmark_of(t, own)) / t->half_life_s);
        if (!(value_of(old) < converted)) return;
        if (__atomic_compare_exchange_n(word, &old, word_of(converted, old & kParity), true, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            return;
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Table

std::size_t arm_table_bytes(std::size_t capacity, std::size_t id_bytes, std::size_t segment_rows) noexcept {
    if (capacity > kArmMaxRows || segment_rows > capacity) return 0;
    constexpr std::size_t kMax = std::size_t{1} << 60;
    if (id_bytes > kMax) return 0;
    const std::size_t slots =
        (slot_count_for(capacity - segment_rows) + slot_count_for(segment_rows)) * sizeof(uint64_t);
    return sizeof(ArmTable) + slots + capacity * sizeof(ArmRecord) + round_up(id_bytes, kLine);
}

int arm_table_create(void* buffer, std::size_t size, std::size_t capacity, std::size_t id_bytes,
                     std::size_t segment_rows, std::size_t segment_id_bytes, double half_life_s, double landmark,
                     ArmTable** out) noexcept {
    *out = nullptr;
    const std::size_t need = arm_table_bytes(capacity, id_bytes, segment_rows);
    if (need == 0 || segment_id_bytes > id_bytes) return kArmTooBig;
    if (size < need) return kArmBadLayout;
    ArmTable* t = static_cast<ArmTable*>(buffer);
    t->version = kArmLayoutVersion;
    t->record_bytes = sizeof(ArmRecord);
    t->total_bytes = need;
    t->capacity = capacity;
    t->arena_bytes = round_up(id_bytes, kLine);
    t->slot_count = slot_count_for(capacity - segment_rows);
    t->segment_slot_count = slot_count_for(segment_rows);
    t->segment_rows = segment_rows;
    t->segment_arena = segment_id_bytes;  // the arms' part is the rest, rounded up with the whole
    t->half_life_s = half_life_s;
    t->landmark0 = landmark;
    draw_hash_key(t->key);
    __atomic_store_n(&t->rows_used, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->arena_used, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->rows_wasted, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->arm_rows_used, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->segment_rows_used, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->segment_arena_used, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->epoch, 0, __ATOMIC_RELAXED);
    // The magic goes last: a process that attaches and sees it sees the rest of the header.
    __atomic_store_n(&t->magic, kArmMagic, __ATOMIC_RELEASE);
    *out = t;
    return kArmOk;
}

int arm_table_attach(void* buffer, std::size_t size, ArmTable** out) noexcept {
    *out = nullptr;
    if (size < sizeof(ArmTable)) return kArmBadLayout;
    ArmTable* t = static_cast<ArmTable*>(buffer);
    if (__atomic_load_n(&t->magic, __ATOMIC_ACQUIRE) != kArmMagic) return kArmBadLayout;
    if (t->version != kArmLayoutVersion || t->record_bytes != sizeof(ArmRecord)) return kArmBadLayout;
    if (t->capacity > kArmMaxRows || t->arena_bytes % kLine != 0) return kArmBadLayout;
    if (t->segment_rows > t->capacity || t->segment_arena > t->arena_bytes) return kArmBadLayout;
    if (t->slot_count != slot_count_for(t->capacity - t->segment_rows)) return kArmBadLayout;
    if (t->segment_slot_count != slot_count_for(t->segment_rows)) return kArmBadLayout;
    if (!(t->half_life_s >= 0.0) || !std::isfinite(t->half_life_s) || !std::isfinite(t->landmark0)) {
        return kArmBadLayout;
    }
    const std::size_t need = arm_table_bytes(t->capacity, t->arena_bytes, t->segment_rows);
    if (need == 0 || need != t->total_bytes || need > size) return kArmBadLayout;
    if (__atomic_load_n(&t->rows_used, __ATOMIC_RELAXED) > t->capacity) return kArmBadLayout;
    if (__atomic_load_n(&t->arena_used, __ATOMIC_RELAXED) > t->arena_bytes) return kArmBadLayout;
    *out = t;
    return kArmOk;
}

std::size_t arm_table_capacity(const ArmTable* t) noexcept { return t->capacity; }

std::size_t arm_table_id_bytes(const ArmTable* t) noexcept { return t->arena_bytes; }

std::size_t arm_table_memory_bytes(const ArmTable* t) noexcept { return t->total_bytes; }

std::size_t arm_table_rows(const ArmTable* t) noexcept { return __atomic_load_n(&t->rows_used, __ATOMIC_ACQUIRE); }

uint64_t arm_table_rows_wasted(const ArmTable* t) noexcept {
    return __atomic_load_n(&t->rows_wasted, __ATOMIC_RELAXED);
}

std::size_t arm_table_arena_used(const ArmTable* t) noexcept {
    return __atomic_load_n(&t->arena_used, __ATOMIC_RELAXED) + __atomic_load_n(&t->segment_arena_used, __ATOMIC_RELAXED);
}

std::size_t arm_table_segment_rows(const ArmTable* t) noexcept { return t->segment_rows; }

std::size_t arm_table_segment_rows_used(const ArmTable* t) noexcept {
    return __atomic_load_n(&t->segment_rows_used, __ATOMIC_RELAXED);
}

double arm_table_half_life(const ArmTable* t) noexcept { return t->half_life_s; }

double arm_table_landmark(const ArmTable* t) noexcept {
    return landmark_of(t, __atomic_load_n(&t->epoch, __ATOMIC_ACQUIRE));
}

const ArmRecord* arm_table_records(const ArmTable* t) noexcept { return records_of(t); }

IdRef arm_id_at(const ArmTable* t, std::size_t row) noexcept {
    if (row >= arm_table_rows(t)) return IdRef{nullptr, 0};
    const ArmRecord& r = records_of(t)[row];
    const uint32_t flags = __atomic_load_n(&r.flags, __ATOMIC_ACQUIRE);
    if ((flags & (kArmCatalogue | kArmRuntime)) == 0) return IdRef{nullptr, 0};
    return IdRef{id_bytes_of(t, r), r.id_size};
}

int arm_table_load(ArmTable* t, const IdRef* ids, const double* alpha0, const double* beta0, std::size_t n,
                   std::size_t* done, int64_t* dup_row) noexcept {
    // Hash a window ahead and prefetch its home slots, so that the slot misses of a bulk load overlap.
    constexpr std::size_t kAhead = 16;
    uint64_t hash[kAhead];
    // Prefetches only: an id's kind picks its slots again in find_or_insert.
    const SlotSpan sp = arm_slots(t);
    const std::size_t first = std::min(kAhead, n);
    for (std::size_t i = 0; i < first; ++i) {
        hash[i] = hash_id_keyed(ids[i], t->key);
        __builtin_prefetch(&sp.base[home_of(sp, hash[i])]);
    }
    for (std::size_t i = 0; i < n; ++i) {
        const uint64_t h = hash[i % kAhead];
        if (i + kAhead < n) {
            const uint64_t ahead = hash_id_keyed(ids[i + kAhead], t->key);
            hash[i % kAhead] = ahead;
            __builtin_prefetch(&sp.base[home_of(sp, ahead)]);
        }
        int64_t row;
        bool existed;
        const int status = find_or_insert(t, ids[i], h, alpha0[i], beta0[i], kArmCatalogue, &row, &existed);
        if (status != kArmOk) {
            *done = i;
            return status;
        }
        if (existed) {
            *done = i;
            *dup_row = row;
            return kArmDuplicate;
        }
    }
    *done = n;
    return kArmOk;
}

namespace {

// The batched lookup under arm_gather_fill and arm_gather_segment_fill: found(i, record, row) for each ids[i] the
// table holds, missing(i) for the others, in order; returns how many were found.
// All ids are of the kind whose slots `sp` are.
template <class Found, class Missing>
std::size_t gather_rows(const ArmTable* t, const SlotSpan& sp, const IdRef* ids, std::size_t n, Found found,
                        Missing missing) noexcept {
    // As gather_params_fill (id_index.cpp), ids go in groups, one pass per level of misses (slot, record,
    // arena bytes of long ids), each pass prefetching the next level for the whole group, so that the misses
    // of a group overlap. In addition, the next group is hashed and its slots prefetched between the two
    // levels of this one, so that one group's wait for its records covers the next group's wait for slots.
    constexpr std::size_t kGroup = 32;
    uint64_t hash[2][kGroup];
    std::size_t slot[2][kGroup];
    uint64_t value[kGroup];
    // Local copies: the compiler may not keep header fields in registers across the acquire loads below.
    const uint64_t key[kHashKeyWords] = {t->key[0], t->key[1], t->key[2]};
    const std::size_t n_slots = sp.count;
    const uint64_t* slots = sp.base;
    const ArmRecord* rec = records_of(t);
    const char* arena = arena_of(t);
    std::size_t known = 0;
    auto start_group = [&](std::size_t base, uint64_t* h, std::size_t* home) noexcept {
        const std::size_t m = std::min(kGroup, n - base);
        for (std::size_t i = 0; i < m; ++i) {
            h[i] = hash_id_keyed(ids[base + i], key);
            home[i] = static_cast<std::size_t>(((h[i] & 0xFFFFFFFFu) * n_slots) >> 32);  // home_of
            __builtin_prefetch(&slots[home[i]]);
        }
    };
    if (n != 0) start_group(0, hash[0], slot[0]);
    for (std::size_t base = 0, cur = 0; base < n; base += kGroup, cur ^= 1) {
        const std::size_t m = std::min(kGroup, n - base);
        const IdRef* g = ids + base;
        const uint64_t* h = hash[cur];
        std::size_t* sl = slot[cur];
        // The first slot with this tag, or the empty slot that ends the run.
        bool any_long = false;
        for (std::size_t i = 0; i < m; ++i) {
            const uint32_t tag = tag_of(h[i]);
            std::size_t j = sl[i];
            uint64_t s;
            while ((s = load_slot(&slots[j])) != 0 && slot_tag(s) != tag) j = j + 1 == n_slots ? 0 : j + 1;
            sl[i] = j;
            value[i] = s;
            if (s != 0) __builtin_prefetch(&rec[slot_row(s)]);
            any_long |= g[i].size > kArmInlineId;
        }
        if (base + kGroup < n) start_group(base + kGroup, hash[cur ^ 1], slot[cur ^ 1]);
        // Ids of more than kArmInlineId bytes are compared with bytes in the arena: a third level.
        for (std::size_t i = 0; any_long && i < m; ++i) {
            if (value[i] == 0 || g[i].size <= kArmInlineId) continue;
            const ArmRecord& r = rec[slot_row(value[i])];
            if (r.hash == h[i]) __builtin_prefetch(arena + r.id_offset);
        }
        for (std::size_t i = 0; i < m; ++i) {
            uint64_t s = value[i];
            // Equal tags but another id: probe on past it.
            if (s != 0 && !holds(t, rec[slot_row(s)], h[i], g[i])) {
                std::size_t end;
                s = probe(t, sp, h[i], g[i], next_slot(sp, sl[i]), &end);
            }
            if (s != 0) {
                const std::size_t row = slot_row(s);
                found(base + i, rec[row], row);
                ++known;
            } else {
                missing(base + i);
            }
        }
    }
    return known;
}

}  // namespace

int arm_gather_fill(const ArmTable* t, const IdRef* ids, std::size_t n, double prior_alpha, double prior_beta,
                    double now, double* alpha_out, double* beta_out, int32_t* rows_out, std::size_t* n_known) noexcept {
    const Scales scales = scales_at(t, now);
    *n_known = gather_rows(
        t, arm_slots(t), ids, n,
        [&](std::size_t i, const ArmRecord& r, std::size_t row) noexcept {
            posterior(r, scales, &alpha_out[i], &beta_out[i]);
            rows_out[i] = static_cast<int32_t>(row);
        },
        [&](std::size_t i) noexcept {
            alpha_out[i] = prior_alpha;
            beta_out[i] = prior_beta;
            rows_out[i] = -1;
        });
    return kArmOk;
}

std::size_t segment_keys_bytes(IdRef segment, const IdRef* ids, std::size_t n) noexcept {
    std::size_t bytes = n * (2 + segment.size);
    for (std::size_t i = 0; i < n; ++i) bytes += ids[i].size;
    return bytes;
}

namespace {

// Writes "\0" + segment + "\0" + id at `to`; returns the bytes written.
std::size_t write_key(IdRef segment, IdRef id, char* to) noexcept {
    to[0] = '\0';
    if (segment.size != 0) std::memcpy(to + 1, segment.data, segment.size);
    to[1 + segment.size] = '\0';
    if (id.size != 0) std::memcpy(to + 2 + segment.size, id.data, id.size);
    return 2 + segment.size + id.size;
}

}  // namespace

void segment_keys_fill(IdRef segment, const IdRef* ids, std::size_t n, char* buffer, IdRef* keys) noexcept {
    for (std::size_t i = 0; i < n; ++i) {
        const std::size_t size = write_key(segment, ids[i], buffer);
        keys[i] = IdRef{buffer, size};
        buffer += size;
    }
}

int arm_gather_segment_fill(const ArmTable* t, const IdRef* ids, const IdRef* keys, std::size_t n, double weight,
                            double prior_alpha, double prior_beta, double now, double* alpha_out, double* beta_out,
                            int32_t* rows_out, int32_t* pair_rows_out, double* pair_counts,
                            std::size_t* n_known) noexcept {
    // One lookup of the 2n rows, arms then keys, so that the misses of both overlap. The keys' counts wait in
    // pair_counts (impressions, rewards) until the arms' means are known.
    const Scales scales = scales_at(t, now);
    std::size_t known = 0;
    gather_rows(
        t, arm_slots(t), ids, n,
        [&](std::size_t i, const ArmRecord& r, std::size_t row) noexcept {
            posterior(r, scales, &alpha_out[i], &beta_out[i]);
            rows_out[i] = static_cast<int32_t>(row);
            ++known;
        },
        [&](std::size_t i) noexcept {
            alpha_out[i] = prior_alpha;
            beta_out[i] = prior_beta;
            rows_out[i] = -1;
        });
    gather_rows(
        t, key_slots(t), keys, n,
        [&](std::size_t i, const ArmRecord& r, std::size_t row) noexcept {
            pair_counts[2 * i] = read_count(__atomic_load_n(&r.impressions, __ATOMIC_ACQUIRE), scales);
            pair_counts[2 * i + 1] = read_count(__atomic_load_n(&r.rewards, __ATOMIC_ACQUIRE), scales);
            pair_rows_out[i] = static_cast<int32_t>(row);
        },
        [&](std::size_t i) noexcept {
            pair_counts[2 * i] = 0.0;
            pair_counts[2 * i + 1] = 0.0;
            pair_rows_out[i] = -1;
        });
    for (std::size_t i = 0; i < n; ++i) {
        // mu in (0, 1) as alpha, beta > 0; so both shapes are > 0 for weight > 0.
        const double mu = alpha_out[i] / (alpha_out[i] + beta_out[i]);
        const double shown = pair_counts[2 * i], got = pair_counts[2 * i + 1];
        alpha_out[i] = weight * mu + got;
        beta_out[i] = weight * (1.0 - mu) + std::max(shown - got, 0.0);
    }
    *n_known = known;
    return kArmOk;
}



int64_t arm_find(const ArmTable* t, IdRef id) noexcept {
    const uint64_t h = hash_id_keyed(id, t->key);
    std::size_t end;
    const SlotSpan sp = slots_for(t, id);
    const uint64_t s = probe(t, sp, h, id, home_of(sp, h), &end);
    return s == 0 ? -1 : static_cast<int64_t>(slot_row(s));
}

int arm_find_or_insert(ArmTable* t, IdRef id, double alpha0, double beta0, uint32_t flags, int64_t* row) noexcept {
    bool existed;
    return find_or_insert(t, id, hash_id_keyed(id, t->key), alpha0, beta0, flags, row, &existed);
}

int arm_add_impressions(ArmTable* t, const IdRef* ids, const int32_t* rows, const intptr_t* picks,
                        std::size_t n_picks, double prior_alpha, double prior_beta, uint32_t flags, double now,
                        std::size_t* n_failed) noexcept {
    ArmRecord* rec = records_of(t);
    std::size_t failed = 0, next_id = 0;
    for (std::size_t k = 0; k < n_picks; ++k) {
        int64_t row = rows[picks[k]];
        if (row < 0) {
            const IdRef id = ids[next_id++];
            bool existed;
            if (find_or_insert(t, id, hash_id_keyed(id, t->key), prior_alpha, prior_beta, flags, &row,
                               &existed) != kArmOk) {
                ++failed;
                continue;
            }
        }
        add_count(t, &rec[row].impressions, 1.0, now);
    }
    *n_failed = failed;
    return kArmOk;
}

void arm_add_counts(ArmTable* t, std::size_t row, double impressions, double rewards, double when) noexcept {
    ArmRecord& r = records_of(t)[row];
    add_count(t, &r.impressions, impressions, when);
    add_count(t, &r.rewards, rewards, when);
}

void arm_read_counts(const ArmTable* t, std::size_t row, double now, double* impressions, double* rewards) noexcept {
    const ArmRecord& r = records_of(t)[row];
    const uint64_t shown = __atomic_load_n(&r.impressions, __ATOMIC_ACQUIRE);
    const uint64_t got = __atomic_load_n(&r.rewards, __ATOMIC_ACQUIRE);
    const Scales scales = scales_at(t, now);
    *impressions = read_count(shown, scales);
    *rewards = read_count(got, scales);
}

void arm_counts_fill(const ArmTable* t, std::size_t n, double now, double* impressions, double* rewards) noexcept {
    const ArmRecord* rec = records_of(t);
    // Every word is loaded before the epoch (see the header), kept meanwhile in the output as its bits.
    for (std::size_t i = 0; i < n; ++i) {
        const uint64_t shown = __atomic_load_n(&rec[i].impressions, __ATOMIC_ACQUIRE);
        const uint64_t got = __atomic_load_n(&rec[i].rewards, __ATOMIC_ACQUIRE);
        std::memcpy(&impressions[i], &shown, sizeof shown);
        std::memcpy(&rewards[i], &got, sizeof got);
    }
    const Scales scales = scales_at(t, now);
    for (std::size_t i = 0; i < n; ++i) {
        uint64_t shown, got;
        std::memcpy(&shown, &impressions[i], sizeof shown);
        std::memcpy(&got, &rewards[i], sizeof got);
        impressions[i] = read_count(shown, scales);
        rewards[i] = read_count(got, scales);
    }
}

int arm_table_rebase(ArmTable* t, double now) noexcept {
    if (t->half_life_s == 0.0) return 0;
    uint64_t epoch = __atomic_load_n(&t->epoch, __ATOMIC_ACQUIRE);
    if (!(now - landmark_of(t, epoch) > 0.5 * span_of(t))) return 0;
    ArmRecord* rec = records_of(t);
    // Every count into the current epoch first: rows written since the last sweep (new rows start at parity 0)
    // may be of the epoch before, and must not be two behind once the epoch moves.
    std::size_t rows = arm_table_rows(t);
    for (std::size_t i = 0; i < rows; ++i) {
        sweep_count(&rec[i].impressions, epoch);
        sweep_count(&rec[i].rewards, epoch);
    }
    if (!__atomic_compare_exchange_n(&t->epoch, &epoch, epoch + 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        return 0;  // another process moved it
    }
    rows = arm_table_rows(t);
    for (std::size_t i = 0; i < rows; ++i) {
        sweep_count(&rec[i].impressions, epoch + 1);
        sweep_count(&rec[i].rewards, epoch + 1);
    }
    return 1;
}

namespace {

// The rows of ids[0..n), each inserted with the prior if the table lacks it, handed to raise(record, i); returns how
// many could not be inserted (the table or the segments' budget is full).
template <class Raise>
std::size_t raise_rows(ArmTable* t, const IdRef* ids, std::size_t n, double prior_alpha, double prior_beta,
                       Raise raise) noexcept {
    ArmRecord* rec = records_of(t);
    std::size_t failed = 0;
    for (std::size_t i = 0; i < n; ++i) {
        int64_t row;
        bool existed;
        if (find_or_insert(t, ids[i], hash_id_keyed(ids[i], t->key), prior_alpha, prior_beta, kArmRuntime, &row,
                           &existed) != kArmOk) {
            ++failed;
            continue;
        }
        raise(rec[row], i);
    }
    return failed;
}

}  // namespace

int arm_raise_counts(ArmTable* t, const IdRef* ids, const uint64_t* impressions, const double* rewards,
                     std::size_t n, double prior_alpha, double prior_beta, std::size_t* n_failed) noexcept {
    *n_failed = raise_rows(t, ids, n, prior_alpha, prior_beta, [&](ArmRecord& r, std::size_t i) noexcept {
        raise_count(&r.impressions, static_cast<double>(impressions[i]));
        raise_count(&r.rewards, rewards[i]);
    });
    return kArmOk;
}

int arm_raise_decayed(ArmTable* t, const IdRef* ids, const double* impressions, const double* rewards,
                      const double* landmarks, std::size_t n, double prior_alpha, double prior_beta,
                      std::size_t* n_failed) noexcept {
    *n_failed = raise_rows(t, ids, n, prior_alpha, prior_beta, [&](ArmRecord& r, std::size_t i) noexcept {
        raise_decayed_count(t, &r.impressions, impressions[i], landmarks[i]);
        raise_decayed_count(t, &r.rewards, rewards[i], landmarks[i]);
    });
    return kArmOk;
}

// ---------------------------------------------------------------------------------------------------------
// CSV loading

namespace {

inline bool is_space(unsigned char c) noexcept {
    // The ASCII characters Python's str.strip() removes: \t \n \v \f \r, \x1c-\x1f and space.
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

IdRef strip(IdRef f) noexcept {
    const char* b = f.data;
    const char* e = f.data + f.size;
    while (b < e && is_space(static_cast<unsigned char>(*b))) ++b;
    while (e > b && is_space(static_cast<unsigned char>(e[-1]))) --e;
    return IdRef{b, static_cast<std::size_t>(e - b)};
}

bool equals(IdRef f, const char* word) noexcept {
    const std::size_t n = std::strlen(word);
    return f.size == n && std::memcmp(f.data, word, n) == 0;
}

// A finite number > 0 written as Python's float() reads it (surrounding whitespace, an optional sign,
// decimal or exponent notation); NaN (every comparison false) when it is not. Python also takes digit
// separators ("1_000"); a catalogue does not use them, and such a value is reported as bad.
double parse_positive(IdRef f) noexcept {
    f = strip(f);
    const char* b = f.data;
    const char* e = f.data + f.size;
    if (b < e && *b == '+') ++b;
    double x = NAN;
    if (b == e || *b == '-' || *b == '+') return NAN;
    const auto [end, ec] = std::from_chars(b, e, x, std::chars_format::general);
    if (ec != std::errc() || end != e) return NAN;
    return (x > 0.0 && std::isfinite(x)) ? x : NAN;
}

// Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF (what Python's decoder accepts).
bool valid_utf8(IdRef f) noexcept {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(f.data);
    const unsigned char* e = p + f.size;
    while (p < e) {
        const unsigned char c = *p;
        if (c < 0x80) {
            ++p;
            continue;
        }
        std::size_t n;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            return false;
        }
        if (static_cast<std::size_t>(e - p) <= n) return false;
        if (p[1] < lo || p[1] > hi) return false;
        for (std::size_t k = 2; k <= n; ++k) {
            if (p[k] < 0x80 || p[k] > 0xBF) return false;
        }
        p += n + 1;
    }
    return true;
}

constexpr std::size_t kNoColumn = ~std::size_t{0};

}  // namespace

struct ArmCsvLoad {
    ArmTable* table = nullptr;  // nullptr: scan only
    std::size_t errors_max = 0;
    std::vector<ArmCsvError> errors;
    uint64_t problems = 0;
    bool header_done = false;
    std::size_t col_id = kNoColumn, col_alpha = kNoColumn, col_beta = kNoColumn;
    std::size_t width = 0, header_fields = 0;
    uint64_t line = 0;         // lines consumed so far
    uint64_t failed_line = 0;  // of the row that found the table full
    uint64_t rows = 0;
    uint64_t id_bytes = 0;
    std::size_t start_row = 0;  // table rows before this load
    // Line of the k-th row loaded, stored sparsely: (k, line - k) wherever line - k changes (after blank
    // lines, bad rows, multi-line records), so that a file without them costs one entry.
    std::vector<std::pair<uint64_t, uint64_t>> line_marks;
    // Ids of rows that had bad parameters: not loaded, but a later row with the same id is a duplicate.
    std::unordered_map<std::string, uint64_t> bad_ids;
    // Good rows wait here in small batches: each one's home slot is prefetched when it is parsed, and the
    // batch is inserted, in order, when full or when the block ends (its ids may point into the block). A
    // bulk load is otherwise one slot miss after another.
    struct Pending {
        IdRef id;
        double alpha, beta;
        uint64_t line, hash;
    };
    static constexpr std::size_t kBatch = 64;
    Pending pending[kBatch];
    std::string pending_ids[kBatch];  // copies of quoted ids, which live in `scratch` only until the next record
    std::size_t n_pending = 0;
    // Unescaped copies of the quoted fields the current record needs, by role: id, alpha, beta, first.
    std::string scratch[4];
    IdRef field[4];
    bool id_quoted = false;  // field[0] points into scratch[0]
    std::vector<std::string> header;

    uint64_t line_of_row(uint64_t k) const noexcept {
        auto it = std::upper_bound(line_marks.begin(), line_marks.end(), std::make_pair(k, ~uint64_t{0}));
        return it == line_marks.begin() ? 0 : k + std::prev(it)->second;
    }

    void mark_row_line(uint64_t line_no) {
        const uint64_t delta = line_no - rows;
        if (line_marks.empty() || line_marks.back().second != delta) line_marks.emplace_back(rows, delta);
    }

    void report(int problem, uint64_t line_no, uint64_t count, uint64_t expected, uint64_t first_line, IdRef text) {
        ++problems;
        if (errors.size() >= errors_max) return;
        ArmCsvError e{};
        e.problem = problem;
        e.line = line_no;
        e.count = count;
        e.expected = expected;
        e.first_line = first_line;
        e.text_size = text.size;
        if (text.size != 0) std::memcpy(e.text, text.data, std::min(text.size, kCsvErrorText));
        errors.push_back(e);
    }

    int header_record(std::size_t n_fields);
    int data_record(std::size_t n_fields, uint64_t line_no);
    int insert_row(IdRef id, uint64_t h, double alpha, double beta, uint64_t line_no);
    int flush();
    int parse(const char* data, std::size_t n, bool eof, std::size_t* consumed);
    int feed(const char* data, std::size_t n, bool eof, std::size_t* consumed) {
        const int status = parse(data, n, eof, consumed);
        const int flushed = flush();
        return status != kArmOk ? status : flushed;
    }
};

int ArmCsvLoad::header_record(std::size_t n_fields) {
    header_fields = n_fields;
    for (std::size_t k = 0; k < header.size(); ++k) {
        const IdRef name = strip(IdRef{header[k].data(), header[k].size()});
        // The first column of each name counts, as list.index finds it.
        if (col_id == kNoColumn && equals(name, "entity_id")) col_id = k;
        if (col_alpha == kNoColumn && equals(name, "alpha")) col_alpha = k;
        if (col_beta == kNoColumn && equals(name, "beta")) col_beta = k;
    }
    if (col_id == kNoColumn || col_alpha == kNoColumn || col_beta == kNoColumn) return kArmCsvBadHeader;
    width = std::max({col_id, col_alpha, col_beta}) + 1;
    header_done = true;
    header.clear();
    return kArmOk;
}

int ArmCsvLoad::data_record(std::size_t n_fields, uint64_t line_no) {
    if (n_fields == 1 && strip(field[3]).size == 0) return kArmOk;  // a blank line
    if (n_fields < width) {
        const int status = flush();  // reports go out in line order
        report(kCsvTooFewFields, line_no, n_fields, header_fields, 0, IdRef{nullptr, 0});
        return status;
    }
    if (table == nullptr) {
        // A scan: count rows and the bytes of ids as written, an upper bound on what they need stripped.
        ++rows;
        if (field[0].size > kArmInlineId) id_bytes += field[0].size;
        return kArmOk;
    }
    const IdRef id = strip(field[0]);
    const double alpha = parse_positive(field[1]);
    const double beta = parse_positive(field[2]);
    if (id.size != 0 && !std::isnan(alpha) && !std::isnan(beta) && valid_utf8(id)) {
        // The common case: queue it (a duplicate is found when it is inserted).
        Pending& p = pending[n_pending];
        p.id = id;
        if (id_quoted) {
            pending_ids[n_pending].assign(id.data, id.size);
            p.id = IdRef{pending_ids[n_pending].data(), id.size};
        }
        p.alpha = alpha;
        p.beta = beta;
        p.line = line_no;
        p.hash = hash_id_keyed(id, table->key);
        const SlotSpan sp = slots_for(table, id);
        __builtin_prefetch(&sp.base[home_of(sp, p.hash)], 1);  // for writing: it will be swapped in
        return ++n_pending == kBatch ? flush() : kArmOk;
    }
    // A bad row: its problems are reported in line order, after those of the rows queued before it.
    int status = flush();
    if (status != kArmOk) return status;
    bool new_id = false;
    if (id.size == 0) {
        report(kCsvEmptyId, line_no, 0, 0, 0, IdRef{nullptr, 0});
    } else if (!valid_utf8(id)) {
        report(kCsvBadUtf8, line_no, 0, 0, 0, id);
    } else {
        const int64_t row = arm_find(table, id);
        if (row >= 0) {
            const std::size_t r = static_cast<std::size_t>(row);
            const uint64_t first = r >= start_row && r - start_row < rows ? line_of_row(r - start_row) : 0;
            report(kCsvDuplicate, line_no, 0, 0, first, id);
        } else if (bad_ids.count(std::string(id.data, id.size)) != 0) {
            report(kCsvDuplicate, line_no, 0, 0, bad_ids[std::string(id.data, id.size)], id);
        } else {
            new_id = true;
        }
    }
    if (std::isnan(alpha)) report(kCsvBadAlpha, line_no, 0, 0, 0, field[1]);
    if (std::isnan(beta)) report(kCsvBadBeta, line_no, 0, 0, 0, field[2]);
    if (new_id && (std::isnan(alpha) || std::isnan(beta))) bad_ids.emplace(std::string(id.data, id.size), line_no);
    if (new_id && !std::isnan(alpha) && !std::isnan(beta)) {
        return insert_row(id, hash_id_keyed(id, table->key), alpha, beta, line_no);
    }
    return kArmOk;
}

int ArmCsvLoad::insert_row(IdRef id, uint64_t h, double alpha, double beta, uint64_t line_no) {
    if (!bad_ids.empty()) {
        const auto it = bad_ids.find(std::string(id.data, id.size));
        if (it != bad_ids.end()) {
            report(kCsvDuplicate, line_no, 0, 0, it->second, id);
            return kArmOk;
        }
    }
    int64_t row;
    bool existed;
    const int status = find_or_insert(table, id, h, alpha, beta, kArmCatalogue, &row, &existed);
    if (status != kArmOk) {
        failed_line = line_no;
        return status;
    }
    if (existed) {
        const std::size_t r = static_cast<std::size_t>(row);
        const uint64_t first = r >= start_row && r - start_row < rows ? line_of_row(r - start_row) : 0;
        report(kCsvDuplicate, line_no, 0, 0, first, id);
        return kArmOk;
    }
    mark_row_line(line_no);
    ++rows;
    return kArmOk;
}

int ArmCsvLoad::flush() {
    const std::size_t n = n_pending;
    n_pending = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const Pending& p = pending[i];
        const int status = insert_row(p.id, p.hash, p.alpha, p.beta, p.line);
        if (status != kArmOk) return status;
    }
    return kArmOk;
}

int ArmCsvLoad::parse(const char* data, std::size_t n, bool eof, std::size_t* consumed) {
    const char* p = data;
    const char* const end = data + n;
    *consumed = 0;
    // The role each column plays in a data record: 0 id, 1 alpha, 2 beta (3, the first field, is tracked
    // apart for the blank-line test). The header record keeps every field.
    while (p < end) {
        std::size_t k = 0;         // fields seen
        uint64_t inner_lines = 0;  // line breaks inside quoted fields
        bool unterminated_quote = false;
        const char* q = p;
        for (auto& s : scratch) s.clear();
        for (auto& f : field) f = IdRef{"", 0};
        id_quoted = false;
        if (!header_done) header.clear();
        for (;;) {
            // One field, from q.
            int role = -1;
            if (header_done) {
                if (k == col_id) role = 0;
                else if (k == col_alpha) role = 1;
                else if (k == col_beta) role = 2;
            }
            const bool keep = role >= 0 || k == 0 || !header_done;
            std::string* buf = nullptr;
            const char* r;
            IdRef view{q, 0};
            if (q < end && *q == '"') {
                // Quoted: up to the closing quote, "" standing for ", line breaks included; then, as
                // csv.reader does, anything up to the delimiter is appended as written.
                if (!header_done) {
                    header.emplace_back();
                    buf = &header.back();
                } else {
                    buf = &scratch[role >= 0 ? role : 3];  // used only when `keep`
                }
                buf->clear();
                ++q;
                for (;;) {
                    const std::size_t left = static_cast<std::size_t>(end - q);
                    const char* quote = static_cast<const char*>(std::memchr(q, '"', left));
                    const char* stop = quote == nullptr ? end : quote;
                    for (const char* c = q; c < stop; ++c) {
                        if (*c == '\n') {
                            if (c == q || c[-1] != '\r') ++inner_lines;
                        } else if (*c == '\r') {
                            ++inner_lines;
                        }
                    }
                    if (keep) buf->append(q, static_cast<std::size_t>(stop - q));
                    if (quote == nullptr) {
                        if (!eof) return kArmOk;  // needs more data
                        unterminated_quote = true;
                        q = end;
                        break;
                    }
                    q = quote + 1;
                    if (q == end && !eof) return kArmOk;  // "" or a closing quote? needs more data
                    if (q < end && *q == '"') {
                        if (keep) buf->push_back('"');
                        ++q;
                        continue;
                    }
                    break;
                }
                r = q;
                while (r < end && *r != ',' && *r != '\n' && *r != '\r') ++r;
                if (keep) buf->append(q, static_cast<std::size_t>(r - q));
                view = IdRef{buf->data(), buf->size()};
            } else {
                r = q;
                while (r < end && *r != ',' && *r != '\n' && *r != '\r') ++r;
                view = IdRef{q, static_cast<std::size_t>(r - q)};
                if (!header_done) header.emplace_back(q, static_cast<std::size_t>(r - q));
            }
            if (role >= 0) field[role] = view;
            if (role == 0) id_quoted = buf != nullptr;
            if (k == 0) field[3] = view;
            ++k;
            if (r == end) {
                if (!eof) return kArmOk;  // needs more data
                q = end;
                break;
            }
            if (*r == ',') {
                q = r + 1;
                continue;
            }
            if (*r == '\r') {
                if (r + 1 == end && !eof) return kArmOk;  // \r\n may be split between blocks
                q = (r + 1 < end && r[1] == '\n') ? r + 2 : r + 1;
            } else {
                q = r + 1;
            }
            break;
        }
        // A whole record: it ends on the line after its inner line breaks, unless it is a quoted field cut
        // short by the end of the file right after a line break (counted already).
        const bool ended_by_break = unterminated_quote && q > p && (q[-1] == '\n' || q[-1] == '\r');
        const uint64_t line_no = line + inner_lines + (ended_by_break ? 0 : 1);
        line = line_no;
        p = q;
        *consumed = static_cast<std::size_t>(p - data);
        if (!header_done) {
            const int status = header_record(k);
            if (status != kArmOk) return status;
            continue;
        }
        if (unterminated_quote) {
            const int status = flush();
            report(kCsvUnterminated, line_no, 0, 0, 0, IdRef{nullptr, 0});
            if (status != kArmOk) return status;
            continue;
        }
        const int status = data_record(k, line_no);
        if (status != kArmOk) return status;
    }
    if (eof && !header_done) return kArmCsvEmpty;
    return kArmOk;
}

int arm_csv_begin(ArmTable* table, std::size_t errors_max, ArmCsvLoad** out) noexcept {
    ArmCsvLoad* load = new (std::nothrow) ArmCsvLoad;
    *out = load;
    if (load == nullptr) return kArmNoMemory;
    load->table = table;
    load->errors_max = errors_max;
    load->start_row = table == nullptr ? 0 : arm_table_rows(table);
    return kArmOk;
}

void arm_csv_destroy(ArmCsvLoad* load) noexcept { delete load; }

int arm_csv_feed(ArmCsvLoad* load, const char* data, std::size_t n, bool eof, std::size_t* consumed) noexcept {
    try {
        return load->feed(data, n, eof, consumed);
    } catch (const std::bad_alloc&) {
        // The vectors, map and strings above are the only things that allocate.
        return kArmNoMemory;
    }
}

void arm_csv_counts(const ArmCsvLoad* load, ArmCsvCounts* counts) noexcept {
    counts->rows = load->rows;
    counts->id_bytes = load->id_bytes;
    counts->problems = load->problems;
    counts->reported = load->errors.size();
    counts->line = load->line;
    counts->failed_line = load->failed_line;
}

const ArmCsvError* arm_csv_errors(const ArmCsvLoad* load) noexcept { return load->errors.data(); }

}  // namespace mab
