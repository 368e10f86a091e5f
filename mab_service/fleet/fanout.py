"""The counts' fan-out: learners publish what each window wrote, and every replica node follows it in shared memory.

Without it a replica re-reads its hot ids from Bigtable every ``fleet_cache_ttl_s``: reads per replica grow with its
hot ids, and over a fleet they are most of the Bigtable bill (docs/fleet.md, "3 M predictions/s, on paper"). With it:

- **Publisher** (``CountsPublisher``, in each learner): after a window is written, the **absolute** counts of its
  arms, which the learner holds (it is their only writer while it holds their shard's lease), go to the fan-out
  topic ``<events topic>-counts`` (``mab-service setup`` makes it) in messages of up to ``ARMS_PER_MESSAGE`` arms,
  each carrying the learner's id, a sequence number and the learner's start time. Counts only grow, so the larger of
  two readings is the newer: a replica merges them with a max, in any order, any number of times.
- **Follower** (``CountsFollower``, in one worker of each replica node, chosen by a lock in the node's state
  directory; another takes over if it dies): a subscription of its own to the fan-out topic (a unique name,
  an expiration policy of ``SUBSCRIPTION_TTL_S`` so an abandoned one vanishes, the shortest message retention,
  deleted on a clean stop), created **before** the start scan of the table's counts into the node's shared arm table
  (``ArmTable.raise_counts``), so nothing written meanwhile is missed; then every message is applied to that table,
  which every worker of the node ranks from (``posteriors.SharedArmsSource``). The arms' counts within segments
  travel the same way, as the segment rows' keys (``schema.segment_row``), and go to the node table's segment rows
  (``ids.pair_key``), which ``/predict`` with a segment ranks by. Bigtable is read only at start and
  to resynchronise: a **sequence gap** (a learner's number missing for ``gap_grace_s``: a message lost, a publish
  that failed), the subscription **recreated** (it was gone: NOT_FOUND, e.g. Pub/Sub restarted), or Pub/Sub
  **silent** (no pull answered) for over ``resync_after_s``. A resync is a full scan, max-merged like any message.

An id the table does not hold ranks by the prior: the learners have not counted it, or it would be in the start scan
or a message. Reading it from Bigtable could only confirm that, once per id, and would let a client's stream of new
ids drive reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from mab_service.errors import FeatureSourceError
from mab_service.features.bigtable import BigtableSource
from mab_service.fleet.schema import (
    ABSOLUTE_FAMILY,
    ARMS_START,
    COUNTS_FAMILY,
    MAX_EPOCH,
    REWARD_SCALE,
    SEGMENT_ROW_PREFIX,
    arm_counts,
    decayed_counts,
    landmark,
    prefix_end,
    split_segment_row,
)
from mab_service.ids import pair_key
from mab_service.learning._arms import ArmTable

logger = logging.getLogger("mab_service.fanout")

#: Seconds a stopping follower gives the deletion of its subscription (one attempt: it expires unused anyway).
DELETE_TIMEOUT_S = 5.0

#: The fan-out topic is the events topic's name with this suffix.
COUNTS_SUFFIX = "-counts"
#: Attribute ``v`` of a fan-out message.
FORMAT_VERSION = "1"
#: ``v`` of a message of forward-decayed sums (a fleet with a half-life): ``e``, each arm's epoch, beside ``i`` and
#: ``r``, its float sums; attribute ``h`` is the half-life. A follower applies only the messages of its own kind.
DECAYED_VERSION = "2"
#: Arms per fan-out message at most (ids of up to 1,024 bytes keep a message under Pub/Sub's 10 MB).
ARMS_PER_MESSAGE = 5000
#: Windows whose counts may be read back and published at once per learner; past it a window is skipped (its
#: sequence numbers spent, so the replicas resynchronise).
MAX_PENDING_WINDOWS = 8
#: A replica's subscription vanishes after this long without a pull (Pub/Sub's least expiration policy: a day).
SUBSCRIPTION_TTL_S = 86_400
#: Pub/Sub's least message retention: a replica away longer has lost its place and resynchronises anyway.
SUBSCRIPTION_RETENTION_S = 600
ACK_DEADLINE_S = 10
PULL_MAX_MESSAGES = 1000
#: Seconds between two attempts at something that failed (subscribe, scan, pull, take the lock).
RETRY_S = 1.0
#: Rows applied to the arm table per call during a scan.
SCAN_BATCH = 10_000
#: Sequence numbers a learner may skip at once before the follower stops listing them and resynchronises.
MAX_MISSING = 10_000
#: A learner not heard from for this long is forgotten (its missing numbers with it).
FORGET_LEARNER_S = 3600.0


def counts_topic(events_topic: str) -> str:
    """The fan-out topic of ``events_topic`` (``projects/P/topics/T``): ``projects/P/topics/T-counts``."""
    return events_topic + COUNTS_SUFFIX


def publisher_client() -> Any:
    """The async Pub/Sub publisher; on ``PUBSUB_EMULATOR_HOST`` a plain channel to the emulator."""
    from google.pubsub_v1.services.publisher import PublisherAsyncClient
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcAsyncIOTransport

    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return PublisherAsyncClient()
    import grpc

    return PublisherAsyncClient(transport=PublisherGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(host)))


@dataclass(frozen=True)
class CountsMessage:
    """One fan-out message: absolute counts of some arms, as a learner read them after writing its window."""

    learner: str
    """The publishing learner's id (unique per learner process)."""
    seq: int
    """The learner's sequence number of this message, from 0 at its start, one per message."""
    started: float
    """Unix time the learner started (a replica that subscribed earlier expects its numbers from 0)."""
    ids: list[str]
    impressions: list[int] | list[float]
    rewards: list[int] | list[float]
    """In millionths (``REWARD_SCALE``), as Bigtable holds them; with ``epochs``, forward-decayed sums."""
    epochs: list[int] | None = None
    """With a half-life, each arm's epoch (``schema.landmark``); None without."""

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "l": self.learner,
            "q": self.seq,
            "t0": self.started,
            "ids": self.ids,
            "i": self.impressions,
            "r": self.rewards,
        }
        if self.epochs is not None:
            doc["e"] = self.epochs
        return orjson.dumps(doc)

    @classmethod
    def decode(cls, data: bytes) -> CountsMessage | None:
        """The message in ``data``, or None if it is not one (wrong shape, types or lengths, negative counts)."""
        try:
            doc = orjson.loads(data)
            learner, seq, started, ids, shown, got = doc["l"], doc["q"], doc["t0"], doc["ids"], doc["i"], doc["r"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        epochs = doc.get("e") if isinstance(doc, dict) else None
        if not (
            isinstance(learner, str)
            and type(seq) is int
            and seq >= 0
            and isinstance(started, (int, float))
            and isinstance(ids, list)
            and isinstance(shown, list)
            and isinstance(got, list)
            and len(ids) == len(shown) == len(got)
            and all(isinstance(i, str) and i for i in ids)
        ):
            return None
        if epochs is None:
            if not (all(type(n) is int and n >= 0 for n in shown) and all(type(n) is int and n >= 0 for n in got)):
                return None
            return cls(learner, seq, float(started), ids, shown, got)
        # Forward-decayed sums: checked before use, as a learner's window is.
        if not (
            isinstance(epochs, list)
            and len(epochs) == len(ids)
            and all(type(e) is int and 0 <= e <= MAX_EPOCH for e in epochs)
            and all(type(x) in (int, float) and 0 <= x < math.inf for x in shown)
            and all(type(x) in (int, float) and 0 <= x < math.inf for x in got)
        ):
            return None
        return cls(learner, seq, float(started), ids, [float(x) for x in shown], [float(x) for x in got], epochs)


# -- the learners' side ---------------------------------------------------------------------------------------------


@dataclass
class PublisherStats:
    windows: int = 0
    """Windows whose counts were published."""
    messages: int = 0
    arms: int = 0
    """Arms' counts published."""
    failed_windows: int = 0
    """Windows not published (the publish failed, or too many waiting): replicas see the gap and resync."""


class CountsPublisher:
    """A learner's fan-out: after each window, the absolute counts of the arms it wrote, to the fan-out topic.

    ``written`` never waits: the publish runs as a task, at most ``max_pending`` at once.

    Args:
        timeout_s: Deadline of a publish.
        max_pending: Windows being published at once at most.
    """

    def __init__(self, *, timeout_s: float = 10.0, max_pending: int = MAX_PENDING_WINDOWS) -> None:
        self.learner = f"{time.time_ns():x}-{secrets.token_hex(4)}"
        self.started = time.time()
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.topic = ""
        self.stats = PublisherStats()
        self._publisher: Any = None
        self._seq = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_warning = -math.inf

    async def start(self, events_topic: str) -> None:
        """Connect; publish to ``events_topic``'s fan-out topic. A missing topic is logged, not fatal: the learner's
        job is the counts, and windows are published once the topic exists (``mab-service setup`` makes it)."""
        self.topic = counts_topic(events_topic)
        self._publisher = publisher_client()
        try:
            await self._publisher.get_topic(topic=self.topic, timeout=30)
        except Exception as exc:
            logger.warning(
                "cannot read the fan-out topic %s (%s): replicas do not see this learner's counts until it exists "
                "(mab-service setup makes it)",
                self.topic,
                exc,
            )

    def written_decayed(self, ids: list[str], sums: list[tuple[int, float, float]], half_life_s: float) -> None:
        """With a half-life: publish the forward-decayed sums ``(epoch, impressions, rewards)`` of ``ids``, in the
        background."""
        self.written(ids, [c[1] for c in sums], [c[2] for c in sums], [c[0] for c in sums], half_life_s)

    def written(
        self,
        ids: list[str],
        impressions: list[int] | list[float],
        rewards: list[int] | list[float],
        epochs: list[int] | None = None,
        half_life_s: float = 0.0,
    ) -> None:
        """Publish the absolute counts of ``ids`` (the arms a window just wrote, rewards in millionths), in the
        background; with ``epochs``, forward-decayed sums of a fleet with half-life ``half_life_s``."""
        if not ids or self._publisher is None:
            return
        seq = self._seq
        self._seq += -(-len(ids) // ARMS_PER_MESSAGE)
        if len(self._tasks) >= self.max_pending:
            self._failed(f"{len(self._tasks)} windows are still being published")
            return
        task = asyncio.get_running_loop().create_task(
            self._publish(ids, impressions, rewards, seq, epochs, half_life_s)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(
        self,
        ids: list[str],
        impressions: list[int] | list[float],
        rewards: list[int] | list[float],
        seq: int,
        epochs: list[int] | None,
        half_life_s: float,
    ) -> None:
        attributes = {"v": FORMAT_VERSION} if epochs is None else {"v": DECAYED_VERSION, "h": repr(half_life_s)}
        try:
            messages = []
            for s in range(0, len(ids), ARMS_PER_MESSAGE):
                message = CountsMessage(
                    self.learner,
                    seq + s // ARMS_PER_MESSAGE,
                    self.started,
                    ids[s : s + ARMS_PER_MESSAGE],
                    impressions[s : s + ARMS_PER_MESSAGE],
                    rewards[s : s + ARMS_PER_MESSAGE],
                    None if epochs is None else epochs[s : s + ARMS_PER_MESSAGE],
                )
                messages.append({"data": message.encode(), "attributes": attributes})
            await self._publisher.publish(topic=self.topic, messages=messages, timeout=self.timeout_s)
        except Exception as exc:
            self._failed(str(exc))
            return
        self.stats.windows += 1
        self.stats.messages += len(messages)
        self.stats.arms += len(ids)

    def _failed(self, why: str) -> None:
        self.stats.failed_windows += 1
        if time.monotonic() - self._last_warning >= 10.0:
            self._last_warning = time.monotonic()
            logger.warning(
                "the counts of a window were not published to %s (%s; %d so far): replicas resynchronise",
                self.topic,
                why,
                self.stats.failed_windows,
            )

    async def close(self, timeout_s: float = 10.0) -> None:
        """Finish the publishes under way (up to ``timeout_s``), then disconnect."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()
        if self._publisher is not None:
            await self._publisher.transport.close()
            self._publisher = None


# -- the replicas' side ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FollowerStats:
    """What a node's follower has done; ``leader`` says whether this worker runs it (the others' counts stay 0)."""

    leader: bool
    subscription: str
    messages: int
    malformed: int
    arms_applied: int
    rows_read: int
    """Counts rows read from Bigtable: the start scan and resyncs, never per answer."""
    resyncs: dict[str, int]
    """Scans by reason: ``start``, ``sequence``, ``subscription``, ``silence``."""
    pull_errors: int
    scan_errors: int
    table_full: int
    """Arms not recorded: the node's arm table is full (``max_new_arms``), or for a segment row its segments' room
    (``max_segment_rows``)."""
    malformed_keys: int
    """Keys in messages that are neither an arm's id nor a segment row's key: skipped."""
    last_message_age_s: float | None


@dataclass
class _Sequence:
    """One learner's numbers as this follower has seen them."""

    high: int
    missing: dict[int, float] = field(default_factory=dict)
    """Numbers not seen yet below ``high``, with the monotonic time they were found missing."""
    seen_at: float = 0.0


class CountsFollower:
    """A replica node's copy of the fleet's counts in its shared arm table, kept by the learners' fan-out.

    Args:
        topic: The fan-out topic (``counts_topic`` of the events topic).
        arms: The node's shared arm table.
        lock_path: A file in the node's state directory: the worker holding its lock runs the subscriber.
        prior_alpha, prior_beta: The prior of arms inserted into the table.
        resync_after_s: Pub/Sub unanswered for longer than this means messages may be lost: scan again.
        gap_grace_s: How long a missing sequence number may be late (Pub/Sub does not keep order) before a scan.
        scan_timeout_s: Deadline of one scan of the table.
    """

    def __init__(
        self,
        topic: str,
        arms: ArmTable,
        lock_path: Path,
        *,
        prior_alpha: float,
        prior_beta: float,
        resync_after_s: float = 60.0,
        gap_grace_s: float = 5.0,
        scan_timeout_s: float = 60.0,
    ) -> None:
        self.topic = topic
        self.arms = arms
        self.lock_path = lock_path
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta
        self.resync_after_s = resync_after_s
        self.gap_grace_s = gap_grace_s
        self.scan_timeout_s = scan_timeout_s
        self.half_life_s = arms.half_life_s
        """The node table's half-life: with one, the follower applies forward-decayed sums (``DECAYED_VERSION``)."""
        self._kind = (FORMAT_VERSION, None) if not self.half_life_s else (DECAYED_VERSION, repr(self.half_life_s))
        project = topic.split("/")[1]
        self.subscription_name = f"projects/{project}/subscriptions/{topic.rpartition('/')[2]}-{secrets.token_hex(6)}"
        self._source: BigtableSource | None = None
        self._subscriber: Any = None
        self._subscribed = False
        self._since = 0.0
        self._lock_fd = -1
        self._task: asyncio.Task[None] | None = None
        self._sequences: dict[str, _Sequence] = {}
        self._resync: str | None = None
        self._last_answer = time.monotonic()
        self._last_message: float | None = None
        self.messages = 0
        self.malformed = 0
        self.arms_applied = 0
        self.rows_read = 0
        self.pull_errors = 0
        self.scan_errors = 0
        self.table_full = 0
        self.malformed_keys = 0
        self.resyncs: dict[str, int] = dict.fromkeys(("start", "sequence", "subscription", "silence"), 0)

    @property
    def leader(self) -> bool:
        return self._lock_fd >= 0

    async def start(self, source: BigtableSource) -> None:
        """Follow the counts if no other worker of the node does (else stand by to take over).

        The leader subscribes first, then scans the table into the arm table, then applies what arrived meanwhile.

        Raises:
            FeatureSourceError: The fan-out topic does not exist (run ``mab-service setup``), or the table cannot
                be scanned. Pub/Sub out of reach is not an error: the scan is served, and subscribing is retried
                (a resync follows).
        """
        self._source = source
        if not self._take_lock():
            self._task = asyncio.get_running_loop().create_task(self._stand_by())
            return
        await self._lead()

    async def _lead(self) -> None:
        from google.api_core import exceptions

        from mab_service.fleet.learner import subscriber_client

        self._subscriber = subscriber_client()
        try:
            await self._subscribe()
        except exceptions.NotFound:
            raise FeatureSourceError(
                f"the fan-out topic {self.topic} does not exist: run mab-service setup (or serve with "
                "--no-fleet-follow to read counts from Bigtable behind the cache)"
            ) from None
        except Exception as exc:
            logger.warning("cannot subscribe to %s yet (%s): serving the start scan, retrying", self.topic, exc)
        try:
            await self._scan("start")
        except Exception as exc:
            raise FeatureSourceError(f"cannot scan the counts of Bigtable {self._table_path}: {exc}") from None
        self._task = asyncio.get_running_loop().create_task(self._follow())

    @property
    def _table_path(self) -> str:
        return str(self._source.path) if self._source is not None else "?"

    async def _stand_by(self) -> None:
        while not self._take_lock():
            await asyncio.sleep(RETRY_S)
        logger.info("taking over the node's fan-out subscription")
        while True:
            try:
                await self._lead()
                return
            except Exception as exc:
                logger.warning("following the counts failed to start, retrying: %s", exc)
                await asyncio.sleep(RETRY_S)

    def _take_lock(self) -> bool:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def _subscribe(self) -> None:
        """Create this node's subscription (again, after it was lost); the table is then rescanned."""
        started = time.time()
        await self._subscriber.create_subscription(
            request={
                "name": self.subscription_name,
                "topic": self.topic,
                "ack_deadline_seconds": ACK_DEADLINE_S,
                "message_retention_duration": {"seconds": SUBSCRIPTION_RETENTION_S},
                "expiration_policy": {"ttl": {"seconds": SUBSCRIPTION_TTL_S}},
            },
            timeout=10,
        )
        self._subscribed = True
        self._since = started
        self._sequences.clear()  # every number published from now on arrives; what came before is in the scan
        self._last_answer = time.monotonic()
        logger.info("following the counts on %s", self.subscription_name)

    async def _scan(self, reason: str) -> None:
        """Every arm's counts, and every segment row's, from the table into the arm table (max-merged: what messages
        brought stays). Two ranges: the segment rows', then the arms' (the fleet's own rows, membership rows and the
        probe key sort apart from both)."""
        from google.cloud.bigtable.data import ReadRowsQuery, RowRange, row_filters

        assert self._source is not None
        started = time.monotonic()
        for sequence in self._sequences.values():
            sequence.missing.clear()  # published before the scan starts: in it
        query = ReadRowsQuery(
            row_ranges=[
                RowRange(start_key=SEGMENT_ROW_PREFIX.encode(), end_key=prefix_end(SEGMENT_ROW_PREFIX.encode())),
                RowRange(start_key=ARMS_START),
            ],
            row_filter=row_filters.RowFilterChain(
                [
                    row_filters.FamilyNameRegexFilter(f"^[{ABSOLUTE_FAMILY}{COUNTS_FAMILY}]$"),
                    row_filters.CellsColumnLimitFilter(1),
                ]
            ),
        )
        ids: list[str] = []
        shown: list[int] = []
        got: list[int] = []
        stream = await self._source.table.read_rows_stream(query, operation_timeout=self.scan_timeout_s)
        rows = 0
        if self.half_life_s:
            rows = await self._scan_decayed(stream)
        async for row in stream:
            rows += 1
            counts = arm_counts((cell.family, cell.qualifier, cell.value) for cell in row.cells)
            if counts is None:  # not a count: the arm ranks by the prior, as BigtableSource reads it
                continue
            ids.append(row.row_key.decode(errors="replace"))
            shown.append(counts[0])
            got.append(counts[1])
            if len(ids) >= SCAN_BATCH:
                self._apply(ids, shown, got)
                ids, shown, got = [], [], []
        self._apply(ids, shown, got)
        self.rows_read += rows
        self.resyncs[reason] += 1
        self._resync = None
        logger.info(
            "counts of %d arms scanned from %s in %.2f s (%s)",
            rows,
            self._table_path,
            time.monotonic() - started,
            reason,
        )

    async def _scan_decayed(self, stream: Any) -> int:
        """With a half-life, the scan's rows as forward-decayed sums (their ``n:d`` cells; a row without one, or with
        one that is not an epoch and two sums, is skipped). Returns the rows read."""
        rows = 0
        ids: list[str] = []
        sums: list[tuple[int, float, float]] = []
        async for row in stream:
            rows += 1
            counted = decayed_counts((cell.family, cell.qualifier, cell.value) for cell in row.cells)
            if counted is None or counted[1] == counted[2] == 0.0:
                continue
            ids.append(row.row_key.decode(errors="replace"))
            sums.append(counted)
            if len(ids) >= SCAN_BATCH:
                self._apply_decayed(ids, sums)
                ids, sums = [], []
        self._apply_decayed(ids, sums)
        return rows

    def _apply_decayed(self, ids: list[str], sums: list[tuple[int, float, float]]) -> None:
        """Max-merge forward-decayed sums into the node's table (each moved to the count's own landmark there); keys
        as ``_apply`` maps them."""
        if any(id_.startswith("\x00") for id_ in ids):
            ids, kept = self._node_keys(ids)
            sums = [sums[i] for i in kept]
        if not ids:
            return
        shown = np.array([c[1] for c in sums], np.float64)
        got = np.minimum(np.array([c[2] for c in sums], np.float64), shown)  # as ``_apply``: rewards in [0, shown]
        marks = np.array([landmark(c[0], self.half_life_s) for c in sums], np.float64)
        self.table_full += self.arms.raise_decayed(ids, shown, got, marks, self.prior_alpha, self.prior_beta)
        self.arms_applied += len(ids)

    def _apply(self, ids: list[str], impressions: list[int], millionths: list[int]) -> None:
        """Max-merge counts into the node's table; a segment row's key becomes the node's pair key, and a key that
        is neither an arm's nor a segment row's is skipped (counted in ``malformed_keys``)."""
        if any(id_.startswith("\x00") for id_ in ids):
            ids, kept = self._node_keys(ids)
            impressions = [impressions[i] for i in kept]
            millionths = [millionths[i] for i in kept]
        if not ids:
            return
        shown = np.asarray(impressions, np.int64)
        # Rewards taken in [0, impressions], as ``Counts.posterior`` takes them: a max of such values is still the
        # newest reading's, since both counts only grow.
        got: npt.NDArray[np.float64] = np.minimum(np.asarray(millionths, np.float64) / REWARD_SCALE, shown)
        self.table_full += self.arms.raise_counts(ids, shown, got, self.prior_alpha, self.prior_beta)
        self.arms_applied += len(ids)

    def _node_keys(self, ids: list[str]) -> tuple[list[str], list[int]]:
        """The node's keys of ``ids`` (a segment row's becomes its pair key) and the positions in ``ids`` they come
        from; a key that is neither an arm's nor a segment row's is left out (counted in ``malformed_keys``)."""
        keys: list[str] = []
        kept: list[int] = []
        for i, id_ in enumerate(ids):
            if id_.startswith("\x00"):
                pair = split_segment_row(id_)
                if pair is None:
                    self.malformed_keys += 1
                    continue
                id_ = pair_key(*pair)
            keys.append(id_)
            kept.append(i)
        return keys, kept

    def _need_resync(self, reason: str) -> None:
        if self._resync is None:
            logger.warning("counts fan-out: %s; scanning the table again", _REASONS[reason])
            self._resync = reason

    async def _follow(self) -> None:
        from google.api_core import exceptions

        while True:
            if not self._subscribed:
                try:
                    await self._subscribe()
                except Exception as exc:
                    self.pull_errors += 1
                    if self.pull_errors == 1 or self.pull_errors % 60 == 0:
                        logger.warning(
                            "cannot subscribe to %s (%d tries so far): %s", self.topic, self.pull_errors, exc
                        )
                    await asyncio.sleep(RETRY_S)
                    continue
                self._need_resync("subscription")
            if self._resync is not None:
                try:
                    await self._scan(self._resync)
                except Exception as exc:
                    self.scan_errors += 1
                    logger.warning("scanning the counts of %s failed, retrying: %s", self._table_path, exc)
                    await asyncio.sleep(RETRY_S)
                    continue
            received: list[Any] = []
            try:
                response = await self._subscriber.pull(
                    subscription=self.subscription_name, max_messages=PULL_MAX_MESSAGES, timeout=2.0, retry=None
                )
                received = list(response.received_messages)
            except exceptions.DeadlineExceeded:
                pass  # an idle pull: nothing to deliver
            except exceptions.NotFound:
                self._subscribed = False  # gone (expired, deleted, Pub/Sub restarted): what it held is lost
                continue
            except Exception as exc:
                self.pull_errors += 1
                if self.pull_errors == 1 or self.pull_errors % 60 == 0:
                    logger.warning(
                        "pulling counts from %s failed (%d so far): %s", self.subscription_name, self.pull_errors, exc
                    )
                await asyncio.sleep(RETRY_S)
                continue
            now = time.monotonic()
            if now - self._last_answer > self.resync_after_s:
                self._need_resync("silence")
            self._last_answer = now
            if received:
                self._receive(received, now)
                with contextlib.suppress(Exception):  # not acked: delivered again and applied again, harmlessly
                    await self._subscriber.acknowledge(
                        subscription=self.subscription_name, ack_ids=[m.ack_id for m in received]
                    )
            self._check_gaps(now)

    def _receive(self, received: list[Any], now: float) -> None:
        ids: list[str] = []
        shown: list[int] = []
        got: list[int] = []
        sums: list[tuple[int, float, float]] = []
        for item in received:
            message = CountsMessage.decode(item.message.data)
            attributes = item.message.attributes
            if (
                message is None
                or (attributes.get("v"), attributes.get("h")) != self._kind
                or (message.epochs is None) != (not self.half_life_s)
            ):
                self.malformed += 1
                continue
            self.messages += 1
            self._last_message = now
            self._sequence(message, now)
            ids += message.ids
            if message.epochs is not None:
                sums += zip(message.epochs, message.impressions, message.rewards)
            else:
                shown += message.impressions  # type: ignore[arg-type]
                got += message.rewards  # type: ignore[arg-type]
        if self.half_life_s:
            self._apply_decayed(ids, sums)
        else:
            self._apply(ids, shown, got)

    def _sequence(self, message: CountsMessage, now: float) -> None:
        sequence = self._sequences.get(message.learner)
        if sequence is None:
            # A learner started after this subscription: all its numbers come here, from 0. One started before: its
            # earlier messages were published before the subscription (in the scan) or are on their way.
            first = 0 if message.started > self._since else message.seq
            sequence = self._sequences[message.learner] = _Sequence(first - 1)
        sequence.seen_at = now
        if message.seq > sequence.high:
            if message.seq - sequence.high - 1 + len(sequence.missing) > MAX_MISSING:
                self._need_resync("sequence")
            else:
                for seq in range(sequence.high + 1, message.seq):
                    sequence.missing[seq] = now
            sequence.high = message.seq
        else:
            sequence.missing.pop(message.seq, None)

    def _check_gaps(self, now: float) -> None:
        for learner, sequence in list(self._sequences.items()):
            if any(now - noticed > self.gap_grace_s for noticed in sequence.missing.values()):
                self._need_resync("sequence")
            if now - sequence.seen_at > FORGET_LEARNER_S and not sequence.missing:
                del self._sequences[learner]

    def stats(self) -> FollowerStats:
        age = None if self._last_message is None else time.monotonic() - self._last_message
        return FollowerStats(
            leader=self.leader,
            subscription=self.subscription_name if self.leader else "",
            messages=self.messages,
            malformed=self.malformed,
            arms_applied=self.arms_applied,
            rows_read=self.rows_read,
            resyncs=dict(self.resyncs),
            pull_errors=self.pull_errors,
            scan_errors=self.scan_errors,
            table_full=self.table_full,
            malformed_keys=self.malformed_keys,
            last_message_age_s=age,
        )

    async def close(self) -> None:
        """Stop following; delete this node's subscription (an unclean stop leaves it to its expiration policy)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._subscriber is not None:
            if self._subscribed:
                try:
                    # One attempt, bounded: the client's default retries go on for a minute with Pub/Sub away,
                    # past the shutdown's budget, and the subscription expires on its own anyway.
                    deleting = self._subscriber.delete_subscription(
                        subscription=self.subscription_name, retry=None, timeout=DELETE_TIMEOUT_S
                    )
                    await asyncio.wait_for(deleting, DELETE_TIMEOUT_S)
                except Exception as exc:
                    logger.warning("deleting %s failed (it expires on its own): %s", self.subscription_name, exc)
            await self._subscriber.transport.close()
            self._subscriber = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


_REASONS = {
    "sequence": "a learner's message is missing",
    "subscription": "the subscription was recreated (what it held is lost)",
    "silence": "Pub/Sub did not answer for a while",
}
