"""Feature Store 2.0 end to end: the service process on ``vertex-fos:`` against the emulator process, under load.

A cold start under sustained load must converge (every candidate cached, no more store reads) with no degraded
answer at any time and /health 200 throughout: the reads of requests that gave up finish and fill the cache, and
our own overload sheds requests instead of calling the store failing. A warm-up file fills the cache before
/health turns 200, so even the first requests read nothing. Traffic goes to 127.0.0.1 only, bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from mab_service.emulator import EmulatorControl
from tests.conftest import EmulatorProcess, Server, wait_until

FEATURE_VIEW = "projects/p/locations/l/featureOnlineStores/s/featureViews/content"
#: Ids of the session's table (tests/conftest.py: c0 .. c4999 plus a few named ones).
IDS = [f"c{i}" for i in range(5000)]
CONNECTIONS = 16


@pytest.fixture
def control(emulator_process: EmulatorProcess) -> Iterator[EmulatorControl]:
    """The session emulator at 5 ms +- 2 ms per read, as in the benchmark; plain again after the test."""
    with EmulatorControl(emulator_process.target) as control:
        control.configure(latency_ms=5, jitter_ms=2, unavailable_rate=0, break_rate=0)
        control.reset()
        yield control
        control.configure(latency_ms=0, jitter_ms=0, unavailable_rate=0, break_rate=0)


def start(server_factory: Callable[..., Server], emulator: EmulatorProcess, ready: bool = True, **env: str) -> Server:
    settings = {"VERTEX_FEATURESTORE_EMULATOR_HOST": emulator.target}
    return server_factory(env=settings | env, args=["--features", f"vertex-fos:{FEATURE_VIEW}"], ready=ready)


def source_event(server: Server, event: str, source: str = "vertex-fos") -> float:
    """This server's count of ``event`` in mab_feature_source_events_total (its own reads: other servers of the
    session share the emulator and its counters)."""
    with server.client() as http:
        text = http.get("/metrics").text
    prefix = f'mab_feature_source_events_total{{event="{event}",source="{source}"}} '
    return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


class Tally:
    """Answers per second of load: 200 whole, 200 degraded, 503 shed; and /health answers other than 200."""

    def __init__(self) -> None:
        self.seconds: list[dict[str, int]] = []
        self.unhealthy = 0

    def second(self, k: int) -> dict[str, int]:
        while len(self.seconds) <= k:
            self.seconds.append({"whole": 0, "degraded": 0, "shed": 0})
        return self.seconds[k]


async def load(url: str, duration_s: float, seed: int) -> Tally:
    """``CONNECTIONS`` clients posting 200 random candidates each, back to back, for ``duration_s``; a probe reads
    /health every 50 ms meanwhile."""
    tally = Tally()
    started = time.monotonic()
    rng = random.Random(seed)

    async def client(http: httpx.AsyncClient) -> None:
        while (elapsed := time.monotonic() - started) < duration_s:
            body = {"user_id": "u", "candidates": rng.sample(IDS, 200), "top_k": 10}
            answer = await http.post("/predict", json=body)
            second = tally.second(int(elapsed))
            if answer.status_code == 200:
                second["degraded" if answer.json()["degraded"] else "whole"] += 1
            else:
                assert answer.status_code == 503 and answer.json()["error"] == "overloaded", answer.text
                second["shed"] += 1

    async def probe(http: httpx.AsyncClient) -> None:
        while time.monotonic() - started < duration_s:
            tally.unhealthy += (await http.get("/health")).status_code != 200
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=CONNECTIONS + 1)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as http:
        await asyncio.gather(probe(http), *(client(http) for _ in range(CONNECTIONS)))
    return tally


@pytest.mark.parametrize(("api_version", "bound_s"), [("v1beta1", 4), ("v1", 12)])
def test_a_cold_start_under_load_converges_with_no_degraded_answer(
    server_factory: Callable[..., Server],
    emulator_process: EmulatorProcess,
    control: EmulatorControl,
    api_version: str,
    bound_s: int,
) -> None:
    # The default settings (cache on, TTL 60 s): the 5,000 ids of the table fit the cache many times over.
    server = start(server_factory, emulator_process, MAB_VERTEX_API_VERSION=api_version)
    tally = asyncio.run(load(server.url, bound_s + 3, seed=11))
    # Converged within the bound: every id cached, the store no longer read by requests.
    calls_before = source_event(server, "calls")
    late = asyncio.run(load(server.url, 1.5, seed=12))
    assert source_event(server, "calls") == calls_before > 0
    assert sum(s["whole"] for s in late.seconds) > 0 and not any(s["shed"] for s in late.seconds)
    # Never a degraded answer, before or after: overload sheds, and /health stayed 200 throughout.
    assert not any(s["degraded"] for s in tally.seconds + late.seconds), tally.seconds
    assert tally.unhealthy == 0 and late.unhealthy == 0
    # No answer shed in the seconds after the bound.
    assert not any(s["shed"] for s in tally.seconds[bound_s:]), tally.seconds


def test_warm_up_reads_every_id_before_health_turns_ready_and_keeps_the_first_requests_off_the_store(
    server_factory: Callable[..., Server], emulator_process: EmulatorProcess, control: EmulatorControl, table_csv: Path
) -> None:
    server = start(server_factory, emulator_process, ready=False, MAB_WARMUP_IDS=str(table_csv))
    with server.client() as http:
        assert wait_until(lambda: http.get("/health").status_code == 200, timeout_s=30)
        warm = control.stats()
        assert warm["ids"] >= len(IDS) and warm["max_ids_per_call"] == 100  # large batched reads
        calls = source_event(server, "calls")
        tally = asyncio.run(load(server.url, 1.0, seed=13))
        assert source_event(server, "calls") == calls  # the first requests read nothing from the store
        assert sum(s["whole"] for s in tally.seconds) > 0
        assert not any(s["degraded"] or s["shed"] for s in tally.seconds)
        metrics = http.get("/metrics").text
    read = [line for line in metrics.splitlines() if 'event="warmup_read"' in line and not line.startswith("#")]
    assert read and float(read[0].rsplit(" ", 1)[1]) >= len(IDS)
    assert 'mab_feature_source_events_total{event="calls",source="vertex-fos"}' in metrics
    os.killpg(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=10)
    log = server.proc.stdout.read().decode() if server.proc.stdout else ""
    assert "warm-up: reading" in log and "ids read in" in log


def test_health_says_it_is_warming_up_and_the_warm_up_is_bounded_in_time(
    server_factory: Callable[..., Server],
    emulator_process: EmulatorProcess,
    control: EmulatorControl,
    tmp_path: Path,
) -> None:
    # 50,000 ids (most unknown to the store) in reads of 150 ms: about 2 s of warm-up, cut at 1 s.
    ids = tmp_path / "ids.txt"
    ids.write_text("# hot ids\n" + "\n".join(f"c{i}" for i in range(50_000)) + "\n", encoding="utf-8")
    control.configure(latency_ms=150, jitter_ms=0)
    server = start(server_factory, emulator_process, ready=False, MAB_WARMUP_IDS=str(ids), MAB_WARMUP_TIMEOUT_S="1")
    with server.client() as http:
        started = time.monotonic()
        first = http.get("/health")
        assert first.status_code == 503 and "warming up the feature cache" in first.json()["reason"]
        assert wait_until(lambda: http.get("/health").status_code == 200, timeout_s=10)
        assert time.monotonic() - started < 3
        # Stopped by the timeout, not by the end of the file.
        assert 0 < source_event(server, "warmup_read", "cache+vertex-fos") < 50_000
