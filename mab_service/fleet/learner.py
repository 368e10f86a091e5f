"""The fleet's learner: Pub/Sub messages of events and rewards in, exact counts in Bigtable out.

Each window (``window_s`` after its first message, or ``max_messages`` messages) the learner pulls messages from the
subscription, aggregates their records per arm, and for each arm makes one ``CheckAndMutateRow`` call: if none of
the window's deduplication markers for that arm is in its row, it writes them all and adds the window's impressions
and rewards to the arm's counts (``AddToCell`` on the aggregate family), in one atomic step of that row. If one is
there (a redelivered message, a reward posted to two replicas, a learner that died after writing and before
acking), the arm's markers are applied one by one with the same check, so each counts exactly once whatever order
learners see them in. Messages are acknowledged only after every arm of the window is written; a failed write
gives the whole window back to Pub/Sub (the markers make the second pass skip what the first wrote).

A message is applied record by record: a record that breaks the format (an id outside the id rule, a reward outside
[0, 1], an event id outside its rule, a record of another shape) is skipped, counted by reason and logged, and every
other record of the message counts, since each was answered 202 or 200 on its own. A message that cannot be decoded
at all (not a JSON array, no key, another format version) is not acknowledged but nacked, so that the subscription's
dead-letter policy (``fleet.setup``) forwards it to the dead-letter topic after its delivery attempts: kept for a
person to read, never dropped.

Markers, in the row of the arm they guard: ``d:m/<k>`` for a message's impressions of that arm, ``k`` being the
message's key (``<publisher id>.<shard>/<sequence>``, the same on every publication of it, ``pubsub.PubSubSink``);
``d:r/<event_id>`` for the reward of that (event, arm), which two replicas may publish in two messages. Family ``d``
is garbage-collected after the subscription's retention plus a margin (``fleet.setup``), so a marker outlives every
redelivery of the message that wrote it. docs/fleet.md argues it.

The calls go out on the Bigtable client's own gRPC channel (its credentials, its emulator, its refresh) as protobuf
bytes built here: through the client's ``check_and_mutate_row`` a call costs ~3.5 times the CPU (docs/fleet.md).

Shards: when the table has them (``mab-service setup``), the arms are split into shards, each with a subscription of
its own, and each shard is read by the one learner holding its **lease**, a row ``\x00s/<shard>`` whose cell
``s:lease`` names the holder, its timestamp the last renewal. Every third of ``lease_ttl_s`` a learner marks itself
alive (``\x00l/<id>``), counts the live learners, renews its leases (a CheckAndMutateRow on the holder's name: a lease
taken over meanwhile is lost, not renewed), gives back those past its fair share (shards / live learners, rounded up)
and takes free or expired ones up to it (a CheckAndMutateRow unless a lease cell younger than the TTL is there). So
each arm is written by one learner per window, learners come and go, and a killed learner's shards are taken over
after the TTL; while two overlap in a handover, the markers keep the counts exact. The holder of shard 0 also reads
the fleet's own subscription (messages of replicas from before shards, or of other publishers). A stopping learner
gives its leases back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import secrets
import time
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import orjson
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mab_service.errors import MabError
from mab_service.features.bigtable import data_client, read_shards
from mab_service.fleet.fanout import CountsPublisher
from mab_service.fleet.requests import (
    CHECK_AND_MUTATE_ROW,
    Mark,
    check_and_mutate,
    quote,
    set_marker,
    table_field,
    timestamp_field,
)
from mab_service.fleet.schema import (
    ALIVE,
    FLEET_FAMILY,
    LEARNER_ROW_PREFIX,
    LEASE,
    LEASE_ROW_PREFIX,
    PROBE_KEY,
    REWARD_SCALE,
    TablePath,
    learner_row,
    lease_row,
)
from mab_service.fleet.setup import shard_subscription
from mab_service.fleet.sink import FORMAT_VERSION, RECORDS_VERSION
from mab_service.ids import MAX_ID_BYTES, id_problem, is_event_id

logger = logging.getLogger("mab_service.learner")

#: Markers checked by one CheckAndMutateRow (its filter and mutation list stay small).
MARKERS_PER_CALL = 100
#: A message key: ``<publisher id>.<shard>/<sequence>``, or ``<publisher id>/<sequence>`` without shards
#: (``pubsub.PubSubSink``).
MESSAGE_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}/[0-9]{1,20}$")
__all__ = ["MAX_ID_BYTES", "Learner", "LearnerError", "LearnerStats"]
#: Why a record is skipped: the ``reason`` label of ``mab_learner_invalid_records_total``.
INVALID_REASONS = ("record", "event_id", "id", "reward", "count")
#: Message formats read: this version's, and the one before it (replicas of an older version, during an upgrade).
_VERSIONS = frozenset({FORMAT_VERSION, RECORDS_VERSION})
#: The most impressions of one arm a format-3 message may carry (a replica's batch holds far fewer).
MAX_SHOWN = 1 << 31
#: Seconds between two log lines about skipped records or undecodable messages (the counters count them all).
LOG_EVERY_S = 10.0
#: How many ack ids go in one Acknowledge call (the request must stay under 512 KB).
ACKS_PER_CALL = 1000
ERROR_BACKOFF_S = 1.0
#: Deadline of one CheckAndMutateRow; one that runs out fails its window (its outcome is unknown, the markers decide).
WRITE_TIMEOUT_S = 30.0
DEFAULT_WINDOW_S = 0.5
DEFAULT_METRICS_PORT = 9464
#: How long a shard's lease lasts unrenewed; renewed every third of it.
DEFAULT_LEASE_TTL_S = 10.0
#: How long one pull waits for messages (a pull that finds none returns after it, or earlier); also how long a
#: subscription given up is still pulled at most.
PULL_WAIT_S = 1.0
#: After a pull that found nothing, the next waits this long, doubling up to ``IDLE_PULL_MAX_S``: a pull may return
#: at once when there is nothing (Google's emulator always does), and a learner holds a subscription per shard.
IDLE_PULL_MIN_S, IDLE_PULL_MAX_S = 0.02, 0.2


class LearnerError(MabError):
    """The learner cannot start: a missing library, subscription or table."""

    code = "learner_failed"


@dataclass
class LearnerStats:
    messages: int = 0
    """Messages acknowledged."""
    windows: int = 0
    impressions: int = 0
    """Impressions added to Bigtable (duplicates excluded)."""
    rewards: int = 0
    """Rewards added to Bigtable (duplicates excluded)."""
    duplicates: int = 0
    """Impressions and rewards skipped because their marker was already there: redeliveries, repeated rewards."""
    malformed: int = 0
    """Deliveries of messages that cannot be decoded (not a JSON array, no key, another version): nacked, never
    acknowledged, so that the subscription's dead-letter policy forwards them after its delivery attempts."""
    failed_windows: int = 0
    """Attempts to write a window that failed: retried with its messages held while the error is transient (Bigtable
    away), else the window is given back to Pub/Sub."""
    writes: int = 0
    """CheckAndMutateRow calls made."""
    errors: int = 0
    """Steps that failed (a pull or an acknowledgement); the learner waits ``ERROR_BACKOFF_S`` and goes on."""
    invalid_records: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INVALID_REASONS, 0))
    """Records skipped, by reason (``INVALID_REASONS``): the other records of their message are applied."""
    shards_held: int = 0
    """Shards whose lease this learner holds (0 in a table without shards)."""
    leases_taken: int = 0
    leases_lost: int = 0
    """Leases found taken over by another learner at renewal (this one was too slow to renew)."""


def subscriber_client() -> Any:
    """The async Pub/Sub subscriber; on ``PUBSUB_EMULATOR_HOST`` a plain channel to the emulator."""
    from google.pubsub_v1.services.subscriber import SubscriberAsyncClient
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport

    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return SubscriberAsyncClient()
    import grpc

    return SubscriberAsyncClient(transport=SubscriberGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(host)))


def _held_by(row_filters: Any, holder: bytes) -> Any:
    """A lease cell held by ``holder``."""
    return row_filters.RowFilterChain(
        [
            row_filters.ColumnQualifierRegexFilter(b"^lease$"),
            row_filters.ValueRegexFilter(b"^" + quote(holder) + b"$"),
        ]
    )


def _datetime(micros: int) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(micros / 1_000_000, tz=datetime.timezone.utc)


def _by_subscription(messages: list[tuple[str, Any]]) -> dict[str, list[str]]:
    """Ack ids grouped by the subscription their messages came from."""
    grouped: dict[str, list[str]] = {}
    for subscription, message in messages:
        grouped.setdefault(subscription, []).append(message.ack_id)
    return grouped


class _Window:
    """A window's records, per arm, with the window's own duplicates taken out."""

    def __init__(self) -> None:
        self.rows: defaultdict[str, list[Mark]] = defaultdict(list)
        self.keys: set[str] = set()
        self.rewards: set[tuple[str, str]] = set()
        self.duplicates = 0
        self.timestamp_micros = time.time_ns() // 1_000_000 * 1000  # Bigtable's default granularity: milliseconds
        self._timestamp = timestamp_field(self.timestamp_micros)

    def add(self, key: str, shown: dict[str, int], rewards: list[tuple[str, str, int]]) -> None:
        """A message's impressions (per arm) and rewards ``(id, event_id, millionths)``."""
        rows = self.rows
        if key in self.keys:  # the same message twice in one window (published or delivered again)
            self.duplicates += sum(shown.values())
        elif shown:
            self.keys.add(key)
            marker = b"m/" + key.encode()
            quoted, mutation = quote(marker), set_marker(marker, self._timestamp)
            for id_, n in shown.items():
                rows[id_].append((quoted, mutation, n, 0))
        for id_, event_id, millionths in rewards:
            if (id_, event_id) in self.rewards:
                self.duplicates += 1
                continue
            self.rewards.add((id_, event_id))
            marker = b"r/" + event_id.encode()
            rows[id_].append((quote(marker), set_marker(marker, self._timestamp), 0, millionths))


class Parsed(NamedTuple):
    """A message's valid records, and what was skipped of it."""

    shown: dict[str, int]
    """Impressions per arm."""
    rewards: list[tuple[str, str, int]]
    """``(id, event_id, millionths)``."""
    invalid: Counter[str]
    """Records skipped, by reason (``INVALID_REASONS``)."""
    example: Any
    """The first record skipped, for the log; None if none was."""


def parse(data: bytes, version: str = FORMAT_VERSION) -> Parsed | None:
    """A message's valid records, each on its own; None if the message cannot be decoded at all (not a JSON array).

    Format 3 (``pubsub``): the impressions summed per arm in one record ``["i", events, {id: n}]``, each entry checked
    on its own (an id outside the id rule: reason ``id``; a count that is not an integer in [1, 2^31): ``count``),
    then reward records. Format 2: a record per answer, ``["e", t, event_id, [ids]]``, and the same reward records.
    """
    try:
        records = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(records) is not list:
        return None
    if version == FORMAT_VERSION:
        return _parse_sums(records)
    shown: Counter[str] = Counter()
    rewards: list[tuple[str, str, int]] = []
    invalid: Counter[str] = Counter()
    example = None
    ids_ok: dict[Any, bool] = {}  # per distinct id: a message repeats its arms far more than it has them
    for record in records:
        reason = _check(record, ids_ok)
        if reason is not None:
            invalid[reason] += 1
            if example is None:
                example = record
        elif record[0] == "e":
            shown.update(record[3])
        else:
            reward = record[4]
            rewards.append((record[3], record[2], round(reward * REWARD_SCALE)))
    return Parsed(shown, rewards, invalid, example)


def _parse_sums(records: list[Any]) -> Parsed:
    """A format-3 message's valid entries: the per-arm sums, each entry alone, and the rewards, each alone."""
    shown: dict[str, int] = {}
    rewards: list[tuple[str, str, int]] = []
    invalid: Counter[str] = Counter()
    example = None
    ids_ok: dict[Any, bool] = {}
    for record in records:
        if type(record) is list and len(record) == 3 and record[0] == "i" and type(record[2]) is dict:
            for id_, n in record[2].items():  # JSON object keys are strings
                if type(n) is not int or not 0 < n < MAX_SHOWN:
                    reason = "count"
                elif id_problem(id_) is not None:
                    reason = "id"
                else:
                    shown[id_] = shown.get(id_, 0) + n
                    continue
                invalid[reason] += 1
                if example is None:
                    example = [id_, n]
            continue
        problem = _check(record, ids_ok) if type(record) is list and record[:1] == ["r"] else "record"
        if problem is not None:
            invalid[problem] += 1
            if example is None:
                example = record
        else:
            rewards.append((record[3], record[2], round(record[4] * REWARD_SCALE)))
    return Parsed(shown, rewards, invalid, example)


def _check(record: Any, ids_ok: dict[Any, bool]) -> str | None:
    """Why ``record`` cannot be applied (an ``INVALID_REASONS`` entry), or None if it can."""
    if type(record) is not list or len(record) < 4:
        return "record"
    kind, t, event_id = record[0], record[1], record[2]
    if type(t) not in (int, float):
        return "record"
    if kind == "e":
        ids = record[3]
        if type(ids) is not list:
            return "record"
    elif kind == "r" and len(record) >= 5:
        ids = [record[3]]
        reward = record[4]
        if type(reward) not in (int, float) or not 0.0 <= reward <= 1.0:
            return "reward"
    else:
        return "record"
    if type(event_id) is not str or not is_event_id(event_id):
        return "event_id"
    for id_ in ids:
        ok = ids_ok.get(id_) if type(id_) is str else False
        if ok is None:
            ok = ids_ok[id_] = id_problem(id_) is None
        if not ok:
            return "id"
    return None


#: gRPC status codes of a write that will not succeed however often it is tried: its window is given back (and after
#: the subscription's delivery attempts its messages reach the dead-letter topic) instead of blocking the learner.
PERMANENT_CODES = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "UNIMPLEMENTED"})


def _transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed if tried again (Bigtable away or slow, a channel replaced)."""
    code = getattr(exc, "code", None)
    if not callable(code):
        return True
    try:
        name = getattr(code(), "name", "")
    except Exception:
        return True
    return name not in PERMANENT_CODES


class _Throttled:
    """Logs a warning at most every ``every_s``; the next line says how many were held back meanwhile."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._next = 0.0
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self.every_s
        logger.warning(message + (f" ({held} more such lines held back)" if held else ""), *args)


class LearnerMetrics:
    """The learner's Prometheus metrics, in a registry of their own.

    The counters are ``LearnerStats`` read at each scrape (the hot path adds to plain ints); the histograms and the
    gauge are observed once per window (and once per message for the lag).
    """

    def __init__(self, stats: LearnerStats) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats))
        self.window_seconds = Histogram(
            "mab_learner_window_seconds",
            "Time to apply one window: its rows written and its messages acknowledged.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.lag_seconds = Histogram(
            "mab_learner_lag_seconds",
            "From a message's publish time (Pub/Sub's clock) to its acknowledgement.",
            buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
            registry=self.registry,
        )
        self.last_ack = Gauge(
            "mab_learner_last_ack_timestamp_seconds",
            "Unix time of the last acknowledged window.",
            registry=self.registry,
        )


class _StatsCollector(Collector):
    def __init__(self, stats: LearnerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        docs = {
            "messages": "Messages acknowledged.",
            "windows": "Windows applied and acknowledged.",
            "impressions": "Impressions added to Bigtable.",
            "rewards": "Rewards added to Bigtable.",
            "duplicates": "Impressions and rewards skipped: their marker was there (redelivered or repeated).",
            "malformed": "Deliveries of undecodable messages: nacked, dead-lettered after the delivery attempts.",
            "failed_windows": "Window writes that failed: retried with the messages held, or given back.",
            "errors": "Steps that failed (pull, write or acknowledgement) and were retried.",
            "writes": "CheckAndMutateRow calls.",
            "leases_taken": "Shard leases taken (free, expired or given back by another learner).",
            "leases_lost": "Shard leases found taken over by another learner at renewal.",
        }
        for f in fields(self.stats):
            if f.name in docs:
                yield CounterMetricFamily(f"mab_learner_{f.name}", docs[f.name], value=getattr(self.stats, f.name))
        yield GaugeMetricFamily(
            "mab_learner_shards_held", "Shards whose lease this learner holds.", value=self.stats.shards_held
        )
        invalid = CounterMetricFamily(
            "mab_learner_invalid_records",
            "Records skipped (the rest of their message applied), by reason: record, event_id, id, reward, count.",
            labels=["reason"],
        )
        for reason, n in self.stats.invalid_records.items():
            invalid.add_metric([reason], n)
        yield invalid


class Learner:
    """Applies a subscription's events and rewards to a Bigtable table's counts, exactly once.

    Args:
        subscription: ``projects/P/subscriptions/S``; in a table with shards, shard ``n``'s is ``S-shard-<n>``.
        table: ``projects/P/instances/I/tables/T`` (made by ``mab-service setup``).
        window_s: How long a window collects messages after its first one.
        max_messages: Messages per window at most.
        concurrency: Rows written at once.
        lease_ttl_s: How long a shard's lease lasts unrenewed (renewed every third of it).
        learner_id: This learner's name in the leases; random by default.
    """

    def __init__(
        self,
        subscription: str,
        table: str,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        max_messages: int = 1000,
        concurrency: int = 64,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        learner_id: str | None = None,
    ) -> None:
        self.subscription = subscription
        self.path = TablePath.parse(table)
        self.window_s = window_s
        self.max_messages = max_messages
        self.concurrency = concurrency
        self.lease_ttl_s = lease_ttl_s
        self.learner_id = learner_id or secrets.token_hex(6)
        self.shards = 0
        """The table's shard count (0: none; the one subscription is read)."""
        self.held: set[int] = set()
        """Shards whose lease this learner holds."""
        self.stats = LearnerStats()
        self.metrics = LearnerMetrics(self.stats)
        self._subscriber: Any = None
        self._ack_deadline_s = 10
        self._client: Any = None
        self._table: Any = None
        self._decode: Any = None
        self._table_name = table_field(str(self.path))
        self._metadata = self.path.routing
        self._invalid_log = _Throttled()
        self._undecodable_log = _Throttled()
        self._retry_log = _Throttled()
        self._pull_log = _Throttled()
        self._lease_log = _Throttled()
        self._stop = asyncio.Event()
        self._written: set[str] = set()
        """Rows of the window being written that are done: a retry of the window writes only the others."""
        self.fanout = CountsPublisher(table)
        """Publishes the counts of each window's arms for the replicas (``fanout``)."""
        self._received: deque[tuple[str, Any]] = deque()
        """Messages pulled and not yet in a window, with their subscription."""
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._pullers: dict[str, asyncio.Task[None]] = {}
        self._leaving: set[asyncio.Task[None]] = set()
        self._nacks: set[asyncio.Future[None]] = set()
        """Pullers of subscriptions given up, finishing their last pull."""
        self._leases: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, check that the subscription and the table exist, take this learner's share of the shards and
        start pulling.

        Raises:
            LearnerError: If the client libraries are missing, or the subscription or the table cannot be read.
        """
        try:
            from google.cloud.bigtable_v2.types import bigtable as messages
        except ImportError as exc:
            raise LearnerError(f"the learner needs mab-service[fleet] installed ({exc})") from None
        self._subscriber = subscriber_client()
        self._client = data_client(self.path.project)
        self._decode = messages.CheckAndMutateRowResponse.pb().FromString
        try:
            subscription = await self._subscriber.get_subscription(subscription=self.subscription, timeout=30)
        except Exception as exc:
            raise LearnerError(f"cannot read subscription {self.subscription}: {exc}") from None
        self._ack_deadline_s = max(int(subscription.ack_deadline_seconds), 10)
        try:
            await self.fanout.start(subscription.topic)
        except Exception as exc:
            # It reads the table's counts; a missing fan-out topic is only logged.
            raise LearnerError(f"cannot read Bigtable table {self.path}: {exc}") from None
        try:
            self._table = self._client.get_table(self.path.instance, self.path.table)
            await self._table.read_row(PROBE_KEY.encode(), operation_timeout=30)
            self.shards = await read_shards(self._table)
        except Exception as exc:
            raise LearnerError(f"cannot read Bigtable table {self.path}: {exc}") from None
        if not self.shards:
            self._follow({self.subscription})
            return
        try:
            await self._rebalance()
        except Exception as exc:
            raise LearnerError(f"cannot take shard leases in Bigtable table {self.path}: {exc}") from None
        self._leases = asyncio.ensure_future(self._keep_leases())

    async def close(self) -> None:
        """Stop pulling and give back the leases (another learner takes them at once, not after the TTL)."""
        await self.fanout.close()
        if self._leases is not None:
            self._leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._leases
        self._follow(set())
        if self._leaving or self._nacks:
            await asyncio.gather(*self._leaving, *self._nacks, return_exceptions=True)
        if self._table is not None and self.shards:
            try:
                await self._release(sorted(self.held), alive=False)
            except Exception as exc:  # they expire after the TTL instead
                logger.warning("giving back the leases of shards %s failed: %s", sorted(self.held), exc)
        if self._client is not None:
            await self._client.close()
        if self._subscriber is not None:
            await self._subscriber.transport.close()

    async def run(self, stop: asyncio.Event, log_every_s: float = 10.0) -> None:
        """Apply windows until ``stop`` is set (the current window finishes first, or is given back if its writes
        are failing)."""
        self._stop = stop
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

    async def _next_window(self, wait_s: float) -> list[tuple[str, Any]]:
        """The messages of the next window: waits up to ``wait_s`` for the first, then ``window_s`` for more, up to
        ``max_messages``."""
        # self._received is read anew after every wait: giving a subscription back replaces it (``_follow``).
        if not self._received:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait_s)
            if not self._received:
                return []
        window_end = time.monotonic() + self.window_s
        while len(self._received) < self.max_messages and (left := window_end - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        received = self._received
        window = [received.popleft() for _ in range(min(len(received), self.max_messages))]
        self._room.set()
        return window

    async def step(self, wait_s: float = 1.0) -> int:
        """One window: wait up to ``wait_s`` for the first message, apply, acknowledge; messages handled."""
        received = await self._next_window(wait_s)
        if not received:
            return 0
        started = time.perf_counter()
        window = _Window()
        kept: list[tuple[str, Any]] = []
        undecodable: list[tuple[str, Any]] = []
        for pulled in received:
            message = pulled[1]
            attributes = message.message.attributes
            key = attributes.get("k", "")
            version = attributes.get("v")
            parsed = parse(message.message.data, version) if version in _VERSIONS else None
            if parsed is None or MESSAGE_KEY.match(key) is None:
                undecodable.append(pulled)
                continue
            kept.append(pulled)
            window.add(key, parsed.shown, parsed.rewards)
            if parsed.invalid:
                self._skipped(message.message.message_id, parsed)
        self.stats.duplicates += window.duplicates
        lease = asyncio.ensure_future(self._lease(kept))
        rows: dict[str, list[Mark]] = window.rows
        try:
            while True:
                try:
                    await self._apply(rows)
                    break
                except Exception as exc:
                    self.stats.failed_windows += 1
                    if self._stop.is_set() or not _transient(exc):
                        # Written rows keep their markers, so the redelivered window skips them.
                        logger.warning("window of %d messages given back: %s", len(received), exc)
                        await self._modify_ack_deadline(received, 0)
                        return 0
                    # Held, not given back: every redelivery spends one of the subscription's delivery attempts,
                    # and past them Pub/Sub sends good messages to the dead-letter topic (an outage must not).
                    self._retry_log.warning(
                        "writing a window of %d messages failed, retrying in %.0f s with its messages held: %s",
                        len(kept),
                        ERROR_BACKOFF_S,
                        exc,
                    )
                    rows = {id_: marks for id_, marks in rows.items() if id_ not in self._written}
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), ERROR_BACKOFF_S)
        finally:
            lease.cancel()
        self.fanout.written(window.rows)  # the replicas' copy of these arms' counts (fanout), in the background
        for subscription, ack_ids in _by_subscription(kept).items():
            for s in range(0, len(ack_ids), ACKS_PER_CALL):
                await self._subscriber.acknowledge(subscription=subscription, ack_ids=ack_ids[s : s + ACKS_PER_CALL])
        if undecodable:
            await self._give_back(undecodable)
        now = time.time()
        self.metrics.window_seconds.observe(time.perf_counter() - started)
        self.metrics.last_ack.set(now)
        for _, message in kept:
            self.metrics.lag_seconds.observe(now - message.message.publish_time.timestamp())
        self.stats.messages += len(kept)
        self.stats.windows += 1
        return len(received)

    def _skipped(self, message_id: str, parsed: Parsed) -> None:
        invalid = self.stats.invalid_records
        for reason, n in parsed.invalid.items():
            invalid[reason] += n
        example = orjson.dumps(parsed.example)[:200].decode(errors="replace")
        self._invalid_log.warning(
            "message %s: %d invalid records skipped (%s), the rest applied; the first: %s",
            message_id,
            sum(parsed.invalid.values()),
            ", ".join(f"{reason} {n}" for reason, n in sorted(parsed.invalid.items())),
            example,
        )

    async def _give_back(self, undecodable: list[tuple[str, Any]]) -> None:
        """Nack messages that cannot be decoded: never acknowledged, they go to the dead-letter topic once the
        subscription's ``max_delivery_attempts`` are spent (``mab-service setup`` sets the policy)."""
        self.stats.malformed += len(undecodable)
        first = undecodable[0][1]
        self._undecodable_log.warning(
            "%d undecodable messages nacked (for the dead-letter topic), e.g. %s (delivery attempt %d, attributes "
            "%s): %r",
            len(undecodable),
            first.message.message_id,
            first.delivery_attempt,
            dict(first.message.attributes),
            bytes(first.message.data[:100]),
        )
        try:
            await self._modify_ack_deadline(undecodable, 0)
        except Exception as exc:  # they come back after the ack deadline instead: the same, later
            logger.warning("nacking %d undecodable messages failed: %s", len(undecodable), exc)

    async def _modify_ack_deadline(self, messages: list[tuple[str, Any]], deadline_s: int) -> None:
        for subscription, ack_ids in _by_subscription(messages).items():
            for s in range(0, len(ack_ids), ACKS_PER_CALL):
                await self._subscriber.modify_ack_deadline(
                    subscription=subscription, ack_ids=ack_ids[s : s + ACKS_PER_CALL], ack_deadline_seconds=deadline_s
                )

    async def _lease(self, messages: list[tuple[str, Any]]) -> None:
        """Extend a window's ack deadline, and that of the messages waiting for the next window, every half of it
        while the window is written: a big window (a backlog) or a slow table would otherwise have them delivered
        again meanwhile (counted once, written twice; and each redelivery spends a delivery attempt)."""
        while True:
            await asyncio.sleep(self._ack_deadline_s / 2)
            waiting = messages + list(self._received)
            try:
                await self._modify_ack_deadline(waiting, self._ack_deadline_s)
            except Exception as exc:  # the messages may come again: the markers count them once
                logger.warning("extending the ack deadline of %d messages failed: %s", len(waiting), exc)

    def _follow(self, subscriptions: set[str]) -> None:
        """Pull from exactly ``subscriptions``: start a puller for each new one, stop those no longer held and give
        back (nack) what was pulled of them and is not yet in a window, so that the new holder gets it at once."""
        dropped = set(self._pullers) - subscriptions
        for subscription in dropped:
            # Not cancelled: a pull cut short may have taken messages that would then wait out their ack deadline.
            self._leaving.add(self._pullers.pop(subscription))
        self._room.set()
        if dropped and self._received:
            given_back = [pulled for pulled in self._received if pulled[0] in dropped]
            if given_back:
                self._received = deque(pulled for pulled in self._received if pulled[0] not in dropped)
                task = asyncio.ensure_future(self._modify_ack_deadline(given_back, 0))
                self._nacks.add(task)
                # If the nack fails, the messages come back after their ack deadline: later, and counted once.
                task.add_done_callback(self._nacked)
        for subscription in sorted(subscriptions - set(self._pullers)):
            self._pullers[subscription] = asyncio.ensure_future(self._puller(subscription))

    def _nacked(self, task: asyncio.Future[None]) -> None:
        self._nacks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("giving back pulled messages failed: %s", task.exception())

    async def _puller(self, subscription: str) -> None:
        """Pull ``subscription`` into the window's queue while it has room (``max_messages``)."""
        from google.api_core import exceptions

        me = asyncio.current_task()
        idle_s = 0.0
        try:
            while self._pullers.get(subscription) is me:
                if idle_s:
                    await asyncio.sleep(idle_s)
                room = self.max_messages - len(self._received)
                if room <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                try:
                    response = await self._subscriber.pull(
                        subscription=subscription, max_messages=min(room, 1000), timeout=PULL_WAIT_S, retry=None
                    )
                except exceptions.DeadlineExceeded:
                    continue
                except Exception as exc:  # Pub/Sub away: what was not pulled is still there
                    self.stats.errors += 1
                    self._pull_log.warning(
                        "pulling %s failed, retrying in %.0f s: %s", subscription, ERROR_BACKOFF_S, exc
                    )
                    await asyncio.sleep(ERROR_BACKOFF_S)
                    continue
                pulled = [(subscription, m) for m in response.received_messages]
                if self._pullers.get(subscription) is not me:  # given up meanwhile: for the new holder
                    if pulled:
                        with contextlib.suppress(Exception):
                            await self._modify_ack_deadline(pulled, 0)
                    return
                if pulled:
                    idle_s = 0.0
                    self._received.extend(pulled)
                    self._arrived.set()
                else:
                    idle_s = min(max(idle_s * 2, IDLE_PULL_MIN_S), IDLE_PULL_MAX_S)
        finally:
            self._leaving.discard(me)

    def _subscriptions(self) -> set[str]:
        """What the held shards read: their subscriptions, and the fleet's own with shard 0."""
        wanted = {shard_subscription(self.subscription, shard) for shard in self.held}
        if 0 in self.held:
            wanted.add(self.subscription)
        return wanted

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            try:
                await self._rebalance()
            except Exception as exc:  # Bigtable away: the leases held are kept (the markers make overlaps exact)
                self.stats.errors += 1
                self._lease_log.warning("renewing shard leases failed: %s", exc)

    async def _rebalance(self) -> None:
        """Mark this learner alive, renew its leases, give back those past its fair share, take free or expired
        ones up to it, and pull what the leases held now read."""
        from google.cloud.bigtable.data import (
            DeleteRangeFromColumn,
            ReadRowsQuery,
            RowRange,
            SetCell,
            row_filters,
        )

        now = time.time()
        stamp = int(now * 1000) * 1000  # Bigtable's granularity: milliseconds
        me = self.learner_id.encode()
        timeout = max(self.lease_ttl_s / 3, 1.0)
        await self._table.mutate_row(
            learner_row(self.learner_id),
            [DeleteRangeFromColumn(FLEET_FAMILY, ALIVE), SetCell(FLEET_FAMILY, ALIVE, b"", stamp)],
            operation_timeout=timeout,
        )
        rows = await self._table.read_rows(
            ReadRowsQuery(
                row_ranges=[
                    RowRange(LEARNER_ROW_PREFIX, LEARNER_ROW_PREFIX[:-1] + b"0"),
                    RowRange(LEASE_ROW_PREFIX, LEASE_ROW_PREFIX[:-1] + b"0"),
                ],
                row_filter=row_filters.FamilyNameRegexFilter(FLEET_FAMILY),
            ),
            operation_timeout=timeout,
        )
        live_after = stamp - int(self.lease_ttl_s * 1_000_000)
        learners = 0
        holders: dict[int, tuple[bytes, int]] = {}
        for row in rows:
            cell = row.cells[0]
            if row.row_key.startswith(LEARNER_ROW_PREFIX):
                learners += cell.timestamp_micros >= live_after
            elif row.row_key[len(LEASE_ROW_PREFIX) :].isdigit():
                holders[int(row.row_key[len(LEASE_ROW_PREFIX) :])] = (cell.value, cell.timestamp_micros)
        fair = math.ceil(self.shards / max(learners, 1))
        mine = _held_by(row_filters, me)
        renew = [DeleteRangeFromColumn(FLEET_FAMILY, LEASE), SetCell(FLEET_FAMILY, LEASE, me, stamp)]
        for shard in sorted(self.held):
            if not await self._table.check_and_mutate_row(
                lease_row(shard), mine, true_case_mutations=renew, operation_timeout=timeout
            ):
                self.held.discard(shard)
                self.stats.leases_lost += 1
                logger.warning("the lease of shard %d was taken over by another learner", shard)
        if len(self.held) > fair:
            await self._release(sorted(self.held)[fair:])
        elif len(self.held) < fair:
            live = row_filters.RowFilterChain(
                [
                    row_filters.ColumnQualifierRegexFilter(b"^lease$"),
                    row_filters.TimestampRangeFilter(start=_datetime(live_after)),
                ]
            )
            free = [
                shard
                for shard in range(self.shards)
                if shard not in self.held and (shard not in holders or holders[shard][1] < live_after)
            ]
            # Each learner tries the free shards in an order of its own, so that learners starting together rarely
            # race for the same lease.
            free.sort(key=lambda shard: zlib.crc32(b"%s/%d" % (me, shard)))
            for shard in free:
                if len(self.held) >= fair:
                    break
                if not await self._table.check_and_mutate_row(
                    lease_row(shard), live, false_case_mutations=renew, operation_timeout=timeout
                ):
                    self.held.add(shard)
                    self.stats.leases_taken += 1
        self.stats.shards_held = len(self.held)
        self._follow(self._subscriptions())

    async def _release(self, shards: list[int], *, alive: bool = True) -> None:
        """Give back the leases of ``shards`` (if still this learner's); without ``alive``, also its live mark."""
        from google.cloud.bigtable.data import DeleteAllFromRow, DeleteRangeFromColumn, row_filters

        me = self.learner_id.encode()
        timeout = max(self.lease_ttl_s / 3, 1.0)
        for shard in shards:
            self.held.discard(shard)
            self._follow(self._subscriptions())
            await self._table.check_and_mutate_row(
                lease_row(shard),
                _held_by(row_filters, me),
                true_case_mutations=[DeleteRangeFromColumn(FLEET_FAMILY, LEASE)],
                operation_timeout=timeout,
            )
        self.stats.shards_held = len(self.held)
        if not alive:
            await self._table.mutate_row(learner_row(self.learner_id), [DeleteAllFromRow()], operation_timeout=timeout)

    async def _apply(self, rows: dict[str, list[Mark]]) -> None:
        """Write every row of the window, ``concurrency`` at once; the first failure cancels the rest and raises."""
        # The client's channel of the moment: it replaces its channel every ~40 minutes (a call made on the old one
        # fails once that is closed), so the stub is taken per window.
        call = self._client.transport.grpc_channel.unary_unary(
            CHECK_AND_MUTATE_ROW, request_serializer=None, response_deserializer=self._decode
        )
        self._written = set()
        work = iter(rows.items())
        writers = [asyncio.ensure_future(self._writer(call, work)) for _ in range(min(self.concurrency, len(rows)))]
        try:
            await asyncio.gather(*writers)
        except BaseException:
            for writer in writers:
                writer.cancel()
            await asyncio.gather(*writers, return_exceptions=True)
            raise

    async def _writer(self, call: Any, work: Iterator[tuple[str, list[Mark]]]) -> None:
        for id_, marks in work:
            key = id_.encode()
            for s in range(0, len(marks), MARKERS_PER_CALL):
                chunk = marks[s : s + MARKERS_PER_CALL]
                if await self._write(call, key, chunk):
                    # Some marker is there already: apply each alone, under its own check.
                    for mark in chunk:
                        if await self._write(call, key, [mark]):
                            self.stats.duplicates += mark[2] or 1  # its impressions, or one reward
            self._written.add(id_)

    async def _write(self, call: Any, key: bytes, marks: list[Mark]) -> bool:
        """Write ``marks`` and add their counts unless one of them is in the row; whether one was."""
        self.stats.writes += 1
        request = check_and_mutate(self._table_name, key, marks)
        response = await call(request, timeout=WRITE_TIMEOUT_S, metadata=self._metadata)
        matched = bool(response.predicate_matched)
        if not matched:
            for _, _, n, _ in marks:
                if n:
                    self.stats.impressions += n
                else:
                    self.stats.rewards += 1
        return matched
