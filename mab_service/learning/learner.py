"""The fleet's learner: Pub/Sub messages of events and rewards in, exact counts in Bigtable out.

Each window (``window_s``, or ``max_messages`` messages) the learner pulls messages from the subscription,
aggregates their records per arm, and for each arm makes one ``CheckAndMutateRow`` call: if none of the window's
deduplication markers for that arm is in its row, it writes them all and adds the window's impressions and rewards
to the arm's counts (``AddToCell`` on the aggregate family), in one atomic step of that row. If one is there (a
redelivered message, a reward posted to two replicas, a learner that died after writing and before acking), the
arm's records are applied one by one with the same check, so each (event, arm) counts exactly once whatever order
learners see them in. Messages are acknowledged only after every arm of the window is written; a failed write
gives the whole window back to Pub/Sub (the markers make the second pass skip what the first wrote).

Markers: ``d:e/<event_id>`` in the row of each id the event returned (one impression), ``d:r/<event_id>`` in the row
of the rewarded id (one reward). Family ``d`` is garbage-collected after the subscription's retention plus a margin
(``fleet_setup``), so a marker outlives every redelivery of the message that wrote it. docs/fleet.md argues it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from mab_service.errors import MabError
from mab_service.features.bigtable import (
    COUNTS_FAMILY,
    IMPRESSIONS,
    MARKERS_FAMILY,
    REWARD_SCALE,
    REWARDS,
    TablePath,
    data_client,
)

logger = logging.getLogger("mab_service.learner")

#: Markers checked by one CheckAndMutateRow (its filter and mutation list stay small).
MARKERS_PER_CALL = 100
EVENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: How many ack ids go in one Acknowledge call (the request must stay under 512 KB).
ACKS_PER_CALL = 1000
ERROR_BACKOFF_S = 1.0


class LearnerError(MabError):
    """The learner cannot start: a missing library, subscription or table."""

    code = "learner_failed"


@dataclass
class LearnerStats:
    messages: int = 0
    windows: int = 0
    impressions: int = 0
    """Impressions added to Bigtable (duplicates excluded)."""
    rewards: int = 0
    """Rewards added to Bigtable (duplicates excluded)."""
    duplicates: int = 0
    """Records whose marker was already written: redeliveries and repeated rewards."""
    malformed: int = 0
    """Messages that are not records of this format: acknowledged and logged, never applied."""
    failed_windows: int = 0
    """Windows given back to Pub/Sub because a write failed."""
    writes: int = 0
    """CheckAndMutateRow calls made."""
    errors: int = 0
    """Steps that failed (a pull or an acknowledgement); the learner waits ``ERROR_BACKOFF_S`` and goes on."""


def subscriber_client() -> Any:
    """The async Pub/Sub subscriber; on ``PUBSUB_EMULATOR_HOST`` a plain channel to the emulator."""
    from google.pubsub_v1.services.subscriber import SubscriberAsyncClient
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport

    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return SubscriberAsyncClient()
    import grpc

    return SubscriberAsyncClient(transport=SubscriberGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(host)))


def _quote(marker: bytes) -> bytes:
    # Markers are ASCII (event ids are checked); RE2 takes \xHH for the bytes that mean something in a pattern.
    return b"".join(bytes([c]) if chr(c).isalnum() or c in b"_/:-" else b"\\x%02x" % c for c in marker)


class Learner:
    """Applies a subscription's events and rewards to a Bigtable table's counts, exactly once.

    Args:
        subscription: ``projects/P/subscriptions/S``.
        table: ``projects/P/instances/I/tables/T`` (made by ``mab-service setup``).
        window_s: How long a window collects messages after its first one.
        max_messages: Messages per window at most.
        concurrency: Rows written at once.
    """

    def __init__(
        self, subscription: str, table: str, *, window_s: float = 0.2, max_messages: int = 1000, concurrency: int = 64
    ) -> None:
        self.subscription = subscription
        self.path = TablePath.parse(table)
        self.window_s = window_s
        self.max_messages = max_messages
        self.concurrency = concurrency
        self.stats = LearnerStats()
        self._subscriber: Any = None
        self._client: Any = None
        self._table: Any = None
        self._limit = asyncio.Semaphore(concurrency)

    async def start(self) -> None:
        """Connect, and check that the subscription and the table exist.

        Raises:
            LearnerError: If the client libraries are missing, or the subscription or the table cannot be read.
        """
        try:
            from google.cloud.bigtable.data import AddToCell, SetCell, row_filters
        except ImportError as exc:
            raise LearnerError(f"the learner needs mab-service[fleet] installed ({exc})") from None
        self._add, self._set, self._filters = AddToCell, SetCell, row_filters
        self._subscriber = subscriber_client()
        self._client = data_client(self.path.project)
        self._table = self._client.get_table(self.path.instance, self.path.table)
        try:
            await self._subscriber.get_subscription(subscription=self.subscription, timeout=30)
        except Exception as exc:
            raise LearnerError(f"cannot read subscription {self.subscription}: {exc}") from None
        try:
            await self._table.read_row(b"\x00mab-service-probe", operation_timeout=30)
        except Exception as exc:
            raise LearnerError(f"cannot read Bigtable table {self.path}: {exc}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._subscriber is not None:
            await self._subscriber.transport.close()

    async def run(self, stop: asyncio.Event, log_every_s: float = 10.0) -> None:
        """Apply windows until ``stop`` is set (the current window finishes first)."""
        next_log = time.monotonic() + log_every_s
        while not stop.is_set():
            try:
                await self.step(wait_s=1.0)
            except Exception as exc:
                # Pub/Sub or Bigtable away for a while: what was not acked comes back, so waiting loses nothing.
                self.stats.errors += 1
                logger.warning("learner step failed, retrying in %.0f s: %s", ERROR_BACKOFF_S, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), ERROR_BACKOFF_S)
            if time.monotonic() >= next_log:
                logger.info("learner %s", orjson.dumps(asdict(self.stats)).decode())
                next_log = time.monotonic() + log_every_s
        logger.info("learner stopped %s", orjson.dumps(asdict(self.stats)).decode())

    async def step(self, wait_s: float = 1.0) -> int:
        """One window: pull (waiting up to ``wait_s`` for the first message), apply, acknowledge; messages handled."""
        received = await self._pull(wait_s)
        if not received:
            return 0
        window_end = time.monotonic() + self.window_s
        while len(received) < self.max_messages and (left := window_end - time.monotonic()) > 0:
            more = await self._pull(left, self.max_messages - len(received))
            received.extend(more)
        ack_ids = [m.ack_id for m in received]
        per_arm: dict[bytes, dict[bytes, tuple[int, int]]] = {}
        for message in received:
            if not self._collect(message.message.data, per_arm):
                self.stats.malformed += 1
                logger.warning("malformed message %s skipped", message.message.message_id)
        try:
            await asyncio.gather(*(self._apply(key, items) for key, items in per_arm.items()))
        except Exception as exc:
            # Written rows keep their markers, so the redelivered window skips them.
            self.stats.failed_windows += 1
            logger.warning("window of %d messages given back: %s", len(received), exc)
            await self._subscriber.modify_ack_deadline(
                subscription=self.subscription, ack_ids=ack_ids, ack_deadline_seconds=0
            )
            return 0
        for s in range(0, len(ack_ids), ACKS_PER_CALL):
            await self._subscriber.acknowledge(subscription=self.subscription, ack_ids=ack_ids[s : s + ACKS_PER_CALL])
        self.stats.messages += len(received)
        self.stats.windows += 1
        return len(received)

    async def _pull(self, wait_s: float, max_messages: int | None = None) -> list[Any]:
        from google.api_core import exceptions

        try:
            response = await self._subscriber.pull(
                subscription=self.subscription,
                max_messages=max_messages or self.max_messages,
                timeout=max(wait_s, 0.05),
                retry=None,
            )
        except exceptions.DeadlineExceeded:
            return []
        return list(response.received_messages)

    def _collect(self, data: bytes, per_arm: dict[bytes, dict[bytes, tuple[int, int]]]) -> bool:
        """Add a message's records to ``per_arm`` (row key -> marker -> (impressions, reward millionths))."""
        try:
            records = orjson.loads(data)
            parsed: list[tuple[bytes, bytes, tuple[int, int]]] = []
            for record in records:
                kind, event_id = record[0], record[2]
                if not isinstance(event_id, str) or EVENT_ID.match(event_id) is None:
                    return False
                if kind == "e":
                    marker = b"e/" + event_id.encode()
                    parsed.extend((id_.encode(), marker, (1, 0)) for id_ in record[3] if isinstance(id_, str))
                elif kind == "r":
                    reward = float(record[4])
                    if not 0.0 <= reward <= 1.0 or not isinstance(record[3], str):
                        return False
                    parsed.append((record[3].encode(), b"r/" + event_id.encode(), (0, round(reward * REWARD_SCALE))))
                else:
                    return False
        except (orjson.JSONDecodeError, TypeError, IndexError, ValueError):
            return False
        for key, marker, counts in parsed:
            items = per_arm.setdefault(key, {})
            if marker in items:  # the same record twice in one window (a duplicate delivered alongside)
                self.stats.duplicates += 1
            else:
                items[marker] = counts
        return True

    async def _apply(self, key: bytes, items: dict[bytes, tuple[int, int]]) -> None:
        markers = list(items.items())
        for s in range(0, len(markers), MARKERS_PER_CALL):
            chunk = markers[s : s + MARKERS_PER_CALL]
            if await self._write(key, chunk):
                # Some marker is there already: apply each record alone, under its own check.
                for one in chunk:
                    if await self._write(key, [one]):
                        self.stats.duplicates += 1

    async def _write(self, key: bytes, chunk: list[tuple[bytes, tuple[int, int]]]) -> bool:
        """Write ``chunk``'s markers and add its counts unless one of its markers is in the row; whether one was."""
        f = self._filters
        pattern = b"^(?:" + b"|".join(_quote(marker) for marker, _ in chunk) + b")$"
        predicate = f.RowFilterChain([f.FamilyNameRegexFilter(MARKERS_FAMILY), f.ColumnQualifierRegexFilter(pattern)])
        impressions = sum(counts[0] for _, counts in chunk)
        rewards = sum(counts[1] for _, counts in chunk)
        mutations: list[Any] = [self._set(MARKERS_FAMILY, marker, b"") for marker, _ in chunk]
        # Timestamp 0: every addition lands in one aggregate cell per column.
        if impressions:
            mutations.append(self._add(COUNTS_FAMILY, IMPRESSIONS, impressions, 0))
        if rewards:
            mutations.append(self._add(COUNTS_FAMILY, REWARDS, rewards, 0))
        self.stats.writes += 1
        async with self._limit:
            matched = bool(await self._table.check_and_mutate_row(key, predicate, false_case_mutations=mutations))
        if not matched:
            self.stats.impressions += impressions
            self.stats.rewards += sum(1 for _, counts in chunk if counts[1] or counts[0] == 0)
        return matched
