"""The loop of a fleet replica: events and rewards go to Pub/Sub, the events' membership to Bigtable.

The learners count them for every replica (``fleet.learner``); the node's tables hold this node's events only
(the holds, each client's share of them) and, with the fan-out followed, the fleet's counts, the arms' within their
segments too: then answers may rank within a segment (``counts_segments``), by the node table's segment rows as on a
node, and their impressions and rewards count for the segment as well (the event's membership row records it). What
it shares with the node's loop (holding, the decision log, the counters and series) is ``learning.loop.LoopBase``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np
import numpy.typing as npt

from mab_service.config import Settings
from mab_service.errors import MabError
from mab_service.features.source import FeatureSource
from mab_service.fleet.replica import Fleet
from mab_service.fleet.sink import SinkUnavailable
from mab_service.learning.loop import EventIdInUse, LoopBase, UnknownArm, leading_arms
from mab_service.learning.node import Node
from mab_service.learning.posteriors import SegmentSource, backed_off


class FleetLoop(LoopBase):
    """One worker's loop on a fleet replica: holds in the node's ring, counts kept by the learners."""

    def __init__(self, node: Node, settings: Settings, *, apply_counts: bool, fleet: Fleet) -> None:
        super().__init__(node, settings, apply_counts=apply_counts)
        self.fleet = fleet
        # Segments rank by the node table's segment rows, which only the fan-out fills.
        self.counts_segments = fleet.follower is not None

    async def start(self) -> None:
        await super().start()
        await self.fleet.start()

    async def close(self) -> None:
        await self.fleet.close()
        await super().close()

    @property
    def following(self) -> bool:
        return self.fleet.follower is not None

    async def claim(self, event_id: str, ids: list[str], segment: str | None = None) -> None:
        """Take a client's own event id on every replica: one CheckAndMutateRow on the event's membership row,
        which it writes (``Fleet.claim``), with the answer's segment if any.

        Raises:
            EventIdInUse: The id is taken on some replica.
            SinkUnavailable, BigtableUnavailable: The event could not be kept or Bigtable not asked.
        """
        # Before the claim, what answered would refuse: a refusal after it would leave the id taken for nothing.
        self.fleet.check()
        held_ids = ids[: self.max_held_ids]
        now = time.time()
        self._admit(len(held_ids), now)
        if not await self.fleet.claim(event_id, held_ids, now, segment):
            self.refusals.event_id_in_use += 1
            raise EventIdInUse(f"event_id {event_id!r} is taken by an earlier answer; send a new one", field="event_id")

    def _check(self) -> None:
        self.fleet.check()

    def _record(
        self,
        event_id: str,
        claimed: bool,
        candidates: list[str],
        rows: npt.NDArray[np.int32] | None,
        held: npt.NDArray[np.int64],
        held_ids: list[str],
        now: float,
    ) -> None:
        # Pub/Sub and Bigtable keep it; the learners count it. A client's own id wrote its row in ``claim``.
        self.fleet.event(event_id, held_ids, now, claimed=claimed)

    def _segment_tag(self, segment: str) -> int:
        # A reward finds the segment in the event's membership row, on whichever replica it arrives: nothing to tag.
        return 0

    def _record_segment(
        self,
        event_id: str,
        claimed: bool,
        candidates: list[str],
        rows: npt.NDArray[np.int32] | None,
        segment: str,
        segment_rows: npt.NDArray[np.int32] | None,
        held: npt.NDArray[np.int64],
        held_ids: list[str],
        now: float,
    ) -> None:
        self.fleet.event(event_id, held_ids, now, claimed=claimed, segment=segment)

    async def rewards(self, items: list[tuple[str, str, float]]) -> list[bool | MabError]:
        """Check rewards against the events' membership rows, claim the accepted ones on them, then publish those
        this replica claimed.

        Returns:
            Per item: True (accepted now), False (a duplicate: counted once already), or the refusal
            (UnknownEvent, NotInEvent), in order.

        Raises:
            SinkUnavailable: Pub/Sub did not store them; BigtableUnavailable: the events could not be read.
        """
        now = time.time()
        fleet = self.fleet
        events = await fleet.read_events(sorted({event_id for event_id, _, _ in items}))
        outcomes: list[bool | MabError] = []
        accepted: list[tuple[str, str, float, str | None]] = []
        positions: list[int] = []
        taken: set[tuple[str, str]] = set()
        for event_id, arm_id, value in items:
            event = events.get(event_id)
            if event is None or now - event.t > self.window_s:
                outcomes.append(self._unknown_event(event_id))
            elif arm_id not in event.ids:
                outcomes.append(self._not_in_event(event_id, arm_id))
            elif arm_id in event.rewarded or (event_id, arm_id) in taken:
                self.refusals.duplicate += 1
                outcomes.append(False)
            else:
                taken.add((event_id, arm_id))
                positions.append(len(outcomes))
                accepted.append((event_id, arm_id, value, event.segment))
                outcomes.append(True)
        if not accepted:
            return outcomes
        # The claim decides: a copy posted to any replica, now or later, is a duplicate, and only the claimed reward
        # is published, so the learners count it once without deduplicating rewards themselves.
        try:
            first = await fleet.claim_rewards(accepted)
        except SinkUnavailable:
            self.refusals.unavailable += len(accepted)
            raise
        counted = []
        for position, reward, claimed in zip(positions, accepted, first):
            if claimed:
                counted.append(reward)
            else:
                outcomes[position] = False
                self.refusals.duplicate += 1
        try:
            await fleet.publish_rewards(counted, now)
        except SinkUnavailable:
            self.refusals.unavailable += len(counted)
            raise
        self._accepted([(event_id, arm_id, value) for event_id, arm_id, value, _ in counted], now)
        return outcomes

    async def read_arm(self, arm_id: str, source: FeatureSource) -> tuple[float, float, float, float]:
        """The fleet's counts of ``arm_id`` as the learners have written them, read past the cache.

        Raises:
            UnknownArm: No learner has counted it yet.
        """
        counted = await self.fleet.arm(arm_id)
        if counted is None:
            raise UnknownArm(f"no arm {arm_id!r}: no learner has counted it yet")
        return counted

    async def top(self, n: int, order: str, executor: Executor) -> tuple[list[dict[str, Any]], int, bool | None]:
        """The leading arms over the counts in Bigtable (the first ``replica.SCAN_ROWS`` arms); and whether the
        table holds more than were read. The intervals are drawn on ``executor``, off the event loop."""
        ids, counts, partial = await self.fleet.scan()
        alpha, beta = counts.posterior(self.prior_alpha, self.prior_beta)
        shown = counts.impressions.astype(np.float64)
        leading = await asyncio.get_running_loop().run_in_executor(
            executor, leading_arms, ids.__getitem__, alpha, beta, shown, counts.rewards, n, order, not self.half_life_s
        )
        return leading, len(ids), partial

    async def read_segment_arm(
        self, arm_id: str, segment: str, segments: SegmentSource | None = None
    ) -> tuple[float, float, float, float]:
        """(alpha, beta, impressions, rewards) of an arm within a segment from the counts the learners have written
        now, read past the cache: the arm's posterior backed off to, plus its counts within the segment, as the
        node table's ``gather_segment`` ranks it.

        Raises:
            UnknownArm: No learner has counted the arm, in the segment or at all.
        """
        counts = await self.fleet.segment_arm(arm_id, segment)
        if not counts.found.any():
            raise UnknownArm(f"no arm {arm_id!r}: no learner has counted it yet")
        alpha, beta = counts.posterior(self.prior_alpha, self.prior_beta)
        shown, got = counts.impressions[1].item(), float(counts.rewards[1])
        within = backed_off(self.segment_weight, float(alpha[0]), float(beta[0]), shown, got)
        return *within, shown, got

    async def top_segment(
        self, n: int, order: str, segment: str, executor: Executor
    ) -> tuple[list[dict[str, Any]], int, bool | None]:
        """The leading arms within ``segment`` over the counts in Bigtable (its first ``replica.SCAN_ROWS`` rows),
        ranked by their posteriors within it; and whether it holds more than were read."""
        ids, within, partial = await self.fleet.scan(segment)
        alpha, beta = (await self.fleet.counts(ids)).posterior(self.prior_alpha, self.prior_beta)
        shown = within.impressions.astype(np.float64)
        alpha, beta = backed_off(self.segment_weight, alpha, beta, shown, within.rewards)
        leading = await asyncio.get_running_loop().run_in_executor(
            executor, leading_arms, ids.__getitem__, alpha, beta, shown, within.rewards, n, order, not self.half_life_s
        )
        return leading, len(ids), partial

    def _more_stats(self) -> dict[str, Any]:
        return {"fleet": self.fleet.stats()}

    def _fleet_counters(self) -> Mapping[str, Any]:
        return self.fleet.stats()
