"""The journal: records survive as written, rewards resolve only once synced, a refusing disk fails rewards and
keeps events, and a file cut back never holds a reward that was answered 503."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from pathlib import Path

import pytest

from mab_service.learning import journal, node
from mab_service.learning.journal import Journal, JournalUnavailable

pytestmark = pytest.mark.anyio


def _journal(directory: Path, **overrides: float) -> Journal:
    options = {
        "commit_delay_s": 0.001,
        "sync_s": 0.05,
        "segment_bytes": 1 << 20,
        "segment_age_s": 300.0,
        "buffer_max_bytes": 1 << 20,
    }
    options.update(overrides)
    return Journal(directory, "w", **options)  # type: ignore[arg-type]


def _records(directory: Path) -> list[list[object]]:
    """The events and rewards of the directory's files (not the marks of a clean close)."""
    return [r for path in sorted(directory.glob("*.jnl")) for r in journal.read_records(path) if r != ["c"]]


async def test_records_round_trip_and_rewards_wait_for_sync(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    j.start()
    j.event(1.5, "e1", ["a", "b", "é"])
    future = j.reward(2.0, "e1", "b", 0.5)
    assert not future.done()
    await asyncio.wait_for(future, 5)
    assert j.syncs >= 1
    await j.close()
    # The reward is written at once; the event was queued and written by the thread before the reward's sync.
    assert sorted(_records(tmp_path)) == [["e", 1.5, "e1", ["a", "b", "é"]], ["r", 2.0, "e1", "b", 0.5]]


async def test_many_rewards_share_few_syncs(tmp_path: Path) -> None:
    j = _journal(tmp_path, commit_delay_s=0.005)
    j.start()
    futures = [j.reward(1.0, f"e{i}", "a", 1.0) for i in range(500)]
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert j.syncs < 50  # group commit: far fewer syncs than rewards
    await j.close()
    assert len(_records(tmp_path)) == 500


async def test_events_are_synced_within_sync_s(tmp_path: Path) -> None:
    j = _journal(tmp_path, sync_s=0.05)
    j.start()
    j.event(1.0, "e1", ["a"])
    await asyncio.sleep(0.3)
    assert j.syncs >= 1
    await j.close()


def test_a_torn_record_ends_the_replay(tmp_path: Path) -> None:
    good = journal.frame(b'["e",1.0,"e1",["a"]]')
    (tmp_path / "x-000001.jnl").write_bytes(good + good[:-3])
    assert list(journal.read_records(tmp_path / "x-000001.jnl")) == [["e", 1.0, "e1", ["a"]]]
    damaged = bytearray(good + good)
    damaged[-2] ^= 0xFF
    (tmp_path / "x-000002.jnl").write_bytes(bytes(damaged))
    assert len(list(journal.read_records(tmp_path / "x-000002.jnl"))) == 1


async def test_files_rotate_by_size(tmp_path: Path) -> None:
    j = _journal(tmp_path, segment_bytes=200)
    j.start()
    for i in range(20):
        j.event(1.0, f"e{i}", ["a", "b"])
        await asyncio.wait_for(j.reward(1.0, f"e{i}", "a", 1.0), 5)
    await j.close()
    assert len(list(tmp_path.glob("*.jnl"))) >= 3
    assert len(_records(tmp_path)) == 40


async def test_a_full_disk_fails_rewards_keeps_events_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = _journal(tmp_path)
    j.start()
    j.event(1.0, "before", ["a"])
    await asyncio.wait_for(j.reward(1.0, "before", "a", 1.0), 5)

    real_write = os.write
    full = True

    def write(fd: int, data: bytes) -> int:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(journal.os, "write", write)
    j.event(2.0, "during", ["b"])  # held in memory, not lost
    with pytest.raises(JournalUnavailable):
        j.reward(2.0, "during", "b", 1.0)
    assert j.error is not None
    full = False
    assert await _eventually(lambda: j.error is None and j.held_bytes == 0)
    await asyncio.wait_for(j.reward(3.0, "during", "b", 1.0), 5)
    await j.close()
    records = _records(tmp_path)
    assert ["e", 2.0, "during", ["b"]] in records
    assert [r for r in records if r[0] == "r"] == [["r", 1.0, "before", "a", 1.0], ["r", 3.0, "during", "b", 1.0]]


async def test_a_failed_sync_cuts_the_file_back_and_fails_its_rewards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = _journal(tmp_path)
    j.start()
    j.event(1.0, "e1", ["a"])
    await asyncio.wait_for(j.reward(1.0, "e1", "a", 1.0), 5)
    real_sync = os.fdatasync
    failing = True

    def fdatasync(fd: int) -> None:
        if failing:
            raise OSError(errno.EIO, "Input/output error")
        real_sync(fd)

    monkeypatch.setattr(journal.os, "fdatasync", fdatasync)
    j.event(2.0, "e2", ["b"])
    future = j.reward(2.0, "e2", "b", 1.0)
    with pytest.raises(JournalUnavailable):
        await asyncio.wait_for(future, 5)
    failing = False
    assert await _eventually(lambda: j.error is None and j.held_bytes == 0)
    await asyncio.wait_for(j.reward(3.0, "e2", "b", 1.0), 5)
    await j.close()
    records = _records(tmp_path)
    # The reward answered 503 is gone; the event it cut is written again; the retry is there once.
    assert [r for r in records if r[0] == "r"] == [["r", 1.0, "e1", "a", 1.0], ["r", 3.0, "e2", "b", 1.0]]
    assert records.count(["e", 2.0, "e2", ["b"]]) == 1


async def test_a_read_only_disk_fails_rewards_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file system remounted read-only under an open file: Linux refuses such a remount while files are open for
    # writing, so the refusal is simulated where the journal meets it, at write().
    j = _journal(tmp_path)
    j.start()

    def refuse(fd: int, data: bytes) -> int:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(journal.os, "write", refuse)
    with pytest.raises(JournalUnavailable, match="Read-only"):
        j.reward(1.0, "e", "a", 1.0)
    with pytest.raises(JournalUnavailable):
        j.reward(1.0, "e", "b", 1.0)  # at once, without trying the disk again
    monkeypatch.undo()
    await j.close()


async def test_events_past_the_buffer_bound_are_dropped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = _journal(tmp_path, buffer_max_bytes=200)
    j.start()

    def refuse(fd: int, data: bytes) -> int:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(journal.os, "write", refuse)
    for i in range(20):
        j.event(1.0, f"e{i}", ["a"])
    assert 0 < j.held_bytes <= 200
    assert j.dropped_events > 0
    monkeypatch.undo()
    await j.close()


async def _eventually(predicate: object, timeout_s: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_failed_cut_back_refuses_rewards_until_repaired_and_never_replays_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = _journal(tmp_path)
    j.start()
    j.event(1.0, "e1", ["a"])
    await asyncio.wait_for(j.reward(1.0, "e1", "a", 1.0), 5)
    real_sync, real_write_atomically = os.fdatasync, journal.write_atomically
    broken = True

    def fdatasync(fd: int) -> None:
        if broken:
            raise OSError(errno.EIO, "Input/output error")
        real_sync(fd)

    def ftruncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")  # never repaired this way: the sidecar has to do

    def write_atomically(path: Path, data: bytes) -> None:
        if broken:
            raise OSError(errno.EIO, "Input/output error")
        real_write_atomically(path, data)

    monkeypatch.setattr(journal.os, "fdatasync", fdatasync)
    monkeypatch.setattr(journal.os, "ftruncate", ftruncate)
    monkeypatch.setattr(journal, "write_atomically", write_atomically)
    j.event(2.0, "e2", ["b"])
    with pytest.raises(JournalUnavailable):
        await asyncio.wait_for(j.reward(2.0, "e2", "b", 1.0), 5)
    damaged = tmp_path / "w-000001.jnl"
    assert b'"r",2.0,"e2","b"' in damaged.read_bytes()  # the refused reward is still in the file
    await asyncio.sleep(0.2)  # several retries, all failing
    with pytest.raises(JournalUnavailable, match="cannot cut"):
        j.reward(3.0, "e2", "b", 1.0)  # refused while the tail is readable
    broken = False
    assert await _eventually(lambda: j.error is None and j.held_bytes == 0)
    assert journal.limit_of(damaged) is not None
    await asyncio.wait_for(j.reward(4.0, "e2", "b", 1.0), 5)
    await j.close()
    records = _records(tmp_path)
    # Replayed: the accepted rewards only, the cut event once (written again in the next file).
    assert [r for r in records if r[0] == "r"] == [["r", 1.0, "e1", "a", 1.0], ["r", 4.0, "e2", "b", 1.0]]
    assert records.count(["e", 2.0, "e2", ["b"]]) == 1
    assert b'"r",2.0,"e2","b"' in damaged.read_bytes()  # still there, past the limit replay stops at
    tally = node.Tally.of(sorted(tmp_path.glob("*.jnl")))  # what a restart counts
    assert tally.rewards == {"a": 1.0, "b": 1.0} and tally.impressions == {"a": 1, "b": 1}


async def test_a_cut_back_that_fails_once_is_done_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = _journal(tmp_path)
    j.start()
    real_sync, real_truncate = os.fdatasync, os.ftruncate
    failures = {"fdatasync": 1, "ftruncate": 1}

    def fdatasync(fd: int) -> None:
        if failures["fdatasync"]:
            failures["fdatasync"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_sync(fd)

    def ftruncate(fd: int, length: int) -> None:
        if failures["ftruncate"]:
            failures["ftruncate"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_truncate(fd, length)

    monkeypatch.setattr(journal.os, "fdatasync", fdatasync)
    monkeypatch.setattr(journal.os, "ftruncate", ftruncate)
    with pytest.raises(JournalUnavailable):
        await asyncio.wait_for(j.reward(1.0, "e1", "a", 1.0), 5)
    assert await _eventually(lambda: j.error is None)
    await asyncio.wait_for(j.reward(2.0, "e1", "a", 1.0), 5)
    await j.close()
    assert (tmp_path / "w-000001.jnl").stat().st_size == 0  # cut back on the second try: no sidecar needed
    assert journal.limit_of(tmp_path / "w-000001.jnl") is None
    assert [r for r in _records(tmp_path) if r[0] == "r"] == [["r", 2.0, "e1", "a", 1.0]]


async def test_the_disk_budget_refuses_rewards_and_recovers_once_files_are_folded(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    budget = journal.Budget(max_bytes=2000, min_free_bytes=0)
    j = Journal(
        directory,
        "w",
        commit_delay_s=0.001,
        sync_s=0.05,
        segment_bytes=300,
        segment_age_s=300.0,
        buffer_max_bytes=500,
        budget=budget,
    )
    j.start()
    accepted = 0
    with pytest.raises(JournalUnavailable, match="disk budget is reached"):
        for i in range(1000):
            await asyncio.wait_for(j.reward(1.0, f"e{i}", "a", 1.0), 5)
            accepted += 1
    assert 0 < accepted < 100
    assert sum(p.stat().st_size for p in directory.glob("*.jnl")) <= budget.max_bytes
    for i in range(50):  # impressions meanwhile: held up to the buffer's bound, then dropped and counted
        j.event(1.0, f"x{i}", ["a"])
    assert await _eventually(lambda: j.dropped_events > 0)
    with pytest.raises(JournalUnavailable, match="--journal-max-bytes"):
        j.reward(1.0, "late", "a", 1.0)
    assert node.fold(tmp_path, older_than=1e18) > 0  # every file but the open one
    assert await _eventually(lambda: j.error is None)  # seen at the next look at the directory
    await asyncio.wait_for(j.reward(2.0, "late", "a", 1.0), 5)
    await j.close()
    assert node.read_checkpoint(tmp_path).arms["a"][1] >= accepted - 10


async def test_a_volume_under_its_free_reserve_refuses_rewards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A volume of 100 MiB with 4 MiB free, simulated where the journal looks (a real one would need a mount).
    volume = {"total": 100 << 20, "free": 4 << 20, "used": 96 << 20}
    monkeypatch.setattr(journal.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(**volume))  # type: ignore[attr-defined]
    j = _journal(tmp_path)
    j.budget = journal.Budget(max_bytes=1 << 40, min_free_bytes=1 << 40)  # kept free: 5% of the volume, 5 MiB
    j.start()
    with pytest.raises(JournalUnavailable, match="--journal-min-free-bytes"):
        j.reward(1.0, "e", "a", 1.0)
    volume["free"] = 50 << 20  # room again: taken at the next retry
    assert await _eventually(lambda: j.error is None)
    await asyncio.wait_for(j.reward(2.0, "e", "a", 1.0), 5)
    await j.close()
    assert [r for r in _records(tmp_path) if r[0] == "r"] == [["r", 2.0, "e", "a", 1.0]]


async def test_a_clean_close_marks_the_file_closed(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    j.start()
    await asyncio.wait_for(j.reward(1.0, "e", "a", 1.0), 5)
    (path,) = tmp_path.glob("*.jnl")
    assert not journal.closed(path)
    await j.close()
    assert journal.closed(path)
    assert list(journal.read_records(path))[-1] == ["c"]
