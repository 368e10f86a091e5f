"""The Vertex AI Feature Store (Legacy) source: an entity type of a Featurestore. Deprecated.

Google stopped adding features to Legacy Feature Store on 2026-05-17 and switches it off on 2027-02-17; new
deployments use Feature Store 2.0 (``vertex_fos``). This source keeps working until then (docs/vertex.md has
the migration).

``VertexSource`` reads with ``StreamingReadFeatureValues``: a request's ids are split into chunks of at most 100
(the API's limit), the chunks are read concurrently, and the answers are zipped back in request order. The
stream's first message is a header naming the features; then one message per entity, and an entity the store
does not know comes back with empty values: it gets the prior. A stream that breaks part-way is re-requested for
the ids it has not answered yet. Reads, bounds and readiness are ``store.StoreSource``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from mab_service.errors import FeatureSourceError
from mab_service.features.options import ENTITY_TYPE, MAX_IDS_PER_READ, VertexOptions
from mab_service.features.read_policy import ReadPolicy, Retryable
from mab_service.features.source import Lookup
from mab_service.features.store import ParameterMapping, Part, StoreSource, make_transport

logger = logging.getLogger("mab_service.vertex")

#: When Google switches Legacy Feature Store off.
SUNSET = "2027-02-17"


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
        self._clients: list[Any] = []
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
        self._clients = [FeaturestoreOnlineServingServiceAsyncClient(transport=transport)]
        logger.warning(
            "the vertex: source reads Vertex AI Feature Store (Legacy), which Google switches off on %s; "
            "move to vertex-fos: (Feature Store 2.0, docs/vertex.md)",
            SUNSET,
        )
        request = messages.StreamingReadFeatureValuesRequest.pb()()
        request.entity_type = self.entity_type
        request.feature_selector.id_matcher.ids.extend(self.options.feature_ids)
        self._request_pb = request
        self._wrap_request = messages.StreamingReadFeatureValuesRequest.wrap
        self._response_pb = messages.ReadFeatureValuesResponse.pb
        await self._begin_probing("vertex-readiness-probe")

    # --- reads ------------------------------------------------------------------------------------------------

    def _plan(self, ids: list[str], out: Lookup) -> tuple[list[Part], list[dict[str, int]]]:
        """Chunks of ``chunk_size`` ids, one stream each, read concurrently."""
        n, step = len(ids), self.options.chunk_size
        # Per chunk, the ids still to be answered -> their positions in the request.
        waiting = [{ids[i]: i for i in range(start, min(start + step, n))} for start in range(0, n, step)]
        return [self._chunk_reader(chunk, out) for chunk in waiting], waiting

    def _chunk_reader(self, waiting: dict[str, int], out: Lookup) -> Part:
        """A fan-out part reading one chunk; a broken stream leaves in ``waiting`` what it did not answer, and the
        retry asks for that only."""

        async def read_chunk(deadline: float) -> None:
            await self.policy.attempt(deadline, lambda timeout_s: self._stream(waiting, out, timeout_s))

        return read_chunk

    async def _stream(self, waiting: dict[str, int], out: Lookup, timeout_s: float) -> None:
        """One StreamingReadFeatureValues call for the ids in ``waiting``; removes each id as it is answered.

        Raises:
            Retryable: If the stream ended before answering every id.
        """
        assert self._wrap_request is not None and self._response_pb is not None
        request = type(self._request_pb)()
        request.CopyFrom(self._request_pb)
        request.entity_ids.extend(waiting)
        stream = await self._clients[0].streaming_read_feature_values(
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
