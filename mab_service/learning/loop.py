"""One worker's side of the loop: hold each answer as an event, count its impressions, check and record rewards.

``answered`` runs for every /predict answer before it is sent: it holds the event in the node's ring (a client's
own event id that is still held is refused), adds one impression per returned id to the shared arm table, writes
the event to this worker's journal and the decision to its decision log. None of it waits on a disk.

``reward`` checks a reward against the held event (unknown, not returned by it, already rewarded) with one
compare-exchange in shared memory, writes it to the journal, waits for the group commit and then adds it to the
arm's counts: the caller answers 202 only once the reward is on disk. If the disk refuses, the event's mark is taken
back and the caller answers 503, so a retry can be accepted later. The mark is pending in this process's name until
the journal has the reward; if the process dies in between, a retry takes the mark over and is counted.

The posterior an answer uses is Beta(alpha0 + rewards, beta0 + impressions - rewards), read by the arm table's
gather (``posteriors.SharedArmsSource``) on the embedded sources. On a Vertex source the store's own values rank
(``apply_counts`` is off): the loop counts and logs events for the pipeline that computes them, and adds nothing.
``LoopBase`` holds what every worker's loop shares (holding in the node's ring, each client's share of it, the
journal, the decision log, the counters and series); ``NodeLoop`` counts on the node. In fleet mode
``fleet.loop.FleetLoop`` sends events and rewards to Pub/Sub and the events' membership to Bigtable instead, where
the learners count them for every replica. The request path sees either through ``learning.protocol.Loop``.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mab_service.clients import CLIENT
from mab_service.config import Settings
from mab_service.errors import MabError, Overloaded, SegmentsUnavailable
from mab_service.features.source import FeatureSource, count_invalid
from mab_service.ids import KEY_SEPARATOR, pair_key, segment_key
from mab_service.learning import _arms, _events, decisions
from mab_service.learning._answer import NativeAnswer
from mab_service.learning.decisions import DecisionLog
from mab_service.learning.journal import Journal, JournalUnavailable
from mab_service.learning.node import Node
from mab_service.learning.posteriors import SegmentSource, backed_off, posterior

#: Seconds per point of the /loop series, and how many points it keeps (30 minutes).
SERIES_STEP_S = 10
SERIES_POINTS = 180


class UnknownEvent(MabError):
    status_code = 404
    code = "unknown_event"


class NotInEvent(MabError):
    status_code = 422
    code = "not_in_event"


class EventIdInUse(MabError):
    status_code = 409
    code = "event_id_in_use"


class TooManyEvents(Overloaded):
    """The client holds its share of the node's held events (``max_client_share``); nothing of the answer was held
    or counted. An ``Overloaded`` so that the answer carries Retry-After: when enough of its holds expire."""

    status_code = 429
    code = "too_many_events"


class TooManyNewArms(MabError):
    """The client has added its share of the node's room for new arms (``max_client_share`` of ``max_new_arms``);
    nothing of the answer was held or counted. New arms stay in the table, so waiting does not help: put them in the
    catalogue, or raise ``--max-new-arms``."""

    status_code = 429
    code = "too_many_new_arms"


class NewArmShares:
    """Arms each client added to the node's table through this worker, against its share of ``max_new_arms``.

    Rows for arms first seen at run time are never given back (their counts are the bandit's), so the budget is for
    the process's life, not a window: without it one client sending made-up ids fills the room every other client's
    new arms need (they would then rank by the prior, uncounted).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._added: dict[str, int] = {}

    def admit(self, client: str, n: int) -> None:
        """Raise ``TooManyNewArms`` unless ``n`` more new arms fit ``client``'s share; ``add`` them once counted."""
        had = self._added.get(client, 0)
        if n and had + n > self.limit:
            raise TooManyNewArms(
                f"this client has added {had} arms not in the catalogue, its share of the node's room for new arms "
                f"({self.limit} per worker); this answer would add {n} more. Add them to the catalogue, or ask the "
                "operator to raise --max-new-arms"
            )

    def add(self, client: str, n: int) -> None:
        if n:
            self._added[client] = self._added.get(client, 0) + n


class ClientHolds:
    """One client's holds through this worker: ``[second, events, members]`` buckets, oldest first, and their sums."""

    __slots__ = ("buckets", "events", "members")

    def __init__(self) -> None:
        self.buckets: deque[list[float]] = deque()
        self.events = 0
        self.members = 0


class FairHolding:
    """What each client holds in the node's event ring through this worker, within the reward window, and its budget.

    A client (``clients.CLIENT``; ``""`` outside a request, where all are one) may hold at most ``max_events`` events
    and ``max_members`` members: its share of the ring, divided among the workers. Holds are counted in one-second
    buckets per client, so an answer costs a dict lookup, a look at the deque's ends and an addition. A bucket is let
    go one second after its last event may have left the window: the count errs on the side of holding longer.
    """

    def __init__(self, max_events: int, max_members: int, window_s: float) -> None:
        self.max_events = max_events
        self.max_members = max_members
        self.window_s = window_s
        self._clients: dict[str, ClientHolds] = {}
        self._sweep_s = min(60.0, window_s / 4)
        self._next_sweep = 0.0

    def admit(self, client: str, n: int, now: float) -> ClientHolds:
        """The client's holds, if one more event of ``n`` members fits its budget; pass them to ``add`` once held.

        Raises:
            TooManyEvents: It does not fit; Retry-After is when enough of the client's holds will have expired.
        """
        if now >= self._next_sweep:
            self._sweep(now)
        holds = self._clients.get(client)
        if holds is None:
            holds = self._clients[client] = ClientHolds()
            return holds
        buckets = holds.buckets
        horizon = now - self.window_s - 1.0
        while buckets and buckets[0][0] < horizon:
            _, events, members = buckets.popleft()
            holds.events -= int(events)
            holds.members -= int(members)
        if holds.events + 1 <= self.max_events and holds.members + n <= self.max_members:
            return holds
        raise TooManyEvents(
            f"this client holds {holds.events} events and {holds.members} ids within the reward window, its share of "
            f"the node's held events ({self.max_events} events, {self.max_members} ids per worker); an answer holds "
            "nothing more until some of them expire",
            retry_after_s=self._retry_after_s(holds, n, now),
        )

    def add(self, holds: ClientHolds, n: int, now: float) -> None:
        """Count one held event of ``n`` members for the client of ``holds``."""
        buckets = holds.buckets
        second = math.floor(now)
        if buckets and buckets[-1][0] == second:
            bucket = buckets[-1]
            bucket[1] += 1
            bucket[2] += n
        else:
            buckets.append([second, 1, n])
        holds.events += 1
        holds.members += n

    def _retry_after_s(self, holds: ClientHolds, n: int, now: float) -> int:
        events, members = holds.events, holds.members
        for second, freed_events, freed_members in holds.buckets:
            events -= int(freed_events)
            members -= int(freed_members)
            if events + 1 <= self.max_events and members + n <= self.max_members:
                return max(1, math.ceil(second + 1.0 + self.window_s - now))
        return max(1, math.ceil(self.window_s))  # more ids than the whole budget: never (the window, to say so)

    def _sweep(self, now: float) -> None:
        """Let go of clients whose holds have all expired, so that clients that leave cost no memory."""
        self._next_sweep = now + self._sweep_s
        horizon = now - self.window_s - 1.0
        for client in [c for c, h in self._clients.items() if not h.buckets or h.buckets[-1][0] < horizon]:
            del self._clients[client]

    def clients(self) -> int:
        """Clients with holds counted (some may have expired since the last sweep)."""
        return len(self._clients)


@dataclass
class Refusals:
    duplicate: int = 0
    unknown_event: int = 0
    not_in_event: int = 0
    unavailable: int = 0
    event_id_in_use: int = 0
    too_many_events: int = 0
    too_many_new_arms: int = 0


class UnknownArm(MabError):
    """Neither the loop nor the source knows the arm ``GET /arms/{id}`` asks for."""

    status_code = 404
    code = "unknown_arm"


@dataclass(frozen=True)
class LoopCounters:
    """A worker's loop counters as the metrics read them: totals since it started, and the fleet's levels."""

    impressions: int
    unrecorded: int
    accepted: int
    duplicate: int
    unknown_event: int
    not_in_event: int
    unavailable: int
    syncs: int
    dropped: int
    #: Fleet mode: the replica side's ``stats()`` (its counters and levels); empty on a node.
    fleet: Mapping[str, Any] = field(default_factory=dict)


async def arm_from_source(
    source: FeatureSource, arm_id: str, found: tuple[float, float, float, float] | None
) -> tuple[float, float, float, float]:
    """An arm's posterior as the source gives it, with the counts the loop ``found`` (None: not counted yet).

    Raises:
        UnknownArm: Never shown, and the source does not know it.
    """
    features = await source.fetch([arm_id])
    if features.known == 0 and found is None:
        raise UnknownArm(f"no arm {arm_id!r}: never shown, and the source does not know it")
    shown, got = (0, 0.0) if found is None else (found[2], found[3])
    alpha, beta = float(features.alpha[0]), float(features.beta[0])
    if count_invalid(features.alpha, features.beta):  # what /predict ranks it by: the prior
        alpha, beta = source.prior
    return alpha, beta, shown, got


class _EventIds:
    """Event ids from the OS's random source (``os.urandom``: the kernel's CSPRNG), read 4 KiB at a time: one system
    call per 256 ids, where a call per id (``getrandom``, which a loaded VM makes slow) cost a tenth of a W10 answer's
    Python. A forked child drops what its parent read, so that no two processes hand out the same ids."""

    POOL_BYTES = 4096
    ID_BYTES = 16

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0
        os.register_at_fork(after_in_child=self.clear)

    def clear(self) -> None:
        self.pool, self.at = b"", 0

    def draw(self) -> str:
        at = self.at
        if at + self.ID_BYTES > len(self.pool):
            self.pool, at = os.urandom(self.POOL_BYTES), 0
        self.at = at + self.ID_BYTES
        return self.pool[at : at + self.ID_BYTES].hex()


_event_ids = _EventIds()


class LoopBase:
    """What the node's loop and the fleet's share: one worker's holds in the node's ring, its fair share of them,
    its journal and decision log, its counters and series. Subclasses say where an answer's event and a reward go
    (``_record``, ``rewards``) and where an arm's counts are read (``read_arm``, ``top``); a loop that keeps
    segment counts (``counts_segments``) also where a segment's go (``_record_segment``, ``read_segment_arm``,
    ``top_segment``). The others refuse segments (``SegmentsUnavailable``)."""

    #: Whether this loop counts impressions and rewards per segment, so that answers may rank within one.
    counts_segments = False
    #: The native /predict over the node's table (``answered_native``), where answers rank from it; else None.
    native: NativeAnswer | None = None

    def __init__(self, node: Node, settings: Settings, *, apply_counts: bool) -> None:
        self.node = node
        self.arms = node.arms
        self.events = node.events
        self.apply_counts = apply_counts
        self.prior_alpha = settings.prior_alpha
        self.prior_beta = settings.prior_beta
        self.segment_weight = settings.segment_prior_weight
        #: Counts decay with this half-life (0: never); /arms reports them as numbers then, else as integers.
        self.half_life_s = settings.half_life_s
        self.window_s = settings.reward_window_s
        self.max_held_ids = settings.max_held_ids
        # The client share of the ring, counted per worker: each worker sees about 1/workers of a client's answers.
        share = settings.max_client_share / settings.workers
        self.holding = FairHolding(
            max(1, int(settings.max_held_events * share)),
            max(1, int(settings.max_held_members * share)),
            settings.reward_window_s,
        )
        self.new_arms = NewArmShares(max(1, int(settings.max_new_arms * share)))
        self._seeds = random.Random(secrets.randbits(64))
        name = f"{time.time_ns():x}-{os.getpid()}"
        self.journal = Journal(
            node.journal_dir,
            name,
            commit_delay_s=settings.commit_delay_s,
            sync_s=settings.impressions_sync_s,
            segment_bytes=settings.journal_segment_bytes,
            segment_age_s=settings.reward_window_s / 2,
            buffer_max_bytes=settings.journal_buffer_max_bytes,
            budget=node.journal_budget,
        )
        self.decisions: DecisionLog | None = None
        if settings.decision_log:
            self.decisions = DecisionLog(
                node.decisions_dir,
                name,
                file_bytes=settings.decision_log_file_bytes,
                max_bytes=settings.decision_log_max_bytes,
                sample_rate=settings.decision_log_sample,
                table=node.arms,
            )
        self.impressions = 0
        self.impressions_unrecorded = 0
        #: Impressions within a segment not counted for it: the segments' room in the arm table was full.
        self.segment_impressions_unrecorded = 0
        self.rewards_accepted = 0
        self.rewards_total = 0.0
        self.refusals = Refusals()
        # Per SERIES_STEP_S bucket: [bucket start, impressions, reward sum, accepted] of this worker.
        self.series: deque[list[float]] = deque(maxlen=SERIES_POINTS)

    async def start(self) -> None:
        self.journal.start()
        if self.decisions is not None:
            self.decisions.start()

    async def close(self) -> None:
        await self.journal.close()
        if self.decisions is not None:
            await asyncio.to_thread(self.decisions.close)

    @property
    def durable(self) -> bool:
        """Whether the journal takes what it is given (False once the disk refused)."""
        return self.journal.error is None

    @property
    def following(self) -> bool:
        """Whether the node's arm table holds the fleet's counts (the fan-out): then it ranks, not Bigtable's cache."""
        return False

    @staticmethod
    def new_event_id() -> str:
        """A fresh event id: 128 bits from the OS in hex (32 characters of the event id rule).

        Random, not a counter: an id says nothing of the ids before or after it, so a client cannot guess another
        client's event and reward it. Unique across workers, replicas and restarts with odds of 2**-64 at 2**32
        ids; a hold of an id still held is refused anyway, and the loop then draws another.
        """
        return _event_ids.draw()

    def new_seed(self) -> int:
        return self._seeds.getrandbits(64)

    async def claim(self, event_id: str, ids: list[str], segment: str | None = None) -> None:
        """Take a client's own event id before its answer (ranked within ``segment``, if any) is recorded
        (``answered`` with ``client_event_id``).

        On a node the ring decides in ``answered``, atomically across its workers, and this does nothing.
        """

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
        """Record an answer about to be sent: its event, its impressions, its decision; return the event id.

        A client's own event id (``client_event_id``) must have been through ``claim`` first. An answer ranked
        within ``segment`` counts its impressions for the segment too (``segment_rows``: the rows of the candidates'
        segment keys, from the source), and its event remembers the segment for its rewards.

        Raises:
            EventIdInUse: ``client_event_id`` and the node still holds an event with that id.
            SinkUnavailable: In fleet mode, the event could not be kept (Pub/Sub or Bigtable away too long).
        """
        self._check()
        now = time.time()
        # Only the first max_held_ids ids are held: impressions and rewardable. The rest are returned, not counted.
        cap = self.max_held_ids
        held, held_ids = (ranking, ids) if len(ids) <= cap else (ranking[:cap], ids[:cap])
        holds = self._admit(len(held_ids), now)
        client = CLIENT.get()
        new = self._new_arms(held_ids, rows, held)
        try:
            self.new_arms.admit(client, new)
        except TooManyNewArms:
            self.refusals.too_many_new_arms += 1
            raise
        tag = 0 if segment is None else self._segment_tag(segment)
        while not self.events.hold(event_id, candidates, held, now, tag):
            if client_event_id:
                self.refusals.event_id_in_use += 1
                raise EventIdInUse(f"event_id {event_id!r} is still held; send a new one", field="event_id")
            # Our own id was held already: only by a client that sent it as its own, or by odds of 2**-128.
            event_id = self.new_event_id()
        self.holding.add(holds, len(held_ids), now)
        self.new_arms.add(client, new)
        if segment is None:
            self._record(event_id, client_event_id, candidates, rows, held, held_ids, now)
        else:
            self._record_segment(
                event_id, client_event_id, candidates, rows, segment, segment_rows, held, held_ids, now
            )
        self.impressions += len(held_ids)
        self._bucket(now)[1] += len(held_ids)
        log = self.decisions
        if log is not None and log.takes(event_id):
            log.append(
                decisions.encode(
                    event_id,
                    now,
                    user_id,
                    seed,
                    top_k,
                    body,
                    alpha,
                    beta,
                    ranking,
                    segment,
                    candidates=candidates,
                    rows=rows,
                    sample_rate=log.sample_rate,
                )
            )
        return event_id

    def answered_native(self, native: NativeAnswer) -> bytes:
        """``answered`` for the answer ``native.rank`` ranked, and its bytes: the same holds, counts and records,
        with nothing per candidate done in Python.

        Raises:
            TooManyEvents, TooManyNewArms: The client's share is full (429).
            EventIdInUse: The body's own event id is held still (409).
        """
        now = time.time()
        held = native.held
        holds = self._admit(held, now)
        client = CLIENT.get()
        new = native.new_arms
        try:
            self.new_arms.admit(client, new)
        except TooManyNewArms:
            self.refusals.too_many_new_arms += 1
            raise
        event_id = native.event_id
        claimed = event_id is not None
        if event_id is None:
            event_id = self.new_event_id()
        tag = native.segment_tag()
        while not native.hold(event_id, now, tag):
            if claimed:
                self.refusals.event_id_in_use += 1
                raise EventIdInUse(f"event_id {event_id!r} is still held; send a new one", field="event_id")
            event_id = self.new_event_id()
        self.holding.add(holds, held, now)
        self.new_arms.add(client, new)
        failed, segment_failed, record, answer = native.commit(event_id, now)
        self.impressions_unrecorded += failed
        self.segment_impressions_unrecorded += segment_failed
        self.journal.event_record(record)
        self.impressions += held
        self._bucket(now)[1] += held
        log = self.decisions
        if log is not None and log.takes(event_id):
            log.append(native.decision(event_id, now, log.sample_rate))
        return answer

    def _check(self) -> None:
        """Refuse an answer before anything of it is held (fleet mode: when its events cannot be kept)."""

    def _new_arms(self, held_ids: list[str], rows: npt.NDArray[np.int32] | None, held: npt.NDArray[np.int64]) -> int:
        """How many of an answer's held ids would be new rows in the node's arm table (0 where the loop adds none)."""
        return 0

    def _segments_unavailable(self) -> SegmentsUnavailable:
        return SegmentsUnavailable(
            "segments are counted only by a node's own loop over an embedded source (demo or csv:) and by the fleet's "
            "learners; this one keeps no segment counts",
            field="segment",
        )

    def _segment_tag(self, segment: str) -> int:
        """The word an event ranked within ``segment`` is held with, that its rewards find the segment by."""
        raise self._segments_unavailable()

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
        """``_record`` for an answer ranked within ``segment``: its impressions count for the segment too."""
        raise self._segments_unavailable()

    async def read_segment_arm(
        self, arm_id: str, segment: str, segments: SegmentSource | None = None
    ) -> tuple[float, float, float, float]:
        """(alpha, beta, impressions, rewards) of an arm within a segment (``UnknownArm`` if neither is known)."""
        raise self._segments_unavailable()

    async def top_segment(
        self, n: int, order: str, segment: str, executor: Executor
    ) -> tuple[list[dict[str, Any]], int, bool | None]:
        """``top`` within a segment: the arms counted in it, ranked by their posteriors within it."""
        raise self._segments_unavailable()

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
        """Keep a held answer's event and count its impressions where this loop counts them."""
        raise NotImplementedError

    async def reward(self, event_id: str, arm_id: str, value: float) -> bool:
        """Record a reward durably; True if accepted now, False if (event_id, arm_id) was already rewarded.

        Raises:
            UnknownEvent, NotInEvent: the reward does not match a held event.
            JournalUnavailable: the disk refuses; nothing was recorded.
        """
        (outcome,) = await self.rewards([(event_id, arm_id, value)])
        if isinstance(outcome, MabError):
            raise outcome
        return outcome

    async def rewards(self, items: list[tuple[str, str, float]]) -> list[bool | MabError]:
        """Check rewards ``(event_id, id, reward)`` and record the accepted ones durably."""
        raise NotImplementedError

    def _admit(self, n: int, now: float) -> ClientHolds:
        """The holds of this request's client, if an event of ``n`` ids fits its budget (``FairHolding.admit``)."""
        try:
            return self.holding.admit(CLIENT.get(), n, now)
        except TooManyEvents:
            self.refusals.too_many_events += 1
            raise

    def _accepted(self, accepted: list[tuple[str, str, float]], now: float) -> None:
        total = sum(value for _, _, value in accepted)
        self.rewards_accepted += len(accepted)
        self.rewards_total += total
        bucket = self._bucket(now)
        bucket[2] += total
        bucket[3] += len(accepted)

    def _unknown_event(self, event_id: str) -> UnknownEvent:
        self.refusals.unknown_event += 1
        return UnknownEvent(
            f"no event {event_id!r} is held: unknown, or older than the reward window of {self.window_s:g} s",
            field="event_id",
        )

    def _not_in_event(self, event_id: str, arm_id: str) -> NotInEvent:
        self.refusals.not_in_event += 1
        return NotInEvent(
            f"id {arm_id!r} is not among the held ids of event {event_id!r}: not returned by it, or ranked below "
            f"its first {self.max_held_ids} ids, which alone are held (max_held_ids)",
            field="id",
        )

    def stats(self) -> dict[str, Any]:
        now = time.time()
        held = self.events.stats(now)
        recent = [b for b in self.series if b[0] >= now - 60]
        per_s = sum(b[3] for b in recent) / 60.0
        return {
            "events_held": held["held"],
            "events_evicted_early": held["evicted_early"],
            "impressions_total": self.impressions,
            "impressions_unrecorded": self.impressions_unrecorded,
            "segment_impressions_unrecorded": self.segment_impressions_unrecorded,
            "rewards_total": self.rewards_total,
            "rewards_accepted": self.rewards_accepted,
            "rewards_per_s": per_s,
            "refusals": {
                "duplicate": self.refusals.duplicate,
                "unknown_event": self.refusals.unknown_event,
                "not_in_event": self.refusals.not_in_event,
                "unavailable": self.refusals.unavailable,
                "event_id_in_use": self.refusals.event_id_in_use,
                "too_many_events": self.refusals.too_many_events,
                "too_many_new_arms": self.refusals.too_many_new_arms,
            },
            "clients_holding": self.holding.clients(),
            **self._more_stats(),
            "journal": {
                "error": self.journal.error,
                "syncs": self.journal.syncs,
                "dropped_events": self.journal.dropped_events,
                "held_bytes": self.journal.held_bytes,
            },
            "series": [
                {"t": int(b[0]), "impressions": int(b[1]), "rewards": b[2], "accepted": int(b[3])} for b in self.series
            ],
        }

    def _more_stats(self) -> dict[str, Any]:
        """What ``stats`` adds for this kind of loop (fleet mode: ``fleet``)."""
        return {}

    def counters(self) -> LoopCounters:
        """The counters the metrics copy (``metrics._LoopCounters``)."""
        refusals = self.refusals
        return LoopCounters(
            impressions=self.impressions,
            unrecorded=self.impressions_unrecorded,
            accepted=self.rewards_accepted,
            duplicate=refusals.duplicate,
            unknown_event=refusals.unknown_event,
            not_in_event=refusals.not_in_event,
            unavailable=refusals.unavailable,
            syncs=self.journal.syncs,
            dropped=self.journal.dropped_events,
            fleet=self._fleet_counters(),
        )

    def _fleet_counters(self) -> Mapping[str, Any]:
        return {}

    def _bucket(self, now: float) -> list[float]:
        start = now - now % SERIES_STEP_S
        series = self.series
        if not series or series[-1][0] != start:
            series.append([start, 0, 0.0, 0])
        return series[-1]


class NodeLoop(LoopBase):
    """One worker's loop over the node's shared tables, with its own journal and decision log."""

    def __init__(self, node: Node, settings: Settings, *, apply_counts: bool) -> None:
        super().__init__(node, settings, apply_counts=apply_counts)
        # Segments rank by the loop's counts: only where those counts rank at all; so does the native answer.
        self.counts_segments = apply_counts
        if apply_counts:
            self.native = NativeAnswer(
                self.arms,
                self.events,
                settings.max_candidates,
                self.prior_alpha,
                self.prior_beta,
                self.segment_weight,
                self.max_held_ids,
            )

    def _new_arms(self, held_ids: list[str], rows: npt.NDArray[np.int32] | None, held: npt.NDArray[np.int64]) -> int:
        if rows is not None:  # the embedded source looked the candidates up in this table: -1 is not in it
            return int(np.count_nonzero(rows[held] < 0))
        arms = self.arms
        return sum(1 for id_ in held_ids if arms.get(id_) is None)

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
        self._count(candidates, rows, held, now)
        self.journal.event(now, event_id, held_ids)

    def _count(
        self, candidates: list[str], rows: npt.NDArray[np.int32] | None, held: npt.NDArray[np.int64], now: float
    ) -> None:
        if rows is None:
            rows = np.full(len(candidates), -1, dtype=np.int32)
        self.impressions_unrecorded += self.arms.add_impressions(
            candidates, rows, held, self.prior_alpha, self.prior_beta, now
        )

    def _segment_tag(self, segment: str) -> int:
        # The row of the segment's own key, plus one (0: the segments' room is full, and its rewards count only for
        # the arms). A reward reads the segment back from the row's key.
        return self.arms.find_or_insert(segment_key(segment), self.prior_alpha, self.prior_beta) + 1

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
        self._count(candidates, rows, held, now)
        if segment_rows is None:
            segment_rows = np.full(len(candidates), -1, dtype=np.int32)
        self.segment_impressions_unrecorded += self.arms.add_impressions(
            candidates, segment_rows, held, self.prior_alpha, self.prior_beta, now, segment
        )
        self.arms.add(segment_key(segment), len(held_ids), 0.0, self.prior_alpha, self.prior_beta, now)
        self.journal.event(now, event_id, held_ids, segment)

    async def rewards(self, items: list[tuple[str, str, float]]) -> list[bool | MabError]:
        """Check rewards ``(event_id, id, reward)`` and record the accepted ones durably, in one group commit.

        Returns:
            Per item: True (accepted now), False (a duplicate: counted once already), or the refusal
            (UnknownEvent, NotInEvent), in order.

        Raises:
            JournalUnavailable: the disk refuses; none of these rewards was recorded.
        """
        now = time.time()
        outcomes: list[bool | MabError] = []
        accepted: list[tuple[str, str, float]] = []
        segments: list[str | None] = []
        refusals = self.refusals
        for event_id, arm_id, value in items:
            status, tag = self.events.reward_tag(event_id, arm_id, now)
            if status == _events.ACCEPTED:
                accepted.append((event_id, arm_id, value))
                segments.append(self._segment_of(tag))
                outcomes.append(True)
            elif status == _events.DUPLICATE:
                refusals.duplicate += 1
                outcomes.append(False)
            elif status == _events.UNKNOWN_EVENT:
                outcomes.append(self._unknown_event(event_id))
            else:
                outcomes.append(self._not_in_event(event_id, arm_id))
        if not accepted:
            return outcomes
        try:
            await self.journal.rewards(now, accepted, segments if any(segments) else None)
        except JournalUnavailable:
            for event_id, arm_id, _ in accepted:
                self.events.unmark(event_id, arm_id)
            refusals.unavailable += len(accepted)
            raise
        # Durable: the marks, pending in this process's name until now, become final. Had this process died before
        # the journal had them, a reward sent again would have taken them over.
        for event_id, arm_id, _ in accepted:
            self.events.confirm(event_id, arm_id)
        # Counted once durable (a millisecond later), so a refused reward never shows. An arm the table could not
        # hold at impression time (full) has no impression to pair the reward with: it is journaled, not counted.
        prior = self.prior_alpha, self.prior_beta
        for (_, arm_id, value), segment in zip(accepted, segments):
            if self.arms.get(arm_id, now) is not None:
                self.arms.add(arm_id, 0, value, *prior, now)
            if segment is not None:
                pair = pair_key(segment, arm_id)
                if self.arms.get(pair, now) is not None:
                    self.arms.add(pair, 0, value, *prior, now)
                self.arms.add(segment_key(segment), 0, value, *prior, now)
        self._accepted(accepted, now)
        return outcomes

    def _segment_of(self, tag: int) -> str | None:
        """The segment of an event held with ``tag`` (``_segment_tag``), None for none."""
        if tag == 0:
            return None
        return self.arms.id_at(tag - 1)[len(KEY_SEPARATOR) :]

    def _count_value(self, value: float) -> float:
        """A count as /arms reports it: an integer without decay (as it is), else the weighted sum."""
        return value if self.half_life_s else int(value)

    def arm(self, arm_id: str) -> tuple[float, float, float, float] | None:
        """(alpha, beta, impressions, rewards) of an arm as the loop counts it, None if the table lacks it."""
        found = self.arms.get(arm_id)
        if found is None:
            return None
        alpha0, beta0, shown, got, _ = found
        if not self.apply_counts:
            return alpha0, beta0, self._count_value(shown), got
        return *posterior(alpha0, beta0, shown, got), self._count_value(shown), got

    def leading(self, n: int, order: str) -> tuple[list[dict[str, Any]], int]:
        """The ``n`` leading arms by ``order`` (mean, impressions or rewards) and how many arms the table holds."""
        records = self.arms.records()
        counts = self.arms.counts()
        rows = np.flatnonzero((records["flags"][: len(counts[0])] & (_arms.FLAG_WASTED | _arms.FLAG_SEGMENT)) == 0)
        table = records[rows]
        shown, got = counts[0][rows], counts[1][rows]
        if self.apply_counts:
            alpha, beta = posterior(table["alpha0"], table["beta0"], shown, got)
        else:
            alpha, beta = table["alpha0"], table["beta0"]
        whole = not self.half_life_s
        leading = leading_arms(lambda i: self.arms.id_at(int(rows[i])), alpha, beta, shown, got, n, order, whole)
        return leading, len(rows)

    async def read_arm(self, arm_id: str, source: FeatureSource) -> tuple[float, float, float, float]:
        """(alpha, beta, impressions, rewards) of an arm as this node ranks it: the loop's counts, or the source's
        posterior where the loop has not counted the arm or the store computes the posteriors itself.

        Raises:
            UnknownArm: Never shown, and the source does not know it.
        """
        found = self.arm(arm_id)
        if found is None or not self.apply_counts:
            return await arm_from_source(source, arm_id, found)
        return found

    async def top(self, n: int, order: str, executor: Executor) -> tuple[list[dict[str, Any]], int, bool | None]:
        """``leading`` drawn on ``executor``, off the event loop; never partial (None: the node reads all arms)."""
        leading, total = await asyncio.get_running_loop().run_in_executor(executor, self.leading, n, order)
        return leading, total, None

    async def read_segment_arm(
        self, arm_id: str, segment: str, segments: SegmentSource | None = None
    ) -> tuple[float, float, float, float]:
        """(alpha, beta, impressions, rewards) of an arm within a segment, as ``/predict`` ranks it there: by this
        table's counts, or where a store ranks (``segments``, the loop counting only) by the store's posterior, beside
        this node's counts.

        Raises:
            UnknownArm: Neither the table (nor the store) knows the arm or its row within the segment.
        """
        now = time.time()
        alpha, beta, known, _, pair_rows = self.arms.gather_segment(
            [arm_id], segment, self.segment_weight, self.prior_alpha, self.prior_beta, now
        )
        if segments is not None and not self.apply_counts:
            stored = await segments.fetch_segment([arm_id], segment)
            alpha, beta, known = stored.alpha, stored.beta, known + stored.known
        if known == 0 and pair_rows[0] < 0:
            raise UnknownArm(f"no arm {arm_id!r}: never shown, and not in the catalogue")
        found = self.arms.get(pair_key(segment, arm_id), now)
        shown, got = (0.0, 0.0) if found is None else (found[2], found[3])
        return float(alpha[0]), float(beta[0]), self._count_value(shown), got

    def leading_segment(self, n: int, order: str, segment: str) -> tuple[list[dict[str, Any]], int]:
        """The ``n`` leading arms within ``segment`` by ``order``, among the arms shown in it, and how many those
        are."""
        records = self.arms.records()
        shown_all, got_all = self.arms.counts()
        prefix = pair_key(segment, "")
        rows = [
            row
            for row in np.flatnonzero((records["flags"][: len(shown_all)] & _arms.FLAG_SEGMENT) != 0).tolist()
            if records[row]["flags"] & _arms.FLAG_WASTED == 0
        ]
        pairs = [(row, key) for row in rows if (key := self.arms.id_at(row)).startswith(prefix)]
        if not pairs:
            return [], 0
        ids = [key[len(prefix) :] for _, key in pairs]
        at = np.array([row for row, _ in pairs])
        shown, got = shown_all[at], got_all[at]
        alpha, beta, _, _ = self.arms.gather(ids, self.prior_alpha, self.prior_beta)
        alpha, beta = backed_off(self.segment_weight, alpha, beta, shown, got)
        leading = leading_arms(lambda i: ids[i], alpha, beta, shown, got, n, order, not self.half_life_s)
        return leading, len(ids)

    async def top_segment(
        self, n: int, order: str, segment: str, executor: Executor
    ) -> tuple[list[dict[str, Any]], int, bool | None]:
        leading, total = await asyncio.get_running_loop().run_in_executor(
            executor, self.leading_segment, n, order, segment
        )
        return leading, total, None


def leading_arms(
    id_at: Callable[[int], str],
    alpha: npt.NDArray[np.float64],
    beta: npt.NDArray[np.float64],
    shown: npt.NDArray[np.float64],
    got: npt.NDArray[np.float64],
    n: int,
    order: str,
    whole: bool = True,
) -> list[dict[str, Any]]:
    """The ``n`` leading arms by ``order`` (mean, impressions or rewards), with 95% intervals; ``id_at(i)`` names
    the arm of position ``i``. Impressions are reported as integers if ``whole``, else as the (decayed) numbers."""
    total = len(alpha)
    if total == 0:
        return []
    key = {"impressions": shown, "rewards": got}.get(order)
    if key is None:
        key = alpha / (alpha + beta)
    n = min(n, total)
    leading = np.argpartition(-key, n - 1)[:n] if n < total else np.arange(total)
    leading = leading[np.lexsort((leading, -key[leading]))]
    low, high = _intervals(alpha[leading], beta[leading])
    return [
        {
            "id": id_at(i),
            "alpha": float(alpha[i]),
            "beta": float(beta[i]),
            "impressions": int(shown[i]) if whole else float(shown[i]),
            "rewards": float(got[i]),
            "mean": float(alpha[i] / (alpha[i] + beta[i])),
            "low": float(lo),
            "high": float(hi),
        }
        for i, lo, hi in zip(leading.tolist(), low.tolist(), high.tolist())
    ]


def _intervals(alpha: npt.NDArray[np.float64], beta: npt.NDArray[np.float64]) -> tuple[Any, Any]:
    """95% equal-tailed intervals of Beta(alpha, beta), from 4,000 draws each with our own sampler (fixed seed,
    so the page does not flicker): the 2.5% and 97.5% quantiles are within about 0.005 of the exact ones."""
    from mab_service.policy.sampler import sample_beta

    if len(alpha) == 0:
        return np.empty(0), np.empty(0)
    draws = 4000
    samples = sample_beta(np.repeat(alpha, draws), np.repeat(beta, draws), seed=12345).reshape(len(alpha), draws)
    low, high = np.quantile(samples, [0.025, 0.975], axis=1)
    return low, high
