"""The feature-source interface every backend implements, and the name -> backend map.

A source turns candidate ids into Beta posterior parameters. ``fetch`` returns arrays aligned with the
ids; an id the source does not know gets the prior (the one written policy for missing features), and
``known`` counts the rest. ``health`` answers from cached state, never with a live call, so readiness
probes cost nothing. The Vertex AI source and a cache in front of any source implement the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt


class Features(NamedTuple):
    alpha: npt.NDArray[np.float64]
    beta: npt.NDArray[np.float64]
    known: int
    """How many of the ids the source knew; the others got the prior."""


@dataclass(frozen=True, slots=True)
class Health:
    ready: bool
    reason: str = ""


class FeatureSource(Protocol):
    name: str

    async def start(self) -> None:
        """Load or connect; raise FeatureSourceError if the source cannot be used."""

    async def fetch(self, ids: list[str]) -> Features:
        """Parameters for ``ids`` (distinct), aligned with them."""

    def health(self) -> Health:
        """Whether the source can serve now, from cached state."""

    async def close(self) -> None:
        """Release connections and memory."""
