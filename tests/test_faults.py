"""A failing feature store, end to end: the service process on the Vertex source against the emulator process.

Latency beyond the deadline, 30% of reads UNAVAILABLE, the emulator killed and started again mid-load: under
``on_store_failure = degrade`` every answer is a 200 (marked ``degraded`` where the prior stood in), under ``fail``
a 200 or a 503 that says why; never a 500, never an answer later than the deadline allows, /health says what the
store does, and the service comes back by itself. Traffic goes to 127.0.0.1 only, bounded in count and time.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from mab_service.emulator import EmulatorControl
from tests.conftest import EmulatorProcess, Server, start_emulator, stop_process, unused_tcp_port, wait_until

ENTITY_TYPE = "projects/p/locations/l/featurestores/f/entityTypes/content"
BODY = {"user_id": "u", "candidates": ["strong", "weak", "nobody"] + [f"c{i}" for i in range(197)], "top_k": 10}
DEADLINE_S = 0.5
#: An answer takes at most the deadline plus the worker's own time (generous: CI machines are shared).
LATEST_S = DEADLINE_S + 0.5
POLICIES = ("degrade", "fail")


def serve(server_factory: Callable[..., Server], target: str, policy: str = "degrade", ready: bool = True) -> Server:
    settings = {
        "VERTEX_FEATURESTORE_EMULATOR_HOST": target,
        "MAB_ON_STORE_FAILURE": policy,
        "MAB_VERTEX_DEADLINE_S": str(DEADLINE_S),
        "MAB_VERTEX_PROBE_INTERVAL_S": "0.1",
        "MAB_CACHE_TTL_S": "0",
    }
    return server_factory(env=settings, args=["--features", f"vertex:{ENTITY_TYPE}"], ready=ready)


@pytest.fixture(scope="module")
def servers(server_factory: Callable[..., Server], emulator_process: EmulatorProcess) -> dict[str, Server]:
    """One server per policy on the session's emulator."""
    return {policy: serve(server_factory, emulator_process.target, policy) for policy in POLICIES}


@pytest.fixture
def control(emulator_process: EmulatorProcess, servers: dict[str, Server]) -> Iterator[EmulatorControl]:
    """The session emulator's faults, cleared after the test; the servers see the store healthy again after."""
    with EmulatorControl(emulator_process.target) as control:
        control.reset()
        yield control
        control.configure(latency_ms=0, jitter_ms=0, unavailable_rate=0, break_rate=0)
    for server in servers.values():
        assert wait_until(lambda: health(server.url) == 200, timeout_s=10, interval_s=0.05)


def post_many(url: str, n: int, concurrency: int = 4) -> list[tuple[int, dict[str, object], float]]:
    """``n`` /predict requests, ``concurrency`` at a time: (status, answer, seconds) of each."""

    def one(client: httpx.Client) -> tuple[int, dict[str, object], float]:
        started = time.monotonic()
        answer = client.post("/predict", json=BODY)
        return answer.status_code, answer.json(), time.monotonic() - started

    with httpx.Client(base_url=url, timeout=10) as client, concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda _: one(client), range(n)))


def check_answers(results: list[tuple[int, dict[str, object], float]], policy: str, shed: int = 0) -> tuple[int, int]:
    """Every answer is a well-formed 200, or under ``fail`` a 503 naming the store, or one of at most ``shed`` 503
    ``overloaded`` answers; returns (degraded, failed or shed)."""
    degraded = failed = overloaded = 0
    for status, answer, _ in results:
        if status == 200:
            assert len(answer["ids"]) == 10 and isinstance(answer["degraded"], bool)  # type: ignore[arg-type]
            degraded += bool(answer["degraded"])
        elif status == 503 and answer["error"] == "overloaded":
            overloaded += 1
        else:
            assert policy == "fail" and status == 503, (status, answer)
            assert answer["error"] == "feature_source_unavailable" and answer["message"], answer
            failed += 1
    assert overloaded <= shed, overloaded
    if policy == "degrade":
        assert failed == 0
    else:
        assert degraded == 0
    return degraded, failed + overloaded


def health(url: str) -> int:
    return httpx.get(url + "/health", timeout=5).status_code


@pytest.mark.parametrize("policy", POLICIES)
def test_latency_beyond_the_deadline_costs_no_request_more_than_the_deadline(
    servers: dict[str, Server], control: EmulatorControl, policy: str
) -> None:
    control.configure(latency_ms=2000)
    results = post_many(servers[policy].url, 16)
    # Until the breaker opens, a store that times out without an error may be this worker's own overload: those
    # requests (at most the 3 fan-outs that open it, and those started meanwhile: 4 run at once) are shed.
    degraded, failed = check_answers(results, policy, shed=3 + 4)
    assert degraded + failed == 16  # no read finished in time
    assert max(seconds for *_, seconds in results) < LATEST_S
    assert health(servers[policy].url) == 503  # three fan-outs in a row failed: the store is known to fail


@pytest.mark.parametrize("policy", POLICIES)
def test_thirty_percent_unavailable_is_retried_and_nothing_is_lost(
    servers: dict[str, Server], control: EmulatorControl, policy: str
) -> None:
    control.configure(unavailable_rate=0.3)
    results = post_many(servers[policy].url, 40)
    degraded, failed = check_answers(results, policy)
    # Two retries per chunk: a chunk fails for good with probability 0.3**3 = 2.7%; most answers are whole.
    assert control.stats()["injected_unavailable"] >= 10 and degraded + failed <= 10
    assert max(seconds for *_, seconds in results) < LATEST_S


@pytest.fixture
def own_emulator(table_csv: Path) -> Iterator[list[EmulatorProcess]]:
    """An emulator of the test's own, to kill and start again; the test appends its restarts to be stopped."""
    processes = [start_emulator(table_csv)]
    yield processes
    for process in processes:
        stop_process(process.proc)


def test_the_store_killed_and_started_again_mid_load(
    server_factory: Callable[..., Server], own_emulator: list[EmulatorProcess], table_csv: Path
) -> None:
    target = own_emulator[0].target
    server = serve(server_factory, target)
    assert check_answers(post_many(server.url, 8), "degrade") == (0, 0)

    stop_process(own_emulator[0].proc)  # SIGTERM, as Kubernetes stops it
    down = post_many(server.url, 16)
    assert check_answers(down, "degrade")[0] == 16 and max(seconds for *_, seconds in down) < LATEST_S
    assert wait_until(lambda: health(server.url) == 503, timeout_s=5, interval_s=0.05)
    fast = post_many(server.url, 8)  # known to be down: answered without waiting for the store
    assert check_answers(fast, "degrade")[0] == 8 and max(seconds for *_, seconds in fast) < 0.25

    own_emulator.append(start_emulator(table_csv, port=int(target.rsplit(":", 1)[1])))
    assert wait_until(lambda: health(server.url) == 200, timeout_s=5, interval_s=0.05)  # recovered by itself
    assert check_answers(post_many(server.url, 8), "degrade") == (0, 0)
    with server.client() as http:
        assert "mab_degraded_fetches_total 24.0" in http.get("/metrics").text


def test_no_store_at_start_degrades_until_it_comes(server_factory: Callable[..., Server], table_csv: Path) -> None:
    port = unused_tcp_port()
    server = serve(server_factory, f"127.0.0.1:{port}", ready=False)
    assert health(server.url) == 503
    assert check_answers(post_many(server.url, 4), "degrade")[0] == 4
    emulator = start_emulator(table_csv, port=port)
    try:
        assert wait_until(lambda: health(server.url) == 200, timeout_s=5, interval_s=0.05)
        assert check_answers(post_many(server.url, 4), "degrade") == (0, 0)
    finally:
        stop_process(emulator.proc)
