"""A feature store's posteriors within a segment: the pair's entity where the store holds one, else the arm's.

On a store source (Vertex) the service counts nothing itself: whatever computes the store's posteriors computes them
per segment too, under the entity ids ``ids.store_pair_id`` names (the segment, U+001F, the arm id). A request with
a segment reads every candidate's own entity and its pair's in one fetch (so in the source's concurrent chunked
reads, and through its cache, as any other ids), and ranks each candidate by its pair's posterior where the store
holds one and by its own where it does not: the back-off is the store's, by what it writes.

"Holds one" is what the source says through the only answer a fetch gives: an entity the store does not hold gets
the prior (``features.source``). A pair's entity that holds exactly the prior is therefore taken as absent, and the
candidate ranks by its own posterior, which is never less informed than the prior.
"""

from __future__ import annotations

import numpy as np

from mab_service.features.source import Features, FeatureSource
from mab_service.ids import store_pair_id


class StoreSegments:
    """Segments over ``source``: ``fetch_segment`` reads both entities of every candidate in one fetch."""

    def __init__(self, source: FeatureSource) -> None:
        self.source = source

    async def fetch_segment(self, ids: list[str], segment: str) -> Features:
        """The posteriors of ``ids`` within ``segment``: each pair's where the store holds it, else the arm's."""
        n = len(ids)
        both = await self.source.fetch(ids + [store_pair_id(segment, i) for i in ids])
        prior_alpha, prior_beta = self.source.prior
        alpha, beta = both.alpha[:n], both.beta[:n]
        pair_alpha, pair_beta = both.alpha[n:], both.beta[n:]
        held = (pair_alpha != prior_alpha) | (pair_beta != prior_beta)
        own = (alpha != prior_alpha) | (beta != prior_beta)
        return Features(
            np.where(held, pair_alpha, alpha),
            np.where(held, pair_beta, beta),
            int(np.count_nonzero(held | own)),
            both.unread,
        )
