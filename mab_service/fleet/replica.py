"""A serving replica's side of the fleet loop: events and rewards to Pub/Sub, event membership in Bigtable.

With ``--features bigtable:TABLE --events pubsub:TOPIC`` the posteriors come from the counts the learners keep in
Bigtable, as the node's copy of them that the learners' fan-out keeps current (``fanout.CountsFollower``, started and
stopped here; with ``fleet_follow`` off, ``features.bigtable.BigtableSource`` behind the cache), and this replica
adds nothing to them itself:

- every answer is published as an event record (its impressions) through ``pubsub.PubSubSink``, and its returned
  ids are written to the event's **membership row** ``\\x00e/<event_id>`` in the same table (family ``e``, cell
  ``i``: the ids as JSON, with the answer's time as the cell's timestamp; cell ``s``: the segment, for an answer
  ranked within one), batched into MutateRows calls;
- a reward, on whichever replica it arrives, is checked against that row (unknown or expired event: 404; an id the
  event did not return: 422; a reward already claimed: 200 duplicate), then **claimed** in the row (``e:r/<id>``,
  one CheckAndMutateRow writing the reward and a token naming this claim unless the cell is there), and only then
  published: a copy posted to any replica, at once or later, finds the claim and is answered ``duplicate``, so each
  reward is in one message and the learners need no marker for it. 202 means the reward's message is stored by
  Pub/Sub. A claimed reward is never dropped: if Pub/Sub does not store it in time the answer is 503, and the sink
  keeps it in its message and sends it again until Pub/Sub does (a retry is answered ``duplicate``).

Membership lives in Bigtable, not in a replica's memory, so it scales with the table, and family ``e``'s
garbage-collection rule (``mab-service setup``) bounds it. A row is written within ``events_max_delay_s`` of the
answer; a reward for an event whose row is not there yet is looked up again for ``event_propagation_s`` before it is
called unknown, so a client that rewards at once on another replica is not refused.

When a dependency is down (docs/fleet.md, "When Pub/Sub or Bigtable is away"): events and membership rows wait in
bounded buffers and are sent again; once a buffer is full, /predict answers 503 ``events_unavailable`` rather than
answer something that would not be counted; /reward answers 503 while Pub/Sub does not store its message or Bigtable
cannot be read, or a claim's outcome cannot be known (it is settled in the background: published if it was this
replica's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from mab_service.errors import FeatureSourceError, MabError
from mab_service.features.bigtable import BigtableSource, Counts, read_shards
from mab_service.fleet.fanout import CountsFollower
from mab_service.fleet.requests import (
    CHECK_AND_MUTATE_ROW,
    MUTATE_ROWS,
    claim_event,
    membership_entry,
    quote,
    table_field,
)
from mab_service.fleet.schema import (
    EVENT_ROW_PREFIX,
    EVENTS_FAMILY,
    MEMBERS,
    REWARDED_PREFIX,
    SEGMENT,
    TablePath,
    event_row,
    rewarded,
    segment_row,
    segment_rows_prefix,
)
from mab_service.fleet.sink import PubSubSink, SinkUnavailable
from mab_service.ids import segment_problem

logger = logging.getLogger("mab_service.fleet")

#: Membership rows per MutateRows call at most.
ROWS_PER_CALL = 1000
#: Membership rows that may wait per pending Pub/Sub message allowed (~600 bytes each).
ROWS_PER_PENDING = 100
#: How often a reward for an event not yet in Bigtable looks again.
LOOKUP_RETRY_S = 0.05
#: Arms /arms?top reads at most in fleet mode.
SCAN_ROWS = 10_000


def _segment(value: bytes) -> str | None:
    """The segment of a membership row's ``e:s`` cell; None if it is not one (then the reward counts for the arm
    alone)."""
    try:
        segment = value.decode()
    except UnicodeDecodeError:
        return None
    return segment if segment_problem(segment) is None else None


class BigtableUnavailable(MabError):
    """Bigtable could not be read or written in time: nothing was recorded; the client may retry."""

    status_code = 503
    code = "bigtable_unavailable"


@dataclass
class Event:
    """An event's membership row as read back: the ids it returned, when, the ids already rewarded, and the segment
    it was ranked within (None: none)."""

    ids: frozenset[str]
    t: float
    rewarded: frozenset[str]
    segment: str | None = None


class MembershipRows:
    """Writes events' membership rows in MutateRows calls of up to ``ROWS_PER_CALL``, every ``max_delay_s``.

    Rows Bigtable refuses are sent again every ``retry_s``; at most ``max_pending`` wait (queued, in flight or to be
    sent again), and ``check`` raises past it.
    """

    def __init__(self, path: TablePath, *, max_delay_s: float, max_pending: int, retry_s: float = 1.0) -> None:
        self.path = path
        self.max_delay_s = max_delay_s
        self.max_pending = max_pending
        self.retry_s = retry_s
        self.written = 0
        self.failed = 0
        self.pending = 0
        self.undelivered = 0
        """Rows still not written when ``close`` gave up on them."""
        self._queue: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._client: Any = None
        self._response: Any = None
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._head = b""
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, client: Any) -> None:
        from google.cloud.bigtable_v2.types import bigtable as messages

        self._head = table_field(str(self.path))
        self._metadata = self.path.routing
        self._client = client
        self._response = messages.MutateRowsResponse.pb().FromString

    def check(self) -> None:
        if self.pending >= self.max_pending:
            raise SinkUnavailable(f"{self.pending} event rows are not yet written to Bigtable {self.path}; retry later")

    def add(self, entry: bytes) -> None:
        self._queue.append(entry)
        self.pending += 1
        if len(self._queue) >= ROWS_PER_CALL:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._queue:
            entries, self._queue = self._queue, []
            task = asyncio.get_running_loop().create_task(self._write(entries))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, entries: list[bytes]) -> None:
        while True:
            failed: list[bytes] = []
            try:
                # The stub is taken from the client's channel per call: the client replaces its channel every
                # 35-45 minutes and closes the old one.
                mutate_rows = self._client.transport.grpc_channel.unary_stream(
                    MUTATE_ROWS, request_serializer=None, response_deserializer=self._response
                )
                call = mutate_rows(self._head + b"".join(entries), timeout=10.0, metadata=self._metadata)
                async for response in call:
                    failed.extend(entries[e.index] for e in response.entries if e.status.code != 0)
            except Exception as exc:
                logger.warning("writing %d event rows to %s failed: %s", len(entries), self.path, exc)
                failed = entries
            done = len(entries) - len(failed)
            self.written += done
            self.pending -= done
            if not failed:
                return
            self.failed += len(failed)
            entries = failed  # SetCell at the same timestamp: writing a row twice leaves it as once
            await asyncio.sleep(self.retry_s)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued now and wait, up to ``timeout_s``, for every row; count and log what is left."""
        self.flush()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                self.undelivered = self.pending
                logger.error(
                    "%d event rows were not written to %s within %.1f s at close: rewards for their events will be "
                    "refused as unknown",
                    self.pending,
                    self.path,
                    timeout_s,
                )


class Fleet:
    """A replica's events and rewards to the fleet's topic and table.

    Args:
        topic: ``projects/P/topics/T``.
        table: ``projects/P/instances/I/tables/T``.
        window_s: The reward window: a reward for an older event is refused as unknown.
        prior_alpha, prior_beta: The prior of every arm (``/arms/{id}``'s posterior).
        max_delay_s: How long an event waits before its message and its row are sent.
        max_pending: Messages (Pub/Sub) and, times ``ROWS_PER_PENDING``, rows (Bigtable) waiting at most.
        max_pending_bytes: Bytes of the messages waiting for Pub/Sub at most.
        shutdown_timeout_s: How long ``close`` waits for Pub/Sub and Bigtable to take what this replica answered.
        propagation_s: How long a reward for an event whose row is not in Bigtable yet waits for it.
        timeout_s: Deadline of one Bigtable read or check.
        publish_timeout_s: How long a publish may take before a reward waiting for it is answered 503.
        half_life_s: The fleet's half-life (0: none): answers are published with their times, counts read as
            forward-decayed sums, and the table's half-life must be this one (``start`` exits otherwise).
    """

    def __init__(
        self,
        topic: str,
        table: str,
        *,
        window_s: float,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        max_delay_s: float = 0.02,
        max_pending: int = 1000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        propagation_s: float = 1.0,
        timeout_s: float = 2.0,
        publish_timeout_s: float = 5.0,
        shutdown_timeout_s: float = 30.0,
        half_life_s: float = 0.0,
    ) -> None:
        self.path = TablePath.parse(table)
        self.window_s = window_s
        self.propagation_s = propagation_s
        self.timeout_s = timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.sink = PubSubSink(
            topic,
            max_delay_s=max_delay_s,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
            publish_timeout_s=publish_timeout_s,
            half_life_s=half_life_s,
        )
        self.rows = MembershipRows(self.path, max_delay_s=max_delay_s, max_pending=max_pending * ROWS_PER_PENDING)
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta
        # One client for the counts, the membership rows and the marks.
        self.source = BigtableSource(table, prior_alpha, prior_beta, timeout_s=timeout_s, half_life_s=half_life_s)
        self.claims_unknown = 0
        """Reward claims whose outcome was unknown (Bigtable timed out), read back."""
        self.claims_refused = 0
        self.replica_id = secrets.token_hex(8)
        """Names this replica's reward claims (with a counter)."""
        self._claims = 0
        self._settling: set[asyncio.Task[None]] = set()
        self._table: Any = None
        self._table_name = table_field(str(self.path))
        self._claimed: Any = None
        self.follower: CountsFollower | None = None
        """The node's copy of the counts, kept by the learners' fan-out (``fleet.fanout``); None: the answers'
        counts are read from Bigtable behind the cache."""

    def follow(self, follower: CountsFollower) -> None:
        """Keep the node's arm table current from the fan-out while this replica runs (started in ``start``)."""
        self.follower = follower

    async def start(self) -> None:
        """Connect to Pub/Sub and Bigtable.

        Raises:
            FeatureSourceError: If the client libraries are missing or the table cannot be read.
        """
        from google.cloud.bigtable.data import ReadRowsQuery, SetCell, row_filters
        from google.cloud.bigtable_v2.types import bigtable as messages

        self._query, self._set, self._filters = ReadRowsQuery, SetCell, row_filters
        self._claimed = messages.CheckAndMutateRowResponse.pb().FromString
        await self.source.start()
        self._table = self.source.table
        self.rows.start(self.source.client)
        try:
            shards = await read_shards(self._table, self.timeout_s * 5)
        except Exception as exc:
            raise FeatureSourceError(f"cannot read the fleet's shard count from Bigtable {self.path}: {exc}") from None
        self.sink.start(shards)
        if self.follower is not None:
            await self.follower.start(self.source)

    async def close(self) -> None:
        """Deliver what this replica answered: the pending batch and the outbox to Pub/Sub and the membership rows
        to Bigtable, both at once, within ``shutdown_timeout_s``; what is left is logged and counted (``stats``)."""
        timeout_s = self.shutdown_timeout_s
        await asyncio.gather(self.sink.close(timeout_s), self.rows.close(timeout_s))
        if self.follower is not None:
            await self.follower.close()
        await self.source.close()

    def check(self) -> None:
        """Raise ``SinkUnavailable`` (503) if an answer's event could not be kept: a buffer is full."""
        self.sink.check()
        self.rows.check()

    def event(
        self, event_id: str, ids: list[str], t: float, *, claimed: bool = False, segment: str | None = None
    ) -> None:
        """Queue an answered event (ranked within ``segment``, if any): its impressions to Pub/Sub, its membership to
        Bigtable (unless ``claim`` wrote it already). Never waits."""
        self.sink.event(event_id, ids, t, segment)
        if not claimed:
            self.rows.add(membership_entry(event_id, ids, t, segment))

    async def claim(self, event_id: str, ids: list[str], t: float, segment: str | None = None) -> bool:
        """Take a client's own event id for the whole fleet: write the event's membership row unless it exists.

        One CheckAndMutateRow, atomic in Bigtable: of any replicas claiming one id, exactly one gets True. A row
        stays until family ``e``'s garbage collection removes it, so an id is taken for at least the reward window
        (longer, until the collection runs). The service's own ids are random and need no claim.

        Returns:
            True if this call wrote the row; False if the id is taken.

        Raises:
            BigtableUnavailable: If Bigtable did not answer in time (nothing is known to be written).
        """
        try:
            call = self.source.client.transport.grpc_channel.unary_unary(
                CHECK_AND_MUTATE_ROW, request_serializer=None, response_deserializer=self._claimed
            )
            response = await call(
                claim_event(self._table_name, event_id, ids, t, segment),
                timeout=self.timeout_s,
                metadata=self.path.routing,
            )
        except Exception as exc:
            raise BigtableUnavailable(f"cannot claim event {event_id!r} in Bigtable {self.path}: {exc}") from None
        if response.predicate_matched:
            self.claims_refused += 1
            return False
        return True

    async def read_events(self, event_ids: list[str]) -> dict[str, Event]:
        """The membership rows of ``event_ids`` that exist; rows not there yet are looked for again for
        ``propagation_s`` (they may be on their way from another replica).

        Raises:
            BigtableUnavailable: If Bigtable cannot be read.
        """
        found: dict[str, Event] = {}
        missing = set(event_ids)
        deadline = time.monotonic() + self.propagation_s
        while True:
            keys: list[str | bytes] = [event_row(e) for e in missing]
            try:
                rows = await self._table.read_rows(
                    self._query(row_keys=keys, row_filter=self._filters.FamilyNameRegexFilter(EVENTS_FAMILY)),
                    operation_timeout=self.timeout_s,
                )
            except Exception as exc:
                raise BigtableUnavailable(f"cannot read events from Bigtable {self.path}: {exc}") from None
            for row in rows:
                event_id = row.row_key[len(EVENT_ROW_PREFIX) :].decode()
                ids: frozenset[str] = frozenset()
                t = 0.0
                marked = []
                segment = None
                for cell in row.cells:
                    if cell.qualifier == MEMBERS:
                        ids, t = frozenset(orjson.loads(cell.value)), cell.timestamp_micros / 1e6
                    elif cell.qualifier == SEGMENT:
                        segment = _segment(cell.value)
                    elif cell.qualifier.startswith(REWARDED_PREFIX):
                        marked.append(cell.qualifier[len(REWARDED_PREFIX) :].decode())
                if ids:
                    found[event_id] = Event(ids, t, frozenset(marked), segment)
                    missing.discard(event_id)
            if not missing or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(LOOKUP_RETRY_S)

    async def claim_rewards(self, accepted: list[tuple[str, str, float, str | None]]) -> list[bool]:
        """Claim each reward ``(event_id, id, reward, segment)`` on its event's row before it is published: per
        reward, True if this replica claimed it (it must be published), False if a copy posted anywhere claimed it
        first (a duplicate).

        A claim is one CheckAndMutateRow: unless the row has ``e:r/<id>``, write it with the reward and a token naming
        this claim. A claim whose outcome is unknown (Bigtable timed out) is read back: the cell holds this claim's
        token (claimed: publish), another's (a duplicate) or nothing (claimed again). Claimed rewards are queued
        for Pub/Sub here, before any other claim's failure is raised, so none is dropped.

        Raises:
            SinkUnavailable: If the outbox is full (nothing was claimed).
            BigtableUnavailable: If a claim's outcome could not be known; it is settled in the background (published
                if it was this replica's), and a retry of the reward is answered ``duplicate`` once it is.
        """
        self.sink.check()
        outcomes = await asyncio.gather(*(self._claim(*reward) for reward in accepted), return_exceptions=True)
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failed is not None:
            for reward, outcome in zip(accepted, outcomes):
                if outcome is True:
                    self._queue_reward(*reward)
            raise failed
        return [outcome is True for outcome in outcomes]

    async def _claim(self, event_id: str, arm_id: str, value: float, segment: str | None) -> bool:
        self._claims += 1
        token = f"{self.replica_id}/{self._claims}"
        f = self._filters
        qualifier = rewarded(arm_id)
        predicate = f.RowFilterChain(
            [f.FamilyNameRegexFilter(EVENTS_FAMILY), f.ColumnQualifierRegexFilter(b"^" + quote(qualifier) + b"$")]
        )
        cell = self._set(EVENTS_FAMILY, qualifier, orjson.dumps([value, token]))
        for _ in range(3):
            try:
                return not await self._table.check_and_mutate_row(
                    event_row(event_id), predicate, false_case_mutations=[cell], operation_timeout=self.timeout_s
                )
            except Exception as exc:
                self.claims_unknown += 1
                logger.warning("claiming a reward of event %s: outcome unknown (%s); reading it back", event_id, exc)
            try:
                holder = await self._claim_holder(event_id, qualifier)
            except Exception as exc:
                task = asyncio.get_running_loop().create_task(
                    self._settle_claim(event_id, arm_id, value, segment, token)
                )
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)
                why = f"cannot claim a reward of event {event_id!r} in {self.path}: {exc}"
                raise BigtableUnavailable(why) from None
            if holder is not None:
                return holder == token
        raise BigtableUnavailable(f"cannot claim a reward of event {event_id!r} in {self.path}")

    async def _claim_holder(self, event_id: str, qualifier: bytes) -> str | None:
        """The token of the claim in cell ``e:<qualifier>`` of the event's row; None if there is none. A claim of a
        replica of an earlier version (the reward alone) has the token ``""``."""
        f = self._filters
        row = await self._table.read_row(
            event_row(event_id),
            row_filter=f.RowFilterChain(
                [f.FamilyNameRegexFilter(EVENTS_FAMILY), f.ColumnQualifierRegexFilter(b"^" + quote(qualifier) + b"$")]
            ),
            operation_timeout=self.timeout_s,
        )
        if row is None or not row.cells:
            return None
        try:
            claim = orjson.loads(row.cells[0].value)
        except orjson.JSONDecodeError:
            return ""
        return claim[1] if type(claim) is list and len(claim) == 2 and type(claim[1]) is str else ""

    async def _settle_claim(self, event_id: str, arm_id: str, value: float, segment: str | None, token: str) -> None:
        """Read an unknown claim back every second until Bigtable answers: this replica's, it is published."""
        qualifier = rewarded(arm_id)
        while True:
            await asyncio.sleep(1.0)
            try:
                holder = await self._claim_holder(event_id, qualifier)
            except Exception:
                continue
            if holder == token:
                self._queue_reward(event_id, arm_id, value, segment)
            return

    def _queue_reward(self, event_id: str, arm_id: str, value: float, segment: str | None) -> None:
        """A claimed reward to Pub/Sub without waiting (the sink sends it until it is stored)."""
        task = asyncio.get_running_loop().create_task(self.sink.reward(event_id, arm_id, value, time.time(), segment))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # refused: the sink keeps it anyway

    async def publish_rewards(self, claimed: list[tuple[str, str, float, str | None]], now: float) -> None:
        """Publish ``claimed`` rewards ``(event_id, id, reward, segment)`` and wait until Pub/Sub stored them.

        Raises:
            SinkUnavailable: If Pub/Sub did not store one of them in time; the sink keeps them and sends them again
                until it does (a claimed reward is never dropped), and a retry is answered ``duplicate``.
        """
        results = await asyncio.gather(
            *(self.sink.reward(event_id, arm_id, value, now, segment) for event_id, arm_id, value, segment in claimed),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def arm(self, arm_id: str) -> tuple[float, float, float, float] | None:
        """(alpha, beta, impressions, rewards) of ``arm_id`` from the counts the learners have written now, read
        past the cache; None if no learner has written the arm.

        Raises:
            BigtableUnavailable: If Bigtable cannot be read.
        """
        try:
            counts = await self.source.read_counts([arm_id])
        except Exception as exc:
            raise BigtableUnavailable(f"cannot read counts from Bigtable {self.path}: {exc}") from None
        if not counts.found[0]:
            return None
        alpha, beta = counts.posterior(self.prior_alpha, self.prior_beta)
        # An int without a half-life, the weighted count (a float) with one.
        return float(alpha[0]), float(beta[0]), counts.impressions[0].item(), float(counts.rewards[0])

    async def segment_arm(self, arm_id: str, segment: str) -> Counts:
        """The counts the learners have written of ``arm_id`` (position 0) and of it within ``segment`` (1), read
        past the cache in one call.

        Raises:
            BigtableUnavailable: If Bigtable cannot be read.
        """
        try:
            return await self.source.read_counts([arm_id, segment_row(segment, arm_id)])
        except Exception as exc:
            raise BigtableUnavailable(f"cannot read counts from Bigtable {self.path}: {exc}") from None

    async def counts(self, ids: list[str]) -> Counts:
        """The counts the learners have written of ``ids`` (distinct), read past the cache.

        Raises:
            BigtableUnavailable: If Bigtable cannot be read.
        """
        try:
            return await self.source.read_counts(ids)
        except Exception as exc:
            raise BigtableUnavailable(f"cannot read counts from Bigtable {self.path}: {exc}") from None

    async def scan(self, segment: str | None = None) -> tuple[list[str], Counts, bool]:
        """The ids and counts of the table's first ``SCAN_ROWS`` arms (within ``segment``: of its rows), and whether
        it holds more.

        Raises:
            BigtableUnavailable: If Bigtable cannot be read.
        """
        prefix = None if segment is None else segment_rows_prefix(segment)
        try:
            ids, counts = await self.source.scan(SCAN_ROWS + 1, prefix)
        except Exception as exc:
            raise BigtableUnavailable(f"cannot read counts from Bigtable {self.path}: {exc}") from None
        if len(ids) <= SCAN_ROWS:
            return ids, counts, False
        kept = Counts(counts.impressions[:SCAN_ROWS], counts.rewards[:SCAN_ROWS], counts.found[:SCAN_ROWS])
        return ids[:SCAN_ROWS], kept, True

    def stats(self) -> dict[str, Any]:
        sink, rows = self.sink, self.rows
        return {
            "messages_published": sink.published,
            "publish_failures": sink.failed,
            "records_refused": sink.refused,
            "outbox_messages": sink.pending,
            "outbox_bytes": sink.pending_bytes,
            "messages_undelivered": sink.undelivered,
            "event_rows_undelivered": rows.undelivered,
            "event_rows_written": rows.written,
            "event_rows_failed": rows.failed,
            "event_rows_pending": rows.pending,
            "reward_claims_unknown": self.claims_unknown,
            "event_id_claims_refused": self.claims_refused,
            **(self._follower_stats() if self.follower is not None else {}),
        }

    def _follower_stats(self) -> dict[str, Any]:
        assert self.follower is not None
        follower = self.follower.stats()
        return {
            "counts_rows_read": follower.rows_read,
            "counts_messages": follower.messages,
            "counts_resyncs": sum(follower.resyncs.values()),
            "follower": dataclasses.asdict(follower),
        }
