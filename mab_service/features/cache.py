"""A feature cache in front of any source: TTL, bounded size, coalesced misses, negative entries, stale serving.

Posteriors change slowly, so a value read from the store is served for ``ttl_s`` seconds (minus up to 10% of
jitter per entry, so entries read together do not expire together). The table lives in C++ (``_cache``): a
request whose ids are all cached costs one C++ call and no Python code per id, which keeps a warm cache within a
few percent of the embedded source. Only misses run Python code:

- **coalescing**: concurrent misses for the same id share one read (one read in flight per id); a request that
  finds its id already being read waits for that read instead of sending its own;
- **reads outlive the requests that gave up**: a request waits at most ``wait_s`` for its misses; if a read is
  not done by then, the request is shed (503 ``overloaded``: the worker is behind, the store is not failing) or,
  while the store is known to fail, answered degraded; the read itself goes on (as long as the source allows)
  and fills the table, so that a cold start under load converges instead of throwing its reads away;
- **warm-up** (``preload``): ids read at start in large batches before ``health`` reports ready, and again every
  TTL, so that a new pod serves warm answers from its first request;
- **negative caching**: an id the store does not know is cached as unknown and served the prior;
- **stale while revalidate**: for ``stale_s`` seconds past expiry an entry is still served while a background
  read refreshes it (reported again after ``retry_s`` if that read fails). One background task reads the stale
  ids of all requests together, ``REFRESH_BATCH`` at a time, so a wave of expiries costs a few large reads;
- **serving stale on failure**: while the source reports itself not ready (a store known to be failing), and for
  ``stale_s`` after it recovers, every entry the table still holds is served however old, rather than the prior
  (or a read per request of everything that expired during the outage);
- **bounded size**: at most ``max_entries`` ids; a full table evicts by CLOCK (second chance). Each entry costs
  ``CacheTable.entry_bytes()`` bytes at most (96), plus a heap copy of ids longer than 16 bytes.

A miss that cannot be read gets what the source gives without the cache: the prior, counted as unread (the
answer is degraded), or its FeatureSourceError (503), by ``on_store_failure``. Ids a failing store did not read
are not cached.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from itertools import islice

import numpy as np
import numpy.typing as npt

from mab_service.errors import Overloaded
from mab_service.features._cache import CacheTable
from mab_service.features.source import Features, FeatureSource, Health, Lookup, ReadableSource

logger = logging.getLogger("mab_service.cache")

#: Entries expire between (1 - TTL_JITTER) x ttl_s and ttl_s after they were read.
TTL_JITTER = 0.1
#: A stale window no entry outlives: while the store is failing, entries are served however old.
FOREVER_S = 1e18
#: Most stale ids one background refresh reads at once (the source splits them into its own chunks): small enough
#: that a busy worker still reads them within the store's deadline.
REFRESH_BATCH = 500
#: Seconds before a stale entry is reported for refresh again. Longer than a refresh waits in the queue and reads,
#: so that an entry is queued once per refresh: each report costs the request that makes it Python work per id.
REFRESH_RETRY_S = 2.0


#: Ids per warm-up read: large reads (the source splits them into its chunks and reads those concurrently).
WARMUP_BATCH = 2_000
#: Seconds between warm-up progress lines in the log.
WARMUP_LOG_S = 1.0


class WarmUp:
    """Progress of the warm-up: the ids to preload and how many were read; ``/health`` waits for it."""

    __slots__ = ("ids", "total", "read", "done", "started_at", "timeout_s", "refreshes")

    def __init__(self, ids: list[str] | None = None, timeout_s: float = 0.0) -> None:
        self.ids = ids or []
        self.total = len(self.ids)
        self.read = 0
        self.done = not self.ids
        self.started_at = 0.0
        self.timeout_s = timeout_s
        self.refreshes = 0


class _Read:
    """One read in flight: the ids it carries, where each sits, and the task every waiter shares."""

    __slots__ = ("ids", "index", "task")

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.index = {id_: j for j, id_ in enumerate(ids)}
        self.task: asyncio.Task[Lookup] | None = None


class FeatureCache:
    """Caches ``source`` in a bounded C++ table.

    Args:
        source: Any feature source; one with ``read`` (the Vertex sources) also gets negative caching by its
            own account, others are judged by whether they answered the prior.
        ttl_s: How long a read value is fresh, > 0.
        max_entries: The most ids held, >= 1.
        stale_s: How long past expiry an entry is still served while it is refreshed in the background; 0 turns
            stale serving off.
        retry_s: How long a stale entry whose refresh failed waits before it is refreshed again.
        wait_s: How long a request waits for the reads of its misses; None: as long as they take. A read a
            request gave up on goes on (as long as the source lets it) and fills the table.
        prior_alpha: Served for ids the source does not know; finite and > 0.
        prior_beta: Likewise.
        clock: Monotonic seconds; tests pass their own.

    Raises:
        ValueError: If a number is out of range.
    """

    def __init__(
        self,
        source: FeatureSource,
        *,
        ttl_s: float,
        max_entries: int,
        stale_s: float = 0.0,
        retry_s: float = 1.0,
        wait_s: float | None = None,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 (got {ttl_s!r})")
        if not stale_s >= 0 or not retry_s >= 0:
            raise ValueError(f"stale_s and retry_s must be >= 0 (got {stale_s!r} and {retry_s!r})")
        self.source = source
        self.name = f"cache+{source.name}"
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self.retry_s = retry_s
        self.wait_s = wait_s
        self._clock = clock
        self._table = CacheTable(max_entries)
        self._in_flight: dict[str, _Read] = {}
        # Stale ids reported by requests, waiting for the one background task that reads them in batches.
        self._refresh_queue: dict[str, None] = {}
        self._refresher: asyncio.Task[None] | None = None
        # Until when every entry held is served, however old (``_stale_window``); inf while the store is failing.
        self._grace_until = 0.0
        self._rng = np.random.default_rng()
        self._prior_alpha = float(prior_alpha)
        self._prior_beta = float(prior_beta)
        self._read_source = source.read if isinstance(source, ReadableSource) else self._read_by_fetch
        # Counters for metrics.
        self.lookups = 0
        self.misses = 0
        self.stale_served = 0
        self.coalesced = 0
        self.refreshes = 0
        self.refresh_failures = 0
        self.abandoned = 0
        self.warmup = WarmUp()
        self._warmer: asyncio.Task[None] | None = None

    def preload(self, ids: Iterable[str], timeout_s: float) -> None:
        """Read ``ids`` into the table at start, before ``health`` reports ready, and keep them fresh after.

        Call before ``start``. The warm-up reads ``WARMUP_BATCH`` ids at a time and logs its progress; it gives up
        after ``timeout_s`` (``health`` then turns ready with what was read). Afterwards these ids are read again
        in large batches every ``ttl_s`` less its jitter, so that no request waits on the store for them.
        """
        self.warmup = WarmUp(list(dict.fromkeys(ids)), timeout_s)

    async def start(self) -> None:
        await self.source.start()
        if self.warmup.ids:
            self._warmer = asyncio.create_task(self._warm(), name="cache-warm-up")

    @property
    def prior(self) -> tuple[float, float]:
        return self._prior_alpha, self._prior_beta

    def health(self) -> Health:
        warmup = self.warmup
        if not warmup.done:
            return Health(False, f"warming up the feature cache: {warmup.read:,} of {warmup.total:,} ids read")
        return self.source.health()

    async def close(self) -> None:
        for task in (self._refresher, self._warmer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.source.close()
        self._table.clear()

    async def _warm(self) -> None:
        """The warm-up, then the refresh of the warm-up ids every TTL, until closed."""
        warmup = self.warmup
        loop = asyncio.get_running_loop()
        warmup.started_at = loop.time()
        try:
            await asyncio.wait_for(self._warm_up(warmup), warmup.timeout_s)
        except TimeoutError:
            logger.warning(
                "warm-up stopped after %.1f s with %d of %d ids read; serving, the rest are read on demand",
                warmup.timeout_s,
                warmup.read,
                warmup.total,
            )
        finally:
            warmup.done = True
        while True:
            await asyncio.sleep(self.ttl_s * (1.0 - TTL_JITTER))
            refreshed = await self._read_all(warmup.ids)
            warmup.refreshes += refreshed

    async def _warm_up(self, warmup: WarmUp) -> None:
        loop = asyncio.get_running_loop()
        # A store that is not ready yet would answer nothing: wait for its first successful check.
        while not self.source.health().ready:
            await asyncio.sleep(0.05)
        logger.info("warm-up: reading %d ids in batches of %d", warmup.total, WARMUP_BATCH)
        logged = loop.time()

        def progress(n: int) -> None:
            nonlocal logged
            warmup.read += n
            if loop.time() - logged >= WARMUP_LOG_S:
                logged = loop.time()
                logger.info(
                    "warm-up: %d of %d ids read (%.0f%%)", warmup.read, warmup.total, 100 * warmup.read / warmup.total
                )

        await self._read_all(warmup.ids, progress)
        logger.info(
            "warm-up: %d ids read in %.2f s; the feature cache holds %d entries",
            warmup.read,
            loop.time() - warmup.started_at,
            len(self._table),
        )

    async def _read_all(self, ids: list[str], progress: Callable[[int], None] | None = None) -> int:
        """Read ``ids`` into the table, ``WARMUP_BATCH`` at a time, two reads in flight; returns how many were
        read. A batch the source could not read (failing or overloaded) is tried again, while time allows."""
        done = 0
        batches = [ids[i : i + WARMUP_BATCH] for i in range(0, len(ids), WARMUP_BATCH)]

        async def worker(queue: list[list[str]]) -> None:
            nonlocal done
            while queue:
                batch = [id_ for id_ in queue.pop() if id_ not in self._in_flight]
                if not batch:
                    continue
                task = self._start_read(batch).task
                assert task is not None
                try:
                    result = await task
                except Exception as exc:  # the store failed for good: wait for it and try the batch again
                    logger.warning("warm-up read failed, retrying: %s", exc)
                    queue.append(batch)
                    await asyncio.sleep(self.retry_s)
                    continue
                read = len(batch) - (0 if result.unread is None else len(result.unread))
                done += read
                if progress is not None:
                    progress(read)
                if result.unread is not None:
                    queue.append([batch[i] for i in result.unread.tolist()])
                    await asyncio.sleep(0.05)

        batches.reverse()  # workers pop from the end: read in file order
        await asyncio.gather(worker(batches), worker(batches))
        return done

    async def fetch(self, ids: list[str]) -> Features:
        now = self._clock()
        alpha, beta, known, stale, misses, refresh = self._table.lookup(
            ids, now, self._stale_window(now), self.retry_s, self._prior_alpha, self._prior_beta
        )
        self.lookups += len(ids)
        if stale:
            self.stale_served += stale
            if refresh is not None:
                self._refresh([ids[i] for i in refresh.tolist()])
        unread = 0
        if misses is not None:
            filled, unread = await self._fill(ids, misses, alpha, beta)
            known += filled
            if unread:
                self._grace_until = math.inf  # the store failed: serve what is held until a window after it answers
        return Features(alpha, beta, known, unread)

    def _stale_window(self, now: float) -> float:
        """How long past expiry entries are served now: ``stale_s``, or for ever while the store is failing (or a
        read of it has just failed) and for ``stale_s`` after it answers again.

        While the store is failing, a stale posterior beats the prior, and the store is not read anyway until its
        check succeeds. After an outage longer than the stale window, every entry that expired meanwhile would be
        a miss at once, and every request would read its own misses: a storm of small reads that saturates the
        worker just as the store comes back. Serving them stale for one more window lets the background refresher
        read them in large batches instead.
        """
        if not self.source.health().ready:
            self._grace_until = math.inf
            return FOREVER_S
        if self._grace_until == math.inf:  # the store has just recovered
            self._grace_until = now + self.stale_s
        return self.stale_s if now >= self._grace_until else FOREVER_S

    async def _fill(
        self,
        ids: list[str],
        misses: npt.NDArray[np.intp],
        alpha: npt.NDArray[np.float64],
        beta: npt.NDArray[np.float64],
    ) -> tuple[int, int]:
        """Read the missed ids (joining reads already in flight) into alpha, beta; returns how many were known and
        how many a failing store did not read."""
        self.misses += len(misses)
        waits: dict[_Read, tuple[list[int], list[int]]] = {}
        own: list[str] = []
        own_at: list[int] = []
        for k, i in enumerate(misses.tolist()):
            id_ = ids[i]
            pending = self._in_flight.get(id_)
            if pending is None:
                own.append(id_)
                own_at.append(k)
            else:
                at, index = waits.setdefault(pending, ([], []))
                at.append(k)
                index.append(pending.index[id_])
        self.coalesced += len(misses) - len(own)
        if own:
            waits[self._start_read(own)] = (own_at, list(range(len(own))))
        known = unread = 0
        loop = asyncio.get_running_loop()
        give_up_at = None if self.wait_s is None else loop.time() + self.wait_s
        for read, (at, index) in waits.items():
            task = read.task
            assert task is not None
            if not task.done():
                # Never cancelled from here: a request that goes away, or stops waiting, must not cancel a read
                # that other requests wait for, or that fills the table for the next ones.
                if give_up_at is None:
                    await asyncio.shield(task)
                else:
                    await asyncio.wait((task,), timeout=max(0.0, give_up_at - loop.time()))
            if not task.done():
                self.abandoned += 1
                if self.source.health().ready:
                    raise _overloaded(self.wait_s)  # our own queue is slow, not the store: shed the request
                unread += len(at)  # the store is failing: these keep the prior
                continue
            result = task.result()
            positions = misses[at]
            rows = np.asarray(index, dtype=np.intp)
            alpha[positions] = result.alpha[rows]
            beta[positions] = result.beta[rows]
            known += int(np.count_nonzero(result.found[rows]))
            if result.unread is not None:
                not_read = int(np.count_nonzero(np.isin(rows, result.unread)))
                if not_read and result.overloaded:
                    raise _overloaded(self.wait_s)
                unread += not_read
        return known, unread

    def _start_read(self, ids: list[str]) -> _Read:
        read = _Read(ids)
        for id_ in ids:
            self._in_flight[id_] = read
        read.task = asyncio.ensure_future(self._load(read))
        read.task.add_done_callback(_retrieve)
        return read

    async def _load(self, read: _Read) -> Lookup:
        try:
            result = await self._read_source(read.ids)
            ids, alpha, beta, found = read.ids, result.alpha, result.beta, result.found
            if result.unread is not None:
                # A degraded read: what the store did not answer is not cached, neither as known nor as unknown.
                kept = np.ones(len(ids), dtype=np.bool_)
                kept[result.unread] = False
                ids = [id_ for id_, keep in zip(ids, kept.tolist()) if keep]
                alpha, beta, found = alpha[kept], beta[kept], found[kept]
            if ids:
                expires = self._clock() + self.ttl_s * (1.0 - TTL_JITTER * self._rng.random(len(ids)))
                self._table.insert(ids, alpha, beta, found, expires)
            return result
        finally:
            for id_ in read.ids:
                if self._in_flight.get(id_) is read:
                    del self._in_flight[id_]

    def _refresh(self, ids: list[str]) -> None:
        """Queue stale ids for the background refresher (those not already being read)."""
        queue = self._refresh_queue
        for id_ in ids:
            if id_ not in self._in_flight:
                queue[id_] = None
        if queue and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_queued(), name="cache-refresh")

    async def _refresh_queued(self) -> None:
        """Read the queued stale ids, ``REFRESH_BATCH`` at a time, until the queue is empty.

        One read at a time: the ids that requests report while it runs are read together next, so a wave of
        expiries becomes a few large reads, not one small read per request.
        """
        queue = self._refresh_queue
        try:
            while queue:
                batch = list(islice(queue, REFRESH_BATCH))
                for id_ in batch:
                    del queue[id_]
                batch = [id_ for id_ in batch if id_ not in self._in_flight]
                if not batch:
                    continue
                self.refreshes += len(batch)
                task = self._start_read(batch).task
                assert task is not None
                try:
                    result = await task
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.refresh_failures += 1
                    logger.warning("background refresh failed; stale values stay until they expire: %s", exc)
                else:
                    if result.unread is not None:
                        self.refresh_failures += 1  # degraded: the ids not read stay stale, reported again later
        finally:
            self._refresher = None

    async def _read_by_fetch(self, ids: list[str]) -> Lookup:
        # A source that only fetches cannot say which ids it knew: an answer equal to the prior counts as
        # unknown. The values cached are the same either way; only the `known` count may differ.
        features = await self.source.fetch(ids)
        found = (features.alpha != self._prior_alpha) | (features.beta != self._prior_beta)
        return Lookup(features.alpha, features.beta, found)

    def stats(self) -> dict[str, float]:
        """Counters for metrics: lookups, hits, misses, stale served, coalesced misses, refreshes, memory."""
        table = self._table
        return {
            "lookups": self.lookups,
            "hits": self.lookups - self.misses,
            "misses": self.misses,
            "stale_served": self.stale_served,
            "coalesced": self.coalesced,
            "refreshes": self.refreshes,
            "refresh_failures": self.refresh_failures,
            "abandoned_waits": self.abandoned,
            "warmup_ids": self.warmup.total,
            "warmup_read": self.warmup.read,
            "warmup_refreshes": self.warmup.refreshes,
            "entries": len(table),
            "max_entries": table.capacity,
            "evictions": table.evictions,
            "memory_bytes": table.memory_bytes,
            "entry_bytes": CacheTable.entry_bytes(),
        }


def _overloaded(wait_s: float | None) -> Overloaded:
    waited = "" if wait_s is None else f" within {wait_s * 1000:.0f} ms"
    return Overloaded(f"the worker could not read the features{waited}; retry")


def _retrieve(task: asyncio.Task[Lookup]) -> None:
    # A read whose waiters all went away still finishes; fetch its exception so asyncio does not log it as lost.
    if not task.cancelled():
        task.exception()
