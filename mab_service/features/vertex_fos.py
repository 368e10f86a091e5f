"""The Vertex AI Feature Store 2.0 source: a feature view of a feature online store.

Two ways to read, by ``vertex_api_version``:

- ``v1`` (GA): ``FeatureOnlineStoreService.FetchFeatureValues``, one key per call; calls run concurrently up to
  ``max_concurrent_reads``. NOT_FOUND means the store does not know the key: it gets the prior.
- ``v1beta1``: the batched, bidirectional ``StreamingFetchFeatureValues``, which only that API version offers:
  keys go in chunks of at most 100, one stream per chunk, read concurrently. Each answer carries a status: OK
  with the found keys' values, or NOT_FOUND listing unknown keys; answers may come in any order and are matched
  by key. A stream that breaks is re-requested for the keys it has not answered.

Limits, retries, deadline and readiness are those of ``read_policy.ReadPolicy``; decoding is ``vertex``'s.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from mab_service.errors import FeatureSourceError
from mab_service.features.cache import Lookup
from mab_service.features.read_policy import ReadPolicy, Retryable, grpc_code_name
from mab_service.features.vertex import MAX_IDS_PER_READ, ParameterMapping, StoreSource, VertexOptions, make_transport

FEATURE_VIEW = re.compile(r"^projects/([^/]+)/locations/([^/]+)/featureOnlineStores/([^/]+)/featureViews/([^/]+)$")
API_VERSIONS = ("v1", "v1beta1")
_NOT_FOUND = 5  # google.rpc.Code.NOT_FOUND
_OK = 0
_RETRYABLE_CODES = (14, 4)  # UNAVAILABLE, DEADLINE_EXCEEDED


class FeatureViewSource(StoreSource):
    """Reads Beta parameters from a Feature Store 2.0 feature view.

    Args:
        feature_view: ``projects/P/locations/L/featureOnlineStores/S/featureViews/V``.
        options: Features to read, mapping, limits, API version and where to connect.
        credentials: Google credentials to use instead of Application Default Credentials (production only).

    Raises:
        FeatureSourceError: If ``feature_view`` is not such a resource name, or the API version is unknown.
    """

    name = "vertex-fos"

    def __init__(self, feature_view: str, options: VertexOptions, credentials: Any = None) -> None:
        match = FEATURE_VIEW.match(feature_view)
        if match is None:
            raise FeatureSourceError(
                "a Vertex feature view must be projects/P/locations/L/featureOnlineStores/S/featureViews/V "
                f"(got {feature_view!r})"
            )
        if options.api_version not in API_VERSIONS:
            raise FeatureSourceError(f"vertex api version must be v1 or v1beta1 (got {options.api_version!r})")
        if not 1 <= options.chunk_size <= MAX_IDS_PER_READ:
            raise FeatureSourceError(f"chunk_size must be in [1, {MAX_IDS_PER_READ}] (got {options.chunk_size})")
        self.feature_view = feature_view
        self.location = match.group(2)
        self.options = options
        self.streaming = options.api_version == "v1beta1"
        self.policy = ReadPolicy(options, feature_view)
        self.mapping = ParameterMapping(options)
        self._credentials = credentials
        self._client: Any = None
        self._messages: Any = None
        self._prober: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Create the client (one channel per worker) and check the store; see ``VertexSource.start``.

        Raises:
            FeatureSourceError: If the client library is missing or there are no credentials.
        """
        try:
            from google.cloud import aiplatform_v1, aiplatform_v1beta1
            from google.cloud.aiplatform_v1.services.feature_online_store_service.transports import (
                grpc_asyncio as transport_v1,
            )
            from google.cloud.aiplatform_v1.types import feature_online_store_service as messages_v1
            from google.cloud.aiplatform_v1beta1.services.feature_online_store_service.transports import (
                grpc_asyncio as transport_v1beta1,
            )
            from google.cloud.aiplatform_v1beta1.types import feature_online_store_service as messages_v1beta1
        except ImportError as exc:
            raise FeatureSourceError(f"the vertex feature source needs mab-service[vertex] installed ({exc})") from None
        client_cls: Any = aiplatform_v1.FeatureOnlineStoreServiceAsyncClient
        transport_cls: Any = transport_v1.FeatureOnlineStoreServiceGrpcAsyncIOTransport
        messages: Any = messages_v1
        if self.streaming:
            client_cls = aiplatform_v1beta1.FeatureOnlineStoreServiceAsyncClient
            transport_cls = transport_v1beta1.FeatureOnlineStoreServiceGrpcAsyncIOTransport
            messages = messages_v1beta1
        transport = await make_transport(transport_cls, self.options, self.location, self._credentials)
        self._client = client_cls(transport=transport)
        self._messages = messages
        await self._begin_probing("vertex-fos-readiness-probe")

    async def read(self, ids: list[str], *, probe: bool = False) -> Lookup:
        """Read ``ids`` one key per call (v1) or in batched streams (v1beta1); see ``StoreSource.read``."""
        assert self._client is not None, "read before start"
        n = len(ids)
        out = self._prior_lookup(n)
        if not n:
            return out
        # Per chunk (v1: one chunk of every key), the ids still to be answered -> their positions in the request.
        waiting: list[dict[str, int]]
        if self.streaming:
            step = self.options.chunk_size
            waiting = [{ids[i]: i for i in range(s, min(s + step, n))} for s in range(0, n, step)]
            parts = [self._chunk_reader(chunk, out) for chunk in waiting]
        else:
            # One call per key: a few workers share an iterator over the positions instead of a task per key.
            waiting = [{id_: i for i, id_ in enumerate(ids)}]
            positions = iter(range(n))
            workers = min(n, self.options.max_concurrent_reads)
            parts = [self._key_worker(ids, positions, waiting[0], out) for _ in range(workers)]
        if not await self.policy.fan_out(parts, probe=probe):
            return self._with_unread(out, waiting)
        return out

    # --- v1: one key per call -------------------------------------------------------------------------------

    def _key_worker(
        self, ids: list[str], positions: Iterator[int], waiting: dict[str, int], out: Lookup
    ) -> Callable[[float], Awaitable[None]]:
        async def work(deadline: float) -> None:
            for position in positions:
                key = ids[position]
                await self.policy.attempt(deadline, lambda timeout_s: self._fetch_one(key, position, out, timeout_s))
                del waiting[key]

        return work

    async def _fetch_one(self, key: str, position: int, out: Lookup, timeout_s: float) -> None:
        messages = self._messages
        request = messages.FetchFeatureValuesRequest.pb()()
        request.feature_view = self.feature_view
        request.data_key.key = key
        request.data_format = 1  # KEY_VALUE
        try:
            response = await self._client.fetch_feature_values(
                request=messages.FetchFeatureValuesRequest.wrap(request), timeout=timeout_s
            )
        except Exception as exc:
            if grpc_code_name(exc) == "NOT_FOUND":
                return  # an unknown key keeps the prior
            raise
        self._place(messages.FetchFeatureValuesResponse.pb(response).key_values, position, out)

    # --- v1beta1: batched streaming -------------------------------------------------------------------------

    async def _stream(self, waiting: dict[str, int], out: Lookup, timeout_s: float) -> None:
        """One StreamingFetchFeatureValues stream with one request for the keys in ``waiting``.

        Raises:
            Retryable: If an answer reports UNAVAILABLE or DEADLINE_EXCEEDED, or the stream ends early.
            FeatureSourceError: If an answer reports any other error.
        """
        messages = self._messages
        request = messages.StreamingFetchFeatureValuesRequest.pb()()
        request.feature_view = self.feature_view
        request.data_format = 1  # KEY_VALUE
        for key in waiting:
            request.data_keys.add().key = key
        wrapped = messages.StreamingFetchFeatureValuesRequest.wrap(request)

        async def requests() -> AsyncIterator[Any]:
            yield wrapped

        raw = messages.StreamingFetchFeatureValuesResponse.pb
        stream = await self._client.streaming_fetch_feature_values(requests=requests(), timeout=timeout_s)
        async for message in stream:
            pb = raw(message)
            code = pb.status.code
            if code == _OK:
                for item in pb.data:
                    position = waiting.pop(item.data_key.key, None)
                    if position is not None:
                        self._place(item.key_values, position, out)
            elif code == _NOT_FOUND:
                for key in pb.data_keys_with_error:
                    waiting.pop(key.key, None)  # unknown: keeps the prior
            elif code in _RETRYABLE_CODES:
                raise Retryable(f"status {code}: {pb.status.message}")
            else:
                raise FeatureSourceError(
                    f"feature store {self.feature_view} failed: status {code}: {pb.status.message}"
                )
            if not waiting:
                stream.cancel()  # every key is answered: no need to wait for the server to close
                return
        if waiting:
            raise Retryable(f"the stream ended with {len(waiting)} keys unanswered")

    # --- decoding ---------------------------------------------------------------------------------------------

    def _place(self, key_values: Any, position: int, out: Lookup) -> None:
        first_name, second_name = self.options.feature_ids
        first = second = None
        for pair in key_values.features:
            if pair.name == first_name:
                first = pair.value
            elif pair.name == second_name:
                second = pair.value
        if first is None or second is None:
            names = [pair.name for pair in key_values.features]
            raise FeatureSourceError(
                f"feature view {self.feature_view} has no features {self.options.feature_ids} (it has {names})"
            )
        params = self.mapping.decode(first, second)
        if params is not None:
            out.alpha[position], out.beta[position] = params
            out.found[position] = True

    def stats(self) -> dict[str, float]:
        """Counters for metrics: calls, retries, failed fan-outs, invalid values, total fan-out latency."""
        return self.policy.stats() | {"invalid_values": self.mapping.invalid}
