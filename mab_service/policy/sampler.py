"""Thompson sampling from Beta posteriors: the public face of the C++ kernel.

``sample_beta`` draws one value per arm; ``sample_top_k`` draws and ranks in one call, which is what the
service uses. Both release the GIL for the whole batch, so several threads sample in parallel. The pure
numpy implementation of the same contract is in :mod:`mab_service.policy.reference`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from mab_service.policy import _kernel, reference

TopK = Callable[..., tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]


def sample_beta(
    alpha: npt.ArrayLike,
    beta: npt.ArrayLike,
    *,
    seed: int | None = None,
    out: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """Draw one sample from Beta(alpha[i], beta[i]) for every arm i.

    Each draw is X / (X + Y) with X ~ Gamma(alpha[i]) and Y ~ Gamma(beta[i]), the gammas drawn by
    Marsaglia and Tsang's method (shapes below 1 boosted by U^(1/shape)); the result is exact for any
    finite positive shapes and always lies in [0, 1].

    Args:
        alpha: The first shape parameter of each arm, finite and > 0; a 1-D array-like.
        beta: The second shape parameter of each arm, finite and > 0; same length as ``alpha``.
        seed: An integer in [0, 2**64). The same seed gives the same samples on every call and every
            CPU; ``None`` draws from this thread's stream, seeded from OS entropy.
        out: A writeable, contiguous float64 array of the same length to write into, so that a loop
            does not allocate (and fault in) a new array on every call.

    Returns:
        ``out`` if given, else a new float64 array: one sample per arm.

    Raises:
        ValueError: a parameter that is not a real number, or not finite and > 0 (naming the array and
            index), arrays that are not 1-D or differ in length, a bad seed, or an unusable ``out``.
    """
    return _kernel.sample_beta(alpha, beta, seed=seed, out=out)


def sample_top_k(
    alpha: npt.ArrayLike, beta: npt.ArrayLike, k: int, *, seed: int | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Draw one Beta sample per arm and return the k arms with the largest samples.

    The samples are those :func:`sample_beta` gives for the same arguments; selection is a partial one
    (O(n + k log k)) in C++. Ties go to the lower index, so ``indices`` equals
    ``numpy.argsort(-samples, kind="stable")[:k]``.

    Args:
        alpha: The first shape parameter of each arm, finite and > 0; a 1-D array-like.
        beta: The second shape parameter of each arm, finite and > 0; same length as ``alpha``.
        k: How many arms to return, an integer in [0, len(alpha)].
        seed: As for :func:`sample_beta`.

    Returns:
        ``(indices, samples)``: int64 indices of the top k arms, largest sample first, and their float64
        samples in the same (descending) order.

    Raises:
        ValueError: as for :func:`sample_beta`, or a k that is not an integer in [0, len(alpha)].
    """
    return _kernel.sample_top_k(alpha, beta, k, seed=seed)


# Interchangeable samplers by name, for settings and tests; "auto" is the production choice.
SAMPLERS: Final[dict[str, TopK]] = {
    "auto": sample_top_k,
    "kernel": sample_top_k,
    "reference": reference.sample_top_k,
}


def kernel_isa() -> str:
    """The instruction set the kernel runs on here: ``"avx512"``, ``"avx2"`` or ``"baseline"``."""
    return _kernel.isa()
