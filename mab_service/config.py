"""Settings: one typed, frozen object, built once at startup.

Every field is reachable three ways, in this order of precedence: a ``mab-service serve`` flag, an
environment variable ``MAB_<FIELD>`` (upper case), and the default below; its help text is in its metadata
(``setting``), where ``--help`` reads it. The settings are resolved once, in the process that starts, and handed
to every worker as the object. This module is the only one that reads or writes ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mab_service import specs

ENV_PREFIX = "MAB_"
#: Variables read when a field's own MAB_ variable is not set (the convention of the tool that defines them).
ENV_ALIASES = {
    "vertex_emulator_host": "VERTEX_FEATURESTORE_EMULATOR_HOST",
    "metrics_dir": "PROMETHEUS_MULTIPROC_DIR",
}
#: Where prometheus-client looks for its multiprocess directory (read when it is imported).
PROMETHEUS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


#: The loop's sizes, each an integer >= 1.
LOOP_SIZES = (
    "max_held_events",
    "max_held_members",
    "max_held_ids",
    "max_new_arms",
    "max_segment_rows",
    "journal_segment_bytes",
    "journal_buffer_max_bytes",
    "journal_max_bytes",
    "decision_log_max_bytes",
    "decision_log_file_bytes",
)


def setting(default: Any, help: str) -> Any:
    """A field of ``Settings``: its default and its help text, which ``--help`` and the docs show."""
    return dataclasses.field(default=default, metadata={"help": help})


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the key and the bad value."""


@dataclass(frozen=True)
class Settings:
    host: str = setting("127.0.0.1", "Address to listen on; ``0.0.0.0`` in containers.")
    port: int = setting(8000, "TCP port to listen on.")
    workers: int = setting(
        1,
        "Worker processes sharing the port; one per core on a bare node, one per container on Kubernetes.",
    )
    features: str = setting(
        "demo",
        "Feature source: ``demo`` (the bundled catalogue), ``csv:PATH`` (an embedded table loaded at start), "
        "``vertex-fos:projects/P/locations/L/featureOnlineStores/S/featureViews/V`` (Vertex AI Feature Store 2.0) or "
        "``vertex:projects/P/locations/L/featurestores/F/entityTypes/E`` (Feature Store Legacy: deprecated, switched "
        "off by Google on 2027-02-17) or ``bigtable:projects/P/instances/I/tables/T`` (the fleet's counts, kept by "
        "``mab-service learn``; docs/fleet.md).",
    )
    prior_alpha: float = setting(
        1.0, "Beta prior alpha for candidates the feature source does not know, or holds no valid parameters for."
    )
    prior_beta: float = setting(
        1.0, "Beta prior beta for candidates the feature source does not know, or holds no valid parameters for."
    )
    max_candidates: int = setting(
        10_000,
        "Most candidates one request may carry (after removing duplicates the count can only shrink).",
    )
    max_body_bytes: int = setting(
        1_048_576,
        "Largest request body accepted, in bytes; larger bodies get 413 before they are read.",
    )
    sampler: str = setting(
        "auto",
        "Sampler: ``auto`` or ``kernel`` (the C++ kernel) or ``reference`` (numpy, for comparison).",
    )
    log_level: str = setting("info", "Log level: critical, error, warning, info, debug.")
    access_log: bool = setting(False, "Log every request (off by default: it costs the hot path).")
    proxy_headers: bool = setting(
        False,
        "Trust X-Forwarded-For/-Proto from the peer (only behind a proxy that sets them).",
    )
    timeout_keep_alive_s: float = setting(5.0, "Seconds an idle keep-alive connection stays open.")
    header_timeout_s: float = setting(
        10.0,
        "Seconds a request head may take to arrive, from the connection opening (a new connection) or from its first "
        "bytes (a kept-alive one); then the connection is closed without an answer.",
    )
    body_timeout_s: float = setting(
        30.0,
        "Seconds a request body may take to arrive after its head; then 408 ``request_timeout`` and the connection is "
        "closed (closed without an answer if the request was already answered, e.g. 413).",
    )
    max_header_bytes: int = setting(
        65_536,
        "Largest request head (request line and headers) accepted, in bytes; larger heads get 431.",
    )
    log_format: str = setting(
        "json",
        "Log lines as ``json`` (one object per line, with the request id) or ``text`` (for a terminal).",
    )
    drain_delay_s: float = setting(
        0.0,
        "Seconds from SIGTERM to closing the listener: meanwhile /health answers 503 and every answer carries "
        "``Connection: close``, so load balancers stop sending here before the port closes (5 on Kubernetes).",
    )
    timeout_graceful_shutdown_s: float = setting(
        10.0,
        "Seconds requests in flight get to finish once the listener is closed; then they are cancelled. In fleet mode "
        "also the time the worker then has to deliver what it answered (its outbox to Pub/Sub, membership rows to "
        "Bigtable) before it exits.",
    )
    max_in_flight: int = setting(
        64,
        "Requests one worker holds at once (every endpoint but the probes /health, /live and /metrics); one arriving "
        "beyond that gets 503 ``overloaded`` at once.",
    )
    max_connections: int = setting(
        2048,
        "Open connections one worker keeps; the first request on a connection beyond that gets 503 ``overloaded`` "
        "with ``Connection: close``.",
    )
    api_keys_file: str = setting(
        "",
        "File of API keys, one per line (``#`` comments; each key 16 characters or more, no spaces): every endpoint "
        "but /health, /live and /metrics then needs ``Authorization: Bearer <key>``, else 401 ``unauthorized``. "
        "Re-read within about a second of a change. Empty: no authentication.",
    )
    retry_after_s: int = setting(1, "Seconds sent in the Retry-After header of an ``overloaded`` 503.")
    metrics: bool = setting(True, "Record request metrics and serve them at /metrics in the Prometheus text format.")
    metrics_dir: str = setting(
        "",
        "Directory of the Prometheus multiprocess files shared by the workers, wiped at start; empty means a fresh "
        "temporary directory. Also read from PROMETHEUS_MULTIPROC_DIR.",
    )
    metrics_flush_interval_s: float = setting(
        1.0,
        "Seconds between a worker's copies of its request metrics into the shared files (a scrape copies too).",
    )
    learning: bool = setting(
        True,
        "Close the bandit loop: answers carry an ``event_id``, ``POST /reward`` takes rewards, and on the embedded "
        "sources (``demo``, ``csv:``) every impression and reward updates the posteriors every worker of the node "
        "reads. On Vertex sources the loop records and counts events but the posteriors come from the store "
        "(docs/learning.md).",
    )
    state_dir: str = setting(
        "",
        "Directory of the loop's durable state (journal, checkpoint, decision log). Empty means "
        "``$XDG_STATE_HOME/mab-service/port-PORT`` (``~/.local/state/mab-service/port-8000``), so a restart on the "
        "same port finds its state. One node serves from one state directory (a second one on it refuses to start).",
    )
    events: str = setting(
        "",
        "Fleet mode: ``pubsub:projects/P/topics/T``, the topic every replica publishes its events and rewards to, "
        "for ``mab-service learn`` to count into the ``bigtable:`` table that ``features`` names (docs/fleet.md). "
        "Empty: the node's own loop.",
    )
    events_max_delay_s: float = setting(
        0.02,
        "Fleet mode: seconds an answered event waits for others before its Pub/Sub message and its membership row "
        "are sent.",
    )
    events_max_pending: int = setting(
        1000,
        "Fleet mode: Pub/Sub messages not yet stored per worker at most (and 100 times as many membership rows not "
        "yet written); past it /predict and /reward answer 503 ``events_unavailable`` rather than lose an event.",
    )
    events_max_pending_bytes: int = setting(
        67_108_864,
        "Fleet mode: bytes of those Pub/Sub messages per worker at most (64 MiB); past it /predict and /reward answer "
        "503 ``events_unavailable``, as past ``events_max_pending``, so the outbox's memory is bounded whatever the "
        "records' sizes.",
    )
    events_publish_timeout_s: float = setting(
        5.0,
        "Fleet mode: seconds a publish may take, the client's retries included: a reward waits this long at most "
        "for Pub/Sub before it is answered 503 (its message, the reward included, is sent again later).",
    )
    event_propagation_s: float = setting(
        1.0,
        "Fleet mode: seconds a reward for an event whose membership row is not in Bigtable yet (answered a moment "
        "ago, maybe by another replica) looks for it again before it is answered 404 ``unknown_event``.",
    )
    fleet_cache_ttl_s: float = setting(
        1.0,
        "Seconds counts read from Bigtable are served from the cache (a read-only replica, or ``fleet_follow`` off): "
        "with the learners' window, the bound on how long a reward takes to show in every replica's answers.",
    )
    fleet_follow: bool = setting(
        True,
        "Fleet mode (``events`` set): rank from the node's copy of the counts, which the learners' fan-out topic "
        "``<events topic>-counts`` keeps current (one subscription per node; Bigtable read only at start and to "
        "resynchronise). Off: read the counts from Bigtable behind the cache (``fleet_cache_ttl_s``).",
    )
    fleet_resync_after_s: float = setting(
        60.0,
        "Fleet mode: seconds Pub/Sub may leave the node's fan-out subscription unanswered before the node scans the "
        "table's counts again when it answers (messages may have been lost meanwhile).",
    )
    reward_window_s: float = setting(
        600.0,
        "Seconds an answered event is held: a reward for an older event is ``404 unknown_event``.",
    )
    max_held_events: int = setting(
        500_000,
        "Most events held at once per node (the oldest go first when it is full), ~208 bytes each of shared memory "
        "taken at start: 10,000 answers/s over a 600 s window needs 6,000,000.",
    )
    max_held_members: int = setting(
        10_000_000,
        "Most returned ids held over all held events (the oldest events go first when it is full), 16 bytes each of "
        "shared memory taken at start. The defaults take ~264 MB.",
    )
    max_held_ids: int = setting(
        1000,
        "Ids held per answer: an answer's first (best-ranked) ids up to this many are its impressions and may be "
        "rewarded; ids ranked below are returned but neither counted nor rewardable (``422 not_in_event``).",
    )
    max_client_share: float = setting(
        0.25,
        "Share of ``max_held_events`` and of ``max_held_members`` one client may hold within the reward window (each "
        "worker its part); past it its answers are ``429 too_many_events`` with Retry-After (docs/learning.md, "
        '"Fair holding").',
    )
    max_new_arms: int = setting(
        1_000_000,
        "Room for arms first seen at run time (not in the catalogue) in the node's arm table.",
    )
    max_segment_rows: int = setting(
        200_000,
        "Room for segment rows (a segment, and each arm within it) in the node's arm table, apart from the arms': a "
        "flood of new segments fills only this, never an arm's room; past it new segments rank from the global "
        'posteriors and are not counted (docs/learning.md, "Segments").',
    )
    segment_prior_weight: float = setting(
        10.0,
        "Pseudo-impressions the global posterior mean of an arm is worth within a segment: a ``/predict`` with a "
        "``segment`` draws Beta(m * mu + rewards, m * (1 - mu) + impressions - rewards) from the segment's counts.",
    )
    half_life_s: float = setting(
        0.0,
        "Seconds after which an impression or a reward counts half (forward decay, for global and segment counts); "
        "0 keeps every count at full weight. ``/arms`` then reports weighted counts.",
    )
    commit_delay_s: float = setting(
        0.001,
        "Group commit: seconds the journal waits after the first unsynced reward for others to share its fsync.",
    )
    impressions_sync_s: float = setting(
        0.5,
        "Most seconds an answered event's impressions stay in memory before they are written and fsynced.",
    )
    journal_segment_bytes: int = setting(
        64 * 1024 * 1024,
        "A worker's journal file is sealed and a new one begun past this size (or after ``reward_window_s``).",
    )
    journal_buffer_max_bytes: int = setting(
        64 * 1024 * 1024,
        "Most journal bytes a worker holds while the disk refuses writes; past it impressions are dropped and counted "
        "(``mab_journal_dropped_total``) and ``/reward`` answers 503.",
    )
    journal_max_bytes: int = setting(
        2 * 1024 * 1024 * 1024,
        "Most bytes the node's journal files take together (all workers'): a write that would pass it is refused, so "
        "``/reward`` answers 503 ``journal_unavailable`` and impressions are held in memory (then dropped and counted) "
        "until the checkpoint folds old files. Checked at every file rotation and every second, not per write. The "
        "default is half of the deploy's 4 GiB volume; the journal needs ~2.5 reward windows of answers.",
    )
    journal_min_free_bytes: int = setting(
        256 * 1024 * 1024,
        "Bytes the journal's volume keeps free (at most 5% of its size): below it the journal refuses writes as past "
        "``journal_max_bytes``.",
    )
    checkpoint_interval_s: float = setting(
        60.0,
        "Seconds between folds of sealed journal files older than the reward window into the checkpoint.",
    )
    decision_log: bool = setting(
        True,
        "Write every answer (event id, time, user, candidates with the alpha and beta used, seed, ranking) to the "
        "decision log in the state directory, for replay and off-policy evaluation.",
    )
    decision_log_sample: float = setting(
        1.0,
        "Share of answers the decision log keeps, in [0, 1]: an answer is kept when the CRC-32 of its event id falls "
        "below the share of 2**32, so the kept ones are an unbiased sample; each record carries the share.",
    )
    decision_log_max_bytes: int = setting(
        1024 * 1024 * 1024,
        "Most bytes the decision log keeps per worker; the oldest files go first.",
    )
    decision_log_file_bytes: int = setting(
        64 * 1024 * 1024,
        "A decision log file is closed and a new one begun past this size.",
    )
    vertex_alpha_feature: str = setting("alpha", "Vertex feature holding alpha (mapping ``beta``).")
    vertex_beta_feature: str = setting("beta", "Vertex feature holding beta (mapping ``beta``).")
    vertex_mapping: str = setting(
        "beta",
        "How Vertex features become parameters: ``beta`` (alpha and beta features) or ``counts`` (alpha = prior_alpha "
        "+ clicks, beta = prior_beta + impressions - clicks).",
    )
    vertex_clicks_feature: str = setting("clicks", "Vertex feature holding clicks (mapping ``counts``).")
    vertex_impressions_feature: str = setting("impressions", "Vertex feature holding impressions (mapping ``counts``).")
    vertex_api_version: str = setting(
        "v1beta1",
        "Vertex API version for Feature Store 2.0: ``v1beta1`` (batched streaming, many keys per message) or ``v1`` "
        "(GA, one key per call).",
    )
    vertex_endpoint: str = setting(
        "",
        "Vertex API endpoint; empty means the regional ``{location}-aiplatform.googleapis.com``.",
    )
    vertex_emulator_host: str = setting(
        "",
        "``host:port`` of a local Vertex emulator (insecure gRPC, no credentials); also read from "
        "VERTEX_FEATURESTORE_EMULATOR_HOST.",
    )
    vertex_chunk_size: int = setting(100, "Entity ids per Vertex read, 1 to 100 (the API's limit).")
    vertex_max_concurrent_reads: int = setting(16, "Vertex reads in flight at once per worker.")
    vertex_deadline_s: float = setting(
        0.25,
        "Deadline over a request's whole fan-out of Vertex reads, retries included; keep it below the request budget.",
    )
    vertex_call_timeout_s: float = setting(0.1, "Timeout of one Vertex call (capped by what is left of the deadline).")
    vertex_retries: int = setting(
        2,
        "Retries of a Vertex read after UNAVAILABLE, DEADLINE_EXCEEDED or a broken stream, within the deadline.",
    )
    vertex_backoff_s: float = setting(0.005, "Base of the jittered exponential backoff between Vertex retries.")
    vertex_unready_after_failures: int = setting(
        3,
        "Failed fan-outs in a row after which /health reports the store as failing.",
    )
    vertex_probe_interval_s: float = setting(
        1.0,
        "Seconds between background checks of the store while /health is not ready.",
    )
    on_store_failure: str = setting(
        "degrade",
        "What a /predict does when the feature store cannot be read in time: ``degrade`` (answer 200 with the prior "
        'for the ids not read, marked ``"degraded": true``) or ``fail`` (answer 503 ``feature_source_unavailable``). '
        "Either way, while the store is known to be failing, requests do not wait on it: the background check alone "
        "reads it until it recovers.",
    )
    cache_ttl_s: float = setting(
        60.0,
        "Seconds a value read from Vertex is served from the cache; 0 turns the cache off.",
    )
    cache_max_entries: int = setting(
        1_000_000,
        "Most ids the cache holds (96 bytes each at most, plus ids longer than 16 bytes).",
    )
    cache_stale_while_revalidate_s: float = setting(
        30.0,
        "Seconds past expiry a cached value is still served while it is re-read in the background; 0 turns it off.",
    )
    vertex_read_budget_s: float = setting(
        2.0,
        "Seconds a Vertex read may take in all, retries included, when the cache is on: a request waits for its "
        "reads at most ``vertex_deadline_s``, and a read it gave up on goes on to fill the cache.",
    )
    vertex_v1_calls_in_flight: int = setting(
        400,
        "Calls in flight per worker with the one-key-per-call ``v1`` API (Feature Store 2.0): 400 reads a "
        "400-candidate cold request in one round trip.",
    )
    vertex_channels: int = setting(
        0,
        "gRPC channels (HTTP/2 connections) per worker to Vertex; 0 opens one per 100 concurrent calls (Google's "
        "limit of streams per connection): 4 for ``v1``, 1 for the batched API.",
    )
    warmup_ids: str = setting(
        "",
        "File of ids to read into the cache at start, before /health turns 200: one id per line, or a CSV with an "
        "``entity_id`` column. Empty: no warm-up. The ids are then re-read every TTL, in large batches.",
    )
    warmup_timeout_s: float = setting(
        60.0,
        "Seconds the warm-up may take; then /health turns 200 with what was read, and the rest is read on demand.",
    )

    def __post_init__(self) -> None:
        _check(self.port, 0 <= self.port <= 65535, "port", "an integer in [0, 65535]")
        _check(self.workers, self.workers >= 1, "workers", "an integer >= 1")
        _check(self.max_candidates, self.max_candidates >= 1, "max_candidates", "an integer >= 1")
        _check(self.max_body_bytes, self.max_body_bytes >= 1024, "max_body_bytes", "an integer >= 1024")
        for name in ("prior_alpha", "prior_beta"):
            value = getattr(self, name)
            _check(value, math.isfinite(value) and value > 0, name, "a finite number > 0")
        _check(self.timeout_keep_alive_s, self.timeout_keep_alive_s > 0, "timeout_keep_alive_s", "a number > 0")
        for name in ("header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            _check(value, math.isfinite(value) and value > 0, name, "a finite number > 0")
        _check(self.max_header_bytes, self.max_header_bytes >= 1024, "max_header_bytes", "an integer >= 1024")
        _check(self.log_format, self.log_format in ("json", "text"), "log_format", "json or text")
        for name in ("timeout_graceful_shutdown_s", "metrics_flush_interval_s"):
            value = getattr(self, name)
            _check(value, math.isfinite(value) and value > 0, name, "a finite number > 0")
        for name in ("reward_window_s", "impressions_sync_s", "checkpoint_interval_s"):
            value = getattr(self, name)
            _check(value, math.isfinite(value) and value > 0, name, "a finite number > 0")
        weight = self.segment_prior_weight
        _check(weight, math.isfinite(weight) and weight > 0, "segment_prior_weight", "a finite number > 0")
        half_life = self.half_life_s
        _check(half_life, math.isfinite(half_life) and half_life >= 0, "half_life_s", "a finite number >= 0")
        share = self.max_client_share
        _check(share, math.isfinite(share) and 0 < share <= 1, "max_client_share", "a number in (0, 1]")
        delay = self.commit_delay_s
        _check(delay, math.isfinite(delay) and 0 <= delay <= 1, "commit_delay_s", "a number in [0, 1]")
        sample = self.decision_log_sample
        _check(sample, math.isfinite(sample) and 0 <= sample <= 1, "decision_log_sample", "a number in [0, 1]")
        for name in LOOP_SIZES:
            _check(getattr(self, name), getattr(self, name) >= 1, name, "an integer >= 1")
        reserve = self.journal_min_free_bytes
        _check(reserve, reserve >= 0, "journal_min_free_bytes", "an integer >= 0")
        drain = self.drain_delay_s
        _check(drain, math.isfinite(drain) and drain >= 0, "drain_delay_s", "a finite number >= 0")
        _check(self.max_in_flight, self.max_in_flight >= 1, "max_in_flight", "an integer >= 1")
        _check(self.max_connections, self.max_connections >= 1, "max_connections", "an integer >= 1")
        _check(self.retry_after_s, self.retry_after_s >= 0, "retry_after_s", "an integer >= 0")
        _check(self.sampler, self.sampler in ("auto", "kernel", "reference"), "sampler", "auto, kernel or reference")
        levels = ("critical", "error", "warning", "info", "debug")
        _check(self.log_level, self.log_level in levels, "log_level", ", ".join(levels))
        try:
            spec = specs.parse_spec(self.features)
        except ValueError:
            _check(self.features, False, "features", specs.SPEC_FORMS)
        if self.events:
            _check(self.events, specs.events_topic(self.events) is not None, "events", specs.EVENTS_FORM)
            _check(self.features, spec.kind == "bigtable", "features", "a bigtable: table when events is set")
            _check(self.learning, self.learning, "learning", "on when events is set")
        _check(
            self.events_publish_timeout_s,
            math.isfinite(self.events_publish_timeout_s) and self.events_publish_timeout_s > 0,
            "events_publish_timeout_s",
            "a finite number > 0",
        )
        for name in ("events_max_delay_s", "event_propagation_s"):
            value = getattr(self, name)
            _check(value, math.isfinite(value) and value >= 0, name, "a finite number >= 0")
        _check(
            self.fleet_cache_ttl_s,
            math.isfinite(self.fleet_cache_ttl_s) and self.fleet_cache_ttl_s >= 0,
            "fleet_cache_ttl_s",
            "a finite number >= 0",
        )
        _check(
            self.fleet_resync_after_s,
            math.isfinite(self.fleet_resync_after_s) and self.fleet_resync_after_s > 0,
            "fleet_resync_after_s",
            "a finite number > 0",
        )
        _check(self.events_max_pending, self.events_max_pending >= 1, "events_max_pending", "an integer >= 1")
        pending_bytes = self.events_max_pending_bytes
        _check(pending_bytes, pending_bytes >= 1, "events_max_pending_bytes", "an integer >= 1")
        _check(self.vertex_mapping, self.vertex_mapping in ("beta", "counts"), "vertex_mapping", "beta or counts")
        _check(
            self.on_store_failure, self.on_store_failure in ("degrade", "fail"), "on_store_failure", "degrade or fail"
        )
        _check(
            self.vertex_api_version, self.vertex_api_version in ("v1", "v1beta1"), "vertex_api_version", "v1 or v1beta1"
        )
        _check(
            self.vertex_chunk_size, 1 <= self.vertex_chunk_size <= 100, "vertex_chunk_size", "an integer in [1, 100]"
        )
        for name in ("vertex_max_concurrent_reads", "vertex_unready_after_failures", "cache_max_entries"):
            _check(getattr(self, name), getattr(self, name) >= 1, name, "an integer >= 1")
        _check(self.vertex_retries, self.vertex_retries >= 0, "vertex_retries", "an integer >= 0")
        for name in ("vertex_deadline_s", "vertex_call_timeout_s", "vertex_probe_interval_s"):
            value = getattr(self, name)
            _check(value, math.isfinite(value) and value > 0, name, "a finite number > 0")
        for name in ("vertex_backoff_s", "cache_ttl_s", "cache_stale_while_revalidate_s"):
            value = getattr(self, name)
            _check(value, math.isfinite(value) and value >= 0, name, "a finite number >= 0")
        for name in ("vertex_read_budget_s", "warmup_timeout_s"):
            value = getattr(self, name)
            _check(value, math.isfinite(value) and value > 0, name, "a finite number > 0")
        _check(self.vertex_channels, self.vertex_channels >= 0, "vertex_channels", "an integer >= 0")
        calls = self.vertex_v1_calls_in_flight
        _check(calls, calls >= 1, "vertex_v1_calls_in_flight", "an integer >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Settings from ``MAB_*`` variables (or an ``ENV_ALIASES`` variable when a field's own is unset), then
        ``overrides`` (values that are ``None`` are skipped)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None and f.name in ENV_ALIASES:
                raw = environ.get(ENV_ALIASES[f.name])
            if raw is not None:
                values[f.name] = _cast(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def export_metrics_dir(self, environ: MutableMapping[str, str]) -> None:
        """Set PROMETHEUS_MULTIPROC_DIR to ``metrics_dir``: the one setting that travels through the environment.

        prometheus-client picks multiprocess mode from this variable when it is first imported, in this process and
        in every worker process spawned after (which inherit the environment); the workers get the settings
        themselves as an object (``server.serve``).
        """
        if self.metrics and self.metrics_dir:
            environ[PROMETHEUS_DIR_VARIABLE] = self.metrics_dir

    def state_path(self) -> Path:
        """The loop's state directory: ``state_dir``, or ``$XDG_STATE_HOME/mab-service/port-PORT`` when it is empty."""
        if self.state_dir:
            return Path(self.state_dir)
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        return Path(base) / "mab-service" / f"port-{self.port}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _check(value: object, ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise SettingsError(f"setting {name} must be {expected} (got {value!r})")


def _cast(name: str, type_name: object, raw: str) -> Any:
    key = ENV_PREFIX + name.upper()
    try:
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"environment variable {key} must be a {type_name} (got {raw!r})") from None
    return raw
