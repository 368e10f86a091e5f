"""The Vertex AI Feature Store 2.0 source: a feature view of a feature online store.

Two ways to read, by ``vertex_api_version``:

- ``v1beta1`` (the default): the batched, bidirectional ``StreamingFetchFeatureValues``, which only that API
  version offers: keys go in request messages of at most 100, all sent at once over one of a few long-lived
  streams the whole worker shares (``fetch_streams``). Each answer carries a status: OK with the found
  keys' values, or NOT_FOUND listing unknown keys; answers may come in any order and are matched by key. Keys not
  answered (a broken stream, an UNAVAILABLE answer) are asked for again.
- ``v1`` (GA): ``FeatureOnlineStoreService.FetchFeatureValues``, one key per call. ``v1_calls_in_flight`` calls
  (400) run at once, spread over a pool of channels (Google's front ends allow 100 concurrent streams per HTTP/2
  connection), so that a cold request of 400 candidates costs about one round trip, not 25 waves of 16.
  NOT_FOUND means the store does not know the key: it gets the prior.

Limits, retries, deadline, shedding and readiness are those of ``read_policy.ReadPolicy``; decoding is
``store``'s.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from mab_service.errors import FeatureSourceError
from mab_service.features._wire import decode_values, encode_request
from mab_service.features.fetch_streams import FetchStreams
from mab_service.features.options import FEATURE_VIEW, MAX_IDS_PER_READ, VertexOptions
from mab_service.features.read_policy import ReadPolicy, grpc_code_name
from mab_service.features.source import Lookup
from mab_service.features.store import ParameterMapping, Part, StoreSource, make_transport

API_VERSIONS = ("v1", "v1beta1")
_KEY_VALUE = 1  # FeatureViewDataFormat.KEY_VALUE
STREAMING_FETCH = "/google.cloud.aiplatform.v1beta1.FeatureOnlineStoreService/StreamingFetchFeatureValues"
FETCH = "/google.cloud.aiplatform.v1.FeatureOnlineStoreService/FetchFeatureValues"
_DATA_KEY_TAG = 0x32  # FetchFeatureValuesRequest.data_key: field 6, length-delimited


def client_info_of(transports: Any) -> Any:
    """The ``ClientInfo`` the client library's wrapper sends (``x-goog-api-client``), from its transports package."""
    return importlib.import_module(f"{transports.__name__.rsplit('.', 1)[0]}.base").DEFAULT_CLIENT_INFO


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
        self.policy = ReadPolicy(options, feature_view, None if self.streaming else options.v1_calls_in_flight)
        self.mapping = ParameterMapping(options)
        self._credentials = credentials
        self._clients: list[Any] = []
        self._next_client: Iterator[Any] = iter(())
        self._messages: Any = None
        self._prober: asyncio.Task[None] | None = None
        # Where the two features sit in each key's list, learnt from the first answer and checked on every one.
        self._slots = (-1, -1)
        first, second = options.feature_ids
        self._feature_names = (first.encode(), second.encode())
        self._streams: FetchStreams | None = None
        self._request_head = b""
        self._next_method: Iterator[Any] = iter(())
        self._metadata: tuple[tuple[str, str], ...] = ()

    async def start(self) -> None:
        """Create the clients (a pool of channels for the per-key API) and check the store; probe after.

        A store that does not answer yet does not stop the start: ``health`` stays not ready until it does.

        Raises:
            FeatureSourceError: If the client library is missing or there are no credentials.
        """
        try:
            if self.streaming:
                from google.cloud.aiplatform_v1beta1 import FeatureOnlineStoreServiceAsyncClient as client_cls
                from google.cloud.aiplatform_v1beta1.services.feature_online_store_service.transports import (
                    grpc_asyncio as transports,
                )
                from google.cloud.aiplatform_v1beta1.types import feature_online_store_service as messages
            else:
                from google.cloud.aiplatform_v1 import (  # type: ignore[assignment]
                    FeatureOnlineStoreServiceAsyncClient as client_cls,
                )
                from google.cloud.aiplatform_v1.services.feature_online_store_service.transports import (  # type: ignore[no-redef]
                    grpc_asyncio as transports,
                )
                from google.cloud.aiplatform_v1.types import (  # type: ignore[no-redef]
                    feature_online_store_service as messages,
                )
        except ImportError as exc:
            raise FeatureSourceError(f"the vertex feature source needs mab-service[vertex] installed ({exc})") from None
        transport_cls = transports.FeatureOnlineStoreServiceGrpcAsyncIOTransport
        calls = self.options.max_concurrent_reads if self.streaming else self.options.v1_calls_in_flight
        for _ in range(self.options.channel_count(calls)):
            transport = await make_transport(transport_cls, self.options, self.location, self._credentials)
            self._clients.append(client_cls(transport=transport))
        self._next_client = itertools.cycle(self._clients)
        self._messages = messages
        # Requests and answers go as bytes (``_wire``) over the client's own channels (TLS and credentials in
        # production), with the metadata its wrapper sends: decoding answers through protobuf objects costs
        # microseconds per key, and the wrapper's interceptors about 100 us per call.
        head = messages.FetchFeatureValuesRequest.pb()() if not self.streaming else None
        if head is None:
            head = messages.StreamingFetchFeatureValuesRequest.pb()()
        head.feature_view = self.feature_view
        head.data_format = _KEY_VALUE
        self._request_head = head.SerializeToString()
        client_info = client_info_of(transports).to_grpc_metadata()
        channels = [client.transport.grpc_channel for client in self._clients]
        if self.streaming:
            methods = [channel.stream_stream(STREAMING_FETCH, response_deserializer=None) for channel in channels]
            self._streams = FetchStreams(
                methods, (client_info,), self._feature_names, self._place_decoded, self._place_one
            )
        else:
            routing = ("x-goog-request-params", f"feature_view={self.feature_view}")
            self._metadata = (client_info, routing)
            self._next_method = itertools.cycle([channel.unary_unary(FETCH) for channel in channels])
        await self._begin_probing("vertex-fos-readiness-probe")

    async def close(self) -> None:
        if self._streams is not None:
            await self._streams.close()
            self._streams = None
        await super().close()

    def _plan(self, ids: list[str], out: Lookup) -> tuple[list[Part], list[dict[str, int]]]:
        """v1beta1: one part sending a request message per ``chunk_size`` keys on one shared stream. v1: one call
        per key, run by as many workers as calls may be in flight, sharing an iterator over the positions (not a
        task per key)."""
        n = len(ids)
        if self.streaming:
            keys = {id_: i for i, id_ in enumerate(ids)}
            return [self._chunk_reader(keys, out)], [keys]
        keys = {id_: i for i, id_ in enumerate(ids)}
        positions = iter(range(n))
        workers = min(n, self.policy.max_calls)
        return [self._key_worker(ids, positions, keys, out) for _ in range(workers)], [keys]

    # --- v1: one key per call -------------------------------------------------------------------------------

    def _key_worker(self, ids: list[str], positions: Iterator[int], waiting: dict[str, int], out: Lookup) -> Part:
        async def work(deadline: float) -> None:
            for position in positions:
                key = ids[position]
                await self.policy.attempt(deadline, lambda timeout_s: self._fetch_one(key, position, out, timeout_s))
                del waiting[key]

        return work

    async def _fetch_one(self, key: str, position: int, out: Lookup, timeout_s: float) -> None:
        """One FetchFeatureValues call, request and answer as bytes (``_wire``), on the next channel of the pool."""
        request = encode_request(self._request_head, (key,), _DATA_KEY_TAG)
        try:
            answer = await next(self._next_method)(request, timeout=timeout_s, metadata=self._metadata)
        except Exception as exc:
            if grpc_code_name(exc) == "NOT_FOUND":
                return  # an unknown key keeps the prior
            raise
        try:
            present, first, second = decode_values(answer, *self._feature_names)
        except ValueError as exc:
            raise FeatureSourceError(f"feature store {self.feature_view} sent an answer that does not decode: {exc}")
        self._place_one(out, position, present, first, second)

    def _place_one(self, out: Lookup, position: int, present: int, first: float, second: float) -> None:
        params = self.mapping.decode_present(present, first, second)
        if params is not None:
            out.alpha[position], out.beta[position] = params
            out.found[position] = True

    # --- v1beta1: batched streaming -------------------------------------------------------------------------

    def _chunk_reader(self, waiting: dict[str, int], out: Lookup) -> Part:
        """The fan-out part reading every key of a read; what a failure leaves in ``waiting`` unanswered is all a
        retry asks for."""

        async def read_chunk(deadline: float) -> None:
            await self.policy.attempt(deadline, lambda timeout_s: self._stream(waiting, out, timeout_s))

        return read_chunk

    async def _stream(self, waiting: dict[str, int], out: Lookup, timeout_s: float) -> None:
        """The keys in ``waiting``, ``chunk_size`` per request message, on one of the worker's shared streams.

        Raises:
            Retryable: If the store answers UNAVAILABLE or DEADLINE_EXCEEDED, the stream breaks, or the keys are
                not all answered within ``timeout_s``.
            FeatureSourceError: If the store answers any other error.
        """
        assert self._streams is not None
        head, step = self._request_head, self.options.chunk_size
        keys = list(waiting)
        requests = [encode_request(head, keys[i : i + step]) for i in range(0, len(keys), step)]
        await self._streams.fetch(requests, waiting, out, timeout_s)

    # --- decoding ---------------------------------------------------------------------------------------------

    def _place_decoded(
        self,
        out: Lookup,
        positions: npt.NDArray[np.intp],
        a: npt.NDArray[np.float64],
        b: npt.NDArray[np.float64],
        present: npt.NDArray[np.uint8],
    ) -> None:
        """Put one answer's decoded values (``_wire.decode_answer``) at their positions in ``out``."""
        alpha, beta, held = self.mapping.decode_arrays(a, b, present)
        placed = positions[held]
        out.alpha[placed] = alpha[held]
        out.beta[placed] = beta[held]
        out.found[placed] = True
