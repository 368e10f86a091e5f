"""Settings: one typed, frozen object, built once at startup.

Every field is reachable three ways, in this order of precedence: a ``mab-service serve`` flag, an
environment variable ``MAB_<FIELD>`` (upper case), and the default below. This module is the only one
that reads or writes ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, fields
from typing import Any

from mab_service.features import factory

ENV_PREFIX = "MAB_"
#: Variables read when a field's own MAB_ variable is not set (the convention of the tool that defines them).
ENV_ALIASES = {
    "vertex_emulator_host": "VERTEX_FEATURESTORE_EMULATOR_HOST",
    "metrics_dir": "PROMETHEUS_MULTIPROC_DIR",
}
#: Where prometheus-client looks for its multiprocess directory (read when it is imported).
PROMETHEUS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the key and the bad value."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """Address to listen on; ``0.0.0.0`` in containers."""
    port: int = 8000
    """TCP port to listen on."""
    workers: int = 1
    """Worker processes sharing the port; one per core on a bare node, one per container on Kubernetes."""
    features: str = "demo"
    """Feature source: ``demo`` (the bundled catalogue), ``csv:PATH`` (an embedded table loaded at start),
    ``vertex-fos:projects/P/locations/L/featureOnlineStores/S/featureViews/V`` (Vertex AI Feature Store 2.0) or
    ``vertex:projects/P/locations/L/featurestores/F/entityTypes/E`` (Feature Store Legacy: deprecated, switched off
    by Google on 2027-02-17)."""
    prior_alpha: float = 1.0
    """Beta prior alpha for candidates the feature source does not know."""
    prior_beta: float = 1.0
    """Beta prior beta for candidates the feature source does not know."""
    max_candidates: int = 10_000
    """Most candidates one request may carry (after removing duplicates the count can only shrink)."""
    max_body_bytes: int = 1_048_576
    """Largest request body accepted, in bytes; larger bodies get 413 before they are read."""
    sampler: str = "auto"
    """Sampler: ``auto`` or ``kernel`` (the C++ kernel) or ``reference`` (numpy, for comparison)."""
    log_level: str = "info"
    """Log level: critical, error, warning, info, debug."""
    access_log: bool = False
    """Log every request (off by default: it costs the hot path)."""
    proxy_headers: bool = False
    """Trust X-Forwarded-For/-Proto from the peer (only behind a proxy that sets them)."""
    timeout_keep_alive_s: float = 5.0
    """Seconds an idle keep-alive connection stays open."""
    header_timeout_s: float = 10.0
    """Seconds a request head may take to arrive, from the connection opening (a new connection) or from its first
    bytes (a kept-alive one); then the connection is closed without an answer."""
    body_timeout_s: float = 30.0
    """Seconds a request body may take to arrive after its head; then 408 ``request_timeout`` and the connection is
    closed (closed without an answer if the request was already answered, e.g. 413)."""
    max_header_bytes: int = 65_536
    """Largest request head (request line and headers) accepted, in bytes; larger heads get 431."""
    log_format: str = "json"
    """Log lines as ``json`` (one object per line, with the request id) or ``text`` (for a terminal)."""
    drain_delay_s: float = 0.0
    """Seconds from SIGTERM to closing the listener: meanwhile /health answers 503 and every answer carries
    ``Connection: close``, so load balancers stop sending here before the port closes (5 on Kubernetes)."""
    timeout_graceful_shutdown_s: float = 10.0
    """Seconds requests in flight get to finish once the listener is closed; then they are cancelled."""
    max_in_flight: int = 64
    """Requests one worker holds at once; a /predict arriving beyond that gets 503 ``overloaded`` at once."""
    retry_after_s: int = 1
    """Seconds sent in the Retry-After header of an ``overloaded`` 503."""
    metrics: bool = True
    """Record request metrics and serve them at /metrics in the Prometheus text format."""
    metrics_dir: str = ""
    """Directory of the Prometheus multiprocess files shared by the workers, wiped at start; empty means a fresh
    temporary directory. Also read from PROMETHEUS_MULTIPROC_DIR."""
    metrics_flush_interval_s: float = 1.0
    """Seconds between a worker's copies of its request metrics into the shared files (a scrape copies too)."""
    vertex_alpha_feature: str = "alpha"
    """Vertex feature holding alpha (mapping ``beta``)."""
    vertex_beta_feature: str = "beta"
    """Vertex feature holding beta (mapping ``beta``)."""
    vertex_mapping: str = "beta"
    """How Vertex features become parameters: ``beta`` (alpha and beta features) or ``counts`` (alpha = prior_alpha
    + clicks, beta = prior_beta + impressions - clicks)."""
    vertex_clicks_feature: str = "clicks"
    """Vertex feature holding clicks (mapping ``counts``)."""
    vertex_impressions_feature: str = "impressions"
    """Vertex feature holding impressions (mapping ``counts``)."""
    vertex_api_version: str = "v1beta1"
    """Vertex API version for Feature Store 2.0: ``v1beta1`` (batched streaming, many keys per message) or ``v1``
    (GA, one key per call)."""
    vertex_endpoint: str = ""
    """Vertex API endpoint; empty means the regional ``{location}-aiplatform.googleapis.com``."""
    vertex_emulator_host: str = ""
    """``host:port`` of a local Vertex emulator (insecure gRPC, no credentials); also read from
    VERTEX_FEATURESTORE_EMULATOR_HOST."""
    vertex_chunk_size: int = 100
    """Entity ids per Vertex read, 1 to 100 (the API's limit)."""
    vertex_max_concurrent_reads: int = 16
    """Vertex reads in flight at once per worker."""
    vertex_deadline_s: float = 0.25
    """Deadline over a request's whole fan-out of Vertex reads, retries included; keep it below the request
    budget."""
    vertex_call_timeout_s: float = 0.1
    """Timeout of one Vertex call (capped by what is left of the deadline)."""
    vertex_retries: int = 2
    """Retries of a Vertex read after UNAVAILABLE, DEADLINE_EXCEEDED or a broken stream, within the deadline."""
    vertex_backoff_s: float = 0.005
    """Base of the jittered exponential backoff between Vertex retries."""
    vertex_unready_after_failures: int = 3
    """Failed fan-outs in a row after which /health reports the store as failing."""
    vertex_probe_interval_s: float = 1.0
    """Seconds between background checks of the store while /health is not ready."""
    on_store_failure: str = "degrade"
    """What a /predict does when the feature store cannot be read in time: ``degrade`` (answer 200 with the prior
    for the ids not read, marked ``"degraded": true``) or ``fail`` (answer 503 ``feature_source_unavailable``).
    Either way, while the store is known to be failing, requests do not wait on it: the background check alone
    reads it until it recovers."""
    cache_ttl_s: float = 60.0
    """Seconds a value read from Vertex is served from the cache; 0 turns the cache off."""
    cache_max_entries: int = 1_000_000
    """Most ids the cache holds (96 bytes each at most, plus ids longer than 16 bytes)."""
    cache_stale_while_revalidate_s: float = 30.0
    """Seconds past expiry a cached value is still served while it is re-read in the background; 0 turns it off."""
    vertex_read_budget_s: float = 2.0
    """Seconds a Vertex read may take in all, retries included, when the cache is on: a request waits for its
    reads at most ``vertex_deadline_s``, and a read it gave up on goes on to fill the cache."""
    vertex_v1_calls_in_flight: int = 400
    """Calls in flight per worker with the one-key-per-call ``v1`` API (Feature Store 2.0): 400 reads a 400-candidate
    cold request in one round trip."""
    vertex_channels: int = 0
    """gRPC channels (HTTP/2 connections) per worker to Vertex; 0 opens one per 100 concurrent calls (Google's limit
    of streams per connection): 4 for ``v1``, 1 for the batched API."""
    warmup_ids: str = ""
    """File of ids to read into the cache at start, before /health turns 200: one id per line, or a CSV with an
    ``entity_id`` column. Empty: no warm-up. The ids are then re-read every TTL, in large batches."""
    warmup_timeout_s: float = 60.0
    """Seconds the warm-up may take; then /health turns 200 with what was read, and the rest is read on demand."""

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
        drain = self.drain_delay_s
        _check(drain, math.isfinite(drain) and drain >= 0, "drain_delay_s", "a finite number >= 0")
        _check(self.max_in_flight, self.max_in_flight >= 1, "max_in_flight", "an integer >= 1")
        _check(self.retry_after_s, self.retry_after_s >= 0, "retry_after_s", "an integer >= 0")
        _check(self.sampler, self.sampler in ("auto", "kernel", "reference"), "sampler", "auto, kernel or reference")
        levels = ("critical", "error", "warning", "info", "debug")
        _check(self.log_level, self.log_level in levels, "log_level", ", ".join(levels))
        try:
            factory.parse_spec(self.features)
        except ValueError:
            _check(self.features, False, "features", factory.SPEC_FORMS)
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

    def export_env(self, environ: MutableMapping[str, str]) -> None:
        """Write every field as ``MAB_*`` so that worker processes rebuild the same settings."""
        for f in fields(self):
            value = getattr(self, f.name)
            environ[ENV_PREFIX + f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        if self.metrics and self.metrics_dir:
            # prometheus-client picks multiprocess mode from this variable when it is first imported.
            environ[PROMETHEUS_DIR_VARIABLE] = self.metrics_dir

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
