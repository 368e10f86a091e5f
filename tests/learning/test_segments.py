"""The arm table's segment rows and forward decay (csrc/mab/arm_table.cpp), against references in numpy.

A segment's posterior is Beta(m * mu + r_sa, m * (1 - mu) + n_sa - r_sa) with mu the arm's global mean
(``posteriors.backed_off``); with a half-life H a count made at t weighs 2 ** ((t - now) / H) when read at ``now``,
whatever landmark the table adds it against and however often that landmark moves.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest

from mab_service.ids import pair_key, segment_key, split_key
from mab_service.learning import journal, node
from mab_service.learning._arms import EPOCH_HALF_LIVES, FLAG_SEGMENT, ArmTable
from mab_service.learning.posteriors import backed_off, posterior

PRIOR = (1.0, 1.0)
M = 10.0


def new_table(
    capacity: int = 100, id_bytes: int = 10_000, segment_rows: int = 0, half_life_s: float = 0.0, landmark: float = 0.0
) -> ArmTable:
    buffer = mmap.mmap(-1, ArmTable.bytes_needed(capacity, id_bytes, segment_rows))
    return ArmTable.create(buffer, capacity, id_bytes, segment_rows, id_bytes // 2, half_life_s, landmark)


def test_the_key_rule_keeps_segment_rows_apart_from_every_id() -> None:
    assert segment_key("fr") == "\0fr" and pair_key("fr", "a") == "\0fr\0a"
    assert split_key(pair_key("fr", "a/b")) == ("fr", "a/b")
    assert split_key(segment_key("fr")) == ("fr", None)
    assert split_key("fr") is None  # no id starts with a control character


def test_a_segment_backs_off_to_the_arms_global_mean_and_moves_with_its_own_counts() -> None:
    table = new_table(segment_rows=50)
    ids = ["a", "b", "a-long-arm-id-of-more-than-8-bytes", "new"]
    table.load(ids[:3], [3.0, 1.0, 40.0], [7.0, 1.0, 2.0])
    _, _, _, rows = table.gather(ids, *PRIOR, now=0.0)
    assert table.add_impressions(ids, rows, np.array([0, 1, 2, 3]), *PRIOR, now=0.0) == 0  # global: all four
    for arm, shown, got in (("a", 5, 2.0), ("b", 3, 0.0), ("new", 1, 1.0)):
        table.add(pair_key("fr", arm), shown, got, *PRIOR, now=0.0)
    table.add("a", 0, 4.0, *PRIOR, now=0.0)

    alpha, beta, known, rows, pair_rows = table.gather_segment(ids, "fr", M, *PRIOR, now=0.0)
    assert known == 4 and (pair_rows >= 0).tolist() == [True, True, False, True]  # "new" came with its impression
    g_alpha, g_beta, _, _ = table.gather(ids, *PRIOR, now=0.0)
    counts = {"a": (5.0, 2.0), "b": (3.0, 0.0), "new": (1.0, 1.0)}
    shown = np.array([counts.get(i, (0.0, 0.0))[0] for i in ids])
    got = np.array([counts.get(i, (0.0, 0.0))[1] for i in ids])
    want_alpha, want_beta = backed_off(M, g_alpha, g_beta, shown, got)
    np.testing.assert_array_equal(alpha, want_alpha)  # same arithmetic, same order: bit for bit
    np.testing.assert_array_equal(beta, want_beta)
    # A segment first seen starts at the global estimate, worth M impressions.
    alpha, beta, _, _, pair_rows = table.gather_segment(ids, "de", M, *PRIOR, now=0.0)
    assert (pair_rows == -1).all()
    np.testing.assert_allclose(alpha + beta, M)
    np.testing.assert_allclose(alpha / (alpha + beta), g_alpha / (g_alpha + g_beta))


def test_segment_impressions_count_the_arms_keys_and_insert_them_in_the_segment_budget() -> None:
    table = new_table(segment_rows=50)
    ids = ["a", "b", "c"]
    alpha, beta, _, rows, pair_rows = table.gather_segment(ids, "fr", M, *PRIOR, now=0.0)
    picks = np.array([2, 0])
    assert table.add_impressions(ids, pair_rows, picks, *PRIOR, now=0.0, segment="fr") == 0
    assert table.segment_rows_used == 2
    _, _, _, _, again = table.gather_segment(ids, "fr", M, *PRIOR, now=0.0)
    assert again[1] == -1 and again[0] >= 0 and again[2] >= 0
    assert table.add_impressions(ids, again, picks, *PRIOR, now=0.0, segment="fr") == 0  # by row this time
    assert table.get(pair_key("fr", "c"), now=0.0)[2] == 2.0
    assert table.get(pair_key("fr", "b"), now=0.0) is None
    flags = table.records()["flags"]
    assert (flags & FLAG_SEGMENT != 0).sum() == 2


def test_a_flood_of_segments_fills_only_their_budget_and_never_an_arms_room() -> None:
    """One client sending a new segment with every request takes the segment rows, not the arms': other clients'
    arms still get rows, and segments already counted go on counting."""
    table = new_table(capacity=60, segment_rows=20)
    table.load([f"cat-{i}" for i in range(30)], np.ones(30), np.ones(30))
    assert table.find_or_insert(segment_key("kept"), *PRIOR) >= 0
    rows = [table.find_or_insert(pair_key(f"flood-{i}", "cat-0"), *PRIOR) for i in range(100)]
    assert sum(r >= 0 for r in rows) == 19 and table.segment_rows_used == 20
    assert table.add(segment_key("kept"), 1, 0.0, *PRIOR)  # an existing segment row still counts
    assert not table.add(segment_key("late"), 1, 0.0, *PRIOR)  # a new one is refused: the budget is full
    # Every arm row is still free for arms: 30 catalogue arms + 10 new ones fill the table's arm part exactly.
    assert all(table.add(f"new-{i}", 1, 0.0, *PRIOR) for i in range(10))
    assert not table.add("one-too-many", 1, 0.0, *PRIOR)
    assert len(table) == 60


def test_a_table_without_a_segment_budget_holds_any_key_as_an_arm() -> None:
    table = new_table(capacity=4)
    assert table.add(pair_key("fr", "a"), 1, 0.0, *PRIOR)
    assert table.segment_rows_used == 0 and table.get(pair_key("fr", "a"))[2] == 1.0


def reference(times: np.ndarray, amounts: np.ndarray, now: float, half_life_s: float) -> float:
    """Forward decay's sum, recomputed from the events: sum of amount * 2 ** ((t - now) / H)."""
    return float(np.sum(amounts * np.exp2((times - now) / half_life_s)))


def test_decayed_counts_equal_the_reference_to_float_rounding(rand) -> None:
    h = 60.0
    table = new_table(half_life_s=h, landmark=1_000.0)
    times = np.sort(rand.gen.uniform(1_000.0, 5_000.0, 400))
    values = rand.gen.choice([0.0, 0.25, 1.0], size=400)
    for t, value in zip(times.tolist(), values.tolist()):
        assert table.add("a", 1, value, *PRIOR, now=t)
    for now in (5_000.0, 5_060.0, 9_000.0):
        _, _, shown, got, _ = table.get("a", now=now)
        assert shown == pytest.approx(reference(times, np.ones_like(times), now, h), rel=1e-12)
        assert got == pytest.approx(reference(times, values, now, h), rel=1e-12)
        alpha, beta, _, _ = table.gather(["a"], *PRIOR, now=now)
        assert (alpha[0], beta[0]) == pytest.approx(posterior(1.0, 1.0, shown, got), rel=1e-12)


def test_the_landmark_moves_on_long_before_an_overflow_and_the_counts_stay_exact(rand) -> None:
    """With H = 1 s, 20,000 s of additions would weigh 2 ** 20000 against a fixed landmark (doubles overflow at
    2 ** 1024). Rebases every few hundred seconds move the landmark; the counts read the same before and after each,
    and equal the reference at the end."""
    h = 1.0
    table = new_table(half_life_s=h, landmark=0.0)
    times = np.sort(rand.gen.uniform(0.0, 20_000.0, 3_000))
    moved = 0
    for t in times.tolist():
        before = table.get("a", now=t)
        if table.rebase(now=t):
            moved += 1
            after = table.get("a", now=t)
            assert after[2] == pytest.approx(before[2], rel=1e-12)
        table.add("a", 1, 0.5, *PRIOR, now=t)
    assert moved >= 20_000 / EPOCH_HALF_LIVES - 2
    assert table.landmark > 19_000.0 - EPOCH_HALF_LIVES
    now = float(times[-1]) + 0.5
    _, _, shown, got, _ = table.get("a", now=now)
    assert np.isfinite(shown) and shown == pytest.approx(reference(times, np.ones_like(times), now, h), rel=1e-12)
    assert got == pytest.approx(reference(times, np.full_like(times, 0.5), now, h), rel=1e-12)
    counts = table.counts(now=now)
    assert counts[0][0] == shown and counts[1][0] == got


def test_a_rebase_sweeps_rows_not_touched_for_an_epoch() -> None:
    """A row written once and then left alone through several landmark moves still reads right: every move sweeps
    it into the new epoch, so no count is ever two epochs behind (which its parity bit could not tell)."""
    table = new_table(half_life_s=1.0, landmark=0.0)
    table.add("idle", 1, 1.0, *PRIOR, now=10.0)
    for step in range(1, 6):
        assert table.rebase(now=step * EPOCH_HALF_LIVES * 0.75 + 200.0)
        now = table.landmark
        assert table.get("idle", now=now)[2] == pytest.approx(2.0 ** (10.0 - now), rel=1e-12)


def test_without_a_half_life_counts_are_plain_sums_and_rebase_does_nothing() -> None:
    table = new_table()
    assert table.add("a", 3, 1.0, *PRIOR, now=0.0) and table.add("a", 2, 0.5, *PRIOR, now=1e9)
    assert table.get("a", now=5e9)[2:4] == (5.0, 1.5)
    assert not table.rebase(now=1e12)


def test_bad_times_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="half_life_s must be finite and >= 0"):
        new_table(half_life_s=-1.0)
    with pytest.raises(ValueError, match="segment_rows"):
        ArmTable.bytes_needed(10, 100, 11)
    table = new_table()
    with pytest.raises(ValueError, match="now must be finite"):
        table.gather(["a"], *PRIOR, now=float("nan"))
    with pytest.raises(ValueError, match="weight must be finite and > 0"):
        table.gather_segment(["a"], "fr", 0.0, *PRIOR)


def _dead_writer_file(directory: Path, records: list[list[object]]) -> None:
    """A journal file of a writer whose process is gone: closed, so a fold takes it."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    directory.mkdir(parents=True, exist_ok=True)
    data = b"".join(journal.frame(orjson.dumps(r)) for r in records)
    path = directory / f"{time.time_ns():x}-{proc.pid}-000001.jnl"
    path.write_bytes(data)
    os.utime(path, (1.0, 1.0))  # as old as its records, which are from the first minutes of 1970


RECORDS: list[list[object]] = [
    ["e", 100.0, "e1", ["a", "b"], "fr"],
    ["e", 110.0, "e2", ["a"]],
    ["r", 120.0, "e1", "a", 0.5, "fr"],
    ["r", 121.0, "e1", "a", 0.5, "fr"],  # the same (event, id) again: counted once
    ["r", 130.0, "e2", "a", 1.0],
]


def test_a_fold_counts_segment_keys_and_keeps_version_1_without_a_half_life(tmp_path: Path) -> None:
    _dead_writer_file(tmp_path / "journal", RECORDS)
    assert node.fold(tmp_path, older_than=1e9) == 1
    data = (tmp_path / node.CHECKPOINT).read_bytes()
    assert data[4:8] == (1).to_bytes(4, "little")  # what earlier releases read
    assert node.read_checkpoint(tmp_path).arms == {
        "a": (2, 1.5),
        "b": (1, 0.0),
        pair_key("fr", "a"): (1, 0.5),
        pair_key("fr", "b"): (1, 0.0),
        segment_key("fr"): (2, 0.5),
    }


def test_a_fold_with_a_half_life_weighs_to_its_landmark_and_round_trips_as_version_2(tmp_path: Path) -> None:
    h = 10.0
    _dead_writer_file(tmp_path / "journal", RECORDS)
    assert node.fold(tmp_path, older_than=200.0, half_life_s=h) == 1
    checkpoint = node.read_checkpoint(tmp_path)
    assert (checkpoint.half_life_s, checkpoint.landmark) == (h, 200.0)
    shown, got = checkpoint.arms["a"]
    assert shown == pytest.approx(2.0 ** ((100 - 200) / h) + 2.0 ** ((110 - 200) / h), rel=1e-12)
    assert got == pytest.approx(0.5 * 2.0 ** ((120 - 200) / h) + 2.0 ** ((130 - 200) / h), rel=1e-12)
    assert checkpoint.arms[segment_key("fr")][0] == pytest.approx(2 * 2.0 ** ((100 - 200) / h), rel=1e-12)
    assert node.decode_checkpoint(node.encode_checkpoint(checkpoint)) == checkpoint
    # The next fold moves the counts to its own landmark.
    _dead_writer_file(tmp_path / "journal", [["e", 250.0, "e3", ["a"]]])
    assert node.fold(tmp_path, older_than=300.0, half_life_s=h) == 1
    moved = node.read_checkpoint(tmp_path).arms["a"][0]
    assert moved == pytest.approx(shown * 2.0 ** ((200 - 300) / h) + 2.0 ** ((250 - 300) / h), rel=1e-12)


def test_a_damaged_count_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = node.Checkpoint(set(), {"a": (1.0, 0.5)}, 10.0, 5.0)
    data = bytearray(node.encode_checkpoint(checkpoint))
    at = data.index(np.float64(1.0).tobytes())
    data[at : at + 8] = np.float64(-1.0).tobytes()
    data[-4:] = zlib.crc32(bytes(data[:-4])).to_bytes(4, "little")
    with pytest.raises(ValueError, match="negative or not finite"):
        node.decode_checkpoint(bytes(data))
