"""The shared arm table: lookups equal to IdIndex, counts, CSV reports as local.py words them, full tables, and
several processes inserting and counting in one mapped file."""

from __future__ import annotations

import gc
import mmap
import multiprocessing
import os
import random
import struct
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mab_service.errors import FeatureSourceError
from mab_service.features._index import IdIndex
from mab_service.features.local import load_table
from mab_service.learning._arms import (
    FLAG_CATALOGUE,
    FLAG_RUNTIME,
    FLAG_WASTED,
    ArmTable,
    first_seen,
    narrowed,
    unnamed,
)
from tests.features.test_index import AWKWARD_IDS

PRIOR = (1.0, 20.0)


def new_table(capacity: int = 1000, id_bytes: int = 10_000) -> ArmTable:
    """A table in an anonymous mapping (zeroed, page-aligned), as a file in /dev/shm would give."""
    buffer = mmap.mmap(-1, ArmTable.bytes_needed(capacity, id_bytes))
    return ArmTable.create(buffer, capacity, id_bytes)


def live_ids(table: ArmTable) -> list[str]:
    flags = table.records()["flags"]
    return [table.id_at(row) for row in np.flatnonzero(flags & (FLAG_CATALOGUE | FLAG_RUNTIME))]


@pytest.fixture(scope="module")
def big() -> tuple[ArmTable, IdIndex, list[str]]:
    """100,000 ids c0 .. c99999 in both an ArmTable and an IdIndex."""
    rng = np.random.default_rng(7)
    ids = [f"c{i}" for i in range(100_000)]
    alpha = 1.0 + rng.integers(0, 2000, len(ids)).astype(np.float64)
    beta = 20.0 * alpha + rng.uniform(1.0, 5000.0, len(ids))
    table = new_table(len(ids), 0)
    table.load(ids, alpha, beta)
    return table, IdIndex(ids, alpha, beta), ids


# ---------------------------------------------------------------------------------------------------------
# Lookups


def test_round_trip() -> None:
    table = new_table()
    table.load(["a", "b", "a-much-longer-id"], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert len(table) == 3 and table.capacity == 1000 and table.rows_wasted == 0
    assert table.get("b") == (2.0, 5.0, 0, 0.0, True)
    assert table.get("a-much-longer-id") == (3.0, 6.0, 0, 0.0, True)
    assert table.get("nobody") is None
    assert [table.id_at(i) for i in range(3)] == ["a", "b", "a-much-longer-id"]
    records = table.records()
    assert records["alpha0"].tolist() == [1.0, 2.0, 3.0]
    assert records["beta0"].tolist() == [4.0, 5.0, 6.0]
    assert records["flags"].tolist() == [FLAG_CATALOGUE] * 3


def test_unknown_ids_get_the_prior_and_row_minus_one() -> None:
    table = new_table()
    table.load(["a", "b"], [2.0, 3.0], [4.0, 5.0])
    alpha, beta, known, rows = table.gather(["z", "a", "", "b", "a", "zz"], 0.5, 7.0)
    np.testing.assert_array_equal(alpha, [0.5, 2.0, 0.5, 3.0, 2.0, 0.5])
    np.testing.assert_array_equal(beta, [7.0, 4.0, 7.0, 5.0, 4.0, 7.0])
    assert rows.dtype == np.int32 and rows.tolist() == [-1, 0, -1, 1, 0, -1]
    assert known == 3


def test_awkward_ids_match_id_index(rand) -> None:
    alpha = 1.0 + rand.gen.integers(0, 2000, len(AWKWARD_IDS)).astype(np.float64)
    beta = alpha + rand.gen.uniform(1.0, 50.0, len(AWKWARD_IDS))
    table = new_table(len(AWKWARD_IDS), 20_000)
    table.load(AWKWARD_IDS, alpha, beta)
    index = IdIndex(AWKWARD_IDS, alpha, beta)
    near = {i + "0" for i in AWKWARD_IDS} | {i[:-1] for i in AWKWARD_IDS} | {i[:-1] + "\x01" for i in AWKWARD_IDS}
    queries = AWKWARD_IDS + sorted(near)
    got, expected = table.gather(queries, *PRIOR), index.gather(queries, *PRIOR)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert [table.id_at(r) for r in got[3] if r >= 0] == [q for q in queries if q in index]


def test_gather_equals_id_index_on_a_big_table(big, rand) -> None:
    table, index, _ = big
    assert len(table) == 100_000
    for n in (0, 1, 31, 32, 33, 400, 2000, 5000):
        ids = [f"c{j}" for j in rand.gen.integers(0, 110_000, n)]
        alpha, beta, known, rows = table.gather(ids, *PRIOR)
        expected = index.gather(ids, *PRIOR)
        assert alpha.shape == beta.shape == rows.shape == (n,)
        np.testing.assert_array_equal(alpha, expected[0])
        np.testing.assert_array_equal(beta, expected[1])
        assert known == expected[2]
        np.testing.assert_array_equal(rows, [int(i[1:]) if int(i[1:]) < 100_000 else -1 for i in ids])


@settings(max_examples=150, deadline=None)
@given(
    table_ids=st.lists(st.text(max_size=24), unique=True, max_size=60),
    queries=st.lists(st.text(max_size=24), max_size=80),
)
def test_property_gather_equals_id_index(table_ids: list[str], queries: list[str]) -> None:
    alpha = np.arange(1, len(table_ids) + 1, dtype=np.float64)
    beta = alpha + 0.5
    table = new_table(max(len(table_ids), 1), 24 * 4 * 60)
    table.load(table_ids, alpha, beta)
    queries = queries + table_ids[::2]
    got, expected = table.gather(queries, *PRIOR), IdIndex(table_ids, alpha, beta).gather(queries, *PRIOR)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert [table_ids[r] if r >= 0 else None for r in got[3]] == [q if q in table_ids else None for q in queries]


def test_gather_rejects_bad_input() -> None:
    table = new_table()
    with pytest.raises(TypeError, match=r"ids must be a list \(got tuple\)"):
        table.gather(("a",), *PRIOR)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"candidates\[1\] must be a string \(got int\)"):
        table.gather(["a", 1], *PRIOR)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"candidates\[0\] is not valid Unicode"):
        table.gather(["\ud800"], *PRIOR)
    with pytest.raises(ValueError, match=r"prior_alpha must be finite and > 0 \(got 0.0\)"):
        table.gather(["a"], 0.0, 1.0)
    with pytest.raises(ValueError, match=r"prior_beta must be finite and > 0 \(got nan\)"):
        table.gather(["a"], 1.0, float("nan"))


# ---------------------------------------------------------------------------------------------------------
# Counting


def test_add_impressions_counts_known_rows_and_inserts_new_ids_with_the_prior() -> None:
    table = new_table()
    table.load(["a", "b"], [2.0, 3.0], [4.0, 5.0])
    ids = ["a", "new", "b", "other"]
    _, _, _, rows = table.gather(ids, *PRIOR)
    assert table.add_impressions(ids, rows, np.array([0, 1, 1, 3]), *PRIOR) == 0
    assert table.get("a") == (2.0, 4.0, 1, 0.0, True)
    assert table.get("b") == (3.0, 5.0, 0, 0.0, True)
    assert table.get("new") == (*PRIOR, 2, 0.0, False)
    assert table.get("other") == (*PRIOR, 1, 0.0, False)
    assert len(table) == 4 and table.records()["flags"].tolist()[2:] == [FLAG_RUNTIME] * 2
    # The posterior: alpha0 + rewards, beta0 + impressions - rewards.
    assert table.add("new", 0, 1.5, *PRIOR)
    alpha, beta, known, rows = table.gather(["new", "a"], *PRIOR)
    assert alpha.tolist() == [PRIOR[0] + 1.5, 2.0] and beta.tolist() == [PRIOR[1] + 0.5, 5.0]
    assert known == 2 and rows.tolist() == [2, 0]


def test_add_finds_or_inserts_and_adds_both_counts() -> None:
    table = new_table()
    table.load(["a"], [2.0], [4.0])
    assert table.add("a", 10, 2.5, *PRIOR)
    assert table.add("a", 5, 0.25, *PRIOR)
    assert table.add("fresh-and-longer-than-eight", 3, 1.0, 7.0, 9.0)
    assert table.get("a") == (2.0, 4.0, 15, 2.75, True)
    assert table.get("fresh-and-longer-than-eight") == (7.0, 9.0, 3, 1.0, False)
    alpha, beta, _, _ = table.gather(["a"], *PRIOR)
    assert alpha.tolist() == [4.75] and beta.tolist() == [4.0 + 15 - 2.75]


def test_beta_stays_positive_when_rewards_run_ahead_of_impressions() -> None:
    table = new_table()
    table.add("a", 1, 3.0, 2.0, 5.0)
    alpha, beta, _, _ = table.gather(["a"], *PRIOR)
    assert alpha.tolist() == [5.0] and beta.tolist() == [5.0]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((1, 1, 0.0, *PRIOR), TypeError, r"id must be a string \(got int\)"),
        (("a", -1, 0.0, *PRIOR), ValueError, r"impressions must be >= 0 \(got -1\)"),
        (("a", 1, -0.5, *PRIOR), ValueError, r"rewards must be finite and >= 0 \(got -0.5\)"),
        (("a", 1, float("inf"), *PRIOR), ValueError, r"rewards must be finite and >= 0 \(got inf\)"),
        (("a", 1, 0.0, 0.0, 1.0), ValueError, r"prior_alpha must be finite and > 0"),
    ],
)
def test_add_rejects_bad_arguments(args, error, message) -> None:
    with pytest.raises(error, match=message):
        new_table().add(*args)


def test_add_impressions_rejects_bad_arguments() -> None:
    table = new_table()
    table.load(["a"], [1.0], [1.0])
    ids = ["a", "b"]
    rows = np.array([0, -1], dtype=np.int32)
    with pytest.raises(ValueError, match=r"picks\[1\] must be in \[0, 2\) \(got 2\)"):
        table.add_impressions(ids, rows, np.array([0, 2]), *PRIOR)
    with pytest.raises(ValueError, match=r"rows must be one-dimensional with one row per id"):
        table.add_impressions(ids, rows[:1], np.array([0]), *PRIOR)
    with pytest.raises(ValueError, match=r"rows\[0\] must be below 1 \(got 5\)"):
        table.add_impressions(ids, np.array([5, -1], dtype=np.int32), np.array([0]), *PRIOR)
    with pytest.raises(ValueError, match=r"rows\[1\] must be -1 or a row \(got -2\)"):
        table.add_impressions(ids, np.array([0, -2], dtype=np.int32), np.array([1]), *PRIOR)
    with pytest.raises(TypeError, match=r"ids\[1\] must be a string \(got int\)"):
        table.add_impressions(["a", 3], rows, np.array([1]), *PRIOR)  # type: ignore[list-item]
    assert table.get("a") == (1.0, 1.0, 0, 0.0, True)  # nothing counted by the failed calls


def test_records_is_a_live_read_only_view() -> None:
    table = new_table()
    table.load(["a", "b"], [2.0, 3.0], [4.0, 5.0])
    records = table.records()
    table.add("b", 7, 2.0, *PRIOR)
    assert records["impressions"].tolist() == [0, 7] and records["rewards"].tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="read-only"):
        records["alpha0"][0] = 1.0
    # Top arms by posterior mean, as the loop would query them.
    mean = (records["alpha0"] + records["rewards"]) / (records["alpha0"] + records["beta0"] + records["impressions"])
    assert table.id_at(int(np.argmax(mean))) == "a"


def test_id_at_checks_the_row() -> None:
    table = new_table()
    table.load(["a"], [1.0], [1.0])
    with pytest.raises(IndexError, match=r"row must be in \[0, 1\) \(got 1\)"):
        table.id_at(1)
    with pytest.raises(IndexError):
        table.id_at(-1)


# ---------------------------------------------------------------------------------------------------------
# Bulk load errors


def test_duplicates_name_both_positions() -> None:
    with pytest.raises(ValueError, match=r"duplicate id 'b' at positions 1 and 3"):
        new_table().load(["a", "b", "c", "b"], [1.0] * 4, [1.0] * 4)
    table = new_table()
    table.load(["x", "y"], [1.0] * 2, [1.0] * 2)
    with pytest.raises(ValueError, match=r"id 'y' at position 1 is already in the table \(row 1\)"):
        table.load(["z", "y"], [1.0] * 2, [1.0] * 2)


@pytest.mark.parametrize(
    ("alpha0", "beta0", "message"),
    [
        ([1.0, np.nan], [1.0, 1.0], r"alpha0 must be finite and > 0 at index 1 \(got nan\)"),
        ([1.0, 1.0], [np.inf, 1.0], r"beta0 must be finite and > 0 at index 0 \(got inf\)"),
        ([0.0, 1.0], [1.0, 1.0], r"alpha0 must be finite and > 0 at index 0 \(got 0.0\)"),
        ([1.0], [1.0, 1.0], r"ids, alpha0 and beta0 must have the same length \(got 2, 1 and 2\)"),
        ([[1.0, 1.0]], [1.0, 1.0], "alpha0 must be one-dimensional"),
        (["x", "y"], [1.0, 1.0], "alpha0 must be an array of numbers"),
    ],
)
def test_bad_parameters_name_the_index(alpha0, beta0, message) -> None:
    table = new_table()
    with pytest.raises(ValueError, match=message):
        table.load(["a", "b"], alpha0, beta0)
    assert len(table) == 0


def test_load_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match=r"ids\[1\] must be a string \(got int\)"):
        new_table().load(["a", 2], [1.0] * 2, [1.0] * 2)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"ids must be a sequence of str \(got str\)"):
        new_table().load("ab", [1.0] * 2, [1.0] * 2)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Full tables


def test_full_rows_refuse_inserts_and_lookups_go_on() -> None:
    table = new_table(capacity=3, id_bytes=0)
    table.load(["a", "b"], [1.0, 2.0], [3.0, 4.0])
    assert table.add("c", 1, 0.0, *PRIOR)
    assert not table.add("d", 1, 0.0, *PRIOR)
    assert table.add("a", 1, 1.0, *PRIOR)  # known ids still count
    ids = ["a", "e", "f", "c"]
    _, _, _, rows = table.gather(ids, *PRIOR)
    assert table.add_impressions(ids, rows, np.array([0, 1, 2, 3]), *PRIOR) == 2
    assert table.get("a") == (1.0, 3.0, 2, 1.0, True) and table.get("c") == (*PRIOR, 2, 0.0, False)
    with pytest.raises(ValueError, match=r"ids\[0\]: every row of the arm table is taken"):
        table.load(["g"], [1.0], [1.0])
    alpha, _, known, _ = table.gather(["a", "d", "b"], *PRIOR)
    assert alpha.tolist() == [2.0, PRIOR[0], 2.0] and known == 2
    assert len(table) == 3


def test_a_table_of_no_rows_serves_the_prior() -> None:
    table = new_table(capacity=0, id_bytes=0)
    assert not table.add("a", 1, 0.0, *PRIOR)
    alpha, beta, known, rows = table.gather(["a", ""], *PRIOR)
    assert alpha.tolist() == [PRIOR[0]] * 2 and known == 0 and rows.tolist() == [-1, -1]
    assert len(table) == 0 and table.records().shape == (0,)


def test_full_arena_refuses_long_ids_but_takes_short_ones() -> None:
    table = new_table(capacity=10, id_bytes=64)
    assert table.id_bytes == 64 and table.id_bytes_used == 0
    assert table.add("x" * 40, 1, 0.0, *PRIOR)
    assert not table.add("y" * 40, 1, 0.0, *PRIOR)  # 80 bytes > 64
    assert table.add("short", 1, 0.0, *PRIOR)  # up to 8 bytes live in the row
    assert table.add("z" * 24, 1, 0.0, *PRIOR)
    assert table.id_bytes_used == 64
    with pytest.raises(ValueError, match="no room left for id bytes"):
        table.load(["w" * 9], [1.0], [1.0])
    assert live_ids(table) == ["x" * 40, "short", "z" * 24]


def test_a_row_abandoned_by_a_killed_process_is_skipped() -> None:
    # A process killed between reserving a row and publishing it leaves the row counter one ahead and the
    # row zeroed; nothing is locked. Simulate it by advancing the counter (offset 128 in the header).
    buffer = mmap.mmap(-1, ArmTable.bytes_needed(10, 0))
    table = ArmTable.create(buffer, 10, 0)
    table.load(["a"], [1.0], [1.0])
    (taken,) = struct.unpack_from("<Q", buffer, 128)
    assert taken == len(table) == 1
    struct.pack_into("<Q", buffer, 128, taken + 1)
    assert table.add("b", 1, 0.5, *PRIOR)
    assert len(table) == 3 and table.records()["flags"].tolist() == [FLAG_CATALOGUE, 0, FLAG_RUNTIME]
    with pytest.raises(ValueError, match="row 1 holds no arm"):
        table.id_at(1)
    assert live_ids(table) == ["a", "b"]
    assert table.gather(["a", "b"], *PRIOR)[3].tolist() == [0, 2]
    del table
    buffer.close()


def test_sizes() -> None:
    assert ArmTable.bytes_needed(0, 0) > 0
    small = ArmTable.bytes_needed(1000, 0)
    # A 64-byte row and 3 slots of 8 bytes per arm, plus a header.
    assert 1000 * 88 <= small <= 1000 * 88 + 512
    assert ArmTable.bytes_needed(1000, 1000) - small == 1024  # id bytes round up to 64
    assert new_table(1000, 1000).memory_bytes == ArmTable.bytes_needed(1000, 1000)
    with pytest.raises(ValueError, match=r"capacity must be at most 1073741824 rows"):
        ArmTable.bytes_needed(2**30 + 1, 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        ArmTable.bytes_needed(-1, 0)


# ---------------------------------------------------------------------------------------------------------
# Buffers and attaching


def test_a_second_object_on_the_same_buffer_sees_the_same_table() -> None:
    buffer = mmap.mmap(-1, ArmTable.bytes_needed(100, 1000))
    first = ArmTable.create(buffer, 100, 1000)
    first.load(["a", "long-identifier-1"], [1.0, 2.0], [3.0, 4.0])
    second = ArmTable.attach(buffer)
    assert len(second) == 2 and second.capacity == 100 and second.memory_bytes == first.memory_bytes
    assert second.get("long-identifier-1") == (2.0, 4.0, 0, 0.0, True)
    second.add("new", 2, 1.0, *PRIOR)
    first.add("a", 1, 0.5, *PRIOR)
    assert first.get("new") == (*PRIOR, 2, 1.0, False)
    assert second.get("a") == (1.0, 3.0, 1, 0.5, True)
    np.testing.assert_array_equal(first.records(), second.records())


def test_each_table_draws_its_own_hash_key() -> None:
    one, two = new_table(), new_table()
    one.load(["c12345"], [1.0], [1.0])
    two.load(["c12345"], [1.0], [1.0])
    assert one.records()["hash"][0] != two.records()["hash"][0]


def test_attach_validates_the_buffer() -> None:
    size = ArmTable.bytes_needed(100, 1000)
    with pytest.raises(ValueError, match="does not hold an arm table"):
        ArmTable.attach(mmap.mmap(-1, size))  # zeroed: no magic
    buffer = mmap.mmap(-1, size)
    ArmTable.create(buffer, 100, 1000)
    with pytest.raises(ValueError, match="does not hold an arm table"):
        ArmTable.attach(memoryview(buffer)[: size - 64])  # shorter than the header says
    corrupt = mmap.mmap(-1, size)
    corrupt[:] = buffer[:]
    corrupt[8] = 99  # the layout version
    with pytest.raises(ValueError, match="does not hold an arm table"):
        ArmTable.attach(corrupt)
    with pytest.raises(ValueError, match="64-byte boundary"):
        ArmTable.attach(memoryview(buffer)[8:])
    with pytest.raises(BufferError, match="not writable"):
        ArmTable.attach(bytes(size))
    with pytest.raises(ValueError, match=r"buffer must hold at least \d+ bytes \(got 4096\)"):
        ArmTable.create(mmap.mmap(-1, 4096), 100, 1000)


def test_the_buffer_stays_exported_while_the_table_lives() -> None:
    buffer = mmap.mmap(-1, ArmTable.bytes_needed(10, 0))
    table = ArmTable.create(buffer, 10, 0)
    with pytest.raises(BufferError):
        buffer.close()
    del table
    gc.collect()
    buffer.close()


def test_only_create_and_attach_make_tables() -> None:
    with pytest.raises(TypeError, match=r"use ArmTable.create"):
        ArmTable()
    unbound = ArmTable.__new__(ArmTable)
    with pytest.raises(ValueError, match="not made by create"):
        unbound.gather(["a"], *PRIOR)
    with pytest.raises(ValueError, match="not made by create"):
        len(unbound)


# ---------------------------------------------------------------------------------------------------------
# CSV


def csv_report(tmp_path: Path, text: str, capacity: int = 100, id_bytes: int = 10_000) -> str:
    """What load_csv says about `text`: "ok <rows>" or the ValueError's message."""
    path = tmp_path / "t.csv"
    path.write_bytes(text.encode("utf-8"))
    try:
        return f"ok {new_table(capacity, id_bytes).load_csv(str(path))}"
    except ValueError as exc:
        return str(exc)


def local_report(tmp_path: Path, text: str) -> str:
    """What features/local.py says about the same file, worded the same."""
    path = tmp_path / "t.csv"
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return f"ok {len(load_table(f, str(path)))}"
    except FeatureSourceError as exc:
        return str(exc)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("id,alpha,beta\n", "line 1: the header lacks entity_id"),
        ("entity_id,alpha,beta\na,1\n", "line 2: expected 3 fields, got 2"),
        ("entity_id,alpha,beta\na,x,1\n", "line 2: alpha must be a finite number > 0 (got 'x')"),
        ("entity_id,alpha,beta\na,1,inf\n", "line 2: beta must be a finite number > 0 (got 'inf')"),
        ("entity_id,alpha,beta\n,1,1\n", "line 2: entity_id is empty"),
        ("entity_id,alpha,beta\na,1,1\nb,1,1\na,1,1\n", "line 4: duplicate entity_id 'a' (first on line 2)"),
    ],
)
def test_bad_tables_are_reported_with_line_numbers(tmp_path: Path, text: str, expected: str) -> None:
    report = csv_report(tmp_path, text)
    assert expected in report
    assert report == local_report(tmp_path, text)


SAME_AS_LOCAL = [
    "entity_id,alpha,beta,extra\nx,2,3,ignored\n\ny, 4.5 ,1e3,\n",
    'beta,"entity_id",alpha\r\n1,"a ""q"" b",2\r\n2,"multi\nline",3\r\n\r\n4,"multi\r\nline",3\n5,c,bad\n7,c,1\n',
    'entity_id,alpha,beta\r"x",1,1\r"y"z,2,2\r',
    'entity_id,alpha,beta\nx,1,1\n   \n""\ny,-1,nan\ny,1,1\nz,1,1e400\nw,-0,0\n',
    "entity_id,alpha,beta\nq,+1,.5",
    "entity_id,alpha,beta\nx,1,1\n\n\n\nx,2,2\n",
    'entity_id,alpha,beta\n"a\nb\nc",1,1\nd,1,1\n"a\nb\nc",1,1\n',
    "\n",
    "entity_id,alpha\n",
    "entity_id,alpha,beta",
    "entity_id,alpha,beta\n日本,1,2\n🎲🎲🎲,1,2\n日本,1,2\n",
    "entity_id,alpha,beta\n" + "".join(f"e{i},0,1\n" for i in range(30)),
    "entity_id,alpha,beta\n" + "".join(f"e{i % 7},{i},1\n" for i in range(1, 40)),
]


@pytest.mark.parametrize("text", SAME_AS_LOCAL, ids=range(len(SAME_AS_LOCAL)))
def test_reports_equal_those_of_local_py(tmp_path: Path, text: str) -> None:
    assert csv_report(tmp_path, text) == local_report(tmp_path, text)


def test_loaded_rows_equal_those_of_local_py(tmp_path: Path) -> None:
    # Ids keep the id rule, so no line breaks in them (a quoted one is a bad line: test_catalogue.py).
    text = SAME_AS_LOCAL[1].replace("5,c,bad\n7,c,1\n", "7,c,1\n").replace("multi\r\nline", "multi  line")
    text = text.replace("multi\nline", "multi line")
    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8", newline="")
    table = new_table()
    assert table.load_csv(path) == 4
    with path.open(encoding="utf-8", newline="") as f:
        index = load_table(f, "t.csv")
    queries = ['a "q" b', "multi line", "multi  line", "c", "nobody"]
    got, expected = table.gather(queries, *PRIOR), index.gather(queries, *PRIOR)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] == 4


def test_every_bad_row_is_counted_and_the_first_ones_listed(tmp_path: Path) -> None:
    text = "entity_id,alpha,beta\n" + "".join(f"e{i},0,1\n" for i in range(30))
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        new_table().load_csv(path, errors_max=5)
    message = str(info.value)
    assert "30 bad rows" in message and "line 6:" in message and "line 7:" not in message
    assert "and 25 more" in message


def test_csv_problems_local_py_cannot_see(tmp_path: Path) -> None:
    assert csv_report(tmp_path, 'entity_id,alpha,beta\n"open,1,1\n') == (
        f"{tmp_path / 't.csv'}: 1 bad rows:\n  line 2: a quoted field runs to the end of the file"
    )
    path = tmp_path / "t.csv"
    path.write_bytes(b"entity_id,alpha,beta\nok,1,1\nbad\xff,1,1\n")
    with pytest.raises(ValueError, match="line 3: entity_id is not valid UTF-8"):
        new_table().load_csv(path)
    long_id = "x" * 500
    report = csv_report(tmp_path, f"entity_id,alpha,beta\n{long_id},1,1\n{long_id},1,1\n", capacity=10)
    assert "line 3: duplicate entity_id 'xxx" in report and "... (500 bytes) (first on line 2)" in report


def test_csv_rows_already_in_the_table_are_duplicates(tmp_path: Path) -> None:
    table = new_table()
    table.load(["a"], [1.0], [1.0])
    path = tmp_path / "t.csv"
    path.write_text("entity_id,alpha,beta\nb,1,1\na,1,1\n")
    with pytest.raises(ValueError, match=r"line 3: duplicate entity_id 'a' \(already in the table\)"):
        table.load_csv(path)


def test_csv_records_longer_than_a_block_load(tmp_path: Path) -> None:
    from mab_service.learning._arms import CSV_BLOCK_BYTES

    path = tmp_path / "t.csv"
    huge = "h" * (CSV_BLOCK_BYTES + 10)
    path.write_text(f'entity_id,alpha,beta\n"{huge}",1,2\nc,3,4\n')
    # The record is parsed whole; its id then breaks the id rule (at most 1024 bytes), reported with its line.
    with pytest.raises(ValueError, match=rf"line 2: entity_id must be .* \(got {CSV_BLOCK_BYTES + 10} bytes\)"):
        new_table(10, CSV_BLOCK_BYTES + 100).load_csv(path)
    assert ArmTable.csv_rows_upper_bound(path) == (2, CSV_BLOCK_BYTES + 10)
    path.write_text(f'entity_id,alpha,beta,note\nb,1,2,"{huge}"\nc,3,4,\n')
    table = new_table(10, 100)
    assert table.load_csv(path) == 2
    assert table.get("b") == (1.0, 2.0, 0, 0.0, True) and table.get("c") == (3.0, 4.0, 0, 0.0, True)


def test_csv_across_many_blocks_equals_local_py(tmp_path: Path, rand) -> None:
    # About three blocks of rows with every kind of line ending and some quoting, so that records, quoted
    # fields and \r\n pairs are cut at block boundaries.
    n = 400_000
    alpha = 1 + rand.gen.integers(0, 2000, n)
    endings = rand.gen.choice(["\n", "\r\n", "\r"], n)
    quoted = rand.gen.random(n) < 0.1
    lines = ["entity_id,alpha,beta\n"]
    for i in range(n):
        entity = f'"id ""{i}"""' if quoted[i] else f"id-number-{i}"
        lines.append(f"{entity},{alpha[i]},{alpha[i] * 20}.5{endings[i]}")
    lines.insert(300_000, "id-number-17,1,1\n")
    text = "".join(lines)
    assert csv_report(tmp_path, text, capacity=n, id_bytes=20 * n) == local_report(tmp_path, text)
    rows, id_bytes = ArmTable.csv_rows_upper_bound(tmp_path / "t.csv")
    assert rows == n + 1 and id_bytes >= sum(len(line.split(",")[0]) for line in lines[1:] if '"' not in line)


def test_csv_upper_bound_sizes_a_table_that_fits(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('entity_id,alpha,beta\nshort,1,1\n"  long id with spaces  ",1,1\n\n,1,1\nx,1\n')
    rows, id_bytes = ArmTable.csv_rows_upper_bound(path)
    assert (rows, id_bytes) == (3, len('"  long id with spaces  "') - 2)
    table = new_table(rows, id_bytes)
    with pytest.raises(ValueError, match="2 bad rows"):
        table.load_csv(path)
    path.write_text('entity_id,alpha,beta\nshort,1,1\n"  long id with spaces  ",1,1\n')
    rows, id_bytes = ArmTable.csv_rows_upper_bound(path)
    table = new_table(rows, id_bytes)
    assert table.load_csv(path) == 2 and live_ids(table) == ["short", "long id with spaces"]


def test_csv_header_errors_from_the_upper_bound_too(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("entity_id,beta\n")
    with pytest.raises(ValueError, match=r"line 1: the header lacks alpha \(got entity_id,beta\)"):
        ArmTable.csv_rows_upper_bound(path)
    with pytest.raises(OSError):
        ArmTable.csv_rows_upper_bound(tmp_path / "missing.csv")


def test_csv_into_a_full_table(tmp_path: Path) -> None:
    report = csv_report(tmp_path, "entity_id,alpha,beta\na,1,1\nb,1,1\nc,1,1\n", capacity=2)
    assert report == f"{tmp_path / 't.csv'}: line 4: every row of the arm table is taken"


# ---------------------------------------------------------------------------------------------------------
# Several processes on one file


def _worker(path: str, seed: int, ids: list[str], rounds: int, barrier) -> None:
    """Attach to the table in `path`; every round, add an impression and 0.25 reward to every id and an
    impression to each through add_impressions. The first round goes in the order every worker shares, so that
    workers race to insert the same new id at the same time; later rounds in an order of their own."""
    with open(path, "r+b") as f:
        buffer = mmap.mmap(f.fileno(), 0)
    table = ArmTable.attach(buffer)
    order = list(ids)
    rng = random.Random(seed)
    barrier.wait()
    for round_ in range(rounds):
        if round_:
            rng.shuffle(order)
        for id_ in order:
            assert table.add(id_, 1, 0.25, *PRIOR)
        for start in range(0, len(order), 50):
            batch = order[start : start + 50]
            _, _, _, rows = table.gather(batch, *PRIOR)
            assert table.add_impressions(batch, rows, np.arange(len(batch)), *PRIOR) == 0
    del table
    buffer.close()


@pytest.mark.skipif(sys.platform != "linux", reason="a file in /dev/shm, as the service maps it")
def test_processes_insert_and_count_exactly(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    directory = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    path = directory / f"mab-arms-test-{os.getpid()}"
    catalogue = [f"c{i}" for i in range(200)]
    fresh = [f"n{i}" for i in range(600)] + [f"long-new-identifier-{i}" for i in range(200)]
    size = ArmTable.bytes_needed(2000, 100_000)
    with open(path, "w+b") as f:
        f.truncate(size)
        buffer = mmap.mmap(f.fileno(), size)
    try:
        table = ArmTable.create(buffer, 2000, 100_000)
        table.load(catalogue, [2.0] * 200, [3.0] * 200)
        # Overlapping id sets: every id is inserted by at least two processes racing for it.
        shares = [catalogue + fresh[:600], catalogue + fresh[200:], catalogue + fresh[:200] + fresh[400:]]
        shares = [sorted(share) for share in shares]
        rounds = 3
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(len(shares))
        procs = [
            context.Process(target=_worker, args=(str(path), seed, share, rounds, barrier))
            for seed, share in enumerate(shares)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * len(procs)

        writers = Counter(id_ for share in shares for id_ in share)
        ids = live_ids(table)
        assert len(ids) == len(set(ids)) == len(writers)  # one row per id
        assert len(table) == len(ids) + table.rows_wasted
        records = table.records()
        wasted = np.count_nonzero(records["flags"] == FLAG_WASTED)
        assert wasted == table.rows_wasted
        for id_, n in writers.items():
            got = table.get(id_)
            assert got is not None
            alpha0, beta0, impressions, rewards, from_catalogue = got
            assert impressions == 2 * rounds * n, id_
            assert rewards == 0.25 * rounds * n, id_
            assert from_catalogue == id_.startswith("c")
            assert (alpha0, beta0) == ((2.0, 3.0) if from_catalogue else PRIOR)
        del records, table
    finally:
        gc.collect()
        buffer.close()
        path.unlink()


# ---------------------------------------------------------------------------------------------------------
# Memory


def test_no_memory_growth_over_many_calls(big, tmp_path: Path) -> None:
    table, _, _ = big
    rng = np.random.default_rng(3)
    requests = [[f"c{j}" for j in rng.integers(0, 110_000, 400)] for _ in range(8)]
    small = new_table(100, 1000)
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("entity_id,alpha,beta\na,1,1\na,1,1\n")

    def one_round(i: int) -> None:
        ids = list(requests[i % 8])
        _, _, _, rows = table.gather(ids, *PRIOR)
        small.gather(["日本", "é", "🎲"] * 10, *PRIOR)
        small.add_impressions(["x", "y"], np.array([-1, -1], dtype=np.int32), np.array([0, 1]), *PRIOR)
        small.add("x", 1, 0.5, *PRIOR)
        small.get("x"), small.get("zzz"), small.records()
        with pytest.raises(TypeError):
            table.gather(["a", 1], *PRIOR)  # type: ignore[list-item]
        with pytest.raises(ValueError):
            small.load_csv(csv_path)
        ArmTable.attach(small_buffer)

    small_buffer = mmap.mmap(-1, ArmTable.bytes_needed(10, 0))
    ArmTable.create(small_buffer, 10, 0)
    for i in range(50):
        one_round(i)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2_000):
            one_round(i)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes still allocated after 2,000 rounds"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""), reason="AddressSanitizer holds freed memory")
def test_csv_loaders_are_freed(tmp_path: Path) -> None:
    # tracemalloc does not see C++ allocations: watch the resident set instead. The parser's state for a file
    # with bad rows (a map of their ids) would add up over 200 loads if leaked.
    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    path = tmp_path / "t.csv"
    path.write_text("entity_id,alpha,beta\n" + "".join(f"bad-row-{i},0,1\n" for i in range(20_000)))
    table = new_table(10, 0)
    with pytest.raises(ValueError):
        table.load_csv(path)
    gc.collect()
    before = rss_bytes()
    for _ in range(200):
        with pytest.raises(ValueError):
            table.load_csv(path)
    gc.collect()
    assert rss_bytes() - before < 50 * 2**20


def test_csv_report_text_is_what_local_py_would_print(tmp_path: Path) -> None:
    # The header check reads the first record as csv.reader does, quotes and all.
    text = '"entity_id","alpha"\n'
    assert csv_report(tmp_path, text) == local_report(tmp_path, text)


def test_unnamed_lists_the_ids_without_a_row_in_order() -> None:
    ids = ["a", "bé", "c", "d"]
    assert unnamed(np.array([3, -1, 0, -1], np.int32), ids) == "bé\0d".encode()
    assert unnamed(np.array([3, 1, 0, 2], np.int32), ids) == b""
    with pytest.raises(ValueError, match="one row per id"):
        unnamed(np.array([1, 2], np.int32), ids)


def test_first_seen_marks_each_row_once_in_order() -> None:
    seen = np.zeros(10, dtype=bool)
    seen[4] = True
    arrays = [np.array([5, -1, 4, 2], np.int32), np.array([2, 7, 5], np.int32)]
    assert first_seen(arrays, seen) == [5, 2, 7]
    assert np.flatnonzero(seen).tolist() == [2, 4, 5, 7]
    assert first_seen(arrays, seen) == []
    with pytest.raises(ValueError, match="past the end"):
        first_seen([np.array([10], np.int32)], seen)
    with pytest.raises(ValueError, match="int32"):
        first_seen([np.array([1], np.int64)], seen)


def test_narrowed_gives_float32s_only_when_every_value_is_one() -> None:
    pair = narrowed(np.array([1.0, 2.5, 16777216.0]), np.array([3.0, 0.125, 7.0]))
    assert pair is not None and pair.dtype == np.float32
    assert pair.astype(np.float64).tolist() == [[1.0, 2.5, 16777216.0], [3.0, 0.125, 7.0]]
    assert narrowed(np.array([1.0, 16777217.0]), np.array([1.0, 1.0])) is None  # 2**24 + 1 is not a float32
    assert narrowed(np.array([1.0, 2.0]), np.array([1.0, 0.1])) is None
    assert narrowed(np.array([1.0, 2.0]), np.array([1.0, 1e300])) is None  # past float32's range
    assert narrowed(np.array([1.0]), np.array([np.nan])) is None
    with pytest.raises(ValueError, match="float64"):
        narrowed(np.array([1.0], np.float32), np.array([1.0]))
