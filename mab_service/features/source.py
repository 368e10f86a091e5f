"""The floor every feature source stands on: the lookup result, health, and the source protocols.

A source turns candidate ids into Beta posterior parameters. ``fetch`` returns arrays aligned with the
ids; an id the source does not know gets the prior (the one written policy for missing features), and
``known`` counts the rest. A store that fails may answer part of a fetch: the ids it did not read get the prior
too and are counted in ``unread`` (``on_store_failure = degrade``), or the fetch raises. ``health`` answers from
cached state, never with a live call, so readiness probes cost nothing. Every backend (the embedded table, the
Vertex Featurestore, Feature Store 2.0) and the cache in front of any of them implement the same protocol, and
import nothing from one another: only this module, the errors, and their own client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

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
class Lookup:
    """What a source read: parameters aligned with the ids (the prior where unknown) and which ids it knew.

    ``unread`` lists the positions that were not read (they hold the prior and are neither known nor unknown);
    None when every id was read.
    """

    alpha: npt.NDArray[np.float64]
    beta: npt.NDArray[np.float64]
    found: npt.NDArray[np.bool_]
    unread: npt.NDArray[np.intp] | None = None
    overloaded: bool = False
    """The ``unread`` positions were not read because this worker's own queue did not get to them in time, not
    because the store failed: the request is shed (503 ``overloaded``) rather than answered degraded."""


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


@runtime_checkable
class ReadableSource(FeatureSource, Protocol):
    """A source that says which ids it knew, so that unknown ids can be cached as such."""

    async def read(self, ids: list[str]) -> Lookup:
        """Parameters of ``ids`` (distinct) and which of them the source knew."""


@runtime_checkable
class CountingSource(Protocol):
    """A source (or a layer around one) that keeps its own counters, exported to /metrics.

    ``stats`` returns plain numbers by name; the names ``metrics.SOURCE_COUNTERS`` lists are monotonic counts,
    the others are levels (entries held, warm-up progress).
    """

    def stats(self) -> dict[str, float]:
        """The counters, by name."""
