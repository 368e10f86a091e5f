"""The Pub/Sub event sink: a replica's events and rewards, batched into messages on the fleet's topic.

A message's data is a JSON array of records, the journal's shapes: ``["e", t, event_id, [ids]]`` for an answered
event (one impression per id) and ``["r", t, event_id, id, reward]`` for an accepted reward; attribute ``v`` is the
format's version. Records are buffered and published together every ``max_delay_s`` or ``max_records``, whichever
comes first, so that ``event`` costs the request path an append and no system call. ``reward`` returns once the
message that carries it is stored by Pub/Sub (the fleet's "durable"), or raises ``SinkUnavailable``; a caller
answers 202 only after it. Learners (``learner.Learner``) apply the messages to Bigtable exactly once.

The publisher honours ``PUBSUB_EMULATOR_HOST``; elsewhere it uses Application Default Credentials.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import orjson

from mab_service.errors import MabError

FORMAT_VERSION = "1"


class SinkUnavailable(MabError):
    """Pub/Sub did not take a reward's message: nothing was counted; the client may retry."""

    status_code = 503
    code = "events_unavailable"


class PubSubSink:
    """Batches a replica's records into messages on ``topic`` (``projects/P/topics/T``).

    Args:
        topic: The topic the learners' subscription reads.
        max_records: Records per message at most.
        max_delay_s: How long a record waits for others before its message is sent.
        max_pending: Messages sent but not yet stored by Pub/Sub; past it events are dropped (and counted in
            ``dropped``) and rewards refused, so a broker that is down costs bounded memory.
    """

    def __init__(self, topic: str, *, max_records: int = 1000, max_delay_s: float = 0.02, max_pending: int = 1000):
        self.topic = topic
        self.max_records = max_records
        self.max_delay_s = max_delay_s
        self.max_pending = max_pending
        self.published = 0
        self.failed = 0
        self.dropped = 0
        self._publisher: Any = None
        self._records: list[Any] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._pending: set[concurrent.futures.Future[str]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        from google.cloud.pubsub_v1 import PublisherClient, types

        # The client's own batching would add its latency to ours: one message per publish call.
        self._publisher = PublisherClient(batch_settings=types.BatchSettings(max_messages=1, max_latency=0))

    def event(self, event_id: str, ids: list[str], t: float) -> None:
        """Queue an answered event's impressions; never waits."""
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            return
        self._add(["e", t, event_id, ids])

    async def reward(self, event_id: str, id_: str, reward: float, t: float) -> None:
        """Queue an accepted reward and wait until Pub/Sub has stored its message.

        Raises:
            SinkUnavailable: If Pub/Sub refused the message or too many are pending.
        """
        if len(self._pending) >= self.max_pending:
            raise SinkUnavailable(f"{len(self._pending)} messages to {self.topic} are pending; retry later")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._add(["r", t, event_id, id_, reward])
        await waiter

    def _add(self, record: list[Any]) -> None:
        self._records.append(record)
        if len(self._records) >= self.max_records:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay_s, self.flush)

    def flush(self) -> None:
        """Publish what is queued as one message."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._records:
            return
        data = orjson.dumps(self._records)
        waiters = self._waiters
        self._records = []
        self._waiters = []
        future = self._publisher.publish(self.topic, data, v=FORMAT_VERSION)
        self._pending.add(future)
        loop = asyncio.get_running_loop()

        def done(f: concurrent.futures.Future[str]) -> None:
            loop.call_soon_threadsafe(self._settle, f, waiters)

        future.add_done_callback(done)

    def _settle(self, future: concurrent.futures.Future[str], waiters: list[asyncio.Future[None]]) -> None:
        self._pending.discard(future)
        error = future.exception()
        if error is None:
            self.published += 1
        else:
            self.failed += 1
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(SinkUnavailable(f"publishing to {self.topic} failed: {error}"))

    async def close(self) -> None:
        """Publish what is queued and wait for every pending message."""
        if self._publisher is None:
            return
        self.flush()
        pending = list(self._pending)
        if pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in pending], timeout=30)
        await asyncio.to_thread(self._publisher.stop)
        self._publisher.transport.close()
        self._publisher = None
