"""Prometheus metrics, declared once here, and the cheap accumulators the request path writes to.

In multiprocess mode (several workers, one scrape) every increment of a prometheus-client value is a locked
write into a memory-mapped file: about 1.6 us for a counter and 3.7 us for a histogram observation on our
machine, so the four or five a request needs would cost the ~90 us hot path more than our 5% budget. The
request path therefore adds to plain Python numbers (``_Series``: a bucket index found by bisection and two
additions, about 0.15 us), and ``flush()`` copies the totals into prometheus-client: every
``metrics_flush_interval_s`` from a background task, on each scrape this worker serves, and at shutdown. A scrape
so sees the other workers' requests up to one interval late.

Exposed (all workers summed):

- ``mab_requests_total{endpoint,status}`` and ``mab_request_duration_seconds{endpoint,status}``: answers, and the
  time from the app receiving a request to handing over its answer (queueing before the app is not in it);
- ``mab_candidates_per_request``: distinct candidates of each ranked /predict request;
- ``mab_stage_duration_seconds{stage}``: ``fetch`` (the feature source, successful fetches), ``sample_rank``
  (the kernel), ``encode`` (the JSON answer);
- ``mab_feature_fetch_errors_total{source,error}``: failed fetches by error code;
- ``mab_cache_lookups_total{result}`` (``hit`` or ``miss``) and ``mab_cache_stale_served_total``: the feature
  cache, when the source has one;
- ``mab_shed_requests_total``: /predict requests answered 503 ``overloaded``;
- ``mab_degraded_fetches_total`` and ``mab_unread_candidates_total``: fetches a failing store answered only in
  part (``on_store_failure = degrade``), and the candidates that got the prior for it;
- ``mab_feature_source_events_total{source,event}`` and ``mab_feature_source_level{source,level}``: the feature
  source's and its cache's own counters (``SOURCE_COUNTERS``: store calls, retries, timeouts, failed, skipped,
  overloaded and shed reads, evictions, refreshes, warm-up progress) and levels (``SOURCE_LEVELS``), copied from
  their ``stats()`` at each flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterator
from time import perf_counter
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from mab_service.errors import MabError
from mab_service.features.source import CountingSource, Features, FeatureSource, Health
from mab_service.policy.sampler import TopK

logger = logging.getLogger("mab_service.metrics")

#: Seconds. Our answers take ~0.1 ms to ~10 ms in the worker; a Vertex fetch ~5 ms to the 250 ms deadline.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Candidates: the workloads we see are 50 to 2,000; the hard limit is max_candidates (default 10,000).
CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 400, 700, 1000, 2000, 5000, 10000)

REQUESTS = Counter("mab_requests", "HTTP requests answered, by endpoint and status.", ["endpoint", "status"])
REQUEST_DURATION = Histogram(
    "mab_request_duration_seconds",
    "Seconds from the app receiving a request to handing over its answer, by endpoint and status.",
    ["endpoint", "status"],
    buckets=LATENCY_BUCKETS,
)
CANDIDATES = Histogram(
    "mab_candidates_per_request", "Distinct candidates in each ranked /predict request.", buckets=CANDIDATE_BUCKETS
)
STAGE_DURATION = Histogram(
    "mab_stage_duration_seconds",
    "Seconds spent in each /predict stage: fetch (feature source), sample_rank (kernel), encode (JSON).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
FETCH_ERRORS = Counter(
    "mab_feature_fetch_errors", "Feature-source fetches that failed, by source and error code.", ["source", "error"]
)
CACHE_LOOKUPS = Counter("mab_cache_lookups", "Ids looked up in the feature cache, by result (hit, miss).", ["result"])
CACHE_STALE = Counter("mab_cache_stale_served", "Ids served from an expired cache entry while it was re-read.")
SHED = Counter("mab_shed_requests", "/predict requests answered 503 overloaded: the worker held max_in_flight.")
DEGRADED = Counter(
    "mab_degraded_fetches", "Feature fetches that a failing store answered only in part: the rest got the prior."
)
UNREAD = Counter("mab_unread_candidates", "Candidates a failing feature store did not read: they got the prior.")


class _Series:
    """Observations of one histogram child since the last flush: plain numbers, no lock, no file write."""

    __slots__ = ("bounds", "counts", "total", "child", "counter")

    def __init__(self, child: Histogram, bounds: tuple[float, ...], counter: Counter | None = None) -> None:
        self.bounds = (*bounds, float("inf"))
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.child = child
        self.counter = counter

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus' "le" bucket.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        n = sum(self.counts)
        if n == 0:
            return
        # prometheus-client has no bulk observe. Its histogram child keeps one value per bucket (not cumulative)
        # in ``_buckets`` and the sum in ``_sum``, which is all that observe() increments; tests/test_metrics.py
        # checks the exposition against the observations, so a change there fails the suite.
        buckets = self.child._buckets
        for i, count in enumerate(self.counts):
            if count:
                buckets[i].inc(count)
                self.counts[i] = 0
        self.child._sum.inc(self.total)
        self.total = 0.0
        if self.counter is not None:
            self.counter.inc(n)


class _Count:
    """A counter child's increments since the last flush."""

    __slots__ = ("n", "child")

    def __init__(self, child: Counter) -> None:
        self.n = 0
        self.child = child

    def flush(self) -> None:
        if self.n:
            self.child.inc(self.n)
            self.n = 0


class _Requests:
    """``mab_requests_total`` and ``mab_request_duration_seconds``: one ``_Series`` per endpoint and status."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, int], _Series] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        series = self.series.get((endpoint, status))
        if series is None:
            labels = (endpoint, str(status))
            series = _Series(REQUEST_DURATION.labels(*labels), LATENCY_BUCKETS, REQUESTS.labels(*labels))
            self.series[(endpoint, status)] = series
        series.observe(seconds)


class _CacheCounters:
    """Copies a feature cache's own counters (``lookups``, ``misses``, ``stale_served``) into the metrics."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.seen = (0, 0, 0)
        self.hits, self.misses = CACHE_LOOKUPS.labels("hit"), CACHE_LOOKUPS.labels("miss")

    def flush(self) -> None:
        now = (self.cache.lookups, self.cache.misses, self.cache.stale_served)
        lookups, misses, stale = (a - b for a, b in zip(now, self.seen))
        self.seen = now
        if lookups - misses > 0:
            self.hits.inc(lookups - misses)
        if misses > 0:
            self.misses.inc(misses)
        if stale > 0:
            CACHE_STALE.inc(stale)


# --- the feature source's own counters ---------------------------------------------------------------------

#: ``stats()`` names that are monotonic counts, exported as ``mab_feature_source_events_total{event=...}``.
SOURCE_COUNTERS = frozenset({
    "calls", "retries", "timed_out_calls", "failed_reads", "skipped_reads", "overloaded_reads", "shed_reads",
    "invalid_values", "coalesced", "refreshes", "refresh_failures", "evictions", "abandoned_waits", "warmup_read",
    "warmup_refreshes",
})  # fmt: skip
#: ``stats()`` names that are levels, exported as ``mab_feature_source_level{level=...}``.
SOURCE_LEVELS = frozenset({"entries", "max_entries", "memory_bytes", "consecutive_failures", "warmup_ids"})
SOURCE_EVENTS = Counter(
    "mab_feature_source_events",
    "Counts kept by the feature source and its cache, by source and event (store calls, retries, timed-out calls, "
    "failed, skipped, overloaded and shed reads, evictions, refreshes, warm-up ids read).",
    ["source", "event"],
)
SOURCE_LEVEL = Gauge(
    "mab_feature_source_level",
    "Levels of the feature source and its cache, by source: entries held, memory, failed reads in a row, warm-up ids.",
    ["source", "level"],
    multiprocess_mode="livesum",
)


class _SourceCounters:
    """Copies the ``stats()`` of a source and of every source it wraps into the two series above."""

    def __init__(self, source: FeatureSource) -> None:
        self.layers: list[tuple[str, CountingSource]] = []
        inner: object = source
        while inner is not None:
            if isinstance(inner, CountingSource):
                self.layers.append((str(getattr(inner, "name", type(inner).__name__)), inner))
            inner = getattr(inner, "source", None)
        self.seen: dict[tuple[str, str], float] = {}

    def flush(self) -> None:
        for name, layer in self.layers:
            for key, value in layer.stats().items():
                if key in SOURCE_COUNTERS:
                    delta = value - self.seen.get((name, key), 0.0)
                    if delta > 0:
                        SOURCE_EVENTS.labels(name, key).inc(delta)
                        self.seen[(name, key)] = value
                elif key in SOURCE_LEVELS:
                    SOURCE_LEVEL.labels(name, key).set(value)


@contextlib.contextmanager
def source_watched(source: FeatureSource) -> Iterator[None]:
    """Report the own counters of ``source`` and of what it wraps, while in the block."""
    counters = _SourceCounters(source)
    _sources.append(counters)
    try:
        yield
    finally:
        counters.flush()
        _sources.remove(counters)


_sources: list[_SourceCounters] = []
requests = _Requests()
candidates = _Series(CANDIDATES, CANDIDATE_BUCKETS)
fetch_seconds = _Series(STAGE_DURATION.labels("fetch"), LATENCY_BUCKETS)
sample_rank_seconds = _Series(STAGE_DURATION.labels("sample_rank"), LATENCY_BUCKETS)
encode_seconds = _Series(STAGE_DURATION.labels("encode"), LATENCY_BUCKETS)
shed = _Count(SHED)
degraded = _Count(DEGRADED)
unread = _Count(UNREAD)
_caches: list[_CacheCounters] = []


def flush() -> None:
    """Copy what this worker accumulated into prometheus-client (its shared file in multiprocess mode)."""
    for series in (*requests.series.values(), candidates, fetch_seconds, sample_rank_seconds, encode_seconds):
        series.flush()
    for count in (shed, degraded, unread):
        count.flush()
    for cache in _caches:
        cache.flush()
    for layers in _sources:
        layers.flush()


async def flush_every(interval_s: float) -> None:
    """Flush every ``interval_s`` seconds until cancelled, then once more."""
    try:
        while True:
            await asyncio.sleep(interval_s)
            flush()
    finally:
        flush()


@contextlib.asynccontextmanager
async def recording(source: FeatureSource, flush_interval_s: float) -> AsyncIterator[None]:
    """While in the block: flush every ``flush_interval_s`` and report the cache of ``source``; flush at the end."""
    with cache_watched(source), source_watched(source):
        flusher = asyncio.create_task(flush_every(flush_interval_s), name="metrics-flush")
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher


@contextlib.contextmanager
def cache_watched(source: FeatureSource) -> Iterator[None]:
    """Report the hits and misses of the feature cache ``source`` is or wraps, if any, while in the block."""
    from mab_service.features.cache import FeatureCache

    inner: object = source
    while inner is not None and not isinstance(inner, FeatureCache):
        inner = getattr(inner, "source", None)
    if inner is None:
        yield
        return
    counters = _CacheCounters(inner)
    _caches.append(counters)
    try:
        yield
    finally:
        counters.flush()
        _caches.remove(counters)


_multiprocess_registries: dict[str, CollectorRegistry] = {}


def exposition(metrics_dir: str, accept: str | None) -> tuple[bytes, str]:
    """This worker's metrics flushed, then every worker's in the format ``accept`` asks for: (body, content type).

    ``metrics_dir`` is the multiprocess directory (all workers' files), or empty for this process alone.
    """
    flush()
    registry = REGISTRY
    if metrics_dir:
        registry = _multiprocess_registries.get(metrics_dir) or CollectorRegistry()
        if metrics_dir not in _multiprocess_registries:
            MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]  # unannotated
            _multiprocess_registries[metrics_dir] = registry
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class MeteredSource:
    """A feature source that times every fetch and counts the failed ones; the rest goes to ``source``."""

    def __init__(self, source: FeatureSource) -> None:
        self.source = source
        self.name = source.name

    async def start(self) -> None:
        await self.source.start()

    async def fetch(self, ids: list[str]) -> Features:
        started = perf_counter()
        try:
            features = await self.source.fetch(ids)
        except MabError as exc:
            FETCH_ERRORS.labels(self.name, exc.code).inc()
            raise
        except Exception:
            FETCH_ERRORS.labels(self.name, "internal_error").inc()
            raise
        fetch_seconds.observe(perf_counter() - started)
        if features.unread:
            degraded.n += 1
            unread.n += features.unread
        return features

    def health(self) -> Health:
        return self.source.health()

    async def close(self) -> None:
        await self.source.close()


def timed_top_k(top_k: TopK) -> TopK:
    """``top_k`` timing each call into the ``sample_rank`` stage."""

    def timed(
        alpha: npt.NDArray[np.float64], beta: npt.NDArray[np.float64], k: int, *, seed: int | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        started = perf_counter()
        result = top_k(alpha, beta, k, seed=seed)
        sample_rank_seconds.observe(perf_counter() - started)
        return result

    return timed
