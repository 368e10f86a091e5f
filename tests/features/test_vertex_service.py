"""The service process on the Vertex source, against the emulator process: /predict and /health end to end."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from mab_service.emulator import EmulatorControl
from tests.conftest import EmulatorProcess, Server, wait_until

ENTITY_TYPE = "projects/p/locations/l/featurestores/f/entityTypes/content"


@pytest.fixture
def control(emulator_process: EmulatorProcess) -> Iterator[EmulatorControl]:
    with EmulatorControl(emulator_process.target) as control:
        control.configure(latency_ms=0, jitter_ms=0, unavailable_rate=0, break_rate=0)
        control.reset()
        yield control
        control.configure(latency_ms=0, jitter_ms=0, unavailable_rate=0, break_rate=0)


def start(server_factory: Callable[..., Server], emulator: EmulatorProcess, **env: str) -> Server:
    settings = {"VERTEX_FEATURESTORE_EMULATOR_HOST": emulator.target, "MAB_VERTEX_PROBE_INTERVAL_S": "0.05"}
    return server_factory(env=settings | env, args=["--features", f"vertex:{ENTITY_TYPE}"])


@pytest.mark.parametrize("policy", ["fail", "degrade"])
def test_predict_reads_the_store_and_health_follows_it(
    server_factory: Callable[..., Server], emulator_process: EmulatorProcess, control: EmulatorControl, policy: str
) -> None:
    server = start(server_factory, emulator_process, MAB_CACHE_TTL_S="0", MAB_VERTEX_RETRIES="0",
                   MAB_VERTEX_UNREADY_AFTER_FAILURES="2", MAB_ON_STORE_FAILURE=policy)  # fmt: skip
    body = {"user_id": "u", "candidates": ["weak", "strong", "nobody", "mid"] + [f"c{i}" for i in range(200)]}
    control.reset()  # forget the start's readiness check
    with server.client() as http:
        answer = http.post("/predict", json=body | {"top_k": 1, "seed": 3})
        assert answer.status_code == 200 and answer.json()["ids"] == ["strong"]
        assert answer.json()["degraded"] is False
        assert control.stats()["ids_per_call"] == {"4": 1, "100": 2}  # 204 ids in three chunks

        control.configure(unavailable_rate=1.0)
        for _ in range(3):  # two failed reads, then the store is known to be failing and is not read
            read_before = control.stats()["ids"]
            failed = http.post("/predict", json=body)
            if policy == "fail":
                assert failed.status_code == 503 and failed.json()["error"] == "feature_source_unavailable"
            else:
                assert failed.status_code == 200 and failed.json()["degraded"] is True
                assert sorted(failed.json()["ids"]) == sorted(body["candidates"])  # every candidate, by the prior
        assert control.stats()["ids"] - read_before < 100  # the last request read nothing (the probe reads one id)
        health = http.get("/health")
        assert health.status_code == 503 and "feature store failing" in health.json()["reason"]

        control.configure(unavailable_rate=0.0)
        assert wait_until(lambda: http.get("/health").status_code == 200)  # the probe saw the store come back
        again = http.post("/predict", json=body)
        assert again.status_code == 200 and again.json()["degraded"] is False


def test_the_cache_serves_repeated_candidates_without_the_store(
    server_factory: Callable[..., Server], emulator_process: EmulatorProcess, control: EmulatorControl
) -> None:
    server = start(server_factory, emulator_process, MAB_CACHE_TTL_S="60")
    body = {"user_id": "u", "candidates": [f"c{i}" for i in range(300)] + ["strong"], "top_k": 1}
    with server.client() as http:
        control.reset()
        assert http.post("/predict", json=body).json()["ids"] == ["strong"]
        read = control.stats()["ids"]
        assert read == 301
        for _ in range(3):
            assert http.post("/predict", json=body).json()["ids"] == ["strong"]
        assert control.stats()["ids"] == read
