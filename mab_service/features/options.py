"""What a Vertex source needs from the settings, as one frozen object (config.py documents each field).

Kept apart from the sources so that the read policy, both Vertex backends and the factory share it without
importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

# The resource each Vertex backend reads; group 2 is the location (which names the regional endpoint).
from mab_service.specs import ENTITY_TYPE as ENTITY_TYPE, FEATURE_VIEW as FEATURE_VIEW

if TYPE_CHECKING:
    from mab_service.config import Settings

#: The most entity ids one read may carry: 101 is INVALID_ARGUMENT.
MAX_IDS_PER_READ = 100


@dataclass(frozen=True)
class VertexOptions:
    """Features to read, their mapping, the limits of every read, and where to connect."""

    alpha_feature: str = "alpha"
    beta_feature: str = "beta"
    mapping: str = "beta"
    clicks_feature: str = "clicks"
    impressions_feature: str = "impressions"
    prior_alpha: float = 1.0
    prior_beta: float = 1.0
    chunk_size: int = MAX_IDS_PER_READ
    max_concurrent_reads: int = 16
    deadline_s: float = 0.25
    """How long a request waits for its reads."""
    read_budget_s: float = 0.0
    """How long a read may go on in all, retries included; 0 means ``deadline_s``. Longer than ``deadline_s``
    only under a cache: a read a request gave up on goes on to fill it."""
    call_timeout_s: float = 0.1
    retries: int = 2
    backoff_s: float = 0.005
    unready_after_failures: int = 3
    probe_interval_s: float = 1.0
    on_failure: str = "degrade"
    emulator_host: str = ""
    endpoint: str = ""
    api_version: str = "v1beta1"
    v1_calls_in_flight: int = 400
    """Calls in flight per worker with the one-key-per-call ``v1`` API: a 400-candidate cold request in one round
    trip."""
    channels: int = 0
    """grpc channels (HTTP/2 connections) per worker; 0 picks enough for the calls in flight (``channel_count``)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> VertexOptions:
        budget = settings.vertex_read_budget_s if settings.cache_ttl_s > 0 else 0.0
        return cls(
            alpha_feature=settings.vertex_alpha_feature,
            beta_feature=settings.vertex_beta_feature,
            mapping=settings.vertex_mapping,
            clicks_feature=settings.vertex_clicks_feature,
            impressions_feature=settings.vertex_impressions_feature,
            prior_alpha=settings.prior_alpha,
            prior_beta=settings.prior_beta,
            chunk_size=settings.vertex_chunk_size,
            max_concurrent_reads=settings.vertex_max_concurrent_reads,
            deadline_s=settings.vertex_deadline_s,
            read_budget_s=budget,
            call_timeout_s=settings.vertex_call_timeout_s,
            retries=settings.vertex_retries,
            backoff_s=settings.vertex_backoff_s,
            unready_after_failures=settings.vertex_unready_after_failures,
            probe_interval_s=settings.vertex_probe_interval_s,
            on_failure=settings.on_store_failure,
            emulator_host=settings.vertex_emulator_host,
            endpoint=settings.vertex_endpoint,
            api_version=settings.vertex_api_version,
            v1_calls_in_flight=settings.vertex_v1_calls_in_flight,
            channels=settings.vertex_channels,
        )

    @property
    def feature_ids(self) -> tuple[str, str]:
        """The two features read per entity, in the order ``ParameterMapping.decode`` takes them."""
        if self.mapping == "counts":
            return (self.clicks_feature, self.impressions_feature)
        return (self.alpha_feature, self.beta_feature)

    @property
    def budget_s(self) -> float:
        """The longest a read may go on: ``read_budget_s``, never shorter than ``deadline_s``."""
        return max(self.deadline_s, self.read_budget_s)

    def channel_count(self, calls_in_flight: int) -> int:
        """Channels for ``calls_in_flight`` concurrent calls: Google's front ends allow 100 concurrent streams per
        HTTP/2 connection, and calls beyond that limit queue on the connection."""
        return self.channels or max(1, -(-calls_in_flight // 100))
