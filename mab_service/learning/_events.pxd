# The event ring's C++ API, declared once (csrc/mab/event_ring.hpp). Every function may run without the GIL.
from libc.stdint cimport int64_t, uint8_t, uint64_t

from mab_service._cyutil cimport IdRef


cdef extern from "mab/event_ring.hpp" namespace "mab" nogil:
    enum EventRingStatus:
        kRingOk
        kRingTooSmall
        kRingBadHeader
        kRingBadCapacity
        kRingMisaligned

    enum HoldStatus:
        kHoldRecorded
        kHoldRefused
        kHoldTooLarge
        kHoldExpired

    enum RewardStatus:
        kRewardAccepted
        kRewardDuplicate
        kRewardUnknownEvent
        kRewardNotInEvent

    const size_t kMaxEventIdBytes
    const size_t kEventSlotBytes
    const size_t kIndexEntryBytes
    const size_t kMemberBytes
    const size_t kRingHeaderBytes
    const uint64_t kMaxRingEvents
    const uint64_t kMaxRingMembers
    const double kPendingGraceS

    cdef cppclass EventRingHeader:
        pass

    ctypedef struct EventRingView:
        uint64_t max_events
        uint64_t max_members
        double window_s
        size_t bytes

    ctypedef struct EventRingStats:
        uint64_t held
        uint64_t members_used
        uint64_t evicted_early
        uint64_t events_recorded
        uint64_t members_recorded
        double oldest_age_s

    size_t event_ring_bytes(uint64_t max_events, uint64_t max_members) noexcept
    int create_event_ring(void* memory, size_t size, uint64_t max_events, uint64_t max_members, double window_s,
                          const uint64_t* seed, EventRingView* out) noexcept
    int attach_event_ring(void* memory, size_t size, EventRingView* out) noexcept
    int hold_event(const EventRingView* ring, IdRef event_id, const IdRef* members, size_t n,
                   const uint8_t* rewarded, uint64_t tag, double created, double now) noexcept
    int reward_event(const EventRingView* ring, IdRef event_id, IdRef member, double now, uint64_t* tag) noexcept
    int unmark_reward(const EventRingView* ring, IdRef event_id, IdRef member) noexcept
    int confirm_reward(const EventRingView* ring, IdRef event_id, IdRef member) noexcept
    void event_ring_stats(const EventRingView* ring, double now, EventRingStats* out) noexcept


cdef class EventRing:
    # A view of the caller's buffer, held (exported) for the object's life so the memory stays mapped.
    cdef EventRingView ring
    cdef Py_buffer buffer
    cdef bint has_buffer

    cdef void _take(self, object buffer) except *
    cdef int _check_open(self) except -1
