"""Prometheus metrics, declared once here, and the cheap accumulators the request path writes to.

In multiprocess mode (several workers, one scrape) every increment of a prometheus-client value is a locked
write into a memory-mapped file: about 1.6 us for a counter and 3.7 us for a histogram observation on our
machine, so the four or five a request needs would cost the ~90 us hot path more than our 5% budget. The
request path therefore adds to plain Python numbers (``_Series``: a bucket index found by bisection and two
additions, about 0.15 us), and ``flush()`` copies the totals into prometheus-client: every
``metrics_flush_interval_s`` from a background task, on each scrape this worker serves, and at shutdown. A scrape
so sees the other workers' requests up to one interval late.

prometheus-client has no bulk observe, so a histogram is kept as two counters (``StoredHistogram``): one per bucket
(the ``le`` label, not cumulative) and one for the sum, both incremented by whole totals at flush time through the
public ``inc``. They live in a registry of their own, never exposed as they are: ``stored_histograms`` turns them
back into histograms on each scrape (a collector in the default registry for one process; around prometheus-client's
``MultiProcessCollector`` for the shared files).

Exposed (all workers summed):

- ``mab_requests_total{endpoint,status}`` and ``mab_request_duration_seconds{endpoint,status}``: answers, and the
  time from the app receiving a request to handing over its answer (queueing before the app is not in it);
- ``mab_candidates_per_request``: distinct candidates of each ranked /predict request;
- ``mab_stage_duration_seconds{stage}``: ``fetch`` (the feature source, successful fetches), ``sample_rank``
  (the kernel), ``encode`` (the JSON answer);
- ``mab_feature_fetch_errors_total{source,error}``: failed fetches by error code;
- ``mab_cache_lookups_total{result}`` (``hit`` or ``miss``) and ``mab_cache_stale_served_total``: the feature
  cache, when the source has one;
- ``mab_shed_requests_total``: requests answered 503 ``overloaded`` (``max_in_flight``), and
  ``mab_refused_connections_total``: connections refused past ``max_connections``;
- ``mab_degraded_fetches_total`` and ``mab_unread_candidates_total``: fetches a failing store answered only in
  part (``on_store_failure = degrade``), and the candidates that got the prior for it;
- ``mab_invalid_parameters_total{source}``: candidates ranked by the prior because the store held no valid Beta
  parameters for them (``features.source.ParameterCheck``; counted on every answer that uses them);
- the learning loop: ``mab_impressions_total``, ``mab_impressions_unrecorded_total``, ``mab_rewards_total{result}``,
  ``mab_journal_syncs_total``, ``mab_journal_dropped_total``;
- fleet mode (``fleet.replica``): ``mab_events_published_total``, ``mab_events_publish_failures_total`` (attempts
  Pub/Sub refused; sent again), ``mab_events_refused_total`` (records answered 503: the outbox was full),
  ``mab_events_outbox_messages``, ``mab_events_outbox_bytes``; ``mab_event_rows_written_total``,
  ``mab_event_rows_failed_total`` and ``mab_event_rows_pending`` (events' membership rows in Bigtable);
  ``mab_fleet_counts_rows_read_total``, ``mab_fleet_counts_messages_total`` and ``mab_fleet_counts_resyncs_total``
  (the node's copy of the counts, kept by the learners' fan-out: ``fleet.fanout``);
- ``mab_feature_source_events_total{source,event}`` and ``mab_feature_source_level{source,level}``: the feature
  source's and its cache's own counters (``SOURCE_COUNTERS``: store calls, retries, timeouts, failed, skipped,
  overloaded and shed reads, evictions, refreshes, warm-up progress) and levels (``SOURCE_LEVELS``), copied from
  their ``stats()`` at each flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from time import perf_counter
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mab_service import pipeline
from mab_service.errors import MabError
from mab_service.features.source import CountingSource, Features, FeatureSource, Health
from mab_service.policy.sampler import TopK

logger = logging.getLogger("mab_service.metrics")

#: Seconds. Our answers take ~0.1 ms to ~10 ms in the worker; a Vertex fetch ~5 ms to the 250 ms deadline.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Candidates: the workloads we see are 50 to 2,000; the hard limit is max_candidates (default 10,000).
CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 400, 700, 1000, 2000, 5000, 10000)


class StoredHistogram:
    """A histogram kept as public counters, so that whole totals can be added at once: a count per bucket and a sum.

    ``labels(...)`` gives the counters of one child; ``family(...)`` rebuilds the histogram from their samples.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = (*buckets, math.inf)
        self.les = tuple(floatToGoString(b) for b in self.bounds)  # type: ignore[no-untyped-call]  # unannotated
        doc = f"Stored form of {name}, exposed only as that histogram."
        self.in_bucket = Counter(f"{name}_in_bucket", doc, [*labelnames, "le"], registry=registry)
        self.summed = Counter(f"{name}_summed", doc, labelnames, registry=registry)

    def labels(self, *values: str) -> tuple[list[Counter], Counter]:
        """The counters of one child: one per bucket (in order, ``+Inf`` last) and the sum."""
        summed = self.summed.labels(*values) if values else self.summed  # an unlabelled counter is its own child
        return [self.in_bucket.labels(*values, le) for le in self.les], summed

    def family(self, in_bucket: Metric | None, summed: Metric | None) -> HistogramMetricFamily:
        """The histogram from the sampled counters (of one process, or summed over the workers' files)."""
        counts: dict[tuple[str, ...], dict[str, float]] = {}
        sums: dict[tuple[str, ...], float] = {}
        for sample in in_bucket.samples if in_bucket is not None else ():
            if sample.name.endswith("_total"):
                key = tuple(sample.labels[n] for n in self.labelnames)
                counts.setdefault(key, {})[sample.labels["le"]] = sample.value
        for sample in summed.samples if summed is not None else ():
            if sample.name.endswith("_total"):
                sums[tuple(sample.labels[n] for n in self.labelnames)] = sample.value
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, by_le in sorted(counts.items()):
            cumulative = 0.0
            buckets = []
            for le in self.les:
                cumulative += by_le.get(le, 0.0)
                buckets.append((le, cumulative))
            histogram.add_metric(list(key), buckets, sum_value=sums.get(key, 0.0))
        return histogram


def stored_histograms(families: Iterable[Metric], histograms: Iterable[StoredHistogram]) -> Iterator[Metric]:
    """``families`` with the counters of each of ``histograms`` turned back into that histogram."""
    parts: dict[str, tuple[StoredHistogram, int]] = {}
    for histogram in histograms:
        parts[f"{histogram.name}_in_bucket"] = (histogram, 0)
        parts[f"{histogram.name}_summed"] = (histogram, 1)
    found: dict[str, list[Metric | None]] = {}
    order: list[StoredHistogram] = []
    for family in families:
        part = parts.get(family.name)
        if part is None:
            yield family
            continue
        histogram, index = part
        if histogram.name not in found:
            found[histogram.name] = [None, None]
            order.append(histogram)
        found[histogram.name][index] = family
    for histogram in order:
        yield histogram.family(*found[histogram.name])


#: The histograms' counters: a registry of their own, so that they are exposed only as the histograms.
_STORE = CollectorRegistry(auto_describe=False)

REQUESTS = Counter("mab_requests", "HTTP requests answered, by endpoint and status.", ["endpoint", "status"])
REQUEST_DURATION = StoredHistogram(
    "mab_request_duration_seconds",
    "Seconds from the app receiving a request to handing over its answer, by endpoint and status.",
    ["endpoint", "status"],
    LATENCY_BUCKETS,
    _STORE,
)
CANDIDATES = StoredHistogram(
    "mab_candidates_per_request", "Distinct candidates in each ranked /predict request.", [], CANDIDATE_BUCKETS, _STORE
)
STAGE_DURATION = StoredHistogram(
    "mab_stage_duration_seconds",
    "Seconds spent in each /predict stage: fetch (feature source), sample_rank (kernel), encode (JSON).",
    ["stage"],
    LATENCY_BUCKETS,
    _STORE,
)
HISTOGRAMS = (REQUEST_DURATION, CANDIDATES, STAGE_DURATION)
FETCH_ERRORS = Counter(
    "mab_feature_fetch_errors", "Feature-source fetches that failed, by source and error code.", ["source", "error"]
)
CACHE_LOOKUPS = Counter("mab_cache_lookups", "Ids looked up in the feature cache, by result (hit, miss).", ["result"])
CACHE_STALE = Counter("mab_cache_stale_served", "Ids served from an expired cache entry while it was re-read.")
SHED = Counter("mab_shed_requests", "Requests answered 503 overloaded: the worker held max_in_flight.")
REFUSED_CONNECTIONS = Counter(
    "mab_refused_connections", "Connections refused (503 overloaded, then closed): the worker held max_connections."
)
DEGRADED = Counter(
    "mab_degraded_fetches", "Feature fetches that a failing store answered only in part: the rest got the prior."
)
UNREAD = Counter("mab_unread_candidates", "Candidates a failing feature store did not read: they got the prior.")
INVALID_PARAMETERS = Counter(
    "mab_invalid_parameters",
    "Candidates ranked by the prior because the store held no valid Beta parameters for them (alpha or beta not "
    "finite and > 0), by source.",
    ["source"],
)
IMPRESSIONS = Counter("mab_impressions", "Ids returned in answers (impressions) the loop counted.")
IMPRESSIONS_UNRECORDED = Counter(
    "mab_impressions_unrecorded", "Impressions of new arms the shared arm table had no room for (served by the prior)."
)
REWARDS = Counter(
    "mab_rewards",
    "Rewards posted, by result: accepted, duplicate, unknown_event, not_in_event, unavailable (503).",
    ["result"],
)
JOURNAL_SYNCS = Counter("mab_journal_syncs", "fdatasync calls of the loop's journal (group commits).")
JOURNAL_DROPPED = Counter(
    "mab_journal_dropped", "Events the journal dropped: the disk refused them past journal_buffer_max_bytes."
)


class _Series:
    """Observations of one histogram child since the last flush: plain numbers, no lock, no file write."""

    __slots__ = ("bounds", "counts", "total", "in_bucket", "summed", "counter")

    def __init__(self, histogram: StoredHistogram, labels: Sequence[str] = (), counter: Counter | None = None) -> None:
        self.bounds = histogram.bounds
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.in_bucket, self.summed = histogram.labels(*labels)
        self.counter = counter

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus' "le" bucket.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        n = sum(self.counts)
        if n == 0:
            return
        for i, count in enumerate(self.counts):
            if count:
                self.in_bucket[i].inc(count)
                self.counts[i] = 0
        self.summed.inc(self.total)
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
            series = _Series(REQUEST_DURATION, labels, REQUESTS.labels(*labels))
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


EVENTS_PUBLISHED = Counter("mab_events_published", "Fleet mode: messages of events and rewards Pub/Sub stored.")
EVENTS_PUBLISH_FAILURES = Counter(
    "mab_events_publish_failures", "Fleet mode: publish attempts Pub/Sub refused (their events are sent again)."
)
EVENTS_REFUSED = Counter(
    "mab_events_refused", "Fleet mode: events and rewards answered 503 because the outbox to Pub/Sub was full."
)
EVENTS_OUTBOX = Gauge(
    "mab_events_outbox_messages",
    "Fleet mode: messages to Pub/Sub not yet stored (in flight, or waiting to be sent again).",
    multiprocess_mode="livesum",
)
EVENTS_OUTBOX_BYTES = Gauge(
    "mab_events_outbox_bytes",
    "Fleet mode: bytes of the messages to Pub/Sub not yet stored (bounded by events_max_pending_bytes).",
    multiprocess_mode="livesum",
)
EVENT_ROWS_WRITTEN = Counter("mab_event_rows_written", "Fleet mode: events' membership rows written to Bigtable.")
EVENT_ROWS_FAILED = Counter(
    "mab_event_rows_failed", "Fleet mode: membership row writes Bigtable refused (they are sent again)."
)
COUNTS_ROWS_READ = Counter(
    "mab_fleet_counts_rows_read",
    "Fleet mode: counts rows the node's follower read from Bigtable (its start scan and resyncs, never per answer).",
)
COUNTS_MESSAGES = Counter(
    "mab_fleet_counts_messages", "Fleet mode: the learners' fan-out messages applied to the node's arm table."
)
COUNTS_RESYNCS = Counter(
    "mab_fleet_counts_resyncs",
    "Fleet mode: scans of the counts by the node's follower (at start, and after a gap, a lost subscription or a "
    "silence of Pub/Sub).",
)
EVENT_ROWS_PENDING = Gauge(
    "mab_event_rows_pending", "Fleet mode: membership rows not yet written to Bigtable.", multiprocess_mode="livesum"
)
_FLEET_COUNTERS = (
    (EVENTS_PUBLISHED, "messages_published"),
    (EVENTS_PUBLISH_FAILURES, "publish_failures"),
    (EVENTS_REFUSED, "records_refused"),
    (EVENT_ROWS_WRITTEN, "event_rows_written"),
    (EVENT_ROWS_FAILED, "event_rows_failed"),
    (COUNTS_ROWS_READ, "counts_rows_read"),
    (COUNTS_MESSAGES, "counts_messages"),
    (COUNTS_RESYNCS, "counts_resyncs"),
)

_FLEET_GAUGES = (
    (EVENTS_OUTBOX, "outbox_messages"),
    (EVENTS_OUTBOX_BYTES, "outbox_bytes"),
    (EVENT_ROWS_PENDING, "event_rows_pending"),
)
_FLEET_KEYS = [key for _, key in (*_FLEET_COUNTERS, *_FLEET_GAUGES)]
#: The loop's own counters, by their ``_LoopCounters._now`` key (the rewards by result are ``REWARDS``'s children).
_LOOP_COUNTERS = (
    (IMPRESSIONS, "impressions"),
    (IMPRESSIONS_UNRECORDED, "unrecorded"),
    (JOURNAL_SYNCS, "syncs"),
    (JOURNAL_DROPPED, "dropped"),
)


class _LoopCounters:
    """Copies a worker's loop counters (``Loop.counters()``, ``learning.protocol``) into the metrics."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.seen: dict[str, float] = {}
        self.results = {name: REWARDS.labels(name) for name in self.RESULTS}

    RESULTS = ("accepted", "duplicate", "unknown_event", "not_in_event", "unavailable")

    def _now(self) -> dict[str, float]:
        counters = self.loop.counters()
        fleet = counters.fleet
        return {
            **{key: fleet[key] for key in _FLEET_KEYS if key in fleet},
            "impressions": counters.impressions,
            "unrecorded": counters.unrecorded,
            "accepted": counters.accepted,
            "duplicate": counters.duplicate,
            "unknown_event": counters.unknown_event,
            "not_in_event": counters.not_in_event,
            "unavailable": counters.unavailable,
            "syncs": counters.syncs,
            "dropped": counters.dropped,
        }

    def flush(self) -> None:
        now = self._now()
        delta = {key: value - self.seen.get(key, 0) for key, value in now.items()}
        self.seen = now
        counters = (*_LOOP_COUNTERS, *((child, name) for name, child in self.results.items()), *_FLEET_COUNTERS)
        for counter, key in counters:
            if delta.get(key, 0) > 0:
                counter.inc(delta[key])
        for gauge, key in _FLEET_GAUGES:
            if key in now:
                gauge.set(now[key])


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
candidates = _Series(CANDIDATES)
fetch_seconds = _Series(STAGE_DURATION, ("fetch",))
sample_rank_seconds = _Series(STAGE_DURATION, ("sample_rank",))
encode_seconds = _Series(STAGE_DURATION, ("encode",))
shed = _Count(SHED)
refused_connections = _Count(REFUSED_CONNECTIONS)
degraded = _Count(DEGRADED)
unread = _Count(UNREAD)
_caches: list[_CacheCounters] = []
_loops: list[_LoopCounters] = []


class _InvalidCounters:
    """Copies the pipeline's count of replaced parameters (``ParameterCheck.stats``) into the metrics."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def flush(self) -> None:
        for source, replaced in pipeline.parameter_check.stats().by_source.items():
            delta = replaced - self.seen.get(source, 0)
            if delta > 0:
                INVALID_PARAMETERS.labels(source).inc(delta)
                self.seen[source] = replaced


_invalid = _InvalidCounters()


def flush() -> None:
    """Copy what this worker accumulated into prometheus-client (its shared file in multiprocess mode)."""
    for series in (*requests.series.values(), candidates, fetch_seconds, sample_rank_seconds, encode_seconds):
        series.flush()
    for count in (shed, refused_connections, degraded, unread):
        count.flush()
    _invalid.flush()
    for cache in _caches:
        cache.flush()
    for loop in _loops:
        loop.flush()
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
def loop_watched(loop: Any) -> Iterator[None]:
    """Report the counters of a worker's learning loop (None: nothing to report) while in the block."""
    if loop is None:
        yield
        return
    counters = _LoopCounters(loop)
    _loops.append(counters)
    try:
        yield
    finally:
        counters.flush()
        _loops.remove(counters)


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


class _Histograms(Collector):
    """The stored histograms of ``families()``: this process's counters, or the counters of every worker's files."""

    def __init__(self, families: Any) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return stored_histograms(self.families(), HISTOGRAMS)

    def describe(self) -> Iterable[Metric]:
        return ()  # nothing to check against the other collectors' names when it is registered


# One process: the histograms beside the other metrics of the default registry.
REGISTRY.register(_Histograms(_STORE.collect))
_multiprocess_registries: dict[str, CollectorRegistry] = {}


def exposition(metrics_dir: str, accept: str | None) -> tuple[bytes, str]:
    """This worker's metrics flushed, then every worker's in the format ``accept`` asks for: (body, content type).

    ``metrics_dir`` is the multiprocess directory (all workers' files), or empty for this process alone.
    """
    flush()
    registry = REGISTRY
    if metrics_dir:
        registry = _multiprocess_registries.get(metrics_dir) or CollectorRegistry(auto_describe=False)
        if metrics_dir not in _multiprocess_registries:
            files = MultiProcessCollector(None, path=metrics_dir)  # type: ignore[no-untyped-call]  # unannotated
            registry.register(_Histograms(files.collect))
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

    @property
    def prior(self) -> tuple[float, float]:
        return self.source.prior

    async def close(self) -> None:
        await self.source.close()


def answered_natively(candidates_n: int, fetch_s: float, sample_s: float, encode_s: float) -> None:
    """Observe an answer the native path gave: its candidates and the time of its lookup, its draw and its encoding."""
    candidates.observe(candidates_n)
    fetch_seconds.observe(fetch_s)
    sample_rank_seconds.observe(sample_s)
    encode_seconds.observe(encode_s)


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
