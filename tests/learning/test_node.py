"""The node's loop state: one owner per state directory, tables rebuilt from the journal, the checkpoint fold, and a
/dev/shm too small for the tables."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from mab_service.config import Settings
from mab_service.errors import FeatureSourceError
from mab_service.learning import _events, journal, node
from mab_service.learning.journal import Journal, JournalUnavailable
from mab_service.learning.loop import NodeLoop


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "features": "demo",
        "state_dir": str(tmp_path / "state"),
        "max_held_events": 1000,
        "max_held_members": 20000,
        "max_new_arms": 1000,
        "decision_log": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def _answer_and_reward(settings: Settings, n: int) -> dict[str, tuple[int, float]]:
    """n answers of two ids through a Loop on a fresh node, a reward for the first id of each; the node's counts."""

    async def run() -> dict[str, tuple[int, float]]:
        with node.using(settings) as current:
            loop = NodeLoop(current, settings, apply_counts=True)
            await loop.start()
            ids = ["article-0001", "brand-new"]
            alpha, beta, _, rows = current.arms.gather(ids, 1.0, 1.0)
            for i in range(n):
                event_id = loop.answered(
                    f"e{i}", True, "u", b"{}", ids, alpha, beta, rows, np.array([0, 1]), ids, i, None
                )
                assert await loop.reward(event_id, ids[0], 1.0)
            counts = {arm: current.arms.get(arm)[2:4] for arm in ids}  # type: ignore[index]
            await loop.close()
            return counts

    return asyncio.run(run())


def test_a_restart_rebuilds_counts_and_held_events(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    before = _answer_and_reward(settings, 5)
    assert before == {"article-0001": (5, 5.0), "brand-new": (5, 0.0)}
    with node.using(settings) as again:
        assert {arm: again.arms.get(arm)[2:4] for arm in before} == before  # type: ignore[index]
        assert again.events.reward("e4", "article-0001", time.time()) == _events.DUPLICATE
        assert again.events.reward("e4", "brand-new", time.time()) == _events.ACCEPTED


def test_folded_journal_files_count_once(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _answer_and_reward(settings, 3)
    state = settings.state_path()
    assert node.fold(state, older_than=1e18) >= 1  # fold everything
    assert not list((state / "journal").glob("*.jnl"))
    assert (state / node.CHECKPOINT).exists()
    _answer_and_reward(settings, 2)  # more on top of the checkpoint
    with node.using(settings) as again:
        assert again.arms.get("article-0001")[2:4] == (5, 5.0)  # type: ignore[index]
        assert again.arms.get("brand-new")[2:4] == (5, 0.0)  # type: ignore[index]
    assert node.fold(state, older_than=0) == 0  # nothing old enough


def test_one_node_per_state_directory(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    owner = node.Node.open(settings)
    try:
        with pytest.raises(FeatureSourceError, match="in use by pid"):
            node.Node.open(settings)
        attached = node.Node.attach(owner.handle)  # what a worker does
        assert len(attached.arms) == len(owner.arms) == 2000
        attached.close()
    finally:
        owner.close()
    assert not Path(owner.handle.arms_path).exists() and not Path(owner.handle.events_path).exists()
    node.Node.open(settings).close()  # free again


def test_a_shm_too_small_for_the_held_events_fails_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = tmp_path / "shm"
    small.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(node, "SHM_DIR", small)
        with pytest.raises(FeatureSourceError, match="--max-held-events"):
            node.Node.open(_settings(tmp_path, max_held_events=100_000, max_held_members=1_000_000))
        assert not list(small.iterdir())  # nothing left behind
        node.Node.open(_settings(tmp_path)).close()  # small tables fit
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_shared_files_of_a_dead_owner_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(node, "SHM_DIR", shm)
    proc = subprocess.Popen(["true"])  # its pid is a process that has exited
    proc.wait()
    stale = shm / f"{node.SHM_PREFIX}{proc.pid}-abcd-arms"
    stale.write_bytes(b"x")
    mine = shm / f"{node.SHM_PREFIX}{os.getpid()}-abcd-arms"
    mine.write_bytes(b"x")
    node.Node.open(_settings(tmp_path)).close()
    assert not stale.exists() and mine.exists()


def test_decision_logs_of_earlier_runs_are_bounded(tmp_path: Path) -> None:
    settings = _settings(tmp_path, decision_log_max_bytes=10_000)
    directory = settings.state_path() / "decisions"
    directory.mkdir(parents=True)
    for i in range(5):  # five files of 4,000 bytes, oldest first
        path = directory / f"old-{i}.dlog"
        path.write_bytes(b"x" * 4000)
        os.utime(path, (1000 + i, 1000 + i))
    node.Node.open(settings).close()
    assert sorted(p.name for p in directory.iterdir()) == ["old-3.dlog", "old-4.dlog"]


def _writer() -> str:
    """A journal or decision log writer's name as a worker of this process makes it."""
    return f"{time.time_ns():x}-{os.getpid()}"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])  # its pid is a process that has exited
    proc.wait()
    return proc.pid


def test_an_open_journal_file_is_not_folded_whatever_its_mtime(tmp_path: Path) -> None:
    state = tmp_path / "state"
    directory = state / "journal"

    async def run() -> None:
        j = Journal(
            directory,
            _writer(),
            commit_delay_s=0.001,
            sync_s=0.05,
            segment_bytes=1,  # every write after the first goes to a new file
            segment_age_s=300.0,
            buffer_max_bytes=1 << 20,
        )
        j.start()
        await asyncio.wait_for(j.reward(1.0, "old", "a", 1.0), 5)  # file 1: a record of long ago
        await asyncio.wait_for(j.reward(time.time(), "new", "b", 1.0), 5)  # file 2, still open: a recent one
        first, second = journal_files = node.journal_files(directory)
        for path in journal_files:
            os.utime(path, (1.0, 1.0))  # a clock that jumped: both files look written long ago
        # File 1 is closed (file 2 follows it) and its records are old: folded. File 2 is open: not, whatever
        # its mtime, nor even with a horizon past its records.
        assert node.fold(state, older_than=time.time() - 100) == 1
        assert not first.exists() and second.exists()
        assert node.fold(state, older_than=1e18) == 0
        await j.close()
        os.utime(second, (1.0, 1.0))
        assert node.fold(state, older_than=time.time() - 100) == 0  # closed now, but its record is recent
        assert node.fold(state, older_than=1e18) == 1

    asyncio.run(run())
    assert node.read_checkpoint(state).arms == {"a": (0, 1.0), "b": (0, 1.0)}


def test_files_of_a_dead_writer_are_folded(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    directory.mkdir()
    record = journal.frame(b'["e",1.0,"e1",["a","b"]]')
    dead = f"{time.time_ns():x}-{_dead_pid()}"
    (directory / f"{dead}-000001.jnl").write_bytes(record)  # its last file, never marked closed (kill -9)
    (directory / f"{_writer()}-000001.jnl").write_bytes(record)  # a running writer's open file
    assert node.fold(tmp_path, older_than=1e18) == 1
    assert len(node.journal_files(directory)) == 1
    assert node.read_checkpoint(tmp_path).arms == {"a": (1, 0.0), "b": (1, 0.0)}


def test_the_checkpoint_is_compact_and_read_back_exactly(tmp_path: Path) -> None:
    arms = {f"arm-{i}": (i + 1, i / 3) for i in range(1000)} | {"é": (2, 1.0)}
    checkpoint = node.Checkpoint({"w-000001.jnl"}, arms)
    data = node.encode_checkpoint(checkpoint)
    # Header, 20 bytes and the id per arm, the folded names, a checksum: nothing else.
    assert len(data) == 32 + sum(20 + len(a.encode()) for a in arms) + len("w-000001.jnl") + 4
    assert node.decode_checkpoint(data) == checkpoint
    damaged = bytearray(data)
    damaged[40] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        node.decode_checkpoint(bytes(damaged))


def test_a_checkpoint_holds_only_arms_with_counts_and_restarts_to_the_same_counts(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    before = _answer_and_reward(settings, 3)
    state = settings.state_path()
    assert node.fold(state, older_than=1e18) >= 1
    checkpoint = node.read_checkpoint(state)
    assert checkpoint.arms == before  # the two arms with counts; not the 1,998 catalogue arms without
    size = (state / node.CHECKPOINT).stat().st_size
    assert size == 32 + sum(20 + len(a) for a in before) + len("\n".join(checkpoint.folded)) + 4
    with node.using(settings) as again:
        assert {arm: again.arms.get(arm)[2:4] for arm in before} == before  # type: ignore[index]


def test_a_json_checkpoint_is_read_once_and_upgraded(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    state = settings.state_path()
    state.mkdir(parents=True)
    legacy = {"version": 1, "folded": ["gone-000001.jnl"], "arms": [["article-0001", 7, 3.0], ["unseen", 0, 0.0]]}
    (state / node.LEGACY_CHECKPOINT).write_bytes(orjson.dumps(legacy))
    with node.using(settings) as current:
        assert current.arms.get("article-0001")[2:4] == (7, 3.0)  # type: ignore[index]
    assert node.fold(state, older_than=0) == 0  # nothing to fold, but the checkpoint is rewritten
    assert not (state / node.LEGACY_CHECKPOINT).exists()
    assert node.read_checkpoint(state).arms == {"article-0001": (7, 3.0)}  # the arm without counts is gone
    with node.using(settings) as again:
        assert again.arms.get("article-0001")[2:4] == (7, 3.0)  # type: ignore[index]


def test_decision_logs_of_dead_workers_are_pruned_while_running(tmp_path: Path) -> None:
    settings = _settings(tmp_path, decision_log_max_bytes=10_000, workers=1, checkpoint_interval_s=0.05)
    directory = settings.state_path() / "decisions"
    directory.mkdir(parents=True)
    current = node.Node.open(settings)
    try:
        dead, live = f"{time.time_ns():x}-{_dead_pid()}", _writer()
        files = [directory / f"{dead}-{i:06d}.dlog" for i in range(1, 5)]
        files += [directory / f"{live}-000001.dlog", directory / f"{live}-000002.dlog"]
        for age, path in enumerate(files):  # oldest first; 24,000 bytes for a budget of 10,000
            path.write_bytes(b"x" * 4000)
            os.utime(path, (1000 + age, 1000 + age))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(list(directory.iterdir())) > 2:
            time.sleep(0.05)
        assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in files[-2:])
        # Past the budget, only the file a running writer may have open stays.
        files[-2].write_bytes(b"x" * 20_000)
        assert node.prune_decisions(directory, 10_000) == 1
        assert [p.name for p in directory.iterdir()] == [files[-1].name]
    finally:
        current.close()


def test_rewards_get_503_past_the_node_journal_budget(tmp_path: Path) -> None:
    settings = _settings(tmp_path, journal_max_bytes=3000, journal_min_free_bytes=0)

    async def run() -> int:
        with node.using(settings) as current:
            loop = NodeLoop(current, settings, apply_counts=True)
            await loop.start()
            ids = ["article-0001"]
            alpha, beta, _, rows = current.arms.gather(ids, 1.0, 1.0)
            accepted = 0
            try:
                for i in range(200):
                    event_id = loop.answered(
                        f"e{i}", True, "u", b"{}", ids, alpha, beta, rows, np.array([0]), ids, i, None
                    )
                    await loop.reward(event_id, ids[0], 1.0)
                    accepted += 1
            except JournalUnavailable as exc:
                assert "disk budget is reached" in str(exc)
                assert (exc.status_code, exc.code) == (503, "journal_unavailable")
            assert loop.refusals.unavailable == 1
            await loop.close()
            return accepted

    accepted = asyncio.run(run())
    assert 0 < accepted < 200
    journal_bytes = sum(p.stat().st_size for p in node.journal_files(settings.state_path() / "journal"))
    assert journal_bytes <= 3000 + len(journal.CLOSED)
