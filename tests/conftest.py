from __future__ import annotations

import numpy as np
import pytest


class Rand:
    """Seeded random test data whose repr shows the seed, so a failure names what to replay."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.gen = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"Rand(seed={self.seed})"


@pytest.fixture
def rand(request: pytest.FixtureRequest) -> Rand:
    return Rand(seed=20261121)
