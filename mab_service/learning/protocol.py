"""What the request path needs of the learning loop: one protocol, two implementations.

``learning.loop.NodeLoop`` counts on the node (its arm table and journal); ``fleet.loop.FleetLoop`` keeps events
and rewards in Pub/Sub and Bigtable for the learners. ``app.py`` chooses one per worker; routes and metrics use
only this.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from mab_service.errors import MabError
from mab_service.features.source import FeatureSource
from mab_service.learning._answer import NativeAnswer
from mab_service.learning._arms import ArmTable
from mab_service.learning.loop import LoopCounters
from mab_service.learning.posteriors import SegmentSource


class Loop(Protocol):
    """One worker's side of the learning loop."""

    #: The node's arm table (the embedded sources rank from it, and a following replica's copy of the counts).
    arms: ArmTable
    #: Whether answers rank by the loop's counts (embedded sources) or by the store's own values.
    apply_counts: bool
    #: How long after its answer an event takes rewards (seconds).
    window_s: float
    #: Whether answers may rank within a segment (the loop counts segments); else they are refused.
    counts_segments: bool
    #: The native /predict (``answered_native``), where answers rank from the node's table; else None.
    native: NativeAnswer | None

    @property
    def durable(self) -> bool:
        """Whether the journal takes what it is given."""
        ...

    @property
    def following(self) -> bool:
        """Whether the node's arm table holds the fleet's counts."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def new_event_id(self) -> str: ...

    def new_seed(self) -> int: ...

    async def claim(self, event_id: str, ids: list[str], segment: str | None = None) -> None:
        """Take a client's own event id before its answer (ranked within ``segment``, if any) is recorded."""
        ...

    def answered(
        self,
        event_id: str,
        client_event_id: bool,
        user_id: str,
        body: bytes,
        candidates: list[str],
        alpha: npt.NDArray[np.float64],
        beta: npt.NDArray[np.float64],
        rows: npt.NDArray[np.int32] | None,
        ranking: npt.NDArray[np.int64],
        ids: list[str],
        seed: int,
        top_k: int | None,
        segment: str | None = None,
        segment_rows: npt.NDArray[np.int32] | None = None,
    ) -> str:
        """Hold an answer's event and count its impressions (for its segment too, if any); return the event id."""
        ...

    def answered_native(self, native: NativeAnswer) -> bytes:
        """``answered`` for the answer ``native.rank`` took and ranked; return the answer's bytes."""
        ...

    async def reward(self, event_id: str, arm_id: str, value: float) -> bool:
        """Check and credit one reward: True if accepted now, False if a duplicate."""
        ...

    async def rewards(self, items: list[tuple[str, str, float]]) -> list[bool | MabError]:
        """Check and credit rewards; per item True, False (duplicate) or the refusal."""
        ...

    async def read_arm(self, arm_id: str, source: FeatureSource) -> tuple[float, float, float, float]:
        """(alpha, beta, impressions, rewards) of an arm as this worker sees it now (``UnknownArm`` if none)."""
        ...

    async def read_segment_arm(
        self, arm_id: str, segment: str, segments: SegmentSource | None
    ) -> tuple[float, float, float, float]:
        """(alpha, beta, impressions, rewards) of an arm within a segment (``SegmentsUnavailable`` where segments
        are not counted); where a store ranks (``segments``, the loop counting only), its posterior there."""
        ...

    async def top_segment(
        self, n: int, order: str, segment: str, executor: Executor
    ) -> tuple[list[dict[str, Any]], int, bool | None]:
        """``top`` within a segment (``SegmentsUnavailable`` where segments are not counted)."""
        ...

    async def top(self, n: int, order: str, executor: Executor) -> tuple[list[dict[str, Any]], int, bool | None]:
        """The ``n`` leading arms, how many arms were ranked, and whether more exist than were read (None: all)."""
        ...

    def stats(self) -> dict[str, Any]:
        """The loop's health as ``GET /loop`` shows it."""
        ...

    def counters(self) -> LoopCounters:
        """The counters the metrics copy."""
        ...
