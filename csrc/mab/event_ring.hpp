// The held events of the learning loop: a ring in memory that several processes map at the same time.
//
// Each /predict answer is an event: an event id and the ids the answer returned (its members). A reward names
// (event id, member id); the ring says whether the event is still held, whether the id is one of its members and
// whether that pair was rewarded before. Worker processes share one ring, so a reward may reach a worker other
// than the one that answered.
//
// Plain C++, no Python: the memory belongs to the caller (an mmap of a file in /dev/shm), ids arrive as IdRef
// views, nothing throws, and every entry point returns an int status. No file handling here.
//
// Concurrency: every process may hold and reward at the same time. Nothing takes a lock, so a process killed
// at any instruction (kill -9) leaves no lock behind: a half-written event slot or member is detected by its
// sequence word and skipped, and is reclaimed when the ring comes round to it. All shared words are accessed
// with atomic builtins (acquire/release); slots and members are read as seqlocks (read the word, read the
// fields, re-read the word) so that a reader never trusts a slot while it is being overwritten.
//
// Time: `now` and `created` are seconds on one clock that every process shares (time.time()); the ring only
// compares them. An event is held while it is in the ring and now - created <= window_s.
//
// Memory (bytes_needed): a 256-byte header, then
//   kEventSlotBytes (192) per event slot     event id bytes (up to 128) inline, creation time, member range;
//   kIndexEntryBytes (8) per index entry     the power of two >= 4 x max_events entries, so 32 to 64 bytes per
//                                            event slot;
//   kMemberBytes (16) per member             a 64-bit keyed hash of the id's bytes and a word holding the
//                                            owning event's sequence number and the "rewarded" bit.
// Example: 10,000 answers/s of top_k 50 over a 600 s window need max_events = 6,000,000 (1.15 GB of slots,
// 268 MB of index) and max_members = 300,000,000 (4.8 GB): about 6.2 GB of shared memory.
//
// Preconditions (checked by the caller, not here):
//   - memory is 64-byte aligned, writable and mapped at least `size` bytes (an mmap is page-aligned);
//   - an event id is 1..kMaxEventIdBytes bytes; member ids may be any bytes, the empty id included;
//   - every IdRef points at `size` readable bytes for the duration of the call;
//   - times are finite;
//   - max_members is well above the members of the holds in flight at one moment (a ring sized for a window
//     is, by orders of magnitude): the only case the lock-free member writes do not cover is the arena
//     wrapping all the way round while one hold writes one member.
//
// Holds of one event id from several processes at once: exactly one records it (see event_ring.cpp, "Index
// insertion"). A hold cut short between recording and confirming (its process killed) keeps that id refused
// for kPendingGraceS, then any hold may take the id over.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mab/id_index.hpp"

namespace mab {

enum EventRingStatus : int {
    kRingOk = 0,
    kRingTooSmall = 1,      // the buffer is shorter than the ring needs (create) or its header says (attach)
    kRingBadHeader = 2,     // attach: no ring of this layout version starts here
    kRingBadCapacity = 3,   // create: max_events, max_members or window_s out of range
    kRingMisaligned = 4,    // the buffer does not start on a 64-byte boundary
};

// What hold_event did.
enum HoldStatus : int {
    kHoldRecorded = 0,  // the event is recorded (it may be evicted at once if the ring wraps meanwhile)
    kHoldRefused = 1,   // an event with this id is held (or being recorded by another process): nothing recorded
    kHoldTooLarge = 2,  // more members than the member arena holds: nothing recorded
    kHoldExpired = 3,   // created is older than the window (restore): nothing recorded
};

// What reward_event answered. Non-zero, so that no answer reads as false.
enum RewardStatus : int {
    kRewardAccepted = 1,      // first reward of (event, id): the member is now marked
    kRewardDuplicate = 2,     // the member was marked before
    kRewardUnknownEvent = 3,  // the event is not held: never recorded, evicted, or older than the window
    kRewardNotInEvent = 4,    // the event is held but the id is not one of its members
};

constexpr std::size_t kMaxEventIdBytes = 128;
constexpr std::size_t kEventSlotBytes = 192;
constexpr std::size_t kIndexEntryBytes = 8;
constexpr std::size_t kMemberBytes = 16;
constexpr std::size_t kRingHeaderBytes = 256;
// Index entries name a slot in 32 bits; 0 marks an empty entry.
constexpr uint64_t kMaxRingEvents = 0xFFFFFFFEu;
constexpr uint64_t kMaxRingMembers = uint64_t{1} << 40;
// A hold that is half done (recorded, not yet confirmed) blocks its event id for at most this long if its
// process dies in between; after that another hold of the same id may take over.
constexpr double kPendingGraceS = 2.0;

struct EventRingHeader;

// A process-local view of a ring: pointers into the caller's memory and a copy of the immutable header fields.
// Filled by create_event_ring / attach_event_ring; valid as long as the memory stays mapped.
struct EventRingView {
    EventRingHeader* header;
    unsigned char* slots;
    uint64_t* index;
    unsigned char* members;
    uint64_t max_events;
    uint64_t max_members;
    uint64_t index_mask;  // index entries - 1
    double window_s;
    uint64_t key[3];  // the hash key stored in the header
    std::size_t bytes;
};

struct EventRingStats {
    uint64_t held;              // events with now - created <= window_s still in the ring
    uint64_t members_used;      // members of those events
    uint64_t evicted_early;     // events overwritten (slot or members) while still inside the window
    uint64_t events_recorded;   // holds recorded since create
    uint64_t members_recorded;  // members recorded since create
    double oldest_age_s;        // now - created of the oldest event still in the ring; 0 when it is empty
};
// held, members_used and oldest_age_s are found by binary search over the ring, which assumes that creation
// times rise with the order of recording. Concurrent holds and restores of older events break that by a few
// events at most, so treat these three as gauges, not exact counts.

// Bytes a ring of these capacities needs, or 0 if they are out of range (max_events in 1..kMaxRingEvents,
// max_members in 1..kMaxRingMembers).
std::size_t event_ring_bytes(uint64_t max_events, uint64_t max_members) noexcept;

// Lays out an empty ring in memory[0..size) and fills *out. seed: 24 bytes of OS entropy, from which the hash
// key is derived (and stored in the header, so that every process hashes alike). window_s finite and > 0.
// Other processes must not attach before this returns.
int create_event_ring(void* memory, std::size_t size, uint64_t max_events, uint64_t max_members, double window_s,
                      const uint64_t seed[3], EventRingView* out) noexcept;

// Checks that memory[0..size) holds a ring made by create_event_ring and fills *out.
int attach_event_ring(void* memory, std::size_t size, EventRingView* out) noexcept;

// Records event_id with members[0..n) created at `created`, unless an event with that id is held at `now`
// (then kHoldRefused). rewarded: null, or n flags marking members rewarded already (restore). tag: a word the
// caller keeps with the event (the loop: the row of its segment in the arm table, plus one; 0 for none), which
// reward_event gives back. Of several processes racing to hold the same id, exactly one gets kHoldRecorded. O(n)
// plus O(1) expected.
int hold_event(const EventRingView* ring, IdRef event_id, const IdRef* members, std::size_t n,
               const uint8_t* rewarded, uint64_t tag, double created, double now) noexcept;

// Marks (event_id, member) rewarded with a compare-exchange: of any number of processes racing on one pair,
// exactly one gets kRewardAccepted. A member id that occurs twice in an event counts once. O(members of the
// event) plus O(1) expected for the event lookup.
//
// The mark is pending, in this process's name, until confirm_reward makes it final (once the reward is durable):
// a pending mark answers kRewardDuplicate while its process lives, and is taken over (kRewardAccepted, pending in
// the caller's name) once that process is gone, so a reward whose process was killed between the mark and its
// journal is counted when it is sent again. A process that dies after its journal has the reward but before it
// confirms leaves it to be recorded twice; replay counts each (event, id) once.
// *tag (if not null) gets the event's tag whenever the event is found (any answer but kRewardUnknownEvent).
int reward_event(const EventRingView* ring, IdRef event_id, IdRef member, double now, uint64_t* tag) noexcept;

// Makes this process's pending mark on (event_id, member) final. Returns 1 if it did, 0 if there was no such mark
// (another process's, a final one, none) or the event is no longer in the ring (time is not checked).
int confirm_reward(const EventRingView* ring, IdRef event_id, IdRef member) noexcept;

// Clears the mark (pending or final) on (event_id, member), so that the pair may be accepted again. Returns
// 1 if a mark was cleared, 0 if there was none or the event is no longer in the ring (time is not checked).
int unmark_reward(const EventRingView* ring, IdRef event_id, IdRef member) noexcept;

void event_ring_stats(const EventRingView* ring, double now, EventRingStats* out) noexcept;

}  // namespace mab
