"""The sampling contract in plain numpy: the baseline for benchmarks and the reference in tests.

Same arguments, validation and results shape as :mod:`mab_service.policy.sampler`, drawn with numpy's
``Generator.beta`` and ranked with a stable argsort. A seed reproduces numpy's stream, not the kernel's.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def _shapes(values: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    try:
        raw = np.asarray(values)
        # Numbers only, as in the kernel: no parsed strings, no dropped imaginary parts, no datetimes.
        if raw.dtype.kind not in "biufO":
            raise TypeError(f"got dtype {raw.dtype}")
        arr = np.ascontiguousarray(raw, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{name} must be an array of numbers: {exc}") from None
    if raw.ndim != 1 or arr.ndim != 1:  # ascontiguousarray makes a 0-d array 1-d
        raise ValueError(f"{name} must be one-dimensional (got shape {raw.shape if raw.ndim != 1 else arr.shape})")
    bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
    if bad.size:
        raise ValueError(f"{name} must be finite and > 0 at index {bad[0]} (got {arr[bad[0]]!r})")
    return arr


def _pair(alpha: npt.ArrayLike, beta: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    a, b = _shapes(alpha, "alpha"), _shapes(beta, "beta")
    if a.shape != b.shape:
        raise ValueError(f"alpha and beta must have the same length (got {a.shape[0]} and {b.shape[0]})")
    return a, b


def sample_beta(alpha: npt.ArrayLike, beta: npt.ArrayLike, *, seed: int | None = None) -> npt.NDArray[np.float64]:
    """One Beta(alpha[i], beta[i]) sample per arm, from numpy's ``Generator.beta``."""
    a, b = _pair(alpha, beta)
    return np.random.default_rng(seed).beta(a, b)


def sample_top_k(
    alpha: npt.ArrayLike, beta: npt.ArrayLike, k: int, *, seed: int | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The k arms with the largest samples, largest first, with their samples."""
    samples = sample_beta(alpha, beta, seed=seed)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= samples.size:
        raise ValueError(f"k must be an integer in [0, {samples.size}] (got {k!r})")
    indices = np.argsort(-samples, kind="stable")[:k].astype(np.int64)
    return indices, samples[indices]
