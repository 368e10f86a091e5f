"""The id index and request dedupe: equal to a dict reference, strict about bad input, no leaks."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mab_service.features._index import IdIndex, _hash, unique
from mab_service.ids import MAX_ID_BYTES, id_problem

PRIOR = (1.0, 20.0)

# Ids that exercise every branch of the hash and the byte compare: empty, 1-3 bytes, 4-7, 8-16, longer
# (with a partial last 16-byte block and without), multi-byte UTF-8, NUL bytes, and pairs that differ
# only in the last byte.
AWKWARD_IDS = [
    "",
    "a",
    "ab",
    "abc",
    "abcd",
    "abcde",
    "abcdefg",
    "abcdefgh",
    "abcdefghijklmnop",
    "abcdefghijklmnopq",
    "x" * 32,
    "x" * 33,
    "x" * 10_000,
    "é",
    "日本",
    "日本語のID",
    "🎲",
    "🎲🎲🎲🎲🎲",
    "e\u0301",  # e + combining acute: not equal to "é", and must not match it
    "\x00",
    "\x00\x00",
    "a\x00",
    "a\x00b",
    "\x00" * 20,
    "c1",
    "c10",
    "c100",
    "C1",
    " c1",
    "c1 ",
]
AWKWARD_IDS += [f"{'k' * n}{last}" for n in (0, 2, 3, 6, 7, 14, 15, 16, 31, 40) for last in "01"]
#: The awkward ids a request may carry (the table holds any; requests keep the id rule).
REQUEST_IDS = [i for i in AWKWARD_IDS if id_problem(i) is None]
#: Text that keeps the id rule's character half (no control characters, no lone surrogates).
id_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20)


def reference(ids: list[str], alpha: np.ndarray, beta: np.ndarray) -> dict[str, tuple[float, float]]:
    return {i: (float(a), float(b)) for i, a, b in zip(ids, alpha, beta, strict=True)}


def gather_reference(table: dict[str, tuple[float, float]], ids: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    pairs = [table.get(i, PRIOR) for i in ids]
    alpha = np.array([p[0] for p in pairs], dtype=np.float64)
    beta = np.array([p[1] for p in pairs], dtype=np.float64)
    return alpha, beta, sum(i in table for i in ids)


def random_params(rand, n: int) -> tuple[np.ndarray, np.ndarray]:
    alpha = 1.0 + rand.gen.integers(0, 2000, n).astype(np.float64)
    return alpha, 20.0 * alpha + rand.gen.uniform(1.0, 5000.0, n)


@pytest.fixture(scope="module")
def big() -> tuple[IdIndex, dict[str, tuple[float, float]]]:
    """100,000 ids c0 .. c99999, as in production."""
    rng = np.random.default_rng(7)
    ids = [f"c{i}" for i in range(100_000)]
    alpha = 1.0 + rng.integers(0, 2000, len(ids)).astype(np.float64)
    beta = 20.0 * alpha + rng.uniform(1.0, 5000.0, len(ids))
    return IdIndex(ids, alpha, beta), reference(ids, alpha, beta)


# ---------------------------------------------------------------------------------------------------------
# Lookups


def test_awkward_ids_look_up_exactly(rand) -> None:
    alpha, beta = random_params(rand, len(AWKWARD_IDS))
    index = IdIndex(AWKWARD_IDS, alpha, beta)
    table = reference(AWKWARD_IDS, alpha, beta)
    assert len(index) == len(AWKWARD_IDS)
    for i in AWKWARD_IDS:
        assert i in index
        assert index.get(i) == table[i]
    # Near misses of every id: one byte more, one byte less, last byte changed.
    near = {i + "0" for i in AWKWARD_IDS} | {i[:-1] for i in AWKWARD_IDS} | {i[:-1] + "\x01" for i in AWKWARD_IDS}
    for i in sorted(near - set(AWKWARD_IDS)):
        assert i not in index
        assert index.get(i) is None
    queries = AWKWARD_IDS + sorted(near)
    got = index.gather(queries, *PRIOR)
    expected = gather_reference(table, queries)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_big_table_equals_dict_reference(big, rand) -> None:
    index, table = big
    assert len(index) == 100_000
    for n in (0, 1, 31, 32, 33, 400, 2000, 5000):
        ids = [f"c{j}" for j in rand.gen.integers(0, 110_000, n)]
        alpha, beta, known = index.gather(ids, *PRIOR)
        expected = gather_reference(table, ids)
        assert alpha.dtype == beta.dtype == np.float64
        assert alpha.shape == beta.shape == (n,)
        np.testing.assert_array_equal(alpha, expected[0])
        np.testing.assert_array_equal(beta, expected[1])
        assert known == expected[2]


def test_every_id_of_the_big_table_is_found(big) -> None:
    index, table = big
    ids = list(table)
    alpha, beta, known = index.gather(ids, *PRIOR)
    assert known == len(ids)
    np.testing.assert_array_equal(alpha, [table[i][0] for i in ids])
    np.testing.assert_array_equal(beta, [table[i][1] for i in ids])


def test_unknown_ids_get_the_prior_and_are_not_counted() -> None:
    index = IdIndex(["a", "b"], [2.0, 3.0], [4.0, 5.0])
    alpha, beta, known = index.gather(["z", "a", "", "b", "a", "zz"], 0.5, 7.0)
    np.testing.assert_array_equal(alpha, [0.5, 2.0, 0.5, 3.0, 2.0, 0.5])
    np.testing.assert_array_equal(beta, [7.0, 4.0, 7.0, 5.0, 4.0, 7.0])
    assert known == 3  # duplicates are looked up, and counted, each time


def test_empty_index_and_empty_request() -> None:
    index = IdIndex([], [], [])
    assert len(index) == 0
    assert "" not in index
    assert index.get("a") is None
    alpha, beta, known = index.gather(["a", ""], *PRIOR)
    np.testing.assert_array_equal(alpha, [PRIOR[0]] * 2)
    assert known == 0
    alpha, beta, known = IdIndex(["a"], [1.0], [1.0]).gather([], *PRIOR)
    assert alpha.shape == beta.shape == (0,) and known == 0


def test_contains_and_get_on_odd_keys() -> None:
    index = IdIndex(["1", "b"], [1.0, 2.0], [3.0, 4.0])
    assert 1 not in index
    assert None not in index
    assert b"b" not in index
    assert "\ud800" not in index  # a lone surrogate has no UTF-8 form, so no index holds it
    assert index.get("\ud800") is None
    with pytest.raises(TypeError, match=r"id must be a string \(got bytes\)"):
        index.get(b"b")  # type: ignore[arg-type]


def test_str_subclasses_and_numpy_strings_are_ids() -> None:
    class Id(str):
        pass

    index = IdIndex(np.array(["a", "日本"]), [1.0, 2.0], [3.0, 4.0])  # type: ignore[arg-type]
    assert Id("a") in index
    assert index.get(Id("日本")) == (2.0, 4.0)
    alpha, _, known = index.gather([Id("a"), "x"], *PRIOR)
    assert alpha.tolist() == [1.0, PRIOR[0]] and known == 1


def test_accepts_any_sequence_of_ids_and_array_like_parameters() -> None:
    by_tuple = IdIndex(("a", "b"), (1, 2), np.array([3, 4], dtype=np.int32))
    by_generator = IdIndex((i for i in ["a", "b"]), [1.0, 2.0], [3.0, 4.0])  # type: ignore[arg-type]
    assert by_tuple.get("b") == by_generator.get("b") == (2.0, 4.0)


def test_index_copies_its_inputs(rand) -> None:
    ids = ["a", "b"]
    alpha = np.array([1.0, 2.0])
    index = IdIndex(ids, alpha, [3.0, 4.0])
    ids[0] = "changed"
    alpha[0] = 99.0
    assert index.get("a") == (1.0, 3.0)
    assert "changed" not in index


def test_reinitialising_replaces_the_table() -> None:
    index = IdIndex(["a"], [1.0], [2.0])
    index.__init__(["b", "c"], [3.0, 4.0], [5.0, 6.0])  # type: ignore[misc]
    assert len(index) == 2 and "a" not in index and index.get("c") == (4.0, 6.0)


def test_uninitialised_index_is_empty_not_a_crash() -> None:
    index = IdIndex.__new__(IdIndex)
    assert len(index) == 0
    assert index.gather(["a"], *PRIOR)[2] == 0


@settings(max_examples=200, deadline=None)
@given(
    table=st.lists(st.text(max_size=24), unique=True, max_size=60),
    queries=st.lists(st.text(max_size=24), max_size=80),
)
def test_property_lookup_equals_dict(table: list[str], queries: list[str]) -> None:
    alpha = np.arange(1, len(table) + 1, dtype=np.float64)
    beta = alpha + 0.5
    index = IdIndex(table, alpha, beta)
    reference_table = reference(table, alpha, beta)
    queries = queries + table[::2]
    got = index.gather(queries, *PRIOR)
    expected = gather_reference(reference_table, queries)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert [q in index for q in queries] == [q in reference_table for q in queries]


# ---------------------------------------------------------------------------------------------------------
# Build errors


def test_duplicate_ids_are_rejected_naming_the_id_and_both_positions() -> None:
    with pytest.raises(ValueError, match=r"duplicate id 'b' at positions 1 and 3"):
        IdIndex(["a", "b", "c", "b"], [1.0] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match=r"duplicate id '' at positions 0 and 1"):
        IdIndex(["", ""], [1.0] * 2, [1.0] * 2)
    with pytest.raises(ValueError, match=r"duplicate id 'a\\x00' at positions 0 and 2"):
        IdIndex(["a\x00", "a", "a\x00"], [1.0] * 3, [1.0] * 3)


def test_duplicate_found_in_a_large_table() -> None:
    ids = [f"c{i}" for i in range(50_000)] + ["c31337"]
    with pytest.raises(ValueError, match=r"duplicate id 'c31337' at positions 31337 and 50000"):
        IdIndex(ids, np.ones(len(ids)), np.ones(len(ids)))


BAD_PARAMETERS = [
    ([1.0, np.nan], [1.0, 1.0], "alpha must be finite and > 0 at row 1 \\(got nan\\)"),
    ([1.0, 1.0], [np.inf, 1.0], "beta must be finite and > 0 at row 0 \\(got inf\\)"),
    ([0.0, 1.0], [1.0, 1.0], "alpha must be finite and > 0 at row 0 \\(got 0.0\\)"),
    ([1.0, 1.0], [1.0, -2.0], "beta must be finite and > 0 at row 1 \\(got -2.0\\)"),
    ([1.0, -np.inf], [1.0, 1.0], "alpha must be finite and > 0 at row 1"),
    ([1.0], [1.0, 1.0], "ids, alpha and beta must have the same length \\(got 2, 1 and 2\\)"),
    ([1.0, 1.0], [1.0, 1.0, 1.0], "ids, alpha and beta must have the same length \\(got 2, 2 and 3\\)"),
    ([[1.0, 1.0]], [1.0, 1.0], "alpha must be one-dimensional"),
    (["x", "y"], [1.0, 1.0], "alpha must be an array of numbers"),
]


@pytest.mark.parametrize(("alpha", "beta", "message"), BAD_PARAMETERS)
def test_bad_parameters_are_rejected_naming_the_row(alpha, beta, message) -> None:
    with pytest.raises(ValueError, match=message):
        IdIndex(["a", "b"], alpha, beta)


def test_ids_must_be_strings() -> None:
    with pytest.raises(TypeError, match=r"ids\[2\] must be a string \(got int\)"):
        IdIndex(["a", "b", 3], [1.0] * 3, [1.0] * 3)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"ids\[0\] must be a string \(got bytes\)"):
        IdIndex([b"a"], [1.0], [1.0])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"ids must be a sequence of str \(got str\)"):
        IdIndex("ab", [1.0] * 2, [1.0] * 2)
    with pytest.raises(TypeError):
        IdIndex(3, [1.0], [1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ids\[1\] is not valid Unicode"):
        IdIndex(["a", "\udcff"], [1.0] * 2, [1.0] * 2)


def test_failed_init_leaves_the_previous_table() -> None:
    index = IdIndex(["a"], [1.0], [2.0])
    with pytest.raises(ValueError):
        index.__init__(["b", "b"], [1.0] * 2, [1.0] * 2)  # type: ignore[misc]
    assert index.get("a") == (1.0, 2.0)


# ---------------------------------------------------------------------------------------------------------
# gather errors


@pytest.mark.parametrize("ids", [("a",), iter(["a"]), "a", None, np.array(["a"])], ids=repr)
def test_gather_needs_a_list(ids) -> None:
    with pytest.raises(TypeError, match=r"ids must be a list \(got "):
        IdIndex(["a"], [1.0], [1.0]).gather(ids, *PRIOR)


def test_gather_rejects_non_strings_naming_the_position() -> None:
    index = IdIndex(["a"], [1.0], [1.0])
    with pytest.raises(TypeError, match=r"candidates\[3\] must be a string \(got int\)"):
        index.gather(["a", "b", "c", 4], *PRIOR)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"candidates\[600\] must be a string \(got NoneType\)"):
        index.gather(["a"] * 600 + [None], *PRIOR)  # type: ignore[list-item]  # past the stack scratch
    with pytest.raises(ValueError, match=r"candidates\[1\] is not valid Unicode"):
        index.gather(["a", "\ud800"], *PRIOR)


@pytest.mark.parametrize(
    ("prior_alpha", "prior_beta", "message"),
    [
        (0.0, 1.0, "prior_alpha must be finite and > 0 \\(got 0.0\\)"),
        (1.0, -1.0, "prior_beta must be finite and > 0 \\(got -1.0\\)"),
        (float("nan"), 1.0, "prior_alpha must be finite and > 0 \\(got nan\\)"),
        (1.0, float("inf"), "prior_beta must be finite and > 0 \\(got inf\\)"),
    ],
)
def test_gather_rejects_bad_priors(prior_alpha, prior_beta, message) -> None:
    with pytest.raises(ValueError, match=message):
        IdIndex(["a"], [1.0], [1.0]).gather(["a"], prior_alpha, prior_beta)


def test_gather_accepts_integer_priors_and_rejects_non_numbers() -> None:
    index = IdIndex(["a"], [1.0], [1.0])
    assert index.gather(["b"], 2, 3)[0].tolist() == [2.0]
    with pytest.raises(TypeError):
        index.gather(["b"], "2", 3.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# unique


def test_unique_keeps_first_occurrences_in_order() -> None:
    ids = ["b", "a", "b", "c", "a", " ", " ", "日本", "b"]
    out = unique(ids)
    assert out == ["b", "a", "c", " ", "日本"]
    assert out is not ids
    assert ids == ["b", "a", "b", "c", "a", " ", " ", "日本", "b"]  # the input is left alone


def test_unique_returns_the_same_list_when_there_are_no_duplicates() -> None:
    ids = ["a", "b", "c", "日本", " "]
    assert unique(ids) is ids
    empty: list[str] = []
    assert unique(empty) is empty


def test_unique_returns_the_first_objects_themselves() -> None:
    first, second = "".join(["x", "y"]), "".join(["x", "y"])
    assert first is not second
    out = unique([first, "z", second])
    assert out[0] is first


def test_unique_tells_apart_ids_that_differ_only_in_the_last_byte() -> None:
    ids = list(REQUEST_IDS)
    assert unique(ids) is ids
    doubled = ids + ids[::-1]
    assert unique(doubled) == ids


@pytest.mark.parametrize("n", [511, 512, 513, 2047, 2048, 2049, 5000, 100_000])
def test_unique_on_large_inputs(n: int, rand) -> None:
    # Sizes straddle the Cython scratch (512) and the C++ stack set (2048) thresholds.
    ids = [f"c{j}" for j in rand.gen.integers(0, n, n)]
    assert unique(ids) == list(dict.fromkeys(ids))
    distinct = [f"c{j}" for j in range(n)]
    assert unique(distinct) is distinct
    assert unique(distinct * 2) == distinct


def test_unique_of_all_duplicates() -> None:
    assert unique(["x"] * 3000) == ["x"]


@pytest.mark.parametrize("ids", [("a",), None, "ab", iter(["a"])], ids=repr)
def test_unique_needs_a_list(ids) -> None:
    with pytest.raises(TypeError, match=r"ids must be a list \(got "):
        unique(ids)


def test_unique_rejects_non_strings_naming_the_first_one() -> None:
    with pytest.raises(TypeError, match=r"^candidates\[3\] must be a string \(got int\)$"):
        unique(["a", "b", "c", 4, None])
    with pytest.raises(TypeError, match=r"^candidates\[0\] must be a string \(got bytes\)$"):
        unique([b"a"])
    with pytest.raises(TypeError, match=r"^candidates\[700\] must be a string \(got float\)$"):
        unique(["a"] * 700 + [1.5])
    with pytest.raises(ValueError, match=r"candidates\[2\] is not valid Unicode"):
        unique(["a", "b", "\ud83c"])


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (
            ["a", "b", "c", ""],
            r"^candidates\[3\] must be 1 to 1024 bytes of UTF-8 without control characters "
            r"\(got an empty string\)$",
        ),
        (["a", "x" * (MAX_ID_BYTES + 1)], r"^candidates\[1\] .* \(got 1025 bytes\)$"),
        # 342 three-byte characters: 1,026 bytes in 342 characters; the rule counts bytes.
        (["日" * 342], r"^candidates\[0\] .* \(got 1026 bytes\)$"),
        (["a", "b\x00c"], r"^candidates\[1\] .* \(got a control character U\+0000 at character 1\)$"),
        (["a\n"], r"^candidates\[0\] .* \(got a control character U\+000A at character 1\)$"),
        (["ok"] * 600 + ["\x7f"], r"^candidates\[600\] .* \(got a control character U\+007F at character 0\)$"),
        (["ok", "\x1f" * 2000], r"^candidates\[1\] .* \(got 2000 bytes\)$"),
    ],
)
def test_unique_applies_the_id_rule(ids: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unique(ids)


def test_unique_finds_a_control_byte_at_every_position() -> None:
    # Ids of 1 to 20 bytes cover the byte loop (< 8 bytes) and the word loop with and without an overlapping tail.
    for size in range(1, 21):
        for at in range(size):
            for byte in range(0x80):
                text = "a" * at + chr(byte) + "a" * (size - at - 1)
                if byte < 0x20 or byte == 0x7F:
                    with pytest.raises(ValueError, match=r"control character"):
                        unique(["ok", text])
                else:
                    assert unique(["ok", text]) == ["ok", text] or text == "ok"


def test_unique_takes_ids_at_the_rule_limits() -> None:
    ids = ["x" * MAX_ID_BYTES, "日" * (MAX_ID_BYTES // 3), "a", "\x80\x9f\u00a0\u2028", "🎲" * 256, " "]
    assert unique(ids) is ids


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=60))
def test_property_unique_checks_the_rule_as_id_problem_does(ids: list[str]) -> None:
    bad = [i for i, x in enumerate(ids) if id_problem(x) is not None]
    if not bad:
        assert unique(ids) == list(dict.fromkeys(ids))
        return
    with pytest.raises(ValueError, match=rf"^candidates\[{bad[0]}\] "):
        unique(ids)


@settings(max_examples=300, deadline=None)
@given(st.lists(id_text, max_size=100))
def test_property_unique_equals_dict_fromkeys(ids: list[str]) -> None:
    out = unique(ids)
    assert out == list(dict.fromkeys(ids))
    assert (out is ids) == (len(set(ids)) == len(ids))


# ---------------------------------------------------------------------------------------------------------
# Memory, hashing, threads


def test_memory_bytes_is_sane(big) -> None:
    index, _ = big
    n = len(index)
    # At least the 8-byte slots (load factor <= 0.5) and one record of >= 32 bytes per id; at most twice that.
    floor = 2 * n * 8 + n * 32
    assert floor <= index.memory_bytes <= 2 * floor
    small = IdIndex(["a"], [1.0], [1.0])
    assert 0 < small.memory_bytes < 4096
    assert IdIndex(["x" * 100_000], [1.0], [1.0]).memory_bytes > 100_000


def test_hash_is_seeded_per_process() -> None:
    code = "from mab_service.features._index import _hash; print(_hash('c12345'))"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(3)
    }
    assert len(runs) == 3
    assert _hash("c12345") == _hash("".join(["c1", "2345"]))


def test_hash_has_no_collisions_on_production_like_ids() -> None:
    ids = [f"c{i}" for i in range(200_000)] + AWKWARD_IDS
    assert len({_hash(i) for i in ids}) == len(set(ids))


def test_threads_read_one_index_concurrently(big) -> None:
    index, table = big
    requests = [[f"c{(t * 7919 + j * 104_729) % 110_000}" for j in range(400)] for t in range(8)]
    expected = [gather_reference(table, r) for r in requests]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for _ in range(200):
                alpha, beta, known = index.gather(unique(requests[t]), *PRIOR)
                assert np.array_equal(alpha, expected[t][0]) and known == expected[t][2]
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_no_memory_growth_over_many_calls(big) -> None:
    index, _ = big
    rng = np.random.default_rng(3)
    requests = [[f"c{j}" for j in rng.integers(0, 110_000, 400)] for _ in range(8)]
    unicode_ids = ["日本", "é", "🎲"] * 10

    def one_round(i: int) -> None:
        ids = list(requests[i % 8])  # a fresh list, as orjson gives
        index.gather(unique(ids), *PRIOR)
        index.gather(unique(ids * 2), *PRIOR)  # a copy is made and dropped
        index.gather(unique(unicode_ids), *PRIOR)
        index.get("c1"), index.get("zzz"), "c2" in index
        with pytest.raises(TypeError):
            unique(["a", 1])
        with pytest.raises(ValueError):
            IdIndex(["a", "a"], [1.0] * 2, [1.0] * 2)
        IdIndex(["a", "b"], [1.0] * 2, [1.0] * 2)

    for i in range(100):
        one_round(i)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5_000):
            one_round(i)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes still allocated after 5,000 rounds"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""), reason="AddressSanitizer holds freed memory")
def test_tables_are_freed() -> None:
    # tracemalloc does not see C++ allocations: watch the resident set instead. 300 tables of ~2.6 MB
    # would add ~800 MB if leaked.
    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    ids = [f"c{i}" for i in range(50_000)]
    ones = np.ones(len(ids))
    IdIndex(ids, ones, ones)
    gc.collect()
    before = rss_bytes()
    for _ in range(300):
        IdIndex(ids, ones, ones)
    gc.collect()
    assert rss_bytes() - before < 100 * 2**20
