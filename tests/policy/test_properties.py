"""Property tests of the Beta kernel through its public API: any valid input gives samples in [0, 1] that a
seed reproduces bit for bit; any invalid input gives a ValueError that names the problem."""

from __future__ import annotations

import datetime
import decimal
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given, settings, strategies as st

from mab_service import sample_beta, sample_top_k
from mab_service.policy import _kernel, reference

Floats = npt.NDArray[np.float64]

MAX = float(np.finfo(np.float64).max)
TINY = 5e-324  # the smallest subnormal
# Edges and scales where the arithmetic changes: subnormals, the smallest normal, the shape-1 boost
# threshold, the squeeze's regime, and shapes whose sum overflows.
NOTABLE = [TINY, 1e-320, 2.2250738585072014e-308, 1e-300, 1e-10, 1e-3, 0.5, 1.0 - 2**-53, 1.0, 1.0 + 2**-52]
NOTABLE += [2.0, 7.0, 1e4, 1e7, 1e15, 1e100, 1e300, 1e308, MAX]
MAX_SEED = 2**64 - 1

positive = st.one_of(
    st.sampled_from(NOTABLE),
    st.floats(min_value=TINY, max_value=MAX, allow_subnormal=True),
    st.floats(min_value=1e-3, max_value=1e7),
)
seeds = st.integers(min_value=0, max_value=MAX_SEED)


@st.composite
def shape_pairs(draw: st.DrawFn, min_len: int = 0, max_len: int = 5000) -> tuple[Floats, Floats]:
    """Equal-length alpha and beta: short ones element by element, long ones drawn from a few values each."""
    n = draw(st.one_of(st.integers(min_len, min(64, max_len)), st.integers(min_len, max_len)))
    if n <= 64:
        return (
            np.array(draw(st.lists(positive, min_size=n, max_size=n)), dtype=np.float64),
            np.array(draw(st.lists(positive, min_size=n, max_size=n)), dtype=np.float64),
        )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    palette_a = np.array(draw(st.lists(positive, min_size=1, max_size=12)))
    palette_b = np.array(draw(st.lists(positive, min_size=1, max_size=12)))
    return rng.choice(palette_a, n), rng.choice(palette_b, n)


def _strided(x: Floats) -> Floats:
    y = np.full(2 * x.size, np.nan)
    y[::2] = x
    return y[::2]


def _read_only(x: Floats) -> Floats:
    y = x.copy()
    y.flags.writeable = False
    return y


# Inputs that hold the same float64 values in another layout or container; the kernel must not care.
LAYOUTS: dict[str, Callable[[Floats], npt.ArrayLike]] = {
    "contiguous": lambda x: x,
    "strided": _strided,
    "reversed-view": lambda x: x[::-1].copy()[::-1],
    "big-endian": lambda x: x.astype(">f8"),
    "read-only": _read_only,
    "list": lambda x: x.tolist(),
    "tuple": lambda x: tuple(x.tolist()),
    "object-array": lambda x: x.astype(object),
    "memoryview": lambda x: x.copy().data,
}
layouts = st.sampled_from(sorted(LAYOUTS))


def _assert_samples(x: object, n: int) -> Floats:
    assert isinstance(x, np.ndarray)
    assert x.dtype == np.float64 and x.shape == (n,) and x.flags.c_contiguous
    assert np.all(np.isfinite(x)), x[~np.isfinite(x)]
    assert np.all((x >= 0.0) & (x <= 1.0)), x[(x < 0.0) | (x > 1.0)]
    return x


@settings(max_examples=200, deadline=None)
@given(shape_pairs(), seeds, layouts, layouts)
@example((np.array([MAX, 1e308]), np.array([MAX, 1e300])), 0, "contiguous", "contiguous")
@example((np.full(9, TINY), np.full(9, TINY)), MAX_SEED, "strided", "list")
@example((np.array([]), np.array([])), 1, "list", "tuple")
def test_valid_shapes_give_reproducible_samples_in_the_unit_interval(
    pair: tuple[Floats, Floats], seed: int, layout_a: str, layout_b: str
) -> None:
    a, b = pair
    n = a.size
    x = _assert_samples(sample_beta(a, b, seed=seed), n)
    again = sample_beta(LAYOUTS[layout_a](a), LAYOUTS[layout_b](b), seed=seed)
    assert again.tobytes() == x.tobytes()
    out = np.full(n, np.nan)
    assert sample_beta(a, b, seed=seed, out=out) is out
    assert out.tobytes() == x.tobytes()
    _assert_samples(sample_beta(a, b), n)  # the thread's own stream


def _mean_and_sd(a: Floats, b: Floats) -> tuple[Floats, Floats]:
    # From halves, so that shapes near the largest double do not overflow the sums, and from square roots,
    # so that a variance below the smallest double (1e-160 ** 2) does not underflow.
    half_sum = a / 2 + b / 2
    mean = (a / 2) / half_sum
    with np.errstate(over="ignore"):
        sd = np.sqrt(mean) * np.sqrt(1 - mean) / np.sqrt(2 * half_sum + 1)
    return mean, sd


@settings(max_examples=150, deadline=None)
@given(shape_pairs(max_len=2000).filter(lambda p: p[0].size > 0), seeds)
# Shapes adding up to more than the largest double: the sum X + Y of the two gamma draws overflowed and
# every sample came out 0.0 instead of about alpha / (alpha + beta).
@example((np.full(9, MAX), np.full(9, MAX)), 3)
@example((np.array([1e308, MAX, 1e308, 1e300]), np.array([1e308, MAX / 3, 1e300, 1e308])), 0)
def test_large_shapes_concentrate_at_the_mean(pair: tuple[Floats, Floats], seed: int) -> None:
    # Both shapes >= 1e4: Beta is then close to normal, so 12 standard deviations is a bound no correct
    # draw exceeds (the chance is below 1e-30), and for shapes near 1e308 the draw is the mean.
    a, b = np.maximum(pair[0], 1e4), np.maximum(pair[1], 1e4)
    x = sample_beta(a, b, seed=seed)
    mean, sd = _mean_and_sd(a, b)
    off = np.abs(x - mean) > 12 * sd + 1e-12 * mean
    assert not off.any(), list(zip(a[off], b[off], x[off], mean[off]))


@st.composite
def pairs_and_k(draw: st.DrawFn) -> tuple[Floats, Floats, int]:
    a, b = draw(shape_pairs())
    return a, b, draw(st.integers(0, a.size))


@settings(max_examples=200, deadline=None)
@given(pairs_and_k(), seeds)
@example((np.full(5, 1e-3), np.full(5, 1e-3), 3), 3)  # ties at 0.0 and 1.0 go to the lower index
@example((np.array([]), np.array([]), 0), 0)
def test_top_k_is_the_stable_ranking_of_the_same_samples(case: tuple[Floats, Floats, int], seed: int) -> None:
    a, b, k = case
    n = a.size
    indices, scores = sample_top_k(a, b, k, seed=seed)
    assert indices.dtype == np.int64 and indices.shape == (k,)
    assert scores.dtype == np.float64 and scores.shape == (k,)
    assert np.unique(indices).size == k and np.all((indices >= 0) & (indices < n))
    assert np.all(np.diff(scores) <= 0)
    samples = sample_beta(a, b, seed=seed)
    # The docstring's promise: indices == argsort(-samples, stable)[:k], scores the samples there.
    np.testing.assert_array_equal(indices, np.argsort(-samples, kind="stable")[:k])
    assert scores.tobytes() == samples[indices].tobytes()
    all_indices, all_scores = sample_top_k(a, b, n, seed=seed)
    np.testing.assert_array_equal(indices, all_indices[:k])
    assert scores.tobytes() == all_scores[:k].tobytes()


@settings(max_examples=60, deadline=None)
@given(shape_pairs(max_len=1000), seeds)
@example((np.array([MAX, 1.0, 1e-3]), np.array([MAX, MAX, 1e-300])), 5)
def test_every_instruction_set_gives_the_same_bits(pair: tuple[Floats, Floats], seed: int) -> None:
    a, b = pair
    best = _kernel.best_isa_name()
    results = {}
    try:
        for isa in ("baseline", "avx2", "avx512"):
            if _kernel.use_isa(isa) == isa:
                results[isa] = sample_beta(a, b, seed=seed).tobytes()
    finally:
        _kernel.use_isa(best)
    assert len(set(results.values())) == 1, sorted(results)


NUMERIC_DTYPES = ["float16", "float32", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(NUMERIC_DTYPES), st.integers(0, 300), st.integers(0, 2**32 - 1), seeds)
def test_other_real_dtypes_sample_as_their_float64_values(dtype: str, n: int, layout_seed: int, seed: int) -> None:
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
    rng = np.random.default_rng(layout_seed)
    a = rng.uniform(1, min(float(info.max), 1e6), n).astype(dtype)
    b = np.maximum(rng.uniform(0, 50, n).astype(dtype), np.asarray(1, dtype=dtype))
    x = _assert_samples(sample_beta(a, b, seed=seed), n)
    assert x.tobytes() == sample_beta(a.astype(np.float64), b.astype(np.float64), seed=seed).tobytes()


def test_python_numbers_and_booleans_count_as_their_values() -> None:
    ones = np.ones(3)
    expected = sample_beta(ones, ones, seed=2).tobytes()
    assert sample_beta(np.ones(3, dtype=bool), [True, True, True], seed=2).tobytes() == expected
    mixed = np.array([decimal.Decimal(1), 1.0, np.float32(1)], dtype=object)
    assert sample_beta([1, 1, 1], mixed, seed=2).tobytes() == expected


# A value that is not a positive finite number, placed at one index of otherwise valid shapes.
bad_values = st.one_of(
    st.sampled_from([0.0, -0.0, -TINY, -1.0, -MAX, np.nan, -np.nan, np.inf, -np.inf, None]),
    st.floats(max_value=0.0),
)


@st.composite
def pairs_and_index(draw: st.DrawFn) -> tuple[Floats, Floats, int]:
    a, b = draw(shape_pairs(min_len=1))
    return a, b, draw(st.integers(0, a.size - 1))


@settings(max_examples=200, deadline=None)
@given(pairs_and_index(), bad_values, st.sampled_from(["alpha", "beta"]), layouts)
@example((np.ones(1), np.ones(1), 0), None, "alpha", "list")
@example((np.ones(3), np.ones(3), 2), -0.0, "beta", "strided")
def test_a_bad_parameter_is_named_with_its_index(
    case: tuple[Floats, Floats, int], bad: float | None, name: str, layout: str
) -> None:
    a, b, i = (case[0].astype(object), case[1].astype(object), case[2]) if bad is None else case
    a, b = a.copy(), b.copy()
    n = a.size
    (a if name == "alpha" else b)[i] = bad
    alpha: npt.ArrayLike = LAYOUTS[layout](a) if name == "alpha" else a
    beta: npt.ArrayLike = LAYOUTS[layout](b) if name == "beta" else b
    message = rf"^{name} must be finite and > 0 at index {i} \(got "
    with pytest.raises(ValueError, match=message):
        sample_beta(alpha, beta, seed=1)
    with pytest.raises(ValueError, match=message):
        sample_top_k(alpha, beta, n)
    with pytest.raises(ValueError, match=message):
        sample_top_k(alpha, beta, 0, seed=None)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300))
def test_different_lengths_are_refused(n_a: int, n_b: int) -> None:
    if n_a == n_b:
        n_b += 1
    message = rf"alpha and beta must have the same length \(got {n_a} and {n_b}\)"
    with pytest.raises(ValueError, match=message):
        sample_beta(np.ones(n_a), np.ones(n_b))
    with pytest.raises(ValueError, match=message):
        sample_top_k(np.ones(n_a), np.ones(n_b), 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=4).filter(lambda s: len(s) != 1), st.booleans())
@example([], True)  # a scalar: numpy's ascontiguousarray would have made it a 1-d array of one
def test_arrays_that_are_not_one_dimensional_are_refused(shape: list[int], on_alpha: bool) -> None:
    wrong = np.ones(shape)
    right = np.ones(int(np.prod(shape)))
    alpha, beta = (wrong, right) if on_alpha else (right, wrong)
    message = re.escape(f"{'alpha' if on_alpha else 'beta'} must be one-dimensional (got shape {tuple(shape)})")
    with pytest.raises(ValueError, match=message):
        sample_beta(alpha, beta)
    with pytest.raises(ValueError, match=message):
        sample_top_k(alpha, beta, 0)
    with pytest.raises(ValueError, match=message):
        reference.sample_top_k(alpha, beta, 0)  # the numpy sampler keeps the same contract
    with pytest.raises(ValueError, match="alpha must be one-dimensional"):
        sample_beta(1.0, 1.0)


# Containers whose items are not real numbers. numpy would cast several of these to float64 without a word
# (numeric strings parsed, imaginary parts dropped, datetimes as counts), so the kernel refuses their dtypes.
NOT_NUMBERS: dict[str, Any] = {
    "numeric-strings": ["1.5", "2"],
    "numeric-bytes": [b"1.5"],
    "a-string": "abc",
    "string-array": np.array(["3.0"]),
    "complex-array": np.array([1 + 2j, 3 + 0j]),
    "complex-list": [1 + 0j],
    "datetime64": np.array([1], dtype="datetime64[s]"),
    "timedelta64": np.array([1], dtype="timedelta64[s]"),
    "timedelta": [datetime.timedelta(seconds=1)],
    "structured": np.zeros(2, dtype=[("a", "f8")]),
    "dicts": [{"a": 1.0}],
    "ragged": [[1.0], [2.0, 3.0]],
    "int-beyond-double": [10**400],
    "negative-int-beyond-double": [1.0, -(10**400)],
    "object-int-beyond-double": np.array([10**400], dtype=object),
    "objects": [object()],
    "a-set": {1.0, 2.0},
}


@pytest.mark.parametrize("on_alpha", [True, False], ids=["alpha", "beta"])
@pytest.mark.parametrize("kind", NOT_NUMBERS)
def test_values_that_are_not_numbers_are_refused(kind: str, on_alpha: bool) -> None:
    bad = NOT_NUMBERS[kind]
    size = np.size(bad) if isinstance(bad, np.ndarray) else len(bad) if hasattr(bad, "__len__") else 1
    good = np.ones(size)
    alpha, beta = (bad, good) if on_alpha else (good, bad)
    message = rf"^{'alpha' if on_alpha else 'beta'} must be an array of numbers: "
    with pytest.raises(ValueError, match=message):
        sample_beta(alpha, beta)
    with pytest.raises(ValueError, match=message):
        sample_top_k(alpha, beta, 0)
    with pytest.raises(ValueError, match=message):
        reference.sample_top_k(alpha, beta, 0)


bad_ks = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=1).map(lambda d: ("past", d)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.just(10**400),
    st.just(np.float64(1.0)),
    st.just(np.array([1])),
)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 50), bad_ks)
def test_a_k_outside_zero_to_n_is_refused(n: int, k: Any) -> None:
    if isinstance(k, tuple):  # an integer just past n
        k = n + k[1]
    with pytest.raises(ValueError, match=rf"^k must be an integer in \[0, {n}\] \(got "):
        sample_top_k(np.ones(n), np.ones(n), k, seed=1)


def test_numpy_integer_k_and_seed_are_integers() -> None:
    indices, _ = sample_top_k(np.ones(4), np.ones(4), np.int64(2), seed=np.uint64(MAX_SEED))  # type: ignore[arg-type]
    assert indices.shape == (2,)


bad_seeds = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
    st.just(np.float64(3.0)),
    st.just([1]),
)


@settings(max_examples=100, deadline=None)
@given(bad_seeds)
def test_a_seed_outside_the_64_bit_range_is_refused(seed: object) -> None:
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 2\*\*64\) \(got "):
        sample_beta([1.0], [1.0], seed=seed)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 2\*\*64\) \(got "):
        sample_top_k([1.0], [1.0], 1, seed=seed)  # type: ignore[arg-type]
