"""A local Vertex AI Feature Store: a grpc.aio server speaking the online-serving wire protocol.

The google-cloud-aiplatform package ships message classes but no servicer base classes, so the services are
built from gRPC generic handlers with the package's own (raw protobuf) message classes:

- ``google.cloud.aiplatform.v1.FeaturestoreOnlineServingService``: ``StreamingReadFeatureValues`` (a header,
  then one message per entity, in request order; an unknown id comes back with empty values; more than 100 ids
  is INVALID_ARGUMENT) and ``ReadFeatureValues`` (one entity).
- ``google.cloud.aiplatform.v1.FeatureOnlineStoreService``: ``FetchFeatureValues`` (one key, KEY_VALUE format;
  an unknown key is NOT_FOUND), and the same in ``v1beta1``, which adds the bidirectional
  ``StreamingFetchFeatureValues`` (each request message answered on its own, concurrently with the others on the
  stream: one OK answer with the found keys and one NOT_FOUND answer listing the unknown ones).
- ``mab.emulator.v1.Control``: ``Stats``, ``Configure`` and ``Reset`` with JSON bodies, for tests and load tests.

Faults are injected per call (per request message on the bidirectional stream): a latency drawn uniformly from
``latency_ms +- jitter_ms``, UNAVAILABLE at ``unavailable_rate`` before anything is sent (on the bidirectional
stream: an UNAVAILABLE answer listing the request's keys), and at ``break_rate`` a stream that breaks with
UNAVAILABLE part-way through. Counters record calls, ids per call and peak concurrency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.cloud.aiplatform_v1.types import (
    feature_online_store_service as fos_v1,
    featurestore_online_service as fs_v1,
)
from google.cloud.aiplatform_v1beta1.types import feature_online_store_service as fos_v1beta1
from google.rpc import code_pb2

from mab_service.emulator.table import FeatureTable

#: The most entity ids one read may carry, as in Vertex (101 ids is INVALID_ARGUMENT).
MAX_IDS_PER_READ = 100
#: The most encoded answers per key kept for reuse (a few hundred bytes each).
MAX_KEPT_ENTRIES = 2_000_000

FEATURESTORE_SERVICE = "google.cloud.aiplatform.v1.FeaturestoreOnlineServingService"
ONLINE_STORE_SERVICE_V1 = "google.cloud.aiplatform.v1.FeatureOnlineStoreService"
ONLINE_STORE_SERVICE_V1BETA1 = "google.cloud.aiplatform.v1beta1.FeatureOnlineStoreService"
CONTROL_SERVICE = "mab.emulator.v1.Control"

ENTITY_TYPE = re.compile(r"^projects/[^/]+/locations/[^/]+/featurestores/[^/]+/entityTypes/[^/]+$")
FEATURE_VIEW = re.compile(r"^projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/]+/featureViews/[^/]+$")

# Raw protobuf classes of the client library's messages: the emulator never needs the proto-plus wrappers.
_ReadResponse = fs_v1.ReadFeatureValuesResponse.pb()
_StreamingReadRequest = fs_v1.StreamingReadFeatureValuesRequest.pb()
_ReadRequest = fs_v1.ReadFeatureValuesRequest.pb()
_FetchRequest = fos_v1.FetchFeatureValuesRequest.pb()
_FetchResponse = fos_v1.FetchFeatureValuesResponse.pb()
_FetchRequestBeta = fos_v1beta1.FetchFeatureValuesRequest.pb()
_FetchResponseBeta = fos_v1beta1.FetchFeatureValuesResponse.pb()
_StreamingFetchRequest = fos_v1beta1.StreamingFetchFeatureValuesRequest.pb()
_StreamingFetchResponse = fos_v1beta1.StreamingFetchFeatureValuesResponse.pb()


@dataclass
class Faults:
    """What the emulator does wrong, and how slowly. Changed at run time through ``Control/Configure``."""

    latency_ms: float = 0.0
    """Mean delay before a call (or a bidirectional request) is answered."""
    jitter_ms: float = 0.0
    """The delay is drawn uniformly from latency_ms +- jitter_ms (never below 0)."""
    unavailable_rate: float = 0.0
    """Fraction of calls that fail with UNAVAILABLE before sending anything."""
    break_rate: float = 0.0
    """Fraction of streams that break with UNAVAILABLE after sending part of their messages."""
    unavailable_next: int = 0
    """The next this many calls fail with UNAVAILABLE (counts down; for deterministic tests)."""
    break_next: int = 0
    """The next this many streams break half-way (counts down; for deterministic tests)."""

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)!r})")
        for name in ("unavailable_rate", "break_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1] (got {getattr(self, name)!r})")
        for name in ("unavailable_next", "break_next"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be an integer >= 0 (got {getattr(self, name)!r})")


@dataclass
class Counters:
    calls: Counter[str] = dataclasses.field(default_factory=Counter)
    """Calls per method name (a bidirectional stream counts each request message)."""
    ids: int = 0
    """Entity ids asked for, over all calls."""
    ids_per_call: Counter[int] = dataclasses.field(default_factory=Counter)
    """How many calls asked for each number of ids."""
    in_flight: int = 0
    peak_concurrency: int = 0
    """The most calls in progress at once."""
    injected_unavailable: int = 0
    injected_breaks: int = 0
    invalid_argument: int = 0


class Emulator:
    """The emulated feature store: serves ``table`` with ``faults``, counting what it is asked.

    Args:
        table: The entities and their features.
        faults: Latency and failures to inject; replaceable at run time.
        seed: Seed of the fault and latency draws (None: from the OS).
    """

    def __init__(self, table: FeatureTable, faults: Faults | None = None, seed: int | None = None) -> None:
        self.table = table
        self.faults = faults or Faults()
        self.counters = Counters()
        self._rng = random.Random(seed)
        self._server: grpc.aio.Server | None = None
        # Serialised per-entity answers, per feature selection: built on first use, reused by every later call.
        self._encoded: dict[tuple[int, ...], dict[str, bytes]] = {}
        self._key_values: dict[str, bytes] = {}
        self._entries: dict[str, bytes] = {}

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port) without TLS; returns the bound port.

        Raises:
            RuntimeError: If the port cannot be bound.
        """
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers(self._handlers())
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise RuntimeError(f"cannot listen on {host}:{port}")
        await server.start()
        self._server = server
        return int(bound)

    async def stop(self, grace_s: float | None = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    async def wait_for_termination(self) -> None:
        assert self._server is not None, "wait before start"
        await self._server.wait_for_termination()

    def stats(self) -> dict[str, Any]:
        """The counters and the current faults, as plain JSON-ready values."""
        c = self.counters
        return {
            "calls": dict(c.calls),
            "ids": c.ids,
            "ids_per_call": {str(k): v for k, v in sorted(c.ids_per_call.items())},
            "max_ids_per_call": max(c.ids_per_call, default=0),
            "in_flight": c.in_flight,
            "peak_concurrency": c.peak_concurrency,
            "injected_unavailable": c.injected_unavailable,
            "injected_breaks": c.injected_breaks,
            "invalid_argument": c.invalid_argument,
            "faults": dataclasses.asdict(self.faults),
            "entities": len(self.table.rows),
        }

    def load(self, table: FeatureTable) -> None:
        """Serve ``table`` from now on (calls in progress may still answer from the old one)."""
        self.table = table
        self._encoded = {}
        self._key_values = {}
        self._entries = {}

    def reset(self) -> None:
        """Zero the counters (calls still in flight stay counted as in flight)."""
        in_flight = self.counters.in_flight
        self.counters = Counters(in_flight=in_flight, peak_concurrency=in_flight)

    # --- handlers -------------------------------------------------------------------------------------------

    def _handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        raw: dict[str, Any] = {"request_deserializer": None, "response_serializer": None}
        return (
            grpc.method_handlers_generic_handler(
                FEATURESTORE_SERVICE,
                {
                    "StreamingReadFeatureValues": grpc.unary_stream_rpc_method_handler(
                        self._streaming_read, request_deserializer=_StreamingReadRequest.FromString
                    ),
                    "ReadFeatureValues": grpc.unary_unary_rpc_method_handler(
                        self._read,
                        request_deserializer=_ReadRequest.FromString,
                        response_serializer=_ReadResponse.SerializeToString,
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                ONLINE_STORE_SERVICE_V1,
                {
                    "FetchFeatureValues": grpc.unary_unary_rpc_method_handler(
                        self._fetch_v1,
                        request_deserializer=_FetchRequest.FromString,
                        response_serializer=_FetchResponse.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                ONLINE_STORE_SERVICE_V1BETA1,
                {
                    "FetchFeatureValues": grpc.unary_unary_rpc_method_handler(
                        self._fetch_v1beta1,
                        request_deserializer=_FetchRequestBeta.FromString,
                        response_serializer=_FetchResponseBeta.SerializeToString,
                    ),
                    "StreamingFetchFeatureValues": grpc.stream_stream_rpc_method_handler(
                        self._streaming_fetch,
                        request_deserializer=_StreamingFetchRequest.FromString,
                        response_serializer=None,  # the answers are built as bytes (``_fetch_entry``)
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                CONTROL_SERVICE,
                {
                    "Stats": grpc.unary_unary_rpc_method_handler(self._control_stats, **raw),
                    "Configure": grpc.unary_unary_rpc_method_handler(self._control_configure, **raw),
                    "Reset": grpc.unary_unary_rpc_method_handler(self._control_reset, **raw),
                },
            ),
        )

    async def _streaming_read(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        ids = list(request.entity_ids)
        with self._call("StreamingReadFeatureValues", len(ids)):
            if not ENTITY_TYPE.match(request.entity_type):
                await self._invalid(context, f"entity_type {request.entity_type!r} is not a valid resource name")
            if not 1 <= len(ids) <= MAX_IDS_PER_READ:
                await self._invalid(
                    context, f"entity_ids must hold 1 to {MAX_IDS_PER_READ} ids per request (got {len(ids)})"
                )
            columns = await self._columns(request.feature_selector.id_matcher.ids, context)
            await self._before_answer(context)
            header = _ReadResponse()
            header.header.entity_type = request.entity_type
            for j in columns:
                header.header.feature_descriptors.add().id = self.table.features[j]
            yield header.SerializeToString()
            encoded = self._encoded.setdefault(columns, {})
            stop_after = self._break_point(len(ids))
            for sent, entity in enumerate(ids):
                if sent == stop_after:
                    await self._break(context)
                message = encoded.get(entity)
                if message is None:
                    message = self._entity_view(entity, columns)
                    if entity in self.table.rows:
                        encoded[entity] = message
                yield message

    async def _read(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with self._call("ReadFeatureValues", 1):
            if not ENTITY_TYPE.match(request.entity_type):
                await self._invalid(context, f"entity_type {request.entity_type!r} is not a valid resource name")
            columns = await self._columns(request.feature_selector.id_matcher.ids, context)
            await self._before_answer(context)
            response = _ReadResponse.FromString(self._entity_view(request.entity_id, columns))
            response.header.entity_type = request.entity_type
            for j in columns:
                response.header.feature_descriptors.add().id = self.table.features[j]
            return response

    async def _fetch_v1(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._fetch("FetchFeatureValues", request, context, _FetchResponse)

    async def _fetch_v1beta1(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._fetch("v1beta1.FetchFeatureValues", request, context, _FetchResponseBeta)

    async def _fetch(self, method: str, request: Any, context: grpc.aio.ServicerContext, response_cls: Any) -> Any:
        with self._call(method, 1):
            if not FEATURE_VIEW.match(request.feature_view):
                await self._invalid(context, f"feature_view {request.feature_view!r} is not a valid resource name")
            if request.data_format > 1:  # only KEY_VALUE (1) and unspecified (0)
                await self._invalid(context, "the emulator serves data_format KEY_VALUE only")
            await self._before_answer(context)
            key = request.data_key.key
            if key not in self.table.rows:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"key {key!r} not found in the feature view")
            response = response_cls()
            response.key_values.MergeFromString(self._key_value_list(key))
            return response

    async def _streaming_fetch(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Each request message is answered on its own, concurrently with the others (answers may come in any
        order, as the API says): a client can keep one stream open and send many requests over it."""
        outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        answering: set[asyncio.Task[None]] = set()

        async def take_requests() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(self._answer_fetch(request, outbox))
                    answering.add(task)
                    task.add_done_callback(answering.discard)
                await asyncio.gather(*answering)
            finally:
                outbox.put_nowait(("end", None))

        taker = asyncio.create_task(take_requests())
        try:
            while True:
                kind, item = await outbox.get()
                if kind == "answer":
                    yield item
                elif kind == "end":
                    return
                elif kind == "invalid":
                    await self._invalid(context, item)
                else:  # "break"
                    await self._break(context)
        finally:
            taker.cancel()
            for task in list(answering):
                task.cancel()

    async def _answer_fetch(self, request: Any, outbox: asyncio.Queue[tuple[str, Any]]) -> None:
        """Answer one StreamingFetchFeatureValues request into ``outbox``: an OK message with the found keys and a
        NOT_FOUND message listing the unknown ones, or one UNAVAILABLE message listing every key (an injected
        outage), or a break of the whole stream."""
        keys = [k.key for k in request.data_keys]
        with self._call("StreamingFetchFeatureValues", len(keys)):
            if not FEATURE_VIEW.match(request.feature_view):
                outbox.put_nowait(("invalid", f"feature_view {request.feature_view!r} is not a valid resource name"))
                return
            if not 1 <= len(keys) <= MAX_IDS_PER_READ:
                outbox.put_nowait(
                    ("invalid", f"data_keys must hold 1 to {MAX_IDS_PER_READ} keys per request (got {len(keys)})")
                )
                return
            if self._outage():
                outbox.put_nowait(("answer", _STATUS_UNAVAILABLE + b"".join(map(_error_key, keys))))
                return
            await self._delay()
            # Built as bytes from each key's encoded entry: a repeated message field is the concatenation of its
            # entries, so an answer costs one join, not a message tree per key.
            entries = self._entries
            found: list[bytes] = []
            missing: list[bytes] = []
            for key in keys:
                entry = entries.get(key)
                if entry is None:
                    entry = self._fetch_entry(key)
                (found if entry[:1] == _DATA_TAG else missing).append(entry)
            answers = []
            if found:
                answers.append(_STATUS_OK + b"".join(found))
            if missing:
                answers.append(_STATUS_NOT_FOUND + b"".join(missing))
            stop_after = self._break_point(len(answers))
            for sent, answer in enumerate(answers):
                if sent == stop_after:
                    outbox.put_nowait(("break", None))
                    return
                outbox.put_nowait(("answer", answer))

    # --- control --------------------------------------------------------------------------------------------

    async def _control_stats(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return json.dumps(self.stats()).encode()

    async def _control_configure(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            changes = json.loads(request or b"{}")
            self.faults = dataclasses.replace(self.faults, **changes)
        except (ValueError, TypeError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return json.dumps(dataclasses.asdict(self.faults)).encode()

    async def _control_reset(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.reset()
        return b"{}"

    # --- helpers --------------------------------------------------------------------------------------------

    def _call(self, method: str, n_ids: int) -> _InFlight:
        c = self.counters
        c.calls[method] += 1
        c.ids += n_ids
        c.ids_per_call[n_ids] += 1
        return _InFlight(self)

    async def _invalid(self, context: grpc.aio.ServicerContext, message: str) -> None:
        self.counters.invalid_argument += 1
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def _columns(self, wanted: Any, context: grpc.aio.ServicerContext) -> tuple[int, ...]:
        names = list(wanted)
        if names == ["*"]:
            return tuple(range(len(self.table.features)))
        unknown = [n for n in names if n not in self.table.features]
        if unknown or not names:
            await self._invalid(context, f"feature_selector names unknown features {unknown or '(none)'}")
        return tuple(self.table.column(n) for n in names)

    async def _before_answer(self, context: grpc.aio.ServicerContext) -> None:
        if self._outage():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "emulated outage")
        await self._delay()

    def _outage(self) -> bool:
        """Whether this call (or request message) fails UNAVAILABLE; counted."""
        faults = self.faults
        if faults.unavailable_next:
            faults.unavailable_next -= 1
            self.counters.injected_unavailable += 1
            return True
        if faults.unavailable_rate and self._rng.random() < faults.unavailable_rate:
            self.counters.injected_unavailable += 1
            return True
        return False

    async def _delay(self) -> None:
        faults = self.faults
        delay_ms = faults.latency_ms + (self._rng.uniform(-1.0, 1.0) * faults.jitter_ms if faults.jitter_ms else 0.0)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000.0)

    def _break_point(self, n_messages: int) -> int | None:
        """After how many of ``n_messages`` the stream breaks, or None if it does not."""
        if n_messages < 1:
            return None
        if self.faults.break_next:
            self.faults.break_next -= 1
            return n_messages // 2
        if not self.faults.break_rate or self._rng.random() >= self.faults.break_rate:
            return None
        return self._rng.randrange(0, n_messages)

    async def _break(self, context: grpc.aio.ServicerContext) -> None:
        self.counters.injected_breaks += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "emulated stream break")

    def _entity_view(self, entity: str, columns: tuple[int, ...]) -> bytes:
        """One entity's answer; an unknown entity gets one empty value per feature, as Vertex answers."""
        message = _ReadResponse()
        view = message.entity_view
        view.entity_id = entity
        row = self.table.rows.get(entity)
        for j in columns:
            value = view.data.add().value
            if row is None:
                value.SetInParent()
            elif self.table.is_int[j]:
                value.int64_value = int(row[j])
            else:
                value.double_value = float(row[j])
        return bytes(message.SerializeToString())

    def _fetch_entry(self, key: str) -> bytes:
        """One key's entry in a StreamingFetchFeatureValuesResponse, encoded: in ``data`` (field 2) for a known
        key, in ``data_keys_with_error`` (field 3) for an unknown one. Entries are kept for the next answers."""
        if key in self.table.rows:
            item = _FetchResponseBeta()
            item.key_values.MergeFromString(self._key_value_list(key))
            item.data_key.key = key
            entry = _field(_DATA_TAG, item.SerializeToString())
        else:
            entry = _error_key(key)
        if len(self._entries) < MAX_KEPT_ENTRIES:  # unknown keys too, up to a bound: any client may send any key
            self._entries[key] = entry
        return entry

    def _key_value_list(self, key: str) -> bytes:
        """A known key's features as a serialised FeatureNameValuePairList (the same bytes in v1 and v1beta1)."""
        cached: bytes | None = self._key_values.get(key)
        if cached is None:
            pairs = _FetchResponse().key_values
            row = self.table.rows[key]
            for j, name in enumerate(self.table.features):
                pair = pairs.features.add()
                pair.name = name
                if self.table.is_int[j]:
                    pair.value.int64_value = int(row[j])
                else:
                    pair.value.double_value = float(row[j])
            cached = self._key_values[key] = bytes(pairs.SerializeToString())
        return cached


#: Tags of StreamingFetchFeatureValuesResponse fields (field number << 3 | 2, length-delimited).
_DATA_TAG = b"\x12"
_ERROR_KEY_TAG = b"\x1a"


def _status(code: int, message: str) -> bytes:
    status = _StreamingFetchResponse()
    status.status.code = code
    status.status.message = message
    return bytes(status.SerializeToString())


#: The status field of each answer, encoded (an OK status is an empty message, present so that clients see it).
_STATUS_OK = b"\x0a\x00"
_STATUS_NOT_FOUND = _status(code_pb2.NOT_FOUND, "keys not found in the feature view")
_STATUS_UNAVAILABLE = _status(code_pb2.UNAVAILABLE, "emulated outage")


def _error_key(key: str) -> bytes:
    """``key`` as an entry of ``data_keys_with_error``."""
    data_key = _FetchResponseBeta().data_key
    data_key.key = key
    return _field(_ERROR_KEY_TAG, data_key.SerializeToString())


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited protobuf field: tag, varint length, payload."""
    n = len(payload)
    length = bytearray()
    while n >= 0x80:
        length.append((n & 0x7F) | 0x80)
        n >>= 7
    length.append(n)
    return tag + bytes(length) + payload


class _InFlight:
    """Counts a call as in progress for the duration of a ``with`` block."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def __enter__(self) -> None:
        c = self.emulator.counters
        c.in_flight += 1
        c.peak_concurrency = max(c.peak_concurrency, c.in_flight)

    def __exit__(self, *exc: object) -> None:
        self.emulator.counters.in_flight -= 1
