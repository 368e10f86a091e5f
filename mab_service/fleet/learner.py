"""The fleet's learner: Pub/Sub messages of events and rewards in, exact counts in Bigtable out.

The arms are split into shards (``mab-service setup``; a table without shards is one shard), and each shard is read
and written by the one learner holding its **lease**, a row ``\x00s/<shard>`` whose cell ``s:lease`` names the
holder, its timestamp the last renewal. Every third of ``lease_ttl_s`` a learner marks itself alive (``\x00l/<id>``),
counts the live learners, renews its leases (a CheckAndMutateRow on the holder's name: a lease taken over meanwhile
is lost, not renewed), gives back those past its fair share (shards / live learners, rounded up) and takes free or
expired ones up to it (a CheckAndMutateRow unless a lease cell younger than the TTL is there).

Being a shard's only writer, the holder keeps the shard's state, and exactly once lives in **one atomic commit per
shard and window on the shard's own row** instead of markers in every arm row:

1. **Taking a shard**, it reads the row: the **version** of the last committed window, that window's absolute
   counts (the **pending window**), and per publisher stream (``<publisher id>.<shard>``, the part of a message's
   key ``k`` before ``/<sequence>``) the **applied set** of its sequence numbers (``Applied``: a low-water mark and
   the few ranges above it). It writes the pending window to the arm rows first: its holder may have stopped between
   commit and apply.
2. **A window**: the messages whose (stream, sequence) is in the applied set are duplicates (a redelivery, a
   publisher's resend): acknowledged, counted, not applied. The others' impressions and rewards are added to the
   arms' counts, which the learner caches (filled by one ReadRows of the arms not cached: family ``n``, else the
   sums ``c`` of a table written by earlier learners).
3. **Commit**: one CheckAndMutateRow on the shard row, on condition that its lease names this learner: the new
   version (``max(version + 1, now in ms)``), the window's absolute counts (the new pending window, in chunks
   ``s:w/<k>``) and the changed applied sets; streams unheard of for longer than the subscription's retention plus
   an hour are deleted (no redelivery of theirs can come). A lease found lost: the shard's state is dropped and its
   messages given back.
4. **Apply**: one MutateRows sets each changed arm's ``n:i`` and ``n:r`` (deleting their older cells) **with the
   cell timestamp = the version**. A learner whose lease expired while it still writes (a zombie) writes an older
   timestamp, which readers (the newest cell) never see. Then the messages are acknowledged. Killed between 3 and 4:
   the next holder applies the pending window (1); after 4: the applied sets skip the redeliveries.

An arm's counts within a segment (a message's ``s`` records, a reward's segment) are a row of their own,
``schema.segment_row``, in the arm's shard: the window counts, commits and writes them as it does the arm's.

So arm rows hold their two count cells and nothing else, and the shard row a small state per live publisher; a
window costs a shard one CheckAndMutateRow and one MutateRows, whatever its arms. Rewards need no deduplication
here: a replica claims a reward on its event's row before it publishes it (``fleet.replica``), so each is in one
message. The fleet's own subscription (publishers without shards: replicas of an earlier version) is read by the
holder of shard 0, which publishes each of its messages again, split, to every shard's topic (``_forward``).

A message is applied record by record: a record that breaks the format (an id outside the id rule, a reward outside
[0, 1], an event id outside its rule, a record of another shape) is skipped, counted by reason and logged, and every
other record of the message counts, since each was answered 202 or 200 on its own. A message that cannot be decoded
at all (not a JSON array, no key, another format version) is not acknowledged but nacked, so that the subscription's
dead-letter policy (``fleet.setup``) forwards it to the dead-letter topic after its delivery attempts: kept for a
person to read, never dropped. docs/fleet.md argues the design.
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
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import orjson
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mab_service.errors import MabError
from mab_service.features.bigtable import agree_half_life, data_client, read_shards
from mab_service.fleet.fanout import CountsPublisher, publisher_client
from mab_service.fleet.requests import (
    MUTATE_ROWS,
    counts_entry,
    decayed_entry,
    older_decayed_than,
    older_than,
    quote,
    table_field,
    varint,
)
from mab_service.fleet.schema import (
    ABSOLUTE_FAMILY,
    ALIVE,
    APPLIED_PREFIX,
    COUNTS_FAMILY,
    FLEET_FAMILY,
    LEARNER_ROW_PREFIX,
    LEASE,
    LEASE_ROW_PREFIX,
    PENDING_PREFIX,
    PROBE_KEY,
    REWARD_SCALE,
    VERSION,
    TablePath,
    arm_counts,
    decayed_counts,
    epoch_of,
    learner_row,
    lease_row,
    segment_row,
    version_micros,
    weight,
)
from mab_service.fleet.setup import shard_subscription
from mab_service.fleet.sink import FORMAT_VERSION, RECORDS_VERSION, shard_of, shard_topic
from mab_service.fleet.windows import (
    Applied,
    Decayed,
    DecayedPlan,
    Message,
    Plan,
    ShardState,
    decode_decayed_window,
    decode_window,
    encode_decayed_window,
    encode_window,
    merged,
)
from mab_service.ids import MAX_ID_BYTES, id_problem, is_event_id, segment_problem

logger = logging.getLogger("mab_service.learner")

#: Arm rows per MutateRows call at most (four mutations each: Bigtable takes up to 100,000 a call), and the bytes of
#: a call's entries after which no more are added (Google's emulator takes requests of up to 4 MiB).
ENTRIES_PER_CALL = 25_000
BULK_BYTES = 2 * 1024 * 1024
#: How long past the subscription's retention a stream's applied set is kept without news: no redelivery of its
#: messages can come later.
FORGET_MARGIN_S = 3600
#: A message key: ``<publisher id>.<shard>/<sequence>``, or ``<publisher id>/<sequence>`` without shards
#: (``pubsub.PubSubSink``).
MESSAGE_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}/[0-9]{1,20}$")
__all__ = ["MAX_ID_BYTES", "Learner", "LearnerError", "LearnerStats"]
#: Why a record is skipped: the ``reason`` label of ``mab_learner_invalid_records_total``.
INVALID_REASONS = ("record", "event_id", "id", "reward", "count", "segment")
#: Message formats read: this version's, and the one before it (replicas of an older version, during an upgrade).
_VERSIONS = frozenset({FORMAT_VERSION, RECORDS_VERSION})
#: The most impressions of one arm a format-3 message may carry (a replica's batch holds far fewer).
MAX_SHOWN = 1 << 31
#: Seconds between two log lines about skipped records or undecodable messages (the counters count them all).
LOG_EVERY_S = 10.0
#: How many ack ids go in one Acknowledge call (the request must stay under 512 KB).
ACKS_PER_CALL = 1000
ERROR_BACKOFF_S = 1.0
#: Deadline of one Bigtable call; a commit that runs out is settled by reading the shard's row again.
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
    """Impressions and rewards skipped because their message was applied already (in its stream's applied set):
    redeliveries, a publisher's resends."""
    malformed: int = 0
    """Deliveries of messages that cannot be decoded (not a JSON array, no key, another version): nacked, never
    acknowledged, so that the subscription's dead-letter policy forwards them after its delivery attempts."""
    failed_windows: int = 0
    """Attempts to write a window that failed: retried with its messages held while the error is transient (Bigtable
    away), else the window is given back to Pub/Sub."""
    writes: int = 0
    """MutateRows calls made (the arm rows' counts, one a shard and window for up to ``ENTRIES_PER_CALL`` arms)."""
    commits: int = 0
    """CheckAndMutateRow calls on shard rows (one a shard and window)."""
    reads: int = 0
    """ReadRows calls filling the shards' caches (arms not yet cached)."""
    invalid_counts: int = 0
    """Arms whose stored counts were not non-negative int64 (counted from 0 again)."""
    windows_reapplied: int = 0
    """Committed windows written again to the arm rows on taking a shard (its holder may have stopped between)."""
    forwarded: int = 0
    """Messages of publishers without shards published again, split, to the shard topics."""
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
    segments: dict[str, dict[str, int]]
    """Impressions per segment and arm (answers ranked within a segment)."""
    segment_rewards: list[tuple[str, str, str, int]]
    """``(segment, id, event_id, millionths)``: the rewards of answers ranked within a segment, credited there too."""

    def counts(self) -> Message:
        """The message's counts per row: the arms', and the arms' within their segments under their segment rows'
        keys (``schema.segment_row``), which the window commits and writes as it does the arms'."""
        if not self.segments and not self.segment_rewards:
            return self.shown, self.rewards
        shown = dict(self.shown)
        for segment, sums in self.segments.items():
            for id_, n in sums.items():
                shown[segment_row(segment, id_)] = n
        rewards = self.rewards + [
            (segment_row(segment, id_), event_id, millionths)
            for segment, id_, event_id, millionths in self.segment_rewards
        ]
        return shown, rewards


def parse(data: bytes, version: str = FORMAT_VERSION) -> Parsed | None:
    """A message's valid records, each on its own; None if the message cannot be decoded at all (not a JSON array).

    Format 3 (``pubsub``): the impressions summed per arm in one record ``["i", events, {id: n}]``, each entry checked
    on its own (an id outside the id rule: reason ``id``; a count that is not an integer in [1, 2^31): ``count``),
    the impressions of answers ranked within a segment summed per arm in a record ``["s", segment, {id: n}]`` per
    segment (a segment outside its rule: reason ``segment``, for the record), then reward records, whose sixth item,
    if any, is the segment of the answer (a bad one: reason ``segment``, and the reward counts for the arm alone).
    Format 2: a record per answer, ``["e", t, event_id, [ids]]``, and the same reward records.
    """
    records = _json_array(data)
    if records is None:
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
    return Parsed(shown, rewards, invalid, example, {}, [])


def _parse_sums(records: list[Any]) -> Parsed:
    """A format-3 message's valid entries: the per-arm sums, each entry alone, and the rewards, each alone."""
    shown: dict[str, int] = {}
    segments: dict[str, dict[str, int]] = {}
    rewards: list[tuple[str, str, int]] = []
    segment_rewards: list[tuple[str, str, str, int]] = []
    invalid: Counter[str] = Counter()
    example = None
    ids_ok: dict[Any, bool] = {}
    for record in records:
        if type(record) is list and len(record) == 3 and record[0] in ("i", "s") and type(record[2]) is dict:
            if record[0] == "i":
                into = shown
            elif type(record[1]) is str and segment_problem(record[1]) is None:
                into = segments.setdefault(record[1], {})
            else:
                invalid["segment"] += 1
                if example is None:
                    example = record[:2]
                continue
            for id_, n in record[2].items():  # JSON object keys are strings
                if type(n) is not int or not 0 < n < MAX_SHOWN:
                    reason = "count"
                elif id_problem(id_) is not None:
                    reason = "id"
                else:
                    into[id_] = into.get(id_, 0) + n
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
            continue
        millionths = round(record[4] * REWARD_SCALE)
        rewards.append((record[3], record[2], millionths))
        if len(record) > 5:
            segment = record[5]
            if type(segment) is str and segment_problem(segment) is None:
                segment_rewards.append((segment, record[3], record[2], millionths))
            else:
                invalid["segment"] += 1
                if example is None:
                    example = record
    return Parsed(shown, rewards, invalid, example, segments, segment_rewards)


#: With a half-life, how far past the learner's clock a record's time may be (a publisher's clock ahead of it); a
#: message with a later time, or one that is not a finite number > 0, is undecodable: it would move sums to an epoch
#: where everything else reads as 0.
MAX_AHEAD_S = 600.0


class Weighted(NamedTuple):
    """With a half-life, a message's valid records as forward-decayed sums per row (``schema.weight`` of each
    record's own time), and what was skipped of it."""

    sums: dict[str, Decayed]
    """Per row (an arm, or an arm within a segment: ``schema.segment_row``): epoch, impressions, rewards."""
    impressions: int
    """Impressions of arms (segment rows repeat them), for the counters."""
    rewards: int
    invalid: Counter[str]
    example: Any


def _json_array(data: bytes) -> list[Any] | None:
    """A message's records: ``data`` as a JSON array, or None if it is not one."""
    try:
        records = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return records if type(records) is list else None


def parse_decayed(data: bytes, half_life_s: float, now: float) -> Weighted | None:
    """With a half-life, a format-3 message's valid records (``["a", t, [ids]]`` with the answer's segment as a fourth
    item if any, and the reward records) as forward-decayed sums; None if it cannot be decoded at all: not a JSON
    array, or a record's time that is not a finite number in (0, now + ``MAX_AHEAD_S``] (nacked, for the dead-letter
    topic: such a number must not reach the sums). Other problems skip their record, as ``parse`` does; the sums
    records of a message without a half-life (``i``, ``s``) are skipped as ``record``."""
    records = _json_array(data)
    if records is None:
        return None
    # Sums per epoch (a message's records nearly always share one), as lists added to in place; merged across epochs
    # at the end, in a fixed order, so that the same message always gives the same sums.
    by_epoch: dict[int, dict[str, list[float]]] = {}
    invalid: Counter[str] = Counter()
    example = None
    impressions = rewards = 0
    ids_ok: dict[Any, bool] = {}
    latest = now + MAX_AHEAD_S

    def add(into: dict[str, list[float]], row: str, k: int, amount: float) -> None:
        count = into.get(row)
        if count is None:
            into[row] = [amount, 0.0] if k == 0 else [0.0, amount]
        else:
            count[k] += amount

    def good(id_: Any) -> bool:
        ok = ids_ok.get(id_) if type(id_) is str else False
        if ok is None:
            ok = ids_ok[id_] = id_problem(id_) is None
        return ok

    for record in records:
        problem = "record"
        if type(record) is list and len(record) >= 3 and record[0] in ("a", "r"):
            t = record[1]
            if type(t) not in (int, float) or not 0 < t <= latest:
                return None  # a time out of range (orjson reads no NaN or infinity): not for the sums
            epoch = epoch_of(t, half_life_s)
            w = weight(t, epoch, half_life_s)
            into = by_epoch.get(epoch)
            if into is None:
                into = by_epoch[epoch] = {}
            if record[0] == "a" and type(record[2]) is list and len(record) <= 4:
                ids = record[2]
                if all(good(id_) for id_ in ids):
                    segment = record[3] if len(record) == 4 else None
                    if segment is not None and (type(segment) is not str or segment_problem(segment) is not None):
                        segment = None  # the impressions count for the arms alone
                        invalid["segment"] += 1
                        if example is None:
                            example = record
                    for id_ in ids:
                        add(into, id_, 0, w)
                        if segment is not None:
                            add(into, segment_row(segment, id_), 0, w)
                    impressions += len(ids)
                    continue
                problem = "id"
            elif record[0] == "r":
                checked = _check(record, ids_ok)
                if checked is None:
                    got = float(record[4]) * w
                    add(into, record[3], 1, got)
                    rewards += 1
                    if len(record) > 5:
                        segment = record[5]
                        if type(segment) is str and segment_problem(segment) is None:
                            add(into, segment_row(segment, record[3]), 1, got)
                        else:
                            invalid["segment"] += 1
                            if example is None:
                                example = record
                    continue
                problem = checked
        invalid[problem] += 1
        if example is None:
            example = record
    sums: dict[str, Decayed] = {}
    for epoch in sorted(by_epoch):
        for row, (shown, got) in by_epoch[epoch].items():
            sums[row] = merged(sums.get(row), epoch, shown, got)
    return Weighted(sums, impressions, rewards, invalid, example)


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
            "duplicates": "Impressions and rewards skipped: their message was applied already (redelivered, resent).",
            "malformed": "Deliveries of undecodable messages: nacked, dead-lettered after the delivery attempts.",
            "failed_windows": "Window writes that failed: retried with the messages held, or given back.",
            "errors": "Steps that failed (pull, write or acknowledgement) and were retried.",
            "writes": "MutateRows calls writing arm rows' counts.",
            "commits": "CheckAndMutateRow calls committing a shard's window on its row.",
            "reads": "ReadRows calls filling the shards' caches of counts.",
            "invalid_counts": "Arms whose stored counts were not non-negative int64 (counted from 0 again).",
            "windows_reapplied": "Committed windows written again to the arm rows on taking a shard.",
            "forwarded": "Messages of publishers without shards published again, split, to the shard topics.",
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
            "Records skipped (the rest of their message applied), by reason: record, event_id, id, reward, count, "
            "segment.",
            labels=["reason"],
        )
        for reason, n in self.stats.invalid_records.items():
            invalid.add_metric([reason], n)
        yield invalid


class Learner:
    """Applies a subscription's events and rewards to a Bigtable table's counts, exactly once, for the shards whose
    lease it holds.

    Args:
        subscription: ``projects/P/subscriptions/S``; in a table with shards, shard ``n``'s is ``S-shard-<n>``.
        table: ``projects/P/instances/I/tables/T`` (made by ``mab-service setup``).
        window_s: How long a window collects messages after its first one.
        max_messages: Messages per window at most.
        concurrency: Shards of a window written at once (each a commit and a MutateRows).
        lease_ttl_s: How long a shard's lease lasts unrenewed (renewed every third of it).
        learner_id: This learner's name in the leases; random by default.
        half_life_s: The fleet's half-life (0: none): the counts are forward-decayed sums (``schema.weight``), and
            the table's half-life must be this one (``features.bigtable.agree_half_life``).
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
        half_life_s: float = 0.0,
    ) -> None:
        self.subscription = subscription
        self.half_life_s = half_life_s
        self._half_life_attribute = repr(float(half_life_s)) if half_life_s else None
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
        self._states: dict[int, ShardState] = {}
        """The held shards' state (a shard held and not here is read from its row before its next window)."""
        self._shard_of: dict[str, int | None] = {}
        """The shard each subscription read carries (None: the fleet's own in a table with shards, forwarded)."""
        self.forget_after_s = float(FORGET_MARGIN_S)
        """How long a stream's applied set is kept without news: the subscription's retention plus the margin."""
        self._counts_filter: Any = None
        self._publisher: Any = None
        self._topic = ""
        self.fanout = CountsPublisher()
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
        from google.cloud.bigtable.data import row_filters

        self._decode = messages.MutateRowsResponse.pb().FromString
        # An arm's newest counts cells: family n (absolute) and c (sums, a table of earlier learners).
        self._counts_filter = row_filters.RowFilterChain(
            [
                row_filters.FamilyNameRegexFilter(f"^[{ABSOLUTE_FAMILY}{COUNTS_FAMILY}]$"),
                row_filters.CellsColumnLimitFilter(1),
            ]
        )
        try:
            subscription = await self._subscriber.get_subscription(subscription=self.subscription, timeout=30)
        except Exception as exc:
            raise LearnerError(f"cannot read subscription {self.subscription}: {exc}") from None
        self._ack_deadline_s = max(int(subscription.ack_deadline_seconds), 10)
        retention = subscription.message_retention_duration
        retention_s = retention.total_seconds() if retention else 7 * 86_400  # Pub/Sub's default: 7 days
        self.forget_after_s = retention_s + FORGET_MARGIN_S
        self._topic = subscription.topic
        self._publisher = publisher_client()
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
        try:
            await agree_half_life(self._table, self.half_life_s)
        except MabError as exc:
            raise LearnerError(exc.message) from None
        except Exception as exc:
            raise LearnerError(f"cannot read the fleet's half-life in Bigtable table {self.path}: {exc}") from None
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
        if self._table is not None:
            try:
                await self._release(sorted(self.held), alive=False)
            except Exception as exc:  # they expire after the TTL instead
                logger.warning("giving back the leases of shards %s failed: %s", sorted(self.held), exc)
        if self._client is not None:
            await self._client.close()
        if self._subscriber is not None:
            await self._subscriber.transport.close()
        if self._publisher is not None:
            await self._publisher.transport.close()

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
        kept: list[tuple[str, Any]] = []
        undecodable: list[tuple[str, Any]] = []
        given_back: list[tuple[str, Any]] = []
        by_shard: dict[int, list[tuple[str, int, Parsed | Weighted]]] = {}
        messages_of: dict[int, list[tuple[str, Any]]] = {}
        forwarded: list[tuple[str, int, Parsed]] = []
        forwarded_messages: list[tuple[str, Any]] = []
        for pulled in received:
            subscription, message = pulled
            attributes = message.message.attributes
            key = attributes.get("k", "")
            version = attributes.get("v")
            parsed: Parsed | Weighted | None = None
            if attributes.get("h") != self._half_life_attribute:
                pass  # a publisher of another half-life (or none, or one where this learner has none): not countable
            elif self.half_life_s:
                if version == FORMAT_VERSION:
                    parsed = parse_decayed(message.message.data, self.half_life_s, time.time())
            elif version in _VERSIONS:
                parsed = parse(message.message.data, version)
            if parsed is None or MESSAGE_KEY.match(key) is None:
                undecodable.append(pulled)
                continue
            stream, _, seq = key.rpartition("/")
            forward = self.shards > 0 and subscription == self.subscription  # publishers without shards
            shard = self._shard_of.get(subscription)
            if not forward and shard is None:  # a subscription given up since it was pulled: for the next holder
                given_back.append(pulled)
                continue
            if not forward and self.shards and not stream.endswith(f".{shard}"):
                undecodable.append(pulled)  # another shard's stream on this shard's topic: a publisher of another table
                continue
            if forward and isinstance(parsed, Weighted):
                # Replicas without shards are of a version without half-lives: such a message names one by mistake.
                undecodable.append(pulled)
                continue
            kept.append(pulled)
            if parsed.invalid:
                self._skipped(message.message.message_id, parsed)
            if forward:  # arms of every shard: published again, split, to the shard topics
                assert isinstance(parsed, Parsed)
                forwarded.append((stream, int(seq), parsed))
                forwarded_messages.append(pulled)
            elif shard is not None:
                by_shard.setdefault(shard, []).append((stream, int(seq), parsed))
                messages_of.setdefault(shard, []).append(pulled)
        lease = asyncio.ensure_future(self._lease(kept))
        try:
            limit = asyncio.Semaphore(self.concurrency)

            async def write(shard: int, items: list[tuple[str, int, Parsed | Weighted]]) -> bool:
                async with limit:
                    return await self._write_shard(shard, items)

            outcomes = await asyncio.gather(
                *(write(shard, items) for shard, items in by_shard.items()), self._forward(forwarded)
            )
        finally:
            lease.cancel()
        done: list[tuple[str, Any]] = list(forwarded_messages) if outcomes[-1] else []
        for shard, ok in zip(by_shard, outcomes):
            (done if ok else given_back).extend(messages_of[shard])
        if not outcomes[-1]:
            given_back.extend(forwarded_messages)
        for subscription, ack_ids in _by_subscription(done).items():
            for s in range(0, len(ack_ids), ACKS_PER_CALL):
                await self._subscriber.acknowledge(subscription=subscription, ack_ids=ack_ids[s : s + ACKS_PER_CALL])
        if given_back:
            logger.warning("%d messages given back (their shard is not held, or its window failed)", len(given_back))
            await self._modify_ack_deadline(given_back, 0)
        if undecodable:
            await self._give_back(undecodable)
        now = time.time()
        self.metrics.window_seconds.observe(time.perf_counter() - started)
        self.metrics.last_ack.set(now)
        for _, message in done:
            self.metrics.lag_seconds.observe(now - message.message.publish_time.timestamp())
        self.stats.messages += len(done)
        self.stats.windows += 1
        return len(received)

    def _skipped(self, message_id: str, parsed: Parsed | Weighted) -> None:
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
        """What the held shards read: their subscriptions, and the fleet's own with shard 0 (in a table without
        shards, the one shard's subscription)."""
        if not self.shards:
            self._shard_of = {self.subscription: 0}
            return {self.subscription} if 0 in self.held else set()
        self._shard_of = {shard_subscription(self.subscription, shard): shard for shard in self.held}
        if 0 in self.held:
            self._shard_of[self.subscription] = None
        return set(self._shard_of)

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
                # Only the leases and the live marks: a shard row also holds its windows and applied sets.
                row_filter=row_filters.RowFilterChain(
                    [
                        row_filters.FamilyNameRegexFilter(FLEET_FAMILY),
                        row_filters.ColumnQualifierRegexFilter(b"^(?:" + LEASE + b"|" + ALIVE + b")$"),
                    ]
                ),
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
        leases = max(self.shards, 1)  # a table without shards is one shard, read from the fleet's subscription
        fair = math.ceil(leases / max(learners, 1))
        mine = _held_by(row_filters, me)
        renew = [DeleteRangeFromColumn(FLEET_FAMILY, LEASE), SetCell(FLEET_FAMILY, LEASE, me, stamp)]
        for shard in sorted(self.held):
            if not await self._table.check_and_mutate_row(
                lease_row(shard), mine, true_case_mutations=renew, operation_timeout=timeout
            ):
                self.held.discard(shard)
                self._states.pop(shard, None)
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
                for shard in range(leases)
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
                    await self._take(shard)
        self.stats.shards_held = len(self.held)
        self._follow(self._subscriptions())

    async def _take(self, shard: int) -> None:
        """Read a shard just taken, writing its last committed window to the arm rows; if that fails, the shard's
        first window does it."""
        try:
            state = await self._load(shard)
        except Exception as exc:
            self.stats.errors += 1
            self._lease_log.warning("reading shard %d's row failed (its first window reads it again): %s", shard, exc)
            return
        if state is not None:
            self._states.setdefault(shard, state)  # a window may have read it meanwhile, and gone on from there

    async def _release(self, shards: list[int], *, alive: bool = True) -> None:
        """Give back the leases of ``shards`` (if still this learner's); without ``alive``, also its live mark."""
        from google.cloud.bigtable.data import DeleteAllFromRow, DeleteRangeFromColumn, row_filters

        me = self.learner_id.encode()
        timeout = max(self.lease_ttl_s / 3, 1.0)
        for shard in shards:
            self.held.discard(shard)
            self._states.pop(shard, None)
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

    async def _write_shard(self, shard: int, items: list[tuple[str, int, Parsed | Weighted]]) -> bool:
        """Commit a shard's part of the window on its row, then write its arms' counts; whether its messages may be
        acknowledged (else they are given back). A write that fails is retried every ``ERROR_BACKOFF_S`` with the
        messages held while the error is transient; a commit whose outcome is unknown is settled by reading the
        shard's row again (``_load``), whose applied sets then say which messages it counted."""
        while True:
            state = self._states.get(shard)
            try:
                if state is None:
                    if shard not in self.held:
                        return False
                    state = await self._load(shard)
                    if state is None:
                        self._lost(shard)
                        return False
                    self._states[shard] = state
                if state.unapplied:  # the window before: committed, not yet in the arm rows
                    await self._bulk(state.unapplied)
                    state.unapplied = []
                plan = self._plan(state, items)
                if plan.applied:
                    await self._fill(state, [*plan.shown, *plan.got])
                    if not await self._commit(state, plan):
                        self._lost(shard)
                        return False
                    self.stats.duplicates += plan.duplicates
                    self.stats.impressions += plan.impressions
                    self.stats.rewards += plan.rewards
                    await self._bulk(state.unapplied)
                    state.unapplied = []
                    self._published(state, plan)
                else:
                    self.stats.duplicates += plan.duplicates
                return True
            except Exception as exc:
                self.stats.failed_windows += 1
                if state is not None and not state.unapplied:  # the commit's outcome is unknown: read the row again
                    self._states.pop(shard, None)
                if self._stop.is_set() or not _transient(exc):
                    # Committed and not applied: the next holder (or this one, reading the row) applies it first.
                    logger.warning("shard %d: a window of %d messages given back: %s", shard, len(items), exc)
                    return False
                # Held, not given back: every redelivery spends one of the subscription's delivery attempts, and
                # past them Pub/Sub sends good messages to the dead-letter topic (an outage must not).
                self._retry_log.warning(
                    "shard %d: writing a window of %d messages failed, retrying in %.0f s with its messages held: %s",
                    shard,
                    len(items),
                    ERROR_BACKOFF_S,
                    exc,
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), ERROR_BACKOFF_S)

    def _plan(self, state: ShardState, items: list[tuple[str, int, Parsed | Weighted]]) -> Plan | DecayedPlan:
        if not self.half_life_s:
            return Plan(state, [(stream, seq, p.counts()) for stream, seq, p in items if isinstance(p, Parsed)])
        weighted = [(st, seq, p.sums, p.impressions, p.rewards) for st, seq, p in items if isinstance(p, Weighted)]
        return DecayedPlan(state, weighted)

    def _lost(self, shard: int) -> None:
        """The shard's lease names another learner: forget the shard and stop reading it."""
        if shard in self.held:
            self.held.discard(shard)
            self.stats.leases_lost += 1
            self.stats.shards_held = len(self.held)
            logger.warning("the lease of shard %d was taken over by another learner", shard)
            self._follow(self._subscriptions())
        self._states.pop(shard, None)

    async def _load(self, shard: int) -> ShardState | None:
        """Shard ``shard``'s state from its row; None if the lease there does not name this learner. Its last
        committed window is written to the arm rows first (its holder may have stopped between commit and apply;
        written twice, a window's cells are the same cells).

        Raises:
            ValueError: If the row holds a version, window or applied set that is not what this module writes.
        """
        from google.cloud.bigtable.data import row_filters

        row = await self._table.read_row(
            lease_row(shard),
            row_filter=row_filters.RowFilterChain(
                [row_filters.FamilyNameRegexFilter(FLEET_FAMILY), row_filters.CellsColumnLimitFilter(1)]
            ),
            operation_timeout=WRITE_TIMEOUT_S,
        )
        cells = {} if row is None else {cell.qualifier: cell for cell in row.cells}
        lease = cells.get(LEASE)
        if lease is None or lease.value != self.learner_id.encode():
            return None
        version = 0
        if VERSION in cells:
            value = cells[VERSION].value
            if not value.isdigit() or len(value) > 18:
                raise ValueError(f"shard {shard}'s version is {value[:40]!r}, not a number")
            version = int(value)
        chunks = {q[len(PENDING_PREFIX) :]: cell.value for q, cell in cells.items() if q.startswith(PENDING_PREFIX)}
        if sorted(chunks) != sorted(str(k).encode() for k in range(len(chunks))):
            raise ValueError(f"shard {shard}'s window chunks are {sorted(chunks)!r}, not 0 to {len(chunks) - 1}")
        state = ShardState(shard, version, len(chunks))
        for qualifier, cell in cells.items():
            if qualifier.startswith(APPLIED_PREFIX):
                stream = qualifier[len(APPLIED_PREFIX) :].decode(errors="replace")
                try:
                    state.applied[stream] = Applied.decode(cell.value)
                except ValueError as exc:
                    raise ValueError(f"shard {shard}'s applied set of {stream!r}: {exc}") from None
                state.touched[stream] = cell.timestamp_micros / 1e6
        if chunks and self.half_life_s:
            data = b"".join(chunks[str(k).encode()] for k in range(len(chunks)))
            keys, sums = decode_decayed_window(data, version)
            stamp = varint(version_micros(version))
            older_decayed = older_decayed_than(stamp)
            state.unapplied = [decayed_entry(k.encode(), *c, stamp, older_decayed) for k, c in zip(keys, sums)]
            state.decayed.update(zip(keys, sums))
            await self._bulk(state.unapplied)
            state.unapplied = []
            self.stats.windows_reapplied += 1
            self.fanout.written_decayed(keys, sums, self.half_life_s)
        elif chunks:
            data = b"".join(chunks[str(k).encode()] for k in range(len(chunks)))
            ids, impressions, rewards = decode_window(data, version)
            timestamp = varint(version_micros(version))
            older = older_than(timestamp)
            state.unapplied = [
                counts_entry(id_.encode(), i, r, timestamp, older) for id_, i, r in zip(ids, impressions, rewards)
            ]
            state.counts.update(zip(ids, zip(impressions, rewards)))
            await self._bulk(state.unapplied)
            state.unapplied = []
            self.stats.windows_reapplied += 1
            # Its holder may have stopped before the replicas heard of it, and the redeliveries that follow are
            # duplicates that publish nothing: tell them now (max-merged, so a second time changes nothing).
            self.fanout.written(ids, impressions, rewards)
        return state

    async def _fill(self, state: ShardState, ids: list[str]) -> None:
        """Read the counts of the arms of ``ids`` not in the shard's cache: one ReadRows, family ``n`` where a row
        has it, else ``c`` (a table written by earlier learners)."""
        from google.cloud.bigtable.data import ReadRowsQuery

        cached = state.decayed if self.half_life_s else state.counts
        missing: list[str | bytes] = list({id_.encode() for id_ in ids if id_ not in cached})
        if not missing:
            return
        self.stats.reads += 1
        rows = await self._table.read_rows(
            ReadRowsQuery(row_keys=missing, row_filter=self._counts_filter), operation_timeout=WRITE_TIMEOUT_S
        )
        if self.half_life_s:
            for row in rows:
                id_ = row.row_key.decode()
                sums = decayed_counts((cell.family, cell.qualifier, cell.value) for cell in row.cells)
                if sums is None:
                    self.stats.invalid_counts += 1
                    self._invalid_log.warning("arm %r: its n:d cell is not an epoch and two sums; counted from 0", id_)
                    sums = (0, 0.0, 0.0)
                state.decayed[id_] = sums
            for key in missing:
                state.decayed.setdefault(key.decode() if isinstance(key, bytes) else key, (0, 0.0, 0.0))
            return
        counts = state.counts
        for row in rows:
            id_ = row.row_key.decode()
            read = arm_counts((cell.family, cell.qualifier, cell.value) for cell in row.cells)
            if read is None:
                self.stats.invalid_counts += 1
                self._invalid_log.warning("arm %r: a counts cell is not a non-negative int64; counted from 0", id_)
                read = (0, 0)
            counts[id_] = read
        for key in missing:
            counts.setdefault(key.decode() if isinstance(key, bytes) else key, (0, 0))

    async def _commit(self, state: ShardState, plan: Plan | DecayedPlan) -> bool:
        """One CheckAndMutateRow on the shard's row, on condition that its lease names this learner: the new
        version, the window's absolute counts and the changed applied sets (streams unheard of for
        ``forget_after_s`` deleted); False if the lease is another's. On success the state moves on, the arm rows'
        entries waiting in ``state.unapplied``."""
        from google.cloud.bigtable.data import DeleteRangeFromColumn, SetCell, row_filters

        now = time.time()
        version = max(state.version + 1, int(now * 1000))
        stamp = version_micros(version)
        counts = state.counts
        ids = list({**plan.shown, **plan.got})
        impressions: list[int] = []
        rewards: list[int] = []
        sums: list[Decayed] = []
        if isinstance(plan, DecayedPlan):
            sums = [merged(state.decayed[id_], *plan.shown[id_]) for id_ in ids]
            chunks = encode_decayed_window(version, ids, sums)
        else:
            impressions = [counts[id_][0] + plan.shown.get(id_, 0) for id_ in ids]
            rewards = [counts[id_][1] + plan.got.get(id_, 0) for id_ in ids]
            chunks = encode_window(version, ids, impressions, rewards)
        mutations: list[Any] = []

        def put(qualifier: bytes, value: bytes) -> None:
            mutations.append(DeleteRangeFromColumn(FLEET_FAMILY, qualifier))
            mutations.append(SetCell(FLEET_FAMILY, qualifier, value, stamp))

        put(VERSION, str(version).encode())
        for k, chunk in enumerate(chunks):
            put(PENDING_PREFIX + str(k).encode(), chunk)
        for k in range(len(chunks), state.chunks):
            mutations.append(DeleteRangeFromColumn(FLEET_FAMILY, PENDING_PREFIX + str(k).encode()))
        for stream, applied in plan.applied.items():
            put(APPLIED_PREFIX + stream.encode(), applied.encode())
        expired = [s for s, t in state.touched.items() if s not in plan.applied and now - t > self.forget_after_s]
        for stream in expired:
            mutations.append(DeleteRangeFromColumn(FLEET_FAMILY, APPLIED_PREFIX + stream.encode()))
        self.stats.commits += 1
        if not await self._table.check_and_mutate_row(
            lease_row(state.shard),
            _held_by(row_filters, self.learner_id.encode()),
            true_case_mutations=mutations,
            operation_timeout=WRITE_TIMEOUT_S,
        ):
            return False
        state.version, state.chunks = version, len(chunks)
        state.applied.update(plan.applied)
        state.touched.update(dict.fromkeys(plan.applied, now))
        for stream in expired:
            del state.applied[stream], state.touched[stream]
        timestamp = varint(stamp)
        if isinstance(plan, DecayedPlan):
            older = older_decayed_than(timestamp)
            state.unapplied = [decayed_entry(id_.encode(), *c, timestamp, older) for id_, c in zip(ids, sums)]
            state.decayed.update(zip(ids, sums))
            plan.ids, plan.now = ids, sums
            return True
        older = older_than(timestamp)
        state.unapplied = [
            counts_entry(id_.encode(), i, r, timestamp, older) for id_, i, r in zip(ids, impressions, rewards)
        ]
        counts.update(zip(ids, zip(impressions, rewards)))
        plan.ids, plan.impressions_now, plan.rewards_now = ids, impressions, rewards
        return True

    async def _bulk(self, entries: list[bytes]) -> None:
        """Write arm rows' counts with MutateRows, ``ENTRIES_PER_CALL`` (or ``BULK_BYTES``) a call.

        Raises:
            RuntimeError: If Bigtable did not write an entry (all are written again: the same cells).
        """
        # The client's channel of the moment: it replaces its channel every ~40 minutes (a call made on the old one
        # fails once that is closed), so the stub is taken per call.
        mutate_rows = self._client.transport.grpc_channel.unary_stream(
            MUTATE_ROWS, request_serializer=None, response_deserializer=self._decode
        )
        start = 0
        while start < len(entries):
            end, size = start, 0
            while end < len(entries) and end - start < ENTRIES_PER_CALL and size < BULK_BYTES:
                size += len(entries[end])
                end += 1
            self.stats.writes += 1
            failed, why = 0, ""
            call = mutate_rows(
                self._table_name + b"".join(entries[start:end]), timeout=WRITE_TIMEOUT_S, metadata=self._metadata
            )
            async for response in call:
                for entry in response.entries:
                    if entry.status.code != 0:
                        failed += 1
                        why = why or entry.status.message
            if failed:
                raise RuntimeError(f"{failed} of {end - start} arm rows not written: {why}")
            start = end

    def _published(self, state: ShardState, plan: Plan | DecayedPlan) -> None:
        """The window's absolute counts to the replicas' fan-out (``fanout``), in the background."""
        if isinstance(plan, DecayedPlan):
            self.fanout.written_decayed(plan.ids, plan.now, self.half_life_s)
        else:
            self.fanout.written(plan.ids, plan.impressions_now, plan.rewards_now)

    async def _forward(self, items: list[tuple[str, int, Parsed]]) -> bool:
        """Messages of the fleet's own subscription in a table with shards (publishers without shards: replicas of
        an earlier version) hold arms of every shard, which only their shards' holders may write: each is
        published again, split, to every shard's topic, as stream ``<stream>:f.<shard>`` with the same sequence
        number (a part to every shard, empty or not, so each stream's numbers have no gaps). Whether all were
        published: then the originals are acknowledged; a redelivery publishes the same parts again, which the
        shards' applied sets count once."""
        if not items:
            return True
        publishes = []
        for stream, seq, parsed in items:
            parts: dict[int, list[Any]] = {shard: [] for shard in range(self.shards)}
            shown: dict[int, dict[str, int]] = {}
            for id_, n in parsed.shown.items():
                shown.setdefault(shard_of(id_, self.shards), {})[id_] = n
            for shard, sums in shown.items():
                parts[shard].append(["i", 0, sums])
            for segment, segment_sums in parsed.segments.items():
                split: dict[int, dict[str, int]] = {}
                for id_, n in segment_sums.items():
                    split.setdefault(shard_of(id_, self.shards), {})[id_] = n
                for shard, sums in split.items():
                    parts[shard].append(["s", segment, sums])
            segments = {(event_id, id_): segment for segment, id_, event_id, _ in parsed.segment_rewards}
            for id_, event_id, millionths in parsed.rewards:
                record = ["r", 0, event_id, id_, millionths / REWARD_SCALE]
                within = segments.get((event_id, id_))
                parts[shard_of(id_, self.shards)].append(record if within is None else [*record, within])
            for shard, records in parts.items():
                attributes = {"v": FORMAT_VERSION, "k": f"{stream}:f.{shard}/{seq}", "s": str(shard)}
                publishes.append((shard, {"data": orjson.dumps(records), "attributes": attributes}))
        by_topic: dict[int, list[dict[str, Any]]] = {}
        for shard, message in publishes:
            by_topic.setdefault(shard, []).append(message)
        while True:
            try:
                await asyncio.gather(
                    *(
                        self._publisher.publish(topic=shard_topic(self._topic, shard), messages=batch, timeout=30)
                        for shard, batch in by_topic.items()
                    )
                )
            except Exception as exc:
                # Held, not given back, as a write is: each redelivery would spend a delivery attempt.
                self.stats.errors += 1
                if self._stop.is_set():
                    return False
                self._retry_log.warning(
                    "forwarding %d messages to the shard topics failed, retrying in %.0f s: %s",
                    len(items),
                    ERROR_BACKOFF_S,
                    exc,
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), ERROR_BACKOFF_S)
                continue
            self.stats.forwarded += len(items)
            return True
