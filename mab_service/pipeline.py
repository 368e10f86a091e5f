"""recommend(): fetch -> sample -> rank, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mab_service.errors import SegmentsUnavailable
from mab_service.features.source import Features, FeatureSource, ParameterCheck, count_invalid
from mab_service.learning.posteriors import SegmentSource
from mab_service.policy.sampler import TopK
from mab_service.schemas import PredictRequest


@dataclass(slots=True)  # not frozen: a frozen dataclass is built at ~3x the cost, once per request
class Recommendation:
    ids: list[str]
    scores: npt.NDArray[np.float64]
    known: int
    degraded: bool
    """Some candidates got the prior because the feature store could not be read in time (not for invalid values)."""
    ranking: npt.NDArray[np.int64]
    """Positions in the request's candidates of ``ids``, best first."""
    features: Features
    """The posterior parameters the sample was drawn from, aligned with the candidates."""


#: This worker's policy for stored values that are no Beta parameters; ``metrics`` reads its counts.
parameter_check = ParameterCheck()


async def recommend(
    request: PredictRequest,
    source: FeatureSource,
    top_k: TopK,
    seed: int | None,
    segments: SegmentSource | None = None,
) -> Recommendation:
    """Rank the request's candidates by one Thompson sample each; return the best ``top_k`` (all if None).

    ``seed`` (the request's own, or one the loop drew so that the answer can be replayed) fixes the samples. A
    request with a segment ranks by the segment's posteriors, read from ``segments`` (the node's table, or a Vertex
    store's pair entities).

    Raises:
        SegmentsUnavailable: The request has a segment and this worker keeps no segment counts (``segments`` None).
    """
    candidates = request.candidates
    if request.segment is None:
        features = await source.fetch(candidates)
    elif segments is None:
        raise SegmentsUnavailable(
            "segments are ranked only where the node's table counts them (the embedded demo or csv: source with the "
            "loop on, or a fleet replica following the learners' fan-out) or a Vertex source holds them; this one "
            "ranks from a fixed table or from the fleet's counts read through the cache",
            field="segment",
        )
    else:
        features = await segments.fetch_segment(candidates, request.segment)
    if count_invalid(features.alpha, features.beta):  # one C pass; the kernel refuses what it counts
        features = parameter_check.replace(features, candidates, source)
    k = len(candidates) if request.top_k is None else min(request.top_k, len(candidates))
    indices, scores = top_k(features.alpha, features.beta, k, seed=seed)
    ids = [candidates[i] for i in indices.tolist()]
    return Recommendation(ids, scores, features.known, features.unread > 0, indices, features)
