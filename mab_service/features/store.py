"""What every Vertex source shares: decoding, client construction, and ``StoreSource``.

``StoreSource`` is the read path of both backends (the Legacy Featurestore in ``vertex``, Feature Store 2.0 in
``vertex_fos``): admission, one fan-out per read under ``read_policy.ReadPolicy``, the answers placed back at
their positions in the request, readiness from the store's own answers and a background probe while the store is
unready. A backend creates its clients in ``start`` and says how ids become fan-out parts (``_plan``).

Responses are decoded from the raw protobuf messages under the proto-plus wrappers: reading a field through
proto-plus costs about 20 us per entity, through the raw message about 2 us (docs/vertex.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from mab_service.errors import FeatureSourceError, Overloaded
from mab_service.features.options import VertexOptions
from mab_service.features.read_policy import ReadPolicy
from mab_service.features.source import Features, Health, Lookup

logger = logging.getLogger("mab_service.vertex")

#: An id no store holds: the readiness check reads it and expects an empty answer.
CHECK_ID = "mab-service-readiness-check"
CLOUD_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
#: gRPC waits up to 120 s between reconnection attempts by default: after an outage of a minute the store would be
#: back long before the channel noticed. Capped at 2 s, a worker is back within ~2 s of the store.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]

#: The parameters of an entity whose stored values are no Beta parameters (``ParameterMapping``).
INVALID = (math.nan, math.nan)

#: A fan-out part: reads its share of the ids before the deadline (loop time) it is given.
Part = Callable[[float], Awaitable[None]]


# --- decoding ---------------------------------------------------------------------------------------------------


class ParameterMapping:
    """Turns an entity's two feature values (raw ``FeatureValue`` messages) into Beta parameters.

    ``beta``: the values are alpha and beta themselves (DOUBLE or INT64). ``counts``: they are clicks and
    impressions, and alpha = prior_alpha + clicks, beta = prior_beta + impressions - clicks. Empty values mean an
    unknown entity; values that give no valid parameters (not finite and > 0, clicks > impressions) are counted
    in ``invalid`` and come back as ``INVALID`` (NaN): the entity is known, its values are not usable, and the
    pipeline's ``ParameterCheck`` ranks it by the prior and counts it, as for every source.
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
                return INVALID
            return self.prior_alpha + clicks, self.prior_beta + impressions - clicks
        a = first.double_value or first.int64_value
        b = second.double_value or second.int64_value
        # Written so that NaN fails too.
        if a > 0 and b > 0 and a < math.inf and b < math.inf:
            return float(a), float(b)
        if first.ByteSize() or second.ByteSize():
            self.invalid += 1
            return INVALID
        return None

    def decode_present(self, present: int, first: float, second: float) -> tuple[float, float] | None:
        """``decode`` of one entity from values already read as doubles (``_wire.decode_values``)."""
        if not present:
            return None
        if self.counts:
            clicks = first if present & 1 else 0.0
            impressions = second if present & 2 else 0.0
            if 0 <= clicks <= impressions < math.inf:
                return self.prior_alpha + clicks, self.prior_beta + impressions - clicks
        elif present == 3 and 0 < first < math.inf and 0 < second < math.inf:
            return first, second
        self.invalid += 1
        return INVALID

    def decode_arrays(
        self, first: npt.NDArray[np.float64], second: npt.NDArray[np.float64], present: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """``decode`` for many entities at once, from values already read as doubles (``_wire.decode_answer``):
        ``present`` has bit 1 where the first value exists and bit 2 where the second does. Returns alpha, beta and
        which entries hold values; entries with some value but no valid parameters are NaN, counted in ``invalid``.
        """
        some = present != 0
        if self.counts:
            clicks = np.where(present & 1, first, 0.0)
            impressions = np.where(present & 2, second, 0.0)
            valid = some & (clicks >= 0) & (clicks <= impressions) & (impressions < math.inf)
            alpha, beta = self.prior_alpha + clicks, self.prior_beta + impressions - clicks
        else:
            alpha, beta = first, second
            # Comparisons with NaN are False (and raise no warning): NaN is invalid.
            valid = (present == 3) & (alpha > 0) & (beta > 0) & (alpha < math.inf) & (beta < math.inf)
        bad = some & ~valid
        if bad.any():
            self.invalid += int(np.count_nonzero(bad))
            alpha, beta = np.where(bad, math.nan, alpha), np.where(bad, math.nan, beta)
        return alpha, beta, some


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


# --- the read path ---------------------------------------------------------------------------------------------


class StoreSource:
    """The read path both Vertex backends share; see the module docstring.

    A subclass sets ``name``, ``options``, ``policy`` and ``_clients`` (in ``start``, then calls
    ``_begin_probing``), and implements ``_plan``.
    """

    name: str
    options: VertexOptions
    policy: ReadPolicy
    mapping: ParameterMapping
    _clients: list[Any]
    _prober: asyncio.Task[None] | None

    def _plan(self, ids: list[str], out: Lookup) -> tuple[list[Part], list[dict[str, int]]]:
        """The fan-out parts reading ``ids`` into ``out``, and per part the ids it has still to answer -> their
        positions in the request (what is left there when the fan-out ends was not read)."""
        raise NotImplementedError

    async def read(self, ids: list[str], *, probe: bool = False) -> Lookup:
        """Parameters of ``ids`` (the prior where the store has none) and which ids the store knew.

        ``probe`` marks the readiness check (``ReadPolicy.fan_out``). A read this worker cannot take on now (its
        queue is too long, ``ReadPolicy.admits``) or does not finish by its own deadline comes back
        ``overloaded``, with the ids not read listed in ``unread``.

        Raises:
            FeatureSourceError: If the store fails, or does not answer within the deadline, and the policy is to
                fail (otherwise the ids not read are listed in ``Lookup.unread``).
        """
        assert self._clients, "read before start"
        n = len(ids)
        out = self._prior_lookup(n)
        if not n:
            return out
        if not probe and not self.policy.admits():
            return replace(out, unread=np.arange(n, dtype=np.intp), overloaded=True)
        parts, waiting = self._plan(ids, out)
        outcome = await self.policy.fan_out(parts, probe=probe)
        if outcome is None:
            return out
        unread = [position for chunk in waiting for position in chunk.values()]
        return replace(out, unread=np.array(unread, dtype=np.intp), overloaded=outcome == "overloaded")

    def _prior_lookup(self, n: int) -> Lookup:
        """A lookup of ``n`` ids that the store has not answered yet: all at the prior, none known."""
        return Lookup(
            np.full(n, self.options.prior_alpha), np.full(n, self.options.prior_beta), np.zeros(n, dtype=np.bool_)
        )

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

    @property
    def prior(self) -> tuple[float, float]:
        return self.options.prior_alpha, self.options.prior_beta

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
        clients, self._clients = self._clients, []
        for client in clients:
            await client.transport.close()

    async def _probe_while_unready(self) -> None:
        while True:
            await asyncio.sleep(self.options.probe_interval_s)
            if not self.policy.health.ready:
                await self.check()

    async def fetch(self, ids: list[str]) -> Features:
        """``read`` for a request without a cache.

        Raises:
            Overloaded: If this worker's own queue could not read every id in time (the request is shed).
            FeatureSourceError: As ``read``.
        """
        found = await self.read(ids)
        unread = 0 if found.unread is None else len(found.unread)
        if found.overloaded and unread:
            raise overloaded(self.options.deadline_s)
        return Features(found.alpha, found.beta, int(np.count_nonzero(found.found)), unread)

    def stats(self) -> dict[str, float]:
        """Counters for metrics: calls, retries, failed and shed reads, invalid values, total fan-out latency."""
        return self.policy.stats() | {"invalid_values": self.mapping.invalid}


def overloaded(deadline_s: float) -> Overloaded:
    """The error of a request shed because this worker could not read its features within the deadline."""
    return Overloaded(f"the worker could not read the features within the {deadline_s * 1000:.0f} ms deadline; retry")
