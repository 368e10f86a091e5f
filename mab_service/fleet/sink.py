"""The Pub/Sub event sink: a replica's events and rewards, batched into messages on the fleet's topic.

A message's data (format ``v`` 3) is a JSON array: first, if the message holds answers, ``["i", events, {id:
impressions, ...}]``, the impressions of its answers summed per arm as they are added (what the learner adds, so that
its cost no longer grows with the answers); for answers ranked within a segment, a record ``["s", segment, {id:
impressions, ...}]`` per segment, their impressions summed per arm within it (the ``i`` record counts them too); then
a record ``["r", t, event_id, id, reward]`` per accepted reward, with the answer's segment as a sixth item if it had
one (learners of an earlier version skip the ``s`` records as malformed and read the rewards without the segment).
With a half-life (``half_life_s``), each answer is instead a record ``["a", t, [ids]]`` (its segment as a fourth
item if it had one): an impression weighs by its own time, so the answer's time travels with it and the message grows
with its answers, as in format 2; such messages carry attribute ``h``, the half-life (``repr`` of a float), which a
learner checks against its own. Format 2, which learners still read (messages of replicas of an older version), had
a record ``["e", t, event_id, [ids]]`` per answer instead of the sums. Its attributes: ``v``, the format's version,
and ``k``, the message's key
``<publisher id>/<sequence>``, unique per message and the same on every retry of it, so that learners count a
message's impressions once however often it is published or delivered (``learner.Learner``).

Records are buffered and published together every ``max_delay_s`` or ``max_records``, whichever comes first, so
that ``event`` costs the request path an append and no system call. ``reward`` returns once the message that
carries it is stored by Pub/Sub (the fleet's "durable"), or raises ``SinkUnavailable`` (the reward stays queued); a
caller answers 202 only after it.

Nothing answered is dropped. A message Pub/Sub refuses stays in the outbox and is published again every
``retry_s`` with its key, as it was: its events, and its rewards, which the replica claimed on their events' rows
before queuing them (``fleet.replica``), so that a client's retry of a reward answered 503 is a duplicate and this
message is the only one to carry it; if a refused attempt was stored after all, the learners count the message once
(its key). The outbox
holds at most ``max_pending`` messages and ``max_pending_bytes`` bytes of them (sent and not yet stored, or waiting
to be sent again, and the batch being filled); when it is full, ``event`` and ``reward`` raise ``SinkUnavailable``
so the replica answers 503 instead of losing what it answered. ``close`` (the replica's shutdown) sends the batch and
whatever waits to be sent again at once, and waits for the outbox within its deadline; what is still there is
logged and counted (``undelivered``).

Arm shards: once ``setup`` has given the fleet ``shards`` (docs/fleet.md, "Learners that shard"), the sink splits
every batch by shard, ``shard_of`` each id: an answer's ids go to one event record per shard they fall in (same event
id), a reward to its id's shard; each shard's records are a message of their own on the shard's topic
(``shard_topic``), under a key of the shard's stream, ``<publisher id>.<shard>/<sequence>``, and with attribute ``s``
(the shard). A learner holding a shard's lease then sees exactly that shard's arms.

The publisher honours ``PUBSUB_EMULATOR_HOST``; elsewhere it uses Application Default Credentials.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from mab_service.errors import MabError

logger = logging.getLogger("mab_service.pubsub")

FORMAT_VERSION = "3"
#: The format before per-arm sums: a record per answer. Learners read both.
RECORDS_VERSION = "2"
#: A message's data at most before it is sent, whatever ``max_records`` says: Pub/Sub refuses messages over 10 MB.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Estimated bytes of a message's sums before its first id, and per id beyond its JSON string (``:``, up to 6 digits,
#: ``,``): the outbox's byte bound counts them before they are encoded.
_SUMS_BYTES, _SUM_BYTES = 16, 8
#: What a shard's topic and subscription are called after the fleet's topic and subscription.
SHARD_SUFFIX = "-shard-"


def shard_of(id_: str, shards: int) -> int:
    """The shard of arm ``id_``: CRC-32 of its UTF-8 bytes modulo ``shards``, stable across processes and versions
    (not Python's ``hash``, which is salted per process)."""
    return zlib.crc32(id_.encode()) % shards


def shard_topic(topic: str, shard: int) -> str:
    """The topic of shard ``shard`` of the fleet's ``topic``: ``<topic>-shard-<n>``."""
    return f"{topic}{SHARD_SUFFIX}{shard}"


def _sum(shown: dict[str, int], ids: list[str]) -> int:
    """Add one impression per id to ``shown``; return the bytes its JSON grew by (estimated)."""
    grown = 0
    for id_ in ids:
        n = shown.get(id_)
        if n is None:
            shown[id_] = 1
            grown += len(orjson.dumps(id_)) + _SUM_BYTES  # "id":n, (n estimated at its longest)
        else:
            shown[id_] = n + 1
    return grown


class SinkUnavailable(MabError):
    """Pub/Sub did not take a record: nothing was counted; the client may retry."""

    status_code = 503
    code = "events_unavailable"


@dataclass
class _Message:
    key: str
    topic: str
    shard: int
    records: list[bytes] = field(default_factory=list)
    """Each reward's record, encoded once as it is added: the bytes it holds are known, and sending only joins them."""
    shown: dict[str, int] = field(default_factory=dict)
    """Impressions per arm of the message's answers."""
    segments: dict[str, dict[str, int]] = field(default_factory=dict)
    """Impressions per segment and arm of its answers ranked within a segment."""
    events: list[str] = field(default_factory=list)
    """The event ids of its answers (for the count logged if it is lost)."""
    added: int = 0
    """Answers and rewards added (``max_records`` counts them)."""
    size: int = 1
    """Bytes of the message's data (the sums estimated until it is encoded)."""
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    attempts: int = 0


class PubSubSink:
    """Batches a replica's records into messages on ``topic`` (``projects/P/topics/T``).

    Args:
        topic: The topic the learners' subscription reads.
        max_records: Records per message at most.
        max_delay_s: How long a record waits for others before its message is sent.
        max_pending: Messages in the outbox (sent and not yet stored, or refused and waiting to be sent again) at
            most; past it new records are refused, so a broker that is down costs bounded memory and no loss.
        max_pending_bytes: Bytes of the outbox's messages at most (the batch being filled included); past it new
            records are refused, as past ``max_pending``: the bound on memory whatever the records' sizes.
        retry_s: How long a refused message waits before it is sent again.
        publish_timeout_s: How long one attempt may take, the client's own retries included: a reward waits this
            long at most before it is answered 503.
        publisher_id: This sink's part of the message keys; random by default (a replica's restart is a new one).
        shards: The fleet's arm shards (``start`` may set them from the table); 0: one topic, no split.
        half_life_s: The fleet's half-life (0: none). With one, each answer is a record ``["a", t, [ids]]`` (with the
            segment as a fourth item if it had one) instead of the sums, since its weight depends on its time
            (``schema.weight``), and messages carry attribute ``h``, the half-life, which learners check.
    """

    def __init__(
        self,
        topic: str,
        *,
        max_records: int = 1000,
        max_delay_s: float = 0.02,
        max_pending: int = 1000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        retry_s: float = 1.0,
        publish_timeout_s: float = 5.0,
        publisher_id: str | None = None,
        shards: int = 0,
        half_life_s: float = 0.0,
    ) -> None:
        self.topic = topic
        self.half_life_s = half_life_s
        self.max_records = max_records
        self.max_delay_s = max_delay_s
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.retry_s = retry_s
        self.publish_timeout_s = publish_timeout_s
        self.publisher_id = publisher_id or secrets.token_hex(6)
        self.shards = shards
        self.published = 0
        """Messages Pub/Sub stored."""
        self.failed = 0
        """Publish attempts Pub/Sub refused (each is sent again)."""
        self.refused = 0
        """Records refused because the outbox was full (answered 503)."""
        self.undelivered = 0
        """Messages still in the outbox when ``close`` gave up on them (logged)."""
        self._bytes = 0
        self._publisher: Any = None
        self._seqs: dict[int, int] = {}
        self._current: dict[int, _Message] = {}
        self._outbox: dict[str, _Message] = {}
        self._retry: list[_Message] = []
        self._timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._publish_retry: Any = None

    @property
    def pending(self) -> int:
        """Messages in the outbox: sent and not yet stored, or waiting to be sent again."""
        return len(self._outbox)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the messages in the outbox, the batch being filled included."""
        return self._bytes

    def start(self, shards: int | None = None) -> None:
        """Create the publisher; ``shards`` (when given) is the fleet's shard count, read from its table."""
        if shards is not None:
            self.shards = shards
        from google.api_core import exceptions, retry
        from google.cloud.pubsub_v1 import PublisherClient, types

        # The client's own batching would add its latency to ours: one message per publish call.
        self._publisher = PublisherClient(batch_settings=types.BatchSettings(max_messages=1, max_latency=0))
        # The client's default retries a publish for 60 s; a reward's client should hear sooner, and the outbox
        # sends the events again anyway.
        transient = retry.if_exception_type(
            exceptions.Aborted,
            exceptions.DeadlineExceeded,
            exceptions.InternalServerError,
            exceptions.ResourceExhausted,
            exceptions.ServiceUnavailable,
            exceptions.Unknown,
        )
        self._publish_retry = retry.Retry(
            predicate=transient, initial=0.05, maximum=1.0, multiplier=2.0, timeout=self.publish_timeout_s
        )

    def check(self) -> None:
        """Raise ``SinkUnavailable`` if the outbox is full: what the replica checks before it answers."""
        if len(self._outbox) >= self.max_pending or self._bytes >= self.max_pending_bytes:
            self.refused += 1
            raise SinkUnavailable(
                f"{len(self._outbox)} messages ({self._bytes} bytes) to {self.topic} are not yet stored by Pub/Sub; "
                "retry later"
            )

    def event(self, event_id: str, ids: list[str], t: float, segment: str | None = None) -> None:
        """Queue an answered event's impressions (within ``segment`` too, if it was ranked within one); never waits.

        Raises:
            SinkUnavailable: If the outbox is full (nothing was queued).
        """
        self.check()
        shards = self.shards
        show = self._show if not self.half_life_s else self._show_at
        if not shards:
            show(event_id, ids, 0, segment, t)
            return
        split: dict[int, list[str]] = {}
        for id_ in ids:
            split.setdefault(zlib.crc32(id_.encode()) % shards, []).append(id_)  # shard_of, inlined: per id
        for shard, part in split.items():
            show(event_id, part, shard, segment, t)

    async def reward(self, event_id: str, id_: str, reward: float, t: float, segment: str | None = None) -> None:
        """Queue an accepted reward (of an answer ranked within ``segment``, if any) and wait until Pub/Sub has stored
        its message.

        The reward is queued whatever the outbox holds (the caller checked it before claiming the reward, and a
        claimed reward is never dropped), and stays in its message until Pub/Sub stores it.

        Raises:
            SinkUnavailable: If Pub/Sub refused the message (it is sent again, with the reward).
        """
        waiter = asyncio.get_running_loop().create_future()
        record: list[Any] = ["r", t, event_id, id_, reward]
        if segment is not None:
            record.append(segment)
        message = self._add(record, shard_of(id_, self.shards) if self.shards else 0)
        message.waiters.append(waiter)
        await waiter

    def _message(self, shard: int) -> _Message:
        """The batch being filled for ``shard``, begun if there is none."""
        message = self._current.get(shard)
        if message is None:
            seq = self._seqs[shard] = self._seqs.get(shard, 0) + 1
            if self.shards:
                key, topic = f"{self.publisher_id}.{shard}/{seq}", shard_topic(self.topic, shard)
            else:
                key, topic = f"{self.publisher_id}/{seq}", self.topic
            message = self._current[shard] = _Message(key, topic, shard)
            self._outbox[message.key] = message
            self._bytes += message.size
        return message

    def _show_at(self, event_id: str, ids: list[str], shard: int, segment: str | None, t: float) -> None:
        """With a half-life: an answer's impressions (of one shard) as a record of their own, with its time."""
        self._add(["a", t, ids] if segment is None else ["a", t, ids, segment], shard).events.append(event_id)

    def _show(self, event_id: str, ids: list[str], shard: int, segment: str | None, t: float) -> None:
        """Add an answer's impressions (of one shard) to the batch's sums, and to its segment's if it has one."""
        message = self._message(shard)
        grown = 0 if message.events else _SUMS_BYTES
        grown += _sum(message.shown, ids)
        if segment is not None:
            within = message.segments.get(segment)
            if within is None:
                within = message.segments[segment] = {}
                grown += _SUMS_BYTES + len(orjson.dumps(segment))
            grown += _sum(within, ids)
        message.events.append(event_id)
        message.size += grown
        self._bytes += grown
        self._added(message)

    def _add(self, record: list[Any], shard: int) -> _Message:
        message = self._message(shard)
        encoded = orjson.dumps(record)
        message.records.append(encoded)
        message.size += len(encoded) + 1
        self._bytes += len(encoded) + 1
        self._added(message)
        return message

    def _added(self, message: _Message) -> None:
        message.added += 1
        if message.added >= self.max_records or message.size >= MAX_MESSAGE_BYTES:
            del self._current[message.shard]
            self._send(message)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay_s, self.flush)

    def flush(self) -> None:
        """Publish what is queued: one message per shard."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        current, self._current = self._current, {}
        for message in current.values():
            self._send(message)

    def _send(self, message: _Message) -> None:
        message.attempts += 1
        summed = message.events and not self.half_life_s  # with a half-life each answer is a record of its own
        parts = [orjson.dumps(["i", len(message.events), message.shown])] if summed else []
        parts += [orjson.dumps(["s", segment, sums]) for segment, sums in message.segments.items()]
        data = b"[" + b",".join(parts + message.records) + b"]"
        self._bytes += len(data) - message.size  # the sums were estimated: now they are known
        message.size = len(data)
        attributes = {"v": FORMAT_VERSION, "k": message.key}
        if self.half_life_s:
            attributes["h"] = repr(float(self.half_life_s))
        if self.shards:
            attributes["s"] = str(message.shard)
        future = self._publisher.publish(
            message.topic, data, retry=self._publish_retry, timeout=self.publish_timeout_s, **attributes
        )
        loop = asyncio.get_running_loop()

        def done(f: concurrent.futures.Future[str]) -> None:
            loop.call_soon_threadsafe(self._settle, message, f)

        future.add_done_callback(done)

    def _settle(self, message: _Message, future: concurrent.futures.Future[str]) -> None:
        error = future.exception()
        waiters, message.waiters = message.waiters, []
        if error is None:
            self.published += 1
            self._drop(message)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            return
        self.failed += 1
        if message.attempts == 1 or message.attempts % 60 == 0:
            logger.warning(
                "publishing %s to %s failed (attempt %d): %s", message.key, message.topic, message.attempts, error
            )
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(SinkUnavailable(f"publishing to {message.topic} failed: {error}"))
        # The message goes again, under the same key and as it was: its answers, and its rewards, which were claimed
        # on their events' rows (a retry of one is answered duplicate, so only this message can carry it).
        self._retry.append(message)
        if self._retry_timer is None:
            self._retry_timer = asyncio.get_running_loop().call_later(self.retry_s, self._resend)

    def _drop(self, message: _Message) -> None:
        del self._outbox[message.key]
        self._bytes -= message.size

    def _resend(self) -> None:
        self._retry_timer = None
        retry, self._retry = self._retry, []
        for message in retry:
            self._send(message)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Publish the batch and what waits to be sent again now, and wait, up to ``timeout_s``, until Pub/Sub has
        stored the whole outbox; what it has not by then is logged and counted in ``undelivered``."""
        if self._publisher is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.flush()
        if self._retry_timer is not None:  # no waiting out the retry delay at shutdown
            self._retry_timer.cancel()
        self._resend()
        while self._outbox and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._outbox:
            self.undelivered = len(self._outbox)
            # Distinct event ids: with shards an answer is in each shard's message its ids fall in.
            events = len({event_id for message in self._outbox.values() for event_id in message.events})
            logger.error(
                "%d messages (%d events) to %s were not stored by Pub/Sub within %.1f s at close: their impressions "
                "are not counted",
                self.undelivered,
                events,
                self.topic,
                timeout_s,
            )
        publisher, self._publisher = self._publisher, None
        # stop() waits for the publishes in flight (up to publish_timeout_s each): not past the deadline.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(publisher.stop), max(deadline - loop.time(), 0.1))
        publisher.transport.close()
