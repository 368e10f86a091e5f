"""Vertex AI Feature Store sources: the bandit's posteriors read online through the real async client.

``VertexSource`` reads a Featurestore entity type with ``StreamingReadFeatureValues``: a request's ids are split
into chunks of at most 100 (the API's limit), the chunks are read concurrently, and the answers are zipped back
in request order. The stream's first message is a header naming the features; then one message per entity, and
an entity the store does not know comes back with empty values: it gets the prior. The Feature Store 2.0 source
(``vertex_fos.FeatureViewSource``) shares the read policy defined here.

Every read is bounded (``read_policy.ReadPolicy``): at most ``max_concurrent_reads`` calls in flight per worker, one
deadline over the whole fan-out (shorter than the request budget), a per-call ``timeout=`` (the client has no
default timeout or retry for these methods), and retries with jittered exponential backoff on UNAVAILABLE and
DEADLINE_EXCEEDED while the deadline allows; a stream that breaks part-way is re-requested for the ids it has
not answered yet. A failed fan-out raises ``FeatureSourceError`` (503).

Responses are decoded from the raw protobuf messages under the proto-plus wrappers: reading a field through
proto-plus costs about 20 us per entity, through the raw message about 2 us (docs/vertex.md).

Readiness (``health``): not ready until the first successful read or check, and not ready while the store is
known to be failing (``unready_after_failures`` failed fan-outs in a row); a background probe re-checks the store
while it is not ready, so a pod taken out of rotation can come back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np

from mab_service.errors import FeatureSourceError
from mab_service.features.cache import REFRESH_RETRY_S, FeatureCache, Lookup
from mab_service.features.read_policy import ReadPolicy, Retryable
from mab_service.features.source import Features, FeatureSource, Health

if TYPE_CHECKING:
    from mab_service.config import Settings

logger = logging.getLogger("mab_service.vertex")

#: The most entity ids one read may carry: 101 is INVALID_ARGUMENT.
MAX_IDS_PER_READ = 100
#: An id no store holds: the readiness check reads it and expects an empty answer.
CHECK_ID = "mab-service-readiness-check"
CLOUD_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
#: gRPC waits up to 120 s between reconnection attempts by default: after an outage of a minute the store would be
#: back long before the channel noticed. Capped at 2 s, a worker is back within ~2 s of the store.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]

ENTITY_TYPE = re.compile(r"^projects/([^/]+)/locations/([^/]+)/featurestores/([^/]+)/entityTypes/([^/]+)$")


# --- options ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VertexOptions:
    """Everything a Vertex source needs from the settings (config.py documents each field)."""

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
    call_timeout_s: float = 0.1
    retries: int = 2
    backoff_s: float = 0.005
    unready_after_failures: int = 3
    probe_interval_s: float = 1.0
    on_failure: str = "degrade"
    emulator_host: str = ""
    endpoint: str = ""
    api_version: str = "v1"

    @classmethod
    def from_settings(cls, settings: Settings) -> VertexOptions:
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
            call_timeout_s=settings.vertex_call_timeout_s,
            retries=settings.vertex_retries,
            backoff_s=settings.vertex_backoff_s,
            unready_after_failures=settings.vertex_unready_after_failures,
            probe_interval_s=settings.vertex_probe_interval_s,
            on_failure=settings.on_store_failure,
            emulator_host=settings.vertex_emulator_host,
            endpoint=settings.vertex_endpoint,
            api_version=settings.vertex_api_version,
        )

    @property
    def feature_ids(self) -> tuple[str, str]:
        """The two features read per entity, in the order ``ParameterMapping.decode`` takes them."""
        if self.mapping == "counts":
            return (self.clicks_feature, self.impressions_feature)
        return (self.alpha_feature, self.beta_feature)


def source_from_settings(settings: Settings) -> FeatureSource:
    """The Vertex source ``settings.features`` names, behind a cache unless ``cache_ttl_s`` is 0.

    Raises:
        FeatureSourceError: If the spec is malformed.
    """
    kind, _, target = settings.features.partition(":")
    options = VertexOptions.from_settings(settings)
    source: FeatureSource
    if kind == "vertex":
        source = VertexSource(target, options)
    elif kind == "vertex-fos":
        from mab_service.features.vertex_fos import FeatureViewSource

        source = FeatureViewSource(target, options)
    else:
        raise FeatureSourceError(f"not a Vertex feature source: {settings.features!r}")
    if settings.cache_ttl_s <= 0:
        return source
    return FeatureCache(
        source,
        ttl_s=settings.cache_ttl_s,
        max_entries=settings.cache_max_entries,
        stale_s=settings.cache_stale_while_revalidate_s,
        retry_s=max(REFRESH_RETRY_S, settings.vertex_deadline_s),
        prior_alpha=settings.prior_alpha,
        prior_beta=settings.prior_beta,
    )


# --- decoding ---------------------------------------------------------------------------------------------------


class ParameterMapping:
    """Turns an entity's two feature values (raw ``FeatureValue`` messages) into Beta parameters.

    ``beta``: the values are alpha and beta themselves (DOUBLE or INT64). ``counts``: they are clicks and
    impressions, and alpha = prior_alpha + clicks, beta = prior_beta + impressions - clicks. Empty values mean an
    unknown entity; values that give no valid parameters (not finite and > 0, clicks > impressions) are counted
    in ``invalid`` and treated as unknown, so one bad row cannot fail a request.
    """

    def __init__(self, options: VertexOptions) -> None:
        self.counts = options.mapping == "counts"
        self.prior_alpha = options.prior_alpha
        self.prior_beta = options.prior_beta
        self.invalid = 0

    def decode(self, first: Any, second: Any) -> tuple[float, float] | None:
        # `double_value or int64_value`: a oneof, so the field not set reads 0 and the set one wins.
        if self.counts:
            if not first.ByteSize() and not second.ByteSize():
                return None
            clicks = first.int64_value or first.double_value
            impressions = second.int64_value or second.double_value
            if not 0 <= clicks <= impressions < math.inf:
                self.invalid += 1
                return None
            return self.prior_alpha + clicks, self.prior_beta + impressions - clicks
        a = first.double_value or first.int64_value
        b = second.double_value or second.int64_value
        # Written so that NaN fails too.
        if a > 0 and b > 0 and a < math.inf and b < math.inf:
            return float(a), float(b)
        if first.ByteSize() or second.ByteSize():
            self.invalid += 1
        return None


# --- client construction ----------------------------------------------------------------------------------------


async def make_transport(transport_cls: Any, options: VertexOptions, location: str, credentials: Any = None) -> Any:
    """The client's grpc.aio transport: an insecure channel to the emulator, else TLS to the regional endpoint.

    ``client_options`` with anonymous credentials would still try TLS, so the emulator gets a channel of its own,
    handed to the transport. In production, ``credentials`` (default: Application Default Credentials, looked up
    in a thread: it may read files or ask the metadata server) and ``{location}-aiplatform.googleapis.com``
    unless ``options.endpoint`` overrides it. Both channels reconnect with ``CHANNEL_OPTIONS``' backoff. Call it
    inside the running loop: grpc.aio channels belong to one.

    Raises:
        FeatureSourceError: If no credentials can be found.
    """
    import grpc

    if options.emulator_host:
        return transport_cls(channel=grpc.aio.insecure_channel(options.emulator_host, options=CHANNEL_OPTIONS))
    if credentials is None:
        credentials = await asyncio.to_thread(default_credentials)

    def create_channel(host: str, **kwargs: Any) -> Any:
        # The transport's own channel (TLS, credentials, its message size options) with our reconnect options.
        kwargs["options"] = [*kwargs.get("options", ()), *CHANNEL_OPTIONS]
        return transport_cls.create_channel(host, **kwargs)

    return transport_cls(
        host=options.endpoint or f"{location}-aiplatform.googleapis.com",
        credentials=credentials,
        channel=create_channel,
    )


def default_credentials() -> Any:
    """Application Default Credentials for Vertex AI.

    Raises:
        FeatureSourceError: If there are none.
    """
    import google.auth
    from google.auth import exceptions as auth_exceptions

    try:
        credentials, _ = google.auth.default(scopes=CLOUD_SCOPES)
    except auth_exceptions.DefaultCredentialsError as exc:
        raise FeatureSourceError(
            f"no Google credentials for Vertex AI ({exc}); set up Application Default Credentials, or "
            "VERTEX_FEATURESTORE_EMULATOR_HOST for a local emulator"
        ) from None
    return credentials


# --- the Featurestore source ------------------------------------------------------------------------------------


class StoreSource:
    """What the two Vertex sources share: readiness from the store's own answers, a background probe while the
    store is unready, and ``fetch`` on top of ``read``. A subclass creates its client in ``start`` and then calls
    ``_begin_probing``; it implements ``read``."""

    name: str
    options: VertexOptions
    policy: ReadPolicy
    _client: Any
    _prober: asyncio.Task[None] | None

    async def read(self, ids: list[str], *, probe: bool = False) -> Lookup:
        """Parameters of ``ids`` (the prior where the store has none) and which ids the store knew.

        ``probe`` marks the readiness check (``ReadPolicy.fan_out``).

        Raises:
            FeatureSourceError: If the store fails, or does not answer within the deadline, and the policy is to
                fail (otherwise the ids not read are listed in ``Lookup.unread``).
        """
        raise NotImplementedError

    def _prior_lookup(self, n: int) -> Lookup:
        """A lookup of ``n`` ids that the store has not answered yet: all at the prior, none known."""
        return Lookup(
            np.full(n, self.options.prior_alpha), np.full(n, self.options.prior_beta), np.zeros(n, dtype=np.bool_)
        )

    async def _stream(self, waiting: dict[str, int], out: Lookup, timeout_s: float) -> None:
        """One streaming call for the ids in ``waiting``, placing each answer in ``out`` and removing its id."""
        raise NotImplementedError

    def _chunk_reader(self, waiting: dict[str, int], out: Lookup) -> Callable[[float], Awaitable[None]]:
        """A fan-out part reading one chunk through ``_stream``, retried by the read policy.

        A broken stream leaves in ``waiting`` what it did not answer; the retry asks for that only.
        """

        async def read_chunk(deadline: float) -> None:
            await self.policy.attempt(deadline, lambda timeout_s: self._stream(waiting, out, timeout_s))

        return read_chunk

    @staticmethod
    def _with_unread(out: Lookup, waiting: list[dict[str, int]]) -> Lookup:
        """``out`` of a degraded fan-out: the positions still waiting for an answer are unread."""
        unread = [position for chunk in waiting for position in chunk.values()]
        return replace(out, unread=np.array(unread, dtype=np.intp))

    async def _begin_probing(self, task_name: str) -> None:
        await self.check()
        self._prober = asyncio.create_task(self._probe_while_unready(), name=task_name)

    async def check(self) -> bool:
        """Read one id no store holds; True if the store answered. Updates ``health`` either way."""
        try:
            await self.read([CHECK_ID], probe=True)
        except FeatureSourceError as exc:
            # The first failed check says why; the ones that follow while it stays down would only repeat it.
            first = self.policy.health.consecutive_failures == 1
            logger.log(logging.WARNING if first else logging.DEBUG, "feature store check failed: %s", exc.message)
            return False
        return True

    def health(self) -> Health:
        return self.policy.health.status()

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
        if self._client is not None:
            await self._client.transport.close()
            self._client = None

    async def _probe_while_unready(self) -> None:
        while True:
            await asyncio.sleep(self.options.probe_interval_s)
            if not self.policy.health.ready:
                await self.check()

    async def fetch(self, ids: list[str]) -> Features:
        found = await self.read(ids)
        unread = 0 if found.unread is None else len(found.unread)
        return Features(found.alpha, found.beta, int(np.count_nonzero(found.found)), unread)


class VertexSource(StoreSource):
    """Reads Beta parameters from a Vertex AI Featurestore entity type.

    Args:
        entity_type: ``projects/P/locations/L/featurestores/F/entityTypes/E``.
        options: Features to read, mapping, limits and where to connect.
        credentials: Google credentials to use instead of Application Default Credentials (production only).

    Raises:
        FeatureSourceError: If ``entity_type`` is not such a resource name, or ``options.chunk_size`` is out of
            range.
    """

    name = "vertex"

    def __init__(self, entity_type: str, options: VertexOptions, credentials: Any = None) -> None:
        match = ENTITY_TYPE.match(entity_type)
        if match is None:
            raise FeatureSourceError(
                "a Vertex entity type must be projects/P/locations/L/featurestores/F/entityTypes/E "
                f"(got {entity_type!r})"
            )
        if not 1 <= options.chunk_size <= MAX_IDS_PER_READ:
            raise FeatureSourceError(f"chunk_size must be in [1, {MAX_IDS_PER_READ}] (got {options.chunk_size})")
        self.entity_type = entity_type
        self.location = match.group(2)
        self.options = options
        self.policy = ReadPolicy(options, entity_type)
        self.mapping = ParameterMapping(options)
        self._credentials = credentials
        self._client: Any = None
        self._request_pb: Any = None
        self._wrap_request: Callable[[Any], Any] | None = None
        self._response_pb: Callable[[Any], Any] | None = None
        self._prober: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the client (one channel per worker) and check the store once; probe in the background after.

        A store that does not answer yet does not stop the start: ``health`` stays not ready until it does.

        Raises:
            FeatureSourceError: If the client library is missing or there are no credentials.
        """
        try:
            from google.cloud.aiplatform_v1 import FeaturestoreOnlineServingServiceAsyncClient
            from google.cloud.aiplatform_v1.services.featurestore_online_serving_service.transports import (
                grpc_asyncio as transports,
            )
            from google.cloud.aiplatform_v1.types import featurestore_online_service as messages
        except ImportError as exc:
            raise FeatureSourceError(f"the vertex feature source needs mab-service[vertex] installed ({exc})") from None
        transport = await make_transport(
            transports.FeaturestoreOnlineServingServiceGrpcAsyncIOTransport,
            self.options,
            self.location,
            self._credentials,
        )
        self._client = FeaturestoreOnlineServingServiceAsyncClient(transport=transport)
        request = messages.StreamingReadFeatureValuesRequest.pb()()
        request.entity_type = self.entity_type
        request.feature_selector.id_matcher.ids.extend(self.options.feature_ids)
        self._request_pb = request
        self._wrap_request = messages.StreamingReadFeatureValuesRequest.wrap
        self._response_pb = messages.ReadFeatureValuesResponse.pb
        await self._begin_probing("vertex-readiness-probe")

    # --- reads ------------------------------------------------------------------------------------------------

    async def read(self, ids: list[str], *, probe: bool = False) -> Lookup:
        """Read ``ids`` in chunks of ``chunk_size``, concurrently; see ``StoreSource.read``."""
        assert self._client is not None, "read before start"
        n = len(ids)
        out = self._prior_lookup(n)
        if n:
            step = self.options.chunk_size
            # Per chunk, the ids still to be answered -> their positions in the request.
            waiting = [{ids[i]: i for i in range(start, min(start + step, n))} for start in range(0, n, step)]
            if not await self.policy.fan_out(map(self._chunk_reader, waiting, repeat(out)), probe=probe):
                return self._with_unread(out, waiting)
        return out

    async def _stream(self, waiting: dict[str, int], out: Lookup, timeout_s: float) -> None:
        """One StreamingReadFeatureValues call for the ids in ``waiting``; removes each id as it is answered.

        Raises:
            Retryable: If the stream ended before answering every id.
        """
        assert self._wrap_request is not None and self._response_pb is not None
        request = type(self._request_pb)()
        request.CopyFrom(self._request_pb)
        request.entity_ids.extend(waiting)
        stream = await self._client.streaming_read_feature_values(
            request=self._wrap_request(request), timeout=timeout_s
        )
        raw = self._response_pb
        decode = self.mapping.decode
        alpha, beta, found = out.alpha, out.beta, out.found
        first = second = -1
        async for message in stream:
            pb = raw(message)
            if first < 0:
                # The header: features in the order their values will come.
                names = [d.id for d in pb.header.feature_descriptors]
                first, second = (names.index(f) if f in names else -1 for f in self.options.feature_ids)
                if first < 0 or second < 0:
                    raise FeatureSourceError(
                        f"feature store {self.entity_type} did not return features {self.options.feature_ids} "
                        f"(header names {names})"
                    )
                continue
            view = pb.entity_view
            position = waiting.pop(view.entity_id, None)
            if position is None:
                continue  # not asked for in this call (or answered twice): nothing to place
            data = view.data
            if len(data) <= max(first, second):
                continue  # no values: an unknown entity keeps the prior
            params = decode(data[first].value, data[second].value)
            if params is not None:
                alpha[position], beta[position] = params
                found[position] = True
        if waiting:
            raise Retryable(f"the stream ended with {len(waiting)} ids unanswered")

    def stats(self) -> dict[str, float]:
        """Counters for metrics: calls, retries, failed fan-outs, invalid values, total fan-out latency."""
        return self.policy.stats() | {"invalid_values": self.mapping.invalid}
