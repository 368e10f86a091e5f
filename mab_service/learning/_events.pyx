# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The Cython boundary of the shared-memory event ring (csrc/mab/event_ring.hpp).

The ring lives in a buffer the caller owns (an ``mmap`` of a file in /dev/shm that every worker maps); this
object only holds a view of it. Each call checks its arguments, turns every str into a view of its UTF-8 bytes
(no copy for a compact ASCII str), and makes one C++ call. Calls keep the GIL: they take a microsecond or two,
and the views borrow from list items that another thread could free if the GIL were released.
"""
import os
import time

import numpy as np

cimport numpy as cnp
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.object cimport PyObject
from libc.math cimport isfinite
from libc.stdint cimport uint8_t, uint64_t

from mab_service._cyutil cimport STACK_IDS, free_scratch, id_view, list_item, list_size, scratch

cnp.import_array()


ACCEPTED = kRewardAccepted
DUPLICATE = kRewardDuplicate
UNKNOWN_EVENT = kRewardUnknownEvent
NOT_IN_EVENT = kRewardNotInEvent
MAX_EVENT_ID_BYTES = kMaxEventIdBytes
EVENT_SLOT_BYTES = kEventSlotBytes
MEMBER_BYTES = kMemberBytes
# A hold cut short (its process killed between recording and confirming) blocks its event id this long.
PENDING_GRACE_S = kPendingGraceS

cdef int _raise_on_ring_status(int status) except -1:
    # Status codes of create and attach become Python exceptions here and only here.
    if status == kRingOk:
        return 0
    if status == kRingTooSmall:
        raise ValueError("buffer is smaller than the ring needs")
    if status == kRingBadHeader:
        raise ValueError("buffer does not hold an event ring of this layout version")
    if status == kRingBadCapacity:
        raise ValueError(
            f"max_events must be in 1..{kMaxRingEvents}, max_members in 1..{kMaxRingMembers} "
            "and window_s finite and > 0"
        )
    if status == kRingMisaligned:
        raise ValueError("buffer must start on a 64-byte boundary (an mmap does)")
    raise RuntimeError(f"the event ring returned unknown status {status}")


cdef inline int _event_view(object event_id, IdRef* ref) except -1:
    id_view(<PyObject*>event_id, ref, "event_id", -1)
    if ref.size < 1 or ref.size > kMaxEventIdBytes:
        raise ValueError(f"event_id must be 1 to {kMaxEventIdBytes} bytes of UTF-8 (got {ref.size})")
    return 0


cdef inline double _finite(double x, str name) except? -1.0:
    if not isfinite(x):
        raise ValueError(f"{name} must be finite (got {x!r})")
    return x


cdef class EventRing:
    """Events held for rewards, in a buffer that several processes map; see csrc/mab/event_ring.hpp.

    Made by ``EventRing.create`` (lays out an empty ring) or ``EventRing.attach`` (uses one another process
    created). The object keeps a writable view of the buffer until it is closed or collected, so an ``mmap``
    cannot be closed under it.

    Memory: ``bytes_needed(max_events, max_members)`` is a 256-byte header plus 192 bytes per event slot
    (``EVENT_SLOT_BYTES``), 32 to 64 bytes of index per event slot (a power of two of 8-byte entries, at least
    four times max_events) and 16 bytes per member (``MEMBER_BYTES``). 10,000 answers/s of top_k 50 over a
    600 s window: max_events 6,000,000 and max_members 300,000,000, about 6.2 GB.
    """

    def __cinit__(self):
        self.has_buffer = False

    def __init__(self, *args, **kwargs):
        raise TypeError("use EventRing.create(...) or EventRing.attach(...)")

    def __dealloc__(self):
        if self.has_buffer:
            PyBuffer_Release(&self.buffer)

    cdef void _take(self, object buffer) except *:
        try:
            PyObject_GetBuffer(buffer, &self.buffer, PyBUF_WRITABLE)
        except BufferError:
            raise TypeError("buffer must be writable (an mmap opened for writing, or a bytearray)") from None
        self.has_buffer = True

    cdef int _check_open(self) except -1:
        if not self.has_buffer:
            raise ValueError("the event ring is closed")
        return 0

    @staticmethod
    def bytes_needed(max_events, max_members):
        """Bytes of buffer a ring of these capacities needs.

        Raises:
            ValueError: If max_events is not in 1..2**32-2 or max_members not in 1..2**40.
        """
        cdef size_t bytes = 0
        if 1 <= max_events <= kMaxRingEvents and 1 <= max_members <= kMaxRingMembers:
            bytes = event_ring_bytes(max_events, max_members)
        if bytes == 0:
            _raise_on_ring_status(kRingBadCapacity)
        return bytes

    @staticmethod
    def create(buffer, max_events, max_members, window_s):
        """Lays out an empty ring at the start of ``buffer`` and returns a view of it.

        Writes every byte of the ring (a reused buffer starts empty, and a /dev/shm too small fails here, with
        SIGBUS, rather than under load: allocate the file with ``os.posix_fallocate`` to get an OSError instead).
        Draws the hash key from the OS and stores it in the ring. Other processes attach after this returns.

        Args:
            buffer: Writable, 64-byte aligned, at least ``bytes_needed(max_events, max_members)`` bytes.
            max_events: Event slots; the oldest event is overwritten when all are used.
            max_members: Member entries (ids of all events together); the oldest are overwritten when full.
            window_s: Seconds an event stays held after it was created.

        Raises:
            TypeError: If ``buffer`` is not a writable buffer.
            ValueError: If a capacity or window_s is out of range, or the buffer is too small or misaligned.
        """
        cdef double window = _finite(window_s, "window_s")
        EventRing.bytes_needed(max_events, max_members)
        cdef EventRing self = EventRing.__new__(EventRing)
        self._take(buffer)
        cdef bytes entropy = os.urandom(24)
        cdef uint64_t seed[3]
        for i in range(3):
            seed[i] = int.from_bytes(entropy[8 * i:8 * i + 8], "little")
        _raise_on_ring_status(create_event_ring(
            self.buffer.buf, <size_t>self.buffer.len, max_events, max_members, window, seed, &self.ring))
        return self

    @staticmethod
    def attach(buffer):
        """A view of the ring another process created in ``buffer``.

        Raises:
            TypeError: If ``buffer`` is not a writable buffer.
            ValueError: If ``buffer`` holds no ring of this layout version, or is shorter than its header says.
        """
        cdef EventRing self = EventRing.__new__(EventRing)
        self._take(buffer)
        _raise_on_ring_status(attach_event_ring(self.buffer.buf, <size_t>self.buffer.len, &self.ring))
        return self

    def close(self):
        """Releases the view of the buffer (so an mmap can be closed); later calls raise ValueError."""
        if self.has_buffer:
            self.has_buffer = False
            PyBuffer_Release(&self.buffer)

    def hold(self, event_id, list ids, picks, double now, uint64_t tag=0):
        """Records an event whose members are ``ids[p]`` for ``p`` in ``picks``, unless ``event_id`` is held.
        ``tag`` is a word kept with the event that ``reward_tag`` gives back (0 for none).

        Of several processes holding the same event id at once, exactly one gets True.

        Args:
            event_id: 1 to 128 bytes of UTF-8 (the caller checks the syntax).
            ids: The candidate ids.
            picks: Positions in ``ids`` (an intp array; may be empty) of the ids the answer returned.
            now: Seconds (``time.time()``); the event's creation time.

        Returns:
            True if recorded; False (and nothing recorded) if an event with this id is held.

        Raises:
            TypeError: If ``event_id`` or a picked id is not a str, or ``ids`` is not a list.
            ValueError: If ``event_id`` is empty or too long, a pick is out of range, ``now`` is not finite,
                or there are more picks than the ring has member entries.
        """
        self._check_open()
        _finite(now, "now")
        cdef IdRef eid
        _event_view(event_id, &eid)
        cdef cnp.ndarray arr
        if isinstance(picks, cnp.ndarray) and cnp.PyArray_TYPE(<cnp.ndarray>picks) == cnp.NPY_INTP:
            arr = <cnp.ndarray>picks
        else:
            arr = np.asarray(picks, dtype=np.intp)
        if cnp.PyArray_NDIM(arr) != 1:
            raise ValueError(f"picks must be one-dimensional (got shape {(<object>arr).shape})")
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        cdef Py_ssize_t stride = cnp.PyArray_STRIDE(arr, 0)
        cdef const char* data = <const char*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n_ids = list_size(ids)
        cdef IdRef on_stack[STACK_IDS]
        cdef IdRef* refs = <IdRef*>scratch(on_stack, n, sizeof(IdRef))
        cdef Py_ssize_t i
        cdef cnp.npy_intp p
        cdef int status
        try:
            for i in range(n):
                p = (<const cnp.npy_intp*>(data + i * stride))[0]
                if p < 0 or p >= n_ids:
                    raise ValueError(f"picks[{i}] = {p} is out of range for {n_ids} ids")
                id_view(list_item(ids, p), &refs[i], "ids", p)
            status = hold_event(&self.ring, eid, refs, <size_t>n, NULL, tag, now, now)
        finally:
            free_scratch(refs, on_stack)
        if status == kHoldRecorded:
            return True
        if status == kHoldRefused:
            return False
        if status == kHoldTooLarge:
            raise ValueError(f"{n} picks do not fit in a ring of {self.ring.max_members} members")
        raise RuntimeError(f"the event ring returned unknown status {status}")

    def reward(self, event_id, id, double now):
        """Marks ``(event_id, id)`` rewarded if it was not, atomically across processes.

        The mark is pending in this process's name until ``confirm`` (see there).

        Returns:
            ACCEPTED the first time for the pair (exactly once, however many processes race on it);
            DUPLICATE after that; UNKNOWN_EVENT if the event is not held (never recorded, evicted, or
            ``now - created > window_s``); NOT_IN_EVENT if ``id`` is not among the event's members.

        Raises:
            TypeError: If ``event_id`` or ``id`` is not a str.
            ValueError: If ``event_id`` is empty or too long, or ``now`` is not finite.
        """
        self._check_open()
        _finite(now, "now")
        cdef IdRef eid, member
        _event_view(event_id, &eid)
        id_view(<PyObject*>id, &member, "id", -1)
        return reward_event(&self.ring, eid, member, now, NULL)

    def reward_tag(self, event_id, id, double now):
        """``reward``, and the tag the event was held with (0 if none, or if the event is unknown).

        Returns:
            ``(status, tag)``.
        """
        self._check_open()
        _finite(now, "now")
        cdef IdRef eid, member
        _event_view(event_id, &eid)
        id_view(<PyObject*>id, &member, "id", -1)
        cdef uint64_t tag = 0
        cdef int status = reward_event(&self.ring, eid, member, now, &tag)
        return status, tag

    def confirm(self, event_id, id):
        """Makes this process's ACCEPTED mark of ``(event_id, id)`` final: call it once the reward is durable.

        Until then the mark is pending in this process's name: a reward of the same pair is DUPLICATE while this
        process lives, and takes the mark over (ACCEPTED) once it has died, so a reward lost with its process is
        counted when it is sent again.

        Returns:
            True if a pending mark of this process was made final; False if there was none (or the event left).

        Raises:
            TypeError: If ``event_id`` or ``id`` is not a str.
            ValueError: If ``event_id`` is empty or too long.
        """
        self._check_open()
        cdef IdRef eid, member
        _event_view(event_id, &eid)
        id_view(<PyObject*>id, &member, "id", -1)
        return confirm_reward(&self.ring, eid, member) == 1

    def unmark(self, event_id, id):
        """Undoes an ACCEPTED reward of ``(event_id, id)`` (its durable write failed), so a retry may be accepted.

        Does nothing if the pair is not marked or the event has left the ring.

        Raises:
            TypeError: If ``event_id`` or ``id`` is not a str.
            ValueError: If ``event_id`` is empty or too long.
        """
        self._check_open()
        cdef IdRef eid, member
        _event_view(event_id, &eid)
        id_view(<PyObject*>id, &member, "id", -1)
        unmark_reward(&self.ring, eid, member)

    def restore(self, event_id, list ids, double created, list rewarded, now=None, uint64_t tag=0):
        """Re-creates an event from the log at start: members ``ids``, those in ``rewarded`` marked, with the
        tag it was held with.

        Args:
            event_id: As for ``hold``.
            ids: Every id the event's answer returned.
            created: The event's creation time (seconds, in the past).
            rewarded: Ids of ``ids`` rewarded already.
            now: The current time; ``time.time()`` when None.

        Returns:
            True if recorded; False if the event is expired (``now - created > window_s``), held already, or
            has more ids than the ring has member entries.

        Raises:
            TypeError: If an id is not a str.
            ValueError: If ``event_id`` is empty or too long, or a time is not finite.
        """
        self._check_open()
        _finite(created, "created")
        cdef double t = _finite(time.time() if now is None else now, "now")
        cdef IdRef eid
        _event_view(event_id, &eid)
        cdef Py_ssize_t n = list_size(ids), i
        cdef set marked = set()
        for i in range(list_size(rewarded)):
            item = <object>list_item(rewarded, i)
            if not isinstance(item, str):
                raise TypeError(f"rewarded[{i}] must be a string (got {type(item).__name__})")
            marked.add(item)
        # One flag per member; only the first of equal ids is marked, as reward marks the first.
        cdef cnp.ndarray flags = np.zeros(max(n, 1), dtype=np.uint8)
        cdef uint8_t* f = <uint8_t*>cnp.PyArray_DATA(flags)
        cdef IdRef on_stack[STACK_IDS]
        cdef IdRef* refs = <IdRef*>scratch(on_stack, n, sizeof(IdRef))
        cdef int status
        try:
            for i in range(n):
                id_view(list_item(ids, i), &refs[i], "ids", i)
                item = <object>list_item(ids, i)
                if item in marked:
                    f[i] = 1
                    marked.discard(item)
            status = hold_event(&self.ring, eid, refs, <size_t>n, f, tag, created, t)
        finally:
            free_scratch(refs, on_stack)
        return status == kHoldRecorded

    def stats(self, now=None):
        """Gauges and counters of the ring at ``now`` (``time.time()`` when None).

        Returns:
            A dict: ``held`` (events in the ring with now - created <= window_s), ``members_used`` (their
            members), ``evicted_early`` (events overwritten while still inside the window: the ring is too
            small), ``oldest_age_s`` (age of the oldest event still in the ring, 0.0 when empty; below window_s
            means the ring holds less than a window), ``events_recorded``, ``members_recorded``, and the
            capacities. The first three are found by binary search on creation times, which holds to within the
            few events that concurrent holds and restores record out of time order.
        """
        self._check_open()
        cdef double t = _finite(time.time() if now is None else now, "now")
        cdef EventRingStats s
        event_ring_stats(&self.ring, t, &s)
        return {
            "held": s.held,
            "members_used": s.members_used,
            "evicted_early": s.evicted_early,
            "oldest_age_s": s.oldest_age_s,
            "events_recorded": s.events_recorded,
            "members_recorded": s.members_recorded,
            "capacity_events": self.ring.max_events,
            "capacity_members": self.ring.max_members,
        }

    @property
    def capacity_events(self):
        """Event slots."""
        return self.ring.max_events

    @property
    def capacity_members(self):
        """Member entries."""
        return self.ring.max_members

    @property
    def window_s(self):
        """Seconds an event stays held after its creation."""
        return self.ring.window_s

    @property
    def memory_bytes(self):
        """Bytes of the buffer the ring uses (``bytes_needed`` of its capacities)."""
        return event_ring_bytes(self.ring.max_events, self.ring.max_members)

    def __repr__(self):
        return (
            f"EventRing(capacity_events={self.ring.max_events}, capacity_members={self.ring.max_members}, "
            f"window_s={self.ring.window_s})"
        )
