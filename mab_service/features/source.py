"""The feature-source interface every backend implements, and the name -> backend map.

A source turns candidate ids into Beta posterior parameters. ``fetch`` returns arrays aligned with the
ids; an id the source does not know gets the prior (the one written policy for missing features), and
``known`` counts the rest. A store that fails may answer part of a fetch: the ids it did not read get the prior
too and are counted in ``unread`` (``on_store_failure = degrade``), or the fetch raises. ``health`` answers from
cached state, never with a live call, so readiness probes cost nothing. The Vertex AI source and a cache in front
of any source implement the same protocol.
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
    unread: int = 0
    """How many ids a failing store could not be asked about in time: they got the prior too, and the answer is
    marked degraded."""
    rows: npt.NDArray[np.int32] | None = None
    """The shared arm table's row of each id (-1 where it holds none), when the source reads that table."""


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
