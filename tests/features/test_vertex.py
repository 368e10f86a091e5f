"""The Vertex sources through the real google-cloud-aiplatform async client, against the emulator over loopback.

Each test runs its own in-process emulator (a real grpc.aio server on a free port) so that it can read the
emulator's counters and change its faults; tests/emulator/ covers the emulator's one command as a process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mab_service.emulator import Emulator, Faults, parse_table
from mab_service.errors import FeatureSourceError, Overloaded
from mab_service.features.options import VertexOptions
from mab_service.features.source import ParameterCheck
from mab_service.features.store import CHECK_ID, make_transport
from mab_service.features.vertex import VertexSource
from mab_service.features.vertex_fos import FeatureViewSource

pytestmark = pytest.mark.anyio

ENTITY_TYPE = "projects/p/locations/europe-west4/featurestores/fs/entityTypes/content"
FEATURE_VIEW = "projects/p/locations/europe-west4/featureOnlineStores/s/featureViews/content"
N_ENTITIES = 600


def table_rows(n: int = N_ENTITIES) -> list[str]:
    # alpha is DOUBLE (x.5), beta INT64; clicks <= impressions, both INT64.
    return ["entity_id,alpha,beta,clicks,impressions"] + [
        f"e{i},{i + 1}.5,{100 + i},{i % 7},{10 + i}" for i in range(n)
    ]


def expected(ids: list[str], prior: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """The table's parameters for ids e<i>, the prior for the others."""
    rows = [int(i[1:]) if i[:1] == "e" and i[1:].isdigit() and int(i[1:]) < N_ENTITIES else None for i in ids]
    alpha = [prior[0] if r is None else r + 1.5 for r in rows]
    beta = [prior[1] if r is None else 100.0 + r for r in rows]
    return np.array(alpha), np.array(beta)


@asynccontextmanager
async def emulator(faults: Faults | None = None, rows: list[str] | None = None) -> AsyncIterator[Emulator]:
    em = Emulator(parse_table(rows or table_rows(), "table.csv"), faults, seed=7)
    em.port = await em.start()  # type: ignore[attr-defined]
    try:
        yield em
    finally:
        await em.stop(None)


@asynccontextmanager
async def source(em: Emulator, cls: type = VertexSource, **options) -> AsyncIterator:
    # Generous time limits unless a test sets its own: a slow first connection (PYTHONASYNCIODEBUG=1, a loaded
    # machine) must not fail the start's readiness check and set the background probe reading.
    # Failing fast unless a test says otherwise: a failure then shows as the error it is.
    options = {"deadline_s": 5.0, "call_timeout_s": 2.0, "on_failure": "fail"} | options
    opts = VertexOptions(emulator_host=f"127.0.0.1:{em.port}", **options)  # type: ignore[attr-defined]
    src = cls(FEATURE_VIEW if cls is FeatureViewSource else ENTITY_TYPE, opts)
    await src.start()
    try:
        yield src
    finally:
        await src.close()


def reads(em: Emulator) -> dict[str, int]:
    """Ids per call of the data calls (the readiness check reads one id)."""
    return {k: v for k, v in em.stats()["ids_per_call"].items()}


async def test_chunks_of_100_are_read_concurrently_and_zipped_back_in_request_order(rand) -> None:
    ids = [f"e{i}" for i in rand.gen.permutation(N_ENTITIES)[:240]] + ["unknown-1", "unknown-2"]
    async with emulator(Faults(latency_ms=20)) as em, source(em) as src:
        em.reset()
        features = await src.fetch(ids)
        alpha, beta = expected(ids)
        np.testing.assert_array_equal(features.alpha, alpha)
        np.testing.assert_array_equal(features.beta, beta)
        assert features.known == 240
        assert reads(em) == {"42": 1, "100": 2}
        assert em.counters.peak_concurrency == 3  # the three chunks overlapped


async def test_unknown_ids_come_back_empty_and_get_the_prior() -> None:
    async with emulator() as em, source(em, prior_alpha=2.0, prior_beta=30.0) as src:
        features = await src.fetch(["nobody", "e3", CHECK_ID])
        np.testing.assert_array_equal(features.alpha, [2.0, 4.5, 2.0])
        np.testing.assert_array_equal(features.beta, [30.0, 103.0, 30.0])
        assert features.known == 1


async def test_counts_mapping_adds_clicks_and_misses_to_the_prior() -> None:
    async with emulator() as em, source(em, mapping="counts", prior_alpha=1.0, prior_beta=2.0) as src:
        features = await src.fetch(["e10", "e0", "zz"])
        # e10: clicks 3, impressions 20 -> alpha 1 + 3, beta 2 + 20 - 3.
        np.testing.assert_array_equal(features.alpha, [4.0, 1.0, 1.0])
        np.testing.assert_array_equal(features.beta, [19.0, 12.0, 2.0])
        assert features.known == 2


@pytest.mark.parametrize("cls", [VertexSource, FeatureViewSource], ids=["legacy", "fos"])
async def test_invalid_stored_values_come_back_nan_for_the_check_and_are_counted(cls: type) -> None:
    rows = ["entity_id,alpha,beta", "ok,2.0,3.0", "zero,0.0,3.0", "negative,-1.0,3.0", "nan,nan,3.0", "inf,2.0,inf"]
    ids = ["zero", "ok", "negative", "nan", "inf", "nobody"]
    em = Emulator(parse_table(rows, "table.csv", allow_non_finite=True), None, seed=7)
    em.port = await em.start()  # type: ignore[attr-defined]
    try:
        async with source(em, cls, prior_alpha=5.0, prior_beta=6.0) as src:
            features = await src.fetch(ids)
            # The store holds rows for them (known), but no Beta parameters: NaN, for the pipeline's check.
            np.testing.assert_array_equal(features.alpha, [np.nan, 2.0, np.nan, np.nan, np.nan, 5.0])
            np.testing.assert_array_equal(features.beta, [np.nan, 3.0, np.nan, np.nan, np.nan, 6.0])
            assert features.known == 5 and src.stats()["invalid_values"] == 4
            checked = ParameterCheck().replace(features, ids, src)
            np.testing.assert_array_equal(checked.alpha, [5.0, 2.0, 5.0, 5.0, 5.0, 5.0])
            np.testing.assert_array_equal(checked.beta, [6.0, 3.0, 6.0, 6.0, 6.0, 6.0])
    finally:
        await em.stop(None)


async def test_unavailable_is_retried_within_the_deadline() -> None:
    async with emulator() as em, source(em, retries=2, backoff_s=0.001) as src:
        em.reset()
        em.faults.unavailable_next = 2
        features = await src.fetch(["e1", "e2"])
        np.testing.assert_array_equal(features.alpha, [2.5, 3.5])
        assert em.counters.calls["StreamingReadFeatureValues"] == 3
        assert src.stats()["retries"] == 2 and src.health().ready


async def test_retries_run_out() -> None:
    async with emulator() as em, source(em, retries=2, backoff_s=0.001) as src:
        em.faults.unavailable_next = 3
        with pytest.raises(FeatureSourceError, match="failed after 3 attempts: UNAVAILABLE: emulated outage"):
            await src.fetch(["e1"])


async def test_a_broken_stream_is_re_requested_for_the_ids_it_did_not_answer() -> None:
    ids = [f"e{i}" for i in range(100)]
    async with emulator() as em, source(em, backoff_s=0.001) as src:
        em.reset()
        em.faults.break_next = 1
        features = await src.fetch(ids)
        np.testing.assert_array_equal(features.alpha, expected(ids)[0])
        assert em.counters.injected_breaks == 1
        assert reads(em) == {"50": 1, "100": 1}  # the second call asked only for the 50 not yet answered


async def test_the_deadline_bounds_the_whole_fan_out_and_cancels_the_calls() -> None:
    async with emulator() as em, source(em, deadline_s=0.1, call_timeout_s=1.0) as src:
        em.faults.latency_ms = 2000
        started = time.monotonic()
        # No answer in time, but no error either, and the store answered the start's check a moment ago: the
        # request is shed (it may be this worker that is too slow), and nothing counts toward the breaker.
        with pytest.raises(Overloaded, match="within the 100 ms deadline"):
            await src.fetch([f"e{i}" for i in range(300)])
        assert time.monotonic() - started < 0.5
        assert src.health().ready and src.policy.health.consecutive_failures == 0
        for _ in range(100):  # the abandoned calls end on the server too
            if em.counters.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert em.counters.in_flight == 0


async def test_a_store_that_only_times_out_sheds_then_opens_the_breaker() -> None:
    options = {"deadline_s": 0.3, "call_timeout_s": 0.03, "retries": 20, "backoff_s": 0.001}
    # A store silent for 2 x 0.1 s is hung: its timeouts count toward the breaker from then on.
    async with emulator() as em, source(em, unready_after_failures=2, probe_interval_s=0.1, **options) as src:
        em.reset()
        em.faults.latency_ms = 100
        with pytest.raises(Overloaded):
            await src.fetch(["e1"])
        assert em.counters.calls["StreamingReadFeatureValues"] >= 3  # each call timed out at 30 ms and was retried
        assert src.stats()["timed_out_calls"] >= 3
        # Nothing got through twice in a row: the store is failing, not this worker overloaded.
        with pytest.raises(FeatureSourceError, match="DEADLINE_EXCEEDED|deadline"):
            await src.fetch(["e1"])
        assert not src.health().ready


async def test_an_answer_between_timeouts_keeps_the_breaker_closed() -> None:
    async with emulator() as em, source(em, unready_after_failures=2, retries=0, call_timeout_s=0.05) as src:
        for _ in range(4):
            em.faults.latency_ms = 200
            with pytest.raises(Overloaded):
                await src.fetch(["e1"])
            em.faults.latency_ms = 0
            assert (await src.fetch(["e2"])).known == 1
        assert src.health().ready


async def test_concurrent_reads_are_capped_per_worker() -> None:
    async with emulator(Faults(latency_ms=10)) as em, source(em, max_concurrent_reads=2) as src:
        em.reset()
        await asyncio.gather(src.fetch([f"e{i}" for i in range(300)]), src.fetch([f"e{i}" for i in range(300, 600)]))
        assert em.counters.calls["StreamingReadFeatureValues"] == 6
        assert em.counters.peak_concurrency == 2


async def test_health_is_not_ready_while_the_store_fails_and_recovers() -> None:
    async with emulator() as em, source(em, unready_after_failures=2, retries=0, probe_interval_s=0.02) as src:
        assert src.health().ready
        em.faults.unavailable_rate = 1.0
        for _ in range(2):
            with pytest.raises(FeatureSourceError):
                await src.fetch(["e1"])
        status = src.health()
        assert not status.ready and "failing (2 reads in a row)" in status.reason and "UNAVAILABLE" in status.reason
        em.faults.unavailable_rate = 0.0
        for _ in range(100):  # the background probe finds the store back without any request
            if src.health().ready:
                break
            await asyncio.sleep(0.01)
        assert src.health().ready


async def test_not_ready_until_the_first_successful_read() -> None:
    async with emulator(Faults(unavailable_rate=1.0)) as em:
        async with source(em, retries=0, probe_interval_s=0.02) as src:
            status = src.health()
            assert not status.ready and status.reason.startswith("no successful read from the feature store yet")
            em.faults.unavailable_rate = 0.0
            for _ in range(100):
                if src.health().ready:
                    break
                await asyncio.sleep(0.01)
            assert src.health().ready


# --- a failing store: degrade or fail fast ---------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "api_version"), [(VertexSource, "v1"), (FeatureViewSource, "v1"),
                                                  (FeatureViewSource, "v1beta1")])  # fmt: skip
async def test_degrade_keeps_what_was_read_and_gives_the_rest_the_prior(cls: type, api_version: str) -> None:
    ids = [f"e{i}" for i in range(250)]
    async with emulator() as em, source(em, cls, on_failure="degrade", retries=0, api_version=api_version) as src:
        em.faults.unavailable_next = 1  # the first call fails: one chunk (one key with v1 Feature Store 2.0)
        features = await src.fetch(ids)
        read = features.alpha != 1.0
        unread = 1 if cls is FeatureViewSource and api_version == "v1" else 100
        assert features.unread == unread and np.count_nonzero(~read) == unread
        np.testing.assert_array_equal(features.alpha[read], expected(ids)[0][read])
        np.testing.assert_array_equal(features.beta[~read], 1.0)
        assert features.known == len(ids) - unread


async def test_degrade_answers_by_the_deadline_with_the_prior_once_the_store_is_known_to_fail() -> None:
    options = {"on_failure": "degrade", "deadline_s": 0.1, "call_timeout_s": 1.0, "unready_after_failures": 2}
    async with emulator() as em, source(em, probe_interval_s=0.02, **options) as src:
        em.faults.latency_ms = 2000
        ids = [f"e{i}" for i in range(300)]
        await asyncio.sleep(0.05)  # the start's check was the store's last answer: it is silent from now on
        started = time.monotonic()
        with pytest.raises(Overloaded):
            await src.fetch(ids)  # the first time out: shed, the store may be fine
        features = await src.fetch(ids)  # the second in a row: the store is failing, the answer degrades
        assert time.monotonic() - started < 0.6 and not src.health().ready
        assert features.unread == 300 and features.known == 0 and (features.alpha == 1.0).all()
        started = time.monotonic()
        features = await src.fetch(ids)  # the store is not read at all until the probe finds it back
        assert time.monotonic() - started < 0.05 and features.unread == 300


async def test_a_store_known_to_fail_is_not_read_until_the_probe_finds_it_back() -> None:
    options = {"retries": 0, "unready_after_failures": 2, "probe_interval_s": 0.05}
    async with emulator() as em, source(em, on_failure="degrade", **options) as src:
        em.faults.unavailable_rate = 1.0
        for _ in range(2):
            assert (await src.fetch(["e1", "e2"])).unread == 2
        assert not src.health().ready
        em.reset()
        started = time.monotonic()
        assert (await src.fetch(["e1", "e2"])).unread == 2
        assert time.monotonic() - started < 0.01 and em.counters.ids <= 1  # at most a probe's one id
        assert src.stats()["skipped_reads"] == 1
        em.faults.unavailable_rate = 0.0
        for _ in range(100):
            if src.health().ready:
                break
            await asyncio.sleep(0.01)
        features = await src.fetch(["e1", "e2"])
        assert features.unread == 0 and features.alpha.tolist() == [2.5, 3.5]


async def test_fail_fast_while_the_store_is_known_to_fail() -> None:
    async with emulator() as em, source(em, retries=0, unready_after_failures=1, probe_interval_s=60) as src:
        em.faults.unavailable_rate = 1.0
        with pytest.raises(FeatureSourceError, match="UNAVAILABLE"):
            await src.fetch(["e1"])
        em.reset()
        with pytest.raises(FeatureSourceError, match="is not ready: feature store failing"):
            await src.fetch(["e1"])
        assert em.counters.ids == 0


@pytest.mark.parametrize("api_version", ["v1", "v1beta1"])
async def test_feature_store_2_matches_the_featurestore(api_version: str, rand) -> None:
    ids = [f"e{i}" for i in rand.gen.permutation(N_ENTITIES)[:150]] + ["missing"]
    async with emulator() as em, source(em, FeatureViewSource, api_version=api_version) as src:
        em.reset()
        features = await src.fetch(ids)
        alpha, beta = expected(ids)
        np.testing.assert_array_equal(features.alpha, alpha)
        np.testing.assert_array_equal(features.beta, beta)
        assert features.known == 150
        if api_version == "v1":
            assert em.counters.calls["FetchFeatureValues"] == 151  # one key per call
        else:
            assert reads(em) == {"51": 1, "100": 1}  # batched, two chunks


async def test_feature_store_2_streaming_retries_a_broken_stream() -> None:
    ids = [f"e{i}" for i in range(10)] + ["missing"]
    async with emulator() as em, source(em, FeatureViewSource, api_version="v1beta1", backoff_s=0.001) as src:
        em.reset()
        em.faults.break_next = 1  # sends the OK answer, then breaks before the NOT_FOUND one
        features = await src.fetch(ids)
        np.testing.assert_array_equal(features.alpha, expected(ids)[0])
        assert reads(em) == {"1": 1, "11": 1}


async def test_feature_store_2_unary_retries_unavailable() -> None:
    async with emulator() as em, source(em, FeatureViewSource, backoff_s=0.001) as src:
        em.faults.unavailable_next = 1
        features = await src.fetch(["e5", "nope"])
        np.testing.assert_array_equal(features.alpha, [6.5, 1.0])


async def test_unknown_feature_names_fail_clearly() -> None:
    async with emulator() as em, source(em, alpha_feature="ctr") as src:
        assert not src.health().ready  # the start's check failed too
        with pytest.raises(FeatureSourceError, match="INVALID_ARGUMENT: feature_selector names unknown features"):
            await src.fetch(["e1"])


@pytest.mark.parametrize(
    ("cls", "spec"),
    [
        (VertexSource, "projects/p/locations/l/featurestores/f"),
        (FeatureViewSource, "projects/p/locations/l/featureOnlineStores/s"),
    ],
)
def test_malformed_resource_names_are_rejected(cls: type, spec: str) -> None:
    with pytest.raises(FeatureSourceError, match="must be projects/P/locations/L/"):
        cls(spec, VertexOptions())


async def test_production_transport_is_tls_to_the_regional_endpoint() -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform_v1.services.featurestore_online_serving_service.transports import grpc_asyncio

    transport_cls = grpc_asyncio.FeaturestoreOnlineServingServiceGrpcAsyncIOTransport
    # No call is made: gRPC channels connect on first use.
    transport = await make_transport(transport_cls, VertexOptions(), "europe-west4", AnonymousCredentials())
    try:
        assert transport.host == "europe-west4-aiplatform.googleapis.com:443"
        assert transport._ssl_channel_credentials is None  # default TLS roots, not an insecure channel
    finally:
        await transport.close()
    override = await make_transport(
        transport_cls, replace(VertexOptions(), endpoint="vertex.internal:8443"), "x", AnonymousCredentials()
    )
    try:
        assert override.host == "vertex.internal:8443"
    finally:
        await override.close()


async def test_missing_application_default_credentials_fail_the_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A credentials file that does not exist fails google.auth.default at once, without any network lookup.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    src = VertexSource(ENTITY_TYPE, VertexOptions())
    with pytest.raises(FeatureSourceError, match="no Google credentials for Vertex AI"):
        await src.start()


async def test_concurrent_batched_reads_sharing_keys_each_get_every_value(rand) -> None:
    # Without a cache, concurrent requests share ids; on the shared stream one answer may carry keys of several
    # reads, or keys delivered already with another read's answer.
    bodies = [[f"e{i}" for i in rand.gen.choice(N_ENTITIES + 50, size=250, replace=False)] for _ in range(12)]
    async with emulator(Faults(latency_ms=5, jitter_ms=4)) as em, source(em, FeatureViewSource) as src:
        results = await asyncio.gather(*(src.fetch(body) for body in bodies))
        assert src._streams is not None and src._streams.opened == 1  # every read on one stream
    for body, features in zip(bodies, results):
        alpha, beta = expected(body)
        assert features.alpha.tolist() == alpha.tolist() and features.beta.tolist() == beta.tolist()
        assert features.known == sum(int(i[1:]) < N_ENTITIES for i in body)
