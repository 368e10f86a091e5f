"""The shared-memory event ring: the reward rules, expiry and eviction, attaching, and processes racing."""

from __future__ import annotations

import gc
import mmap
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mab_service.learning._events import (
    ACCEPTED,
    DUPLICATE,
    EVENT_SLOT_BYTES,
    MAX_EVENT_ID_BYTES,
    MEMBER_BYTES,
    NOT_IN_EVENT,
    PENDING_GRACE_S,
    UNKNOWN_EVENT,
    EventRing,
)

T0 = 1_800_000_000.0  # a time.time()-like start, so that float rounding is as in production
IDS = [f"c{i}" for i in range(400)]
UNICODE_IDS = ["日本", "é", "e\u0301", "🎲", "", "\x00", "x" * 1000, "ab"]


def make_ring(max_events: int = 64, max_members: int = 4096, window_s: float = 60.0) -> EventRing:
    buf = mmap.mmap(-1, EventRing.bytes_needed(max_events, max_members))
    return EventRing.create(buf, max_events, max_members, window_s)


def picks(*positions: int) -> np.ndarray:
    return np.array(positions, dtype=np.intp)


def first(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.intp)


# ---------------------------------------------------------------------------------------------------------
# The reward rules


def test_hold_then_reward_accepted_duplicate_not_in_event_unknown() -> None:
    ring = make_ring()
    assert ring.hold("e1", IDS, picks(3, 7, 11), T0)
    assert ring.reward("e1", "c7", T0 + 1) == ACCEPTED
    assert ring.reward("e1", "c7", T0 + 2) == DUPLICATE
    assert ring.reward("e1", "c3", T0 + 2) == ACCEPTED
    assert ring.reward("e1", "c4", T0 + 2) == NOT_IN_EVENT  # a candidate that was not returned
    assert ring.reward("e1", "zzz", T0 + 2) == NOT_IN_EVENT
    assert ring.reward("e2", "c7", T0 + 2) == UNKNOWN_EVENT
    assert ring.reward("e", "c7", T0 + 2) == UNKNOWN_EVENT  # a prefix of a held id
    assert ring.reward("e1x", "c7", T0 + 2) == UNKNOWN_EVENT
    assert len({ACCEPTED, DUPLICATE, UNKNOWN_EVENT, NOT_IN_EVENT}) == 4
    assert all(code for code in (ACCEPTED, DUPLICATE, UNKNOWN_EVENT, NOT_IN_EVENT))  # none reads as false


def test_events_are_independent() -> None:
    ring = make_ring()
    assert ring.hold("a", IDS, picks(0, 1), T0)
    assert ring.hold("b", IDS, picks(1, 2), T0)
    assert ring.reward("a", "c1", T0) == ACCEPTED
    assert ring.reward("b", "c1", T0) == ACCEPTED  # the same id in another event is another pair
    assert ring.reward("b", "c0", T0) == NOT_IN_EVENT
    assert ring.reward("a", "c2", T0) == NOT_IN_EVENT


def test_event_without_members_is_held_and_has_no_members() -> None:
    ring = make_ring()
    assert ring.hold("empty", IDS, first(0), T0)
    assert ring.reward("empty", "c0", T0) == NOT_IN_EVENT
    assert not ring.hold("empty", IDS, first(0), T0)


def test_repeated_picks_count_once() -> None:
    ring = make_ring()
    assert ring.hold("e", IDS, picks(5, 5, 6), T0)
    assert ring.reward("e", "c5", T0) == ACCEPTED
    assert ring.reward("e", "c5", T0) == DUPLICATE
    assert ring.reward("e", "c6", T0) == ACCEPTED


def test_picks_may_be_any_integer_sequence() -> None:
    ring = make_ring()
    assert ring.hold("list", IDS, [1, 2], T0)  # type: ignore[arg-type]
    assert ring.hold("int32", IDS, np.array([3], dtype=np.int32), T0)
    assert ring.hold("strided", IDS, np.arange(20, dtype=np.intp)[::5], T0)
    assert ring.reward("list", "c2", T0) == ACCEPTED
    assert ring.reward("int32", "c3", T0) == ACCEPTED
    assert [ring.reward("strided", f"c{i}", T0) for i in (0, 5, 10, 15, 1)] == [ACCEPTED] * 4 + [NOT_IN_EVENT]


def test_unmark_lets_the_pair_be_accepted_again() -> None:
    ring = make_ring()
    ring.hold("e", IDS, picks(1, 2), T0)
    assert ring.reward("e", "c1", T0) == ACCEPTED
    ring.unmark("e", "c1")
    assert ring.reward("e", "c1", T0) == ACCEPTED
    assert ring.reward("e", "c1", T0) == DUPLICATE
    # Unmarking what is not marked, not a member, or not held does nothing.
    ring.unmark("e", "c2")
    ring.unmark("e", "c9")
    ring.unmark("nope", "c1")
    assert ring.reward("e", "c2", T0) == ACCEPTED
    assert ring.reward("e", "c1", T0) == DUPLICATE


def test_event_ids_of_1_and_128_bytes_and_unicode_member_ids() -> None:
    ring = make_ring()
    short, long = "x", "y" * MAX_EVENT_ID_BYTES
    assert MAX_EVENT_ID_BYTES == 128
    assert ring.hold(short, UNICODE_IDS, first(len(UNICODE_IDS)), T0)
    assert ring.hold(long, UNICODE_IDS, picks(0, 2), T0)
    assert ring.hold(long[:-1], UNICODE_IDS, picks(1), T0)  # differs from `long` only in length
    for member in UNICODE_IDS:
        assert ring.reward(short, member, T0) == ACCEPTED, member
    assert ring.reward(long, "日本", T0) == ACCEPTED
    assert ring.reward(long, "é", T0) == NOT_IN_EVENT
    assert ring.reward(long, "e\u0301", T0) == ACCEPTED  # e + combining accent is not "é"
    assert ring.reward(long[:-1], "é", T0) == ACCEPTED
    assert ring.reward(long[:-1], "e\u0301", T0) == NOT_IN_EVENT
    assert ring.reward(short, "x" * 999, T0) == NOT_IN_EVENT
    assert not ring.hold(long, IDS, first(1), T0)


@pytest.mark.parametrize("event_id", ["", "z" * 129, "é" * 65])
def test_event_ids_outside_1_to_128_bytes_are_rejected(event_id: str) -> None:
    ring = make_ring()
    with pytest.raises(ValueError, match="event_id must be 1 to 128 bytes"):
        ring.hold(event_id, IDS, first(1), T0)
    with pytest.raises(ValueError, match="event_id"):
        ring.reward(event_id, "c0", T0)


# ---------------------------------------------------------------------------------------------------------
# Time and eviction


def test_expiry_by_time_is_inclusive_of_the_window() -> None:
    ring = make_ring(window_s=10.0)
    ring.hold("e", IDS, picks(0, 1, 2), T0)
    assert ring.reward("e", "c0", T0 + 10.0) == ACCEPTED  # now - created == window_s: still held
    assert ring.reward("e", "c1", T0 + 10.001) == UNKNOWN_EVENT
    assert ring.reward("e", "c0", T0 + 10.001) == UNKNOWN_EVENT
    assert ring.reward("e", "zzz", T0 + 10.001) == UNKNOWN_EVENT  # unknown event before not-in-event
    assert ring.stats(T0 + 10.001)["held"] == 0
    assert ring.stats(T0 + 10.001)["evicted_early"] == 0


def test_client_event_id_is_refused_while_held_and_accepted_after_expiry() -> None:
    ring = make_ring(window_s=10.0)
    assert ring.hold("client-1", IDS, picks(0, 1), T0)
    assert ring.reward("client-1", "c0", T0) == ACCEPTED
    assert not ring.hold("client-1", IDS, picks(5), T0 + 5)
    assert not ring.hold("client-1", IDS, picks(5), T0 + 10.0)
    # The refused holds recorded nothing: the event keeps its members and marks.
    assert ring.reward("client-1", "c5", T0 + 6) == NOT_IN_EVENT
    assert ring.reward("client-1", "c0", T0 + 6) == DUPLICATE
    assert ring.stats(T0 + 6)["events_recorded"] == 1
    # After expiry the id may be held again: a new event, new members, no marks.
    assert ring.hold("client-1", IDS, picks(5, 0), T0 + 10.5)
    assert ring.reward("client-1", "c0", T0 + 11) == ACCEPTED
    assert ring.reward("client-1", "c5", T0 + 11) == ACCEPTED
    assert ring.reward("client-1", "c1", T0 + 11) == NOT_IN_EVENT
    assert not ring.hold("client-1", IDS, picks(5), T0 + 12)


def test_wrapping_the_event_slots_evicts_the_oldest_and_counts_it() -> None:
    ring = make_ring(max_events=4, max_members=4096, window_s=60.0)
    for i in range(6):
        assert ring.hold(f"e{i}", IDS, picks(i), T0 + i)
    for i in (0, 1):
        assert ring.reward(f"e{i}", f"c{i}", T0 + 6) == UNKNOWN_EVENT
        assert ring.hold(f"e{i}", IDS, picks(i), T0 + 6) is True  # evicted ids are not held
    stats = ring.stats(T0 + 6)
    assert stats["evicted_early"] == 4  # e0, e1, then e2, e3 by the re-holds: all inside the window
    assert stats["held"] == 4
    assert [ring.reward(f"e{i}", f"c{i}", T0 + 6) for i in range(6)] == [ACCEPTED] * 2 + [UNKNOWN_EVENT] * 2 + [
        ACCEPTED
    ] * 2


def test_wrapping_expired_events_is_not_early() -> None:
    ring = make_ring(max_events=4, window_s=1.0)
    for i in range(12):
        assert ring.hold(f"e{i}", IDS, picks(i), T0 + 2.0 * i)
    stats = ring.stats(T0 + 22.0)
    assert stats["evicted_early"] == 0
    assert stats["held"] == 1
    assert stats["oldest_age_s"] == pytest.approx(6.0)  # e8, the oldest of the four slots


def test_wrapping_the_member_arena_evicts_the_events_it_overwrites() -> None:
    ring = make_ring(max_events=64, max_members=100, window_s=60.0)
    assert ring.hold("a", IDS, first(50), T0)
    assert ring.hold("b", IDS, first(50), T0)
    assert ring.reward("a", "c10", T0) == ACCEPTED
    assert ring.hold("c", IDS, first(10), T0)  # takes the first 10 members of a
    assert ring.reward("a", "c20", T0) == UNKNOWN_EVENT
    assert ring.reward("a", "c10", T0) == UNKNOWN_EVENT
    assert ring.reward("b", "c49", T0) == ACCEPTED
    assert ring.reward("c", "c9", T0) == ACCEPTED
    assert ring.hold("a", IDS, first(0), T0)  # no longer held
    stats = ring.stats(T0)
    assert stats["evicted_early"] == 1
    assert stats["members_recorded"] == 110


def test_more_picks_than_members_is_an_error() -> None:
    ring = make_ring(max_members=8)
    with pytest.raises(ValueError, match="9 picks do not fit in a ring of 8 members"):
        ring.hold("e", IDS, first(9), T0)
    assert ring.hold("e", IDS, first(8), T0)


def test_stats_count_held_events_and_their_members() -> None:
    ring = make_ring(max_events=64, max_members=4096, window_s=10.0)
    assert ring.stats(T0) == {
        "held": 0,
        "members_used": 0,
        "evicted_early": 0,
        "oldest_age_s": 0.0,
        "events_recorded": 0,
        "members_recorded": 0,
        "capacity_events": 64,
        "capacity_members": 4096,
    }
    for i in range(20):
        ring.hold(f"e{i}", IDS, first(i), T0 + i)
    stats = ring.stats(T0 + 25.0)  # e15 .. e19 are inside the window
    assert stats["held"] == 5
    assert stats["members_used"] == sum(range(15, 20))
    assert stats["oldest_age_s"] == pytest.approx(25.0)
    assert stats["events_recorded"] == 20
    assert stats["members_recorded"] == sum(range(20))


# ---------------------------------------------------------------------------------------------------------
# Restore


def test_restore_recreates_an_event_with_its_marks() -> None:
    ring = make_ring(window_s=60.0)
    now = T0 + 30
    assert ring.restore("r1", ["a", "b", "c", "b"], T0, ["b", "zzz"], now=now)
    assert ring.reward("r1", "b", now) == DUPLICATE
    assert ring.reward("r1", "a", now) == ACCEPTED
    assert ring.reward("r1", "c", now) == ACCEPTED
    assert ring.reward("r1", "zzz", now) == NOT_IN_EVENT
    # It expires by its creation time, not by the time of the restore.
    assert ring.reward("r1", "a", T0 + 60.5) == UNKNOWN_EVENT
    assert ring.hold("r1", IDS, first(1), T0 + 60.5)


def test_restore_refuses_expired_held_and_oversized_events() -> None:
    ring = make_ring(max_members=4, window_s=60.0)
    assert not ring.restore("old", ["a"], T0, [], now=T0 + 61)
    assert ring.reward("old", "a", T0 + 61) == UNKNOWN_EVENT
    assert ring.restore("r", ["a"], T0, [], now=T0 + 1)
    assert not ring.restore("r", ["a"], T0, [], now=T0 + 1)
    assert not ring.restore("big", ["a", "b", "c", "d", "e"], T0, [], now=T0 + 1)
    assert ring.stats(T0 + 1)["events_recorded"] == 1


def test_restore_defaults_to_the_current_time() -> None:
    ring = make_ring(window_s=60.0)
    assert ring.restore("r", ["a"], time.time() - 5, ["a"])
    assert ring.reward("r", "a", time.time()) == DUPLICATE
    assert not ring.restore("s", ["a"], time.time() - 61, [])


# ---------------------------------------------------------------------------------------------------------
# Creating, attaching, arguments


def test_a_second_object_attached_to_the_buffer_sees_the_same_events() -> None:
    buf = mmap.mmap(-1, EventRing.bytes_needed(64, 4096))
    first_ring = EventRing.create(buf, 64, 4096, 30.0)
    second = EventRing.attach(buf)
    assert (second.capacity_events, second.capacity_members, second.window_s) == (64, 4096, 30.0)
    assert second.memory_bytes == first_ring.memory_bytes == EventRing.bytes_needed(64, 4096)
    assert first_ring.hold("e", IDS, picks(1, 2), T0)
    assert not second.hold("e", IDS, picks(1), T0)
    assert second.reward("e", "c1", T0) == ACCEPTED
    assert first_ring.reward("e", "c1", T0) == DUPLICATE
    assert second.hold("f", IDS, picks(3), T0)
    assert first_ring.reward("f", "c3", T0) == ACCEPTED
    assert first_ring.stats(T0) == second.stats(T0)


def test_attach_validates_the_buffer() -> None:
    n = EventRing.bytes_needed(64, 4096)
    with pytest.raises(ValueError, match="does not hold an event ring"):
        EventRing.attach(mmap.mmap(-1, n))
    buf = mmap.mmap(-1, n)
    EventRing.create(buf, 64, 4096, 30.0)
    small = mmap.mmap(-1, n - 1)
    small[:] = buf[: n - 1]
    with pytest.raises(ValueError, match="smaller than the ring needs"):
        EventRing.attach(small)
    with pytest.raises(ValueError, match="smaller than the ring needs"):
        EventRing.attach(mmap.mmap(-1, 64))
    with pytest.raises(ValueError, match="64-byte boundary"):
        EventRing.attach(memoryview(buf)[8:])
    with pytest.raises(TypeError, match="writable"):
        EventRing.attach(bytes(n))
    larger = mmap.mmap(-1, n + 4096)
    EventRing.create(larger, 64, 4096, 30.0)
    assert EventRing.attach(larger).memory_bytes == n


def test_create_validates_capacities_and_buffer() -> None:
    n = EventRing.bytes_needed(64, 4096)
    with pytest.raises(ValueError, match="smaller than the ring needs"):
        EventRing.create(mmap.mmap(-1, n - 1), 64, 4096, 30.0)
    for max_events, max_members in ((0, 10), (10, 0), (2**32 - 1, 10), (10, 2**40 + 1), (-1, 10)):
        with pytest.raises(ValueError, match="max_events must be in"):
            EventRing.bytes_needed(max_events, max_members)
        with pytest.raises(ValueError, match="max_events must be in"):
            EventRing.create(mmap.mmap(-1, n), max_events, max_members, 30.0)
    for window in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="window_s"):
            EventRing.create(mmap.mmap(-1, n), 64, 4096, window)
    with pytest.raises(TypeError):
        EventRing()


def test_bytes_needed_matches_the_documented_sizes() -> None:
    assert (EVENT_SLOT_BYTES, MEMBER_BYTES) == (192, 16)
    # 1,000 slots: 4,096 index entries (the power of two >= 4 x 1,000).
    assert EventRing.bytes_needed(1000, 50_000) == 256 + 1000 * 192 + 4096 * 8 + 50_000 * 16
    # The service's example: 10,000 answers/s of top_k 50 over 600 s.
    production = EventRing.bytes_needed(6_000_000, 300_000_000)
    assert production == 256 + 6_000_000 * 192 + 2**25 * 8 + 300_000_000 * 16
    assert 6.1e9 < production < 6.3e9


def test_create_clears_a_reused_buffer() -> None:
    buf = mmap.mmap(-1, EventRing.bytes_needed(64, 4096))
    old = EventRing.create(buf, 64, 4096, 30.0)
    old.hold("e", IDS, picks(1), T0)
    fresh = EventRing.create(buf, 64, 4096, 30.0)
    assert fresh.reward("e", "c1", T0) == UNKNOWN_EVENT
    assert fresh.stats(T0)["events_recorded"] == 0


def test_bad_arguments_name_themselves() -> None:
    ring = make_ring()
    with pytest.raises(ValueError, match=r"picks\[1\] = 400 is out of range for 400 ids"):
        ring.hold("e", IDS, picks(0, 400), T0)
    with pytest.raises(ValueError, match=r"picks\[0\] = -1 is out of range"):
        ring.hold("e", IDS, picks(-1), T0)
    with pytest.raises(ValueError, match="one-dimensional"):
        ring.hold("e", IDS, np.zeros((2, 2), dtype=np.intp), T0)
    with pytest.raises(TypeError, match=r"ids\[1\] must be a string \(got int\)"):
        ring.hold("e", ["a", 1], picks(0, 1), T0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"ids\[0\] is not valid Unicode"):
        ring.hold("e", ["\ud800"], picks(0), T0)
    with pytest.raises(TypeError):
        ring.hold("e", tuple(IDS), picks(0), T0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="event_id must be a string"):
        ring.hold(b"e", IDS, picks(0), T0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="id must be a string"):
        ring.reward("e", 3, T0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="now must be finite"):
        ring.hold("e", IDS, picks(0), float("nan"))
    with pytest.raises(ValueError, match="now must be finite"):
        ring.reward("e", "c0", float("inf"))
    with pytest.raises(TypeError, match=r"rewarded\[0\] must be a string"):
        ring.restore("r", ["a"], T0, [1], now=T0)  # type: ignore[list-item]
    # None of the failed holds recorded anything.
    assert ring.stats(T0)["events_recorded"] == 0
    assert ring.hold("e", IDS, picks(0), T0)


def test_closed_ring_refuses_calls_and_frees_the_buffer() -> None:
    buf = mmap.mmap(-1, EventRing.bytes_needed(64, 4096))
    ring = EventRing.create(buf, 64, 4096, 30.0)
    with pytest.raises(BufferError):
        buf.close()  # the ring holds a view of it
    ring.close()
    ring.close()
    with pytest.raises(ValueError, match="closed"):
        ring.reward("e", "c0", T0)
    with pytest.raises(ValueError, match="closed"):
        ring.stats(T0)
    buf.close()


# ---------------------------------------------------------------------------------------------------------
# A reference model over random operations


def test_random_operations_agree_with_a_dict_model(rand) -> None:
    """Holds, rewards and unmarks at random times against a plain-Python model of the rules (no eviction)."""
    window = 5.0
    ring = make_ring(max_events=4096, max_members=4096 * 8, window_s=window)
    events: dict[str, tuple[float, set[str]]] = {}  # event id -> (created, members)
    marked: set[tuple[str, str]] = set()
    now = T0
    names = [f"ev{i}" for i in range(60)]
    for _ in range(4000):
        now += float(rand.gen.exponential(0.05))
        name = names[int(rand.gen.integers(len(names)))]
        held = name in events and now - events[name][0] <= window
        op = rand.gen.integers(3)
        if op == 0:
            chosen = rand.gen.choice(40, size=int(rand.gen.integers(0, 6)), replace=False).astype(np.intp)
            assert ring.hold(name, IDS, chosen, now) is (not held)
            if not held:
                events[name] = (now, {IDS[p] for p in chosen})
                marked = {pair for pair in marked if pair[0] != name}
        else:
            member = f"c{int(rand.gen.integers(45))}"
            if op == 1:
                if not held:
                    expected = UNKNOWN_EVENT
                elif member not in events[name][1]:
                    expected = NOT_IN_EVENT
                elif (name, member) in marked:
                    expected = DUPLICATE
                else:
                    expected = ACCEPTED
                    marked.add((name, member))
                assert ring.reward(name, member, now) == expected, (name, member, now)
            else:
                ring.unmark(name, member)
                marked.discard((name, member))


# ---------------------------------------------------------------------------------------------------------
# Processes racing on one mapped file


def _race_worker(path: str, barrier, results, index: int, events: int, members: int, hold_ids: int) -> None:
    """One process: reward every (event, member) pair, then hold every contested client id."""
    with open(path, "r+b") as f:
        buf = mmap.mmap(f.fileno(), 0)
    ring = EventRing.attach(buf)
    accepted = []
    barrier.wait()
    now = time.time()
    for e in range(events):
        for m in range(members):
            # Half the processes walk the members backwards, so that races happen everywhere.
            mm = m if index % 2 == 0 else members - 1 - m
            if ring.reward(f"event-{e}", f"c{mm}", now) == ACCEPTED:
                assert ring.confirm(f"event-{e}", f"c{mm}")  # durable, as the loop confirms after its journal
                accepted.append((e, mm))
    barrier.wait()
    won = [k for k in range(hold_ids) if ring.hold(f"client:{k}", IDS, np.arange(3, dtype=np.intp), time.time())]
    results.put((index, accepted, won))
    ring.close()
    buf.close()


@pytest.mark.slow
def test_processes_racing_get_exactly_one_accepted_per_pair_and_one_hold_per_id(tmp_path: Path) -> None:
    processes, events, members, hold_ids = 3, 60, 50, 1500
    path = tmp_path / "events.ring"
    size = EventRing.bytes_needed(8192, 8192 * 50)
    with open(path, "wb") as f:
        f.truncate(size)
    with open(path, "r+b") as f:
        buf = mmap.mmap(f.fileno(), 0)
    ring = EventRing.create(buf, 8192, 8192 * 50, 600.0)
    now = time.time()
    for e in range(events):
        assert ring.hold(f"event-{e}", IDS, np.arange(members, dtype=np.intp), now)

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_race_worker, args=(str(path), barrier, results, i, events, members, hold_ids))
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    try:
        outcome = [results.get(timeout=120) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    assert all(w.exitcode == 0 for w in workers)

    accepted = [pair for _, pairs, _ in outcome for pair in pairs]
    assert len(accepted) == events * members, "each pair accepted exactly once in total"
    assert set(accepted) == {(e, m) for e in range(events) for m in range(members)}
    assert all(ring.reward(f"event-{e}", "c0", now) == DUPLICATE for e in range(events))
    won = [k for _, _, ks in outcome for k in ks]
    assert sorted(won) == list(range(hold_ids)), "each client id held by exactly one process"
    assert ring.stats()["held"] >= events + hold_ids  # a hold that lost a race may have taken a slot too
    ring.close()
    buf.close()


def _hold_until_killed(path: str, progress_path: str) -> None:
    """Holds k0, k1, ... as fast as it can, publishing after each hold how many are done."""
    with open(path, "r+b") as f:
        buf = mmap.mmap(f.fileno(), 0)
    with open(progress_path, "r+b") as f:
        progress = mmap.mmap(f.fileno(), 8)
    ring = EventRing.attach(buf)
    members = np.arange(50, dtype=np.intp)
    for i in range(10**9):
        assert ring.hold(f"k{i}", IDS, members, time.time())
        progress[:8] = (i + 1).to_bytes(8, "little")


@pytest.mark.slow
def test_a_process_killed_mid_hold_leaves_nothing_locked(tmp_path: Path) -> None:
    path, progress_path = tmp_path / "events.ring", tmp_path / "progress"
    with open(path, "wb") as f:
        f.truncate(EventRing.bytes_needed(100_000, 100_000 * 50))
    progress_path.write_bytes(bytes(8))
    with open(path, "r+b") as f:
        buf = mmap.mmap(f.fileno(), 0)
    ring = EventRing.create(buf, 100_000, 100_000 * 50, 600.0)
    child = multiprocessing.get_context("spawn").Process(
        target=_hold_until_killed, args=(str(path), str(progress_path))
    )
    child.start()
    try:
        deadline = time.monotonic() + 60
        while int.from_bytes(progress_path.read_bytes(), "little") < 3000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
    finally:
        if child.is_alive():
            child.kill()
    done = int.from_bytes(progress_path.read_bytes(), "little")
    assert done >= 3000 and child.exitcode == -9

    # Nothing waits on the dead process: other events are held and rewarded at once.
    now = time.time()
    assert ring.hold("after", IDS, picks(1), now)
    assert ring.reward("after", "c1", now) == ACCEPTED
    # Every hold it finished is held; the one it was in (k{done}) may be recorded, or half done (pending).
    assert not any(ring.hold(f"k{i}", IDS, picks(0), now) for i in range(done))
    assert all(ring.reward(f"k{i}", "c49", now) == ACCEPTED for i in range(done))
    assert ring.hold(f"k{done + 1}", IDS, picks(0), now)
    # Past the grace a half-done hold no longer blocks its id; a finished one still does, for the window.
    later = now + PENDING_GRACE_S + 0.5
    ring.hold(f"k{done}", IDS, picks(0), later)  # True if it was half done, False if it finished
    assert ring.reward(f"k{done}", "c0", later) == ACCEPTED  # c0 is a member either way
    assert not ring.hold(f"k{done - 1}", IDS, picks(0), later)
    ring.close()
    buf.close()


# ---------------------------------------------------------------------------------------------------------
# Memory


def test_no_memory_growth_over_many_calls() -> None:
    ring = make_ring(max_events=256, max_members=256 * 64, window_s=1.0)
    chosen = np.arange(0, 400, 8, dtype=np.intp)
    unicode_picks = first(len(UNICODE_IDS))

    def one_round(i: int) -> None:
        now = T0 + i * 0.01
        ids = list(IDS)  # a fresh list, as orjson gives
        ring.hold(f"e{i}", ids, chosen, now)
        ring.hold(f"e{i}", ids, chosen, now)  # refused
        ring.hold(f"u{i}", list(UNICODE_IDS), unicode_picks, now)
        ring.reward(f"e{i}", "c8", now), ring.reward(f"e{i}", "c8", now), ring.reward(f"e{i}", "c9", now)
        ring.reward(f"u{i}", "日本", now), ring.reward("nope", "c0", now)
        ring.unmark(f"e{i}", "c8")
        ring.restore(f"r{i}", ["a", "b"], now - 0.5, ["a"], now=now)
        ring.stats(now)
        with pytest.raises(TypeError):
            ring.hold("x", ["a", 1], picks(1), now)  # type: ignore[list-item]
        with pytest.raises(ValueError):
            ring.hold("", ids, chosen, now)
        EventRing.attach(ring_buffer)

    ring_buffer = mmap.mmap(-1, EventRing.bytes_needed(4, 4))
    EventRing.create(ring_buffer, 4, 4, 1.0)
    for i in range(100):
        one_round(i)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100, 5_100):
            one_round(i)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes still allocated after 5,000 rounds"


def test_ring_in_a_dev_shm_file_survives_reattach(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    directory = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    path = directory / f"mab-events-test-{os.getpid()}"
    try:
        size = EventRing.bytes_needed(64, 4096)
        with open(path, "wb") as f:
            f.truncate(size)
        with open(path, "r+b") as f:
            buf = mmap.mmap(f.fileno(), 0)
        ring = EventRing.create(buf, 64, 4096, 30.0)
        ring.hold("e", IDS, picks(1), T0)
        ring.close()
        buf.close()
        with open(path, "r+b") as f:
            again = mmap.mmap(f.fileno(), 0)
        ring = EventRing.attach(again)
        assert ring.reward("e", "c1", T0) == ACCEPTED
        ring.close()
        again.close()
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# A reward's mark is pending until its journal has it


_MARKER = """
import mmap, sys, time
from mab_service.learning._events import ACCEPTED, EventRing
with open(sys.argv[1], "r+b") as f:
    ring = EventRing.attach(mmap.mmap(f.fileno(), 0))
assert ring.reward("ev", "c1", time.time()) == ACCEPTED
assert ring.confirm("ev", "c1")  # this one reached its journal
assert ring.reward("ev", "c2", time.time()) == ACCEPTED  # this one is killed before its journal has it
print("marked", flush=True)
time.sleep(60)
"""


def _file_ring(tmp_path: Path) -> tuple[EventRing, mmap.mmap]:
    path = tmp_path / "events.ring"
    size = EventRing.bytes_needed(64, 4096)
    with open(path, "wb") as f:
        f.truncate(size)
    with open(path, "r+b") as f:
        buf = mmap.mmap(f.fileno(), 0)
    return EventRing.create(buf, 64, 4096, 600.0), buf


def test_a_mark_whose_process_was_killed_before_its_journal_is_taken_over(tmp_path: Path) -> None:
    ring, buf = _file_ring(tmp_path)
    assert ring.hold("ev", IDS, picks(0, 1, 2, 3), time.time())
    marker = subprocess.Popen(
        [sys.executable, "-c", _MARKER, str(tmp_path / "events.ring")],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    try:
        assert marker.stdout is not None and marker.stdout.readline() == b"marked\n"
        now = time.time()
        # While the marking process lives, its pending mark answers as a final one does.
        assert ring.reward("ev", "c2", now) == DUPLICATE
        assert ring.reward("ev", "c1", now) == DUPLICATE
        assert not ring.confirm("ev", "c2")  # not this process's mark
    finally:
        marker.send_signal(signal.SIGKILL)
        marker.wait()  # reaped: the process is gone
        marker.stdout.close()  # type: ignore[union-attr]
    now = time.time()
    assert ring.reward("ev", "c1", now) == DUPLICATE  # final: its journal had it
    assert ring.reward("ev", "c2", now) == ACCEPTED  # the retry takes the dead process's mark over ...
    assert ring.reward("ev", "c2", now) == DUPLICATE  # ... once: pending in this (live) process's name
    assert ring.confirm("ev", "c2")
    assert ring.reward("ev", "c2", now) == DUPLICATE
    assert not ring.confirm("ev", "c2")  # final already
    ring.close()
    buf.close()


def test_a_pending_mark_can_be_unmarked_and_confirmed_only_once() -> None:
    ring = make_ring()
    assert ring.hold("e", IDS, picks(0, 1), T0)
    assert ring.reward("e", "c0", T0) == ACCEPTED
    ring.unmark("e", "c0")  # the journal refused: a retry may be accepted
    assert not ring.confirm("e", "c0")
    assert ring.reward("e", "c0", T0) == ACCEPTED
    assert ring.confirm("e", "c0") and not ring.confirm("e", "c0")
    ring.unmark("e", "c0")
    assert ring.reward("e", "c0", T0) == ACCEPTED
    assert not ring.confirm("e", "c1") and not ring.confirm("gone", "c0")
