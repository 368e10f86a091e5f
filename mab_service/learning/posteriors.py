"""The embedded posterior store as a feature source: the node's shared arm table, read by every worker.

Its catalogue comes from the same CSV as ``features.local.LocalSource`` (or the bundled demo catalogue), loaded
once per node by the node's owner; each read gives Beta(alpha0 + rewards, beta0 + impressions - rewards) as the
loop has counted it, and the table's row of each id so that the loop counts impressions without a second lookup.
"""

from __future__ import annotations

from mab_service.features.source import Features, Health
from mab_service.learning._arms import ArmTable


class SharedArmsSource:
    """Posteriors from the node's shared arm table (catalogue plus the loop's counts)."""

    name = "local"

    def __init__(self, arms: ArmTable, prior_alpha: float, prior_beta: float) -> None:
        self.arms = arms
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta

    async def start(self) -> None:
        pass  # the node's owner loaded the table before any worker maps it

    async def fetch(self, ids: list[str]) -> Features:
        alpha, beta, known, rows = self.arms.gather(ids, self.prior_alpha, self.prior_beta)
        return Features(alpha, beta, known, 0, rows)

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
