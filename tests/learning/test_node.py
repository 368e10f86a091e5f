"""The node's loop state: one owner per state directory, tables rebuilt from the journal, the checkpoint fold, and a
/dev/shm too small for the tables."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mab_service.config import Settings
from mab_service.errors import FeatureSourceError
from mab_service.learning import _events, node
from mab_service.learning.loop import Loop


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
            loop = Loop(current, settings, apply_counts=True)
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
