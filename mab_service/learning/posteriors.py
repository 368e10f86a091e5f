"""The embedded posterior store as a feature source: the node's shared arm table, read by every worker.

Its catalogue comes from the same CSV as ``features.local.LocalSource`` (or the bundled demo catalogue), loaded
once per node by the node's owner; each read gives Beta(alpha0 + rewards, beta0 + max(impressions - rewards, 0)) as
the loop has counted it, and the table's row of each id so that the loop counts impressions without a second lookup.

Every value that reaches the kernel from here is valid: alpha0 and beta0 are checked when the catalogue loads, counts
are never negative, and a reward counted before (or without) its impression leaves beta at beta0 instead of pushing
it to 0 or below (``ArmTable.gather`` computes it so; ``posterior`` is the same rule for the loop's other readers).
"""

from __future__ import annotations

from typing import Any, Protocol, overload

import numpy as np
import numpy.typing as npt

from mab_service.features.source import Features, Health
from mab_service.learning._arms import ArmTable

Floats = npt.NDArray[np.float64]


@overload
def posterior(alpha0: float, beta0: float, impressions: float, rewards: float) -> tuple[float, float]: ...
@overload
def posterior(alpha0: Floats, beta0: Floats, impressions: Floats, rewards: Floats) -> tuple[Floats, Floats]: ...
def posterior(
    alpha0: float | Floats, beta0: float | Floats, impressions: float | Floats, rewards: float | Floats
) -> Any:
    """An arm's posterior from its catalogue prior and counts, as ``ArmTable.gather`` gives it to the pipeline:
    Beta(alpha0 + rewards, beta0 + max(impressions - rewards, 0))."""
    alpha = alpha0 + rewards
    beta = beta0 + np.maximum(np.subtract(impressions, rewards), 0.0)
    if isinstance(alpha, np.ndarray):
        return alpha, beta
    return float(alpha), float(beta)


@overload
def backed_off(weight: float, alpha: float, beta: float, shown: float, got: float) -> tuple[float, float]: ...
@overload
def backed_off(weight: float, alpha: Floats, beta: Floats, shown: Floats, got: Floats) -> tuple[Floats, Floats]: ...
def backed_off(weight: float, alpha: Any, beta: Any, shown: Any, got: Any) -> Any:
    """An arm's posterior within a segment, as ``ArmTable.gather_segment`` gives it to the pipeline: the mean mu of
    its global posterior Beta(alpha, beta) worth ``weight`` pseudo-impressions, plus the segment's own counts:
    Beta(weight * mu + got, weight * (1 - mu) + max(shown - got, 0))."""
    mu = alpha / (alpha + beta)
    return posterior(weight * mu, weight * (1.0 - mu), shown, got)


class SegmentSource(Protocol):
    """Where the pipeline reads a segment's posteriors."""

    async def fetch_segment(self, ids: list[str], segment: str) -> Features:
        """The posteriors of ``ids`` within ``segment`` (on the node's table, with the rows of the arms and of their
        segment keys)."""
        ...


class SharedArmsSource:
    """Posteriors from the node's shared arm table (catalogue plus the loop's counts), globally or within a
    segment (the global posterior's mean backed off to with ``segment_weight`` pseudo-impressions)."""

    name = "local"

    def __init__(self, arms: ArmTable, prior_alpha: float, prior_beta: float, segment_weight: float = 10.0) -> None:
        self.arms = arms
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta
        self.segment_weight = segment_weight

    async def start(self) -> None:
        pass  # the node's owner loaded the table before any worker maps it

    async def fetch(self, ids: list[str]) -> Features:
        alpha, beta, known, rows = self.arms.gather(ids, self.prior_alpha, self.prior_beta)
        return Features(alpha, beta, known, 0, rows)

    async def fetch_segment(self, ids: list[str], segment: str) -> Features:
        alpha, beta, known, rows, pair_rows = self.arms.gather_segment(
            ids, segment, self.segment_weight, self.prior_alpha, self.prior_beta
        )
        return Features(alpha, beta, known, 0, rows, pair_rows)

    def health(self) -> Health:
        return Health(True)

    async def close(self) -> None:
        pass

    @property
    def size(self) -> int:
        return len(self.arms)

    @property
    def prior(self) -> tuple[float, float]:
        return self.prior_alpha, self.prior_beta
