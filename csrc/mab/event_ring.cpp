// The shared-memory event ring. See event_ring.hpp.
#include "mab/event_ring.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include <signal.h>
#include <unistd.h>

namespace mab {

// ---------------------------------------------------------------------------------------------------------
// Layout
//
// Every shared word is a plain uint64_t accessed only through the __atomic builtins below: the memory is the
// caller's, so no std::atomic is ever constructed in it, and 8-byte atomics are lock-free and address-free on
// every platform we build for (so two processes mapping the page at different addresses agree).

namespace {

constexpr uint64_t kMagic = 0x31474E4952564D41ULL;  // "AMVRING1" read as little-endian bytes
constexpr uint32_t kLayoutVersion = 2;  // 2: member words have a pending flag

// Slot state: seq << 4 | flags. seq 0 means "never used"; the first event is seq 1.
constexpr uint64_t kWriting = 1;  // a hold is filling the slot: its fields are not to be trusted
constexpr uint64_t kPending = 2;  // filled, not yet confirmed: holds of the same id treat it as held
constexpr uint64_t kDead = 4;     // evicted: its members (or its index entry) were overwritten
constexpr uint64_t kLost = 8;     // its hold lost a race for the id, or was abandoned half done
constexpr unsigned kSeqShift = 4;

// Member word: owner seq << 3 | flags; or, while a reward's mark is pending (kMemberPending), the owner's low 32
// bits << 32 | the marking process's id << 3 | flags. 32 bits name the owner well enough: a member is only read for
// an event whose slot still holds it, and a slot is reused within max_events < 2^32 events (owner_of).
constexpr uint64_t kMemberRewarded = 1;
constexpr uint64_t kMemberWriting = 2;
constexpr uint64_t kMemberPending = 4;  // with kMemberRewarded: marked, the reward not yet durable
constexpr unsigned kOwnerShift = 3;
constexpr uint64_t kPidMask = (uint64_t{1} << 29) - 1;  // Linux pids are below 2^22

// The owner of a member word: its event's sequence number, for a pending word the one of the same low 32 bits
// nearest `near` (the event the reader is looking at, or writing).
inline uint64_t owner_of(uint64_t word, uint64_t near) noexcept {
    if (!(word & kMemberPending)) return word >> kOwnerShift;
    const auto low = static_cast<uint32_t>(word >> 32);
    const uint32_t behind = static_cast<uint32_t>(near) - low;
    return behind < 0x80000000u ? near - behind : near + (low - static_cast<uint32_t>(near));
}

inline uint64_t pending_word(uint64_t seq, uint64_t pid) noexcept {
    return (seq & 0xFFFFFFFFu) << 32 | (pid & kPidMask) << kOwnerShift | kMemberPending | kMemberRewarded;
}

inline uint64_t pending_pid(uint64_t word) noexcept { return (word >> kOwnerShift) & kPidMask; }

// Whether process `pid` exists (a zombie, killed but not yet reaped, still does). EPERM: it exists as another user.
inline bool process_alive(uint64_t pid) noexcept {
    return pid != 0 && (kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
}

// Index probes stop at an empty entry or after this many entries (four cache lines). With at most one live
// entry per event slot and at least four entries per slot (load <= 0.25), linear probing makes a run of 32
// live entries about as likely as exp(-32 (a - 1 - ln a)) = 1.5e-9 per insertion; a hold that meets one
// evicts the oldest event in the run (counted in evicted_early).
constexpr uint64_t kProbeLimit = 32;

}  // namespace

struct EventRingHeader {
    // Immutable after create_event_ring (magic is written last).
    uint64_t magic;
    uint32_t version;
    uint32_t header_bytes;
    uint64_t max_events;
    uint64_t max_members;
    uint64_t index_entries;
    uint64_t total_bytes;
    double window_s;
    uint64_t key[3];
    uint64_t reserved[6];
    // Counters, each written by every hold, on their own cache lines.
    alignas(64) uint64_t next_seq;
    alignas(64) uint64_t member_head;  // members reserved since create; position p lives at p % max_members
    uint64_t evicted_early;
};
static_assert(sizeof(EventRingHeader) == kRingHeaderBytes, "the header is four cache lines");

namespace {

struct Slot {
    uint64_t state;       // seq << kSeqShift | flags
    uint64_t created;     // bits of a double
    uint64_t held_at;     // bits of a double: `now` of the hold, for the pending grace
    uint64_t member_pos;  // absolute position of the first member
    uint64_t n_members;
    uint64_t id_hash;
    uint64_t id_size;
    uint64_t id_words[kMaxEventIdBytes / 8];  // the event id's bytes, in memory order
    uint64_t tag;         // the caller's word for the event (hold_event), 0 for none
};
static_assert(sizeof(Slot) == kEventSlotBytes, "three cache lines per event");

struct Member {
    uint64_t hash;  // keyed hash of the id's bytes
    uint64_t word;  // owner seq << kOwnerShift | flags
};
static_assert(sizeof(Member) == kMemberBytes, "four members per cache line");

static_assert(__atomic_always_lock_free(sizeof(uint64_t), 0), "shared words must be lock-free atomics");

inline uint64_t load_acquire(const uint64_t* p) noexcept { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline uint64_t load_relaxed(const uint64_t* p) noexcept { return __atomic_load_n(p, __ATOMIC_RELAXED); }
inline uint64_t load_sc(const uint64_t* p) noexcept { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
inline void store_relaxed(uint64_t* p, uint64_t v) noexcept { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
inline void store_release(uint64_t* p, uint64_t v) noexcept { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
inline void store_sc(uint64_t* p, uint64_t v) noexcept { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
// On failure `expected` receives the current value.
inline bool cas(uint64_t* p, uint64_t& expected, uint64_t desired) noexcept {
    return __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
inline uint64_t fetch_add(uint64_t* p, uint64_t v) noexcept { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

inline uint64_t bits_of(double x) noexcept {
    uint64_t b;
    std::memcpy(&b, &x, sizeof b);
    return b;
}

inline double double_of(uint64_t b) noexcept {
    double x;
    std::memcpy(&x, &b, sizeof x);
    return x;
}

std::size_t index_entries_for(uint64_t max_events) noexcept {
    std::size_t entries = 16;
    while (entries < 4 * max_events) entries <<= 1;
    return entries;
}

inline Slot* slot_at(const EventRingView* r, uint64_t i) noexcept {
    return reinterpret_cast<Slot*>(r->slots) + i;
}

inline uint64_t entry_of(uint64_t id_hash, uint64_t slot) noexcept { return (id_hash >> 32) << 32 | (slot + 1); }
inline uint64_t entry_tag(uint64_t entry) noexcept { return entry >> 32; }
inline uint64_t entry_slot(uint64_t entry) noexcept { return (entry & 0xFFFFFFFFu) - 1; }

inline bool in_window(const EventRingView* r, double created, double now) noexcept {
    return now - created <= r->window_s;
}

// Splitmix64 and the multiplier rule of id_index.cpp's make_secret: multipliers odd, with balanced bits.
uint64_t odd_balanced(uint64_t x) noexcept {
    for (;;) {
        uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        const uint64_t k = (z ^ (z >> 31)) | 1;
        const int bits = __builtin_popcountll(k);
        if (bits >= 24 && bits <= 40) return k;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Reading a slot
//
// A seqlock read: the state word, then the fields, then the state word again. Only the sequence part must be
// unchanged: the flags move from pending to confirmed or dead without touching the fields, while a new event
// first sets kWriting under a new sequence number.

struct Snapshot {
    uint64_t state;  // the state word seen after the fields were read
    double created;
    double held_at;
    uint64_t member_pos;
    uint64_t n_members;
    uint64_t id_hash;
    uint64_t tag;
    bool same_id;  // the slot holds `id` (when one was given)
};

bool read_slot(const Slot* s, const IdRef* id, uint64_t id_hash, Snapshot* out) noexcept {
    const uint64_t before = load_acquire(&s->state);
    if (before & kWriting) return false;
    out->created = double_of(load_relaxed(&s->created));
    out->held_at = double_of(load_relaxed(&s->held_at));
    out->member_pos = load_relaxed(&s->member_pos);
    out->n_members = load_relaxed(&s->n_members);
    out->id_hash = load_relaxed(&s->id_hash);
    out->tag = load_relaxed(&s->tag);
    out->same_id = false;
    if (id != nullptr && out->id_hash == id_hash) {
        const uint64_t size = load_relaxed(&s->id_size);
        if (size == id->size && size <= kMaxEventIdBytes) {
            uint64_t words[kMaxEventIdBytes / 8];
            for (std::size_t i = 0; i < (size + 7) / 8; ++i) words[i] = load_relaxed(&s->id_words[i]);
            out->same_id = std::memcmp(words, id->data, size) == 0;
        }
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    const uint64_t after = load_relaxed(&s->state);
    if ((after >> kSeqShift) != (before >> kSeqShift) || (after & kWriting)) return false;
    out->state = after;
    return true;
}

inline uint64_t seq_of(uint64_t state) noexcept { return state >> kSeqShift; }
inline uint64_t flags_of(uint64_t state) noexcept { return state & ((1u << kSeqShift) - 1); }

// Marks the event `seq` dead if its slot still holds it alive (pending or confirmed), and counts it as evicted
// early when it was still inside the window. Several processes may retire one event: one compare-exchange wins.
void retire(const EventRingView* r, uint64_t seq, double now) noexcept {
    Slot* s = slot_at(r, seq % r->max_events);
    uint64_t state = load_acquire(&s->state);
    for (;;) {
        if (seq_of(state) != seq || (state & (kWriting | kDead | kLost))) return;
        // Stable while the sequence part is ours and kWriting is clear: only a new event rewrites it.
        const double created = double_of(load_relaxed(&s->created));
        if (cas(&s->state, state, state | kDead)) {
            if (in_window(r, created, now)) fetch_add(&r->header->evicted_early, 1);
            return;
        }
    }
}

// Declares a pending hold abandoned (its process died or stalled past the grace): after this it can never be
// confirmed. True if the state is no longer a fresh pending one (abandoned now or before, or moved on).
bool abandon(Slot* s, uint64_t state) noexcept {
    if (cas(&s->state, state, state | kLost)) return true;
    return state != (seq_of(state) << kSeqShift | kPending);
}

// What an index entry's event means to a hold or lookup of an id.
enum class Seen {
    kFree,     // the entry may be reused: its slot moved on, or its event is dead, lost or expired
    kLive,     // a confirmed event inside the window
    kPending,  // a hold not yet confirmed, inside the grace
};

// Classifies the event an entry points at. snap->same_id tells whether it is `id`'s. Kills pending holds past
// the grace on the way, so that an entry is only reused once its event can never be confirmed.
Seen classify(const EventRingView* r, uint64_t entry, const IdRef* id, uint64_t id_hash, double now,
              Snapshot* snap) noexcept {
    for (;;) {
        const uint64_t slot = entry_slot(entry);
        if (slot >= r->max_events) return Seen::kFree;  // cannot happen in a ring made by create_event_ring
        Slot* s = slot_at(r, slot);
        if (!read_slot(s, entry_tag(entry) == id_hash >> 32 ? id : nullptr, id_hash, snap)) {
            // Being rewritten for a newer event: whatever this entry pointed at is gone. (A new event's entry
            // is inserted only after its slot is published, so no entry names a slot its own event is writing.)
            return Seen::kFree;
        }
        if (snap->id_hash >> 32 != entry_tag(entry)) return Seen::kFree;  // the slot holds another event now
        const uint64_t flags = flags_of(snap->state);
        if (flags & (kDead | kLost)) return Seen::kFree;
        if (flags & kPending) {
            if (now - snap->held_at <= kPendingGraceS) return Seen::kPending;
            if (abandon(s, snap->state)) return Seen::kFree;
            continue;  // confirmed meanwhile: look again
        }
        return in_window(r, snap->created, now) ? Seen::kLive : Seen::kFree;
    }
}

// The slot of the confirmed event `id` inside the window, or -1. With check_window false, the newest
// confirmed event of that id at any age: an id held again after it expired may still have its old event in
// the ring, and only the newest is the one a caller means.
int64_t find_confirmed(const EventRingView* r, const IdRef& id, uint64_t h, double now, bool check_window,
                       Snapshot* snap) noexcept {
    const uint64_t tag = h >> 32;
    int64_t found = -1;
    Snapshot candidate;
    for (uint64_t j = 0; j < kProbeLimit; ++j) {
        const uint64_t entry = load_acquire(&r->index[(h + j) & r->index_mask]);
        if (entry == 0) break;
        if (entry_tag(entry) != tag || entry_slot(entry) >= r->max_events) continue;
        if (!read_slot(slot_at(r, entry_slot(entry)), &id, h, &candidate) || !candidate.same_id) continue;
        if (flags_of(candidate.state) != 0) continue;
        if (check_window) {
            if (!in_window(r, candidate.created, now)) continue;
            *snap = candidate;
            return static_cast<int64_t>(entry_slot(entry));
        }
        if (found < 0 || candidate.state > snap->state) {
            *snap = candidate;
            found = static_cast<int64_t>(entry_slot(entry));
        }
    }
    return found;
}

// True if `id` is held (confirmed inside the window) or a hold of it is pending inside the grace.
bool held_or_pending(const EventRingView* r, const IdRef& id, uint64_t h, double now) noexcept {
    const uint64_t tag = h >> 32;
    Snapshot snap;
    for (uint64_t j = 0; j < kProbeLimit; ++j) {
        const uint64_t entry = load_sc(&r->index[(h + j) & r->index_mask]);
        if (entry == 0) break;
        if (entry_tag(entry) != tag) continue;
        if (classify(r, entry, &id, h, now, &snap) != Seen::kFree && snap.same_id) return true;
    }
    return false;
}

// ---------------------------------------------------------------------------------------------------------
// Index insertion
//
// Open addressing with linear probing, no deletion: an entry whose event is gone counts as free and is reused.
// Entries only ever go from empty to used, and a hold takes the first free entry of its run, so no live entry
// sits beyond an empty one and every probe may stop at the first empty entry.
//
// Two processes may hold the same id at once and pick different free entries (one sees an entry expire a
// moment before the other does). Each inserts its entry while its slot is pending, then re-reads the whole run.
// Since the insert and the re-read are sequentially consistent, of any two contenders at least one sees the
// other. The rules, with contenders ordered by sequence number:
//   - seeing a confirmed event of the id, or a pending one with a lower sequence number: lose;
//   - seeing a pending one with a higher sequence number: kill it (compare-exchange pending -> lost);
//   - then confirm with a compare-exchange pending -> confirmed, which fails if a lower contender killed us.
// At most one contender confirms (whichever of two saw the other settles it), and the lowest one always
// confirms unless it met a confirmed event: exactly one wins.

enum class Insert { kInserted, kRefused, kNoRoom };

Insert insert_entry(const EventRingView* r, const IdRef& id, uint64_t h, uint64_t my_slot, double now) noexcept {
    const uint64_t mine = entry_of(h, my_slot);
    const uint64_t tag = h >> 32;
    Snapshot snap;
    for (int attempt = 0; attempt < 16; ++attempt) {
        uint64_t free_j = kProbeLimit, free_entry = 0;
        uint64_t oldest_seq = UINT64_MAX;
        bool restart = false;
        for (uint64_t j = 0; j < kProbeLimit; ++j) {
            const uint64_t entry = load_sc(&r->index[(h + j) & r->index_mask]);
            if (entry == 0 || entry == mine) {
                // An entry equal to ours is a stale one of an earlier event in our slot with the same tag.
                if (free_j == kProbeLimit) free_j = j, free_entry = entry;
                if (entry == 0) break;
                continue;
            }
            // Past the first free entry only entries that may be this id's matter (a 32-bit tag match).
            if (free_j != kProbeLimit && entry_tag(entry) != tag) continue;
            const Seen seen = classify(r, entry, entry_tag(entry) == tag ? &id : nullptr, h, now, &snap);
            if (seen == Seen::kFree) {
                if (free_j == kProbeLimit) free_j = j, free_entry = entry;
                continue;
            }
            if (snap.same_id) return Insert::kRefused;
            if (seq_of(snap.state) < oldest_seq) oldest_seq = seq_of(snap.state);
        }
        if (free_j == kProbeLimit) {
            // A full run: evict its oldest event and look again.
            if (oldest_seq != UINT64_MAX) retire(r, oldest_seq, now);
            restart = true;
        } else if (!cas(&r->index[(h + free_j) & r->index_mask], free_entry, mine)) {
            restart = true;  // another hold took that entry first
        }
        if (!restart) return Insert::kInserted;
    }
    return Insert::kNoRoom;
}

// After inserting: the rules above. True if this hold may go on to confirm.
bool wins_race(const EventRingView* r, const IdRef& id, uint64_t h, uint64_t my_slot, uint64_t my_seq,
               double now) noexcept {
    const uint64_t mine = entry_of(h, my_slot);
    const uint64_t tag = h >> 32;
    Snapshot snap;
    for (uint64_t j = 0; j < kProbeLimit; ++j) {
        const uint64_t entry = load_sc(&r->index[(h + j) & r->index_mask]);
        if (entry == 0) break;
        if (entry == mine || entry_tag(entry) != tag) continue;
        const Seen seen = classify(r, entry, &id, h, now, &snap);
        if (seen == Seen::kFree || !snap.same_id) continue;
        const uint64_t other = seq_of(snap.state);
        if (seen == Seen::kLive || other < my_seq) return false;
        // A pending contender with a higher sequence number: make sure it can never confirm.
        Slot* s = slot_at(r, entry_slot(entry));
        uint64_t state = snap.state;
        if (!cas(&s->state, state, state | kLost)) {
            // It moved on. Confirmed inside the window: it won before we could stop it.
            if (seq_of(state) == other && flags_of(state) == 0 && in_window(r, snap.created, now)) return false;
        }
    }
    return true;
}

// ---------------------------------------------------------------------------------------------------------
// Members
//
// Positions are reserved with one fetch_add on member_head, so a member is written by the one hold that
// reserved it, until the arena wraps. Writing is a seqlock write: the word becomes (seq, writing), then the hash
// is stored, then the word becomes (seq, rewarded flag); readers check the word before and after reading the
// hash. Plain release stores, not compare-exchanges (which cost twice the whole write): the one case they do
// not cover is a hold so slow that the arena wraps past it while it writes a single member, when two holds
// store to one member at once. A hold that finds a newer owner already in a member gives up and its event is
// dead.

// Prefetches (for writing) the cache lines of members [pos, pos + n), up to kPrefetchLines of them: enough
// for the 50 members of a typical answer; the hardware prefetcher follows a longer sequential run.
constexpr std::size_t kPrefetchLines = 16;
void prefetch_members(const EventRingView* r, uint64_t pos, std::size_t n) noexcept {
    constexpr std::size_t kPerLine = 64 / sizeof(Member);
    const std::size_t count = std::min(n, kPrefetchLines * kPerLine);
    Member* base = reinterpret_cast<Member*>(r->members);
    uint64_t i = pos % r->max_members;
    for (std::size_t k = 0; k < count; k += kPerLine) {
        __builtin_prefetch(base + i, 1);
        i += kPerLine;
        if (i >= r->max_members) i -= r->max_members;
    }
    if (count > 0) __builtin_prefetch(base + (pos + count - 1) % r->max_members, 1);
}

// Writes members[0..n) of event `seq` from absolute position pos. False if the arena lapped this hold.
bool write_members(const EventRingView* r, uint64_t seq, uint64_t pos, const IdRef* members, std::size_t n,
                   const uint8_t* rewarded, double now) noexcept {
    uint64_t last_owner = 0;
    Member* const base = reinterpret_cast<Member*>(r->members);
    uint64_t at = pos % r->max_members;  // one division, not one per member
    for (std::size_t i = 0; i < n; ++i, at = at + 1 == r->max_members ? 0 : at + 1) {
        Member* m = base + at;
        const uint64_t hash = hash_id_keyed(members[i], r->key);
        const uint64_t owner = owner_of(load_acquire(&m->word), seq);
        if (owner > seq) return false;
        // The member's previous owner loses it now, so that event is evicted (counted if still in the window).
        if (owner != 0 && owner != last_owner) {
            retire(r, owner, now);
            last_owner = owner;
        }
        store_relaxed(&m->word, seq << kOwnerShift | kMemberWriting);
        __atomic_thread_fence(__ATOMIC_RELEASE);
        store_relaxed(&m->hash, hash);
        store_release(&m->word, seq << kOwnerShift | (rewarded != nullptr && rewarded[i] ? kMemberRewarded : 0));
    }
    return true;
}

// The member of event `seq` (members [pos, pos + n)) whose hash is h: its word pointer and the word, or
// nullptr. *lapped is set when a member no longer belongs to the event.
uint64_t* find_member(const EventRingView* r, uint64_t seq, uint64_t pos, uint64_t n, uint64_t h, uint64_t* word,
                      bool* lapped) noexcept {
    *lapped = false;
    Member* const base = reinterpret_cast<Member*>(r->members);
    uint64_t at = pos % r->max_members;
    for (uint64_t i = 0; i < n; ++i, at = at + 1 == r->max_members ? 0 : at + 1) {
        Member* m = base + at;
        const uint64_t before = load_acquire(&m->word);
        const uint64_t hash = load_relaxed(&m->hash);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        const uint64_t after = load_relaxed(&m->word);
        if (owner_of(before, seq) != seq || owner_of(after, seq) != seq || (after & kMemberWriting)) {
            *lapped = true;
            return nullptr;
        }
        if (hash == h) {
            *word = after;
            return &m->word;
        }
    }
    return nullptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Public API

std::size_t event_ring_bytes(uint64_t max_events, uint64_t max_members) noexcept {
    if (max_events < 1 || max_events > kMaxRingEvents || max_members < 1 || max_members > kMaxRingMembers) return 0;
    return kRingHeaderBytes + max_events * kEventSlotBytes + index_entries_for(max_events) * kIndexEntryBytes +
           max_members * kMemberBytes;
}

namespace {

void fill_view(void* memory, std::size_t size, EventRingView* out) noexcept {
    auto* h = static_cast<EventRingHeader*>(memory);
    auto* base = static_cast<unsigned char*>(memory);
    out->header = h;
    out->max_events = h->max_events;
    out->max_members = h->max_members;
    out->index_mask = h->index_entries - 1;
    out->window_s = h->window_s;
    for (int i = 0; i < 3; ++i) out->key[i] = h->key[i];
    out->slots = base + kRingHeaderBytes;
    out->index = reinterpret_cast<uint64_t*>(out->slots + h->max_events * kEventSlotBytes);
    out->members = reinterpret_cast<unsigned char*>(out->index + h->index_entries);
    out->bytes = size;
}

}  // namespace

int create_event_ring(void* memory, std::size_t size, uint64_t max_events, uint64_t max_members, double window_s,
                      const uint64_t seed[3], EventRingView* out) noexcept {
    if (reinterpret_cast<std::uintptr_t>(memory) % 64 != 0) return kRingMisaligned;
    const std::size_t bytes = event_ring_bytes(max_events, max_members);
    if (bytes == 0 || !(window_s > 0.0) || !std::isfinite(window_s)) return kRingBadCapacity;
    if (size < bytes) return kRingTooSmall;
    // Every byte, so that a reused buffer starts empty (state, index and member words 0 mean "never used").
    // This also commits the memory now: a /dev/shm too small for the ring fails at start, not under load.
    std::memset(memory, 0, bytes);
    auto* h = static_cast<EventRingHeader*>(memory);
    h->version = kLayoutVersion;
    h->header_bytes = kRingHeaderBytes;
    h->max_events = max_events;
    h->max_members = max_members;
    h->index_entries = index_entries_for(max_events);
    h->total_bytes = bytes;
    h->window_s = window_s;
    h->key[0] = seed[0];
    h->key[1] = odd_balanced(seed[1]);
    h->key[2] = odd_balanced(seed[2]);
    h->next_seq = 1;
    h->member_head = 0;
    h->evicted_early = 0;
    store_sc(&h->magic, kMagic);  // last: a process attaching sees either no ring or a whole one
    fill_view(memory, size, out);
    return kRingOk;
}

int attach_event_ring(void* memory, std::size_t size, EventRingView* out) noexcept {
    if (reinterpret_cast<std::uintptr_t>(memory) % 64 != 0) return kRingMisaligned;
    if (size < kRingHeaderBytes) return kRingTooSmall;
    auto* h = static_cast<EventRingHeader*>(memory);
    if (load_acquire(&h->magic) != kMagic || h->version != kLayoutVersion || h->header_bytes != kRingHeaderBytes) {
        return kRingBadHeader;
    }
    const std::size_t bytes = event_ring_bytes(h->max_events, h->max_members);
    if (bytes == 0 || bytes != h->total_bytes || h->index_entries != index_entries_for(h->max_events) ||
        !(h->window_s > 0.0) || !std::isfinite(h->window_s)) {
        return kRingBadHeader;
    }
    if (size < bytes) return kRingTooSmall;
    fill_view(memory, size, out);
    return kRingOk;
}

int hold_event(const EventRingView* r, IdRef event_id, const IdRef* members, std::size_t n, const uint8_t* rewarded,
               uint64_t tag, double created, double now) noexcept {
    if (n > r->max_members) return kHoldTooLarge;
    if (!in_window(r, created, now)) return kHoldExpired;
    const uint64_t h = hash_id_keyed(event_id, r->key);
    // The common refusal (a client re-sending a held id) costs no slot and evicts nothing.
    if (held_or_pending(r, event_id, h, now)) return kHoldRefused;

    EventRingHeader* head = r->header;
    const uint64_t seq = fetch_add(&head->next_seq, 1);
    const uint64_t slot_index = seq % r->max_events;
    Slot* s = slot_at(r, slot_index);
    const uint64_t pos = fetch_add(&head->member_head, n);
    // In a ring of production size the slot and the members are cold (their last use was a window ago): start
    // loading all their lines now, so that the misses overlap instead of queueing one by one.
    for (std::size_t line = 0; line < kEventSlotBytes; line += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(s) + line, 1);
    }
    prefetch_members(r, pos, n);
    uint64_t previous = load_acquire(&s->state);
    for (;;) {
        if (seq_of(previous) >= seq) {
            // The ring wrapped past this hold before it began writing: recorded and evicted at once.
            fetch_add(&head->evicted_early, 1);
            return kHoldRecorded;
        }
        if (cas(&s->state, previous, seq << kSeqShift | kWriting)) break;
    }
    // The slot is ours: its old fields stay readable to us until we overwrite them.
    if (seq_of(previous) != 0 && !(previous & (kWriting | kDead | kLost)) &&
        in_window(r, double_of(load_relaxed(&s->created)), now)) {
        fetch_add(&head->evicted_early, 1);
    }

    const bool intact = write_members(r, seq, pos, members, n, rewarded, now);

    store_relaxed(&s->created, bits_of(created));
    store_relaxed(&s->held_at, bits_of(now));
    store_relaxed(&s->member_pos, pos);
    store_relaxed(&s->n_members, n);
    store_relaxed(&s->id_hash, h);
    store_relaxed(&s->id_size, event_id.size);
    store_relaxed(&s->tag, tag);
    uint64_t words[kMaxEventIdBytes / 8] = {};
    std::memcpy(words, event_id.data, event_id.size);
    for (std::size_t i = 0; i < (event_id.size + 7) / 8; ++i) store_relaxed(&s->id_words[i], words[i]);
    if (!intact) {
        store_release(&s->state, seq << kSeqShift | kDead);
        fetch_add(&head->evicted_early, 1);
        return kHoldRecorded;
    }
    const uint64_t pending = seq << kSeqShift | kPending;
    store_sc(&s->state, pending);

    const Insert inserted = insert_entry(r, event_id, h, slot_index, now);
    if (inserted == Insert::kNoRoom) {
        uint64_t state = pending;
        if (cas(&s->state, state, pending | kDead)) fetch_add(&head->evicted_early, 1);
        return kHoldRecorded;
    }
    if (inserted == Insert::kRefused || !wins_race(r, event_id, h, slot_index, seq, now)) {
        uint64_t state = pending;
        cas(&s->state, state, pending | kLost);
        return kHoldRefused;
    }
    uint64_t state = pending;
    if (cas(&s->state, state, seq << kSeqShift)) return kHoldRecorded;
    // Killed by a contender with a lower sequence number (or as abandoned): that one holds the id now. Any other
    // change (members overwritten, slot reused) means the ring evicted the event already: recorded.
    return seq_of(state) == seq && (state & kLost) ? kHoldRefused : kHoldRecorded;
}

int reward_event(const EventRingView* r, IdRef event_id, IdRef member, double now, uint64_t* tag) noexcept {
    const uint64_t h = hash_id_keyed(event_id, r->key);
    Snapshot snap;
    const int64_t slot = find_confirmed(r, event_id, h, now, true, &snap);
    if (slot < 0) return kRewardUnknownEvent;
    if (tag != nullptr) *tag = snap.tag;
    const uint64_t seq = seq_of(snap.state);
    const uint64_t mh = hash_id_keyed(member, r->key);
    uint64_t word = 0;
    bool lapped = false;
    uint64_t* w = find_member(r, seq, snap.member_pos, snap.n_members, mh, &word, &lapped);
    if (w == nullptr) return lapped ? kRewardUnknownEvent : kRewardNotInEvent;
    const auto pid = static_cast<uint64_t>(getpid()) & kPidMask;
    for (;;) {
        if (word & kMemberRewarded) {
            if (!(word & kMemberPending)) return kRewardDuplicate;
            // Pending: its reward is on its way to a journal, or its process died before it got there (then no
            // journal has it, and this reward takes the mark over, so that it is counted once after all).
            const uint64_t marker = pending_pid(word);
            if (marker == pid || process_alive(marker)) return kRewardDuplicate;
        }
        if (cas(w, word, pending_word(seq, pid))) return kRewardAccepted;
        // Lost a race: another reward of the pair marked it (look again), or the member was overwritten.
        if (owner_of(word, seq) != seq || (word & kMemberWriting)) return kRewardUnknownEvent;
    }
}

// The mark word of (event_id, member) in a held event, for confirm_reward and unmark_reward: nullptr if the event
// is not held (any age) or the id is not one of its members; else the word's address, its value in *word and the
// event's sequence number in *seq.
namespace {
uint64_t* held_member(const EventRingView* r, IdRef event_id, IdRef member, uint64_t* seq, uint64_t* word) noexcept {
    const uint64_t h = hash_id_keyed(event_id, r->key);
    Snapshot snap;
    if (find_confirmed(r, event_id, h, 0.0, false, &snap) < 0) return nullptr;
    *seq = seq_of(snap.state);
    bool lapped = false;
    return find_member(r, *seq, snap.member_pos, snap.n_members, hash_id_keyed(member, r->key), word, &lapped);
}
}  // namespace

int confirm_reward(const EventRingView* r, IdRef event_id, IdRef member) noexcept {
    uint64_t seq = 0;
    uint64_t word = 0;
    uint64_t* w = held_member(r, event_id, member, &seq, &word);
    if (w == nullptr || word != pending_word(seq, static_cast<uint64_t>(getpid()))) return 0;
    return cas(w, word, seq << kOwnerShift | kMemberRewarded) ? 1 : 0;
}

int unmark_reward(const EventRingView* r, IdRef event_id, IdRef member) noexcept {
    uint64_t seq = 0;
    uint64_t word = 0;
    uint64_t* w = held_member(r, event_id, member, &seq, &word);
    if (w == nullptr || !(word & kMemberRewarded)) return 0;
    return cas(w, word, seq << kOwnerShift) ? 1 : 0;
}

namespace {

// What stats needs of one sequence number's slot: whether the event is still in the ring, and its fields.
struct Probe {
    bool in_ring;     // its slot still holds it and its members were not reserved by a later lap
    bool known;       // the fields below were read consistently
    double created;
    uint64_t member_pos;
};

Probe probe_seq(const EventRingView* r, uint64_t seq, uint64_t member_head) noexcept {
    Probe p{false, false, 0.0, 0};
    const Slot* s = slot_at(r, seq % r->max_events);
    Snapshot snap;
    if (!read_slot(s, nullptr, 0, &snap)) {
        // Being written: for this seq (a hold in flight, so in the ring) or for a newer one (overwritten).
        p.in_ring = seq_of(load_acquire(&s->state)) <= seq;
        return p;
    }
    if (seq_of(snap.state) > seq) return p;
    if (seq_of(snap.state) < seq) {
        p.in_ring = true;  // reserved, not yet begun
        return p;
    }
    p.known = true;
    p.created = snap.created;
    p.member_pos = snap.member_pos;
    p.in_ring = member_head <= snap.member_pos + r->max_members;
    return p;
}

}  // namespace

void event_ring_stats(const EventRingView* r, double now, EventRingStats* out) noexcept {
    EventRingHeader* head = r->header;
    const uint64_t member_head = load_acquire(&head->member_head);
    const uint64_t next = load_acquire(&head->next_seq);
    out->evicted_early = load_relaxed(&head->evicted_early);
    out->events_recorded = next - 1;
    out->members_recorded = member_head;
    out->held = 0;
    out->members_used = 0;
    out->oldest_age_s = 0.0;
    // The oldest event still in the ring: the first of [lo, next) whose slot and members were not taken over.
    uint64_t lo = next > r->max_events ? next - r->max_events : 1;
    uint64_t hi = next;
    while (lo < hi) {
        const uint64_t mid = lo + (hi - lo) / 2;
        if (probe_seq(r, mid, member_head).in_ring) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    const uint64_t oldest = lo;
    if (oldest >= next) return;
    // Events whose fields are not readable yet (a hold in flight) count as new.
    const Probe first = probe_seq(r, oldest, member_head);
    if (first.known) out->oldest_age_s = now - first.created;
    // The first event inside the window.
    lo = oldest;
    hi = next;
    while (lo < hi) {
        const uint64_t mid = lo + (hi - lo) / 2;
        const Probe p = probe_seq(r, mid, member_head);
        if (!p.known || in_window(r, p.created, now)) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    out->held = next - lo;
    if (lo < next) {
        const Probe p = probe_seq(r, lo, member_head);
        if (p.known && member_head > p.member_pos) {
            const uint64_t used = member_head - p.member_pos;
            out->members_used = used < r->max_members ? used : r->max_members;
        }
    }
}

}  // namespace mab
