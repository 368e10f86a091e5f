"""The emulator speaks the real wire protocol: checked with the real client library over loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.api_core import exceptions
from google.cloud import aiplatform_v1, aiplatform_v1beta1
from google.cloud.aiplatform_v1.services.featurestore_online_serving_service.transports import grpc_asyncio as fs_t
from google.cloud.aiplatform_v1beta1.services.feature_online_store_service.transports import grpc_asyncio as fos_t

from mab_service.emulator import MAX_IDS_PER_READ, Emulator, EmulatorControl, Faults, parse_table
from tests.conftest import EmulatorProcess, start_emulator

ENTITY_TYPE = "projects/p/locations/l/featurestores/f/entityTypes/e"
FEATURE_VIEW = "projects/p/locations/l/featureOnlineStores/s/featureViews/v"
ROWS = ["entity_id,alpha,beta,clicks"] + [f"e{i},{i}.25,{i + 10},{i}" for i in range(300)]


@asynccontextmanager
async def serving(faults: Faults | None = None) -> AsyncIterator[tuple[Emulator, str]]:
    em = Emulator(parse_table(ROWS, "t.csv"), faults, seed=11)
    port = await em.start()
    try:
        yield em, f"127.0.0.1:{port}"
    finally:
        await em.stop(None)


def featurestore_client(target: str) -> aiplatform_v1.FeaturestoreOnlineServingServiceAsyncClient:
    channel = grpc.aio.insecure_channel(target)
    transport = fs_t.FeaturestoreOnlineServingServiceGrpcAsyncIOTransport(channel=channel)
    return aiplatform_v1.FeaturestoreOnlineServingServiceAsyncClient(transport=transport)


async def streaming_read(target: str, ids: list[str], features: list[str]) -> list:
    client = featurestore_client(target)
    request = aiplatform_v1.StreamingReadFeatureValuesRequest(
        entity_type=ENTITY_TYPE,
        entity_ids=ids,
        feature_selector=aiplatform_v1.FeatureSelector(id_matcher=aiplatform_v1.IdMatcher(ids=features)),
    )
    try:
        stream = await client.streaming_read_feature_values(request=request, timeout=5)
        return [message async for message in stream]
    finally:
        await client.transport.close()


@pytest.mark.anyio
async def test_streaming_read_answers_a_header_then_one_message_per_entity_in_order() -> None:
    async with serving() as (em, target):
        messages = await streaming_read(target, ["e7", "nobody", "e2"], ["beta", "alpha"])
    assert [d.id for d in messages[0].header.feature_descriptors] == ["beta", "alpha"]
    views = [m.entity_view for m in messages[1:]]
    assert [v.entity_id for v in views] == ["e7", "nobody", "e2"]
    assert [d.value.int64_value for d in views[0].data] == [17, 0]  # beta is INT64, alpha DOUBLE
    assert views[0].data[1].value.double_value == 7.25
    # An unknown entity is not an error: it comes back with one empty value per feature.
    assert len(views[1].data) == 2 and all(type(d.value).pb(d.value).ByteSize() == 0 for d in views[1].data)


@pytest.mark.anyio
async def test_more_than_100_ids_is_invalid_argument() -> None:
    async with serving() as (em, target):
        assert len(await streaming_read(target, [f"e{i}" for i in range(MAX_IDS_PER_READ)], ["alpha"])) == 101
        with pytest.raises(exceptions.InvalidArgument, match="1 to 100 ids per request \\(got 101\\)"):
            await streaming_read(target, [f"e{i}" for i in range(MAX_IDS_PER_READ + 1)], ["alpha"])
        assert em.counters.invalid_argument == 1


@pytest.mark.anyio
async def test_unknown_features_and_bad_resource_names_are_invalid_argument() -> None:
    async with serving() as (em, target):
        with pytest.raises(exceptions.InvalidArgument, match="unknown features \\['ctr'\\]"):
            await streaming_read(target, ["e1"], ["alpha", "ctr"])
        client = featurestore_client(target)
        try:
            with pytest.raises(exceptions.InvalidArgument, match="not a valid resource name"):
                await client.read_feature_values(request={"entity_type": "nope", "entity_id": "e1"}, timeout=5)
            answer = await client.read_feature_values(
                request={
                    "entity_type": ENTITY_TYPE,
                    "entity_id": "e3",
                    "feature_selector": {"id_matcher": {"ids": ["*"]}},
                },
                timeout=5,
            )
            assert [d.id for d in answer.header.feature_descriptors] == ["alpha", "beta", "clicks"]
            assert answer.entity_view.data[2].value.int64_value == 3
        finally:
            await client.transport.close()


@pytest.mark.anyio
async def test_feature_store_2_fetch_and_streaming_fetch() -> None:
    async with serving() as (em, target):
        channel = grpc.aio.insecure_channel(target)
        client = aiplatform_v1beta1.FeatureOnlineStoreServiceAsyncClient(
            transport=fos_t.FeatureOnlineStoreServiceGrpcAsyncIOTransport(channel=channel)
        )
        try:
            answer = await client.fetch_feature_values(
                feature_view=FEATURE_VIEW, data_key=aiplatform_v1beta1.FeatureViewDataKey(key="e4"), timeout=5
            )
            assert {p.name: p.value.double_value for p in answer.key_values.features}["alpha"] == 4.25
            with pytest.raises(exceptions.NotFound):
                await client.fetch_feature_values(
                    feature_view=FEATURE_VIEW, data_key=aiplatform_v1beta1.FeatureViewDataKey(key="x"), timeout=5
                )

            async def requests():
                keys = [aiplatform_v1beta1.FeatureViewDataKey(key=k) for k in ("e1", "x", "e2")]
                yield aiplatform_v1beta1.StreamingFetchFeatureValuesRequest(feature_view=FEATURE_VIEW, data_keys=keys)

            stream = await client.streaming_fetch_feature_values(requests=requests(), timeout=5)
            answers = [a async for a in stream]
            assert [a.status.code for a in answers] == [0, 5]
            assert [d.data_key.key for d in answers[0].data] == ["e1", "e2"]
            assert [k.key for k in answers[1].data_keys_with_error] == ["x"]
        finally:
            await client.transport.close()
    assert em.counters.calls == {"v1beta1.FetchFeatureValues": 2, "StreamingFetchFeatureValues": 1}


@pytest.mark.anyio
async def test_faults_latency_and_counters() -> None:
    async with serving(Faults(latency_ms=40, jitter_ms=10)) as (em, target):
        started = time.monotonic()
        await streaming_read(target, ["e1"], ["alpha"])
        assert time.monotonic() - started >= 0.03
        em.faults = Faults(unavailable_next=1)
        with pytest.raises(exceptions.ServiceUnavailable, match="emulated outage"):
            await streaming_read(target, ["e1"], ["alpha"])
        em.faults = Faults(break_next=1)
        with pytest.raises(exceptions.ServiceUnavailable, match="emulated stream break"):
            await streaming_read(target, [f"e{i}" for i in range(10)], ["alpha"])
        # The client sees the break before the server's handler has unwound: wait (bounded) for it to finish.
        deadline = time.monotonic() + 5
        while em.stats()["in_flight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stats = em.stats()
    assert stats["calls"] == {"StreamingReadFeatureValues": 3}
    assert stats["ids_per_call"] == {"1": 2, "10": 1} and stats["max_ids_per_call"] == 10
    assert stats["injected_unavailable"] == 1 and stats["injected_breaks"] == 1 and stats["in_flight"] == 0


def test_faults_are_validated() -> None:
    with pytest.raises(ValueError, match="break_rate must be in \\[0, 1\\]"):
        Faults(break_rate=2.0)
    with pytest.raises(ValueError, match="latency_ms must be >= 0"):
        Faults(latency_ms=-1)


# --- the one command ----------------------------------------------------------------------------------------------


def test_the_command_serves_the_csv_and_takes_control_calls(emulator_process: EmulatorProcess) -> None:
    with EmulatorControl(emulator_process.target) as control:
        control.reset()
        assert control.configure(latency_ms=1.5)["latency_ms"] == 1.5
        with pytest.raises(grpc.RpcError) as info:
            control.configure(break_rate=3)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stats = control.stats()
        assert stats["entities"] == 5004 and stats["calls"] == {} and stats["faults"]["latency_ms"] == 1.5
        control.configure(latency_ms=0.0)


def test_a_bad_table_stops_the_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,alpha\nx,1\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "mab_service.emulator", "--port", "0", "--features", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3 and "the header must name entity_id" in done.stderr


def test_the_command_starts_on_a_free_port(table_csv: Path) -> None:
    emulator = start_emulator(table_csv, ["--latency-ms", "1", "--seed", "5"])
    try:
        with EmulatorControl(emulator.target) as control:
            assert control.stats()["faults"]["latency_ms"] == 1.0
    finally:
        emulator.proc.terminate()
        assert emulator.proc.wait(timeout=10) == 0  # SIGTERM is a clean stop
    assert "listening on 127.0.0.1:" in emulator.log.read_text()
