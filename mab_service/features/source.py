"""The floor every feature source stands on: the lookup result, health, and the source protocols.

A source turns candidate ids into Beta posterior parameters. ``fetch`` returns arrays aligned with the
ids; an id the source does not know gets the prior (the one written policy for missing features), and
``known`` counts the rest. A store that fails may answer part of a fetch: the ids it did not read get the prior
too and are counted in ``unread`` (``on_store_failure = degrade``), or the fetch raises. ``health`` answers from
cached state, never with a live call, so readiness probes cost nothing. Every backend (the embedded table, the
Vertex Featurestore, Feature Store 2.0) and the cache in front of any of them implement the same protocol, and
import nothing from one another: only this module, the errors, and their own client.

A store may hold a value that is no Beta parameter (0, negative, NaN, infinite: a reward counted before its
impressions, a cell written by hand). Sources pass such values on as they read them (NaN where a cell could not be
decoded); ``ParameterCheck`` is the one policy for them, applied by the pipeline between the fetch and the kernel:
the candidate is ranked by the prior, counted, and logged at most once a minute. A bad value is not a store
failure: it does not mark the answer degraded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

# Re-exported: the pipeline runs it on every request, before ``ParameterCheck.replace``.
from mab_service.features._params import count_invalid as count_invalid

logger = logging.getLogger("mab_service.features")

#: Seconds between two warnings about invalid parameters (per worker); the count in between is in the next one.
INVALID_LOG_INTERVAL_S = 60.0


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
    segment_rows: npt.NDArray[np.int32] | None = None
    """For a request with a segment: the arm table's row of each id within the segment (-1 where it holds none)."""


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

    @property
    def prior(self) -> tuple[float, float]:
        """(alpha, beta) for an id the source does not know, and for one whose stored values are no Beta
        parameters."""

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


@dataclass(frozen=True, slots=True)
class InvalidParameters:
    """What ``ParameterCheck`` replaced so far: candidates by source (monotonic)."""

    by_source: Mapping[str, int]


class ParameterCheck:
    """The policy for stored values that are no Beta parameters: rank the candidate by the prior, count, log.

    ``count_invalid`` (one C pass over both arrays, ~0.4 us at 400 candidates) finds whether there is anything to
    do; only then does ``replace`` run. It writes the source's prior over every position whose alpha or beta is not
    finite and > 0, in the fetched arrays themselves (a copy only if a source handed out read-only arrays), so the
    kernel, the answer and the loop's decision record all see the same valid values.

    Args:
        log_interval_s: Least seconds between two warnings; each names one example and how many were replaced
            since the previous warning.
        clock: Monotonic seconds; tests pass their own.
    """

    def __init__(
        self, log_interval_s: float = INVALID_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log_interval_s = log_interval_s
        self._clock = clock
        self._by_source: dict[str, int] = {}
        self._unlogged = 0
        self._logged_at = -math.inf

    def replace(self, features: Features, ids: Sequence[str], source: FeatureSource) -> Features:
        """``features`` with the prior of ``source`` wherever alpha or beta is invalid; ``ids`` are aligned."""
        alpha, beta = features.alpha, features.beta
        # Comparisons with NaN are False: NaN fails `> 0`, and `< inf` catches the infinities.
        bad = np.flatnonzero(~((alpha > 0) & (alpha < math.inf) & (beta > 0) & (beta < math.inf)))
        if not len(bad):
            return features
        if not (alpha.flags.writeable and beta.flags.writeable):
            alpha, beta = alpha.copy(), beta.copy()
            features = features._replace(alpha=alpha, beta=beta)
        first = int(bad[0])
        example, bad_alpha, bad_beta = ids[first], float(alpha[first]), float(beta[first])
        prior_alpha, prior_beta = source.prior
        alpha[bad] = prior_alpha
        beta[bad] = prior_beta
        name = store_name(source)
        self._by_source[name] = self._by_source.get(name, 0) + len(bad)
        self._unlogged += len(bad)
        now = self._clock()
        if now - self._logged_at >= self.log_interval_s:
            logger.warning(
                "%d candidates ranked by the prior since the last report: the store held no valid Beta parameters "
                "for them (finite and > 0); e.g. %r from %s: alpha=%r, beta=%r",
                self._unlogged,
                example,
                name,
                bad_alpha,
                bad_beta,
            )
            self._unlogged = 0
            self._logged_at = now
        return features

    def stats(self) -> InvalidParameters:
        return InvalidParameters(dict(self._by_source))


def store_name(source: object) -> str:
    """The name of the store under ``source`` and the layers around it (a cache, metrics): where values come from."""
    while getattr(source, "source", None) is not None:
        source = source.source  # type: ignore[attr-defined]  # any wrapping layer keeps what it wraps here
    return str(getattr(source, "name", type(source).__name__))
